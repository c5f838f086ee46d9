"""The files of a saved CGC model: ``config.json`` with its format version, the weights, read
without running code, and the strict load of a state dict into the rebuilt architecture."""

from __future__ import annotations

import json
import logging
import pickle
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
    missing = [k for k in expected if k not in state and not _alias_loaded(k, expected, state)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: saved {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"the weights in {str(folder)!r} do not fit the rebuilt architecture; "
            f"shape mismatches: {listing(mismatched)}."
        )
    if missing or unexpected:
        text = (
            f"the weights in {str(folder)!r} do not match the rebuilt "
            f"{type(model).__name__}: missing keys {listing(missing)}; "
            f"unexpected keys {listing(unexpected)}"
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


def state_dict_diff(have: dict[str, tuple], rebuilt: dict[str, tuple]) -> str:
    only_have = [k for k in have if k not in rebuilt]
    only_rebuilt = [k for k in rebuilt if k not in have]
    shapes = [
        f"{k}: {have[k]} vs {rebuilt[k]}" for k in have if k in rebuilt and have[k] != rebuilt[k]
    ]
    parts = []
    if only_have:
        parts.append(f"keys only in the model: {listing(only_have)}")
    if only_rebuilt:
        parts.append(f"keys only in the rebuilt backbone: {listing(only_rebuilt)}")
    if shapes:
        parts.append(f"shapes model vs rebuilt: {listing(shapes)}")
    return "; ".join(parts)


def listing(items: list[str], n: int = 8) -> str:
    """``items`` for an error message: the first ``n``, then how many more (``"none"`` if empty)."""
    if not items:
        return "none"
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
