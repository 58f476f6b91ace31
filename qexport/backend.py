"""The ``qexport`` dynamo back-end: ``torch.compile(model, backend="qexport", options={...})``.

Dynamo hands the back-end a torch-level FX graph whose parameters are placeholders named after their
module path, with their real values. The back-end runs the qexport passes on it::

    annotate -> prepare -> [calibrate, static mode only] -> convert -> fold -> fuse_attention
        -> [onnxruntime target: ONNX_FUSIONS: fuse_rmsnorm -> fuse_rotary -> fuse_gqa -> fuse_kv_attention
            -> static_sizes, the same rewrites ``qexport export`` runs for ONNX Runtime]
        -> [inductor target on the CPU: cpu_kernels, each quantized linear on an integer kernel torch ships]

Every pass's counts and skip reasons are in :func:`reports`. The result is lowered to the chosen target:
``"inductor"`` (aot_autograd + inductor; on the CPU the linears run the kernels of :mod:`qexport.kernels.cpu`,
elsewhere the qexport custom ops run as extern kernels), ``"onnxruntime"`` (ONNX,
lowered as ``qexport export`` lowers, run in an ONNX Runtime session) or ``"eager"`` (the rewritten graph run as
is, for debugging and fast tests). Options:

    recipe          preset name, Recipe, or path to a JSON recipe (default "w8")
    ort_accuracy_level  onnxruntime target: MatMulNBits accuracy level. 4 quantizes activations to int8 per
                    block inside the kernel (~3x faster for int4 and ~40x for int8 weights on AVX-512 VNNI);
                    0 keeps fp32 activations, the reference numerics. Default None: 4 for 8-bit weights,
                    0 for 4- and 2-bit ones (docs/results.md gives the perplexity of each)
    mode            None (as the recipe says), "dynamic", "static" or "weight_only": "dynamic"/"static" add
                    int8 activation quantization (per-token at run time / per-tensor calibrated) to every
                    int8-weight rule
    target          "onnxruntime" (the graph lowered to ONNX and run by an ORT session; weight-only
                    int8/int4/int2 as MatMulNBits, W8A8 as MatMulInteger; the default on CPU when onnxruntime
                    is installed), "inductor" (the default otherwise) or "eager"
    fuse_attention  rewrite hand-written attention into scaled_dot_product_attention (default True)

The passes run on the torch-level graph rather than on aot_autograd's aten graph because that is where
module paths and real parameter values are at hand (the recipe's patterns name modules); the quantized
ops are ``torch.library`` custom ops with fake kernels, so aot_autograd and inductor trace through them.
Weights are read when a graph is compiled (as with inductor's freezing): changing them afterwards needs
``torch._dynamo.reset()`` and a new compile.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from qexport.config import Recipe, Rule, load_recipe
from qexport.errors import CalibrationError, InvalidConfig

__all__ = ["qexport_backend", "BackendOptions", "GraphReport", "reports", "calibrating", "is_compiled_with_qexport"]

TARGETS = ("inductor", "eager", "onnxruntime")


@dataclass(frozen=True)
class BackendOptions:
    recipe: Recipe
    mode: str | None = None
    target: str = "inductor"
    fuse_attention: bool = True
    ort_accuracy_level: int | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "BackendOptions":
        from qexport.passes.context import MODES

        options = dict(options or {})
        allowed = {"recipe", "mode", "target", "fuse_attention", "ort_accuracy_level"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InvalidConfig(f"unknown qexport backend option(s) {unknown}; allowed: {sorted(allowed)}")
        recipe = load_recipe(options.get("recipe", "w8"))
        if recipe.algorithm != "rtn":
            raise InvalidConfig(
                f"recipe {recipe.name!r} uses algorithm {recipe.algorithm!r}, which needs calibration data before "
                "compiling: run qexport.quantize(model, recipe, calibration=...) first, then compile the quantized "
                "model (its quantized layers are kept as they are; the compile back-end itself applies "
                "round-to-nearest recipes)")
        if recipe.rotation != "none":
            raise InvalidConfig(
                f"recipe {recipe.name!r} rotates the model ({recipe.rotation!r}), which the compile back-end cannot "
                "do on a captured graph: run qexport.quantize(model, recipe) first, then compile the quantized model")
        mode = options.get("mode")
        if mode is not None and mode not in MODES:
            raise InvalidConfig(f"mode={mode!r} is not valid; allowed: None, {', '.join(repr(m) for m in MODES)}")
        target = options.get("target") or default_target()
        if target not in TARGETS:
            raise InvalidConfig(f"target={target!r} is not valid; allowed: {', '.join(repr(t) for t in TARGETS)}")
        fuse = options.get("fuse_attention", True)
        if not isinstance(fuse, bool):
            raise InvalidConfig(f"fuse_attention must be true or false, got {fuse!r}")
        from qexport.lowering.core import check_accuracy_level

        acc = options.get("ort_accuracy_level")
        check_accuracy_level(acc, "ort_accuracy_level")
        if target == "onnxruntime" and not _onnx_available():
            raise InvalidConfig("target 'onnxruntime' needs onnxruntime and onnxscript: pip install 'qexport[onnx]'")
        return cls(recipe, mode, target, fuse, acc)


@dataclass
class GraphReport:
    """What the passes did to one compiled graph."""

    recipe: str
    target: str
    results: list = field(default_factory=list)  # PassResult, in order

    def counts(self) -> dict[str, dict[str, int]]:
        return {r.name: dict(r.changed) for r in self.results}

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "target": self.target, "passes": [r.to_dict() for r in self.results]}

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.results)


_REPORTS: list[GraphReport] = []
_LIVE: "weakref.WeakSet[QExportGraph]" = weakref.WeakSet()  # for inspection (tests, debugging) only
_STATE = threading.local()


def _onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


def default_target() -> str:
    """``"onnxruntime"`` on a CPU-only machine where onnxruntime and onnxscript are installed (it is the
    fast path there, see ``qexport bench``), else ``"inductor"``."""
    if torch.cuda.is_available():
        return "inductor"
    return "onnxruntime" if _onnx_available() else "inductor"


def reports() -> list[GraphReport]:
    """Reports of the graphs compiled by the qexport back-end in this process, oldest first."""
    return list(_REPORTS)


@contextlib.contextmanager
def calibrating():
    """While active, compiled graphs that need calibration run their observers instead of raising.

    Yields the list of graphs that observed during this calibration (in call order, each once), so a caller can
    tell a model with static-activation layers from one without: graphs of other models do not count."""
    prev = getattr(_STATE, "observed", None)
    observed: list[QExportGraph] = []
    _STATE.observed = observed
    try:
        yield observed
    finally:
        _STATE.observed = prev


def _calibration_record() -> "list[QExportGraph] | None":
    return getattr(_STATE, "observed", None)


def is_compiled_with_qexport(model) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule)


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)


def _lower(gm: fx.GraphModule, example_inputs, target: str, opts: "BackendOptions | None" = None) -> Callable:
    if target == "eager":
        return gm.forward
    if target == "onnxruntime":
        from qexport.lowering.onnx_ort import OrtGraph

        return OrtGraph(gm, example_inputs, accuracy_level=opts.ort_accuracy_level if opts else None)
    from torch._inductor.compile_fx import compile_fx

    # A fresh GraphModule without dynamo's metadata: the constants convert added are not dynamo sources.
    return compile_fx(fx.GraphModule(gm, gm.graph, class_name="QExportGraphModule"), example_inputs)


class QExportGraph:
    """The callable dynamo runs for one graph: observes while calibrating, then runs the quantized graph."""

    def __init__(self, gm: fx.GraphModule, example_inputs, opts: BackendOptions):
        from qexport.passes import annotate, prepare
        from qexport.passes.context import QuantContext
        from qexport.passes.graph_utils import placeholder_values
        from qexport.passes.pass_manager import PassManager

        self.gm = gm
        self.opts = opts
        self.ctx = QuantContext(opts.recipe, opts.mode, placeholder_values(gm, example_inputs))
        self.report = GraphReport(opts.recipe.name, opts.target)
        _REPORTS.append(self.report)
        self.report.results += PassManager([annotate, prepare]).run(gm, self.ctx)
        self.needs_calibration = self.report.results[-1].changed.get("observers", 0) > 0
        self.compiled: Callable | None = None
        if not self.needs_calibration:
            self._finalize(example_inputs)
        _LIVE.add(self)

    def _finalize(self, example_inputs) -> None:
        from qexport.passes import ONNX_FUSIONS, convert, cpu_kernels, fold, fuse_attention
        from qexport.passes.pass_manager import PassManager

        passes = [convert, fold] + ([fuse_attention] if self.opts.fuse_attention else [])
        if self.opts.target == "onnxruntime":  # one node per norm, rotation and attention in the ONNX graph
            passes += list(ONNX_FUSIONS)
        elif self.opts.target == "inductor" and not _on_cuda(example_inputs):  # integer kernels, weights repacked
            passes.append(cpu_kernels)
        self.report.results += PassManager(passes).run(self.gm, self.ctx)
        self.ctx.placeholders = {}  # drop references to the float weights
        self.compiled = _lower(self.gm, example_inputs, self.opts.target, self.opts)

    def _observed(self) -> bool:
        from qexport.passes.prepare import ActObserver

        obs = [m for m in self.gm.modules() if isinstance(m, ActObserver)]
        return bool(obs) and any(o.act_range.observed for o in obs)

    def __call__(self, *args):
        if self.compiled is None:
            record = _calibration_record()
            if record is not None:
                if not any(g is self for g in record):
                    record.append(self)
                return self.gm(*args)
            if not self._observed():
                raise CalibrationError(
                    "this model quantizes activations statically: run qexport.calibrate(compiled_model, batches) first"
                )
            self._finalize(list(args))
        return self.compiled(*args)


# The recipe of a graph quantized before compiling: every float linear stays float.
AS_QUANTIZED = Recipe(name="as-quantized", rules=(Rule("*", None),),
                      description="quantized before compiling: no further layer is quantized")


def _holds_quantized_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith("qexport.") for n in gm.graph.nodes)


def qexport_backend(gm: fx.GraphModule, example_inputs, options: dict[str, Any] | None = None, **kwargs):
    """Dynamo back-end entry point (registered as ``"qexport"`` through the ``torch_dynamo_backends`` group).

    A graph that already holds qexport's quantized ops (a model quantized by ``qexport.quantize`` or loaded by
    ``qexport.load_quantized``) and no ``recipe`` option is compiled as it is: the layers its recipe kept float
    stay float, rather than getting the default ``w8``."""
    if kwargs.get("mode") not in (None, "default"):
        raise InvalidConfig("torch.compile(mode=...) is not used by the qexport back-end: pass options={...}")
    if "recipe" not in (options or {}) and _holds_quantized_ops(gm):
        options = {**(options or {}), "recipe": AS_QUANTIZED}
    opts = BackendOptions.from_dict(options)
    return QExportGraph(gm, example_inputs, opts)
