"""Any image classifier as a :class:`~cgc_hf.CGCModel`, so that it can be evaluated and compared.

A CGC-trained model and an off-the-shelf one go through the same evaluation: the explanation
metrics need only logits and a layer to explain, which :meth:`CGCModel.from_backbone` finds for
any timm or transformers classifier.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .errors import CGCError, CGCValueError, CheckpointError
from .modeling import CGCModel

logger = logging.getLogger(__name__)

# "org/name" as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAVED_FORMAT = "cgc_hf_format_version"  # the key hub.save_pretrained writes to config.json


def load_classifier(
    ref: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    token: str | bool | None = None,
) -> CGCModel:
    """Load a classifier for evaluation, whichever tool saved it.

    ``ref`` may be:

    - a folder written by :meth:`CGCModel.save_pretrained` (e.g. ``<finetune output_dir>/model``),
      or a Hub repository of one;
    - a timm name (``"resnet50"``, ``"hf-hub:timm/resnet50.a1_in1k"``), with pretrained weights;
    - a transformers classifier: a Hub id or a folder written by ``save_pretrained``;
    - a folder written by :meth:`CGCModel.export_backbone` or ``timm.models.save_for_hf``.

    A local folder never touches the network, and a path that does not exist is reported as a
    missing folder, not as a Hub id to download.

    Args:
        ref: the model, as above.
        device: where to put it.
        revision: branch, tag or commit of a Hub repository.
        token: Hub token for private or gated repositories.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        CheckpointError: ``ref`` is a missing folder, a file, a training run's folder (the model
            is in its ``model`` subfolder), or nothing that loads.

    Example:
        >>> cgc = load_classifier("cgc-output/model")
        >>> plain = load_classifier("resnet18")  # timm's ImageNet weights, for comparison
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        model = _from_folder(text, path)
    elif path.exists():
        raise CheckpointError(
            f"model {text!r} is a file; give the folder that holds config.json (e.g. <finetune "
            "output_dir>/model), a timm name or a Hub id."
        )
    else:
        model = _from_name(text, revision, token)
    return model.to(device).eval()


def _from_folder(text: str, path: Path) -> CGCModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        if (path / "model" / "config.json").is_file():
            raise CheckpointError(
                f"model {text!r} is a training run's folder; the model is in "
                f"{str(path / 'model')!r}, pass that."
            )
        raise CheckpointError(
            f"model {text!r} is a folder without config.json; give the folder save_pretrained "
            "wrote (config.json and model.safetensors)."
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"model {text!r}: cannot read {config_file} ({err}).") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"model {text!r}: {config_file} is not a JSON object.")
    if _SAVED_FORMAT in raw:
        return CGCModel.from_pretrained(path, local_files_only=True)
    if "model_type" in raw:  # a transformers save_pretrained folder
        source = text
    elif "architecture" in raw:  # timm's Hub format (export_backbone, save_for_hf)
        source = f"local-dir:{path}"
    else:
        raise CheckpointError(
            f"model {text!r}: {config_file} is neither a cgc_hf, a transformers nor a timm "
            "config (it has none of 'cgc_hf_format_version', 'model_type', 'architecture')."
        )
    return _from_backbone(text, source)


def _from_name(text: str, revision: str | None, token: str | bool | None) -> CGCModel:
    from .backbones import is_timm_name

    if is_timm_name(text) and not text.startswith("timm/"):
        return _from_backbone(text, text, revision, token)
    missing = (
        f"model {text!r}: no such directory. Give the folder save_pretrained wrote (e.g. "
        "<finetune output_dir>/model), a timm name or a Hub id"
    )
    parent = Path(text).expanduser().parent
    if not _HUB_ID.match(text) or (str(parent) not in ("", ".") and parent.is_dir()):
        raise CheckpointError(missing + ".")
    try:  # a cgc_hf model on the Hub?
        return CGCModel.from_pretrained(text, revision=revision, token=token)
    except CheckpointError as err:
        first = err
    try:  # any other classifier on the Hub
        return _from_backbone(text, text, revision, token)
    except (CheckpointError, CGCValueError) as err:
        second = err
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    logger.debug("Hub lookups of %r failed: %s / %s", text, first, second)
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub has no such model or is unreachable"
    raise CheckpointError(f"{missing}; as a Hub id it did not load ({why}).")


def _from_backbone(
    text: str, source: str, revision: str | None = None, token: str | bool | None = None
) -> CGCModel:
    try:
        return CGCModel.from_backbone(source, pretrained=True, revision=revision, token=token)
    except CGCError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"model {text!r} did not load as a classifier: {first}") from err
