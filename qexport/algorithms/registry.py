"""The registry of quantization algorithms: what a recipe's ``algorithm`` may name, and each one's options.

Every algorithm module registers itself, beside its code, with :func:`register`: its name, its options
(each an :class:`Option` with a default, a type and its allowed values), whether it needs calibration data
at :func:`qexport.quantize` time, and an optional check of the recipes that use it. :class:`~qexport.config.Recipe`
validates ``algorithm`` and ``options`` against :data:`ALGORITHMS`; the built-in algorithms (``rtn``,
``gptq``, ``awq``, ``smoothquant``) are registered when :mod:`qexport.algorithms` is imported.

    @register("myalgo", options={"steps": Option(4, int, 1, None, "passes over the data")}, needs_data=True)
    def quantize_model_myalgo(model, tasks, batches, options, progress=False): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from qexport.errors import InvalidConfig

if TYPE_CHECKING:
    from qexport.config import Recipe

__all__ = ["Option", "AlgorithmOptions", "Algorithm", "ALGORITHMS", "register", "registered", "lookup",
           "get_algorithm", "integer_grids_only", "integer_or_ggml_grids"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Option:
    """One algorithm option: its default, its type (bool, int, float or str) and its allowed values.

    ``omit_default``: left out of a recipe's JSON while at its default, so that recipes that do not use it
    are written as they were before it existed (the rotation options)."""

    default: Any
    kind: type
    lo: float | None = None  # inclusive bounds; None: unbounded
    hi: float | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()  # the allowed values of a str option
    omit_default: bool = False

    def check(self, where: str, value: Any) -> Any:
        """``value`` validated (ints accepted for floats); ``where`` names the option in error messages."""
        if self.kind is str:
            if value not in self.choices:
                raise InvalidConfig(f"{where} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidConfig(f"{where} must be true or false, got {value!r}")
            return value
        if self.kind is int and not _is_int(value):
            raise InvalidConfig(f"{where} must be an integer, got {value!r}")
        if self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidConfig(f"{where} must be a number, got {value!r}")
            value = float(value)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            bounds = f">= {self.lo}" if self.hi is None else f"in [{self.lo}, {self.hi}]"
            raise InvalidConfig(f"{where} must be {bounds}, got {value!r}")
        return value


class AlgorithmOptions(Mapping):
    """A read-only mapping of option name -> value (picklable and copyable, unlike ``MappingProxyType``)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return repr(self._values)


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm.

    ``run(model, tasks, batches, options, progress=False) -> {name: QuantizedWeight | QExportError}``:
    ``tasks`` are the linears the recipe quantizes (:class:`~qexport.algorithms.common.LayerTask`),
    ``batches`` the calibration batches (None when ``needs_data`` is false), ``options`` the recipe's
    validated options. ``check(recipe)`` raises :class:`~qexport.errors.InvalidConfig` for a recipe the
    algorithm cannot carry out."""

    name: str
    run: Callable[..., dict]
    options: Mapping[str, Option] = field(default_factory=dict)
    needs_data: bool = False
    check: Callable[["Recipe"], None] | None = None
    doc: str = ""

    def defaults(self) -> dict[str, Any]:
        return {k: opt.default for k, opt in self.options.items()}

    def resolve(self, options: Any, recipe_name: str) -> AlgorithmOptions:
        """``options`` (a mapping, or None) validated, every option left out at its default."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise InvalidConfig(f"recipe {recipe_name!r}: options must be an object, got {type(options).__name__}")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = sorted(self.options) if self.options else "none"
            raise InvalidConfig(f"recipe {recipe_name!r}: unknown option(s) {unknown} for algorithm {self.name!r}; "
                                f"allowed: {allowed}")
        return AlgorithmOptions({
            k: opt.check(f"recipe {recipe_name!r}: option {k!r} of algorithm {self.name!r}",
                         options.get(k, opt.default))
            for k, opt in self.options.items()
        })

    def written(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options a recipe's JSON records: all but those marked ``omit_default`` that are at their default."""
        return {k: v for k, v in options.items()
                if not (k in self.options and self.options[k].omit_default and v == self.options[k].default)}


# name -> Algorithm, in the order of registration
ALGORITHMS: dict[str, Algorithm] = {}


def register(name: str, *, options: Mapping[str, Option] | None = None, needs_data: bool,
             check: Callable[["Recipe"], None] | None = None, doc: str = "") -> Callable:
    """Decorator: registers the decorated ``run`` function as algorithm ``name`` (see :class:`Algorithm`)."""

    def deco(run: Callable) -> Callable:
        if name in ALGORITHMS and ALGORITHMS[name].run is not run:
            raise InvalidConfig(f"algorithm {name!r} is already registered; choose another name")
        ALGORITHMS[name] = Algorithm(name, run, dict(options or {}), needs_data, check, doc)
        return run

    return deco


def registered() -> dict[str, Algorithm]:
    """:data:`ALGORITHMS`, the built-in algorithms included (their modules register them when imported)."""
    import importlib

    importlib.import_module("qexport.algorithms")
    return ALGORITHMS


def lookup(name: Any, where: str = "") -> Algorithm:
    """The registered algorithm ``name``; InvalidConfig listing the registered ones when there is none.
    ``where`` prefixes the message (``"recipe 'x': "``)."""
    try:
        return registered()[name]
    except (KeyError, TypeError):
        raise InvalidConfig(f"{where}unknown algorithm {name!r}; available: {', '.join(ALGORITHMS)}") from None


def get_algorithm(name: str) -> Callable[..., dict]:
    """The ``run`` function of algorithm ``name`` (see :class:`Algorithm`)."""
    return lookup(name).run


def _weight_formats(recipe: "Recipe", allowed, grids: str) -> None:
    """Every weight spec of ``recipe`` has a format ``allowed(format)`` accepts; else InvalidConfig naming the rule
    and the algorithms that take its format."""
    for r in recipe.rules:
        w = r.weight
        if w is not None and not allowed(w.format):
            instead = "use algorithm 'gptq', 'awq' or 'rtn' for GGML formats" if w.format.ggml else \
                "use algorithm 'rtn' for NF4"
            raise InvalidConfig(f"recipe {recipe.name!r}: algorithm {recipe.algorithm!r} quantizes to {grids}, but "
                                f"rule {r.pattern!r} asks for {w.describe()}: {instead}")


def integer_or_ggml_grids(recipe: "Recipe") -> None:
    """The check of GPTQ and AWQ: every weight spec is an ``int`` grid or one of llama.cpp's GGML block formats."""
    _weight_formats(recipe, lambda f: f.value == "int" or f.ggml, "integer or GGML grids")


def integer_grids_only(recipe: "Recipe") -> None:
    """The check of the algorithms that search integer codes: every weight spec is an ``int`` grid."""
    _weight_formats(recipe, lambda f: f.value == "int", "integer grids")
