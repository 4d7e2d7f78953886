"""Typed checks for the fields of JSON configs: config.json, adapter_config.json, LoraConfig.

A reader declares its fields as a table ``{name: Field}``; :func:`read` checks a dict against
it before any work and returns the values with defaults filled in, or raises the reader's
:class:`~jlora.errors.JloraError` subclass with a message that names the file, the field, the
value and the fix. Booleans are never numbers here (``True`` is not ``1``), and an int field
takes no float, not even ``4.0``.

Example:
  >>> from jlora.errors import ConfigError
  >>> fields = {"r": integer(), "use_rslora": boolean(default=False)}
  >>> read({"r": 4}, fields, source="adapter_config.json", error=ConfigError)
  {'r': 4, 'use_rslora': False}
  >>> read({"r": 4.7}, fields, source="adapter_config.json", error=ConfigError)
  Traceback (most recent call last):
  ...
  jlora.errors.ConfigError: adapter_config.json: r=4.7 (a float) must be a positive int; ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from jlora.errors import JloraError

__all__ = [
    "REQUIRED",
    "F32_MAX",
    "Field",
    "read",
    "bad",
    "missing",
    "integer",
    "number",
    "float32",
    "probability",
    "boolean",
    "string",
    "choice",
    "mapping",
    "or_null",
    "unsupported",
    "is_int",
    "is_number",
    "is_off",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a field that must be present."""

F32_MAX = 3.4028234663852886e38
"""The largest float32: a bound for fields that enter float32 arithmetic."""


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def is_off(v: Any) -> bool:
    """Whether a PEFT-style feature field is switched off: null, false, 0, "", "none", [] or {}."""
    return v is None or v is False or v == "none" or (not isinstance(v, bool) and _empty(v))


def _empty(v: Any) -> bool:
    try:
        return not v
    except Exception:  # noqa: BLE001 (an object without truth value is not "off")
        return False


@dataclasses.dataclass(frozen=True)
class Field:
    """What one field may hold.

    Attributes:
      want: completes "must be ...", e.g. ``"a positive int"``.
      ok: the test of a present (and, with ``null``, non-null) value, types included.
      default: the value of an absent field; :data:`REQUIRED` when it must be present.
      null: JSON ``null`` reads as ``default`` (transformers' and PEFT's optional fields).
      aliases: other names of the field (transformers' ``attribute_map``); giving two of
        them with different values is an error.
      fix: how to fix a bad value, when it is more than correcting the field.
    """

    want: str
    ok: Callable[[Any], bool]
    default: Any = REQUIRED
    null: bool = False
    aliases: tuple[str, ...] = ()
    fix: str | None = None


def integer(lo: int | None = 1, hi: int | None = None, **kw: Any) -> Field:
    """An int (never a bool or a float) in ``[lo, hi]``; ``lo=1``: a positive int."""
    want = (
        {1: "a positive int", 0: "a non-negative int"}.get(lo, "an int")
        if hi is None
        else (f"an int in [{lo}, {hi}]")
    )
    ok = lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    return Field(kw.pop("want", want), ok, **kw)


def number(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    **kw: Any,
) -> Field:
    """A finite int or float (never a bool) in the interval from ``lo`` to ``hi``."""
    if lo == 0 and hi is None:
        want = "a positive number" if lo_open else "a non-negative number"
    else:
        left = "" if lo is None else f"{'(' if lo_open else '['}{lo}, "
        right = "" if hi is None else f"{hi}{')' if hi_open else ']'}"
        want = f"a number in {left or '(-inf, '}{right or 'inf)'}"

    def ok(v: Any) -> bool:
        if not is_number(v):
            return False
        above = lo is None or (v > lo if lo_open else v >= lo)
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    return Field(kw.pop("want", want), ok, **kw)


def float32(lo: float = 0.0, *, lo_open: bool = True, **kw: Any) -> Field:
    """A number above ``lo`` (positive by default) that a float32 holds (at most
    :data:`F32_MAX`): epsilons, scales and frequencies that enter float32 arithmetic."""
    above = "positive" if (lo, lo_open) == (0.0, True) else f"{'>' if lo_open else '>='} {lo}"
    want = kw.pop("want", f"a {above} number a float32 holds (at most 3.4e38)")
    return number(lo, F32_MAX, lo_open=lo_open, want=want, **kw)


def probability(**kw: Any) -> Field:
    """A dropout probability: a number in [0, 1)."""
    return number(0, 1, hi_open=True, **kw)


def boolean(**kw: Any) -> Field:
    """``true`` or ``false`` (not 0/1, not "yes")."""
    return Field(kw.pop("want", "true or false"), lambda v: isinstance(v, bool), **kw)


def string(**kw: Any) -> Field:
    """Any string."""
    return Field(kw.pop("want", "a string"), lambda v: isinstance(v, str), **kw)


def choice(*values: Any, **kw: Any) -> Field:
    """One of ``values`` (compared with ``==`` and the same type, so ``1`` is not ``True``)."""
    want = "one of " + ", ".join(repr(v) for v in values)
    ok = lambda v: any(type(v) is type(c) and v == c for c in values)
    return Field(kw.pop("want", want), ok, **kw)


def mapping(**kw: Any) -> Field:
    """A JSON object."""
    return Field(kw.pop("want", "an object (a dict)"), lambda v: isinstance(v, Mapping), **kw)


def or_null(f: Field, **kw: Any) -> Field:
    """``f``, or null as a value of its own (unlike ``null=True``, which reads it as the
    default): transformers' ``sliding_window`` is 4096 when absent and off when null."""
    return dataclasses.replace(f, want=f"null or {f.want}", ok=lambda v: v is None or f.ok(v), **kw)


def unsupported(feature: str, fix: str, **kw: Any) -> Field:
    """A field that switches on a ``feature`` jlora does not implement: accepted only when off
    (null, false, "none", empty; see :func:`is_off`)."""
    kw.setdefault("default", None)
    return Field(f"off (null/false/empty): {feature}", is_off, null=True, fix=fix, **kw)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a bool"
    if isinstance(v, int):
        return "an int"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, Mapping):
        return "an object"
    if isinstance(v, list | tuple):
        return "a list"
    return f"a {type(v).__name__}"


def _show(v: Any, limit: int = 60) -> str:
    try:
        text = repr(v)
    except Exception:  # noqa: BLE001
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bad(
    error: type[JloraError], source: str, name: str, value: Any, want: str, fix: str | None = None
) -> JloraError:
    """The error for field ``name`` of ``source`` holding ``value``, which must be ``want``."""
    fix = fix or f"correct {name} in {_file(source)}"
    return error(f"{source}: {name}={_show(value)} ({_kind(value)}) must be {want}; {fix}.")


def missing(
    error: type[JloraError], source: str, name: str, want: str, fix: str | None = None
) -> JloraError:
    """The error for a required field ``name`` that ``source`` lacks."""
    fix = fix or f"add it to {_file(source)}"
    return error(f"{source} has no {name!r}, which must be {want}; {fix}.")


def _file(source: str) -> str:
    name = source.strip("'\"").replace("\\", "/").rsplit("/", 1)[-1]
    return name or source


def read(
    d: Mapping[str, Any],
    fields: Mapping[str, Field],
    *,
    source: str,
    error: type[JloraError],
    prefix: str = "",
) -> dict[str, Any]:
    """Checks the entries of ``d`` named in ``fields``; returns them with defaults filled in.

    Entries ``fields`` does not name are ignored (the caller decides about them).

    Args:
      d: the parsed JSON object.
      fields: ``{name: Field}``.
      source: how messages name the file (its path, or ``"config.json"``).
      error: the :class:`JloraError` subclass to raise.
      prefix: put before field names in messages (``"rope_parameters."`` for a nested dict).

    Raises:
      error: a missing required field, a value of the wrong type or out of range, or two
        aliases of one field with different values.
    """
    if not isinstance(d, Mapping):
        raise error(
            f"{source}: {prefix.rstrip('.') or 'the file'} must be a JSON object, got {_kind(d)}."
        )
    out: dict[str, Any] = {}
    for name, f in fields.items():
        given = [n for n in (name, *f.aliases) if n in d]
        if len(given) > 1 and any(d[n] != d[given[0]] for n in given[1:]):
            shown = ", ".join(f"{prefix}{n}={_show(d[n])}" for n in given)
            raise error(
                f"{source}: {shown} name one setting with different values; keep "
                f"{prefix}{name} only."
            )
        if not given or (f.null and d[given[0]] is None):
            if f.default is REQUIRED:
                raise missing(error, source, prefix + name, f.want, f.fix)
            out[name] = f.default
            continue
        value = d[given[0]]
        if not f.ok(value):
            raise bad(error, source, prefix + given[0], value, f.want, f.fix)
        out[name] = value
    return out
