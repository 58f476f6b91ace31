"""FX graph passes of the ``qexport`` compile back-end (installed as ``qexport.passes``).

Each pass is ``pass_fn(gm, ctx) -> PassResult`` and is run by :class:`PassManager`, which lints and
recompiles after each one. In order: :func:`annotate`, :func:`prepare`, :func:`convert`, :func:`fold`,
:func:`fuse_attention`.
"""

from qexport.passes.annotate import annotate
from qexport.passes.context import QuantContext
from qexport.passes.convert import convert
from qexport.passes.fold import fold
from qexport.passes.fuse_attention import fuse_attention
from qexport.passes.pass_manager import PassManager, PassResult
from qexport.passes.prepare import prepare

__all__ = ["annotate", "prepare", "convert", "fold", "fuse_attention", "PassManager", "PassResult", "QuantContext"]
