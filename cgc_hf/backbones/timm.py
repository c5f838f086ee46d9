"""timm classifiers: ``timm.create_model`` names, ``hf-hub:`` / ``local-dir:`` models, instances."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..errors import CGCValueError
from .base import DEFAULT_HUB, BackboneAdapter, BuildRequest, HubOptions, jsonable, pair

if TYPE_CHECKING:
    from ..config import CGCConfig

# create_model arguments about where weights come from, not the architecture: the saved
# pretrained_cfg already holds their effect, and a rebuild loads no weights.
_SOURCE_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def is_timm_name(name: str) -> bool:
    """Whether ``name`` is a registered timm architecture or a timm Hub / local-dir reference."""
    import timm

    if timm.is_model(name):
        return True
    return name.startswith(("hf-hub:", "local-dir:", "timm/")) and not os.path.isdir(name)


class TimmAdapter(BackboneAdapter):
    """A timm model: ``forward(x)`` gives logits, ``pretrained_cfg`` its preprocessing."""

    library = "timm"
    export_usage = """\
```python
import timm

model.export_backbone("exported")  # timm config.json + model.safetensors
backbone = timm.create_model("local-dir:exported", pretrained=True)  # no cgc_hf needed
```"""

    def owns(self, model: nn.Module) -> bool:
        return hasattr(model, "forward_features") and hasattr(model, "get_classifier")

    def create(self, request: BuildRequest) -> nn.Module:
        import timm

        name, num_labels, pretrained = request.name, request.num_labels, request.pretrained
        model_kwargs, hub = request.model_kwargs, request.hub
        kwargs = dict(model_kwargs)
        if num_labels is not None:
            kwargs["num_classes"] = num_labels
        if "img_size" in kwargs and "pretrained_cfg_overlay" not in kwargs:
            # pretrained_cfg keeps the registry's input size otherwise; the saved description
            # (and a plain-timm reader of it) should state the size the model was built for.
            kwargs["pretrained_cfg_overlay"] = {"input_size": (3, *pair(kwargs["img_size"]))}
        name = _apply_hub_options(name, pretrained, kwargs, hub)
        try:
            with _hub_token(hub.token):
                return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as err:  # an argument the model's constructor does not take
            if not model_kwargs or "argument" not in str(err):
                raise
            raise CGCValueError(
                f"model_kwargs={dict(model_kwargs)!r} do not fit the timm model {name!r} "
                f"({err}); pass only arguments its constructor takes (see "
                f"timm.create_model({name!r}) and the model class's signature)."
            ) from None

    def describe(
        self, model: nn.Module, model_kwargs: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        arch = model.pretrained_cfg.get("architecture") or type(model).__name__
        return arch, {
            "model_name": arch,
            "num_classes": model.num_classes,
            "model_kwargs": _recorded_kwargs(
                model, {k: v for k, v in model_kwargs.items() if k not in _SOURCE_KWARGS}
            ),
            "pretrained_cfg": jsonable(dict(model.pretrained_cfg)),
        }

    def rebuild(self, architecture: str, backbone_config: dict[str, Any]) -> nn.Module:
        import timm

        return timm.create_model(
            backbone_config["model_name"],
            pretrained=False,
            num_classes=backbone_config["num_classes"],
            pretrained_cfg_overlay=backbone_config.get("pretrained_cfg"),
            **backbone_config.get("model_kwargs", {}),
        )

    def logits(self, model: nn.Module, pixel_values: Tensor) -> Tensor:
        return model(pixel_values)

    def num_labels(self, model: nn.Module) -> int:
        return int(model.num_classes)

    def classifier(self, model: nn.Module) -> list[nn.Module]:
        head = model.get_classifier()
        if isinstance(head, (tuple, list)):  # distilled models: (head, head_dist)
            return [h for h in head if isinstance(h, nn.Module)]
        return [head] if isinstance(head, nn.Module) else []

    def reset_head(self, model: nn.Module, num_labels: int) -> None:
        model.reset_classifier(num_labels)

    def data_config(
        self, model: nn.Module, source: str | None, hub: HubOptions = DEFAULT_HUB
    ) -> dict[str, Any]:
        import timm.data  # the instance's pretrained_cfg: no file to read

        cfg = dict(timm.data.resolve_model_data_config(model))
        size = instance_input_size(model)
        if size is not None:
            cfg["input_size"] = (3, *size)
        return jsonable(cfg)

    def target_hints(self, model: nn.Module) -> tuple[str | None, int | None]:
        """timm models declare their feature layout (``output_fmt``, e.g. ``"NHWC"`` for Swin)
        and their number of class / distillation / register tokens (``num_prefix_tokens``)."""
        layout = getattr(model, "output_fmt", None)
        layout = getattr(layout, "value", layout)  # timm's Format enum or a plain string
        prefix = getattr(model, "num_prefix_tokens", None)
        return (layout if isinstance(layout, str) else None), (
            prefix if isinstance(prefix, int) else None
        )

    def export(self, model: nn.Module, folder: Path, config: CGCConfig) -> None:
        from timm.models import save_for_hf

        model_config: dict[str, Any] = {}
        if config.id2label:
            names = [config.id2label[k] for k in sorted(config.id2label)]
            dense = sorted(config.id2label) == list(range(len(names)))
            model_config["label_names"] = names if dense else dict(config.id2label)
        save_for_hf(model, str(folder), model_config=model_config, safe_serialization=True)

    def unrecordable_kwargs(self, model: nn.Module, backbone_config: dict[str, Any]) -> list[str]:
        """timm constructor arguments of ``model`` that JSON cannot hold (e.g. a layer class) and
        the user did not pass by name: a rebuild from the config would silently differ."""
        try:
            from timm.models import get_model_args
        except ImportError:
            return []
        given = backbone_config.get("model_kwargs") or {}
        recorded = get_model_args(model) or {}
        return sorted(k for k, v in recorded.items() if not _is_plain(v) and k not in given)

    def rebuild_hint(self, model: nn.Module, config: CGCConfig) -> str:
        kwargs = "{...}"
        try:
            from timm.models import get_model_args  # records constructor arguments (recent timm)

            args = {k: v for k, v in get_model_args(model).items() if k != "num_classes"}
            kwargs = repr(args)
        except ImportError:
            pass  # older timm keeps no record; the user knows the arguments they passed
        return (
            "timm models passed as an instance, or created from a 'local-dir:' / 'hf-hub:' "
            "name, carry constructor arguments cgc_hf does not see. Build the model with "
            f"CGCModel.from_backbone({config.architecture!r}, model_kwargs={kwargs}, "
            "pretrained=False, ...) so they are recorded, then copy the weights in with "
            "model.backbone.load_state_dict(<your backbone>.state_dict())."
        )

    def base_model(self, model: nn.Module, source: str | None) -> str | None:
        hub_id = getattr(model, "pretrained_cfg", {}).get("hf_hub_id")
        if isinstance(hub_id, str) and hub_id:
            return hub_id.split("@")[0]  # timm's "repo@revision": the repository has the page
        if source and source.startswith("hf-hub:"):
            return source.removeprefix("hf-hub:").split("@")[0]
        return None

    def license(self, model: nn.Module) -> str | None:
        value = getattr(model, "pretrained_cfg", {}).get("license")
        return value if isinstance(value, str) and value else None


def _apply_hub_options(name: str, pretrained: bool, kwargs: dict[str, Any], hub: HubOptions) -> str:
    """What timm supports of transformers' Hub options: ``kwargs`` gain them; returns the name.

    ``cache_dir`` is ``create_model``'s own argument. A revision is timm's ``repo@revision``:
    in an ``hf-hub:`` name (config and weights), else in the ``hf_hub_id`` the pretrained
    weights download from. Anything else is refused, not ignored.
    """
    import timm
    from timm.models import get_pretrained_cfg

    if hub.cache_dir is not None:
        if "cache_dir" not in inspect.signature(timm.create_model).parameters:
            raise CGCValueError(
                f"cache_dir={os.fspath(hub.cache_dir)!r}: timm {timm.__version__}'s create_model "
                "takes no cache_dir; upgrade timm (pip install -U timm) or leave cache_dir unset "
                "(downloads then go to the huggingface_hub cache, HF_HUB_CACHE)."
            )
        given = kwargs.get("cache_dir")
        if given is not None and os.fspath(given) != os.fspath(hub.cache_dir):
            raise CGCValueError(
                f"cache_dir={os.fspath(hub.cache_dir)!r} conflicts with model_kwargs cache_dir="
                f"{given!r}; give one of them."
            )
        kwargs["cache_dir"] = os.fspath(hub.cache_dir)
    revision = hub.revision
    if revision is None:
        return name
    if name.startswith("local-dir:"):
        raise CGCValueError(
            f"revision={revision!r} does not apply to the local folder {name!r}; leave it unset."
        )
    if name.startswith("hf-hub:"):
        repo, _, pinned = name.partition("@")
        if pinned and pinned != revision:
            raise CGCValueError(
                f"revision={revision!r} conflicts with the revision in the model name {name!r}; "
                "give one of them."
            )
        return f"{repo}@{revision}"
    if not pretrained:
        return name  # a registry architecture with random weights downloads nothing
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    hub_id = overlay.get("hf_hub_id") or (cfg.hf_hub_id if cfg is not None else None)
    if not hub_id:
        raise CGCValueError(
            f"revision={revision!r} applies to weights on the Hugging Face Hub, and timm's "
            f"{name!r} downloads its weights from {getattr(cfg, 'url', None) or 'no repository'}; "
            "leave revision unset, or name a Hub repository as 'hf-hub:<user>/<repo>'."
        )
    overlay["hf_hub_id"] = f"{hub_id.split('@')[0]}@{revision}"
    kwargs["pretrained_cfg_overlay"] = overlay
    return name


@contextmanager
def _hub_token(token: str | bool | None) -> Iterator[None]:
    """Make ``token`` the Hub token of the downloads inside the block.

    timm's downloads take no token argument; huggingface_hub reads ``HF_TOKEN`` at each request
    (before the saved login), so the token is set there for the block only and never written.
    """
    if token is None or token is True:  # True: the saved login, huggingface_hub's default
        yield
        return
    if token is False:
        raise CGCValueError(
            "token=False (no token) is not supported for timm downloads, which always send the "
            "saved login or HF_TOKEN; pass a token string or leave token unset."
        )
    previous = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = previous


def instance_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size ``model`` was built for, or ``None`` when it declares none.

    timm records an instance's own size (``img_size=...``, or the pretrained size of a model
    whose input size is fixed) apart from its pretrained config; a model built without one
    (CNNs, which run at any size) keeps the pretrained resolution.
    """
    try:
        from timm.models import get_model_input_config, get_model_traits
    except ImportError:  # timm before the instance traits: read the patch embedding
        return _patch_embed_size(model)
    if get_model_traits(model).get("img_size") is None:
        return None
    return pair(tuple(get_model_input_config(model)["input_size"])[-2:])


def _patch_embed_size(model: nn.Module) -> tuple[int, int] | None:
    for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None), model):
        img_size = getattr(owner, "img_size", None)
        if img_size is None or not isinstance(img_size, (int, tuple, list)):
            continue
        if getattr(owner, "dynamic_img_size", False) or not getattr(owner, "strict_img_size", True):
            return None  # any input size works: keep the pretrained resolution
        return pair(img_size)
    return None


def _recorded_kwargs(model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments that rebuild ``model``: the ones timm recorded, then the user's.

    A model passed as an instance, or made from ``hf-hub:`` / ``local-dir:``, may have been built
    with non-default arguments that its name does not carry; timm records them on the model.
    Only plain JSON values are kept (a layer class cannot be saved; see
    :meth:`TimmAdapter.unrecordable_kwargs`).
    """
    try:
        from timm.models import get_model_args
    except ImportError:  # timm < 1.0.16 records nothing
        return given
    recorded = {k: v for k, v in (get_model_args(model) or {}).items() if k != "num_classes"}
    plain = {k: v for k, v in recorded.items() if _is_plain(v)}
    return {**jsonable(plain), **given}


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))
