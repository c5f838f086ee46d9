"""Flags from dataclass fields: types, negations, aliases, YAML defaults under flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from cgc_hf import CGCTrainingArguments, CGCValueError
from cgc_hf.cli import ArgumentGroup, CGCArgumentParser
from cgc_hf.coerce import coerce_fields


@dataclass
class Options:
    """Every field type the parser turns into a flag."""

    name_or_path: str | None = field(default=None, metadata={"aliases": ["--name"]})
    flag: bool = False
    maybe: bool | None = None
    rate: float = 0.1
    steps: int | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    values: tuple[int, ...] | None = None
    kwargs: dict | None = None
    mode: str = field(default="raise", metadata={"choices": ("raise", "skip")})

    def __post_init__(self) -> None:
        coerce_fields(self)


def parser(**kw) -> CGCArgumentParser:
    return CGCArgumentParser([ArgumentGroup("options", Options)], prog="x", **kw)


def parse(*argv: str, **kw) -> Options:
    return parser(**kw).parse_args_into_dataclasses(list(argv))[0]


def test_flags_are_typed_from_the_fields():
    got = parse(
        "--name", "resnet50", "--flag", "--maybe", "no", "--rate", "1e-4", "--steps", "none",
        "--pair", "0.5", "1", "--values", "1", "2", "3", "--kwargs", '{"depth": 2}',
    )  # fmt: skip
    want = Options("resnet50", True, False, 1e-4, None, (0.5, 1.0), (1, 2, 3), {"depth": 2})
    assert got == want


@pytest.mark.parametrize("spelling", ["--no_flag", "--no-flag", "--flag=false", "--flag=0"])
def test_negations(spelling):
    assert parse("--flag", spelling).flag is False


def test_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse("--name_or", "x")
    assert "unrecognized arguments: --name_or" in capsys.readouterr().err


def test_choices_are_checked_for_every_source(tmp_path):
    with pytest.raises(CGCValueError, match="mode must be one of 'raise', 'skip'; got 'ignore'"):
        parse("--mode", "ignore")
    config = tmp_path / "c.yaml"
    config.write_text("mode: ignore\n")
    with pytest.raises(CGCValueError, match="got 'ignore'"):
        parse("--config", str(config))


def test_yaml_is_under_the_command_line_and_typed_alike(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rate: 1e-4\nflag: 'no'\nname: from-yaml\nsteps: 5\npair: [0.2, 0.9]\n")
    got = parse("--config", str(config), "--steps", "7")
    assert got.rate == 1e-4 and got.flag is False and got.name_or_path == "from-yaml"
    assert got.steps == 7 and got.pair == (0.2, 0.9)  # the flag wins over the file


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rat: 0.1\n", "unknown key 'rat'; use flag names. Close matches: 'rate'"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
        ("pair: 0.5\n", "pair must be 2 numbers; got 0.5"),
    ],
)
def test_bad_yaml_is_one_line(tmp_path, text, needle):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(CGCValueError) as err:
        parse("--config", str(config))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_config_naming_a_folder_or_nothing_is_one_line(tmp_path):
    for path, needle in ((tmp_path, "is a folder"), (tmp_path / "no.yaml", "does not exist")):
        with pytest.raises(CGCValueError, match=needle):
            parse("--config", str(path))


def test_default_config_applies_when_no_config_is_given(tmp_path):
    config = tmp_path / "d.yaml"
    config.write_text("rate: 0.5\n")
    seen = []

    def default(cli):
        seen.append(dict(cli))
        return config

    p = parser(default_config=default)
    options = p.parse_options(["--steps", "3"])
    assert options["config"] == str(config) and options["rate"] == 0.5
    assert seen == [{"steps": "3"}]


def test_partial_group_and_resolved_record():
    p = CGCArgumentParser(
        [ArgumentGroup("training", CGCTrainingArguments, ("learning_rate", "seed"))], prog="x"
    )
    (args,) = p.parse_args_into_dataclasses(["--learning_rate", "0.01"])
    assert args.learning_rate == 0.01 and args.output_dir == "cgc-output"
    assert p.resolved([args]) == {"training": {"learning_rate": 0.01, "seed": 42}}


def test_every_training_field_is_a_flag():
    p = CGCArgumentParser([ArgumentGroup("training", CGCTrainingArguments)], prog="x")
    flags = {s for a in p._actions for s in a.option_strings}
    for f in dataclasses.fields(CGCTrainingArguments):
        assert f"--{f.name}" in flags
    assert "--no_overwrite_output_dir" in flags and "--no-overwrite_output_dir" in flags


def test_a_token_in_a_bad_command_line_is_not_echoed(capsys):
    secret = "hf_" + "x" * 30
    with pytest.raises(SystemExit):
        parse("--hub_tok", secret)
    err = capsys.readouterr().err
    assert secret not in err and "--hub_tok" in err


def test_help_of_every_argument_dataclass_formats():
    from cgc_hf import METHOD_FIELDS, CGCConfig, DataArguments, HubArguments, ModelArguments

    groups = [
        ArgumentGroup("model", ModelArguments),
        ArgumentGroup("data", DataArguments),
        ArgumentGroup("method", CGCConfig, METHOD_FIELDS),
        ArgumentGroup("training", CGCTrainingArguments),
        ArgumentGroup("hub", HubArguments),
    ]
    text = CGCArgumentParser(groups, prog="x").format_help()  # a stray % would raise here
    assert "--lr_scheduler_type" in text and "30%" in text


def test_hf_example_model_flags():
    from cgc_hf import ModelArguments

    p = CGCArgumentParser([ArgumentGroup("model", ModelArguments)], prog="x")
    (args,) = p.parse_args_into_dataclasses(["--model", "resnet18", "--ignore_mismatched_sizes"])
    assert args.model_name_or_path == "resnet18" and args.ignore_mismatched_sizes is True
    with pytest.raises(CGCValueError, match="trust_remote_code=True is refused"):
        p.parse_args_into_dataclasses(["--trust_remote_code"])
