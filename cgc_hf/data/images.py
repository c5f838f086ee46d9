"""Image utilities: any PIL mode to RGB, object masks from mask images and boxes.

Example:
    >>> to_rgb(Image.new("I;16", (4, 4))).mode
    'RGB'
    >>> box_to_mask([2, 1, 5, 3], width=6, height=4).sum()
    6
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Grayscale is replicated, 16-bit and 32-bit integer or float images are scaled to 0-255
    (16-bit by 1/257; wider ranges by their own min and max), palette images go through their
    palette, and transparency is composited onto white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)  # (H, W)
        if mode.startswith("I;16") or (arr.min() >= 0 and arr.max() <= 65535 and arr.max() > 255):
            arr = arr / 257.0
        elif arr.min() < 0 or arr.max() > 255:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def foreground(mask: Image.Image, values: tuple[int, ...] | None) -> np.ndarray:
    """Boolean ``(H, W)`` object mask from a mask image.

    ``values`` lists the values that mean "object" (e.g. trimap codes); None: nonzero for 0/1
    masks, above 127 for 0-255 masks.
    """
    if mask.mode in ("RGB", "RGBA", "LA", "P") and values is None:
        mask = mask.convert("L")
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if values is not None:
        return np.isin(arr, np.asarray(values))
    return arr > (0 if arr.max(initial=0) <= 1 else 127)


def box_to_mask(box: Any, width: int, height: int, box_format: str = "xyxy") -> np.ndarray:
    """Rasterise a box (or a list of boxes, united) into a boolean ``(height, width)`` mask.

    A pixel is inside when its centre is: ``x0 <= x + 0.5 < x1`` (pixel-edge coordinates).
    """
    out = np.zeros((height, width), dtype=bool)
    boxes = box if _is_box_list(box) else [box]
    for b in boxes:
        x0, y0, x1, y1 = _box_xyxy(b, width, height, box_format)
        c0, c1 = max(0, math.ceil(x0 - 0.5)), min(width, math.ceil(x1 - 0.5))
        r0, r1 = max(0, math.ceil(y0 - 0.5)), min(height, math.ceil(y1 - 0.5))
        out[r0:r1, c0:c1] = True
    return out


def _is_box_list(box: Any) -> bool:
    return (
        isinstance(box, (list, tuple))
        and len(box) > 0
        and isinstance(box[0], (list, tuple, dict, np.ndarray))
    )


def _box_xyxy(box: Any, width: int, height: int, fmt: str) -> tuple[float, ...]:
    if isinstance(box, dict):
        return tuple(float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
    vals = [float(v) for v in box]
    if len(vals) != 4:
        raise DataError(f"a box needs 4 numbers; got {box!r}.")
    if fmt == "xywh":
        x, y, w, h = vals
        return x, y, x + w, y + h
    if fmt == "yxyx_norm":
        y0, x0, y1, x1 = vals
        return x0 * width, y0 * height, x1 * width, y1 * height
    return tuple(vals)
