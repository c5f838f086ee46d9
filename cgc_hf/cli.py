"""Command-line flags built from dataclass fields, with YAML files as defaults under them.

Like ``transformers.HfArgumentParser``: each field of each argument dataclass becomes a flag, its
help text from the field's ``metadata["help"]``, its form from the field's *type* (not the text of
its annotation). Values stay text until the dataclass is built, so a flag, a YAML value and a
Python value all pass through the one typed parser, :mod:`cgc_hf.coerce`.

- ``bool``: ``--x`` (true), ``--x false``, ``--no_x`` (also ``--no-x``);
- ``tuple[float, float]``: two values; ``tuple[int, ...]``: one or more;
- ``dict``: a JSON object;
- ``metadata["aliases"]``: more spellings (``--model`` for ``--model_name_or_path``);
- ``metadata["choices"]``: allowed values, checked after coercion (for YAML values too).

Abbreviations are refused (``allow_abbrev=False``): ``--model_name`` must not silently mean
``--model_name_or_path``. A ``--config file.yaml`` of ``flag: value`` pairs sets defaults; the
command line wins.

Example:
    >>> parser = CGCArgumentParser([ArgumentGroup("training", CGCTrainingArguments)])
    >>> (args,) = parser.parse_args_into_dataclasses(["--learning_rate", "1e-4"])
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import redact, scrub
from .coerce import coerce, describe, field_types, union_members
from .errors import CGCValueError

logger = logging.getLogger(__name__)

CONFIG_FLAG = "config"


@dataclass(frozen=True)
class ArgumentGroup:
    """One dataclass whose fields become a group of flags.

    Attributes:
        title: heading of the group in ``--help``.
        cls: the dataclass.
        fields: the fields to expose (default: all); the dataclass is then built from these
            alone, its other fields keep their defaults.
    """

    title: str
    cls: type
    fields: tuple[str, ...] | None = None

    def names(self) -> list[str]:
        return list(self.fields or [f.name for f in dataclasses.fields(self.cls)])


class CGCArgumentParser(argparse.ArgumentParser):
    """Flags from dataclasses; parses a command line (and a YAML file) into their instances.

    Args:
        groups: the dataclasses, in the order :meth:`parse_args_into_dataclasses` returns them.
        default_config: given the command line's options, the YAML file to use when
            ``--config`` is not given (e.g. a dataset's recommended settings), or None.
        **kwargs: passed to ``argparse.ArgumentParser``.
    """

    def __init__(
        self,
        groups: Sequence[ArgumentGroup],
        default_config: Callable[[dict[str, Any]], Path | None] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        # SUPPRESS: an option the user did not type is absent, so YAML can fill it.
        super().__init__(allow_abbrev=False, argument_default=argparse.SUPPRESS, **kwargs)
        self.groups = list(groups)
        self.default_config = default_config
        self._choices: dict[str, tuple[Any, ...]] = {}
        self._types: dict[str, Any] = {}
        self._spellings: dict[str, str] = {}  # YAML key or flag spelling -> field name
        self.add_argument(
            f"--{CONFIG_FLAG}", help="YAML file of flag: value defaults (command-line flags win)."
        )
        for group in self.groups:
            self._add_group(group)

    # ------------------------------------------------------------------------------ building
    def _add_group(self, group: ArgumentGroup) -> None:
        section = self.add_argument_group(group.title)
        fields = {f.name: f for f in dataclasses.fields(group.cls)}
        types = field_types(group.cls)
        for name in group.names():
            f = fields[name]
            kind = self._types[name] = types[name]
            default = f.default if f.default is not dataclasses.MISSING else None
            # argparse %-formats help texts: a literal % must be doubled.
            help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
            aliases = [str(a) for a in f.metadata.get("aliases", ())]
            choices = f.metadata.get("choices")
            if choices is not None:
                self._choices[name] = tuple(choices)
                help_text += f" [choices: {', '.join(map(str, choices))}]"
            self._spellings.update({name: name, **{a.lstrip("-"): name for a in aliases}})
            flags = [f"--{name}", *aliases]
            base = _optional(kind)
            if base is bool:
                section.add_argument(
                    *flags, dest=name, nargs="?", const="true", metavar="BOOL", help=help_text
                )
                if not name.startswith("no_"):
                    section.add_argument(
                        f"--no_{name}",
                        f"--no-{name}",
                        dest=name,
                        action="store_const",
                        const="false",
                        help=f"Same as --{name} false.",
                    )
                continue
            section.add_argument(*flags, dest=name, help=help_text, **_form(base))

    # ------------------------------------------------------------------------------ parsing
    def parse_options(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """The options as one flat dict: command line over the YAML file, values not coerced.

        The YAML file is ``--config``, else ``default_config(command line)``; its path is
        returned under ``"config"`` (None without one).
        """
        cli = vars(self.parse_args(argv))
        path = cli.get(CONFIG_FLAG)
        if path is None and self.default_config is not None:
            path = self.default_config(cli)
            if path is not None:
                logger.info(
                    "using the settings of %s (flags given here win; --config to pick another)",
                    path,
                )
        options = self.read_yaml(Path(path)) if path is not None else {}
        options.update(cli)
        options[CONFIG_FLAG] = str(path) if path is not None else None
        return options

    def read_yaml(self, path: Path) -> dict[str, Any]:
        """``flag: value`` pairs of a YAML file, keyed by field name; unknown keys are an error."""
        import yaml

        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise CGCValueError(f"--config {str(path)!r} {what}; give the path of a YAML file.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            first = str(err).strip().splitlines()[0]
            raise CGCValueError(f"--config {str(path)!r} is not valid YAML ({first}).") from None
        data = data or {}
        if not isinstance(data, dict):
            raise CGCValueError(
                f"--config {str(path)!r} must hold a mapping of flag: value; got a "
                f"{type(data).__name__}."
            )
        out = {}
        for key, value in data.items():
            name = self._spellings.get(str(key).lstrip("-"))
            if name is None:
                near = difflib.get_close_matches(str(key), list(self._spellings), n=3)
                hint = f" Close matches: {', '.join(map(repr, near))}." if near else ""
                raise CGCValueError(
                    f"--config {str(path)!r} has an unknown key {key!r}; use flag names.{hint}"
                )
            out[name] = value
        return out

    def typed(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with each value coerced to its field's type (the rest left as they are)."""
        return {
            k: coerce(v, self._types[k], k) if k in self._types else v for k, v in options.items()
        }

    def build(self, options: dict[str, Any]) -> tuple[Any, ...]:
        """One instance per group from ``options`` (each field coerced by its dataclass)."""
        instances = []
        for group in self.groups:
            values = {n: options[n] for n in group.names() if n in options}
            instance = group.cls(**values)
            for name in group.names():
                allowed = self._choices.get(name)
                value = getattr(instance, name)
                if allowed is not None and value is not None and value not in allowed:
                    raise CGCValueError(
                        f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}."
                    )
            instances.append(instance)
        return tuple(instances)

    def parse_args_into_dataclasses(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``argv`` (and the YAML file) into one instance per group."""
        return self.build(self.parse_options(argv))

    def resolved(self, instances: Iterable[Any]) -> dict[str, dict[str, Any]]:
        """Every exposed option's final value, by group title (secrets removed), for the record."""
        out = {}
        for group, instance in zip(self.groups, instances):
            out[group.title] = {n: _plain(getattr(instance, n)) for n in group.names()}
        return redact(out)

    def error(self, message: str) -> typing.NoReturn:
        # argparse echoes unknown arguments: a mistyped token flag must not print the token.
        super().error(scrub(message))


def _optional(kind: Any) -> Any:
    """``X`` of ``X | None``; unions of several types stay as they are."""
    members = union_members(kind)
    if members is None:
        return kind
    rest = [m for m in members if m is not type(None)]
    return rest[0] if len(rest) == 1 else kind


def _form(kind: Any) -> dict[str, Any]:
    """argparse options (nargs, metavar) for a field type; values stay text."""
    origin = typing.get_origin(kind)
    if origin is tuple or origin is list:
        args = typing.get_args(kind)
        variadic = origin is list or not args or args[-1] is Ellipsis
        return {"nargs": "+" if variadic else len(args), "metavar": "V"}
    if origin is dict or kind is dict:
        return {"metavar": "JSON"}
    if kind in (int, float, str):
        return {"metavar": kind.__name__.upper()}
    return {"metavar": describe(kind).replace(" ", "_").upper()[:20]}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
