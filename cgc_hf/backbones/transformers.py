"""transformers image classifiers: Hub ids, local folders, ``PreTrainedModel`` instances."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import CGCValueError, close_matches
from . import color_tokens
from .base import (
    DEFAULT_HUB,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneAdapter,
    BuildRequest,
    HubOptions,
    jsonable,
    pair,
)
from .timm import TimmAdapter

if TYPE_CHECKING:
    from ..config import CGCConfig

logger = logging.getLogger(__name__)

_OFFLINE_HINT = "HF_HUB_OFFLINE=1 is set, so Hub ids need a cached copy. "
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLE_PIL = {v: k for k, v in _PIL_RESAMPLE.items()}
_CONVNEXT_CROP_LIMIT = 384  # ConvNeXt's processor crops below this side and warps from it on
_TIMM = TimmAdapter()


class TransformersAdapter(BackboneAdapter):
    """A ``PreTrainedModel`` with an image-classification head (``outputs.logits``)."""

    library = "transformers"
    export_usage = """\
```python
from transformers import AutoModelForImageClassification, pipeline

model.export_backbone("exported")  # the classifier's own save_pretrained format
backbone = AutoModelForImageClassification.from_pretrained("exported")  # no cgc_hf needed
classify = pipeline("image-classification", model="exported")  # preprocessing included
```"""

    def owns(self, model: nn.Module) -> bool:
        from transformers import PreTrainedModel

        return isinstance(model, PreTrainedModel)

    def create(self, request: BuildRequest) -> nn.Module:
        import transformers
        from transformers import AutoConfig, AutoModelForImageClassification

        name, num_labels, id2label = request.name, request.num_labels, request.id2label
        model_kwargs, hub = request.model_kwargs, request.hub
        refuse_remote_code(name, model_kwargs)
        kwargs: dict[str, Any] = dict(model_kwargs)
        for key, value in hub.kwargs().items():
            if key in kwargs and kwargs[key] != value:
                shown = "<token>" if key == "token" else repr(value)
                raise CGCValueError(
                    f"{key}={shown} conflicts with the model_kwargs {key}; give one of them."
                )
            kwargs[key] = value  # from_pretrained's own arguments, not config fields
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        if id2label is not None:
            kwargs["id2label"] = dict(id2label)
            kwargs["label2id"] = {v: k for k, v in id2label.items()}
        try:
            if not request.pretrained:
                config = AutoConfig.from_pretrained(name, trust_remote_code=False, **kwargs)
                model = AutoModelForImageClassification.from_config(
                    config, attn_implementation="eager", trust_remote_code=False
                )
            else:
                model = AutoModelForImageClassification.from_pretrained(
                    name,
                    ignore_mismatched_sizes=num_labels is not None,
                    attn_implementation="eager",
                    use_safetensors=True,
                    trust_remote_code=False,
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
                "Use a timm name such as 'resnet50', 'hf-hub:timm/<repo>', or a transformers Hub "
                "id / local directory."
            ) from None
        except ValueError as err:
            if "trust_remote_code" in str(err):
                raise _remote_code_error(name) from None
            raise CGCValueError(
                f"name_or_model {name!r} is not an image classifier: {str(err).splitlines()[0]} "
                "Use a timm model name, or a transformers image model (Hub id or local directory) "
                "whose model type has an image-classification head, e.g. vit, convnext, swin, "
                "resnet; a base model of such a type gets a new head."
            ) from None
        if color_tokens.reads_color_tokens(model):  # ImageGPT: its processor's clusters
            processor = _load_processor(name, hub)
            if processor is not None:
                self.use_processor(model, processor)
        return model

    def use_processor(self, model: nn.Module, processor: Any) -> None:
        clusters = color_tokens.clusters_from_processor(processor)
        if color_tokens.reads_color_tokens(model) and clusters is not None:
            color_tokens.attach_clusters(model, clusters)

    def describe(
        self, model: nn.Module, model_kwargs: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        config = model.config.to_dict()
        if color_tokens.reads_color_tokens(model):
            if color_tokens.clusters_of(model) is None and model.config._name_or_path:
                # an instance loaded with from_pretrained: the processor saved beside it
                processor = _load_processor(model.config._name_or_path)
                if processor is not None:
                    self.use_processor(model, processor)
            clusters = color_tokens.clusters_of(model)
            if clusters is None:
                raise color_tokens.missing_clusters_error(model)
            config[color_tokens.CLUSTERS_KEY] = clusters.tolist()
        return type(model).__name__, config

    def rebuild(self, architecture: str, backbone_config: dict[str, Any]) -> nn.Module:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config_dict = dict(backbone_config)
        clusters = config_dict.pop(color_tokens.CLUSTERS_KEY, None)
        # from_dict, not the constructor: some configs (timm_wrapper) keep fields such as
        # num_classes / label_names only through their own from_dict.
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
        cls = getattr(transformers, architecture, None)
        if cls is None:
            raise CGCValueError(
                f"architecture {architecture!r} is not a transformers model class in this version "
                f"({transformers.__version__}); upgrade transformers."
            )
        model = cls._from_config(config, attn_implementation="eager")
        if clusters is not None:
            color_tokens.attach_clusters(model, clusters)
        return model

    def logits(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        if _takes_patches(model):
            out = model(**_patch_inputs(model, pixel_values))
        elif color_tokens.reads_color_tokens(model):
            clusters = color_tokens.clusters_of(model)
            if clusters is None:
                raise color_tokens.missing_clusters_error(model)
            out = model(input_ids=color_tokens.color_tokens(pixel_values, clusters))
        else:
            out = model(pixel_values=pixel_values)
        logits = getattr(out, "logits", None)
        if logits is None:
            # a classifier that returns its logits under another name (PP-LCNet's
            # last_hidden_state): the output's first (B, num_labels) tensor
            shape = (pixel_values.shape[0], model.config.num_labels)
            logits = next((v for v in out.values() if getattr(v, "shape", None) == shape), None)
        if logits is None:
            raise CGCValueError(
                f"{type(model).__name__} returned {type(out).__name__} without logits of shape "
                f"(batch, num_labels); use a model with an image-classification head."
            )
        return logits

    def num_labels(self, model: nn.Module) -> int:
        return int(model.config.num_labels)

    def id2label(self, model: nn.Module) -> dict[int, str] | None:
        names = getattr(model.config, "id2label", None) or {}  # PvT's config may hold None
        return {int(k): v for k, v in names.items()} or None

    def set_labels(self, model: nn.Module, id2label: dict[int, str]) -> None:
        model.config.id2label = dict(id2label)
        model.config.label2id = {v: k for k, v in id2label.items()}

    def classifier(self, model: nn.Module) -> list[nn.Module]:
        timm_model = getattr(model, "timm_model", None)
        if isinstance(timm_model, nn.Module):
            return _TIMM.classifier(timm_model)
        return [m for _, m in _heads(model)]

    def reset_head(self, model: nn.Module, num_labels: int) -> None:
        heads = _heads(model)
        if not heads:
            raise CGCValueError(
                f"cannot find the classifier of {type(model).__name__} to resize it to "
                f"num_labels={num_labels}; build the model with num_labels={num_labels} instead."
            )
        for name, lin in heads:  # e.g. DeiT with teacher has two heads
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            new = nn.Linear(lin.in_features, num_labels, bias=lin.bias is not None)
            setattr(parent, name.rpartition(".")[2], new.to(lin.weight.device, lin.weight.dtype))
        model.config.num_labels = num_labels

    def data_config(
        self, model: nn.Module, source: str | None, hub: HubOptions = DEFAULT_HUB
    ) -> dict[str, Any]:
        timm_model = getattr(model, "timm_model", None)
        if isinstance(timm_model, nn.Module):
            return _TIMM.data_config(timm_model, None)  # timm_wrapper: timm's own data config
        cfg: dict[str, Any] = {
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bilinear",
        }
        size = instance_image_size(model) or (224, 224)
        if isinstance(source, str):
            processor = _load_processor(source, hub)
        else:
            processor = source  # an instance's image processor, or None
        tokens = color_tokens.reads_color_tokens(model)
        if processor is None and tokens:
            processor = color_tokens.default_processor()  # its [-1, 1] normalisation
        if processor is not None:
            read = processor_data_config(processor)
            given = read.get("input_size")
            resized = given is not None and tuple(given[-2:]) != size
            if resized and (tokens or not _accepts(model, given)):
                # a model built at another size than its checkpoint's preprocessing (a config
                # override such as image_size=64): the instance decides the size
                read.pop("input_size")
                read.pop("crop_pct", None)
                read.pop("crop_mode", None)
            cfg.update(read)
        cfg.setdefault("input_size", (3, *size))
        return jsonable(cfg)

    def target_hints(self, model: nn.Module) -> tuple[str | None, int | None]:
        inner = getattr(model, "timm_model", None)  # timm_wrapper holds a timm model
        return _TIMM.target_hints(inner) if isinstance(inner, nn.Module) else (None, None)

    def disable_fused_attention(self, model: nn.Module, keep: Collection[nn.Module] = ()) -> None:
        # one implementation for the whole model: eager everywhere
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            model.set_attn_implementation("eager")
        super().disable_fused_attention(model, keep)  # timm modules inside timm_wrapper

    def export(self, model: nn.Module, folder: Path, config: CGCConfig) -> None:
        model.save_pretrained(str(folder))
        data_config = config.data_config or self.data_config(model, None)
        clusters = color_tokens.clusters_of(model)
        if clusters is not None:  # ImageGPT's processor maps pixels to its clusters' ids
            size = tuple(int(v) for v in data_config["input_size"][-2:])
            processor = color_tokens.processor_with_clusters(clusters, size)
        else:
            processor = processor_for(data_config)
        processor.save_pretrained(str(folder))

    def rebuild_hint(self, model: nn.Module, config: CGCConfig) -> str:
        return (
            "transformers backbones are rebuilt from model.config: either the backbone was "
            "changed after it was built, or cgc_hf's transformers adapter does not handle "
            f"{config.architecture} (please report it). export_backbone(dir) still saves the "
            "classifier in transformers' own format."
        )

    def base_model(self, model: nn.Module, source: str | None) -> str | None:
        name = source or getattr(model.config, "_name_or_path", "") or ""
        if not name or os.path.exists(name) or name.count("/") != 1:
            return None  # a local folder or an unnamed instance: no Hub page to link
        return name


def _heads(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers with ``num_labels`` outputs: the classifier (DeiT with teacher has two)."""
    n = model.config.num_labels
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == n
    ]


def instance_image_size(model: nn.Module) -> tuple[int, int] | None:
    """``config.image_size``, or a vision tower's ``config.vision_config.image_size``
    (ImageGPT: the square its positions hold, one per pixel)."""
    if color_tokens.reads_color_tokens(model):
        return pair(color_tokens.token_side(model))
    config = model.config
    for owner in (config, getattr(config, "vision_config", None)):
        size = getattr(owner, "image_size", None)
        pair_of_ints = isinstance(size, (list, tuple)) and len(size) == 2
        if isinstance(size, int) or (pair_of_ints and all(isinstance(s, int) for s in size)):
            return pair(size)
        patches, patch = getattr(owner, "num_patches", None), getattr(owner, "patch_size", None)
        if isinstance(patches, int) and isinstance(patch, int):  # NaFlex: a square of patches
            return pair(math.isqrt(patches) * patch)
    return None


def _takes_patches(model: nn.Module) -> bool:
    """Whether ``model`` reads flattened patches with their grid (SigLIP 2's NaFlex input)."""
    return "spatial_shapes" in inspect.signature(model.forward).parameters


def _patch_inputs(model: nn.Module, pixel_values: Tensor) -> dict[str, Tensor]:
    """Images ``(B, 3, H, W)`` as the rows of patches NaFlex models take (their processor's
    layout: row-major patches, each flattened as ``(p, p, C)``), all of them valid.

    Shape:
        pixel_values: ``(B, C, H, W)`` -> ``(B, gh * gw, p * p * C)``, mask ``(B, gh * gw)``,
        spatial_shapes ``(B, 2)``.
    """
    config = getattr(model.config, "vision_config", model.config)
    p = int(config.patch_size)
    b, c, h, w = pixel_values.shape
    gh, gw = h // p, w // p
    patches = pixel_values[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(b, gh * gw, dtype=torch.long, device=patches.device),
        "spatial_shapes": torch.tensor([[gh, gw]] * b, device=patches.device),
    }


def processor_data_config(processor: Any) -> dict[str, Any]:
    """Input size, mean, std, interpolation and crop of a transformers image processor.

    Transformers 5 keeps ``size`` / ``crop_size`` as a ``SizeDict`` (attributes, ``None`` for
    unset sides), 4.x as a dict: both are read through ``dict(...)``.
    """
    out: dict[str, Any] = {}
    if getattr(processor, "image_mean", None) is not None:
        out["mean"] = tuple(float(v) for v in processor.image_mean)
    if getattr(processor, "image_std", None) is not None:
        out["std"] = tuple(float(v) for v in processor.image_std)
    interpolation = _interpolation_name(getattr(processor, "resample", None))
    if interpolation is not None:
        out["interpolation"] = interpolation
    size = _size_dict(getattr(processor, "size", None))
    crop = _size_dict(getattr(processor, "crop_size", None))
    side = size.get("shortest_edge") or size.get("height")
    if getattr(processor, "do_center_crop", False) and "height" in crop and "width" in crop:
        h, w = crop["height"], crop["width"]
        out["input_size"] = (3, h, w)
        out["crop_pct"] = min(1.0, h / side) if side else 1.0
        out["crop_mode"] = "center"
    elif "height" in size and "width" in size:
        out["input_size"] = (3, size["height"], size["width"])
        out["crop_pct"], out["crop_mode"] = 1.0, "squash"  # resized to (h, w), no crop
    elif "shortest_edge" in size:
        s = size["shortest_edge"]
        out["input_size"] = (3, s, s)
        crop_pct = getattr(processor, "crop_pct", None)
        if isinstance(crop_pct, (int, float)) and 0 < crop_pct < 1 and s < _CONVNEXT_CROP_LIMIT:
            out["crop_pct"], out["crop_mode"] = float(crop_pct), "center"
        elif isinstance(crop_pct, (int, float)):
            out["crop_pct"], out["crop_mode"] = 1.0, "squash"
        else:
            out["crop_pct"], out["crop_mode"] = 1.0, "center"
    return out


def processor_for(data_config: dict[str, Any]) -> Any:
    """A transformers image processor that preprocesses like ``data_config`` (eval transform).

    ``CLIPImageProcessor`` resizes the shorter side and crops the centre (timm's eval transform
    with ``crop_pct``); ``ViTImageProcessor`` resizes to ``(h, w)`` (``crop_mode="squash"``).
    Both are plain transformers classes, so ``pipeline("image-classification", model=dir)``
    and ``AutoImageProcessor.from_pretrained(dir)`` read the folder.
    """
    from transformers import CLIPImageProcessor, ViTImageProcessor

    h, w = (int(v) for v in tuple(data_config["input_size"])[-2:])
    mean = [float(v) for v in data_config["mean"]]
    std = [float(v) for v in data_config["std"]]
    resample = _RESAMPLE_PIL.get(str(data_config.get("interpolation") or "bilinear"), 2)
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    if data_config.get("crop_mode", "center") == "squash":
        return ViTImageProcessor(
            size={"height": h, "width": w}, resample=resample, image_mean=mean, image_std=std
        )
    scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    size = {"shortest_edge": scaled[0]} if h == w else {"height": scaled[0], "width": scaled[1]}
    return CLIPImageProcessor(
        size=size,
        crop_size={"height": h, "width": w},
        do_center_crop=True,
        resample=resample,
        image_mean=mean,
        image_std=std,
    )


def refuse_remote_code(name: str, model_kwargs: dict[str, Any] | None = None) -> None:
    """Refuse a folder whose ``config.json`` asks for its own Python code (``auto_map``).

    transformers would prompt on a terminal (and run the folder's code on "y"); cgc_hf never
    runs remote code, and says so before transformers is asked.
    """
    if (model_kwargs or {}).get("trust_remote_code"):
        raise CGCValueError(
            f"model_kwargs trust_remote_code={model_kwargs['trust_remote_code']!r} is not "
            "supported: cgc_hf never runs code shipped with a model. Use a model whose type "
            "transformers implements, or a timm model."
        )
    path = Path(name).expanduser() / "config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return  # transformers reports the unreadable file itself
        if isinstance(raw, dict) and raw.get("auto_map"):
            raise _remote_code_error(name)


def _remote_code_error(name: str) -> CGCValueError:
    return CGCValueError(
        f"name_or_model {name!r} needs custom code shipped with the model (auto_map in its "
        "config.json); cgc_hf loads transformers models with trust_remote_code=False and never "
        "runs such code. Use a model whose type transformers implements, or a timm model."
    )


def _load_processor(source: str, hub: HubOptions = DEFAULT_HUB) -> Any | None:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=False, **hub.kwargs())
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as err:
        # no processor saved with the model: ImageNet statistics at the instance's size
        logger.debug("no image processor for %s (%s)", source, err)
        return None


def _accepts(model: nn.Module, input_size: tuple[int, ...] | list[int]) -> bool:
    """Whether ``model`` runs on an input of ``input_size`` (one image, no gradient)."""
    param = next(model.parameters())
    x = torch.zeros(1, 3, *(int(v) for v in tuple(input_size)[-2:]), device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values=x.to(param.dtype))
        return True
    except (RuntimeError, ValueError):
        return False
    finally:
        model.train(was_training)


def _size_dict(size: Any) -> dict[str, int]:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    try:
        items = dict(size).items()
    except (TypeError, ValueError):
        items = vars(size).items()
    return {k: int(v) for k, v in items if isinstance(v, (int, float)) and v}


def _interpolation_name(resample: Any) -> str | None:
    if resample is None:
        return None
    value = getattr(resample, "value", resample)  # PILImageResampling / InterpolationMode enums
    if isinstance(value, str):
        return value.lower()
    try:
        return _PIL_RESAMPLE.get(int(value))
    except (TypeError, ValueError):
        return None
