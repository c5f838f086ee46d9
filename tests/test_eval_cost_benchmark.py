"""benchmarks/eval_cost.py: its clocks and the shares it reports (no training here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("eval_cost")


def test_a_section_inside_itself_or_a_skipped_one_is_counted_once(bench, monkeypatch):
    now = [0.0]  # a clock that moves only when work is done
    fake = SimpleNamespace(perf_counter=lambda: now[0], process_time=lambda: 2 * now[0])
    monkeypatch.setattr(bench, "time", fake)
    clocks = bench.Clocks()

    def work():
        now[0] += 1.0

    inner = bench.timed(clocks, "explain", work, skip_inside=("consistency",))
    consistency = bench.timed(clocks, "consistency", inner)
    with clocks.section("evaluate"), clocks.section("evaluate"):
        consistency()  # explain inside consistency: consistency's time, not explain's
        inner()  # explain on its own
    assert clocks.wall == {"consistency": 1.0, "explain": 1.0, "evaluate": 2.0}
    assert clocks.cpu == {"consistency": 2.0, "explain": 2.0, "evaluate": 4.0}


def test_shares_of_the_run(bench):
    clock = {"step_s": 2.0, "epoch_s": 20.0, "eval_s": 5.0, "eval_ms_per_image": 100.0}
    result = {"setting": "default", "train_images": 100, "cpu": clock}
    shares = bench.shares(result)
    assert shares["every_epoch"] == pytest.approx(5 / 25)
    steps, evals = bench.SCHEDULE["default"]
    assert shares["schedule"] == pytest.approx(evals * 5 / (steps * 2 + evals * 5))
    # 100 evaluation images at 0.1 s against an epoch of 20 s
    assert shares["every_epoch_equal_split"] == pytest.approx(10 / 30)
    assert "schedule" not in bench.shares({**result, "setting": "224"})
