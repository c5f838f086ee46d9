"""Typed errors: each subclasses :class:`CGCError` and the matching builtin."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CGCError(Exception):
    """Base class of every error raised by cgc_hf on purpose."""


class CGCValueError(CGCError, ValueError):
    """An argument has a value that cannot work."""


class CGCTypeError(CGCError, TypeError):
    """An argument has a type that cannot work."""


class TargetLayerError(CGCValueError):
    """The Grad-CAM target layer is missing, or it cannot give a heatmap."""


class DataError(CGCValueError):
    """A dataset, column or label does not fit what the run needs."""


class CGCMemoryError(CGCError, MemoryError):
    """The model or a training step does not fit in (device or host) memory."""


class CheckpointError(CGCError, RuntimeError):
    """A checkpoint or saved model cannot be read or written."""


def close_matches(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Format the nearest names to ``name`` for an error message ("" when none are near)."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Close matches: {', '.join(repr(m) for m in matches)}." if matches else ""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
