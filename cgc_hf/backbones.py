"""Build, rebuild and call timm / transformers image classifiers behind one small interface."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CGCMemoryError, CGCTypeError, CGCValueError, close_matches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OFFLINE_HINT = "HF_HUB_OFFLINE=1 is set, so Hub ids need a cached copy. "


def library_of(model: nn.Module) -> str:
    """``"transformers"`` for a ``PreTrainedModel``, ``"timm"`` for anything with a timm head."""
    try:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            return "transformers"
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if hasattr(model, "forward_features") and hasattr(model, "get_classifier"):
        return "timm"
    raise CGCTypeError(
        f"backbone must be a timm model or a transformers image classifier; got "
        f"{type(model).__name__}. Build one with timm.create_model(...) or "
        "AutoModelForImageClassification.from_pretrained(...)."
    )


def logits_of(model: nn.Module, library: str, pixel_values: Tensor) -> Tensor:
    """Class logits ``(B, K)`` of either library's classifier."""
    if library == "transformers":
        return model(pixel_values=pixel_values).logits
    return model(pixel_values)


def target_hints(model: nn.Module) -> tuple[str | None, int | None]:
    """``(layout_hint, prefix_hint)`` for :func:`cgc_hf.targets.resolve_target`.

    timm models declare their feature layout (``output_fmt``, e.g. ``"NHWC"`` for Swin) and
    their number of class / distillation / register tokens (``num_prefix_tokens``); a
    transformers ``timm_wrapper`` model holds such a model as ``timm_model``.
    """
    inner = getattr(model, "timm_model", model)
    layout = getattr(inner, "output_fmt", None)
    layout = getattr(layout, "value", layout)  # timm's Format enum or a plain string
    prefix = getattr(inner, "num_prefix_tokens", None)
    return (layout if isinstance(layout, str) else None), (
        prefix if isinstance(prefix, int) else None
    )


def disable_fused_attention(model: nn.Module, library: str) -> None:
    """Switch attention to an implementation with a double backward (fused SDPA has none)."""
    if library == "transformers":
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            model.set_attn_implementation("eager")
    for module in model.modules():  # timm modules, and timm models inside timm_wrapper
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


def is_timm_name(name: str) -> bool:
    """Whether ``name`` is a registered timm architecture or a timm Hub / local-dir reference."""
    import timm

    if timm.is_model(name):
        return True
    return name.startswith(("hf-hub:", "local-dir:", "timm/")) and not os.path.isdir(name)


def create_backbone(
    name_or_model: str | nn.Module,
    num_labels: int | None,
    id2label: dict[int, str] | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
) -> tuple[nn.Module, str, str, dict[str, Any]]:
    """Create (or adopt) a classifier with ``num_labels`` outputs.

    Returns:
        ``(model, library, architecture, backbone_config)``; ``backbone_config`` rebuilds the
        same architecture offline with :func:`rebuild_backbone`.
    """
    try:
        return _create_backbone(name_or_model, num_labels, id2label, pretrained, model_kwargs)
    except (torch.OutOfMemoryError, MemoryError) as err:
        name = name_or_model if isinstance(name_or_model, str) else type(name_or_model).__name__
        raise CGCMemoryError(
            f"out of memory while building the model {name!r} with model_kwargs="
            f"{model_kwargs or {}} ({type(err).__name__}). Choose a smaller model (e.g. "
            "'resnet50' or 'vit_small_patch16_224'), free memory held by other processes, or "
            "use a machine with more memory."
        ) from err


def _create_backbone(
    name_or_model: str | nn.Module,
    num_labels: int | None,
    id2label: dict[int, str] | None,
    pretrained: bool,
    model_kwargs: dict[str, Any] | None,
) -> tuple[nn.Module, str, str, dict[str, Any]]:
    model_kwargs = dict(model_kwargs or {})
    if isinstance(name_or_model, nn.Module):
        model = name_or_model
        library = library_of(model)
        if num_labels is not None and num_labels != _num_outputs(model, library):
            _reset_classifier(model, library, num_labels)
    elif isinstance(name_or_model, str):
        if is_timm_name(name_or_model) and not name_or_model.startswith("timm/"):
            import timm

            kwargs = dict(model_kwargs)
            if num_labels is not None:
                kwargs["num_classes"] = num_labels
            if "img_size" in kwargs and "pretrained_cfg_overlay" not in kwargs:
                # pretrained_cfg keeps the registry's input size otherwise, and models without a
                # patch_embed (LeViT, MLP-Mixer's stem) would be probed and fed at the wrong size.
                kwargs["pretrained_cfg_overlay"] = {"input_size": (3, *_pair(kwargs["img_size"]))}
            model = timm.create_model(name_or_model, pretrained=pretrained, **kwargs)
            library = "timm"
        else:
            model = _create_transformers(
                name_or_model, num_labels, id2label, pretrained, model_kwargs
            )
            library = "transformers"
    else:
        raise CGCTypeError(
            f"name_or_model must be a model name, a local directory or an nn.Module; got "
            f"{type(name_or_model).__name__}."
        )
    if library == "transformers" and id2label is not None:
        model.config.id2label = dict(id2label)
        model.config.label2id = {v: k for k, v in id2label.items()}
    if library == "timm":
        arch = model.pretrained_cfg.get("architecture") or type(model).__name__
        cfg = {
            "model_name": arch,
            "num_classes": model.num_classes,
            "model_kwargs": _recorded_kwargs(model, model_kwargs),
            "pretrained_cfg": _jsonable(dict(model.pretrained_cfg)),
        }
    else:
        arch = type(model).__name__
        cfg = model.config.to_dict()
    return model, library, arch, cfg


def _recorded_kwargs(model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments that rebuild ``model``: the ones timm recorded, then the user's.

    A model passed as an instance, or made from ``hf-hub:`` / ``local-dir:``, may have been built
    with non-default arguments that its name does not carry; timm records them on the model.
    Only plain JSON values are kept (a layer class cannot be saved; see
    :func:`unrecordable_kwargs`).
    """
    try:
        from timm.models import get_model_args
    except ImportError:  # timm < 1.0.16 records nothing
        return given
    recorded = {k: v for k, v in (get_model_args(model) or {}).items() if k != "num_classes"}
    plain = {k: v for k, v in recorded.items() if _is_plain(v)}
    return {**_jsonable(plain), **given}


def unrecordable_kwargs(model: nn.Module, given: dict[str, Any]) -> list[str]:
    """Names of timm constructor arguments of ``model`` that JSON cannot hold (e.g. a layer
    class) and the user did not pass by name: a rebuild from the config would silently differ."""
    try:
        from timm.models import get_model_args
    except ImportError:
        return []
    recorded = get_model_args(model) or {}
    return sorted(k for k, v in recorded.items() if not _is_plain(v) and k not in given)


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def rebuild_backbone(library: str, architecture: str, backbone_config: dict[str, Any]) -> nn.Module:
    """Rebuild a backbone from its saved description, with random weights and no download."""
    if library == "timm":
        import timm

        return timm.create_model(
            backbone_config["model_name"],
            pretrained=False,
            num_classes=backbone_config["num_classes"],
            pretrained_cfg_overlay=backbone_config.get("pretrained_cfg"),
            **backbone_config.get("model_kwargs", {}),
        )
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_dict = dict(backbone_config)
    # from_dict, not the constructor: some configs (timm_wrapper) keep fields such as
    # num_classes / label_names only through their own from_dict.
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    cls = getattr(transformers, architecture, None)
    if cls is None:
        raise CGCValueError(
            f"architecture {architecture!r} is not a transformers model class in this version "
            f"({transformers.__version__}); upgrade transformers."
        )
    return cls._from_config(config, attn_implementation="eager")


def data_config_of(model: nn.Module, library: str, source: str | None) -> dict[str, Any]:
    """Input size, mean, std and interpolation the backbone expects (never hard-coded per run)."""
    if library == "timm":
        import timm.data

        cfg = dict(timm.data.resolve_model_data_config(model))
        img_size = _fixed_img_size(model)
        if img_size is not None:
            cfg["input_size"] = (3, *img_size)  # models built with img_size=...
        return _jsonable(cfg)
    timm_model = getattr(model, "timm_model", None)
    if source is None and isinstance(timm_model, nn.Module):
        return data_config_of(timm_model, "timm", None)  # timm_wrapper: timm's own data config
    cfg: dict[str, Any] = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
    size = getattr(model.config, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if source is not None:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(source)
            cfg["mean"] = tuple(proc.image_mean)
            cfg["std"] = tuple(proc.image_std)
            s = proc.size
            if isinstance(s, dict):
                side = s.get("shortest_edge") or s.get("height")
                size = (s.get("height", side), s.get("width", side))
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # no processor saved with the model: ImageNet statistics at the config's size
    cfg["input_size"] = (3, *size)
    return _jsonable(cfg)


def _fixed_img_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a timm model was built for, when its patch embedding fixes one."""
    for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None), model):
        img_size = getattr(owner, "img_size", None)
        if img_size is None or not isinstance(img_size, (int, tuple, list)):
            continue
        if getattr(owner, "dynamic_img_size", False) or not getattr(owner, "strict_img_size", True):
            return None  # any input size works: keep the pretrained resolution
        return _pair(img_size)
    return None


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _create_transformers(
    name: str,
    num_labels: int | None,
    id2label: dict[int, str] | None,
    pretrained: bool,
    model_kwargs: dict[str, Any],
) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModelForImageClassification

    kwargs: dict[str, Any] = dict(model_kwargs)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if id2label is not None:
        kwargs["id2label"] = dict(id2label)
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
    try:
        if not pretrained:
            config = AutoConfig.from_pretrained(name, **kwargs)
            return AutoModelForImageClassification.from_config(config, attn_implementation="eager")
        return AutoModelForImageClassification.from_pretrained(
            name,
            ignore_mismatched_sizes=num_labels is not None,
            attn_implementation="eager",
            use_safetensors=True,
            **kwargs,
        )
    except OSError as err:
        import timm

        hint = close_matches(name, timm.list_models(), n=3)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise CGCValueError(
            f"name_or_model {name!r} is neither a timm model name nor a loadable transformers "
            f"model (transformers {transformers.__version__} said: {str(err).splitlines()[0]})."
            f"{hint} {_OFFLINE_HINT if offline else ''}"
            "Use a timm name such as 'resnet50', 'hf-hub:timm/<repo>', or a transformers Hub id "
            "/ local directory."
        ) from None
    except ValueError as err:
        raise CGCValueError(
            f"name_or_model {name!r} is not an image classifier: {str(err).splitlines()[0]} "
            "Use a timm model name, or a transformers image model (Hub id or local directory) "
            "whose model type has an image-classification head, e.g. vit, convnext, swin, "
            "resnet; a base model of such a type gets a new head."
        ) from None


def _num_outputs(model: nn.Module, library: str) -> int:
    return model.num_classes if library == "timm" else model.config.num_labels


def _reset_classifier(model: nn.Module, library: str, num_labels: int) -> None:
    if library == "timm":
        model.reset_classifier(num_labels)
        return
    old = model.config.num_labels
    heads = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == old
    ]
    if not heads:
        raise CGCValueError(
            f"cannot find the classifier of {type(model).__name__} to resize it to num_labels="
            f"{num_labels}; build the model with num_labels={num_labels} instead."
        )
    for name, lin in heads:  # e.g. DeiT with teacher has two heads
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        new = nn.Linear(lin.in_features, num_labels, bias=lin.bias is not None)
        setattr(parent, name.rpartition(".")[2], new.to(lin.weight.device, lin.weight.dtype))
    model.config.num_labels = num_labels


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (str, int, float, bool)) or d is None:
        return d
    if isinstance(d, torch.dtype):
        return str(d)
    return str(d)
