"""CGCTrainer: argument checks, data wiring, non-finite steps, output dirs, exact resume."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import TRAIN_SIZE as SIZE
from conftest import reset_accelerate, tiny_args, tiny_model

from cgc_hf import CGCError, CGCModel, CGCTrainingArguments, CGCValueError
from cgc_hf.sampling import EpochSampler
from cgc_hf.training import COMPLETE, CGCTrainer, complete_checkpoints, latest_checkpoint

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


class Tiny(torch.utils.data.Dataset):
    """Random images whose first pixel encodes the item id; a random flip from the global RNGs."""

    def __init__(
        self,
        n: int,
        seed: int = 0,
        offset: int = 0,
        mask: bool = False,
        nan_ids: tuple[int, ...] = (),
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, SIZE, SIZE, generator=g)
        self.x[:, 0, 0, 0] = torch.arange(n) + offset  # id, unchanged by a horizontal flip
        self.x[:, 0, 0, -1] = torch.arange(n) + offset
        for i in nan_ids:
            self.x[i, 1] = float("nan")
        self.y = torch.arange(n) % 3
        self.mask = mask

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.x[i]
        if torch.rand(()) < 0.5 and random.random() < 0.9:  # augmentation from two RNGs
            x = x.flip(-1)
        item = {"pixel_values": x, "labels": self.y[i]}
        if self.mask:
            m = torch.zeros(SIZE, SIZE)
            m[8:24, 8:24] = 1
            item["mask"] = m
        return item


def args_for(tmp_path, **kw) -> CGCTrainingArguments:
    return tiny_args(tmp_path / "run", **{"logging_steps": 1, **kw})


# ---------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("per_device_train_batch_size", 0),
        ("learning_rate", 0.0),
        ("head_learning_rate", -1.0),
        ("optim", "adam"),
        ("lr_scheduler_type", "polynomial-ish"),
        ("mixed_precision", "fp8"),
        ("gradient_accumulation_steps", 0),
        ("warmup_ratio", 1.5),
        ("checkpointing_steps", "sometimes"),
        ("report_to", "no-such-tracker"),
        ("max_nonfinite_steps", 0),
        ("eval_insertion_steps", -1),
    ],
)
def test_bad_argument_names_argument_and_value(tmp_path, name, value):
    with pytest.raises(CGCValueError) as err:
        CGCTrainingArguments(output_dir=str(tmp_path), **{name: value})
    assert name in str(err.value) and repr(value) in str(err.value)


def test_argument_defaults_and_conversions(tmp_path):
    args = CGCTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        checkpointing_steps="7",
        max_grad_norm=0,
    )
    assert args.unlabeled_batch_size == 8  # defaults to the train batch size
    assert args.checkpointing_steps == 7  # a CLI string becomes a step count
    assert args.max_grad_norm is None  # 0 disables clipping
    assert args.trackers is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 works on a GPU")
def test_fp16_on_cpu_says_what_works(tmp_path):
    with pytest.raises(CGCValueError, match="bf16"):
        CGCTrainingArguments(output_dir=str(tmp_path), mixed_precision="fp16")


def test_resume_and_overwrite_together_refused(tmp_path):
    with pytest.raises(CGCValueError, match="resume_from_checkpoint"):
        CGCTrainingArguments(
            output_dir=str(tmp_path), overwrite_output_dir=True, resume_from_checkpoint="latest"
        )


def test_batch_size_one_refused_for_cgc_only(tmp_path):
    args = args_for(tmp_path, per_device_train_batch_size=1)
    with pytest.raises(CGCValueError, match="per_device_train_batch_size=1"):
        CGCTrainer(tiny_model(), args, Tiny(4))
    CGCTrainer(tiny_model(cgc_lambda=0.0), args, Tiny(4))  # plain fine-tuning: fine
    CGCTrainer(tiny_model(), args, Tiny(4), unlabeled_dataset=Tiny(4))  # negatives from pool


def test_head_learning_rate_and_decay_groups(tmp_path):
    model = tiny_model()
    args = args_for(tmp_path, learning_rate=1e-3, head_learning_rate=5e-2, weight_decay=0.1)
    trainer = CGCTrainer(model, args, Tiny(8))
    head = {id(p) for p in model.backbone.fc.parameters()}
    seen = 0
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            seen += 1
            assert group["initial_lr"] == (5e-2 if id(p) in head else 1e-3)
            assert group["weight_decay"] == (0.1 if p.ndim > 1 else 0.0)
    assert seen == sum(1 for _ in model.parameters())


# ---------------------------------------------------------------------------------- data order
def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b) and sorted(i for _, i in first) == list(range(10))
    a.set_epoch(4)
    assert [i for _, i in a] != [i for _, i in first]
    shards = [list(EpochSampler(10, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert {i for s in shards for _, i in s} == set(range(10)) and len(
        {len(s) for s in shards}
    ) == 1


def _record_batches(model: CGCModel) -> list[tuple[list[int], list[int]]]:
    """Record (ids, labels) of every training forward."""
    calls: list[tuple[list[int], list[int]]] = []

    def hook(module, args, kwargs):
        if module.training:
            ids = args[0][:, 0, 0, 0].round().long().tolist()
            calls.append((ids, kwargs["labels"].tolist()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_labeled_and_unlabeled_batches_are_concatenated_and_cycled(tmp_path):
    model = tiny_model()
    calls = _record_batches(model)
    labeled, pool = Tiny(8), Tiny(5, seed=1, offset=100)
    args = args_for(tmp_path, num_train_epochs=3, unlabeled_batch_size=2)
    CGCTrainer(model, args, labeled, unlabeled_dataset=pool).train()
    assert len(calls) == 6  # 3 epochs x 2 labeled batches: an epoch is a pass over labels
    for epoch in range(3):
        ids = [i for c in calls[2 * epoch : 2 * epoch + 2] for i in c[0] if i < 100]
        assert sorted(ids) == list(range(8))  # every labeled image once per epoch
    for ids, labels in calls:
        assert len(ids) == 6
        assert labels[:4] == [i % 3 for i in ids[:4]]  # labeled rows keep their labels
        assert all(i >= 100 for i in ids[4:]) and labels[4:] == [-100, -100]
    # The pool of 5 gives 2 full batches per pass (drop_last); it restarts independently.
    pool_ids = [c[0][4:] for c in calls]
    for k in range(0, 6, 2):
        assert len(set(pool_ids[k] + pool_ids[k + 1])) == 4


def test_no_unlabeled_rows_without_pool(tmp_path):
    model = tiny_model()
    calls = _record_batches(model)
    CGCTrainer(model, args_for(tmp_path, max_train_steps=2), Tiny(8)).train()
    assert all(-100 not in labels for _, labels in calls)


# ---------------------------------------------------------------------------------- metrics
def test_evaluate_matches_a_plain_loop_and_restores_mode(tmp_path):
    model = tiny_model()
    eval_ds = Tiny(10, seed=5, mask=True)
    trainer = CGCTrainer(model, args_for(tmp_path), Tiny(8), eval_ds)
    model.train()
    metrics = trainer.evaluate()
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        pred = model(eval_ds.x)["logits"].argmax(1)
    assert metrics["eval_accuracy"] == pytest.approx(100.0 * (pred == eval_ds.y).float().mean())
    assert metrics["eval_samples"] == 10
    assert {"eval_consistency", "eval_content_heatmap", "eval_pointing_game"} <= set(metrics)


def test_explanation_metrics_on_a_fixed_subset_of_the_eval_split(tmp_path):
    from cgc_hf import evaluate

    model = tiny_model()
    tiny = Tiny(10, seed=5, mask=True)
    eval_ds = [tiny[i] for i in range(len(tiny))]  # drawn once: the same flips every read
    args = args_for(tmp_path, eval_explanation_images=4)
    trainer = CGCTrainer(model, args, Tiny(8), eval_ds)
    metrics = trainer.evaluate()
    loader = torch.utils.data.DataLoader(eval_ds, batch_size=3)
    first = evaluate(model.eval(), loader, seed=args.seed, explain_images=4).scalars()
    assert metrics == pytest.approx(first)
    whole = evaluate(model, loader, seed=args.seed).scalars()
    assert metrics["eval_accuracy"] == whole["eval_accuracy"] and metrics["eval_samples"] == 10
    assert metrics["eval_consistency"] != pytest.approx(whole["eval_consistency"])
    with pytest.raises(CGCValueError, match="eval_explanation_images must be a positive"):
        args_for(tmp_path, eval_explanation_images=0)


# ---------------------------------------------------------------------------------- non-finite
def test_nonfinite_batch_is_skipped_and_counted(tmp_path):
    model = tiny_model()
    # One NaN image among 8, batches of 4: exactly one bad step per epoch.
    args = args_for(tmp_path, num_train_epochs=2, max_nonfinite_steps=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = CGCTrainer(model, args, Tiny(8, nan_ids=(5,)), Tiny(4, seed=2)).train()
    assert metrics["nonfinite_steps"] == 2
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # good steps trained


def test_nonfinite_in_a_row_stops_with_checkpoint_path(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = args_for(tmp_path, max_train_steps=10, max_nonfinite_steps=2)
    trainer = CGCTrainer(model, args, Tiny(8, nan_ids=tuple(range(8))))
    with pytest.raises(CGCError) as err:
        trainer.train()
    ckpt = latest_checkpoint(args.output_dir)
    assert ckpt is not None and str(ckpt) in str(err.value)
    assert "2 optimizer steps in a row" in str(err.value)
    state = json.loads((ckpt / COMPLETE).read_text())
    assert state["nonfinite_total"] == 2
    for k, v in model.state_dict().items():  # no update and BatchNorm statistics restored
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------- output dir
class Interrupt(Exception):
    pass


def test_finished_run_is_refused_unless_overwrite(tmp_path):
    args = args_for(tmp_path, max_train_steps=1, checkpointing_steps=1)
    CGCTrainer(tiny_model(), args, Tiny(8)).train()
    out = tmp_path / "run"
    assert "final" in json.loads((out / "metrics.json").read_text())
    assert (out / "model" / "model.safetensors").exists()
    with pytest.raises(CGCValueError, match="overwrite_output_dir"):
        CGCTrainer(tiny_model(), args, Tiny(8))
    stale = out / "checkpoints" / "step_1"
    assert stale.exists()
    args2 = args_for(tmp_path, max_train_steps=1, overwrite_output_dir=True)
    CGCTrainer(tiny_model(), args2, Tiny(8))
    assert not stale.exists()  # the old run is gone: never mixed with the new one


def test_unfinished_run_needs_resume_or_overwrite(tmp_path):
    args = args_for(tmp_path, max_train_steps=4, checkpointing_steps=1)
    trainer = CGCTrainer(tiny_model(), args, Tiny(8))

    def stop():
        if trainer.state.global_step == 2:
            raise Interrupt

    trainer._step_end = stop
    with pytest.raises(Interrupt):
        trainer.train()  # a run with checkpoints, and no final metrics
    with pytest.raises(CGCValueError, match="resume_from_checkpoint"):
        CGCTrainer(tiny_model(), args_for(tmp_path), Tiny(8))


# ---------------------------------------------------------------------------------- resume
def _run(tmp_path, name, kill_at=None, resume=None):
    model = tiny_model(seed=0)
    args = args_for(
        tmp_path,
        output_dir=str(tmp_path / name),
        max_train_steps=8,
        checkpointing_steps=2,
        unlabeled_batch_size=3,
        eval_steps=4,
        resume_from_checkpoint=resume,
        gradient_accumulation_steps=1,
    )
    trainer = CGCTrainer(
        model,
        args,
        Tiny(10),
        Tiny(6, seed=7, mask=True),
        unlabeled_dataset=Tiny(7, seed=1, offset=100),
    )
    if kill_at is not None:

        def step_end():
            if trainer.state.global_step == kill_at:
                raise Interrupt

        trainer._step_end = step_end
    return model, trainer.train()


def test_killed_run_resumes_to_identical_weights_and_metrics(tmp_path):
    ref_model, ref_metrics = _run(tmp_path, "ref")
    # Epochs of 3 batches; checkpoints at steps 2 and 4 (both mid-epoch); killed at step 5.
    with pytest.raises(Interrupt):
        _run(tmp_path, "cut", kill_at=5)
    out = tmp_path / "cut"
    assert [p.name for p in complete_checkpoints(out)] == ["step_2", "step_4"]
    # A checkpoint interrupted while saving (no COMPLETE marker) must be ignored.
    (out / "checkpoints" / "step_99").mkdir()
    (out / "checkpoints" / ".tmp-step_6").mkdir()
    assert latest_checkpoint(out).name == "step_4"
    model, metrics = _run(tmp_path, "cut", resume="latest")
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k
    for k in ref_metrics:
        if k != "train_runtime" and k != "train_loss":
            assert ref_metrics[k] == metrics[k] or (
                math.isnan(ref_metrics[k]) and math.isnan(metrics[k])
            ), k
    ref_evals = json.loads((tmp_path / "ref" / "metrics.json").read_text())["evaluations"]
    evals = json.loads((out / "metrics.json").read_text())["evaluations"]
    assert evals == ref_evals  # the history is not duplicated by the resumed steps
    assert not (out / "checkpoints" / ".tmp-step_6").exists()  # partial save cleaned up


def test_checkpoints_total_limit_keeps_newest(tmp_path):
    args = args_for(tmp_path, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2)
    CGCTrainer(tiny_model(), args, Tiny(8)).train()
    assert [p.name for p in complete_checkpoints(args.output_dir)] == ["step_3", "step_4"]


def test_resume_from_incomplete_path_is_an_error(tmp_path):
    bad = tmp_path / "half"
    bad.mkdir()
    args = args_for(tmp_path, resume_from_checkpoint=str(bad))
    trainer = CGCTrainer(tiny_model(), args, Tiny(8))
    with pytest.raises(CGCError, match="COMPLETE"):
        trainer.train()


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path):
    import errno

    from cgc_hf import CheckpointError

    args = args_for(tmp_path, max_train_steps=4, checkpointing_steps=2)
    trainer = CGCTrainer(tiny_model(), args, Tiny(8))
    real_save = trainer.accelerator.save_state

    def save_state(output_dir, **kw):
        if output_dir.endswith("step_4"):
            real_save(output_dir, **kw)  # half the files are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(output_dir, **kw)

    trainer.accelerator.save_state = save_state
    with pytest.raises(CheckpointError) as err:
        trainer.train()
    out = tmp_path / "run"
    assert "step_2" in str(err.value) and "No space left" in str(err.value)
    assert [p.name for p in complete_checkpoints(out)] == ["step_2"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # no debris
    assert json.loads((out / "checkpoints" / "step_2" / COMPLETE).read_text())["global_step"] == 2


def test_cgc_warmup_ramps_the_cgc_weight_linearly(tmp_path):
    model = tiny_model(cgc_lambda=0.5)
    args = args_for(tmp_path, max_train_steps=4, cgc_warmup_steps=4)
    trainer = CGCTrainer(model, args, Tiny(16), None)
    seen = []

    def spy(module, args, kwargs, out):  # the loss the trainer's backward sees, and its parts
        if module.training:
            step = trainer.state.global_step
            seen.append((step, out["loss_ce"].item(), out["loss_cgc"].item(), out["loss"].item()))

    model.register_forward_hook(spy, with_kwargs=True)
    trainer.train()
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    for step, ce, cgc, loss in seen:  # loss = CE + (step / 4) * lambda * CGC during the ramp
        assert abs(loss - (ce + step / 4 * 0.5 * cgc)) < 1e-5
    assert seen[0][3] == pytest.approx(seen[0][1])  # the first step is cross-entropy alone
    with pytest.raises(CGCValueError, match="cgc_warmup_steps"):
        CGCTrainingArguments(output_dir=str(tmp_path), cgc_warmup_steps=-1)


# ---------------------------------------------------------------------------------- issue 12
@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "one_cycle", "polynomial"])
def test_scheduler_names_and_warmup_is_kept(tmp_path, kind):
    args = args_for(tmp_path, lr_scheduler_type=kind, warmup_steps=2, max_train_steps=6)
    trainer = CGCTrainer(tiny_model(), args, Tiny(8))
    first = trainer.scheduler.get_last_lr()[0]
    assert first < 1e-4  # warming up, not at the peak (transformers' "constant" would be)
    trainer.train()
    with pytest.raises(CGCValueError, match="lr_scheduler_type"):
        CGCTrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosine-ish")


def test_no_weight_decay_names_of_timm_are_not_decayed(tmp_path):
    torch.manual_seed(0)
    vit = CGCModel.from_backbone(
        "vit_tiny_patch16_224",
        num_labels=3,
        pretrained=False,
        model_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2),
    )
    trainer = CGCTrainer(vit, args_for(tmp_path, weight_decay=0.1), Tiny(8))
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    names = dict(vit.backbone.named_parameters())
    assert {"pos_embed", "cls_token"} <= vit.backbone.no_weight_decay()
    assert decay[id(names["pos_embed"])] == 0.0 and decay[id(names["cls_token"])] == 0.0
    assert decay[id(names["patch_embed.proj.weight"])] == 0.1


def test_mixed_precision_follows_accelerate_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` sets
    trainer = CGCTrainer(tiny_model(), args_for(tmp_path), Tiny(8))
    assert trainer.accelerator.mixed_precision == "bf16"
    reset_accelerate()
    explicit = CGCTrainer(tiny_model(), args_for(tmp_path, mixed_precision="no"), Tiny(8))
    assert explicit.accelerator.mixed_precision == "no"  # a flag still wins


def test_max_grad_norm_none_and_num_warmup_steps_flags():
    from cgc_hf import ArgumentGroup, CGCArgumentParser

    parser = CGCArgumentParser([ArgumentGroup("training", CGCTrainingArguments)], prog="x")
    (args,) = parser.parse_args_into_dataclasses(
        ["--max_grad_norm", "None", "--num_warmup_steps", "5"]
    )
    assert args.max_grad_norm is None and args.warmup_steps == 5


def test_load_best_model_at_end_keeps_and_reports_the_best_evaluation(tmp_path):
    from safetensors.torch import load_file

    args = args_for(
        tmp_path,
        max_train_steps=5,
        eval_steps=1,
        checkpointing_steps=1,
        checkpoints_total_limit=1,
        metric_for_best_model="consistency",
        load_best_model_at_end=True,
        learning_rate=0.05,
    )
    model = tiny_model()
    metrics = CGCTrainer(model, args, Tiny(8), Tiny(6, seed=5, mask=True)).train()
    out = tmp_path / "run"
    evals = json.loads((out / "metrics.json").read_text())["evaluations"]
    best = max(evals, key=lambda e: e["eval_consistency"])
    assert metrics["best_step"] == best["step"]
    assert metrics["eval_consistency"] == best["eval_consistency"]
    kept = {p.name for p in complete_checkpoints(out)}
    assert f"step_{best['step']}" in kept  # never pruned, whatever the limit
    saved = load_file(str(out / "model" / "model.safetensors"))
    at_best = load_file(str(out / "checkpoints" / f"step_{best['step']}" / "model.safetensors"))
    assert all(torch.equal(saved[k], at_best[k]) for k in at_best)
    with pytest.raises(CGCValueError, match="metric_for_best_model"):
        CGCTrainingArguments(output_dir=str(tmp_path), metric_for_best_model="acuracy")
