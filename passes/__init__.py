"""FX graph passes of the ``qexport`` compile back-end and ONNX export (installed as ``qexport.passes``).

Each pass is ``pass_fn(gm, ctx) -> PassResult`` and is run by :class:`PassManager`, which lints and
recompiles after each one. In order: :func:`annotate`, :func:`prepare`, :func:`convert`, :func:`fold`,
:func:`fuse_attention`. Graphs for inductor on the CPU then run :func:`cpu_kernels`; graphs bound for ONNX (the
compile back-end's ONNX Runtime target, and ``qexport export`` for ONNX Runtime, whose model dynamo captures the
same way) run :data:`ONNX_FUSIONS`.
"""

from qexport.passes.annotate import annotate
from qexport.passes.context import QuantContext
from qexport.passes.convert import convert
from qexport.passes.cpu_kernels import cpu_kernels
from qexport.passes.fold import fold
from qexport.passes.fuse_attention import fuse_attention
from qexport.passes.fuse_gqa import fuse_gqa
from qexport.passes.fuse_rmsnorm import fuse_rmsnorm
from qexport.passes.fuse_kv_attention import fuse_kv_attention
from qexport.passes.fuse_rotary import fuse_rotary
from qexport.passes.pass_manager import PassManager, PassResult
from qexport.passes.prepare import prepare
from qexport.passes.static_sizes import static_sizes

# The rewrites of a graph bound for ONNX, in order: each norm, rotation and attention (with its cache update)
# becomes one opset-23 node; fuse_gqa must precede fuse_kv_attention, static_sizes comes last.
ONNX_FUSIONS = (fuse_rmsnorm, fuse_rotary, fuse_gqa, fuse_kv_attention, static_sizes)

__all__ = ["annotate", "prepare", "convert", "cpu_kernels", "fold", "fuse_attention", "fuse_gqa", "fuse_rmsnorm",
           "fuse_rotary", "fuse_kv_attention", "static_sizes", "ONNX_FUSIONS", "PassManager", "PassResult", "QuantContext"]
