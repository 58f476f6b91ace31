"""Lower a converted (canonical quantized) FX graph to ONNX and run it in ONNX Runtime.

The graph is exported and lowered exactly as ``qexport export`` lowers its model for ONNX Runtime:
``torch.onnx.export(dynamo=True)`` with :func:`qexport.lowering.translate.translations`, then
:func:`qexport.lowering.core.lower` with target ``'ort'`` (QDQ linears that ONNX Runtime fuses into
``MatMulNBits``, ``MatMulBnb4`` for NF4, ``GatherBlockQuantized`` embeddings, the ``MatMulInteger`` chain for
W8A8; see that module). The session takes the MatMulNBits accuracy level as the export folder does, from
:func:`qexport.lowering.core.ort_session_config` (``session.qdq_matmulnbits_accuracy_level``).

The back-end has run :data:`qexport.passes.ONNX_FUSIONS` on the graph by then (under its pass manager, in
:func:`qexport.backend.reports`): each RMSNorm, rotation and attention with its cache update is one opset-23 node
(ORT pays a few microseconds per node, and a SmolLM2 decode step written out has ~2600 of them).

:class:`OrtGraph` exports a graph traced with symbolic sizes once, with dynamic axes, and a static graph
once per input shape signature, and caches the sessions.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx

from qexport.errors import UnsupportedOp
from qexport.lowering.core import LoweringReport, lower, ort_session_config

__all__ = ["OrtGraph", "export_graph", "freeze_parameters", "tensor_only"]


def _symbolic_dims(v) -> dict[int, Any]:
    return {d: s for d, s in enumerate(v.shape) if not isinstance(s, int)} if isinstance(v, torch.Tensor) else {}


def tensor_only(gm: fx.GraphModule) -> tuple[list[int], tuple | None]:
    """Make ``gm`` take tensors only: each symbolic-size (SymInt) input is re-derived from the tensor input
    that carries it (``aten.sym_size``). Returns the indices of the kept inputs and ``dynamic_shapes`` for
    export (None when the graph has static shapes). Raises UnsupportedOp when a size cannot be re-derived.
    """
    from torch.export import Dim

    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value") for n in ph]
    sym_inputs = [i for i, v in enumerate(values) if isinstance(v, torch.SymInt)]
    dynamic = bool(sym_inputs) or any(_symbolic_dims(v) for v in values)
    if not dynamic:
        return list(range(len(ph))), None
    where = {}
    for i, v in enumerate(values):
        for d, s in _symbolic_dims(v).items():
            where.setdefault(str(s), (ph[i], d))
    last = ph[-1]
    for i in sym_inputs:
        sym = str(values[i].node.expr)
        if sym not in where:
            raise UnsupportedOp(f"size {sym} of the graph is not the size of any tensor input")
        src, d = where[sym]
        with gm.graph.inserting_after(last):
            size = gm.graph.call_function(torch.ops.aten.sym_size.int, (src, d))
        ph[i].replace_all_uses_with(size)
        gm.graph.erase_node(ph[i])
    gm.recompile()
    keep = [i for i in range(len(ph)) if i not in sym_inputs]
    dyn = tuple({d: Dim.DYNAMIC for d in _symbolic_dims(values[i])} or None for i in keep)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(gm.forward).parameters.values())
    return keep, ((dyn,) if varargs else dyn)


def export_graph(gm: fx.GraphModule, example_inputs, accuracy_level: int | None = None, dynamic_shapes=None):
    """ONNX model of ``gm`` at the shapes of ``example_inputs``, lowered for ONNX Runtime exactly as ``qexport
    export`` lowers (:func:`qexport.lowering.core.lower`, target ``'ort'``), and its report. Run it with the
    session options :func:`qexport.lowering.core.ort_session_config` gives for the report's weight bits.

    Opset 23, where the exporter writes ``scaled_dot_product_attention`` (what the ``fuse_attention`` pass and
    Hugging Face's sdpa attention produce) as one ``Attention`` node instead of ~10 MatMul / Softmax / mask
    nodes."""
    from qexport.lowering.translate import onnx_program

    proto = onnx_program(gm, example_inputs, dynamic_shapes)
    return lower(proto, "ort", accuracy_level=accuracy_level)


def freeze_parameters(gm: fx.GraphModule, example_inputs) -> set[int]:
    """Turn the placeholders that stand for module parameters and buffers into constants of ``gm``.

    Dynamo passes a model's parameters to a back-end as graph inputs. Exported as ONNX inputs they would be
    converted and validated on every call (hundreds per step for an LLM) and ONNX Runtime could neither
    constant-fold nor pre-pack them. Frozen, they become initializers, as with inductor's freezing: the
    values read at compile time are the ones used. Returns the input positions that were frozen.
    """
    from qexport.passes.graph_utils import module_path_of_param, register_constant

    frozen = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or module_path_of_param(node) is None:
            continue
        name = register_constant(gm, f"frozen_{node.name}", value.detach())
        with gm.graph.inserting_after(node):
            const = gm.graph.get_attr(name)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
        frozen.add(i)
    gm.recompile()
    return frozen


class OrtGraph:
    """Runs a converted graph in ONNX Runtime.

    Parameters and buffers are frozen into the ONNX model (:func:`freeze_parameters`). A graph that dynamo
    traced with symbolic sizes is exported once with dynamic axes (its SymInt inputs re-derived from tensor
    shapes); a static graph is exported once per input shape signature. Sessions are cached.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs, accuracy_level: int | None = None,
                 threads: int | None = None):
        # A copy of the graph: dynamo reads the placeholders of the GraphModule it handed over to decide
        # what to pass at run time, so that one must keep its placeholders.
        graph = fx.Graph()
        graph.output(graph.graph_copy(gm.graph, {}))
        self.gm = fx.GraphModule(gm, graph)
        self.accuracy_level = accuracy_level
        self.threads = threads or torch.get_num_threads()
        self.sessions: dict[tuple, Any] = {}
        self.reports: list[LoweringReport] = []
        frozen = freeze_parameters(self.gm, example_inputs)
        live = [i for i in range(len(example_inputs)) if i not in frozen]
        keep, self.dynamic_shapes = tensor_only(self.gm)
        self.keep = [live[i] for i in keep]  # positions in the arguments dynamo passes

    def _session(self, args):
        import re

        import onnxruntime as ort

        model, report = export_graph(self.gm, args, self.accuracy_level, self.dynamic_shapes)
        self.reports.append(report)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: ORT warns about ops it merely could not constant-fold
        for key, value in ort_session_config(report.weight_bits, self.accuracy_level).items():
            so.add_session_config_entry(key, value)  # the accuracy level of the MatMulNBits ORT fuses
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        # Inputs are named after the graph's placeholders (``args_N`` for a varargs forward), in order.
        feeds = []
        for pos, inp in enumerate(sess.get_inputs()):
            m = re.fullmatch(r"args_(\d+)", inp.name)
            feeds.append((inp.name, int(m.group(1)) if m else pos))
        return sess, feeds

    def __call__(self, *args):
        targs = [args[i] for i in self.keep]
        if any(not isinstance(a, torch.Tensor) for a in targs):
            raise UnsupportedOp("ONNX Runtime target: a non-tensor graph input that is not a size")
        key = ("dynamic",) if self.dynamic_shapes else tuple((tuple(a.shape), a.dtype) for a in targs)
        if key not in self.sessions:
            self.sessions[key] = self._session(targs)
        sess, feeds = self.sessions[key]
        outs = sess.run(None, {name: targs[i].detach().contiguous().numpy() for name, i in feeds})
        return tuple(torch.from_numpy(o) for o in outs)
