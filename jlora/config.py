"""LoraConfig: what to adapt and how, validated on construction, convertible to PEFT's
``adapter_config.json`` and back."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jlora import schema
from jlora.errors import ConfigError

_INITS = ("default", "gaussian", "pissa", "olora", "random")
_BIAS_MODES = ("none", "all", "lora_only")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)$")


def _tuple_or_str(name: str, value: Any, allow_none: bool = True) -> str | tuple[str, ...] | None:
    if value is None:
        if allow_none:
            return None
        raise ConfigError(
            f"{name} is required: give module names (['q_proj', 'v_proj']), a "
            "regex string, or 'all-linear'."
        )
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{name}='' matches nothing: give module names or a regex.")
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(
                f"{name}={value!r} is not a valid regex ({e}); a string is "
                "matched with re.fullmatch on the module path."
            ) from None
        return value
    if isinstance(value, Sequence | set | frozenset) and not isinstance(value, bytes | bytearray):
        items = tuple(value)
        bad = [v for v in items if not isinstance(v, str) or not v]
        if bad:
            raise ConfigError(f"{name} entries must be non-empty strings, got {bad!r:.80}.")
        return tuple(sorted(items)) if isinstance(value, set | frozenset) else items
    raise ConfigError(f"{name} must be a string or a list of strings, got {type(value).__name__}.")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters, at what rank and scale, and how they start.

    Attributes:
      rank: adapter rank ``r`` (PEFT's ``r``), > 0.
      alpha: ``lora_alpha``; the update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)``
        with ``use_rslora``).
      targets: PEFT ``target_modules``: a list of module names (matched exactly or as a
        ``.``-suffix of the module path), a regex string (``re.fullmatch``), or
        ``"all-linear"`` (every linear kernel but the output head).
      exclude: PEFT ``exclude_modules``, same forms as ``targets``.
      layers: PEFT ``layers_to_transform``: layer indices (int or list) to adapt.
      layers_pattern: PEFT ``layers_pattern``: the path segment before the layer index.
      rank_pattern: ``{pattern: rank}`` per-module ranks (PEFT ``rank_pattern``).
      alpha_pattern: ``{pattern: alpha}`` per-module alphas (PEFT ``alpha_pattern``).
      dropout: dropout probability on the adapter input during training (``lora_dropout``).
      init: ``"default"`` (A kaiming-uniform a=sqrt(5), B zero, as PEFT), ``"gaussian"``
        (A ~ N(0, (1/r)^2)), ``"pissa"`` / ``"pissa_niter_N"`` and ``"olora"`` (which also
        rewrite the base kernel to its residual), or ``"random"`` (B non-zero too; PEFT's
        ``init_lora_weights=False``, for tests).
      use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
      use_dora: DoRA (Liu et al. 2024, PEFT's ``use_dora``): a trainable per-output-feature
        magnitude rescales ``W + scale * A @ B`` to unit column norms times the magnitude
        (Dense, DenseGeneral and Einsum kernels).
      modules_to_save: PEFT ``modules_to_save``: modules (a module path ending with an entry,
        as PEFT's string suffix match) whose params get a full trainable copy, e.g. a
        classification head; they are no LoRA targets.
      bias: PEFT ``bias``: ``"none"``, ``"all"`` (every ``bias`` param gets a trainable copy)
        or ``"lora_only"`` (the biases of the adapted modules).

    Example:
      >>> cfg = LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"], dropout=0.05)
      >>> cfg.scaling_for(8, 16)
      2.0
      >>> LoraConfig.from_peft(cfg.to_peft()) == cfg
      True
    """

    rank: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    layers: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    dropout: float = 0.0
    init: str = "default"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    bias: str = "none"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(
                f"rank={self.rank!r}: the adapter rank must be a positive int "
                "(typical values 4-64)."
            )
        if not _alpha_ok(self.alpha):
            raise ConfigError(
                f"alpha={self.alpha!r}: lora_alpha must be a positive number a float32 holds "
                "(the update is scaled by alpha / rank; alpha = rank means 1.0)."
            )
        set_("alpha", float(self.alpha))
        set_("targets", _tuple_or_str("targets", self.targets, allow_none=False))
        set_("exclude", _tuple_or_str("exclude", self.exclude))
        set_("layers_pattern", _tuple_or_str("layers_pattern", self.layers_pattern))
        layers = self.layers
        if layers is not None:
            items = (layers,) if isinstance(layers, int) else layers
            if not isinstance(items, Sequence) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise ConfigError(
                    f"layers={layers!r}: give a layer index or a list of "
                    "non-negative layer indices (PEFT's layers_to_transform)."
                )
            if not isinstance(layers, int):
                set_("layers", tuple(layers))
            if isinstance(self.targets, str):
                raise ConfigError(
                    "layers only applies to a list of targets (as in PEFT): "
                    "put the layer index in the regex instead, e.g. "
                    r"r'.*\.layers\.(0|1)\..*q_proj'."
                )
        if self.layers_pattern and self.layers is None:
            raise ConfigError(
                "layers_pattern only narrows `layers` (as in PEFT): set "
                "layers=[...] too, or drop layers_pattern."
            )
        for name, cast in (("rank_pattern", int), ("alpha_pattern", float)):
            pat = getattr(self, name)
            if not isinstance(pat, Mapping):
                raise ConfigError(f"{name} must be a dict {{pattern: value}}, got {pat!r}.")
            out = {}
            for k, v in pat.items():
                if not isinstance(k, str) or not k:
                    raise ConfigError(f"{name} keys must be non-empty strings, got {k!r}.")
                try:
                    re.compile(k)
                except re.error as e:
                    raise ConfigError(f"{name} key {k!r} is not a valid regex ({e}).") from None
                ok = schema.is_int(v) and v > 0 if cast is int else _alpha_ok(v)
                if not ok:
                    kind = "a positive int" if cast is int else "a positive number (float32)"
                    raise ConfigError(f"{name}[{k!r}]={v!r}: must be {kind}.")
                out[k] = cast(v)
            set_(name, out)
        if not schema.is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}: lora_dropout must be a number in [0, 1).")
        set_("dropout", float(self.dropout))
        init = self.init
        if init is True:
            init = "default"
        elif init is False:
            init = "random"
        if not isinstance(init, str) or not (init in _INITS or _PISSA_NITER.match(init)):
            raise ConfigError(
                f"init={self.init!r}: choose one of {', '.join(_INITS)} or "
                "'pissa_niter_N' (randomised SVD with N subspace iterations)."
            )
        set_("init", init)
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r}: must be True or False "
                    "(a bool, not a string or a number)."
                )
        saved = self.modules_to_save
        if saved is not None:
            if isinstance(saved, str) or not isinstance(saved, Sequence | set | frozenset) or \
                    not all(isinstance(m, str) and m for m in saved):
                raise ConfigError(
                    f"modules_to_save={saved!r}: give a list of module names (PEFT matches "
                    "each as a suffix of the module path), e.g. ['classifier'], or None."
                )
            saved = tuple(sorted(saved)) if isinstance(saved, set | frozenset) else tuple(saved)
            set_("modules_to_save", saved or None)
        if self.bias not in _BIAS_MODES:
            raise ConfigError(
                f"bias={self.bias!r}: choose 'none', 'all' (train every bias) or 'lora_only' "
                "(train the biases of the adapted modules), as PEFT's bias."
            )

    # ---------------------------------------------------------------- per-module values
    def rank_for(self, module_path: str) -> int:
        """The rank of one module: the first matching ``rank_pattern`` key, else ``rank``."""
        from jlora.paths import pattern_key

        key = pattern_key(self.rank_pattern, module_path)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, module_path: str) -> float:
        """The alpha of one module: the first matching ``alpha_pattern`` key, else ``alpha``."""
        from jlora.paths import pattern_key

        key = pattern_key(self.alpha_pattern, module_path)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, rank: int, alpha: float) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def matches(self, module_path: str) -> bool:
        """Whether a module path is a target (PEFT's rules, :func:`jlora.paths.target_matches`)."""
        from jlora.paths import ALL_LINEAR, target_matches

        if self.targets == ALL_LINEAR:
            raise ConfigError("'all-linear' is resolved against a params tree: use plan().")
        return target_matches(
            module_path,
            self.targets,
            exclude=self.exclude,
            layers=self.layers,
            layers_pattern=self.layers_pattern,
        )

    # ---------------------------------------------------------------- PEFT interop
    def to_peft(self, **extra: Any) -> dict[str, Any]:
        """A PEFT ``adapter_config.json`` dict (``LoraConfig`` fields, PEFT names).

        ``extra`` entries (``base_model_name_or_path``, ``task_type``, ``fan_in_fan_out``,
        ``target_modules`` resolved for "all-linear"...) override the defaults.
        """
        init: Any = {"default": True, "random": False}.get(self.init, self.init)
        layers = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        seq = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        d = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": None,
            "r": self.rank,
            "lora_alpha": _num(self.alpha),
            "target_modules": seq(self.targets),
            "exclude_modules": seq(self.exclude),
            "layers_to_transform": layers,
            "layers_pattern": seq(self.layers_pattern),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": {k: _num(v) for k, v in self.alpha_pattern.items()},
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": init,
            "fan_in_fan_out": False,
            "bias": self.bias,
            "modules_to_save": seq(self.modules_to_save),
            "inference_mode": True,
        }
        d.update(extra)
        return d

    @classmethod
    def from_peft(cls, d: Mapping[str, Any], *, source: str = "adapter_config.json") -> LoraConfig:
        """Builds a config from a PEFT ``adapter_config.json`` dict, every field checked.

        Each field of peft's ``LoraConfig`` (peft 0.21) is either read (``r``, ``lora_alpha``,
        targets, layers, patterns, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``),
        metadata that does not change the math (type-checked), or a feature jlora does not
        implement, accepted only when off (``layer_replication``, LoftQ/CorDA/LoRA-GA inits,
        aLoRA, other LoRA variants...). ``use_dora``, ``bias`` and ``modules_to_save`` are read.
        A field peft 0.21 does not have (a newer peft's) is accepted only when off (null,
        false, empty): jlora cannot tell whether it changes the math. See
        :data:`PEFT_FIELDS`.

        Args:
          d: the parsed ``adapter_config.json``.
          source: how errors name the file (``load_peft`` passes its path).

        Raises:
          ConfigError: naming ``source``, the field and the fix.
        """
        from jlora.peft_config import read_peft

        try:
            return cls(**read_peft(d, source))
        except ConfigError as e:
            if str(e).startswith(source):
                raise
            raise ConfigError(f"{source}: {e}") from None

    def to_json(self) -> str:
        """The config as JSON (jlora field names); :meth:`from_json` reads it back."""
        d = dataclasses.asdict(self)
        return json.dumps(
            {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}, sort_keys=True
        )

    @classmethod
    def from_json(cls, s: str | bytes | Mapping[str, Any]) -> LoraConfig:
        """Reads :meth:`to_json` output (or its dict); every field is checked as in the
        constructor.

        Raises:
          ConfigError: not JSON, not an object, an unknown field, or a field's value.
        """
        if isinstance(s, str | bytes | bytearray):
            try:
                d = json.loads(s)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
                raise ConfigError(f"LoraConfig JSON does not parse ({e}).") from None
        elif isinstance(s, Mapping):
            d = s
        else:
            raise ConfigError(
                f"LoraConfig.from_json takes a JSON string or a dict, got {type(s).__name__}."
            )
        if not isinstance(d, Mapping):
            raise ConfigError(f"LoraConfig JSON must be an object, got {type(d).__name__}.")
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - fields))
        if unknown:
            raise ConfigError(f"unknown LoraConfig fields {unknown}; known: {sorted(fields)}.")
        return cls(**d)

    def __hash__(self) -> int:
        return hash(self.to_json())


def _alpha_ok(x: Any) -> bool:
    """A positive number a float32 holds (scales are float32 leaves)."""
    return schema.is_number(x) and 0 < x <= schema.F32_MAX


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
