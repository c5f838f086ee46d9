"""The files of a saved CGC model: ``config.json`` with its format version, the weights, read
without running code, and the strict load of a state dict into the rebuilt architecture."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .config import CGCConfig
from .errors import CGCValueError, CheckpointError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Layout version of ``config.json``; loading refuses files from a newer version."""
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
CARD_NAME = "README.md"
_FORMAT_KEY = "cgc_hf_format_version"
_VERSION_KEY = "cgc_hf_version"
_LABEL2ID_KEY = "label2id"  # written for readers of the file; id2label is authoritative
RESERVED_NAMES = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, CARD_NAME)
# Files a previous export may hold; a folder with only these can be replaced by a new export.
_EXPORT_NAMES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CARD_NAME,
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def config_file_dict(config: CGCConfig) -> dict[str, Any]:
    from . import __version__  # the package is fully imported by the time a model is saved

    d = config.to_dict()
    d[_FORMAT_KEY] = FORMAT_VERSION
    d[_VERSION_KEY] = __version__
    if config.id2label is not None:
        d[_LABEL2ID_KEY] = {name: int(i) for i, name in config.id2label.items()}
    try:
        json.dumps(d)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"the model's config cannot be written as JSON ({err}); model_kwargs and other "
            "config values must be plain numbers, strings, lists or dicts (e.g. a layer name "
            "string instead of a layer class)."
        ) from None
    return d


def is_cgc_folder(folder: Path) -> bool:
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and _FORMAT_KEY in raw


def is_export_folder(folder: Path) -> bool:
    return all(
        p.is_file() and (p.name in _EXPORT_NAMES or p.name.startswith("model-"))
        for p in folder.iterdir()
    )


def read_config(folder: Path, num_labels: int | None) -> CGCConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{str(folder)!r} has no {CONFIG_NAME}, so it is not a model saved by cgc_hf "
            "save_pretrained."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(raw, dict) or _FORMAT_KEY not in raw:
        raise CheckpointError(
            f"{str(path)!r} is not a cgc_hf config (no {_FORMAT_KEY!r}). A plain timm or "
            "transformers model is wrapped with CGCModel.from_backbone(<folder or Hub id>)."
        )
    version = raw.pop(_FORMAT_KEY)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format version {version!r}; this cgc_hf reads versions up to "
            f"{FORMAT_VERSION}. Upgrade cgc_hf."
        )
    raw.pop(_VERSION_KEY, None)
    raw.pop(_LABEL2ID_KEY, None)
    try:
        config = CGCConfig.from_dict(raw)
    except (CGCValueError, TypeError) as err:
        raise CheckpointError(f"{str(path)!r} holds an invalid CGCConfig: {err}") from None
    if config.library is None or config.backbone_config is None:
        raise CheckpointError(f"{str(path)!r} describes no backbone (library / backbone_config).")
    if num_labels is not None and num_labels != config.num_labels:
        raise CheckpointError(
            f"num_labels={num_labels} was requested but the model in {str(folder)!r} has "
            f"num_labels={config.num_labels}. Load it without num_labels, then give it a new "
            f"head with CGCModel.from_backbone(model.backbone, num_labels={num_labels})."
        )
    return config


def read_weights(folder: Path, allow_pickle: bool) -> dict[str, Tensor]:
    safe, pickled = folder / WEIGHTS_NAME, folder / PICKLE_WEIGHTS_NAME
    if safe.is_file():
        try:
            return safetensors.torch.load_file(str(safe), device="cpu")
        except (safetensors.SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{str(safe)!r} is corrupted or truncated ({err}); save or download it again."
            ) from None
    if pickled.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{str(folder)!r} holds only pickle weights ({PICKLE_WEIGHTS_NAME}), and "
                "unpickling can run code, so cgc_hf refuses it. If you trust the source, pass "
                "allow_pickle=True (read with torch.load(weights_only=True)); then "
                f"save_pretrained writes {WEIGHTS_NAME}."
            )
        try:
            state = torch.load(str(pickled), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise CheckpointError(
                f"cannot read {str(pickled)!r} with torch.load(weights_only=True): "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{str(pickled)!r} does not hold a flat state dict of tensors.")
        return state
    raise CheckpointError(f"{str(folder)!r} has no {WEIGHTS_NAME}.")


def load_state(model: nn.Module, state: dict[str, Tensor], strict: bool, folder: Path) -> None:
    expected = model.state_dict()
    diff = compare_state_dicts(
        state, expected, optional=lambda k: _alias_loaded(k, expected, state)
    )
    if diff.shapes:
        raise CheckpointError(
            f"the weights in {str(folder)!r} do not fit the rebuilt architecture; "
            f"shape mismatches: {listing(diff.shapes)}."
        )
    if diff.missing or diff.unexpected:
        text = (
            f"the weights in {str(folder)!r} do not match the rebuilt "
            f"{type(model).__name__}: missing keys {listing(diff.missing)}; "
            f"unexpected keys {listing(diff.unexpected)}"
        )
        if strict:
            raise CheckpointError(text + ". Pass strict=False only if you know why they differ.")
        logger.warning("%s (strict=False: loading the rest).", text)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _alias_loaded(key: str, expected: dict[str, Tensor], state: dict[str, Tensor]) -> bool:
    """Whether ``key`` shares its storage with a key that was saved (tied weights saved once)."""
    t = expected[key]
    return any(
        other in state
        and other != key
        and v.data_ptr() == t.data_ptr()
        and v.shape == t.shape
        and v.device == t.device
        for other, v in expected.items()
    )


@dataclass(frozen=True)
class StateDictDiff:
    """How a state dict differs from the one a model expects (see :func:`compare_state_dicts`).

    Attributes:
        missing: keys the model expects that the state dict lacks.
        unexpected: keys of the state dict the model does not have.
        shapes: ``"key: <source> (a, b), <model> (c, d)"`` for each key whose shapes differ.
    """

    missing: list[str]
    unexpected: list[str]
    shapes: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self, missing: str, unexpected: str, shapes: str) -> str:
        """The non-empty lists, each after its label (``{n}`` in a label: the list's length).

        Example:
            >>> diff.describe("{n} missing", "{n} unexpected", "{n} shapes")
            '1 missing: conv1.weight; 1 shapes: fc.weight: saved (5, 8), model (3, 8)'
        """
        lists = ((missing, self.missing), (unexpected, self.unexpected), (shapes, self.shapes))
        return "; ".join(
            f"{label.format(n=len(keys))}: {listing(keys)}" for label, keys in lists if keys
        )


def compare_state_dicts(
    state: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    names: tuple[str, str] = ("saved", "model"),
    optional: Callable[[str], bool] = lambda key: False,
) -> StateDictDiff:
    """Every missing key, unexpected key and shape mismatch of ``state`` against ``expected``.

    Args:
        state: the weights to load (only names and shapes are read).
        expected: the model's own ``state_dict()``.
        names: what to call the two sides in a shape mismatch.
        optional: expected keys whose absence is not a mismatch.
    """
    mine, theirs = names
    return StateDictDiff(
        missing=[k for k in expected if k not in state and not optional(k)],
        unexpected=[k for k in state if k not in expected],
        shapes=[
            f"{k}: {mine} {tuple(state[k].shape)}, {theirs} {tuple(expected[k].shape)}"
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ],
    )


def state_dict_diff(have: Mapping[str, Tensor], rebuilt: Mapping[str, Tensor]) -> str:
    """The keys and shapes that differ between a model and its rebuilt architecture, as text."""
    diff = compare_state_dicts(have, rebuilt, names=("model", "rebuilt"))
    return diff.describe("keys only in the rebuilt backbone", "keys only in the model", "shapes")


def listing(items: list[str], n: int = 8) -> str:
    """``items`` for an error message: the first ``n``, then how many more (``"none"`` if empty)."""
    if not items:
        return "none"
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
