"""Where Grad-CAM looks: resolve the target layer of any timm / transformers classifier.

Resolution is structural, not a table of attribute paths that change between library versions: a
probe forward records every module's output in execution order, a backward measures which of
them receive gradient from the class score (:mod:`cgc_hf.probe`), and the last spatial map (or
token sequence whose tokens form a grid) that does is the target. Class-token ViTs, whose
last-block patch tokens get no gradient, thus resolve to the last block's first norm; Swin
(NHWC) and DINOv2 to their last stage. Layers that receive gradient but whose probe heatmap is
flat, or the same for different images (a pooled vector spread back over the grid), come last,
as do maps without the class token once the sequence carries one (projections inside a
class-token block, as in CvT's last stage), so class attention and late class tokens are
followed back to the last spatial map the score reads. A stage whose heatmaps after the ReLU are
constant for many of the probe images (a 2 x 2 last stage at random init) gives way to the best
layer of the stage before it. A user may name any module instead; it is checked the same way
(only the automatic choice falls back).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import probe
from .errors import TargetLayerError
from .target_layer import (
    _MAX_PREFIX,
    TargetLayer,
    _split_output,
    get_module,
    to_nchw,
    token_grid,
)


def probe_batch_size(image_size: tuple[int, int]) -> int:
    """Images in the target probe: as many as cost two at 224 px, between 2 and 16.

    Whether heatmaps vary, differ between images or are constant is measured on the probe
    images; small inputs afford more of them, which makes those measurements reliable.
    """
    height, width = image_size
    return max(2, min(16, 2 * 224 * 224 // max(1, height * width)))


@dataclass
class _Record:
    name: str
    module: nn.Module
    tensor: Tensor
    order: int


def resolve_target(
    backbone: nn.Module,
    logits_fn: Callable[[Tensor], Tensor],
    example: Tensor,
    name: str | None = None,
    layout_hint: str | None = None,
    prefix_hint: int | None = None,
) -> TargetLayer:
    """Find (or check) the Grad-CAM target layer of a classifier with a probe batch.

    Runs in the backbone's current train/eval mode is left unchanged on return; the probe itself
    runs in eval mode so BatchNorm statistics are not touched.

    Args:
        backbone: the classifier.
        logits_fn: maps images to logits ``(B, K)`` through ``backbone``.
        example: a probe batch ``(B, 3, H, W)`` at a size the model accepts.
        name: module to use instead of the automatic choice; it is validated.
        layout_hint: layout to prefer when a 4-d shape is ambiguous (e.g. timm ``output_fmt``).
        prefix_hint: known number of prefix tokens (timm ``num_prefix_tokens``).

    Returns:
        The :class:`TargetLayer`.

    Raises:
        TargetLayerError: unknown name, non-spatial output, or zero gradient from the class score.
    """
    if name is not None:
        get_module(backbone, name)  # fail early with close matches
    records: list[_Record] = []
    handles = []
    for mod_name, module in backbone.named_modules():
        if mod_name == "":
            continue

        def hook(m: nn.Module, _i: Any, out: Any, mod_name: str = mod_name) -> None:
            tensor, _ = _split_output(out)
            if tensor is not None and tensor.requires_grad and tensor.is_floating_point():
                records.append(_Record(mod_name, m, tensor, len(records)))

        handles.append(module.register_forward_hook(hook))
    was_training = backbone.training
    backbone.eval()
    size = tuple(example.shape[-2:])
    try:
        with torch.enable_grad(), _nonzero_linears(backbone):
            # In eval mode images do not interact, so large images are probed a few at a time:
            # each pass holds the graph of its own images only (a 768 px ViT's: 8.6 GB each).
            # What the decisions below read of a pass is its images' probe maps; the records,
            # logits and graph of the last pass stay for the structural checks.
            parts: dict[int, list[tuple[Tensor | None, bool]]] = {}
            for images in example.split(probe.images_per_pass(size)):
                records.clear()
                logits = None  # the last pass's graph goes before this pass builds its own
                logits = logits_fn(images)
                score = logits.gather(1, logits.argmax(1)[:, None]).sum()
                described = [
                    (rec, target)
                    for rec in records
                    if (target := _describe(rec, size, layout_hint, prefix_hint)) is not None
                ]
                orders = [rec.order for rec, _ in described]
                for order, part in zip(orders, probe.probe_maps(score, described, size)):
                    parts.setdefault(order, []).append(part)
                del score, described
            maps = {order: probe.joined(p) for order, p in parts.items()}
            params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
            candidates = _spatial_candidates(
                records, size, layout_hint, prefix_hint, keep=name, params=params
            )
            if name is not None and name not in {rec.name for rec, _ in candidates}:
                raise TargetLayerError(
                    f"target_layer {name!r} outputs shape {_shape_of(records, name)}, which is not "
                    "a spatial map (B, C, h, w) / (B, h, w, C) or a token grid (B, L, C)."
                    f"{_suggest(candidates)}"
                )
            if not candidates:
                raise TargetLayerError(
                    f"no module of {type(backbone).__name__} outputs a spatial feature map or a "
                    "token grid; Grad-CAM needs one. Pass target_layer= explicitly."
                )
            ranked = _rank(maps, candidates)
            alive = [(rec, target) for rec, target, _ in ranked]
            if name is not None:
                chosen = [(rec, target) for rec, target in alive if rec.name == name]
                if not chosen:
                    hint = f" Use target_layer={alive[0][0].name!r} instead." if alive else ""
                    raise TargetLayerError(
                        f"target_layer {name!r} receives zero gradient from the class score (as "
                        f"the patch tokens of a class-token ViT's last block do), so its heatmap "
                        f"is empty.{hint}"
                    )
                alive = chosen
            if not alive:
                raise TargetLayerError(
                    f"no spatial layer of {type(backbone).__name__} receives gradient from the "
                    "class score; pass target_layer= explicitly."
                )
            rec, target = alive[0]
            if name is None:
                rec, target = _earlier_stage_if_constant(
                    ranked[0], candidates, records, maps, size, layout_hint, prefix_hint, params
                )
            return _with_linear_head(target, rec, records, logits, example)
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)


def _rank(
    maps: dict[int, Tensor | None], candidates: list[tuple[_Record, TargetLayer]]
) -> list[tuple[_Record, TargetLayer, Tensor]]:
    """Candidates that receive gradient from the class score, best first, with their probe
    maps (``maps``: record order -> :func:`cgc_hf.probe.joined` map)."""
    reached = [
        (rec, target, cam, probe.informative(cam))
        for rec, target in candidates
        if (cam := maps.get(rec.order)) is not None
    ]
    # A Linear applied to tokens (attention q/k/v, MLP) is a projection inside a block, not the
    # block's output: HF ViT's last v_proj would otherwise win over the last block's norm in a
    # class-token ViT. Likewise, once the sequence carries a class token, a map without it is
    # computed from the patches alone inside a block (CvT's convolutional key / value
    # projections in its class-token stage). Keep such layers only as a last resort, and behind
    # them layers whose heatmap carries no information about the image.
    with_prefix = any(t.num_prefix_tokens for _, t, _, _ in reached)
    reached.sort(
        key=lambda c: (
            not c[3],
            isinstance(c[0].module, nn.Linear),
            with_prefix and not c[1].num_prefix_tokens,
        )
    )
    return [(rec, target, cam) for rec, target, cam, _ in reached]


def _earlier_stage_if_constant(
    chosen: tuple[_Record, TargetLayer, Tensor],
    candidates: list[tuple[_Record, TargetLayer]],
    records: list[_Record],
    maps: dict[int, Tensor | None],
    size: tuple[int, int],
    layout_hint: str | None,
    prefix_hint: int | None,
    params: set[int],
) -> tuple[_Record, TargetLayer]:
    """The chosen layer, or the best layer of the stage before it when its heatmaps are constant.

    A layer whose heatmap (after the ReLU, as CGC and ``explain`` compute it) is constant for
    many of the probe images, which differ, is not a valid target: CGC has nothing to compare
    there and sends no gradient. A coarse last stage can be like that at random init (a
    2 x 2 class-token stage: the patch tokens' share of the score has one sign over the whole
    grid). The stage before it is everything that runs before the first layer on the chosen
    layer's grid and width, on a finer grid; its best layer, ranked as the last stage's was,
    is taken when its heatmaps are rarely constant. Otherwise (a model whose every stage is
    like that, e.g. a random-init ResNet whose residual branches start at zero) the chosen
    layer stays.
    """
    rec, target, cam = chosen
    constant = probe.constant_count(cam)
    if constant < _too_many_constant(rec.tensor.shape[0]):
        return rec, target
    grid = _grid(rec, target, size)
    start = min(r.order for r, t in candidates if _grid(r, t, size) == grid)
    # Only finer maps: a branch inside the last stage's first cell (NASNet) shares its grid.
    finer = [
        r
        for r in records[:start]
        if (t := _describe(r, size, layout_hint, prefix_hint)) is not None
        and math.prod(_grid(r, t, size)[1:]) > math.prod(grid[1:])
    ]
    earlier = _spatial_candidates(finer, size, layout_hint, prefix_hint, params=params)
    ranked = _rank(maps, earlier) if earlier else []
    if ranked:
        best, best_target, best_cam = ranked[0]
        fewer = probe.constant_count(best_cam)
        if fewer < min(constant, _too_many_constant(best.tensor.shape[0])):
            return best, best_target
    return rec, target


def _too_many_constant(batch: int) -> int:
    """Probe images with a constant heatmap that disqualify a layer: an eighth, at least 2."""
    return max(2, math.ceil(batch / 8))


def _grid(rec: _Record, target: TargetLayer, image_size: tuple[int, int]) -> tuple[int, ...]:
    """``(C, h, w)`` of a candidate's map."""
    shape = rec.tensor.shape
    if target.layout == "NCHW":
        return tuple(shape[1:])
    if target.layout == "NHWC":
        return (shape[3], shape[1], shape[2])
    return (shape[2], *token_grid(shape[1] - target.num_prefix_tokens, image_size))


@contextmanager
def _nonzero_linears(backbone: nn.Module) -> Iterator[None]:
    """Give all-zero ``nn.Linear`` weights random values for the probe, then zero them again.

    Zero-initialised classifiers (timm's MLP-Mixer, heads created for new labels) pass no
    gradient at all, so without this no layer would look alive; the structure of the gradient
    flow, which is all the probe measures, does not depend on the values.
    """
    zeroed = [
        m.weight
        for m in backbone.modules()
        if isinstance(m, nn.Linear) and m.weight.numel() > 0 and not bool(m.weight.any())
    ]
    generator = torch.Generator(device="cpu").manual_seed(0)  # leaves the global RNG alone
    with torch.no_grad():
        for w in zeroed:
            w.copy_(torch.randn(w.shape, generator=generator).mul_(0.02))
    try:
        yield
    finally:
        with torch.no_grad():
            for w in zeroed:
                w.zero_()


def _suggest(candidates: list[tuple[_Record, TargetLayer]]) -> str:
    names = [c[0].name for c in candidates[:3]]
    return f" Spatial layers near the output: {names}." if names else ""


def _shape_of(records: list[_Record], name: str) -> str:
    for r in records:
        if r.name == name:
            return str(tuple(r.tensor.shape))
    return "(no tensor)"


def _spatial_candidates(
    records: list[_Record],
    image_size: tuple[int, int],
    layout_hint: str | None,
    prefix_hint: int | None,
    keep: str | None = None,
    params: set[int] | None = None,
) -> list[tuple[_Record, TargetLayer]]:
    """Records that look like feature maps / token grids, last executed first (``params``: the
    storage addresses of the model's parameters, :func:`_learned_query_counts`).

    Only layers with the same channel count as the last such layer are kept, which skips
    attention internals (qkv, attention maps, MLP hidden) that are not feature maps. That width
    is read from the last layer that is not an ``nn.Linear``: a Linear on tokens after the final
    norm is a per-token classifier (VOLO's token-labelling ``aux_head``), not features. The layer
    named ``keep`` (the user's choice, e.g. an earlier, narrower stage) is kept whatever its width.
    """
    spatial: list[tuple[_Record, TargetLayer, int]] = []
    seen: set[str] = set()
    queries = _learned_query_counts(records, params or set())
    for rec in reversed(records):
        if rec.name in seen:  # a module called twice: keep its last call
            continue
        seen.add(rec.name)
        if _of_learned_queries(rec.tensor, queries) and rec.name != keep:
            continue
        target = _describe(rec, image_size, layout_hint, prefix_hint)
        if target is not None:
            c = rec.tensor.shape[1] if target.layout == "NCHW" else rec.tensor.shape[-1]
            spatial.append((rec, target, c))
    anchors = [c for rec, _, c in spatial if not isinstance(rec.module, nn.Linear)]
    anchors = anchors or [c for _, _, c in spatial]
    if not anchors:
        return []
    return [(rec, t) for rec, t, c in spatial if c == anchors[0] or rec.name == keep]


def _learned_query_counts(records: list[_Record], params: set[int]) -> set[int]:
    """Token counts of sequences that start as learned queries, not as image positions.

    Perceiver's latents enter as one parameter broadcast over the batch (``expand``: stride 0
    along it), and keep their count ``L`` through every block after that. ``L`` may happen to
    form a grid (16 latents: 4 x 4, their self-attention a 16 x 16 "map"), but its tokens are
    not the image's positions, so no such sequence is a target. Image positions first appear
    in a map or sequence computed from the image (a stem, a patch embedding); a position
    embedding broadcast over the batch after it does not make that count a learned one.
    """
    broadcast: dict[int, bool] = {}  # positions -> whether they first appeared broadcast
    for rec in records:
        t = rec.tensor
        if t.ndim == 3:
            counts = {t.shape[1]}
        elif t.ndim == 4:
            counts = {t.shape[2] * t.shape[3], t.shape[1] * t.shape[2]}
        else:
            continue
        first = counts - broadcast.keys()
        if first:
            broadcast.update(dict.fromkeys(first, _broadcast(t, params)))
    return {n for n, b in broadcast.items() if b}


def _broadcast(t: Tensor, params: set[int]) -> bool:
    """A parameter broadcast over the batch: stride 0 along it, or, in a batch of one (whose
    stride says nothing), the parameter's own storage."""
    if t.shape[0] > 1:
        return t.stride(0) == 0
    return t.untyped_storage().data_ptr() in params


def _of_learned_queries(t: Tensor, queries: set[int]) -> bool:
    """A sequence of learned queries ``(B, L, C)``, or their attention ``(B, heads, L, L)``."""
    if t.ndim == 3:
        return t.shape[1] in queries
    return t.ndim == 4 and t.shape[2] in queries and t.shape[3] in queries


def _describe(
    rec: _Record, image_size: tuple[int, int], layout_hint: str | None, prefix_hint: int | None
) -> TargetLayer | None:
    shape = tuple(rec.tensor.shape)
    height, width = image_size
    aspect = height / width
    if len(shape) == 4:
        nchw = (
            shape[2] > 1
            and shape[3] > 1
            and math.isclose(shape[2] / shape[3], aspect, rel_tol=0.25)
        )
        nhwc = (
            shape[1] > 1
            and shape[2] > 1
            and math.isclose(shape[1] / shape[2], aspect, rel_tol=0.25)
        )
        if nchw and nhwc:
            layout = layout_hint if layout_hint in ("NCHW", "NHWC") else "NCHW"
        elif nchw or nhwc:
            layout = "NCHW" if nchw else "NHWC"
        else:
            return None
        spatial = shape[2:] if layout == "NCHW" else shape[1:3]
        if spatial[0] > height or spatial[1] > width:
            return None
        return TargetLayer(rec.name, layout)
    if len(shape) == 3 and shape[2] > 1:
        # Without a hint, several prefix counts can leave a grid (HF DINOv2 with 4 registers and
        # 16 patches: 21 - 1 = 20 = 4 x 5 too); the grid closest to the image's aspect, then the
        # fewest prefix tokens, is the right one.
        prefixes = [prefix_hint] if prefix_hint is not None else range(_MAX_PREFIX + 1)
        best: tuple[float, int] | None = None
        for p in prefixes:
            n = shape[1] - p
            if n < 4 or n > height * width:
                continue
            gh, gw = token_grid(n, image_size)
            error = abs(gh / gw - aspect) / aspect
            if gh * gw == n and gh > 1 and gw > 1 and error <= 0.25:
                best = min(best, (error, p)) if best is not None else (error, p)
        if best is not None:
            return TargetLayer(rec.name, "NLC", best[1])
    return None


def _with_linear_head(
    target: TargetLayer,
    rec: _Record,
    records: list[_Record],
    logits: Tensor,
    example: Tensor,
) -> TargetLayer:
    """Mark ``linear_head`` when the head after ``rec`` is exactly mean-pool + one Linear.

    Structural test (nothing with parameters runs between the layer and the Linear) plus a
    numerical one (the closed form reproduces the logits), both on the probe pass.
    """
    after = [r for r in records if r.order > rec.order and not rec.name.startswith(r.name + ".")]
    linears = [
        r for r in after if isinstance(r.module, nn.Linear) and r.tensor.shape == logits.shape
    ]
    if not linears:
        return target
    head = linears[-1]
    channels = rec.tensor.shape[1] if target.layout == "NCHW" else rec.tensor.shape[-1]
    if head.module.in_features != channels:  # e.g. DINOv2 concatenates class and mean tokens
        return target
    between = [
        r
        for r in after
        if r.order < head.order
        and not head.name.startswith(r.name + ".")
        and any(True for _ in r.module.parameters(recurse=True))
    ]
    if between:
        return target
    with torch.no_grad():
        feats = to_nchw(rec.tensor, target, tuple(example.shape[-2:])).float()  # (B, C, h, w)
        lin = head.module
        ref = feats.mean((2, 3)) @ lin.weight.float().T
        if lin.bias is not None:
            ref = ref + lin.bias.float()
        if not torch.allclose(ref, logits.float(), rtol=1e-4, atol=1e-5):
            return target
    return TargetLayer(target.name, target.layout, target.num_prefix_tokens, head.name)
