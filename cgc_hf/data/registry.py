"""Named datasets: where each lives and which columns carry the image, the class and the object.

Every dataset is reduced to a :class:`DatasetSpec`: which column holds the image, which the
class, and which (if any) a box or mask of the object, the ground truth that the Content
Heatmap metric needs. Columns are checked when the data is loaded, never assumed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..errors import DataError
from .annotations import BOX_FORMATS, MaskRule


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and which columns carry the image, the class and the object.

    Args:
        name: short name (registry key, path or Hub id).
        hub_id: Hugging Face Hub dataset id (parquet; ``datasets`` >= 4 runs no loading scripts).
        image_column: column of images.
        label_column: column of classes (``ClassLabel``, integer or string).
        box_column: column of object boxes, or None.
        mask_column: column of object masks (images), or None. Preferred over the box.
        train_split: split used for training.
        eval_split: split used for evaluation; None holds out a seeded slice of ``train_split``.
        notes: provenance and caveats.
        box_format: ``"xyxy"`` / ``"xywh"`` in pixels, ``"xyxy_norm"`` / ``"xywh_norm"`` as
            fractions of the image size, or ``"yxyx_norm"`` (the TFDS order); boxes stored as
            structs of named fields (``xmin, ymin, xmax, ymax``, ``x, y, width, height``) are
            read by name.
        mask_foreground: mask values that mean "object" (e.g. trimap codes).
        mask_threshold: without ``mask_foreground``: object where the mask value is above this
            share of its full scale (0: nonzero; 0.5: > 127 of 255). None: decided per image
            (nonzero for 0/1 masks, above 127 otherwise); :func:`load_splits` decides it once
            per dataset from a sample of its masks.
        label_names_column: column with the class name of each row, used to name integer labels.
    """

    name: str
    hub_id: str | None
    image_column: str = "image"
    label_column: str = "label"
    box_column: str | None = None
    mask_column: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    notes: str = ""
    box_format: str = "xyxy"
    mask_foreground: tuple[int, ...] | None = None
    label_names_column: str | None = None
    mask_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.box_format not in BOX_FORMATS:
            raise DataError(
                f"box_format must be one of {BOX_FORMATS}; got {self.box_format!r} "
                f"(dataset {self.name!r})."
            )
        if self.mask_foreground is not None:
            values = tuple(self.mask_foreground)
            integers = all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values
            )
            if not values or not integers:
                raise DataError(
                    f"mask_foreground (--mask_foreground_values) must be one or more integers, "
                    f"e.g. 1 3; got {self.mask_foreground!r} (dataset {self.name!r})."
                )
            object.__setattr__(self, "mask_foreground", tuple(int(v) for v in values))
        t = self.mask_threshold
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and 0 <= t < 1):
            raise DataError(
                f"mask_threshold (--mask_threshold) must be a number in [0, 1), a share of the "
                f"mask's full scale (0.5: > 127 of 255); got {t!r} (dataset {self.name!r})."
            )

    @property
    def mask_rule(self) -> MaskRule | None:
        """Which mask values are the object; None: decided per image."""
        if self.mask_foreground is not None:
            return MaskRule(foreground=self.mask_foreground)
        if self.mask_threshold is not None:
            return MaskRule(threshold=float(self.mask_threshold))
        return None

    @property
    def has_object(self) -> bool:
        """Whether the rows carry a box or mask of the object (needed by Content Heatmap)."""
        return self.box_column is not None or self.mask_column is not None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "synthetic",
            None,
            box_column="bbox",
            mask_column="mask",
            eval_split="validation",
            notes="Generated offline by cgc_hf.synthetic.make_synthetic: shapes on clutter with "
            "distractors and a train-only spurious corner cue; splits train/validation/test.",
        ),
        DatasetSpec(
            "cub",
            "bentrevett/caltech-ucsd-birds-200-2011",
            box_column="bbox",
            notes="CUB-200-2011, 200 species, 5994 train / 5794 test; bbox is [x0, y0, x1, y1] "
            "pixels (some boxes reach x1 > w - x0, so it is not x, y, w, h).",
        ),
        DatasetSpec(
            "cub_masks",
            "dpdl-benchmark/caltech_birds2011",
            mask_column="segmentation_mask",
            mask_threshold=0.5,
            label_names_column="label_name",
            notes="CUB-200-2011 with segmentation masks (soft 0-255, object > 127); integer "
            "label named by label_name.",
        ),
        DatasetSpec(
            "cars",
            "tanganke/stanford_cars",
            notes="Stanford Cars, 196 classes, 8144 train / 8041 test; no boxes in this mirror.",
        ),
        DatasetSpec(
            "aircraft",
            "HuggingFaceM4/FGVC-Aircraft",
            label_column="variant",
            box_column="bbox",
            notes="FGVC-Aircraft, 100 variants (the standard task); train/validation/test. bbox is "
            "a struct of xmin, ymin, xmax, ymax pixels. Other mirrors' columns are unverified: "
            "pass --label_column_name family for the 70-family task.",
        ),
        DatasetSpec(
            "flowers102",
            "dpdl-benchmark/oxford_flowers102",
            notes="Oxford Flowers-102 (train/validation/test); integer labels are named by index.",
        ),
        DatasetSpec(
            "dogs",
            "maurice-fp/stanford-dogs",
            notes="Stanford Dogs, 120 breeds; this mirror's box column is unverified, so none is "
            "declared.",
        ),
        DatasetSpec(
            "pets",
            "dpdl-benchmark/oxford_iiit_pet",
            mask_column="segmentation_mask",
            mask_foreground=(1, 3),
            notes="Oxford-IIIT Pet, 37 breeds, 3680 train / 3669 test; the mask is the trimap "
            "(1 pet, 2 background, 3 outline); pet and outline count as the object.",
        ),
    )
}
"""Named datasets. Column facts come from the dataset cards and are re-checked at load time."""
