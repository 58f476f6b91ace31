"""A Triton Inference Server model repository for an ONNX export: ``qexport export --layout triton-repo``.

``export_triton_repository(model, REPO, NAME, recipe)`` runs :func:`qexport.export.export_onnx` and arranges its
folder as one model of the repository ``REPO`` (which may hold other models; they are left as they are)::

    REPO/NAME/config.pbtxt     backend "onnxruntime", max_batch_size 0 (the graph's batch dimension is its own),
                               every graph input and output with its Triton type and shape (-1 where the
                               dimension is dynamic), one CPU instance
    REPO/NAME/1/model.onnx     the graph, and model.onnx.data (its external weights) beside it when there is one
    REPO/NAME/...              the export's other files: config.json, the tokenizer, recipe.json,
                               export_report.json, genai_config.json

The graph takes the KV cache as inputs and gives it back as outputs, so the client keeps the cache between
steps. ``config.pbtxt`` is protobuf text of Triton's ``ModelConfig``; the tests parse it with tritonclient's
``model_config_pb2`` (the schema Triton itself reads). The model directory is built beside the repository and
renamed into place; an existing ``REPO/NAME`` is replaced only with ``force``. No Triton server runs here: that a
server loads the repository is not tested.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from qexport._io import OutputExists
from qexport.errors import InvalidConfig

__all__ = ["export_triton_repository", "triton_config", "TRITON_TYPES"]

# ONNX TensorProto element type name -> Triton's DataType
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
                "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT16": "TYPE_INT16", "INT8": "TYPE_INT8",
                "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _tensors(values) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims) of ONNX value infos; -1 for a dynamic dimension."""
    from onnx import TensorProto

    out = []
    for v in values:
        t = v.type.tensor_type
        onnx_type = TensorProto.DataType.Name(t.elem_type)
        if onnx_type not in TRITON_TYPES:
            raise InvalidConfig(f"graph tensor {v.name!r} is {onnx_type}, which Triton has no type for")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out.append((v.name, TRITON_TYPES[onnx_type], dims))
    return out


def triton_config(onnx_file: str | os.PathLike, name: str) -> str:
    """``config.pbtxt`` for the ONNX Runtime backend of the graph in ``onnx_file`` (its weights are not read)."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph

    def block(key: str, values) -> list[str]:
        lines = [f"{key} ["]
        entries = _tensors(values)
        for i, (tname, ttype, dims) in enumerate(entries):
            lines += ["  {", f'    name: "{tname}"', f"    data_type: {ttype}",
                      f"    dims: [ {', '.join(str(d) for d in dims)} ]", "  }" + ("," if i < len(entries) - 1 else "")]
        return lines + ["]"]

    lines = [f'name: "{name}"', 'backend: "onnxruntime"', "max_batch_size: 0"]
    lines += block("input", graph.input) + block("output", graph.output)
    lines += ["instance_group [", "  {", "    count: 1", "    kind: KIND_CPU", "  }", "]"]
    return "\n".join(lines) + "\n"


def export_triton_repository(model, repo: str | os.PathLike, name: str, recipe=None, *, force: bool = False,
                             **export_kwargs):
    """Export ``model`` with ``recipe`` (as :func:`qexport.export.export_onnx`, which ``export_kwargs`` go to) as
    the model ``name`` of the Triton model repository ``repo`` (see the module docstring). Returns the
    :class:`~qexport.export.ExportResult`, whose ``path`` is ``repo/name``."""
    from qexport.export.onnx import DATA_FILE, MODEL_FILE, export_onnx

    if not _NAME.fullmatch(name or ""):
        raise InvalidConfig(f"Triton model name {name!r}: use letters, digits, '_', '.' and '-' (no '/')")
    repo = Path(repo).expanduser()
    if repo.exists() and not repo.is_dir():
        raise OutputExists(f"{str(repo)!r} is a file; the model repository is a folder")
    target = repo / name
    if target.exists() and not force:
        raise OutputExists(f"{str(target)!r} already exists; pass force=True / --force to replace it")
    repo.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{repo.name}.{name}.", dir=repo.parent))  # not inside: Triton scans it
    try:
        res = export_onnx(model, work / "export", recipe, **export_kwargs)
        version = res.path / "1"
        version.mkdir()
        for f in (MODEL_FILE, DATA_FILE):
            if (res.path / f).exists():
                os.replace(res.path / f, version / f)
        (res.path / "config.pbtxt").write_text(triton_config(version / MODEL_FILE, name))
        if target.exists():
            shutil.rmtree(target)
        os.replace(res.path, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.path = target
    return res
