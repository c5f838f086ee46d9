"""The torch side: a Hugging Face dataset as model inputs (image, label, object mask), and collate.

Example:
    >>> ds = CGCDataset(splits.train, build_transform(data_config, train=True), splits.spec)
    >>> batch = collate([ds[0], ds[1]])  # pixel_values (2, 3, H, W), labels (2,), mask (2, H, W)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..config import IGNORE_INDEX
from ..errors import DataError, close_matches, first_line
from .annotations import box_to_mask, foreground
from .images import array_to_image, to_rgb
from .registry import DatasetSpec

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("raise", "skip")


class CGCDataset(torch.utils.data.Dataset):
    """A Hugging Face dataset as model inputs: normalised image, label, and object mask.

    Items are dicts: ``pixel_values`` float ``(3, H, W)``; ``labels`` int64 scalar (``-100``
    when ``unlabeled``); ``mask`` float ``(H, W)`` in {0, 1}, only when the spec has a box or
    mask column (a box is rasterised at the image's size, then both go through the same
    geometry).

    Args:
        hf_dataset: a ``datasets.Dataset`` with the spec's columns.
        transform: from :func:`build_transform` (any callable ``tf(image, mask)`` /
            ``tf(image)`` that returns tensors works).
        spec: the :class:`DatasetSpec` naming the columns (``Splits.spec``).
        unlabeled: ignore the labels (rows feed the CGC term only).
        on_bad_image: ``"raise"`` a :class:`DataError` naming the row, or ``"skip"``: log it,
            count it in :attr:`bad_images` (distinct rows, each logged once) and return the
            next readable row instead. The count is kept in shared memory, so rows skipped in
            DataLoader worker processes are counted in the main process too.

    Example:
        >>> ds = CGCDataset(splits.train, build_transform(data_config, train=True), splits.spec)
        >>> ds[0]["pixel_values"].shape
        torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        hf_dataset: Any,
        transform: Any,
        spec: DatasetSpec,
        unlabeled: bool = False,
        on_bad_image: str = "raise",
    ) -> None:
        import datasets

        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise DataError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}; got {on_bad_image!r}."
            )
        required = [spec.image_column] + ([] if unlabeled else [spec.label_column])
        required += [c for c in (spec.mask_column or spec.box_column,) if c is not None]
        cols = list(hf_dataset.column_names)
        for col in required:
            if col not in cols:
                raise DataError(
                    f"column {col!r} named by the spec of {spec.name!r} is not in the dataset; "
                    f"its columns are {cols}.{close_matches(col, cols)}"
                )
        # Rows carry only what an item needs: reading a row reads every column it has.
        hf_dataset = hf_dataset.select_columns(required)
        # Decode images here, not in datasets, so that a broken file is caught per row.
        for col in (spec.image_column, spec.mask_column):
            if col is not None and isinstance(hf_dataset.features[col], datasets.Image):
                hf_dataset = hf_dataset.cast_column(col, datasets.Image(decode=False))
        self.hf_dataset = hf_dataset
        self.transform = transform
        self.spec = spec
        self.unlabeled = unlabeled
        self.on_bad_image = on_bad_image
        # One flag per row in shared memory: DataLoader workers get copies of this object, but
        # their flags land in the same buffer, so the main process sees every skipped row.
        self._bad = torch.zeros(len(hf_dataset), dtype=torch.bool).share_memory_()
        self._decoder = datasets.Image()

    def __len__(self) -> int:
        return len(self.hf_dataset)

    @property
    def bad_rows(self) -> list[int]:
        """The rows skipped as unreadable so far, in any process (``on_bad_image='skip'``)."""
        return torch.nonzero(self._bad).flatten().tolist()

    @property
    def bad_images(self) -> int:
        """How many distinct rows were skipped as unreadable so far (``on_bad_image='skip'``)."""
        return int(self._bad.sum())

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self)
        for step in range(min(n, 16)):
            row = (index + step) % n
            try:
                return self._item(row)
            except _BadImage as err:
                if self.on_bad_image == "raise":
                    raise DataError(
                        f"row {row} of dataset {self.spec.name!r} has an unreadable image: "
                        f"{str(err).rstrip('.')}. "
                        "Pass on_bad_image='skip' (--on_bad_image skip) to substitute the next "
                        "readable row."
                    ) from err
                if not self._bad[row]:
                    self._bad[row] = True
                    logger.warning("skipping unreadable image at row %d: %s", row, err)
        raise DataError(
            f"{min(n, 16)} consecutive rows from {index} of dataset {self.spec.name!r} have "
            "unreadable images; the data is likely broken."
        )

    def _decode(self, value: Any, col: str) -> Image.Image:
        if value is None:
            raise _BadImage(f"column {col!r} is empty (None)")
        try:
            if isinstance(value, (list, np.ndarray)):  # an Array2D / Array3D or list column
                return array_to_image(value)
            image = self._decoder.decode_example(value)
            image.load()
            return image
        except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
            raise _BadImage(f"column {col!r}: {type(err).__name__}: {first_line(err)}") from err

    def _item(self, row: int) -> dict[str, Tensor]:
        from torchvision import tv_tensors

        spec = self.spec
        record = self.hf_dataset[row]
        image = self._decode(record[spec.image_column], spec.image_column)
        try:
            image = to_rgb(image)
        except (OSError, ValueError) as err:
            raise _BadImage(f"column {spec.image_column!r}: {first_line(err)}") from err
        width, height = image.size
        obj = None
        if spec.mask_column is not None:
            mask_image = self._decode(record[spec.mask_column], spec.mask_column)
            obj = foreground(mask_image, spec.mask_rule)  # (h', w') bool, the mask's own grid
            if mask_image.size != image.size:
                # A mask stored at another resolution covers the same field of view: bring it
                # to the image's grid, then the transform moves both alike.
                obj = np.asarray(Image.fromarray(obj).resize(image.size, Image.NEAREST))
        elif spec.box_column is not None:
            box = record[spec.box_column]
            try:
                obj = box_to_mask(box, width, height, spec.box_format)  # (h, w) bool
            except DataError as err:
                raise _BadImage(f"column {spec.box_column!r}: {err}") from err
        transform = self.transform or _default_transform()
        out: dict[str, Tensor] = {}
        if obj is not None:
            mask = tv_tensors.Mask(torch.from_numpy(obj.astype(np.uint8))[None])  # (1, h, w)
            pixel_values, mask = transform(image, mask)
            out["pixel_values"] = torch.as_tensor(pixel_values).as_subclass(Tensor)  # (3, H, W)
            out["mask"] = mask.as_subclass(Tensor)[0].float()  # (H, W)
        else:
            out["pixel_values"] = torch.as_tensor(transform(image)).as_subclass(Tensor)
        label = IGNORE_INDEX if self.unlabeled else int(record[spec.label_column])
        out["labels"] = torch.tensor(label, dtype=torch.int64)
        return out


class _BadImage(Exception):
    """An image that cannot be decoded (internal: turned into DataError or a skip)."""


def _default_transform():
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def collate(rows: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the items of :class:`CGCDataset` into a batch.

    Shape:
        pixel_values (B, 3, H, W), labels (B,), mask (B, H, W) when present.
    """
    if not rows:
        raise DataError("collate got an empty list of rows.")
    keys = list(rows[0])
    for i, r in enumerate(rows):
        if list(r) != keys:
            raise DataError(f"row {i} has keys {sorted(r)}, row 0 has {sorted(keys)}.")
    return {k: torch.stack([r[k] for r in rows]) for k in keys}
