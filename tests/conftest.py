"""Shared test helpers: tiny random-init classifiers of every supported family, offline.

Other test files may import the factories directly (``from conftest import tiny_timm``) or use
the fixtures at the bottom. Every model is small enough to build, explain and train in well under
a second on one CPU thread.

Each spec carries the stride of the layer Grad-CAM should explain, read off the architecture
by hand (patch size, or stem stride times one factor 2 per downsampling stage), so tests can
check the heatmap grid without asking the code under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed Hub lookup retries for ~23 s

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from cgc_hf import CGCModel  # noqa: E402
from cgc_hf.testing import HF_PERCEIVER, HF_STAGES, HF_SWIN, HF_VIT  # noqa: E402

NUM_LABELS = 3
ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    OMP_NUM_THREADS="1",
)
"""Environment of a subprocess test: offline, one thread."""


@dataclass(frozen=True)
class TinySpec:
    """A tiny instance of one architecture family.

    Attributes:
        name: timm model name, or transformers ``model_type``.
        kwargs: timm ``model_kwargs``, or transformers config fields.
        image_size: side of the square test images.
        stride: total stride of the explained layer (patch size for ViTs).
        layout: expected layout of the explained layer.
        prefix: expected number of prefix tokens (class, distillation, registers).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int = 64
    stride: int = 32
    layout: str = "NCHW"
    prefix: int = 0

    @property
    def grid(self) -> int:
        """Side of the heatmap grid the explained layer must have."""
        return self.image_size // self.stride


_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
_VIT14 = dict(img_size=28, patch_size=7, depth=2, embed_dim=32, num_heads=2)
_RESNET = dict(layers=[1, 1, 1, 1], stem_width=16, channels=(16, 32, 48, 64))

TIMM_TINY: dict[str, TinySpec] = {
    "resnet": TinySpec("resnet18", _RESNET),
    "resnet_d": TinySpec("resnet18d", _RESNET),
    "efficientnet": TinySpec("test_efficientnet"),
    "tf_efficientnet_lite": TinySpec("tf_efficientnet_lite0"),
    "mobilenetv3": TinySpec("mobilenetv3_small_050"),
    "regnet": TinySpec("regnetx_002"),
    "convnext": TinySpec("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))),
    "vit_token": TinySpec("vit_tiny_patch16_224", _VIT, 32, 8, "NLC", 1),
    "vit_avg": TinySpec(
        "vit_tiny_patch16_224", dict(_VIT, global_pool="avg", class_token=False), 32, 8, "NLC"
    ),
    "deit_distilled": TinySpec("deit_tiny_distilled_patch16_224", _VIT, 32, 8, "NLC", 2),
    "vit_registers": TinySpec("vit_small_patch14_reg4_dinov2", _VIT14, 28, 7, "NLC", 5),
    "eva": TinySpec("eva02_tiny_patch14_224", _VIT14, 28, 7, "NLC", 1),
    "beit": TinySpec("beit_base_patch16_224", _VIT, 32, 8, "NLC", 1),
    # patch 4, then one patch merging per later stage
    "swin": TinySpec(
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=2, depths=(1, 1), num_heads=(1, 2), embed_dim=16),
        32,
        8,
        "NHWC",
    ),
    # stem stride 2, then 2 per stage
    "maxvit": TinySpec(
        "maxvit_tiny_tf_224",
        dict(
            img_size=64,
            depths=(1, 1),
            embed_dim=(16, 32),
            block_type=("M", "M"),
            stem_width=16,
            transformer_dim_head=8,
        ),
        64,
        8,
    ),
    # stem stride 16, then 2 for the second stage
    "levit": TinySpec(
        "levit_128s",
        dict(img_size=64, embed_dim=(16, 32), key_dim=8, depth=(1, 1), num_heads=(2, 2)),
        64,
        32,
        "NLC",
    ),
    # mixer_* names fix depth and width, only the image size can shrink
    "mixer": TinySpec("mixer_s16_224", dict(img_size=32), 32, 16, "NLC"),
    "densenet": TinySpec("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1))),
    "vgg": TinySpec("vgg11", dict(mlp_ratio=1 / 64)),
}

# HF CNNs: stem stride 4 (convnext, resnet) or 2 (regnet), then 2 per later stage
HF_TINY: dict[str, TinySpec] = {
    "resnet": TinySpec("resnet", dict(HF_STAGES, embedding_size=16, layer_type="basic"), 64, 8),
    "convnext": TinySpec("convnext", dict(HF_STAGES, num_stages=2), 64, 8),
    "convnextv2": TinySpec("convnextv2", dict(HF_STAGES, num_stages=2), 64, 8),
    "vit": TinySpec("vit", HF_VIT, 32, 8, "NLC", 1),
    "deit": TinySpec(
        "deit",
        dict(HF_VIT, architectures=["DeiTForImageClassificationWithTeacher"]),
        32,
        8,
        "NLC",
        2,
    ),
    "beit": TinySpec("beit", dict(HF_VIT, use_mean_pooling=True), 32, 8, "NLC", 1),
    "swin": TinySpec("swin", HF_SWIN, 32, 8, "NLC"),
    "swinv2": TinySpec("swinv2", HF_SWIN, 32, 8, "NLC"),
    "dinov2": TinySpec("dinov2", HF_VIT, 32, 8, "NLC", 1),
    "efficientnet": TinySpec(
        "efficientnet",
        dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    ),
    "mobilenet_v2": TinySpec("mobilenet_v2", dict(image_size=64, depth_multiplier=0.25)),
    "regnet": TinySpec("regnet", dict(HF_STAGES, embedding_size=16, groups_width=8), 64, 8),
    # 16 learned latents read one token per pixel: the explained tokens are the image's
    "perceiver": TinySpec(
        "perceiver",
        dict(HF_PERCEIVER, architectures=["PerceiverForImageClassificationLearned"]),
        32,
        1,
        "NLC",
    ),
    "timm_wrapper": TinySpec(
        "timm_wrapper", dict(architecture="resnet18", model_args=dict(_RESNET))
    ),
}


def _nonzero_zero_linears(model: nn.Module) -> None:
    """Give all-zero Linear weights small random values.

    timm zero-initialises some classifiers (MLP-Mixer); one training step makes them non-zero,
    and until then every heatmap is zero, which would make gradient and orientation checks
    vacuous.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not bool(m.weight.any()):
                m.weight.normal_(0.0, 0.02)


def tiny_timm(key: str, num_labels: int = NUM_LABELS, **cgc_options: Any) -> CGCModel:
    """A :class:`CGCModel` over the tiny timm model ``TIMM_TINY[key]``, built by name."""
    spec = TIMM_TINY[key]
    torch.manual_seed(0)
    model = CGCModel.from_backbone(
        spec.name,
        num_labels=num_labels,
        pretrained=False,
        model_kwargs=dict(spec.kwargs),
        **cgc_options,
    )
    _nonzero_zero_linears(model.backbone)
    return model


def tiny_hf_backbone(model_type: str, num_labels: int = NUM_LABELS) -> nn.Module:
    """A random-init transformers image classifier ``HF_TINY[model_type]`` (no download)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    spec = HF_TINY[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(spec.name, num_labels=num_labels, **spec.kwargs)
    model = AutoModelForImageClassification.from_config(config)
    # transformers draws EfficientNet's BatchNorm scales from N(0, 0.02) like its convolutions,
    # so a random-init model's activations vanish (~1e-35 logits); use the usual scale of 1.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
    return model


def tiny_hf(model_type: str, num_labels: int = NUM_LABELS, **cgc_options: Any) -> CGCModel:
    """A :class:`CGCModel` over the instance :func:`tiny_hf_backbone` builds."""
    model = CGCModel.from_backbone(tiny_hf_backbone(model_type, num_labels), **cgc_options)
    _nonzero_zero_linears(model.backbone)
    return model


ARCHITECTURES = [("timm", k) for k in TIMM_TINY] + [("transformers", k) for k in HF_TINY]
"""Every (library, key) pair; use ``ids=arch_id`` when parametrizing over it."""


def arch_id(arch: tuple[str, str]) -> str:
    return f"{'hf' if arch[0] == 'transformers' else arch[0]}-{arch[1]}"


def tiny(arch: tuple[str, str], **cgc_options: Any) -> tuple[CGCModel, TinySpec]:
    """The model and spec of one ``(library, key)`` pair of :data:`ARCHITECTURES`."""
    library, key = arch
    if library == "timm":
        return tiny_timm(key, **cgc_options), TIMM_TINY[key]
    return tiny_hf(key, **cgc_options), HF_TINY[key]


def images(spec: TinySpec, batch: int = 2, seed: int = 0) -> Tensor:
    """Random images ``(batch, 3, S, S)`` at the spec's size, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, spec.image_size, spec.image_size, generator=g)


def calibrate_batchnorm(model: nn.Module, spec: TinySpec, batches: int = 4) -> None:
    """Estimate a backbone's BatchNorm running statistics from random batches, as training does.

    A fresh model's statistics (mean 0, variance 1) leave eval-mode activations unnormalised;
    LeViT's then shrink to ~1e-5 and its heatmaps are flat below any normalisation epsilon.
    The model's train/eval mode is restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(images(spec, batch=8, seed=100 + i))
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


class FlipNet(nn.Module):
    """A timm-like CNN whose heatmaps commute exactly with a horizontal flip.

    Stride-1 convolutions with left-right symmetric kernels commute with the flip; a global
    average pool makes the logits flip-invariant, so the class, the gradients and the heatmap
    all mirror with the image.

    Args:
        num_classes: outputs.
        width: channels of both convolutions.
        head: ``"linear"`` (GAP + Linear: the closed-form CAM path) or ``"mlp"`` (GAP + MLP:
            the autograd path).
    """

    def __init__(self, num_classes: int = NUM_LABELS, width: int = 8, head: str = "linear"):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = width
        self.pretrained_cfg = {
            "architecture": f"flipnet_{head}",
            "input_size": (3, 16, 16),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        }
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pre_logits = (
            nn.Identity() if head == "linear" else nn.Sequential(nn.Linear(width, width), nn.ReLU())
        )
        self.fc = nn.Linear(width, num_classes)
        with torch.no_grad():
            for conv in (self.stem, self.conv):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)  # w(i, j) = w(i, -j)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.act(self.conv(self.act(self.stem(x))))  # (B, width, H, W)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pre_logits(x.mean((2, 3))))  # (B, K)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


@pytest.fixture
def tiny_resnet() -> CGCModel:
    """Tiny timm ResNet-18 (GAP + linear head) at 64 px."""
    return tiny_timm("resnet")


@pytest.fixture
def tiny_vit() -> CGCModel:
    """Tiny class-token timm ViT at 32 px, patch 8."""
    return tiny_timm("vit_token")


# ---------------------------------------------------------------------------------- training
TRAIN_SIZE = 32
"""Side of the images of the training tests."""


def tiny_model(seed: int = 0, size: int = TRAIN_SIZE, **cgc_options: Any) -> CGCModel:
    """timm's ``test_resnet`` with 3 classes at ``size`` px: a CGC training step in ~10 ms."""
    torch.manual_seed(seed)
    return CGCModel.from_backbone(
        "test_resnet", num_labels=NUM_LABELS, pretrained=False, input_size=size, **cgc_options
    )


def reset_accelerate() -> None:
    """Forget the process-wide state of the last Accelerator, so the next one starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """Each trainer builds an Accelerator; its process-wide state must not leak between tests."""
    yield
    reset_accelerate()


def run_script(script: str | Path, *argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``python <script> argv...`` from the repository root, offline, as a user would."""
    command = [sys.executable, str(script), *argv]
    return subprocess.run(
        command, capture_output=True, text=True, env=OFFLINE_ENV, timeout=timeout, cwd=ROOT
    )


def load_script(path: str | Path, name: str) -> Any:
    """Import the script at ``path`` as the module ``name``, to call its functions in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str) -> Any:
    """Import ``recipes/<name>.py`` as a module, to call its ``main(argv)`` in-process."""
    return load_script(ROOT / "recipes" / f"{name}.py", f"cgc_recipe_{name}")


def load_benchmark(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` as a module, to test its functions without running it."""
    return load_script(ROOT / "benchmarks" / f"{name}.py", f"cgc_benchmark_{name}")


class FakeHfApi:
    """Stand-in for ``huggingface_hub.HfApi`` that records calls and the uploaded files.

    Patch it in with ``monkeypatch.setattr(cgc_hf.hub, "HfApi", FakeHfApi)`` and clear
    :attr:`instances` first; each client the code under test makes is appended there.
    """

    instances: list[FakeHfApi] = []

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}
        FakeHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        repo_id = kwargs["repo_id"]
        return type("RepoUrl", (str,), {"repo_id": repo_id})("https://hf.co/" + repo_id)

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.files = {p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()}
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/123"


class NoiseImages(torch.utils.data.Dataset):
    """``n`` seeded random images at ``TRAIN_SIZE`` px with labels ``i % 3``."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, TRAIN_SIZE, TRAIN_SIZE, generator=g)
        self.y = torch.arange(n) % NUM_LABELS

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class Stop(Exception):
    """Raised by :func:`tiny_trainer`'s ``stop_at``: the run is interrupted there."""


def tiny_args(out: str | Path, **options: Any):
    """The training arguments of the tiny runs: output in ``out``, batches of 4, no figures,
    seed 3; ``options`` override them."""
    from cgc_hf import CGCTrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        figure_images=0,
        seed=3,
    )
    return CGCTrainingArguments(**{**base, **options})


def stop_after(trainer: Any, step: int | None) -> None:
    """Make ``trainer`` raise :class:`Stop` after optimizer step ``step`` (as a kill would stop
    the run there); ``None`` leaves it as it is."""
    if step is None:
        return

    def step_end() -> None:
        if trainer.state.global_step == step:
            raise Stop

    trainer._step_end = step_end


def launch_env(rank: int, world: int, port: int | None = None, **extra: str) -> None:
    """Set what ``accelerate launch --cpu --num_processes WORLD`` sets in process ``rank``
    (``port``: the rendezvous port), plus ``extra`` variables."""
    port_env = {} if port is None else {"MASTER_PORT": str(port)}
    os.environ.update(
        ACCELERATE_USE_CPU="true",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        **port_env,
        **extra,
    )


def layernorm_vit() -> CGCModel:
    """The tiny ViT of the multi-process tests, with the same weights in every process. It has
    LayerNorm only (no BatchNorm), so a process's forward on its rows equals the full batch's."""
    torch.manual_seed(0)
    return CGCModel.from_backbone(
        "test_vit",
        num_labels=3,
        pretrained=False,
        model_kwargs={"img_size": 32, "patch_size": 8},
        temperature=0.5,
    )


def step_inputs(batch: int) -> tuple[Tensor, Tensor, Any]:
    """Seeded images ``(N, 3, 32, 32)``, labels ``(N,)`` and crop/flips for one CGC step."""
    from cgc_hf import sample_crop_flip

    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 3, 32, 32, generator=g)  # (N, 3, 32, 32)
    y = torch.randint(0, 3, (batch,), generator=g)  # (N,)
    return x, y, sample_crop_flip(batch, generator=g)


class RandomItems(torch.utils.data.Dataset):
    """``n`` random 32 px images labelled ``i % 3``, each flipped at random by the global RNG,
    as a transform would (so a resumed run must restore that RNG too)."""

    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]
        return {"pixel_values": x, "labels": torch.tensor(i % 3)}


def resnet_run(
    out: str | Path,
    stop_at: int | None = None,
    resume: str | None = None,
    on_trainer: Any = None,
    **options: Any,
) -> CGCModel:
    """Train ``test_resnet`` for 6 steps (a checkpoint every 2) on 10 labeled and 7 unlabeled
    :class:`RandomItems`; ``stop_at`` interrupts it (:func:`stop_after`), ``on_trainer`` sees
    the trainer before training, ``options`` override the arguments. Returns the model."""
    from cgc_hf import CGCTrainer

    torch.manual_seed(0)
    model = CGCModel.from_backbone("test_resnet", num_labels=3, pretrained=False, input_size=32)
    base = dict(unlabeled_batch_size=3, max_train_steps=6, checkpointing_steps=2)
    args = tiny_args(out, resume_from_checkpoint=resume, **{**base, **options})
    trainer = CGCTrainer(model, args, RandomItems(10, 0), unlabeled_dataset=RandomItems(7, 1))
    if on_trainer is not None:
        on_trainer(trainer)
    stop_after(trainer, stop_at)
    trainer.train()
    return model


def tiny_trainer(
    out: str | Path,
    model: CGCModel | None = None,
    stop_at: int | None = None,
    unlabeled: bool = True,
    run_info: dict[str, Any] | None = None,
    **options: Any,
):
    """A :class:`CGCTrainer` of :func:`tiny_model` on noise images: 8 labeled (+ 6 unlabeled), 4
    eval, :func:`tiny_args` with 6 steps and a checkpoint every 2; ``options`` override the
    training arguments. With ``stop_at`` the run raises :class:`Stop` after that optimizer step
    (as a kill would stop it)."""
    from cgc_hf import CGCTrainer

    trainer = CGCTrainer(
        model or tiny_model(),
        tiny_args(out, **{"max_train_steps": 6, "checkpointing_steps": 2, **options}),
        NoiseImages(8),
        NoiseImages(4, 1),
        unlabeled_dataset=NoiseImages(6, 2) if unlabeled else None,
        run_info=run_info,
    )
    stop_after(trainer, stop_at)
    return trainer


# --------------------------------------------------------------------------------- Hub cache
def fake_snapshot(
    cache: Path, repo_id: str, source: Path, commit: str = "a" * 40, ref: str | None = "main"
) -> Path:
    """Lay ``source`` out as huggingface_hub's cache holds a downloaded snapshot.

    ``ref`` (a branch) points at ``commit``; ``None`` keeps the commit reachable by hash only,
    like an older revision of the repository.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    shutil.copytree(source, snap)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap
