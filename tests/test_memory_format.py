"""``channels_last``: training in NHWC memory format gives the default format's run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Stop, reset_accelerate, resnet_run

from cgc_hf import CGCModel, CGCTrainer

NHWC = torch.channels_last


def _train(out: Path, channels_last: bool, stop_at: int | None = None, resume: str | None = None):
    """The run and, for each training forward, whether its images were channels-last."""
    seen: list[bool] = []

    def record(trainer: CGCTrainer) -> None:
        inner = trainer.accelerator.unwrap_model(trainer.model)
        inner.register_forward_pre_hook(
            lambda _m, inputs: seen.append(inputs[0].is_contiguous(memory_format=NHWC))
        )

    model = resnet_run(out, stop_at, resume, record, channels_last=channels_last)
    return model, seen


def _convs(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.usefixtures("fresh_accelerate")
def test_channels_last_trains_in_nhwc_to_the_default_formats_weights(tmp_path):
    reference, seen_default = _train(tmp_path / "nchw", channels_last=False)
    reset_accelerate()
    model, seen = _train(tmp_path / "nhwc", channels_last=True)
    assert seen and all(seen), "the training images were not channels-last"
    assert not any(seen_default)
    convs = _convs(model)
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in _convs(reference))
    # Same arithmetic in another layout: equal up to float rounding, not bit for bit.
    ref, got = reference.state_dict(), model.state_dict()
    assert ref.keys() == got.keys()
    worst = max((ref[k].double() - got[k].double()).abs().max().item() for k in ref)
    assert worst < 1e-4, worst
    assert any(not torch.equal(ref[k], got[k]) for k in ref if ref[k].is_floating_point()), (
        "the formats gave bit-identical weights: NHWC was not used"
    )
    # The saved model is an ordinary one.
    saved = CGCModel.from_pretrained(tmp_path / "nhwc" / "model")
    for k, v in saved.state_dict().items():
        assert torch.equal(v, got[k]), k


@pytest.mark.usefixtures("fresh_accelerate")
def test_channels_last_run_resumes_to_the_uninterrupted_run(tmp_path):
    reference = _train(tmp_path / "ref", channels_last=True)[0].state_dict()
    reset_accelerate()
    with pytest.raises(Stop):
        _train(tmp_path / "run", channels_last=True, stop_at=3)
    reset_accelerate()
    resumed = _train(tmp_path / "run", channels_last=True, resume="latest")[0].state_dict()
    differ = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not differ, differ[:5]


@pytest.mark.usefixtures("fresh_accelerate")
def test_resuming_in_the_other_format_is_refused(tmp_path):
    with pytest.raises(Stop):
        _train(tmp_path, channels_last=False, stop_at=2)
    reset_accelerate()
    with pytest.raises(Exception, match="channels_last") as err:
        _train(tmp_path, channels_last=True, resume="latest")
    assert "allow_config_change" in str(err.value)
