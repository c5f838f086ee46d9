"""Masks from a folder: one mask image per input image, matched by file name.

Segmentation datasets ship their masks beside the images, not in a column: ``images/cat_1.jpg``
with ``masks/cat_1.png``, or the image folder's own subfolders mirrored. Each image is matched
to the mask whose path, without extension, ends like the image's path relative to the dataset
folder: ``train/cat/1.jpg`` looks for ``train/cat/1.*``, then ``cat/1.*``, then ``1.*``. The
first name that one mask file carries wins; a name two files share at that level is refused,
and so is an image without a mask.

Example:
    >>> dd, column = attach_mask_folder(dd, "pets/annotations/trimaps", "image", "pets/images")
    >>> dd["train"][0][column]  # the PIL mask of the first image
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Any

from PIL import Image

from ..errors import DataError

MASK_COLUMN = "mask"


def attach_mask_folder(
    dd: Any, mask_dir: str | os.PathLike, image_column: str, root: Any = None
) -> tuple[Any, str]:
    """Add a mask column to every split of ``dd`` from the files of ``mask_dir``.

    Args:
        dd: a ``DatasetDict`` whose image column keeps the images' file paths (an image
            folder does; a ``save_to_disk`` copy keeps their file names).
        mask_dir: the folder of masks.
        image_column: the image column.
        root: the dataset's folder, the paths are taken relative to it (None: as stored).

    Returns:
        ``(dd, column)``: the splits with the new column (``Image``), and its name.

    Raises:
        DataError: ``mask_dir`` is not a folder, holds no image, an image has no mask or two.
    """
    import datasets

    folder = Path(mask_dir)
    if not folder.is_dir():
        raise DataError(
            f"mask_dir {str(mask_dir)!r} is not a directory; give the folder of masks named "
            "like the images (cat_1.jpg -> cat_1.png)."
        )
    index = _index(folder)
    if not index:
        raise DataError(f"mask_dir {str(mask_dir)!r} holds no image files.")
    base = Path(root).resolve() if isinstance(root, (str, os.PathLike)) else None
    column = MASK_COLUMN
    out = {}
    for split, ds in dd.items():
        if image_column not in ds.column_names:
            raise DataError(
                f"mask_dir needs the image column {image_column!r}; split {split!r} has "
                f"{ds.column_names}. Name it with --image_column_name."
            )
        if column in ds.column_names:
            column = f"{MASK_COLUMN}_from_dir"
        paths = _image_paths(ds, image_column, split)
        masks, missing = [], []
        for path in paths:
            found = _match(path, base, index)
            if found is None:
                missing.append(path)
            masks.append(found)
        if missing:
            raise DataError(
                f"mask_dir {str(mask_dir)!r} has no mask for {len(missing)} of {len(paths)} "
                f"images of split {split!r}, e.g. {missing[0]!r} (looked for its path or file "
                "name without extension, any image extension)."
            )
        ds = ds.add_column(column, [str(m) for m in masks])
        out[split] = ds.cast_column(column, datasets.Image())
    return datasets.DatasetDict(out), column


def _index(folder: Path) -> dict[tuple[str, ...], list[Path]]:
    """Every path suffix (without extension) of every image file under ``folder``."""
    extensions = {e.lower() for e in Image.registered_extensions()}
    index: dict[tuple[str, ...], list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions:
            parts = path.relative_to(folder).with_suffix("").parts
            for k in range(len(parts)):
                index.setdefault(parts[k:], []).append(path)
    return index


def _image_paths(ds: Any, column: str, split: str) -> list[str]:
    # Read the paths through Arrow: no image is decoded, no bytes are copied to Python.
    values = ds.with_format("arrow")[column]
    if not hasattr(values.type, "get_field_index") or values.type.get_field_index("path") < 0:
        raise DataError(
            f"mask_dir needs images with file paths; column {column!r} of split {split!r} "
            f"has type {values.type}."
        )
    paths = values.combine_chunks().field("path").to_pylist()
    if any(p is None for p in paths):
        first = paths.index(None)
        raise DataError(
            f"mask_dir matches masks by the images' file names, but image {first} of split "
            f"{split!r} has none (it was stored as bytes only)."
        )
    return paths


def _match(path: str, base: Path | None, index: dict[tuple[str, ...], list[Path]]) -> Path | None:
    pure = PurePath(path)
    if base is not None and pure.is_absolute():
        try:
            pure = Path(path).resolve().relative_to(base)
        except ValueError:
            pass
    parts = pure.with_suffix("").parts
    parts = tuple(p for p in parts if p not in ("/", "\\")) if pure.is_absolute() else parts
    for k in range(len(parts)):
        found = index.get(parts[k:])
        if found is None:
            continue
        if len(found) > 1:
            names = ", ".join(str(f) for f in found[:3])
            raise DataError(
                f"image {path!r} matches several masks ({names}); keep one mask per image name, "
                "or mirror the image folder's subfolders in mask_dir."
            )
        return found[0]
    return None
