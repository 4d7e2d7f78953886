"""From the command line (and an optional ``--config`` file) to a typed subcommand config.

tyro builds the parser from the dataclasses of :mod:`jlora.cli.args`. A YAML or JSON file
given as ``--config FILE`` (anywhere after the subcommand) holds the same fields as nested
mappings (``{"lora": {"rank": 8}}``); it is checked against the dataclasses (unknown keys
are named with the nearest known one) and turned into flags placed before the user's, so
flags override the file and tyro checks every value's type. Parse errors, which tyro prints
as a boxed message, come back as one :class:`CliUsageError` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tyro

from jlora.cli.args import COMMANDS
from jlora.errors import ConfigError


class CliUsageError(ConfigError):
    """The command line (or its --config file) does not parse: one line saying why."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _flags(cls: type, values: Mapping[str, Any], source: str, prefix: str = "") -> list[str]:
    """``values`` (a config file's mapping for ``cls``) as tyro flags, checked by name."""
    if not isinstance(values, Mapping):
        where = prefix.rstrip(".") or "the top level"
        raise CliUsageError(f"{source}: {where} must be a mapping of fields, got "
                            f"{type(values).__name__}.")
    types = _field_types(cls)
    out: list[str] = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in types:
            near = difflib.get_close_matches(name, list(types), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            raise CliUsageError(f"{source}: unknown field {prefix}{key}{hint}; see "
                                f"`jlora {_command_of(cls)} --help` for the fields.")
        kind = types[name]
        flag = "--" + (prefix + name).replace("_", "-")
        if dataclasses.is_dataclass(kind):
            out += _flags(kind, value, source, f"{prefix}{name}.")
        elif kind is bool:
            if not isinstance(value, bool):
                raise CliUsageError(f"{source}: {prefix}{name} must be true or false, got "
                                    f"{value!r}.")
            out.append(flag if value else "--" + (prefix + "no_" + name).replace("_", "-"))
        elif value is None:
            out += [flag, "None"]
        elif isinstance(value, Mapping):
            out += [flag, *(str(x) for kv in value.items() for x in kv)]
        elif isinstance(value, list | tuple):
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def _command_of(cls: type) -> str:
    for name, c in COMMANDS.items():
        if c is cls:
            return name
    return "<command>"


def read_config_file(path: str, cls: type) -> list[str]:
    """The flags a YAML/JSON ``--config`` file stands for (for subcommand ``cls``)."""
    file = Path(path)
    if not file.is_file():
        raise CliUsageError(f"--config {path}: no such file; give a YAML or JSON file.")
    text = file.read_text()
    try:
        if file.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - the YAML/JSON parsers' own errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliUsageError(f"--config {path} does not parse: {first}.") from None
    return _flags(cls, values or {}, f"--config {path}")


def _split_config(argv: Sequence[str]) -> tuple[list[str], str | None]:
    rest, config = [], None
    it = iter(argv)
    for a in it:
        if a == "--config":
            config = next(it, None)
            if config is None:
                raise CliUsageError("--config needs a file: --config run.yaml.")
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, config


_BOX = re.compile(r"^[\s│╭╮╰╯─]+|[\s│╭╮╰╯─]+$")


def _one_line(text: str, command: str | None) -> str:
    """tyro's boxed error as one line: its first paragraph, plus a suggestion if any."""
    paragraphs: list[list[str]] = [[]]
    for raw in text.splitlines()[1:]:  # the first line is the box's title
        inner = _BOX.sub("", raw)
        if not inner and "─" in raw and paragraphs[-1]:
            paragraphs.append([])
        elif inner:
            paragraphs[-1].append(inner)
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        return "invalid arguments"
    first = paragraphs[0]
    if first[0].startswith("Missing from"):
        head = "missing " + ", ".join(x.split()[0] for x in first[1:] if x.startswith("--"))
    else:
        head = re.sub(r"^Error parsing __tyro[^:]*: ", "", " ".join(first))
    for p in paragraphs[1:]:
        if p[0].startswith("Perhaps you meant") and len(p) > 1:
            head += f" (perhaps {p[1].split()[0]})"
        elif p[0].startswith("Available"):
            head += "; " + " ".join(p)
    return f"{head.rstrip('.')}; see `jlora {command + ' ' if command else ''}--help`."


def parse(argv: Sequence[str]) -> Any:
    """The config dataclass of the subcommand ``argv`` names, or raises CliUsageError.

    ``--help`` prints the help and raises ``SystemExit(0)``.
    """
    argv = list(argv)
    if argv and argv[0] in COMMANDS:
        rest, config = _split_config(argv[1:])
        if config is not None:
            rest = read_config_file(config, COMMANDS[argv[0]]) + rest
        argv = [argv[0], *rest]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.extras.subcommand_cli_from_dict(
                COMMANDS, prog="jlora", args=argv,
                description="LoRA fine-tuning for JAX/Flax, interoperable with PEFT and "
                            "transformers. `jlora <command> --help` documents each option.")
    except SystemExit as e:
        if e.code in (0, None):
            sys.stdout.write(err.getvalue())
            raise
        command = argv[0] if argv and argv[0] in COMMANDS else None
        raise CliUsageError(_one_line(err.getvalue(), command)) from None
