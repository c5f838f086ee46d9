"""What CGC costs: step time and peak memory against cross-entropy on the same two views.

Three training steps are timed on the same model, batch, resolution and precision, interleaved in
one process (median of several steps after warm-up):

* ``ce2``: cross-entropy on the original and the augmented batch (the two views CGC also uses);
* ``cgc``: :class:`cgc_hf.CGCModel`'s forward (both views in one pass, heatmaps on the layer grid,
  closed form for global-average-pool + linear heads, comparison at ``compare_size``);
* ``naive``: the cost profile of the paper's reference implementation, written here from its
  description: three forward passes (a separate CE crop, the original, the augmented view),
  heatmaps by autograd upsampled to input size, warped per sample in a Python loop, and InfoNCE
  at input resolution;
* ``cgc_whole`` (on request): ``cgc`` with a class-token ViT differentiated whole instead of
  through its readout slice (:mod:`cgc_hf.readout`: timm's ``ClassTokenReadout``,
  transformers' ``ViTLayerReadout``), to show what the readout saves;
* ``cgc_ckpt`` (on request): ``cgc`` with gradient checkpointing of the blocks before the target
  layer (``model.gradient_checkpointing_enable()``, :mod:`cgc_hf.gradient_checkpointing`).

The default models are one per heatmap path: ResNet-50 (closed form), ConvNeXt-Tiny (pool, norm,
linear), Swin-T (NHWC), ViT-S/16 (class token), ViT-S/16 with average pooling, and a transformers
ViT-S/16 built from its config.

Peak memory is measured per mode in a fresh subprocess: on CUDA ``max_memory_allocated``; on CPU
the peak resident memory of the training steps (the kernel's peak mark is reset after the model
is built) minus the resident memory before the first step, with glibc's mmap threshold fixed at
64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident memory.

Usage:
    python benchmarks/cost.py                      # the six default models at 224 px, batch 8
    python benchmarks/cost.py --models resnet18 --image_size 64 --steps 3   # a quick look
    python benchmarks/cost.py --batch_sizes 8 16 32 --modes cgc             # throughput
    python benchmarks/cost.py --overhead --models resnet18 --image_size 64 --steps 10 --cpu_time
    python benchmarks/cost.py --models resnet50 --modes ce2 cgc --channels_last --cpu_time
    python benchmarks/cost.py --models vit_small_patch16_224 --modes ce2 cgc cgc_ckpt --cpu_time
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from cgc_hf import CGCLoss, CGCModel, combine, sample_crop_flip, warp
from cgc_hf.target_layer import capture, to_nchw

MODES = ("ce2", "cgc", "naive", "cgc_whole", "cgc_ckpt")
CL = "_cl"
"""Suffix of a mode run in channels-last memory format (model and images), e.g. ``cgc_cl``."""


# One model per heatmap path. A name here is a preset; any other name is a timm model name.
PRESETS: dict[str, tuple[str, dict]] = {
    # class token read through the last block: second-order pass through that block
    "vit_small_patch16_224": ("vit_small_patch16_224", {}),
    # average of the patch tokens, then a LayerNorm (fc_norm) and the head: gradient at the layer
    "vit_small_patch16_224_avg": (
        "vit_small_patch16_224",
        {"global_pool": "avg", "class_token": False, "fc_norm": True},
    ),
    # transformers ViT-S/16 (class token, eager attention), built from its config
    "hf_vit_small": (
        "hf:vit",
        {
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
            "patch_size": 16,
        },
    ),
}
DEFAULT_MODELS = [
    "resnet50",  # global-average-pool + linear head: closed-form heatmap
    "convnext_tiny",  # pool, LayerNorm, linear: autograd heatmap, no closed form
    "swin_tiny_patch4_window7_224",  # NHWC layer
    "vit_small_patch16_224",
    "vit_small_patch16_224_avg",
    "hf_vit_small",
]


def build(name: str, image_size: int, device: str, explicit_attention: bool = False) -> CGCModel:
    """A random-init model with 200 classes (no download); ``name`` is a preset or a timm name.

    ``explicit_attention``: every timm attention module computes attention explicitly, as all
    did before the ones that run ahead of the target layer kept their fused kernel.
    """
    arch, kwargs = PRESETS.get(name, (name, {}))
    kwargs = dict(kwargs)
    if arch.startswith("hf:"):
        from transformers import AutoConfig, AutoModelForImageClassification

        config = AutoConfig.for_model(arch[3:], num_labels=200, image_size=image_size, **kwargs)
        backbone = AutoModelForImageClassification.from_config(config, attn_implementation="eager")
        model = CGCModel.from_backbone(backbone, input_size=image_size)
    else:
        if any(k in arch for k in ("vit", "swin", "deit", "eva")):
            kwargs["img_size"] = image_size
        model = CGCModel.from_backbone(
            arch, num_labels=200, pretrained=False, model_kwargs=kwargs, input_size=image_size
        )
    if explicit_attention:
        for module in model.backbone.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    return model.to(device).train()


def step_ce2(model: CGCModel, x, labels, t) -> torch.Tensor:
    x_aug = warp(x, t)
    logits = model._logits(torch.cat([x, x_aug]))  # (2B, K)
    return F.cross_entropy(logits, torch.cat([labels, labels]))


def step_cgc(model: CGCModel, x, labels, t) -> torch.Tensor:
    return model(x, labels=labels, geometry=t)["loss"]


def step_cgc_whole(model: CGCModel, x, labels, t) -> torch.Tensor:
    """CGC with a class-token ViT differentiated whole instead of through its readout slice."""
    readout, model._readout = model._readout, None
    try:
        return model(x, labels=labels, geometry=t)["loss"]
    finally:
        model._readout = readout


def _loop_warp(maps: torch.Tensor, t, size: int) -> torch.Tensor:
    """Per-sample crop, resize and flip, one Python iteration per image (reference style)."""
    out = []
    h, w = maps.shape[-2:]
    for i in range(maps.shape[0]):
        x0, y0, x1, y1 = t.boxes[i].tolist()
        crop = maps[
            i : i + 1,
            :,
            int(y0 * h) : max(int(y1 * h), int(y0 * h) + 1),
            int(x0 * w) : max(int(x1 * w), int(x0 * w) + 1),
        ]
        crop = F.interpolate(crop, (size, size), mode="bilinear", align_corners=False)
        out.append(crop.flip(-1) if bool(t.flip[i]) else crop)
    return torch.cat(out)


def step_naive(model: CGCModel, x, labels, t) -> torch.Tensor:
    size = x.shape[-1]
    cfg = model.config
    t_ce = sample_crop_flip(x.shape[0], cfg.crop_scale, cfg.crop_ratio, 0.5, device=x.device)
    x_ce = _loop_warp(x, t_ce, size)
    x_aug = _loop_warp(x, t, size)
    loss = F.cross_entropy(model._logits(x_ce), labels)

    def view(inp):
        with capture(model.backbone, model.target.name) as cap:
            logits = model._logits(inp)
        classes = logits.detach().argmax(1)
        (g,) = torch.autograd.grad(
            logits.gather(1, classes[:, None]).sum(), cap.tensor, create_graph=True
        )
        feats = to_nchw(cap.tensor, model.target, (size, size))
        cam = combine(feats, to_nchw(g, model.target, (size, size)), "grad_x_act")
        cam = F.interpolate(cam[:, None], (size, size), mode="bilinear", align_corners=False)
        return logits, cam

    logits, cam = view(x)
    logits_aug, cam_aug = view(x_aug)
    cam_pos = _loop_warp(cam, t, size)[:, 0]
    loss = loss + F.cross_entropy(logits, labels) + F.cross_entropy(logits_aug, labels)
    return loss + cfg.cgc_lambda * CGCLoss(cfg.temperature)(cam_aug[:, 0], cam_pos)


STEPS = {
    "ce2": step_ce2,
    "cgc": step_cgc,
    "naive": step_naive,
    "cgc_whole": step_cgc_whole,
    "cgc_ckpt": step_cgc,  # on the model with gradient checkpointing (variant)
}


def variant_key(mode: str) -> tuple[bool, bool]:
    """``(channels-last, gradient checkpointing)``: the model variant ``mode`` runs on."""
    return mode.endswith(CL), mode.removesuffix(CL) == "cgc_ckpt"


def variant(model: CGCModel, mode: str) -> CGCModel:
    """``model`` as ``mode`` runs it: stored channels-last for ``*_cl``, with gradient
    checkpointing for ``cgc_ckpt``; the same weights."""
    channels_last, checkpointed = variant_key(mode)
    if not (channels_last or checkpointed):
        return model
    model = copy.deepcopy(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if checkpointed:
        model.gradient_checkpointing_enable()
    return model


def run_steps(model, mode, batch, image_size, device, steps, dtype, opt, timings=None, clock=None):
    clock = clock or time.perf_counter
    fmt = torch.channels_last if mode.endswith(CL) else torch.contiguous_format
    step = STEPS[mode.removesuffix(CL)]
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(steps):
        x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
        x = x.contiguous(memory_format=fmt)
        labels = torch.randint(0, 200, (batch,), generator=g).to(device)
        t = sample_crop_flip(batch, generator=g).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = step(model, x, labels, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if timings is not None:
            timings.append(clock() - start)


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5), so building the model and
    resolving its target layer do not count towards the training steps' peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(args) -> None:
    """Run one mode in this (fresh) process and print its peak memory in MiB as JSON."""
    torch.manual_seed(0)
    model = build(args.models[0], args.image_size, args.device, args.explicit_attention)
    model = variant(model, args.modes[0])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = getattr(torch, args.dtype)
    # The baseline is taken before any step: CPU allocators keep freed memory, so a warm-up
    # step would hide the peak it reached.
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        base = _status_bytes("VmRSS")
    run_steps(
        model, args.modes[0], args.batch_sizes[0], args.image_size, args.device, 3, dtype, opt
    )
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    elif reset:
        peak = _status_bytes("VmHWM") - base
    else:  # no clear_refs: the lifetime peak, which also holds model building
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_mib": peak / 2**20}))


def profile(args) -> None:
    """Print each mode's heaviest operators (self CPU/CUDA time) for one step after a warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    dtype = getattr(torch, args.dtype)
    for name in args.models:
        torch.manual_seed(0)
        model = build(name, args.image_size, args.device, args.explicit_attention)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for mode in args.modes:
            batch = args.batch_sizes[0]
            run_steps(model, mode, batch, args.image_size, args.device, 1, dtype, opt)
            with torch_profile(activities=activities) as prof:
                run_steps(model, mode, batch, args.image_size, args.device, 1, dtype, opt)
            key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
            print(f"\n== {name} {mode} batch {batch}")
            print(prof.key_averages().table(sort_by=key, row_limit=12))


class _Images(torch.utils.data.Dataset):
    """In-memory images and labels, so both loops below read data at no cost."""

    def __init__(self, n: int, size: int, classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def overhead(args) -> None:
    """Per-step time of ``CGCTrainer`` against a plain loop doing the same CGC steps.

    Both run ``--steps`` optimizer steps of the same model, batch and AdamW optimizer (no
    evaluation, no checkpoints); the plain loop is ``model(x, labels)["loss"].backward()``,
    ``step``, ``zero_grad`` over a ``DataLoader``. Time per step is taken between the ends of the
    first and the last step (set-up, the first step and saving the model excluded). Rounds
    alternate; the median of each is shown.
    """
    import tempfile

    from accelerate.state import AcceleratorState, GradientState

    from cgc_hf import CGCTrainer, CGCTrainingArguments

    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
    batch, steps = args.batch_sizes[0], args.steps
    data = _Images(batch * steps, args.image_size, 200)
    for name in args.models:
        per_step = {"trainer": [], "plain": []}
        for _ in range(3):
            torch.manual_seed(0)
            model = build(name, args.image_size, args.device, args.explicit_attention)
            with tempfile.TemporaryDirectory() as tmp:
                targs = CGCTrainingArguments(
                    output_dir=tmp,
                    per_device_train_batch_size=batch,
                    max_train_steps=steps,
                    figure_images=0,
                    logging_steps=steps,
                    report_to="none",
                )
                trainer = CGCTrainer(model, targs, data)
                marks: list[float] = []
                trainer._step_end = lambda marks=marks: marks.append(clock())  # after each step
                trainer.train()
                per_step["trainer"].append((marks[-1] - marks[0]) / (len(marks) - 1))
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            torch.manual_seed(0)
            model = build(name, args.image_size, args.device, args.explicit_attention)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True)
            marks = []
            for item in loader:
                x, y = item["pixel_values"].to(args.device), item["labels"].to(args.device)
                model(x, labels=y)["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                marks.append(clock())
            per_step["plain"].append((marks[-1] - marks[0]) / (len(marks) - 1))
        t, p = (statistics.median(per_step[k]) for k in ("trainer", "plain"))
        print(
            f"{name} b={batch} {args.image_size} px, {steps} steps: CGCTrainer {t:.3f} s/step, "
            f"plain loop {p:.3f} s/step, overhead {t / p:.2f}x",
            flush=True,
        )


def measure_memory(args, name: str, mode: str, batch: int) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--memory_child",
        "--models",
        name,
        "--modes",
        mode,
        "--batch_sizes",
        str(batch),
        "--image_size",
        str(args.image_size),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ] + (["--explicit_attention"] if args.explicit_attention else [])
    # glibc serves large buffers from its heap once its mmap threshold has grown, and the
    # heap's fragmentation then moves resident memory by 10-20% between runs of the same mode;
    # with a fixed threshold each tensor above 64 KiB is its own mapping, freed when it is
    # freed, so the resident peak follows the live tensors.
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="presets or timm names")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["ce2", "cgc", "naive"],
        choices=MODES + tuple(m + CL for m in MODES),
    )
    p.add_argument(
        "--channels_last",
        action="store_true",
        help="also run each mode in channels-last memory format (model and images), "
        "interleaved with the default format: modes <mode>_cl",
    )
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[8])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (after 1 warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no_memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--explicit_attention",
        action="store_true",
        help="explicit attention in every timm attention module, also before the target layer",
    )
    p.add_argument(
        "--cpu_time",
        action="store_true",
        help="CPU: time steps by this process's CPU time on one thread, not wall time (a "
        "machine shared with other work then slows every mode alike)",
    )
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing, profile one step per mode and print where its time goes",
    )
    p.add_argument(
        "--overhead",
        action="store_true",
        help="instead, compare CGCTrainer's step time with a plain loop of the same CGC steps",
    )
    p.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_child:
        return memory_child(args)
    if args.profile:
        return profile(args)
    if args.overhead:
        return overhead(args)
    if args.channels_last:
        args.modes += [m + CL for m in args.modes if not m.endswith(CL)]
    dtype = getattr(torch, args.dtype)
    clock = time.perf_counter
    if args.cpu_time:
        torch.set_num_threads(1)
        clock = time.process_time
    results = []
    print(
        f"device={args.device} dtype={args.dtype} image_size={args.image_size} "
        f"threads={torch.get_num_threads()} steps={args.steps} (median after 1 warm-up)"
        f"{' clock=process CPU time' if args.cpu_time else ''}"
    )
    for name in args.models:
        torch.manual_seed(0)
        model = build(name, args.image_size, args.device, args.explicit_attention)
        # (model variant, its optimizer) per variant: the same weights; modes that run on the
        # same variant share it, as they share the default model
        pairs = {}
        for m in args.modes:
            if variant_key(m) not in pairs:
                net = variant(model, m)
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
                pairs[variant_key(m)] = (net, opt)
        for batch in args.batch_sizes:
            times = {m: [] for m in args.modes}
            for m in args.modes:  # warm-up
                net, optim = pairs[variant_key(m)]
                run_steps(net, m, batch, args.image_size, args.device, 1, dtype, optim)
            for _ in range(args.steps):  # interleaved, so drifts in machine load hit all modes
                for m in args.modes:
                    net, optim = pairs[variant_key(m)]
                    run_steps(
                        net,
                        m,
                        batch,
                        args.image_size,
                        args.device,
                        1,
                        dtype,
                        optim,
                        times[m],
                        clock,
                    )
            row = {
                "model": name,
                "batch": batch,
                "target": model.target.name,
                "closed_form": model.target.linear_head is not None,
            }
            for m in args.modes:
                med = statistics.median(times[m])
                row[f"{m}_s"] = med
                row[f"{m}_img_per_s"] = batch / med
                if not args.no_memory:
                    row[f"{m}_peak_mib"] = measure_memory(args, name, m, batch)
            results.append(row)
            print(_format(row, args.modes), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _format(row: dict, modes: list[str]) -> str:
    parts = [
        f"{row['model']} b={row['batch']} layer={row['target']}"
        f"{' (closed form)' if row['closed_form'] else ''}"
    ]
    for m in modes:
        s = f"{m}: {row[f'{m}_s']:.3f}s {row[f'{m}_img_per_s']:.1f} img/s"
        if f"{m}_peak_mib" in row:
            s += f" {row[f'{m}_peak_mib']:.0f} MiB"
        parts.append(s)
    if "ce2" in modes and "cgc" in modes:
        parts.append(f"cgc/ce2 time {row['cgc_s'] / row['ce2_s']:.2f}x")
        if "cgc_peak_mib" in row:
            parts.append(f"memory {row['cgc_peak_mib'] / row['ce2_peak_mib']:.2f}x")
    if "cgc_ckpt" in modes and "cgc" in modes:
        s = f"cgc_ckpt/cgc time {row['cgc_ckpt_s'] / row['cgc_s']:.2f}x"
        if "cgc_peak_mib" in row:
            s += f" memory {row['cgc_ckpt_peak_mib'] / row['cgc_peak_mib']:.2f}x"
        parts.append(s)
    if "naive" in modes and "cgc" in modes:
        parts.append(f"speed-up over naive {row['naive_s'] / row['cgc_s']:.2f}x")
    for m in modes:
        if m.endswith(CL) and m.removesuffix(CL) in modes:
            parts.append(f"{m}/{m.removesuffix(CL)} time {row[f'{m}_s'] / row[f'{m[:-3]}_s']:.2f}x")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
