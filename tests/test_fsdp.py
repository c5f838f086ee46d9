"""FSDP2 (Accelerate's FSDP plugin) with two CPU processes (gloo): the CGC step, checkpoints, the
saved model, and the refusals.

Accelerate 1.15 turns ``ACCELERATE_USE_FSDP`` into FSDP only on an accelerator (``state.py``
sets ``DistributedType.FSDP`` for ``MULTI_GPU`` and its kin, never for ``MULTI_CPU``), so the
multi-process tests lift that gate after the trainer's Accelerator is built (:func:`_on_cpu`):
from there on every call (``prepare``, ``save_state``, ``load_state``, ``get_state_dict``,
``clip_grad_norm_``) is Accelerate's own FSDP2 code, on gloo.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import (
    NoiseImages,
    Stop,
    launch_env,
    layernorm_vit,
    reset_accelerate,
    step_inputs,
    stop_after,
    tiny_args,
)

from cgc_hf import CGCModel, CropFlip, sample_crop_flip
from cgc_hf.distributed import all_gather_rows
from cgc_hf.errors import CGCValueError
from cgc_hf.training import fsdp

WORLD = 2
BATCH = 8  # full batch of the step comparison; each process holds BATCH // WORLD rows
STEPS = 4
FSDP_ENV = dict(
    ACCELERATE_USE_FSDP="true",
    FSDP_VERSION="2",
    FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
    FSDP_TRANSFORMER_CLS_TO_WRAP="Block",  # every ViT block would be its own unit
    FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT",
)


def _lift_gate(acc, **plugin) -> None:
    """Make ``acc`` an FSDP accelerator on the CPU, as Accelerate does on a GPU (``state.py``);
    ``plugin`` options override the ``FSDP_*`` environment."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _on_cpu(make_accelerator):
    """``make_accelerator``, with Accelerate's accelerator-only FSDP gate lifted (see above)."""

    def make(args, output_dir):
        acc = make_accelerator(args, output_dir)
        if os.environ.get("ACCELERATE_USE_FSDP") == "true":
            _lift_gate(acc)
        return acc

    return make


def _train(out: Path, port: int, use_fsdp: bool, stop_at: int | None = None, **options) -> dict:
    """One tiny trainer run under Accelerate (FSDP or DDP): its metrics, and the weights the
    processes hold after the last step (gathered from the shards under FSDP)."""
    from cgc_hf import CGCTrainer

    reset_accelerate()
    os.environ.update(MASTER_PORT=str(port), ACCELERATE_USE_FSDP=str(use_fsdp).lower())
    model = layernorm_vit()
    args = tiny_args(
        out, per_device_train_batch_size=2, max_train_steps=STEPS, learning_rate=1e-3, **options
    )
    trainer = CGCTrainer(model, args, NoiseImages(8), NoiseImages(4, 1), NoiseImages(6, 2))
    live = {}

    def record() -> None:  # every process, after the last step
        if trainer.state.global_step == STEPS:
            for name, p in trainer.model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                live[name] = full.detach().clone()

    trainer._step_end = record
    stop_after(trainer, stop_at)
    try:
        metrics = trainer.train()
    except Stop:
        trainer.accelerator.end_training()
        return {}
    sharded = type(trainer.model).__name__.startswith("FSDP")
    return {"metrics": metrics, "weights": live, "sharded": sharded}


def _worker(rank: int, port: int, out: str) -> None:
    import cgc_hf.training.loop as loop

    torch.set_num_threads(1)
    launch_env(rank, WORLD, **FSDP_ENV)
    loop.make_accelerator = _on_cpu(loop.make_accelerator)
    root, result = Path(out), {}
    # (a) one CGC step of a sharded model on half the batch each, fixed geometry.
    result["step"] = _step(rank, port)
    del os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"]  # transformers: the model's own classes
    result["step_hf"] = _step(rank, port + 8, _hf_vit)
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = FSDP_ENV["FSDP_TRANSFORMER_CLS_TO_WRAP"]
    result["resnet"] = _closed_form_step(rank, port + 9)
    result["evaluation"] = _evaluation(rank, port + 12)
    # (b) the trainer: FSDP against DDP, and FSDP stopped after step 2 and resumed.
    checkpoints = dict(checkpointing_steps=2)
    result["fsdp"] = _train(root / "fsdp", port + 1, True, **checkpoints)
    result["ddp"] = _train(root / "ddp", port + 2, False)
    accumulate = dict(gradient_accumulation_steps=2)  # FSDP2 skips the reduction in between
    result["fsdp_accumulate"] = _train(root / "fsdp_accumulate", port + 10, True, **accumulate)
    result["ddp_accumulate"] = _train(root / "ddp_accumulate", port + 11, False, **accumulate)
    for i, kind in enumerate(("SHARDED_STATE_DICT", "FULL_STATE_DICT")):
        os.environ["FSDP_STATE_DICT_TYPE"] = kind
        folder, again = root / kind, dict(resume_from_checkpoint="latest", **checkpoints)
        _train(folder, port + 3 + 2 * i, True, stop_at=2, **checkpoints)
        result[kind] = _train(folder, port + 4 + 2 * i, True, **again)
    if rank == 0:
        torch.save(result, root / "result.pt")


def _hf_vit() -> CGCModel:
    from conftest import tiny_hf

    torch.manual_seed(0)
    return tiny_hf("vit")  # transformers ViT: units from its _no_split_modules (ViTLayer)


def _step(rank: int, port: int, build=layernorm_vit, **plugin) -> dict:
    from accelerate import Accelerator

    reset_accelerate()
    os.environ["MASTER_PORT"] = str(port)
    acc = Accelerator(cpu=True)
    _lift_gate(acc, **plugin)
    model = build()
    model.set_negative_gather(all_gather_rows)
    model.train()
    fsdp.shard_model(model, tiny_args("unused"), acc)
    units = sorted(n for n, m in model.named_modules() if type(m).__name__.startswith("FSDP"))
    x, y, geometry = step_inputs(BATCH)
    b = BATCH // WORLD
    sl = slice(rank * b, (rank + 1) * b)
    out = model(x[sl], labels=y[sl], geometry=CropFlip(geometry.boxes[sl], geometry.flip[sl]))
    out["loss"].backward()
    losses = acc.gather(out["loss"].detach().reshape(1))  # (WORLD,)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    acc.end_training()
    return {"losses": losses, "grads": grads, "units": units}


def _masked_images() -> list[dict]:
    """4 images with masks; the labels are the initial ViT's predictions except for image 3, so
    one process's rows all agree with their label and the other's do not."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 32, 32, generator=g)  # (4, 3, 32, 32)
    masks = torch.rand(4, 32, 32, generator=g) > 0.5  # (4, 32, 32)
    with torch.no_grad():
        labels = layernorm_vit().eval()(x)["logits"].argmax(1)  # (4,)
    labels[3] = (labels[3] + 1) % 3
    return [{"pixel_values": x[i], "labels": labels[i], "mask": masks[i]} for i in range(4)]


def _evaluation(rank: int, port: int) -> dict:
    """cgc_hf.evaluation.evaluate of the sharded ViT on :func:`_masked_images`."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from cgc_hf.evaluation import evaluate

    reset_accelerate()
    os.environ["MASTER_PORT"] = str(port)
    acc = Accelerator(cpu=True)
    _lift_gate(acc)
    model = layernorm_vit()
    fsdp.shard_model(model, tiny_args("unused"), acc)
    loader = acc.prepare(DataLoader(_masked_images(), batch_size=2))
    result = evaluate(model, loader, acc, seed=3).per_image
    acc.end_training()
    return result


def _closed_form_step(rank: int, port: int) -> dict:
    """A ResNet (closed-form heatmap, BatchNorm) step: FSDP and DDP on the same local rows."""
    import copy

    from accelerate import Accelerator
    from conftest import tiny_timm
    from torch.nn.parallel import DistributedDataParallel

    reset_accelerate()
    os.environ["MASTER_PORT"] = str(port)
    acc = Accelerator(cpu=True)
    _lift_gate(
        acc, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["BasicBlock"]
    )
    model = tiny_timm("resnet", temperature=0.5)
    model.set_negative_gather(all_gather_rows)
    model.train()
    reference = DistributedDataParallel(copy.deepcopy(model))
    fsdp.shard_model(model, tiny_args("unused"), acc)
    units = sorted(n for n, m in model.named_modules() if type(m).__name__.startswith("FSDP"))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(4, 3, 64, 64, generator=g)  # (b, 3, 64, 64): this process's rows
    y = torch.randint(0, 3, (4,), generator=g)
    geometry = sample_crop_flip(4, generator=g)
    out = model(x, labels=y, geometry=geometry)
    out["loss"].backward()
    want = reference(x, labels=y, geometry=geometry)
    want["loss"].backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    ddp = {n.removeprefix("module."): p.grad for n, p in reference.named_parameters()}
    acc.end_training()
    return {
        "closed_form": model.target.linear_head is not None,
        "units": units,
        "loss": (out["loss"].detach(), want["loss"].detach()),
        "grads": grads,
        "ddp_grads": {n: ddp[n] for n in grads},
    }


def _spawn(fn, out: Path, timeout: float = 240.0) -> None:
    """``mp.spawn`` of ``WORLD`` processes that fails instead of hanging (a collective that one
    process skips would otherwise wait forever)."""
    import time

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(fn, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {WORLD} FSDP processes did not finish within {timeout:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fsdp")
    _spawn(_worker, out)
    return torch.load(out / "result.pt", weights_only=True), out


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, build, units",
    [
        # The plugin asked for every Block; the last one (the heatmap's) stays in the root unit.
        ("step", layernorm_vit, ["", *(f"backbone.blocks.{i}" for i in range(5))]),
        # transformers: the units come from _no_split_modules; the last ViTLayer stays whole.
        ("step_hf", _hf_vit, ["", "backbone.vit.embeddings", "backbone.vit.layers.0"]),
    ],
)
def test_fsdp_step_equals_one_process_on_the_full_batch(run, key, build, units):
    step = run[0][key]
    assert step["units"] == units
    model = build()
    model.train()
    x, y, geometry = step_inputs(BATCH)
    out = model(x, labels=y, geometry=geometry)
    out["loss"].backward()
    torch.testing.assert_close(step["losses"].mean(), out["loss"].detach())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == step["grads"].keys()
    for name, g in grads.items():  # FSDP reduce-scatters the mean over processes
        torch.testing.assert_close(step["grads"][name], g, atol=1e-6, rtol=1e-4)
    assert out["loss_cgc"] > 0
    first = next(n for n in grads if "attn" in n or "attention" in n)  # in a sharded unit
    assert grads[first].abs().sum() > 0


@pytest.mark.slow
def test_fsdp_closed_form_step_equals_ddp(run):
    step = run[0]["resnet"]
    assert step["closed_form"]  # the heatmap is features x head weights, no autograd.grad
    # Every BasicBlock is its own unit except layer4's, which holds the explained features.
    assert step["units"] == ["", "backbone.layer1.0", "backbone.layer2.0", "backbone.layer3.0"]
    torch.testing.assert_close(*step["loss"])
    assert step["grads"].keys() == step["ddp_grads"].keys() and len(step["grads"]) > 10
    for name, g in step["grads"].items():
        torch.testing.assert_close(g, step["ddp_grads"][name], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["", "_accumulate"])
def test_fsdp_trainer_matches_ddp(run, variant):
    fsdp_run, ddp_run = run[0]["fsdp" + variant], run[0]["ddp" + variant]
    assert fsdp_run["sharded"] and not ddp_run["sharded"]
    fsdp_w = fsdp_run["weights"]
    ddp_w = {k.removeprefix("module."): w for k, w in ddp_run["weights"].items()}
    assert fsdp_w.keys() == ddp_w.keys()
    start = layernorm_vit().state_dict()
    moved, worst = 0.0, 0.0
    for name, w in ddp_w.items():
        update, fsdp_update = w - start[name], fsdp_w[name] - start[name]
        moved = max(moved, update.abs().max().item())
        worst = max(worst, (fsdp_update - update).abs().max().item())
        # Adam divides each update by the gradient's own scale, so where a gradient is near
        # zero the float rounding of the two reductions (reduce-scatter vs all-reduce) moves
        # a weight by up to ~2e-6; the updates themselves are ~1e-3 (learning rate 1e-3).
        torch.testing.assert_close(fsdp_update, update, atol=1e-5, rtol=1e-3)
    assert moved > 1e-3, moved  # the runs trained: the comparison is not of the initial weights
    print(f"FSDP vs DDP{variant}, {STEPS} steps: largest update {moved:.2e}, gap {worst:.2e}")
    m_fsdp, m_ddp = fsdp_run["metrics"], ddp_run["metrics"]
    assert m_fsdp["train_loss"] == pytest.approx(m_ddp["train_loss"], rel=1e-5)
    assert m_fsdp["eval_samples"] == m_ddp["eval_samples"] == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, written", [("SHARDED_STATE_DICT", ".distcp"), ("FULL_STATE_DICT", ".bin")]
)
def test_fsdp_resume_equals_the_uninterrupted_run(run, kind, written):
    result, out = run
    checkpoint = out / kind / "checkpoints" / "step_2"
    assert (checkpoint / "COMPLETE").exists()
    assert any(p.suffix == written for p in checkpoint.rglob("*")), sorted(checkpoint.rglob("*"))
    whole, resumed = result["fsdp"]["weights"], result[kind]["weights"]
    assert whole.keys() == resumed.keys()
    for name, w in whole.items():
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=0)
    assert result[kind]["metrics"]["train_loss"] == result["fsdp"]["metrics"]["train_loss"]


@pytest.mark.slow
def test_fsdp_saved_model_is_a_plain_model(run):
    result, out = run
    loaded = CGCModel.from_pretrained(out / "fsdp" / "model")
    assert type(loaded) is CGCModel
    state = loaded.state_dict()
    for name, w in result["fsdp"]["weights"].items():
        assert not hasattr(state[name], "placements")  # a plain tensor, not a DTensor
        torch.testing.assert_close(state[name], w, rtol=0, atol=0)
    loaded.eval()
    assert loaded(torch.randn(2, 3, 32, 32))["logits"].shape == (2, 3)


def test_heatmap_path_keeps_the_last_block_and_head():
    model = layernorm_vit()
    path = fsdp.heatmap_path(model)
    assert {
        "backbone.blocks.5",
        "backbone.blocks.5.norm1",
        "backbone.norm",
        "backbone.head",
    } <= path
    assert not {"backbone.blocks.4", "backbone.blocks.0.attn", "backbone.patch_embed"} & path


class _FakeAccelerator:
    def __init__(self, **plugin):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.FSDP
        self.state = type("State", (), {"fsdp_plugin": type("Plugin", (), plugin)()})()


@pytest.mark.parametrize(
    "plugin, options, named",
    [
        ({"fsdp_version": 1, "activation_checkpointing": False}, {}, "fsdp_version=1"),
        (
            {"fsdp_version": 2, "activation_checkpointing": True},
            {},
            "fsdp_activation_checkpointing=true",
        ),
        ({"fsdp_version": 2, "activation_checkpointing": False}, {"figure_images": 2}, "figure"),
        (
            {"fsdp_version": 2, "activation_checkpointing": False},
            {"gradient_checkpointing": True},
            "gradient_checkpointing=True",
        ),
        (
            {"fsdp_version": 2, "activation_checkpointing": False},
            {"eval_explanation_images": 8},
            "eval_explanation_images=8",
        ),
        (
            {"fsdp_version": 2, "activation_checkpointing": False},
            {"load_best_model_at_end": True, "metric_for_best_model": "accuracy"},
            "load_best_model_at_end",
        ),
    ],
)
def test_fsdp_refuses_what_it_cannot_run(tmp_path, plugin, options, named):
    acc = _FakeAccelerator(**plugin)
    with pytest.raises(CGCValueError) as err:
        fsdp.check_fsdp(layernorm_vit(), tiny_args(tmp_path, **options), acc)
    message = str(err.value)
    assert named in message and "\n" not in message
    assert "fsdp_version 2" in message or "--" in message or "leave it unset" in message


def test_without_fsdp_nothing_is_sharded(tmp_path):
    from accelerate.utils import DistributedType

    acc = type("Acc", (), {"distributed_type": DistributedType.NO})()
    model = layernorm_vit()
    fsdp.shard_model(model, tiny_args(tmp_path, figure_images=4), acc)
    assert type(model) is CGCModel


def test_fsdp_asked_for_on_cpu_says_it_trains_unsharded(
    tmp_path, monkeypatch, caplog, fresh_accelerate
):
    from conftest import tiny_trainer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    monkeypatch.setenv("FSDP_VERSION", "2")
    with caplog.at_level("WARNING", logger="cgc_hf.training.accelerator"):
        trainer = tiny_trainer(tmp_path, max_train_steps=1, checkpointing_steps=None)
    (line,) = [r.getMessage() for r in caplog.records if "FSDP" in r.getMessage()]
    assert "only on an accelerator" in line and "whole model" in line
    assert type(trainer.accelerator.unwrap_model(trainer.model)) is CGCModel  # not sharded


def _recipe_worker(rank: int, port: int, out: str) -> None:
    """``recipes/finetune.py --push_to_hub`` in one of two FSDP processes (size-based units)."""
    from conftest import FakeHfApi, load_recipe

    import cgc_hf.training.loop as loop
    from cgc_hf import hub

    torch.set_num_threads(1)
    size_based = {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP", "FSDP_MIN_NUM_PARAMS": "1000"}
    launch_env(rank, WORLD, port, **{**FSDP_ENV, **size_based})
    loop.make_accelerator = _on_cpu(loop.make_accelerator)
    hub.HfApi = FakeHfApi
    load_recipe("finetune").main(
        [
            "--model", "test_resnet", "--no_pretrained", "--image_size", "32",
            "--synthetic_kwargs", '{"num_classes": 3, "train_size": 24, "eval_size": 6}',
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6",
            "--figure_images", "0", "--max_train_steps", "2", "--output_dir", f"{out}/run",
            "--push_to_hub", "--hub_model_id", "user/tiny-fsdp",
        ]
    )  # fmt: skip
    if rank == 0:
        (api,) = FakeHfApi.instances
        pushed = Path(out) / "pushed"
        pushed.mkdir()
        for name, data in api.files.items():
            (pushed / name).write_bytes(data)


@pytest.mark.slow
def test_fsdp_recipe_saves_and_pushes_the_gathered_model(tmp_path):
    _spawn(_recipe_worker, tmp_path)
    saved = CGCModel.from_pretrained(tmp_path / "run" / "model")
    pushed = CGCModel.from_pretrained(tmp_path / "pushed")
    assert saved.target.linear_head is None  # test_resnet: an autograd heatmap (layer3)
    for name, w in saved.state_dict().items():
        assert not hasattr(w, "placements")  # whole tensors, not DTensor shards
        torch.testing.assert_close(pushed.state_dict()[name], w, rtol=0, atol=0)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["train_steps"] == 2


def test_trainer_refuses_before_it_writes_anything(tmp_path, monkeypatch, fresh_accelerate):
    """The default figure_images=4 under FSDP: one line, before a run folder exists."""
    from conftest import tiny_trainer

    import cgc_hf.training.loop as loop

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setattr(loop, "make_accelerator", _on_cpu(loop.make_accelerator))
    out = tmp_path / "run"
    with pytest.raises(CGCValueError, match=r"figure_images=4: .*pass --figure_images 0"):
        tiny_trainer(out, model=layernorm_vit(), figure_images=4)
    assert not out.exists()


@pytest.mark.slow
def test_fsdp_evaluation_equals_one_process(run):
    """Content Heatmap re-explains the rows whose label is not the prediction: under FSDP every
    process must still run the same passes (here one process has no such row)."""
    from torch.utils.data import DataLoader

    from cgc_hf.evaluation import evaluate

    sharded = run[0]["evaluation"]
    reference = evaluate(layernorm_vit(), DataLoader(_masked_images(), batch_size=2), None, seed=3)
    assert sharded.keys() == reference.per_image.keys() and "content_heatmap" in sharded
    for key, values in reference.per_image.items():
        torch.testing.assert_close(sharded[key], values, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert reference.per_image["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.0]
