"""benchmarks/effect.py: the pairing of runs and the interval over seeds (no training here)."""

from __future__ import annotations

import math
import statistics

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def effect():
    return load_benchmark("effect")


def test_every_cgc_run_has_a_labeled_only_baseline(effect):
    named = effect.settings(["full", "pool", "nopool"], [5, 30])
    assert set(named) == {
        "full labels", "5/class + unlabeled pool", "5/class, no pool",
        "30/class + unlabeled pool", "30/class, no pool",
    }  # fmt: skip
    for cgc, base in named.values():
        assert "--no_cgc" in base and "--no_cgc" not in cgc
        assert base[-2:] == ["--unlabeled", "none"]
    assert "--unlabeled" not in named["5/class + unlabeled pool"][0]  # the pool is used
    assert named["5/class, no pool"][0][-2:] == ["--unlabeled", "none"]
    # The pool and no-pool settings share one baseline run per K.
    assert named["5/class + unlabeled pool"][1] == named["5/class, no pool"][1]


def test_interval_is_the_student_t_interval_over_seeds(effect):
    diffs = [1.0, 4.0, 7.0]
    mean, half = effect.interval(diffs)
    assert mean == 4.0
    # t(0.975, df=2) = 4.303; sd = 3
    assert half == pytest.approx(4.303 * 3.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(effect.interval([2.0])[1])


def test_table_reports_means_and_paired_differences(effect):
    pairs = [
        ({"accuracy": 70.0, "consistency": 0.8}, {"accuracy": 60.0, "consistency": 0.7}),
        ({"accuracy": 74.0, "consistency": 0.9}, {"accuracy": 62.0, "consistency": 0.7}),
    ]
    text = effect.table({"10/class + unlabeled pool": pairs}, [0, 1])
    row = next(line for line in text.splitlines() if "| accuracy |" in line)
    half = 12.706 * statistics.stdev([10.0, 12.0]) / math.sqrt(2)
    assert f"| 72.0 | 61.0 | +11.0 ± {half:.1f} |" in row
    assert "| consistency | 0.850 | 0.700 | +0.150 ±" in text
