"""Object annotations: masks and boxes become one boolean object mask per image.

Content Heatmap and the pointing game compare a heatmap with the object. Datasets describe the
object in many ways; each is reduced here to a boolean ``(H, W)`` mask at the image's size:

- masks: binary (0/1, 0/255), soft (0-255 matting or averaged annotations: object where the
  value is above a threshold, by default half of the full scale, i.e. > 127 of 255),
  label-index (0 background, k > 0 a class or part: object where nonzero) and trimaps or any
  other code (object where the value is in ``foreground``, e.g. ``(1, 3)``);
- boxes: ``xyxy`` / ``xywh`` in pixels, their normalised variants ``xyxy_norm`` / ``xywh_norm``
  (fractions of the width and height), ``yxyx_norm`` (the TFDS order), a struct of named fields
  (``{xmin, ymin, xmax, ymax}``, ``{x, y, width, height}``, ...), a list of boxes (united), or a
  detection dataset's ``objects`` struct holding them under ``bbox``.

Example:
    >>> box_to_mask([2, 1, 5, 3], width=6, height=4).sum()
    6
    >>> foreground(Image.fromarray(trimap), MaskRule(foreground=(1, 3)))  # (H, W) bool
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError

BOX_FORMATS = ("xyxy", "xywh", "xyxy_norm", "xywh_norm", "yxyx_norm")
# Named-field boxes: corner keys, or a corner and a size. Keys are matched case-insensitively.
_CORNER_KEYS = (
    ("xmin", "ymin", "xmax", "ymax"),
    ("x_min", "y_min", "x_max", "y_max"),
    ("x0", "y0", "x1", "y1"),
    ("left", "top", "right", "bottom"),
)
_SIZE_KEYS = (
    ("x", "y", "width", "height"),
    ("x", "y", "w", "h"),
    ("left", "top", "width", "height"),
)
BOX_FIELD_NAMES = _CORNER_KEYS + _SIZE_KEYS
_NESTED_BOX_KEYS = ("bbox", "bboxes", "box", "boxes")
_LABEL_INDEX_MAX_VALUES = 16  # more distinct values than this in a mask: a soft mask


@dataclass(frozen=True)
class MaskRule:
    """Which mask values mean "object".

    Args:
        foreground: the values that are the object (trimap or part codes), or None.
        threshold: without ``foreground``: object where ``value > threshold * full scale``
            (255 for 8-bit masks, 65535 for 16-bit, 1 for float masks in [0, 1]); 0 means
            nonzero, 0.5 is the usual cut of a soft mask.
    """

    foreground: tuple[int, ...] | None = None
    threshold: float = 0.0

    def describe(self) -> str:
        if self.foreground is not None:
            return f"object = values {list(self.foreground)}"
        if self.threshold == 0:
            return "object = nonzero values"
        return f"object = values above {self.threshold:g} of the full scale (> 127 of 255 at 0.5)"


def mask_array(mask: Image.Image) -> np.ndarray:
    """The values of a mask image as a 2-D array: palette indices for ``P``, luminance for colour.

    Shape:
        ``(H, W)``, the mask's own dtype (bool, uint8, uint16, int32 or float32).
    """
    if mask.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        mask = mask.convert("L")
    arr = np.asarray(mask)
    return arr[..., 0] if arr.ndim == 3 else arr


def full_scale(arr: np.ndarray) -> float:
    """The value that means "fully object" for a soft mask of this dtype and range."""
    if arr.dtype == bool:
        return 1.0
    top = float(arr.max(initial=0))
    if np.issubdtype(arr.dtype, np.floating):
        return 1.0 if top <= 1 else 255.0
    return 255.0 if top <= 255 else 65535.0


def foreground(mask: Image.Image, rule: MaskRule | tuple[int, ...] | None = None) -> np.ndarray:
    """Boolean ``(H, W)`` object mask from a mask image.

    Args:
        mask: the mask image, any PIL mode.
        rule: a :class:`MaskRule`, the foreground values, or None: nonzero for 0/1 masks,
            above 127 for 0-255 masks (decided per image; :func:`infer_mask_rule` decides once
            per dataset).
    """
    arr = mask_array(mask)
    if isinstance(rule, tuple):
        rule = MaskRule(foreground=rule)
    if rule is None:
        rule = MaskRule(threshold=0.0 if arr.max(initial=0) <= 1 else 0.5)
    if rule.foreground is not None:
        return np.isin(arr, np.asarray(rule.foreground))
    if rule.threshold == 0:
        return arr > 0
    return arr > rule.threshold * full_scale(arr)


def infer_mask_rule(masks: Iterable[Image.Image], column: str) -> MaskRule:
    """Decide once per dataset which mask values are the object, from a sample of its masks.

    Two values or fewer (0/1, 0/255): binary, object where nonzero. More than
    ``_LABEL_INDEX_MAX_VALUES`` values: a soft mask, object above half of the full scale. In
    between, with a 0: label-index masks, object where nonzero. Without a 0 (a trimap's 1 / 2 / 3,
    say) the background value is unknown, and guessing it would be silent: refused.

    Raises:
        DataError: the masks have no background value 0 and no rule was given.
    """
    values: set[float] = set()
    floating = False
    for mask in masks:
        arr = mask_array(mask)
        floating |= bool(np.issubdtype(arr.dtype, np.floating))
        values.update(np.unique(arr).tolist())
        if len(values) > _LABEL_INDEX_MAX_VALUES:
            break
    if len(values) <= 2 and (0 in values or not values):
        return MaskRule(threshold=0.0)
    if floating or len(values) > _LABEL_INDEX_MAX_VALUES:
        return MaskRule(threshold=0.5)
    shown = sorted(values)
    if 0 not in values:
        raise DataError(
            f"mask column {column!r} holds the values {shown} and no 0, so which of them are "
            "background is unknown (a trimap is 1 object, 2 background, 3 outline). Name the "
            "object's values with --mask_foreground_values (e.g. 1 3), or a cut with "
            "--mask_threshold."
        )
    return MaskRule(threshold=0.0)


# ---------------------------------------------------------------------------------- boxes
def box_to_mask(box: Any, width: int, height: int, box_format: str = "xyxy") -> np.ndarray:
    """Rasterise a box (or a list of boxes, united) into a boolean ``(height, width)`` mask.

    A pixel is inside when its centre is: ``x0 <= x + 0.5 < x1`` (pixel-edge coordinates).

    Args:
        box: 4 numbers, a struct of named fields, a list of either, or a struct of lists
            (one entry per box).
        width: image width in pixels (scales normalised boxes, clips all).
        height: image height in pixels.
        box_format: one of :data:`BOX_FORMATS`; a struct's keys say corners or size, the
            ``_norm`` suffix says fractions.
    """
    out = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in box_corners(box, box_format):
        if box_format.endswith("_norm"):
            x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
        c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.ceil(x1 - 0.5))
        r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.ceil(y1 - 0.5))
        out[r0:r1, c0:c1] = True
    return out


def box_corners(box: Any, box_format: str = "xyxy") -> list[tuple[float, float, float, float]]:
    """Every box in ``box`` as ``(x0, y0, x1, y1)``, in the format's units (pixels or fractions).

    Raises:
        DataError: a box is not 4 numbers or a struct with known field names.
    """
    if box_format not in BOX_FORMATS:
        raise DataError(f"box_format must be one of {BOX_FORMATS}; got {box_format!r}.")
    if box is None:
        raise DataError("the box is missing (None).")
    if isinstance(box, dict):
        keys = {str(k).lower(): k for k in box}
        nested = [keys[k] for k in _NESTED_BOX_KEYS if k in keys]
        if nested and not any(set(names) <= set(keys) for names in BOX_FIELD_NAMES):
            # Detection-style ``objects`` structs: {"bbox": [[...], ...], "category": [...]}.
            return box_corners(box[nested[0]], box_format)
        values = [box[keys[k]] for k in keys]
        if values and all(isinstance(v, (list, tuple, np.ndarray)) for v in values):
            # A struct of lists (one entry per box), as datasets stores a Sequence of structs.
            return [c for row in zip(*values) for c in box_corners(dict(zip(box, row)))]
        return [_struct_corners(box, keys)]
    if isinstance(box, np.ndarray):
        box = box.tolist()
    if not isinstance(box, (list, tuple)):
        raise DataError(f"a box needs 4 numbers or named fields; got {box!r}.")
    if box and isinstance(box[0], (list, tuple, dict, np.ndarray)):
        return [c for b in box for c in box_corners(b, box_format)]
    vals = [float(v) for v in box]
    if len(vals) != 4:
        raise DataError(f"a box needs 4 numbers; got {box!r} ({len(vals)} numbers).")
    if box_format in ("xywh", "xywh_norm"):
        x, y, w, h = vals
        return [(x, y, x + w, y + h)]
    if box_format == "yxyx_norm":
        y0, x0, y1, x1 = vals
        return [(x0, y0, x1, y1)]
    return [(vals[0], vals[1], vals[2], vals[3])]


def _struct_corners(box: dict, keys: dict[str, Any]) -> tuple[float, float, float, float]:
    for names in _CORNER_KEYS:
        if all(n in keys for n in names):
            x0, y0, x1, y1 = (float(box[keys[n]]) for n in names)
            return x0, y0, x1, y1
    for names in _SIZE_KEYS:
        if all(n in keys for n in names):
            x, y, w, h = (float(box[keys[n]]) for n in names)
            return x, y, x + w, y + h
    known = [list(k) for k in BOX_FIELD_NAMES]
    raise DataError(
        f"a box struct has the fields {sorted(box)}; the known field sets are {known}. Convert "
        "the column to 4 numbers and pass --box_format."
    )


def check_boxes(boxes: Iterable[Any], column: str, box_format: str) -> None:
    """Reject boxes whose values contradict the box format, on a sample of a column.

    Pixel boxes all within [0, 1] with fractions are normalised ones; normalised boxes above 1
    are pixel ones; a corner box with ``x1 < x0`` is a ``x, y, width, height`` one. Each
    mismatch would silently put the object in the wrong place.

    Raises:
        DataError: naming the column, an offending box and the format that fits.
    """
    corners = [(b, c) for b in boxes if b is not None for c in box_corners(b, box_format)]
    if not corners:
        return
    flat = np.asarray([c for _, c in corners], dtype=np.float64)  # (N, 4)
    fix = f"Name the format with --box_format (one of {', '.join(BOX_FORMATS)})."
    if box_format.endswith("_norm") and flat.max() > 1 + 1e-3:
        bad = corners[int(np.nonzero(flat.max(1) > 1 + 1e-3)[0][0])][0]
        raise DataError(
            f"box column {column!r} has values above 1, e.g. {bad!r}, but box_format "
            f"{box_format!r} means fractions of the image size. {fix}"
        )
    if not box_format.endswith("_norm") and flat.min() >= 0 and flat.max() <= 1:
        if np.any(flat != np.round(flat)):
            raise DataError(
                f"box column {column!r} has every value within [0, 1], e.g. {corners[0][0]!r}: "
                f"these look like fractions of the image size, not the pixels box_format "
                f"{box_format!r} means. Pass --box_format {box_format.split('_')[0]}_norm."
            )
    inverted = (flat[:, 2] < flat[:, 0]) | (flat[:, 3] < flat[:, 1])
    if inverted.any():
        bad = corners[int(np.nonzero(inverted)[0][0])][0]
        corner_format = box_format in ("xyxy", "xyxy_norm")
        hint = "Boxes of x, y, width, height need --box_format xywh." if corner_format else fix
        raise DataError(
            f"box column {column!r} has a box whose far corner lies before its near corner "
            f"under box_format {box_format!r}: {bad!r}. {hint}"
        )
