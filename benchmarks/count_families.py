"""Count the timm families and transformers image-classification types CGC works on by itself.

Cases, each at random init (nothing is downloaded):

- **timm, default size**: one model per family (a module of ``timm.models``: ``resnet``,
  ``vision_transformer``...), the registered one with the fewest parameters, built by name with
  ``CGCModel.from_backbone(name, pretrained=False)`` at its own input size.
- **timm, small size**: the same model built by the user at a small non-default size,
  ``timm.create_model(name, img_size=S)`` (the first of 64, 96, 128, 160 that plain timm
  builds and runs), then wrapped as an instance. Families whose models take no ``img_size``
  (most CNNs run at any size anyway) have no such case.
- **transformers**: every model type of ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``, from
  a tiny config (:data:`HF_TINY`), wrapped as an instance (ImageGPT with an image processor
  of random colour clusters, as its own processor would bring).

A case passes when the target layer resolves automatically, one CGC training step (batch of 4)
gives a finite loss whose CGC term alone sends non-zero gradient into the first layer of the
backbone, and ``explain`` returns a heatmap that is not constant, on the grid the explained
layer really outputs. Anything else, a time-out or an exhausted memory cap included, fails.
``--gradient-checkpointing`` runs that step with the blocks before the target layer recomputed
in the backward (``model.gradient_checkpointing_enable()``).
Random-init models get what a first step of training would give them: all-zero classifier
weights (timm zero-initialises some heads) become small random values, BatchNorm scales that
transformers draws from N(0, 0.02) become 1, and BatchNorm statistics are estimated on the
probe images before the eval-mode ``explain``.

Run it niced and single-threaded (choosing the smallest model per family builds every timm
model once on the meta device; ``--picks`` caches that):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice python benchmarks/count_families.py \\
        --picks timm_picks.json --json families.json --timeout-per-model 300 --max-memory-gb 8
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import resource
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import timm
import torch
from torch import Tensor, nn

from cgc_hf import CGCModel
from cgc_hf._io import read_json, write_json
from cgc_hf.target_layer import capture, to_nchw
from cgc_hf.testing import (
    HF_ENCODER,
    HF_PERCEIVER,
    HF_STAGES,
    HF_SWIN,
    HF_VIT,
    first_weight_layer,
)

NUM_LABELS = 3
SMALL_SIZES = (64, 96, 128, 160)

# ---------------------------------------------------------------------------------- tiny configs
_TOWER = dict(HF_VIT, num_hidden_layers=1)  # a CLIP / SigLIP vision tower

HF_TINY: dict[str, tuple[int, dict[str, Any]]] = {
    # model_type: (image side, config fields); sizes are non-default wherever the model has one
    "beit": (32, dict(HF_VIT, use_mean_pooling=True)),
    "bit": (64, dict(HF_STAGES, embedding_size=16, layer_type="bottleneck", num_groups=2)),
    "clip": (32, dict(vision_config=_TOWER, text_config=HF_ENCODER)),
    "convnext": (64, dict(HF_STAGES, num_stages=2)),
    "convnextv2": (64, dict(HF_STAGES, num_stages=2)),
    # CvT indexes its drop-path rates by stage, so stage i needs more than i blocks
    "cvt": (64, dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])),
    "data2vec-vision": (32, dict(HF_VIT, use_mean_pooling=True)),
    "deit": (32, dict(HF_VIT)),
    "dinat": (
        64,
        dict(patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3),
    ),
    "dinov2": (32, dict(HF_VIT)),
    "dinov2_with_registers": (32, dict(HF_VIT, num_register_tokens=2)),
    "donut-swin": (32, dict(HF_SWIN)),
    "efficientnet": (
        64,
        dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    ),
    "focalnet": (64, dict(embed_dim=16, depths=[1, 1], focal_levels=[2, 2])),
    "hgnet_v2": (
        64,
        dict(
            stem_channels=[3, 8, 16],
            stage_in_channels=[16, 32],
            stage_mid_channels=[8, 16],
            stage_out_channels=[32, 64],
            stage_num_blocks=[1, 1],
            stage_downsample=[False, True],
            stage_light_block=[False, False],
            stage_kernel_size=[3, 3],
            stage_numb_of_layers=[2, 2],
            hidden_sizes=[32, 64],
            depths=[1, 1],
        ),
    ),
    "hiera": (
        64,
        dict(
            image_size=[64, 64],
            embed_dim=16,
            num_heads=[1, 2, 4],
            depths=[1, 1, 1],
            num_query_pool=2,
            masked_unit_size=[4, 4],
            masked_unit_attention=[True, False, False],
        ),
    ),
    "ijepa": (32, dict(HF_VIT)),
    "imagegpt": (16, dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, vocab_size=513)),
    "levit": (  # three stages of stride 16, 32, 64: 128 px leaves a 2x2 grid at the end
        128,
        dict(
            image_size=128,
            hidden_sizes=[16, 32, 48],
            num_attention_heads=[1, 2, 3],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
        ),
    ),
    "metaclip_2": (32, dict(vision_config=_TOWER, text_config=HF_ENCODER)),
    "mobilenet_v1": (64, dict(image_size=64, depth_multiplier=0.25)),
    "mobilenet_v2": (64, dict(image_size=64, depth_multiplier=0.25)),
    "mobilevit": (
        64,
        dict(
            image_size=64,
            hidden_sizes=[32, 48, 64],
            neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96],
        ),
    ),
    "mobilevitv2": (64, dict(image_size=64, width_multiplier=0.25)),
    "perceiver": (32, dict(HF_PERCEIVER)),
    "poolformer": (64, dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])),
    "pp_lcnet": (64, dict(scale=0.25)),
    "pvt": (
        64,
        dict(
            image_size=64,
            hidden_sizes=[16, 32, 48, 64],
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 1, 2, 2],
        ),
    ),
    "pvt_v2": (
        64,
        dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2]),
    ),
    "regnet": (64, dict(HF_STAGES, embedding_size=16, groups_width=8)),
    "resnet": (64, dict(HF_STAGES, embedding_size=16, layer_type="basic")),
    "segformer": (
        64,
        dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2]),
    ),
    "shieldgemma2": (32, dict()),  # filled in by _shieldgemma2_config
    "siglip": (32, dict(vision_config=_TOWER, text_config=HF_ENCODER)),
    "siglip2": (32, dict(vision_config=dict(_TOWER, num_patches=16), text_config=HF_ENCODER)),
    "swiftformer": (64, dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 48, 64])),
    "swin": (32, dict(HF_SWIN)),
    "swinv2": (32, dict(HF_SWIN)),
    "textnet": (
        64,
        dict(
            image_size=[64, 64],
            stem_out_channels=16,
            hidden_sizes=[16, 16, 32, 48, 64],
            depths=[1, 1, 1, 1],
            conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]], [[3, 3]], [[3, 3]]],
            conv_layer_strides=[[1], [2], [2], [2]],
        ),
    ),
    "timm_wrapper": (64, dict(architecture="resnet18", model_args=dict(layers=[1, 1, 1, 1]))),
    "vit": (32, dict(HF_VIT)),
    "vit_msn": (32, dict(HF_VIT)),
}
"""model_type -> (image side, tiny config fields), for every image-classification type."""


# ---------------------------------------------------------------------------------- one case
@dataclass
class Result:
    """What happened to one case."""

    library: str
    family: str
    model: str
    size: str = ""
    params: int = 0
    target: str = ""
    layout: str = ""
    grid: str = ""
    status: str = "ok"
    seconds: float = 0.0


def _prepare(model: nn.Module) -> None:
    """Give all-zero Linear weights small random values, as a first optimizer step would.

    timm zero-initialises some classifiers (Hiera, MLP-Mixer); until one step has trained them
    the class score is constant, so no heatmap and no gradient could be anything but zero.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not bool(m.weight.any()):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
            elif (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.weight is not None
                and 0 < float(m.weight.abs().max()) < 0.1
            ):
                # transformers draws EfficientNet's BatchNorm scales from N(0, 0.02) like its
                # convolutions, so a random model's activations vanish (~1e-39); PyTorch's 1.
                m.weight.fill_(1.0)


def _calibrate_batchnorm(model: CGCModel, x: Tensor) -> None:
    """Estimate BatchNorm running statistics from ``x``, as training would.

    A fresh model's statistics (mean 0, variance 1) leave eval-mode activations unnormalised;
    LeViT's and PP-LCNet's then shrink until every heatmap is flat.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model.adapter.logits(model.backbone, x)


def check(model: CGCModel, result: Result, checkpointing: bool = False) -> None:
    """Train one CGC step (with gradient checkpointing when asked) and explain; raise with the
    reason when a criterion fails."""
    _prepare(model.backbone)
    result.target = model.target.name
    result.layout = model.target.layout
    if model.target.num_prefix_tokens:
        result.layout += f"+{model.target.num_prefix_tokens}"
    size = tuple(model.config.data_config["input_size"][-2:])
    result.size = "x".join(map(str, size))
    gen = torch.Generator().manual_seed(0)
    # four different images: BatchNorm in training mode maps a batch of two to +-1
    x = torch.randn(4, 3, *size, generator=gen)
    model.eval()
    stem = first_weight_layer(model, lambda: model.adapter.logits(model.backbone, x))
    if checkpointing:
        model.gradient_checkpointing_enable()

    model.train()
    out = model(x, labels=torch.tensor([0, 1, 2, 0]))
    if not bool(torch.isfinite(out["loss"])):
        raise FloatingPointError(f"loss is {float(out['loss'].detach())}")
    model.zero_grad()
    out["loss_cgc"].backward()  # the CGC term alone
    grad = stem.weight.grad
    if grad is None or not bool(grad.abs().max() > 0):
        raise RuntimeError("the CGC term sends no gradient into the first layer")

    _calibrate_batchnorm(model, x)
    model.eval()
    with capture(model.backbone, model.target.name, make_leaf=True) as cap:
        model.adapter.logits(model.backbone, x)
    grid = tuple(to_nchw(cap.tensor.detach(), model.target, size).shape[-2:])
    # The predicted class first; a random-init model's ReLU may zero one class's map
    # everywhere, so the other classes count too: any informative map passes.
    predicted = model(x)["logits"].argmax(1)
    peaks = []
    for k in [None, *range(NUM_LABELS)]:
        heatmaps = model.explain(x, None if k is None else torch.full_like(predicted, k))
        result.grid = "x".join(map(str, heatmaps.shape[-2:]))
        if tuple(heatmaps.shape[-2:]) != grid:
            raise RuntimeError(f"heatmap grid {result.grid} is not the layer's grid {grid}")
        if not bool(torch.isfinite(heatmaps).all()):
            raise FloatingPointError("heatmap is not finite")
        flat = heatmaps.flatten(1)  # (2, h*w)
        spread = flat.amax(1) - flat.amin(1)  # (2,)
        if bool((spread > 1e-6 * flat.abs().amax().clamp_min(1e-30)).any()):
            return
        peaks.append(float(flat.abs().max()))
    raise RuntimeError(f"every heatmap of every class is constant (peaks {peaks})")


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_case(
    result: Result, build: Callable[[], CGCModel], timeout: float, checkpointing: bool = False
) -> Result:
    """Build and check one case; never raises."""
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            torch.manual_seed(0)
            model = build()
            result.params = _num_params(model.backbone)
            check(model, result, checkpointing)
    except Exception as err:  # noqa: BLE001 - the table reports every failure
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result.status = f"error: {type(err).__name__}: {first_line[:200]}"
    finally:
        result.seconds = time.perf_counter() - start
        gc.collect()
    return result


def timm_default(name: str) -> Callable[[], CGCModel]:
    return lambda: CGCModel.from_backbone(name, num_labels=NUM_LABELS, pretrained=False)


def timm_small(name: str, result: Result) -> Callable[[], CGCModel]:
    """Build ``name`` at the first small size plain timm accepts, as a user's instance."""

    def build() -> CGCModel:
        cfg = timm.get_pretrained_cfg(name)
        default = cfg.input_size[-1] if cfg is not None else 224
        reasons = []
        for side in (s for s in SMALL_SIZES if s != default):
            try:
                backbone = timm.create_model(
                    name, pretrained=False, num_classes=NUM_LABELS, img_size=side
                )
                backbone.eval()
                with torch.no_grad():
                    backbone(torch.randn(1, 3, side, side))
            except TypeError as err:
                if "img_size" in str(err):
                    raise NotApplicable("takes no img_size") from None
                reasons.append(f"{side}: {type(err).__name__}")
                continue
            except Exception as err:  # noqa: BLE001 - plain timm refuses this size
                reasons.append(f"{side}: {type(err).__name__}")
                continue
            result.size = f"{side}x{side}"
            return CGCModel.from_backbone(backbone)
        raise NotApplicable(f"plain timm runs at none of {SMALL_SIZES} ({'; '.join(reasons)})")

    return build


class NotApplicable(Exception):
    """The family has no small-size case (no ``img_size`` argument, or no small size runs)."""


def hf_build(model_type: str) -> Callable[[], CGCModel]:
    def build() -> CGCModel:
        from transformers import AutoConfig, AutoModelForImageClassification
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as NAMES,
        )

        side, fields = HF_TINY[model_type]
        if model_type == "shieldgemma2":
            config = _shieldgemma2_config()
        else:
            config = AutoConfig.for_model(model_type, num_labels=NUM_LABELS, **fields)
        classes = NAMES[model_type]
        if not isinstance(classes, str):  # several heads (e.g. DeiT with teacher): the first
            config.architectures = [classes[0]]
        backbone = AutoModelForImageClassification.from_config(config)
        processor = _imagegpt_processor(config, side) if model_type == "imagegpt" else None
        return CGCModel.from_backbone(backbone, image_processor=processor)

    return build


def _imagegpt_processor(config: Any, side: int) -> Any:
    """An ImageGPT processor with random colour clusters, one per token id but the last (its
    start-of-sequence token), in the [-1, 1] range the normalised pixels have."""
    from transformers import ImageGPTImageProcessor

    gen = torch.Generator().manual_seed(0)
    clusters = torch.rand(config.vocab_size - 1, 3, generator=gen) * 2 - 1
    return ImageGPTImageProcessor(clusters=clusters, size={"height": side, "width": side})


def _shieldgemma2_config() -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "shieldgemma2",
        text_config=dict(
            model_type="gemma3_text",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=300,
        ),
        vision_config=dict(model_type="siglip_vision_model", **_TOWER),
        mm_tokens_per_image=4,
    )


# ---------------------------------------------------------------------------------- isolation
@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the block after ``seconds`` (main thread, Unix only)."""

    def on_alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"gave up after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _worker(
    conn: Connection, case: tuple[str, str, str, str], timeout: float, gb: float, ckpt: bool
) -> None:
    # Cap this process's heap so one huge model fails alone instead of exhausting the machine.
    limit = int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    library, kind, family, name = case
    result = Result(library, family, name)
    if library == "transformers":
        build = hf_build(name)
    elif kind == "small":
        build = timm_small(name, result)
    else:
        build = timm_default(name)
    result = run_case(result, build, timeout, ckpt)
    if "NotApplicable" in result.status:
        result.status = "n/a: " + result.status.split("NotApplicable: ", 1)[-1]
    conn.send(asdict(result))
    conn.close()


def run_isolated(
    case: tuple[str, str, str, str], timeout: float, gb: float, checkpointing: bool = False
) -> Result:
    """:func:`run_case` in a forked process with a memory cap; a crash is reported, not fatal."""
    ctx = multiprocessing.get_context("fork")  # the child inherits the imports: no start-up cost
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(send, case, timeout, gb, checkpointing))
    start = time.perf_counter()
    proc.start()
    send.close()
    result = None
    if receive.poll(timeout + 30):  # the child enforces `timeout` itself; this is a backstop
        try:
            result = Result(**receive.recv())
        except EOFError:
            pass
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        result = Result(case[0], case[2], case[3], seconds=time.perf_counter() - start)
        result.status = f"error: worker died (exit code {proc.exitcode}, memory cap {gb:g} GB?)"
    return result


# ---------------------------------------------------------------------------------- picking
def count_params(name: str) -> int | None:
    """Parameters of ``name``, built on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an unbuildable variant is simply not a candidate
        return None


def load_or_pick(families: list[str], path: str | None) -> list[tuple[str, str]]:
    """``(family, model)``: the smallest buildable model per family, cached in ``path``."""
    cached: dict[str, list] = (read_json(path) or {}) if path else {}
    missing = [fam for fam in families if fam not in cached]
    if missing:
        print(f"choosing the smallest model of {len(missing)} timm families...", flush=True)
        for family in missing:
            sizes = [(count_params(n), n) for n in timm.list_models(module=family)]
            sizes = [(p, n) for p, n in sizes if p is not None]
            cached[family] = list(min(sizes)[::-1]) if sizes else ["", 0]
        if path:
            write_json(path, cached)
    return [(fam, cached[fam][0]) for fam in families]


# ---------------------------------------------------------------------------------- report
def summarize(results: list[Result], label: str) -> list[str]:
    """Count line and the failures of one group of cases."""
    applicable = [r for r in results if not r.status.startswith("n/a")]
    ok = [r for r in applicable if r.status == "ok"]
    lines = [f"{label}: {len(ok)} of {len(applicable)} pass"]
    skipped = len(results) - len(applicable)
    if skipped:
        lines[0] += f" ({skipped} families have no such case)"
    lines += [f"  FAIL {r.family} ({r.model}): {r.status}" for r in applicable if r.status != "ok"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["timm-default", "timm-small", "transformers"],
        choices=["timm-default", "timm-small", "transformers"],
        help="Groups of cases to run.",
    )
    parser.add_argument("--families", default=None, help="Comma-separated timm modules.")
    parser.add_argument("--types", default=None, help="Comma-separated transformers model types.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N of each group.")
    parser.add_argument("--timeout-per-model", type=float, default=300.0, help="Seconds per case.")
    parser.add_argument("--max-memory-gb", type=float, default=8.0, help="Heap cap per case.")
    parser.add_argument("--picks", default=None, help="JSON cache of the smallest timm models.")
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="Train the CGC step with model.gradient_checkpointing_enable().",
    )
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # deprecation chatter would drown the table
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)

    groups: dict[str, list[tuple[str, str, str, str]]] = {}
    if any(c.startswith("timm") for c in args.cases):
        families = args.families.split(",") if args.families else sorted(timm.list_modules())
        picks = load_or_pick(families, args.picks)[: args.limit]
        for kind in ("default", "small"):
            if f"timm-{kind}" in args.cases:
                groups[f"timm-{kind}"] = [("timm", kind, fam, name) for fam, name in picks]
    if "transformers" in args.cases:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )

        types = (
            args.types.split(",")
            if args.types
            else sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
        )
        groups["transformers"] = [("transformers", "tiny", t, t) for t in types][: args.limit]

    all_results: dict[str, list[Result]] = {}
    for group, cases in groups.items():
        print(f"\n== {group}", flush=True)
        results = all_results.setdefault(group, [])
        for case in cases:
            if case[0] == "transformers" and case[3] not in HF_TINY:
                r = Result(case[0], case[2], case[3], status="error: no tiny config in HF_TINY")
            elif not case[3]:
                r = Result(case[0], case[2], "", status="error: no model of this family builds")
            else:
                r = run_isolated(
                    case, args.timeout_per_model, args.max_memory_gb, args.gradient_checkpointing
                )
            results.append(r)
            print(
                f"{r.family:<24} {r.model:<36} {r.size:>7} {r.params / 1e6:>7.2f}M "
                f"{r.target:<32} {r.layout:<7} {r.grid:<6} {r.status} ({r.seconds:.1f}s)",
                flush=True,
            )
        if args.json:  # after every group, so an interrupted count keeps what it found
            done = {g: [asdict(r) for r in rs] for g, rs in all_results.items()}
            write_json(args.json, done, sort_keys=False)

    print()
    for group, results in all_results.items():
        print("\n".join(summarize(results, group)), flush=True)


if __name__ == "__main__":
    main()
