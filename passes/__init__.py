"""FX graph passes of the ``qexport`` compile back-end (installed as ``qexport.passes``).

Each pass is ``pass_fn(gm, ctx) -> PassResult`` and is run by :class:`PassManager`, which lints and
recompiles after each one. In order: :func:`annotate`, :func:`prepare`, :func:`convert`, :func:`fold`,
:func:`fuse_attention`. The ONNX Runtime target then runs :func:`fuse_rmsnorm`, :func:`fuse_rotate_half`, :func:`fuse_gqa` and :func:`static_sizes` on
its own copy of the graph (``qexport.lowering.onnx_ort``).
"""

from qexport.passes.annotate import annotate
from qexport.passes.context import QuantContext
from qexport.passes.convert import convert
from qexport.passes.fold import fold
from qexport.passes.fuse_attention import fuse_attention
from qexport.passes.fuse_gqa import fuse_gqa
from qexport.passes.fuse_rmsnorm import fuse_rmsnorm
from qexport.passes.fuse_rotate_half import fuse_rotate_half
from qexport.passes.pass_manager import PassManager, PassResult
from qexport.passes.prepare import prepare
from qexport.passes.static_sizes import static_sizes

__all__ = ["annotate", "prepare", "convert", "fold", "fuse_attention", "fuse_gqa", "fuse_rmsnorm", "fuse_rotate_half", "static_sizes", "PassManager", "PassResult", "QuantContext"]
