"""The one evaluation: the metric table, per-image seeding, evaluate() over loaders, statistics,
the comparison table, and loading any classifier for it.

Statistics are checked against closed forms and ``statistics`` from the standard library;
evaluate() against a loop over single images written from the definitions.
"""

from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from conftest import load_recipe, tiny_args, tiny_hf_backbone
from torch import nn
from torch.utils.data import DataLoader

from cgc_hf import (
    METRICS,
    CGCModel,
    CGCTrainer,
    CGCTrainingArguments,
    CheckpointError,
    Evaluation,
    EvaluationArguments,
    build_datasets,
    collate,
    compare,
    evaluate,
    evaluate_batch,
    format_table,
    load_classifier,
    load_splits,
    paired_difference,
    summarize,
    write_results,
)
from cgc_hf.augment import sample_crop_flip
from cgc_hf.evaluation import _positions, consistency_transforms, image_seed, metric
from cgc_hf.metrics import consistency, content_heatmap, insertion_deletion

Z95 = 1.959963984540054
TINY_RESNET = dict(layers=[1, 1, 1, 1], stem_width=16, channels=(16, 32, 48, 64))


@pytest.fixture(scope="module")
def tiny_model() -> CGCModel:
    torch.manual_seed(0)
    model = CGCModel.from_backbone(
        "resnet18", num_labels=3, pretrained=False, model_kwargs=TINY_RESNET
    )
    return model.eval()


def _items(n: int = 7, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[2] = -100  # one unlabeled row: no accuracy, counted everywhere else
    mask = torch.zeros(n, size, size)
    mask[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    return [{"pixel_values": x[i], "labels": labels[i], "mask": mask[i]} for i in range(n)]


def _loader(items: list, batch_size: int) -> DataLoader:
    return DataLoader(items, batch_size=batch_size, shuffle=False)


# ---------------------------------------------------------------------------------- the table
def test_metric_table_names_each_metric_once():
    keys = [m.key for m in METRICS]
    assert len(set(keys)) == len(keys)
    assert metric("eval_accuracy") is metric("accuracy") is METRICS[0]
    assert metric("eval_zero_heatmaps").reduction == "sum"  # a count of images, not a share
    assert metric("zero_heatmaps").title == "All-zero heatmaps (images)"
    assert metric("insertion").title == "Insertion AUC"  # no unit, no parentheses
    assert metric("deletion").higher_is_better is False
    assert metric("no_such_metric") is None


# ---------------------------------------------------------------------------------- seeding
def test_image_seed_mixes_seed_and_index():
    assert image_seed(3, 5) == image_seed(3, 5)
    # A linear rule seed * N + index would make these equal for N = 1_000_003.
    assert image_seed(1, 0) != image_seed(0, 1_000_003)
    assert len({image_seed(s, i) for s in range(4) for i in range(50)}) == 200
    with pytest.raises(ValueError, match="seed"):
        image_seed(-1, 0)


def test_consistency_transforms_do_not_depend_on_batching():
    whole = consistency_transforms(7, range(6))
    parts = [consistency_transforms(7, range(a, b)) for a, b in ((0, 2), (2, 3), (3, 6))]
    torch.testing.assert_close(torch.cat([p.boxes for p in parts]), whole.boxes, rtol=0, atol=0)
    assert torch.equal(torch.cat([p.flip for p in parts]), whole.flip)
    # Image i's transform is sample_crop_flip's single draw from a generator seeded for i.
    g = torch.Generator().manual_seed(image_seed(7, 4))
    one = sample_crop_flip(1, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 1.0, "cpu", g)
    torch.testing.assert_close(whole.boxes[4:5], one.boxes, rtol=0, atol=0)
    assert not torch.equal(consistency_transforms(8, range(6)).boxes, whole.boxes)


def test_consistency_takes_given_transforms(tiny_model):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = consistency_transforms(0, range(3))
    g = torch.Generator().manual_seed(0)
    drawn = sample_crop_flip(3, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 1.0, "cpu", g)
    t_drawn = consistency(tiny_model, x, generator=torch.Generator().manual_seed(0))
    t_given = consistency(tiny_model, x, transforms=drawn)
    torch.testing.assert_close(t_given, t_drawn, rtol=0, atol=0)
    assert consistency(tiny_model, x, transforms=t).shape == (3,)
    with pytest.raises(ValueError, match="one crop/flip per image"):
        consistency(tiny_model, x, transforms=consistency_transforms(0, range(2)))


# ---------------------------------------------------------------------------------- one batch
def _images_and_predictions(model: CGCModel) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    torch.manual_seed(5)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        return x, model(x)["logits"].argmax(1)


def test_evaluate_batch_keys_and_values(tiny_model):
    x, pred = _images_and_predictions(tiny_model)
    labels = pred.clone()
    labels[1] = (pred[1] + 1) % 3
    labels[3] = -100
    mask = torch.zeros(4, 64, 64)
    mask[:, 16:48, 16:48] = 1
    batch = {"pixel_values": x, "labels": labels, "mask": mask}
    out = evaluate_batch(tiny_model, batch, generator=torch.Generator().manual_seed(0))
    assert set(out) == {
        "accuracy",
        "consistency",
        "content_heatmap",
        "pointing_game",
        "zero_heatmaps",
    }
    assert set(out) <= {m.key for m in METRICS}  # the per-image keys are the table's keys
    assert all(v.shape == (4,) and v.dtype == torch.float32 for v in out.values())
    assert out["accuracy"][:3].tolist() == [1.0, 0.0, 1.0] and math.isnan(out["accuracy"][3])
    target = torch.where(labels >= 0, labels, pred)
    torch.testing.assert_close(
        out["content_heatmap"], content_heatmap(tiny_model.explain(x, target), mask)
    )
    out = evaluate_batch(tiny_model, {"pixel_values": x}, insertion_steps=2)
    assert set(out) == {"consistency", "insertion", "deletion"}
    assert bool(((out["insertion"] >= 0) & (out["insertion"] <= 1)).all())
    ins, dele = insertion_deletion(tiny_model, x, tiny_model.explain(x, pred), pred, steps=2)
    torch.testing.assert_close(out["insertion"], ins.float())
    torch.testing.assert_close(out["deletion"], dele.float())
    # Without labels (a model with other classes): no accuracy, the mask metrics explain pred.
    out = evaluate_batch(tiny_model, batch, use_labels=False)
    assert "accuracy" not in out
    torch.testing.assert_close(
        out["content_heatmap"], content_heatmap(tiny_model.explain(x, pred), mask)
    )


def test_mask_metrics_reuse_the_heatmaps_of_the_predicted_class(tiny_model, monkeypatch):
    """Consistency already explains each prediction; only the rows whose true class differs
    from the prediction are explained again for Content Heatmap and the pointing game."""
    x, pred = _images_and_predictions(tiny_model)
    labels = pred.clone()
    labels[2] = (pred[2] + 1) % 3  # one wrong prediction
    batch = {"pixel_values": x, "labels": labels, "mask": torch.ones(4, 64, 64)}
    explained: list[list[int]] = []
    explain = tiny_model.explain

    def counted(images, classes, *args, **kwargs):
        explained.append(classes.tolist())
        return explain(images, classes, *args, **kwargs)

    monkeypatch.setattr(tiny_model, "explain", counted)
    evaluate_batch(tiny_model, batch, generator=torch.Generator().manual_seed(0), insertion_steps=2)
    # consistency: the image and its crop, both of the prediction; then the one true class
    assert explained[:2] == [pred.tolist() * 2, [int(labels[2])]]
    assert sum(len(c) for c in explained) == 2 * 4 + 1, "a heatmap was computed twice"


# ---------------------------------------------------------------------------------- a loader
def _reference(model: CGCModel, items: list, seed: int) -> dict[str, list[float]]:
    """Per-image values from a loop over single images, written from the definitions."""
    out: dict[str, list[float]] = {"accuracy": [], "consistency": [], "content_heatmap": []}
    for i, item in enumerate(items):
        x, label, mask = item["pixel_values"][None], int(item["labels"]), item["mask"][None]
        with torch.no_grad():
            pred = model(x)["logits"].argmax(1)  # (1,)
        out["accuracy"].append(math.nan if label == -100 else float(int(pred) == label))
        t = consistency_transforms(seed, [i])
        out["consistency"].append(float(consistency(model, x, transforms=t, classes=pred)))
        target = pred if label == -100 else torch.tensor([label])
        out["content_heatmap"].append(float(content_heatmap(model.explain(x, target), mask)))
    return out


def test_evaluate_matches_single_image_loop_at_any_batch_size(tiny_model):
    items = _items()
    ref = _reference(tiny_model, items, seed=11)
    for batch_size in (1, 3, 7):
        result = evaluate(tiny_model, _loader(items, batch_size), seed=11)
        assert result.num_images == 7
        for key, values in ref.items():
            got = result.per_image[key].tolist()
            assert got == pytest.approx(values, abs=1e-5, nan_ok=True), (key, batch_size)


def test_explanation_metrics_on_the_first_images_only(tiny_model):
    items = _items()
    ref = _reference(tiny_model, items, seed=11)
    for batch_size in (1, 3, 7):  # the subset straddles a batch, or is one
        result = evaluate(tiny_model, _loader(items, batch_size), seed=11, explain_images=4)
        got = result.per_image
        assert got["accuracy"].tolist() == pytest.approx(ref["accuracy"], nan_ok=True)
        for key in ("consistency", "content_heatmap"):
            assert got[key][:4].tolist() == pytest.approx(ref[key][:4], abs=1e-5), key
            assert torch.isnan(got[key][4:]).all(), (key, batch_size)
        for key in ("pointing_game", "zero_heatmaps"):
            assert torch.isnan(got[key][4:]).all() and not torch.isnan(got[key][:4]).any()
        summary = result.summary()
        assert summary["consistency"]["n"] == 4 and summary["accuracy"]["n"] == 6
        assert summary["zero_heatmaps"]["n"] == 4
    everything = evaluate(tiny_model, _loader(items, 3), seed=11, explain_images=7).per_image
    default = evaluate(tiny_model, _loader(items, 3), seed=11).per_image
    for key, values in default.items():
        assert torch.equal(everything[key].nan_to_num(-1), values.nan_to_num(-1)), key


def test_evaluate_restores_each_module_mode(tiny_model):
    model = tiny_model
    model.train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][:2]
    for m in frozen:
        m.eval()  # deliberately frozen statistics during fine-tuning
    before = {name: m.training for name, m in model.named_modules()}
    stats = [b.clone() for b in model.buffers()]
    evaluate(model, _loader(_items(4), 2), seed=0)
    assert {name: m.training for name, m in model.named_modules()} == before
    for old, new in zip(stats, model.buffers()):
        assert torch.equal(old, new)  # eval mode throughout: running statistics untouched
    model.eval()


def test_scalars_are_the_summaries():
    per = {
        "accuracy": torch.tensor([1.0, 0.0, math.nan, 1.0]),
        "consistency": torch.tensor([0.5, 0.25, 0.75, 1.0]),
        "zero_heatmaps": torch.tensor([0.0, 1.0, 1.0, 0.0]),
    }
    result = Evaluation(per)
    assert result.scalars() == {
        "eval_accuracy": pytest.approx(200 / 3),
        "eval_consistency": 0.625,
        "eval_zero_heatmaps": 2.0,
        "eval_samples": 4.0,
    }
    summary = result.summary()
    assert list(summary) == ["accuracy", "consistency", "zero_heatmaps"]  # METRICS order
    assert summary["accuracy"]["n"] == 3 and summary["zero_heatmaps"] == {"count": 2.0, "n": 4}
    assert result.per_image_lists()["accuracy"] == [1.0, 0.0, None, 1.0]
    assert json.loads(json.dumps(result.per_image_lists()))  # JSON without NaN


def test_positions_follow_the_gathered_order():
    """Process p's rows come after lower ranks' rows of the same step."""

    class Fake(SimpleNamespace):
        def gather(self, t):
            return torch.tensor(self.sizes)

    acc = Fake(num_processes=3, process_index=1, device="cpu", sizes=[4, 4, 2])
    assert _positions(acc, 4, 20) == (24, 30)
    assert _positions(None, 5, 20) == (20, 25)


# ---------------------------------------------------------------------------------- statistics
def test_summaries_closed_form():
    acc, zero, cons = metric("accuracy"), metric("zero_heatmaps"), metric("consistency")
    s = summarize(torch.tensor([1.0, 0.0, 1.0, 1.0, float("nan")]), acc)
    # n = 4 labeled rows; mean 75 %; sample std of (100, 0, 100, 100) = 50.
    assert s == pytest.approx({"mean": 75.0, "std": 50.0, "ci95": Z95 * 50.0 / 2.0, "n": 4})
    assert summarize(torch.tensor([1.0, 0.0, 1.0]), zero) == {"count": 2.0, "n": 3}
    one = summarize(torch.tensor([0.5]), cons)
    assert one == {"mean": 0.5, "std": 0.0, "ci95": 0.0, "n": 1}
    assert summarize(torch.tensor([math.nan]), cons)["n"] == 0
    d = paired_difference(torch.tensor([0.5, 0.25, 0.75]), torch.tensor([0.75, 0.5, 0.75]), cons)
    # differences (0.25, 0.25, 0): mean 1/6, sample std sqrt(1/48)
    assert d["mean"] == pytest.approx(1 / 6)
    assert d["ci95"] == pytest.approx(Z95 * math.sqrt(1 / 48) / math.sqrt(3))
    assert paired_difference(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), zero) == {
        "count": 1.0
    }
    with pytest.raises(ValueError, match="same images"):
        paired_difference(torch.zeros(2), torch.zeros(3), cons)


def test_compare_and_table():
    a = Evaluation({"accuracy": torch.tensor([1.0, 0.0, 1.0, 0.0])})
    b = Evaluation({"accuracy": torch.tensor([1.0, 1.0, 1.0, 0.0])})
    diff = compare({"base": a, "cgc": b})
    assert list(diff) == ["cgc"]
    ref = statistics.stdev([0.0, 100.0, 0.0, 0.0])
    assert diff["cgc"]["accuracy"] == pytest.approx({"mean": 25.0, "ci95": Z95 * ref / 2.0, "n": 4})
    table = format_table({"base": a.summary(), "cgc": b.summary()}, diff)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "base", "cgc", "cgc", "-", "base"]
    row = next(line for line in lines if line.startswith("Top-1 accuracy (%)"))
    ci_a = Z95 * statistics.stdev([100.0, 0.0, 100.0, 0.0]) / 2.0
    assert f"50.00 ± {ci_a:.2f}" in row and f"+25.00 ± {Z95 * ref / 2.0:.2f}" in row
    assert "4 images" in table and "paired" in table


def test_evaluation_arguments_name_the_bad_value(tmp_path):
    args = EvaluationArguments(model="a", compare="b c", insertion_steps="4")
    assert args.refs == ["a", "b", "c"] and args.insertion_steps == 4
    # The seed and batch size mean what they mean in training, with the same defaults.
    assert args.seed == CGCTrainingArguments().seed
    for bad, match in (
        (dict(model=None), "--model is required"),
        (dict(model="a", names=("x", "y")), "--names got 2 names for 1 models"),
        (dict(model="a", compare=("b",), names=("x", "x")), "distinct"),
        (dict(model="a", per_device_eval_batch_size=0), "per_device_eval_batch_size.*got 0"),
        (dict(model="a", seed=-1), "seed must be an integer >= 0; got -1"),
    ):
        with pytest.raises(ValueError, match=match):
            EvaluationArguments(**bad)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        EvaluationArguments(model="a", output_dir=str(tmp_path / "f"))


def test_write_results_keeps_model_order_and_drops_nan(tmp_path):
    evaluations = {
        "zeta": Evaluation({"accuracy": torch.tensor([1.0, math.nan])}),
        "alpha": Evaluation({"accuracy": torch.tensor([0.0, math.nan])}),
    }
    data = write_results(tmp_path, evaluations, ["z/model", "a/model"], {"dataset": "d"})
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved == data and list(saved["models"]) == ["zeta", "alpha"]  # not sorted
    assert saved["differences"]["alpha"]["accuracy"]["mean"] == -100.0
    per = json.loads((tmp_path / "zeta" / "metrics.json").read_text())
    assert per["per_image"] == {"accuracy": [1.0, None]} and per["source"] == "z/model"


# ---------------------------------------------------------------------------------- loading
def test_load_classifier_takes_any_classifier(tiny_model, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    saved = tiny_model.save_pretrained(tmp_path / "cgc")
    exported = tiny_model.export_backbone(tmp_path / "timm-export")
    for ref in (saved, exported):
        model = load_classifier(str(ref))
        assert not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x)["logits"], tiny_model(x)["logits"])
    hf = tiny_hf_backbone("resnet")
    hf.save_pretrained(tmp_path / "hf")
    model = load_classifier(str(tmp_path / "hf"))
    assert model.config.library == "transformers" and model.num_labels == 3
    with torch.no_grad():
        x64 = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model(x64)["logits"], hf.eval()(x64).logits)
    assert model.explain(x64).shape[0] == 2  # a plain classifier gets heatmaps too


def test_load_classifier_takes_a_timm_name_with_its_pretrained_weights(monkeypatch):
    real, calls = CGCModel.from_backbone, []

    def offline(name, pretrained=True, **kwargs):  # no Hub here: record the call, random weights
        calls.append((name, pretrained))
        torch.manual_seed(0)
        return real(name, pretrained=False, model_kwargs=TINY_RESNET, **kwargs)

    monkeypatch.setattr(CGCModel, "from_backbone", staticmethod(offline))
    model = load_classifier("resnet18")
    assert calls == [("resnet18", True)] and not model.training
    assert model.config.library == "timm" and model.num_labels == 1000  # ImageNet's head


def test_load_classifier_errors(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Before finetune.py has written it: a missing folder, not a Hub id to download.
    with pytest.raises(CheckpointError, match="no such directory") as err:
        load_classifier("cgc-output/model")
    assert "hf download" not in str(err.value) and "'cgc-output/model'" in str(err.value)
    tiny_model.save_pretrained(tmp_path / "run" / "model")
    with pytest.raises(CheckpointError, match="training run's folder"):
        load_classifier("run")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_classifier("run/modle")  # the parent exists: a typo, not a Hub id
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_classifier("notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_classifier("empty")


# ---------------------------------------------------------------------------------- the card
def test_card_names_metrics_from_the_table(tiny_model):
    import yaml

    from cgc_hf import model_card

    metrics = {"eval_accuracy": 81.25, "eval_zero_heatmaps": 3.0, "eval_samples": 14.0}
    text = model_card(tiny_model.config, dataset="d", metrics=metrics)
    assert "| Top-1 accuracy (%) | 81.25 |" in text
    assert "| All-zero heatmaps (images) | 3 |" in text  # a count, named as one
    assert "| Evaluated images | 14 |" in text
    meta = yaml.safe_load(text.split("---\n")[1])
    results = meta["model-index"][0]["results"]
    names = {m["type"]: m["name"] for r in results for m in r["metrics"]}
    assert names == {
        "accuracy": "Top-1 accuracy (%)",
        "zero_heatmaps": "All-zero heatmaps (images)",
    }


# ---------------------------------------------------------------------------------- one path
def _tiny_run(seed: int, eval_size: int, eval_split: str | None = None) -> tuple:
    """Generated data, a tiny model and its train / eval datasets, built as finetune.py does."""
    synth = {"num_classes": 3, "train_size": 6, "eval_size": eval_size, "image_size": 32}
    splits = load_splits("synthetic", eval_split=eval_split, seed=seed, synthetic_kwargs=synth)
    torch.manual_seed(0)
    model = CGCModel.from_backbone(
        "resnet18", num_labels=3, pretrained=False, model_kwargs=TINY_RESNET, input_size=32
    )
    data = build_datasets(splits, model.config.data_config, seed=seed)
    return synth, model, data.labeled, data.eval


def test_trainer_recipe_and_card_report_the_same_numbers(tmp_path, fresh_accelerate):
    """metrics.json, recipes/evaluate.py and the model card: one evaluation, the same numbers.

    The recipe evaluates with another batch size than the trainer, which the per-image seeds
    make irrelevant.
    """
    seed = 5
    synth, model, train_ds, eval_ds = _tiny_run(seed, eval_size=7, eval_split="test")
    args = tiny_args(
        tmp_path / "run",
        max_train_steps=1,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=3,
        eval_insertion_steps=2,
        seed=seed,
    )
    trainer = CGCTrainer(
        model, args, train_ds, eval_ds, data_collator=collate, run_info={"dataset": "synthetic"}
    )
    trainer.train()
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]

    argv = [
        "--model", str(tmp_path / "run" / "model"),
        "--dataset", "synthetic", "--synthetic_kwargs", json.dumps(synth), "--split", "test",
        "--seed", str(seed), "--per_device_eval_batch_size", "4", "--insertion_steps", "2",
        "--figure_images", "0", "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    assert load_recipe("evaluate").main(argv) == 0
    comparison = json.loads((tmp_path / "eval" / "comparison.json").read_text())
    recipe = next(iter(comparison["models"].values()))["metrics"]
    card = (tmp_path / "run" / "model" / "README.md").read_text()

    assert set(recipe) == {m.key for m in METRICS}  # the masks and insertion steps: all seven
    assert final["eval_samples"] == comparison["num_images"] == 7
    for key, s in recipe.items():
        value = s["count"] if "count" in s else s["mean"]
        assert final[f"eval_{key}"] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        assert f"| {metric(key).title} | {final[f'eval_{key}']:.4g} |" in card, key


def test_trainer_sends_heatmap_figures_to_tensorboard(tmp_path, fresh_accelerate):
    """The figure written at each evaluation also reaches the trackers, as an image."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, model, train_ds, eval_ds = _tiny_run(0, eval_size=3)
    args = CGCTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_train_steps=1,
        per_device_train_batch_size=3,
        figure_images=2,
        report_to="tensorboard",
    )
    CGCTrainer(model, args, train_ds, eval_ds, data_collator=collate).train()
    png = tmp_path / "run" / "figures" / "step_1.png"
    assert png.is_file()
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"])
        for tag in acc.Tags()["images"]:
            (image,) = acc.Images(tag)
            with Image.open(png) as written:  # the same picture as the PNG on disk
                assert (image.width, image.height) == written.size
            assert image.step == 1
    assert "eval/heatmaps" in tags
