"""A resume compares the saved run configuration with the new one (issue 13.3)."""

from __future__ import annotations

import json

import pytest
from conftest import Stop, tiny_model, tiny_trainer

from cgc_hf import CGCModel, CGCTrainer, CheckpointError
from cgc_hf.training.resume import config_changes

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def trainer(out, model=None, stop_at=None, unlabeled=True, **kw) -> CGCTrainer:
    options = {"max_train_steps": 4, **kw}
    return tiny_trainer(out, model, stop_at, unlabeled, {"labels_per_class": 2}, **options)


@pytest.fixture
def stopped(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        trainer(out, stop_at=3).train()
    return out


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(per_device_train_batch_size=2), "per_device_train_batch_size"),
        (dict(seed=4), "seed"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
        (dict(max_train_steps=6), "max_train_steps"),
        (dict(learning_rate=0.5), "learning_rate"),
        (dict(unlabeled=False), "images.unlabeled: 6 -> 0"),
        (dict(model=tiny_model(cgc_lambda=0.0)), "cgc_lambda"),
    ],
)
def test_a_result_changing_option_is_refused_naming_it(stopped, change, field):
    with pytest.raises(CheckpointError) as err:
        trainer(stopped, resume_from_checkpoint="latest", **change).train()
    message = str(err.value)
    assert field in message and "--allow_config_change" in message and "\n" not in message
    saved = json.loads((stopped / "args.json").read_text())
    assert saved["training_arguments"]["seed"] == 3  # the record still says what ran


def test_harmless_options_may_change(stopped):
    metrics = trainer(
        stopped, resume_from_checkpoint="latest", logging_steps=3, checkpoints_total_limit=1
    ).train()
    assert metrics["train_steps"] == 4


def test_allowed_change_is_recorded_beside_the_original(stopped):
    trainer(
        stopped, resume_from_checkpoint="latest", learning_rate=0.5, allow_config_change=True
    ).train()
    record = json.loads((stopped / "args.json").read_text())
    assert record["training_arguments"]["learning_rate"] == 1e-4  # the run as it started
    (resume,) = record["resumes"]
    assert resume["step"] == 2 and resume["changed"] == {
        "training_arguments.learning_rate": [1e-4, 0.5]
    }


def test_another_optimizer_or_model_is_refused_even_when_allowed(stopped):
    with pytest.raises(CheckpointError, match=r"\['training_arguments.optim'\]"):
        trainer(
            stopped, resume_from_checkpoint="latest", optim="sgd", allow_config_change=True
        ).train()
    other = CGCModel.from_backbone("resnet18", num_labels=3, pretrained=False, input_size=32)
    with pytest.raises(CheckpointError, match="architecture"):
        trainer(stopped, other, resume_from_checkpoint="latest", allow_config_change=True).train()


def test_config_changes_lists_each_field_once():
    old = {"training_arguments": {"seed": 1, "output_dir": "a"}, "run": {"options": {"seed": 1}}}
    new = {"training_arguments": {"seed": 2, "output_dir": "b"}, "run": {"options": {"seed": 2}}}
    assert config_changes(old, new) == {"training_arguments.seed": [1, 2]}
