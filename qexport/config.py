"""What to quantize and how: :class:`QuantSpec`, :class:`Rule`, :class:`Recipe` and :class:`KVCacheSpec`.

A :class:`QuantSpec` describes one number format (bits, integer or NF4, granularity, symmetry, observer).
A :class:`Recipe` is an ordered list of rules, each mapping a module-name pattern to a weight spec (and,
for the graph back-ends, an activation spec). The first rule whose pattern matches a module wins; modules
that match no rule, or match an ``exclude`` pattern, stay in floating point. Everything is validated on
construction and round-trips through JSON, so a quantized artifact can record exactly how it was made.

The named recipes are in :mod:`qexport.presets`; the algorithms a recipe may name, with their options, in
:mod:`qexport.algorithms.registry`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Mapping

from qexport.errors import InvalidConfig
from qexport.ggml import GGML_TYPES

__all__ = [
    "NumberFormat",
    "Granularity",
    "Observer",
    "QuantSpec",
    "Rule",
    "Recipe",
    "load_recipe",
    "match_pattern",
    "KVCacheSpec",
]

INT_BITS = (2, 4, 8)


def __getattr__(name: str) -> Any:
    # ALGORITHMS: the registry of the algorithms a Recipe may name (qexport.algorithms.registry), imported on
    # first use because the algorithm modules import this one
    if name == "ALGORITHMS":
        from qexport.algorithms.registry import registered

        return registered()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class NumberFormat(str, Enum):
    INT = "int"  # uniform integer grid (signed when symmetric, unsigned + zero point when asymmetric)
    NF4 = "nf4"  # 4-bit NormalFloat code book, absmax scaled (QLoRA)
    # llama.cpp's GGML block formats (qexport.ggml): weights only; bits, blocks and symmetry follow the type
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    IQ4_NL = "iq4_nl"
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q6_K = "q6_k"

    @property
    def ggml(self) -> bool:
        """Whether this is one of llama.cpp's block formats."""
        return self.value in GGML_TYPES


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"  # one scale per output row of a weight
    GROUP = "group"  # one scale per ``group_size`` consecutive input elements of each row
    PER_TOKEN = "per_token"  # activations only: one scale per row (token) of the input, at run time


class Observer(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


def _enum(cls: type[Enum], value: Any, field_name: str) -> Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise InvalidConfig(f"{field_name}={value!r} is not valid; allowed: {allowed}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """One quantization format.

    Args:
        bits: 8, 4 or 2 for ``format='int'``; 4 for ``format='nf4'``.
        format: ``'int'`` (uniform grid), ``'nf4'`` (NormalFloat-4 code book), or one of llama.cpp's GGML
            block formats (``'q8_0'``, ``'q4_0'``, ``'q4_1'``, ``'q5_0'``, ``'iq4_nl'``, ``'q2_k'``, ``'q3_k'``,
            ``'q4_k'``, ``'q6_k'``; :mod:`qexport.ggml`). A GGML format sets ``bits``, ``group_size`` (its block: 32, or
            256 for the K-quants) and ``symmetric`` itself; give them only with those values. It is a weight
            format: no activation, double-quantization or restricted-range options. A layer whose input size
            is not a multiple of a K-quant's 256 is stored in llama.cpp's fallback type (q4_k -> q5_0,
            q6_k -> q8_0, q2_k and q3_k -> q4_0). The observer chooses each sub-block's range.
        granularity: ``'per_tensor'``, ``'per_channel'`` or ``'group'``. Left out, it is ``'group'`` when
            ``group_size`` is given and ``'per_channel'`` otherwise.
        group_size: elements per group along the input dimension (any positive size; when it does not
            divide the dimension the last group is partial).
        symmetric: symmetric grids store signed integers and no zero point; the element of largest
            magnitude in each group maps exactly to the most negative code (-8 for int4), as ONNX Runtime
            does, so the scale carries the sign of that element. Asymmetric grids store unsigned integers
            and an integer zero point per group. NF4 is always symmetric.
        restricted_range: symmetric integer grids only: use the codes ``[-(2^(b-1)-1), 2^(b-1)-1]`` (one
            fewer than the full range) with ``scale = absmax / (2^(b-1)-1)``, always > 0. This is the grid
            TensorRT takes as it is (positive scales, zero point 0): the full-range grid's negative scales
            must be negated for it, which saturates one code per such group. Costs a little precision
            (int4: 15 codes instead of 16).
        observer: how the range of each group is chosen: ``'minmax'``, ``'percentile'`` or ``'mse'``.
        percentile: the percentile kept by the percentile observer, in (50, 100].
        double_quant: NF4 only: store the per-group scales as int8 in blocks of ``double_quant_block``.
        dynamic: for activations: scales computed at run time rather than calibrated.
        outlier_threshold: activations only (int8, per-token, dynamic): LLM.int8()'s mixed decomposition
            (Dettmers et al. 2022). At run time every input feature column in which some ``|x| >=
            outlier_threshold`` is an outlier column: its product with the weight is computed in float (the
            dequantized int8 weight columns), the other columns as int8 x int8 with per-token scales, and
            the two are summed (:mod:`qexport.llm_int8`). ``6.0`` is the paper's and bitsandbytes' default;
            ``inf`` gives plain per-token W8A8. None (the default): no decomposition.
        static_fallback_ratio: activations only (static, calibrated): a layer whose calibrated range is more
            than this many times the range of its median calibration token keeps float activations (its
            weights stay quantized), with a warning and a report entry. A few tokens with massive
            activations (attention sinks) would otherwise set the one scale of every token, leaving the
            others a handful of codes. None (the default): every layer is quantized as calibrated.
    """

    bits: int = 8
    format: NumberFormat = NumberFormat.INT
    granularity: Granularity | None = None
    group_size: int | None = None
    symmetric: bool = True
    observer: Observer = Observer.MINMAX
    percentile: float = 99.99
    double_quant: bool = False
    double_quant_block: int = 256
    dynamic: bool = False
    outlier_threshold: float | None = None
    restricted_range: bool = False
    static_fallback_ratio: float | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("format", _enum(NumberFormat, self.format, "format"))
        set_("observer", _enum(Observer, self.observer, "observer"))
        if self.format.ggml:
            self._ggml_fields(set_)
        if self.granularity is None:
            set_("granularity", Granularity.GROUP if self.group_size is not None else Granularity.PER_CHANNEL)
        set_("granularity", _enum(Granularity, self.granularity, "granularity"))
        for name in ("symmetric", "double_quant", "dynamic", "restricted_range"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidConfig(f"{name} must be true or false, got {getattr(self, name)!r}")

        if not _is_int(self.bits):
            raise InvalidConfig(f"bits must be an integer, got {self.bits!r}")
        if self.format is NumberFormat.NF4:
            if self.bits != 4:
                raise InvalidConfig(f"bits={self.bits} is not valid for format 'nf4': NF4 is a 4-bit format (bits=4)")
            if not self.symmetric:
                raise InvalidConfig("format 'nf4' is symmetric (absmax scaled): set symmetric=true")
        elif self.bits not in INT_BITS and not self.format.ggml:
            raise InvalidConfig(f"bits={self.bits} is not valid for format 'int'; allowed: 8, 4, 2")

        if self.granularity is Granularity.GROUP:
            if not _is_int(self.group_size) or self.group_size <= 0:
                raise InvalidConfig(f"group_size must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            raise InvalidConfig(
                f"group_size={self.group_size!r} is only used with granularity 'group', "
                f"not {self.granularity.value!r}"
            )
        if not isinstance(self.percentile, (int, float)) or not 50.0 < float(self.percentile) <= 100.0:
            raise InvalidConfig(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.double_quant and self.format is not NumberFormat.NF4:
            raise InvalidConfig("double_quant is only supported with format 'nf4'")
        if self.restricted_range and (self.format is not NumberFormat.INT or not self.symmetric):
            kind = "nf4" if self.format is NumberFormat.NF4 else "asymmetric"
            raise InvalidConfig(f"restricted_range=true is for symmetric 'int' grids, not {kind} ones: set "
                                "symmetric=true and format='int', or drop restricted_range")
        if not _is_int(self.double_quant_block) or self.double_quant_block <= 0:
            raise InvalidConfig(f"double_quant_block must be a positive integer, got {self.double_quant_block!r}")
        if self.dynamic and self.observer is not Observer.MINMAX:
            raise InvalidConfig("dynamic activation scales use the 'minmax' observer")
        if self.granularity is Granularity.PER_TOKEN and not self.dynamic:
            raise InvalidConfig("granularity 'per_token' is for activations with dynamic=true")
        if self.outlier_threshold is not None:
            t = self.outlier_threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t <= 0:
                raise InvalidConfig(f"outlier_threshold must be a number > 0 (6.0 in LLM.int8(); inf turns the "
                                    f"decomposition off) or null, got {t!r}")
            if not (self.dynamic and self.granularity is Granularity.PER_TOKEN and self.bits == 8
                    and self.format is NumberFormat.INT and self.symmetric):
                raise InvalidConfig(
                    "outlier_threshold (LLM.int8() decomposition) needs an int8 symmetric per-token dynamic "
                    f"activation spec (bits=8, granularity='per_token', dynamic=true), got {self.describe()}")
            set_("outlier_threshold", float(t))
        if self.static_fallback_ratio is not None:
            r = self.static_fallback_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 1 or math.isinf(r):
                raise InvalidConfig(f"static_fallback_ratio must be a finite number > 1 or null, got {r!r}")
            if self.dynamic:
                raise InvalidConfig("static_fallback_ratio is for calibrated (static) activation specs, not "
                                    "dynamic ones")
            set_("static_fallback_ratio", float(r))

    def _ggml_fields(self, set_) -> None:
        """Check and set the fields a GGML format decides: bits, granularity, group_size, symmetric."""
        t = GGML_TYPES[self.format.value]
        name = self.format.value
        if self.bits not in (8, t.bits):  # 8: the field's default
            raise InvalidConfig(f"format {name!r} stores {t.bits}-bit codes: leave bits out or set bits={t.bits}")
        if self.group_size not in (None, t.block) or self.granularity not in (None, "group", Granularity.GROUP):
            raise InvalidConfig(f"format {name!r} stores blocks of {t.block}: leave granularity and group_size out "
                                f"or set granularity='group', group_size={t.block}")
        if t.symmetric and not self.symmetric:
            raise InvalidConfig(f"format {name!r} is symmetric (no minimum per block): set symmetric=true or use "
                                "q4_1 / q4_k / q2_k, which store one")
        for field in ("double_quant", "restricted_range", "dynamic"):
            if getattr(self, field):
                raise InvalidConfig(f"format {name!r} is one of llama.cpp's weight formats: {field} does not apply")
        set_("bits", t.bits)
        set_("granularity", Granularity.GROUP)
        set_("group_size", t.block)
        set_("symmetric", t.symmetric)

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if self.restricted_range:
            return -(2 ** (self.bits - 1) - 1)
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        """A short human-readable name, e.g. ``int4 g128 asym`` or ``nf4 g64 dq``."""
        if self.format.ggml:
            observer = [self.observer.value] if self.observer is not Observer.MINMAX else []
            return " ".join([self.format.value, *observer])
        fmt = "nf4" if self.format is NumberFormat.NF4 else f"int{self.bits}"
        gran = {
            Granularity.PER_TENSOR: "per-tensor",
            Granularity.PER_CHANNEL: "per-channel",
            Granularity.GROUP: f"g{self.group_size}",
            Granularity.PER_TOKEN: "per-token",
        }[self.granularity]
        parts = [fmt, gran]
        if self.format is NumberFormat.INT:
            parts.append("sym" if self.symmetric else "asym")
            if self.restricted_range:
                parts.append("restricted")
        if self.double_quant:
            parts.append("dq")
        if self.observer is not Observer.MINMAX:
            parts.append(self.observer.value)
        if self.dynamic:
            parts.append("dynamic")
        if self.outlier_threshold is not None:
            parts.append(f"llm.int8 outliers>={self.outlier_threshold:g}")
        if self.static_fallback_ratio is not None:
            parts.append(f"float where range>{self.static_fallback_ratio:g}x median token")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("outlier_threshold", "static_fallback_ratio") and v is None:
                continue  # only some activation specs have one: every other spec's JSON is unchanged
            out[f.name] = v.value if isinstance(v, Enum) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSpec":
        if not isinstance(d, Mapping):
            raise InvalidConfig(f"a QuantSpec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidConfig(f"unknown QuantSpec field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def _check_pattern(pattern: Any, what: str) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise InvalidConfig(f"{what} must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise InvalidConfig(f"{what} {pattern!r} is not a valid regular expression: {e}") from None


def match_pattern(pattern: str, name: str) -> bool:
    """Module-name matching: shell-style globs (``*`` also crosses dots) or ``re:<regex>`` (full match)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class Rule:
    """Modules whose name matches ``pattern`` get ``weight`` (None: keep float) and ``activation``."""

    pattern: str
    weight: QuantSpec | None
    activation: QuantSpec | None = None

    def __post_init__(self) -> None:
        _check_pattern(self.pattern, "rule pattern")
        for name in ("weight", "activation"):
            v = getattr(self, name)
            if isinstance(v, Mapping):
                object.__setattr__(self, name, QuantSpec.from_dict(v))
            elif v is not None and not isinstance(v, QuantSpec):
                raise InvalidConfig(f"rule {self.pattern!r}: {name} must be a QuantSpec or null, got {v!r}")
        if self.weight is not None and self.weight.dynamic:
            raise InvalidConfig(f"rule {self.pattern!r}: dynamic=true is for activations, not weights")
        if self.weight is not None and self.weight.outlier_threshold is not None:
            raise InvalidConfig(f"rule {self.pattern!r}: outlier_threshold is for activations, not weights")
        a = self.activation
        if a is not None:
            if a.format is not NumberFormat.INT or a.bits != 8:
                raise InvalidConfig(f"rule {self.pattern!r}: activations must be 8-bit 'int' (got {a.describe()})")
            if a.granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
                raise InvalidConfig(
                    f"rule {self.pattern!r}: activation granularity must be 'per_tensor' or 'per_token', "
                    f"not {a.granularity.value!r}"
                )
            w = self.weight
            if (w is None or w.format is not NumberFormat.INT or w.bits != 8 or not w.symmetric
                    or w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR)):
                # the int8 x int8 kernels apply one weight scale per output channel and no weight zero point
                raise InvalidConfig(
                    f"rule {self.pattern!r}: quantized activations need symmetric per-channel or per-tensor int8 "
                    f"weights, got {w.describe() if w else 'float weights'}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "weight": self.weight.to_dict() if self.weight else None,
            "activation": self.activation.to_dict() if self.activation else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Rule":
        if not isinstance(d, Mapping) or "pattern" not in d or "weight" not in d:
            raise InvalidConfig(f"a rule must be an object with 'pattern' and 'weight' (null keeps it float), "
                                f"got {d!r}")
        unknown = sorted(set(d) - {"pattern", "weight", "activation"})
        if unknown:
            raise InvalidConfig(f"unknown rule field(s) {unknown}; allowed: ['activation', 'pattern', 'weight']")
        return cls(pattern=d["pattern"], weight=d.get("weight"), activation=d.get("activation"))


KV_BITS = (8, 4)


@dataclass(frozen=True)
class KVCacheSpec:
    """How the attention KV cache is stored (``qexport.kvcache``): integer codes plus scales, one scale per
    token, per head and per group of ``group_size`` consecutive elements of ``head_dim``.

    Args:
        bits: 8 or 4 (4-bit codes are packed two per byte along ``head_dim``).
        group_size: elements of ``head_dim`` per scale; None: the whole head (one scale per token and head).
            It must divide the model's ``head_dim`` (checked when the cache first sees a key).
        symmetric: signed codes in [-(2^(b-1)-1), 2^(b-1)-1] and no zero point; otherwise (the default)
            unsigned codes in [0, 2^b-1] with an integer zero point per group, the range widened to include 0
            (ONNX ``QuantizeLinear`` semantics).
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in KV_BITS:
            raise InvalidConfig(f"kv_cache bits={self.bits!r} is not valid; allowed: 8, 4")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise InvalidConfig(f"kv_cache group_size must be a positive integer or null (whole head), "
                                f"got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise InvalidConfig(f"kv_cache symmetric must be true or false, got {self.symmetric!r}")

    def groups(self, head_dim: int) -> int:
        """Scales per token and head for ``head_dim``; InvalidConfig when the spec does not fit it."""
        gs = self.group_size or head_dim
        if head_dim % gs:
            raise InvalidConfig(f"kv_cache group_size={gs} does not divide the model's head_dim={head_dim}; "
                                f"use a divisor of {head_dim} or null (one group per head)")
        if self.bits == 4 and head_dim % 2:
            raise InvalidConfig(f"kv_cache bits=4 packs two codes per byte and needs an even head_dim, "
                                f"got {head_dim}")
        return head_dim // gs

    def describe(self) -> str:
        """A short name, e.g. ``kv int8 per-head asym`` or ``kv int4 g32 sym``."""
        gran = f"g{self.group_size}" if self.group_size else "per-head"
        return f"kv int{self.bits} {gran} {'sym' if self.symmetric else 'asym'}"

    def suffix(self) -> str:
        """What a recipe name gets when this spec is added to it: ``-kv8``, ``-kv4g32``, ``-kv8sym`` ..."""
        return f"-kv{self.bits}" + (f"g{self.group_size}" if self.group_size else "") + \
            ("sym" if self.symmetric else "")

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KVCacheSpec":
        if not isinstance(d, Mapping):
            raise InvalidConfig(f"kv_cache must be a JSON object or null, got {type(d).__name__}")
        unknown = sorted(set(d) - {"bits", "group_size", "symmetric"})
        if unknown:
            raise InvalidConfig(f"unknown kv_cache field(s) {unknown}; allowed: ['bits', 'group_size', 'symmetric']")
        return cls(**d)

    @classmethod
    def parse(cls, value: "KVCacheSpec | Mapping | str | None") -> "KVCacheSpec | None":
        """A spec from a spec, a dict, a name in :data:`qexport.presets.KV_CACHE_PRESETS` (``'int8'``,
        ``'int4'`` ...), or None."""
        if value is None or isinstance(value, KVCacheSpec):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        from qexport.presets import KV_CACHE_PRESETS

        if isinstance(value, str) and value in KV_CACHE_PRESETS:
            return KV_CACHE_PRESETS[value]
        raise InvalidConfig(f"kv_cache={value!r} is not valid; use one of {', '.join(KV_CACHE_PRESETS)} or an "
                            "object {bits, group_size, symmetric}")


DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "*embed*")
# Patterns that match every module name: they apply to linear layers, never to embeddings (Recipe.rule_for).
CATCH_ALL_PATTERNS = frozenset({"*", "**", "re:.*", "re:.+"})


@dataclass(frozen=True)
class Recipe:
    """Ordered module-name rules; the first match wins; ``exclude`` patterns always stay float.

    By default ``lm_head`` and embeddings stay float (they are tied in many small LLMs and dominate the
    error budget); remove them from ``exclude`` and add a rule to quantize them. An embedding is quantized
    only by a rule that names it (catch-all patterns reach linears only, :meth:`rule_for`), always rounded to
    nearest; a tied embedding and ``lm_head`` given one spec share one stored weight (preset
    ``w4g64-sym-emb8``).

    ``algorithm`` chooses how the integer codes are found: ``'rtn'`` (round to nearest, no data),
    ``'gptq'``, ``'awq'`` or ``'smoothquant'`` (they need calibration data, ``quantize(model, recipe,
    calibration=...)``, and integer formats): any name in the registry :data:`qexport.algorithms.ALGORITHMS`.
    ``options`` are that algorithm's settings (its registered options); the ones left out take their
    defaults. Every algorithm stores the same format, the one the rules describe.
    """

    name: str
    rules: tuple[Rule, ...]
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    algorithm: str = "rtn"
    description: str = ""
    # Options of the algorithm (its registered options), stored with every default filled in, as a read-only
    # mapping. Left out of the hash (a mapping is not hashable); equality compares it.
    options: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    # How the attention KV cache is stored (qexport.kvcache); None: float. A spec, a dict or a preset name.
    kv_cache: KVCacheSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidConfig(f"recipe name must be a non-empty string, got {self.name!r}")
        if isinstance(self.rules, (str, bytes)) or not isinstance(self.rules, Iterable):
            raise InvalidConfig(f"recipe {self.name!r}: rules must be a list of rules")
        rules = tuple(Rule.from_dict(r) if isinstance(r, Mapping) else r for r in self.rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise InvalidConfig(f"recipe {self.name!r}: {r!r} is not a rule")
        if not rules:
            raise InvalidConfig(f"recipe {self.name!r} has no rules: add at least one, e.g. pattern '*'")
        object.__setattr__(self, "rules", rules)
        if isinstance(self.exclude, str) or not isinstance(self.exclude, Iterable):
            raise InvalidConfig(f"recipe {self.name!r}: exclude must be a list of patterns")
        exclude = tuple(self.exclude)
        for p in exclude:
            _check_pattern(p, "exclude pattern")
        object.__setattr__(self, "exclude", exclude)
        from qexport.algorithms.registry import lookup

        algorithm = lookup(self.algorithm, f"recipe {self.name!r}: ")
        object.__setattr__(self, "options", algorithm.resolve(self.options, self.name))
        try:
            object.__setattr__(self, "kv_cache", KVCacheSpec.parse(self.kv_cache))
        except InvalidConfig as e:
            raise InvalidConfig(f"recipe {self.name!r}: {e}") from None
        if algorithm.check is not None:
            algorithm.check(self)

    @property
    def rotation(self) -> str:
        """The rotation :func:`qexport.quantize` applies before quantizing: option ``rotate`` (default 'none')."""
        return self.options.get("rotate", "none")

    @property
    def algorithm_needs_data(self) -> bool:
        """True when the algorithm (gptq, awq, smoothquant) needs calibration data at ``quantize()`` time."""
        from qexport.algorithms.registry import lookup

        return lookup(self.algorithm).needs_data

    @property
    def needs_calibration(self) -> bool:
        """True when some rule quantizes activations with calibrated (static) scales (:func:`qexport.calibrate`)."""
        return any(r.activation is not None and not r.activation.dynamic for r in self.rules)

    @property
    def needs_data(self) -> bool:
        """True when making a usable model with this recipe takes calibration data: for the algorithm
        (:attr:`algorithm_needs_data`) or for static activation scales (:attr:`needs_calibration`)."""
        return self.algorithm_needs_data or self.needs_calibration

    def rule_for(self, module_name: str, embedding: bool = False) -> Rule | None:
        """The rule that applies to ``module_name``, or None when it stays float.

        ``embedding``: the module is an embedding table (``nn.Embedding``). Embeddings follow the same rules,
        except that a catch-all pattern (``*``, ``re:.*``) does not reach them: a recipe quantizes an embedding
        only by a rule that names it (``*embed_tokens``), so recipes written for linear layers keep every
        embedding float, whatever its name (``wte``, ``embed_positions`` ...)."""
        if any(match_pattern(p, module_name) for p in self.exclude):
            return None
        for rule in self.rules:
            if embedding and rule.pattern in CATCH_ALL_PATTERNS:
                continue
            if match_pattern(rule.pattern, module_name):
                return rule
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "description": self.description,
            "algorithm": self.algorithm,
            "exclude": list(self.exclude),
            "rules": [r.to_dict() for r in self.rules],
        }
        # options marked omit_default (rotation) are left out at their defaults: recipes without rotation are
        # written as before
        from qexport.algorithms.registry import lookup

        options = lookup(self.algorithm).written(self.options)
        if options:
            d["options"] = options
        if self.kv_cache is not None:  # likewise without a KV-cache spec
            d["kv_cache"] = self.kv_cache.to_dict()
        return d

    def weights_only(self) -> "Recipe":
        """The same weight formats, rounded to nearest, activations float: what this recipe stores, for sizing."""
        return Recipe(name=self.name, rules=tuple(Rule(r.pattern, r.weight) for r in self.rules), exclude=self.exclude)

    def with_kv_cache(self, kv_cache: "KVCacheSpec | Mapping | str | None") -> "Recipe":
        """This recipe with its KV cache stored as ``kv_cache`` (None: float), named e.g. ``w4g128-kv8``."""
        spec = KVCacheSpec.parse(kv_cache)
        base = self.name[: -len(self.kv_cache.suffix())] if self.kv_cache and self.name.endswith(
            self.kv_cache.suffix()) else self.name
        return dataclasses.replace(self, name=base + (spec.suffix() if spec else ""), kv_cache=spec)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        if not isinstance(d, Mapping):
            raise InvalidConfig(f"a recipe must be a JSON object, got {type(d).__name__}")
        allowed = {"name", "description", "algorithm", "exclude", "rules", "options", "kv_cache"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise InvalidConfig(f"unknown recipe field(s) {unknown}; allowed: {sorted(allowed)}")
        if "rules" not in d or "name" not in d:
            raise InvalidConfig("a recipe needs 'name' and 'rules'")
        kwargs = dict(d)
        if "exclude" in kwargs and isinstance(kwargs["exclude"], list):
            kwargs["exclude"] = tuple(kwargs["exclude"])
        return cls(**kwargs)

    def to_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the recipe as JSON atomically; refuses to replace an existing file unless ``overwrite``."""
        from qexport._io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", overwrite=overwrite)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise InvalidConfig(f"recipe file {str(p)!r} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidConfig(f"recipe file {str(p)!r} is not valid JSON: {e}") from None
        if isinstance(data, Mapping) and isinstance(data.get("recipe"), Mapping) and "provenance" in data:
            data = data["recipe"]  # the recipe.json of a saved quantized folder: the recipe with its provenance
        return cls.from_dict(data)


def load_recipe(recipe: "Recipe | str | os.PathLike") -> Recipe:
    """A Recipe from a Recipe, a preset name, or a path to a JSON file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        s = str(recipe)
        from qexport.presets import PRESETS, get_preset

        if s in PRESETS:
            return get_preset(s)
        if s.endswith(".json") or os.sep in s or Path(s).exists():
            return Recipe.from_json(s)
        return get_preset(s)
    raise InvalidConfig(f"recipe must be a Recipe, a preset name or a JSON path, got {type(recipe).__name__}")
