"""Image utilities: any PIL mode or pixel array to 8-bit RGB, without losing its values.

Example:
    >>> to_rgb(Image.new("I;16", (4, 4))).mode
    'RGB'
    >>> to_rgb(array_to_image(np.full((4, 4), 0.5, np.float32))).getpixel((0, 0))
    (128, 128, 128)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Grayscale is replicated; 16-bit images are scaled by 1/257; float images (mode ``F``, as
    float TIFFs and float arrays decode) in [0, 1] are scaled by 255, in [0, 255] kept; wider
    ranges of 32-bit integer or float images are scaled by their own min and max. Palette
    images go through their palette, and transparency is composited onto white.

    Raises:
        ValueError: the image has NaN or infinite pixels (no value to show them as).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)  # (H, W)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"{bad} of {arr.size} pixels are NaN or infinite")
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if mode == "F" and lo >= 0 and hi <= 1:
            arr = arr * 255.0  # float images store intensities as fractions
        elif mode.startswith("I;16") or (lo >= 0 and hi <= 65535 and hi > 255):
            arr = arr / 257.0
        elif lo < 0 or hi > 255:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        gray = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))  # mode L
        return gray.convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_image(value: Any) -> Image.Image:
    """A pixel array (an ``Array2D`` / ``Array3D`` column, nested lists, numpy) as a PIL image.

    Accepts ``(H, W)``, ``(H, W, C)`` and channels-first ``(C, H, W)`` with C in 1, 3, 4;
    integers as 0-255 (16-bit ranges as 0-65535), booleans as 0 / 255, floats as :func:`to_rgb`
    reads them (fractions in [0, 1], or 0-255).

    Raises:
        ValueError: another shape, or NaN / infinite values.
    """
    arr = np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"pixel values must be numbers; got an array of {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or min(arr.shape) == 0:
        raise ValueError(
            f"pixel array has shape {tuple(np.shape(value))}; expected (H, W), (H, W, C) or "
            "(C, H, W) with C in 1, 3, 4"
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    floating = np.issubdtype(arr.dtype, np.floating)
    if floating and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{bad} of {arr.size} pixel values are NaN or infinite")
    if arr.ndim == 2:
        if floating:
            return Image.fromarray(arr.astype(np.float32))  # mode F
        if arr.min(initial=0) >= 0 and arr.max(initial=0) <= 255:
            return Image.fromarray(arr.astype(np.uint8))  # mode L
        return Image.fromarray(arr.astype(np.int32))  # mode I
    # Colour: PIL has no float colour mode, so scale to 8 bits here, as to_rgb does for gray.
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    arr = arr.astype(np.float64)
    if floating and lo >= 0 and hi <= 1:
        arr = arr * 255.0
    elif lo >= 0 and hi > 255 and hi <= 65535:
        arr = arr / 257.0
    elif lo < 0 or hi > 255:
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # mode RGB or RGBA
