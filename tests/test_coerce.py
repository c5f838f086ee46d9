"""The typed parser: the same text means the same value from a flag, a YAML file or Python."""

from __future__ import annotations

import math

import pytest
import yaml

from cgc_hf import CGCConfig, CGCTrainingArguments, CGCValueError
from cgc_hf.coerce import coerce


@pytest.mark.parametrize(
    ("value", "kind", "want"),
    [
        ("1e-4", float, 1e-4),
        (3, float, 3.0),
        ("no", bool, False),
        ("FALSE", bool, False),
        ("Yes", bool, True),
        (1, bool, True),
        ("1e3", int, 1000),
        (7.0, int, 7),
        ("none", int | None, None),
        ("None", float | None, None),
        ("7", str | int | None, 7),
        ("epoch", str | int | None, "epoch"),
        (["0.5", "1"], tuple[float, float], (0.5, 1.0)),
        ("0.5 1", tuple[float, float], (0.5, 1.0)),
        ([1, 2, 3], tuple[int, ...], (1, 2, 3)),
        ('{"a": 1}', dict[str, int] | None, {"a": 1}),
    ],
)
def test_values_become_the_declared_type(value, kind, want):
    got = coerce(value, kind, "x")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(
    ("value", "kind", "needle"),
    [
        ("inf", float, "finite"),
        (float("nan"), float, "finite"),
        ("maybe", bool, "true or false"),
        ("2", bool, "true or false"),
        ("1.5", int, "integer"),
        (True, int, "integer"),
        (0.5, tuple[float, float], "2 numbers"),
        (["0.5", "inf"], tuple[float, float], "finite"),
        ("[1, 2]", dict[str, int], "mapping"),
        ("{not json", dict[str, int], "JSON object"),
        (None, float, "got None"),
    ],
)
def test_bad_values_are_one_line_naming_the_option_and_value(value, kind, needle):
    with pytest.raises(CGCValueError) as err:
        coerce(value, kind, "some_option")
    message = str(err.value)
    assert message.startswith("some_option must be") and needle in message and "\n" not in message


def test_yaml_values_mean_what_the_flags_mean():
    # PyYAML 1.1 reads 1e-4 as a string and keeps a quoted 'no' as a (truthy) string.
    data = yaml.safe_load("learning_rate: 1e-4\noverwrite_output_dir: 'no'\nseed: '7'\n")
    assert data["learning_rate"] == "1e-4" and data["overwrite_output_dir"] == "no"
    args = CGCTrainingArguments(output_dir="x", **data)
    assert args.learning_rate == 1e-4 and args.overwrite_output_dir is False and args.seed == 7


@pytest.mark.parametrize("name", ["learning_rate", "head_learning_rate", "weight_decay"])
def test_non_finite_training_numbers_are_refused(name):
    with pytest.raises(CGCValueError, match=f"{name} must be a finite number"):
        CGCTrainingArguments(output_dir="x", **{name: math.inf})


@pytest.mark.parametrize("name", ["cgc_lambda", "temperature", "flip_prob"])
def test_non_finite_method_numbers_are_refused(name):
    with pytest.raises(CGCValueError, match=f"{name} must be a finite number"):
        CGCConfig(**{name: "inf"})


def test_config_input_size_sets_the_data_config():
    cfg = CGCConfig(input_size=32, data_config={"input_size": [3, 224, 224], "mean": [0.5] * 3})
    assert cfg.input_size == (32, 32) and cfg.data_config["input_size"] == [3, 32, 32]
    assert CGCConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CGCValueError, match="input_size"):
        CGCConfig(input_size=(0, 32))
