"""Quantized checkpoints: quantize once, save the folder, load it anywhere.

:func:`save_quantized` writes a model quantized by :func:`qexport.quantize` (and, for static activations,
:func:`qexport.calibrate`) to a folder; :func:`load_quantized` rebuilds exactly that model, bit for bit, without
running any algorithm and without materializing the float model. The folder::

    model.safetensors               every stored tensor (shards + model.safetensors.index.json past
                                    ``max_shard_bytes``), written one tensor at a time
    config.json                     the Hugging Face config; with a ``quantization_config`` in the
                                    compressed-tensors format when every quantized layer has a
                                    compressed-tensors form (then transformers and vLLM load the folder),
                                    else a config that other engines refuse (model type ``qexport``)
    generation_config.json, tokenizer files
    recipe.json                     {"recipe", "provenance", "report"}: the recipe with its options, how the
                                    model was made (calibration text SHA-256, samples, sequence length, seed,
                                    versions) and the quantization report
    qexport_quantization.json       qexport's own section: the stored form of every quantized layer, the
                                    rotation structure, the KV-cache spec, and which engines load the folder

Two tensor layouts: ``compressed-tensors`` (:mod:`qexport.compressed`: ``weight_packed`` / ``weight_scale``
/ ``weight_zero_point`` as compressed-tensors defines them, converted losslessly from and to qexport's codes)
for what compressed-tensors expresses, and ``qexport`` (each ``QLinear`` buffer under its module path, as
:meth:`qexport.formats.QuantizedWeight.tensors` names them) for the rest: NF4 with double quantization, int2,
per-tensor weight scales, rotation with its online ``down_proj`` rotation, LLM.int8(), asymmetric activations,
groups that do not divide the input size, a quantized KV cache, weights that are not float32
(:func:`qexport.compressed.why_not_expressible`).
Only safetensors and JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qexport._io import OutputExists, replace_folder
from qexport._safetensors import SafetensorsFolder, TensorEntry, shard_entries, write_safetensors
from qexport.errors import CalibrationError, CheckpointError, InvalidConfig, QExportError

__all__ = ["save_quantized", "load_quantized", "is_quantized_folder", "read_manifest", "SavedFolder", "ShardWriter",
           "MANIFEST_FILE", "RECIPE_FILE", "FORMAT", "FORMAT_VERSION", "DEFAULT_SHARD_BYTES"]

MANIFEST_FILE = "qexport_quantization.json"
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FORMAT = "qexport-quantized"
FORMAT_VERSION = 1
# transformers' own default shard size; a folder past it is sharded with an index
DEFAULT_SHARD_BYTES = 5 * 1000**3
# config.json of a folder in qexport's own layout: a model type no other engine has, so transformers and vLLM
# refuse the folder with "does not recognize this architecture" instead of loading float weights that are not there
QEXPORT_MODEL_TYPE = "qexport"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _dtype(name: Any, what: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"{MANIFEST_FILE}: {what} has the dtype {name!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float weights (the embedding's, else the first float parameter's)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@dataclass
class SavedFolder:
    """What :func:`save_quantized` wrote: the folder, its tensor layout, and which engines load it (and why not)."""

    path: Path
    layout: str  # "compressed-tensors" or "qexport"
    engines: dict[str, str]
    files: dict[str, int]  # file name -> bytes

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


# ----------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    """The versions of qexport and of the libraries that shape what it saves."""
    import importlib.metadata as md

    import qexport

    out: dict[str, str | None] = {"qexport": qexport.__version__, "torch": torch.__version__}
    for dist in ("transformers", "compressed-tensors", "safetensors"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------
def _qlinears(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized modules (``QLinear`` and ``QEmbedding``), by name."""
    from qexport.modules import QEmbedding, QLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))}


def _shared_with(quantized: dict[str, nn.Module]) -> dict[str, str]:
    """Module -> the first module that holds the same stored weight (a tied embedding and lm_head)."""
    from qexport.modules import tied_groups

    return {name: group[0] for group in tied_groups(quantized.items()) for name in group[1:]}


def _layer_entry(mod) -> dict[str, Any]:
    """qexport's record of one quantized layer: enough to rebuild the module around its stored tensors."""
    from qexport.modules import QEmbedding

    if isinstance(mod, QEmbedding):
        return {"kind": "embedding", "shape": [mod.num_embeddings, mod.embedding_dim], "group": mod.group,
                "weight": mod.spec.to_dict(), "padding_idx": mod.padding_idx,
                "weight_dtype": _DTYPE_NAMES[mod.weight_dtype],
                "embed_scale": None if mod.embed_scale is None else float(mod.embed_scale)}
    return {
        "shape": [mod.out_features, mod.in_features],
        "group": mod.group,
        "weight": mod.spec.to_dict(),
        "activation": mod.act_spec.to_dict() if mod.act_spec is not None else None,
        "act_zero_point": int(mod.act_zero_point),
        "activation_fallback": mod.activation_fallback,
        "bias": mod.bias is not None,
        "weight_dtype": _DTYPE_NAMES[mod.weight_dtype],
    }


def _float_entries(model: nn.Module, quantized: dict[str, nn.Module], done: set[str] = frozenset()
                   ) -> tuple[list[TensorEntry], dict[str, str]]:
    """Every tensor of the state dict outside the quantized layers' stored weights and the names ``done``
    (written already), each storage once: the entries to write, and the names that alias a written one (tied
    embeddings, the shared online rotation)."""
    from qexport.api import _tensor_key

    prefixes = tuple(f"{name}." for name in quantized)
    seen: dict[tuple, str] = {}
    entries, aliases = [], {}
    for name, t in model.state_dict(keep_vars=False).items():
        if name in done and t.device.type != "meta":  # written already; what shares it is an alias of it
            seen.setdefault(_tensor_key(t), name)
        if name.startswith(prefixes) or name in done:
            continue
        if t.device.type == "meta":
            raise CheckpointError(f"{name} is on the meta device: load or materialize the model before saving it")
        key = _tensor_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        entries.append(TensorEntry.of(name, t))
    return entries, aliases


def _native_entries(name: str, mod) -> list[TensorEntry]:
    """A quantized layer in qexport's layout: its buffers (and bias) under the module path."""
    tensors = dict(mod.quantized_weight().tensors())
    if getattr(mod, "bias", None) is not None:
        tensors["bias"] = mod.bias
    if getattr(mod, "needs_calibration", False):
        tensors["act_scale"] = mod.act_scale
    return [TensorEntry.of(f"{name}.{k}", t) for k, t in tensors.items()]


def _check_saveable(model: nn.Module, quantized: dict[str, nn.Module]) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise InvalidConfig("save_quantized() expects a Hugging Face model (with .config) quantized by "
                            "qexport.quantize")
    if not quantized or getattr(model, "qexport_report", None) is None:
        raise InvalidConfig("save_quantized(): this model has no quantized layer or no quantization report "
                            "(model.qexport_report); quantize it with qexport.quantize(model, recipe) first")
    dtype = _float_dtype(model)
    if dtype not in _DTYPE_NAMES:
        raise InvalidConfig(f"save_quantized(): float weights of dtype {dtype} are not supported; use float32, "
                            "bfloat16 or float16")
    for name, mod in quantized.items():
        if getattr(mod, "needs_calibration", False) and not mod.calibrated:
            raise CalibrationError(f"{name} quantizes activations statically but is not calibrated: run "
                                   "qexport.calibrate(model, batches) before saving")


class ShardWriter:
    """The safetensors shards of a folder being written into ``folder`` (a temporary one): :meth:`write` adds
    shards as their tensors come (streamed quantization writes one block at a time), :meth:`finish` names
    them ``model-0000i-of-0000N.safetensors`` with an index, or ``model.safetensors`` when there is one."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total = 0

    @property
    def names(self) -> set[str]:
        return {n for _, names in self.shards for n in names}

    def write(self, entries: list[TensorEntry]) -> None:
        for shard in shard_entries(entries, self.max_shard_bytes) if entries else []:
            file = f".shard-{len(self.shards):05d}.safetensors"
            self.total += write_safetensors(self.folder / file, shard)
            self.shards.append((file, [e.name for e in shard]))

    def finish(self) -> list[str]:
        if len(self.shards) <= 1:
            if self.shards:
                os.replace(self.folder / self.shards[0][0], self.folder / WEIGHTS_FILE)
            else:
                write_safetensors(self.folder / WEIGHTS_FILE, [])
            return [WEIGHTS_FILE]
        files, weight_map = [], {}
        for i, (tmp, names) in enumerate(self.shards, 1):
            file = f"model-{i:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / file)
            weight_map.update({n: file for n in names})
            files.append(file)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files + [INDEX_FILE]


def save_quantized(model: nn.Module, out: str | os.PathLike, tokenizer=None, *, force: bool = False,
                   provenance: dict[str, Any] | None = None, layout: str = "auto",
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES, written: ShardWriter | None = None) -> SavedFolder:
    """Save a model quantized by :func:`qexport.quantize` as a folder (see the module docstring).

    Args:
        model: a Hugging Face causal LM quantized by qexport (static activations calibrated).
        out: the folder to write, atomically (built under a temporary name, then renamed). An existing one is
            replaced only with ``force``.
        tokenizer: saved into the folder.
        provenance: more facts to record in ``recipe.json`` (``qexport quantize`` gives the source model and the
            quantize time); the calibration windows' provenance (text SHA-256, samples, sequence length, seed,
            as :func:`qexport.prepare.quantize_model` records it in the report) and the library versions are
            added to it.
        layout: ``'auto'`` (compressed-tensors when every quantized layer has that form, else qexport's own),
            ``'compressed-tensors'`` (refused with the reason when it does not fit) or ``'qexport'``.
        max_shard_bytes: past this many bytes of tensors the weights are sharded with an index.
        written: the shards already written into a temporary folder beside ``out`` (:mod:`qexport.stream`,
            which writes each decoder block as it is quantized and leaves its tensors on the meta device):
            the rest is added to them, and that folder becomes ``out``.
    """
    from qexport import compressed

    if layout not in ("auto", "compressed-tensors", "qexport"):
        raise InvalidConfig(f"layout={layout!r} is not valid; allowed: 'auto', 'compressed-tensors', 'qexport'")
    quantized = _qlinears(model)
    _check_saveable(model, quantized)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise OutputExists(f"{str(out)!r} already exists; pass force=True / --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{str(out)!r} is a file, not a folder; remove it or choose another output")
    report = model.qexport_report
    recipe = report.recipe
    why_not = compressed.why_not_expressible(model, quantized, recipe)
    if layout == "compressed-tensors" and why_not:
        raise InvalidConfig(f"this model has no compressed-tensors form: {why_not}")
    use_ct = layout != "qexport" and why_not is None
    done = written.names if written is not None else set()
    entries, aliases = _float_entries(model, quantized, done)
    shared = _shared_with(quantized)  # a tied lm_head's stored weight is its embedding's: written once
    for name, mod in quantized.items():
        if any(n.startswith(f"{name}.") for n in done):
            continue
        if name in shared:
            entries += [TensorEntry.of(f"{name}.bias", mod.bias)] if getattr(mod, "bias", None) is not None else []
        else:
            entries += compressed.layer_entries(name, mod) if use_ct else _native_entries(name, mod)
    reason = None if use_ct else (why_not or "the qexport layout, as asked")
    engines = compressed.engines(reason, quantized)

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layout": "compressed-tensors" if use_ct else "qexport",
        "engines": engines,
        "layers": {name: {**_layer_entry(mod), **({"shares": shared[name]} if name in shared else {})}
                   for name, mod in quantized.items()},
        "aliases": aliases,
        "rotation": report.rotation,
        "kv_cache": (recipe or {}).get("kv_cache"),
        "dtype": _DTYPE_NAMES[_float_dtype(model)],
        "config": {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"},
    }
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if not use_ct:
        config = {"model_type": QEXPORT_MODEL_TYPE, "architectures": ["QExportQuantizedModel"],
                  "qexport": f"quantized by qexport in its own layout ({reason}); load it with "
                             "qexport.load_quantized(DIR) or `qexport eval --model DIR`"}
    if written is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        written = ShardWriter(tmp, max_shard_bytes)
    tmp = written.folder
    try:
        written.write(entries)
        written.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if use_ct:
            compressed.write_quantization_config(tmp, quantized, model)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        saved_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        provenance = {**(provenance or {}), "calibration": report.calibration, "versions": versions(),
                      "saved": saved_at}
        recipe_file = {"recipe": recipe, "provenance": provenance, "report": report.to_dict()}
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe_file, indent=2) + "\n")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        replace_folder(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return SavedFolder(out, manifest["layout"], engines, files)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def is_quantized_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`save_quantized`."""
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """qexport's section of a saved folder, checked for its format and version."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a qexport quantized folder: no {MANIFEST_FILE} in it "
                              "(write one with `qexport quantize` or qexport.save_quantized)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format version {manifest.get('version')!r}; this qexport reads "
                              f"version {FORMAT_VERSION}: upgrade qexport or save the model again")
    if manifest.get("layout") not in ("qexport", "compressed-tensors"):
        raise CheckpointError(f"{str(path)!r} names the tensor layout {manifest.get('layout')!r}, which qexport "
                              "does not know (known: 'qexport', 'compressed-tensors')")
    return manifest


def _hf_config(folder: Path, manifest: dict[str, Any]):
    from transformers import AutoConfig

    base = dict(manifest["config"])
    model_type = base.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **base)
    except Exception as e:  # transformers raises ValueError / KeyError for unknown model types
        raise CheckpointError(f"{str(folder)!r}: transformers cannot build a {model_type!r} config: "
                              f"{str(e).splitlines()[0]}") from None
    if manifest["layout"] == "compressed-tensors":
        from qexport import compressed

        on_disk = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config")
        compressed.check_quantization_config(on_disk, folder)
    return config


def _skeleton(config, manifest: dict[str, Any]) -> nn.Module:
    """The model's modules with empty (meta) parameters; buffers computed from the config (rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qexport.algorithms.rotate import RotationReport, install_online_rotation

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(manifest.get("dtype", "float32"), "the model"))
    rotation = manifest.get("rotation")
    if rotation:
        install_online_rotation(model)
        model.qexport_rotation = RotationReport(**rotation)
    return model


def _build_layer(name: str, entry: dict[str, Any], tensors: SafetensorsFolder, layout: str,
                 built: dict[str, nn.Module] | None = None):
    """The ``QLinear`` / ``QEmbedding`` of one saved layer, its tensors read and checked against what its spec
    stores (a layer that ``shares`` another's stored weight takes that module's tensors from ``built``)."""
    from qexport.config import QuantSpec
    from qexport.modules import QEmbedding, QLinear

    try:
        spec = QuantSpec.from_dict(entry["weight"])
        act = QuantSpec.from_dict(entry["activation"]) if entry.get("activation") else None
        n, k = (int(v) for v in entry["shape"])
        group = int(entry["group"])
    except (KeyError, TypeError, ValueError, AttributeError, InvalidConfig) as e:
        raise CheckpointError(f"{MANIFEST_FILE}: layer {name!r} has an unreadable entry: {e}") from None
    dtype = _dtype(entry.get("weight_dtype", "float32"), f"layer {name!r}")
    if entry.get("kind", "linear") not in ("linear", "embedding"):
        raise CheckpointError(f"{MANIFEST_FILE}: layer {name!r} is of kind {entry.get('kind')!r}; known: linear, "
                              "embedding")
    source = entry.get("shares")
    if source is not None:  # the stored weight of another layer (a tied embedding / lm_head)
        other = (built or {}).get(source)
        if other is None:
            raise CheckpointError(f"{MANIFEST_FILE}: layer {name!r} shares the weight of {source!r}, which is not a "
                                  "saved quantized layer")
        qw = other.quantized_weight()
        if qw.spec != spec or tuple(qw.shape) != (n, k) or qw.group != group:
            raise CheckpointError(f"layer {name!r}: its spec or shape differs from {source!r}, whose weight it shares")
    if entry.get("kind") == "embedding":
        if source is None:
            qw = _read_weight(name, spec, (n, k), group, tensors, layout)
        return QEmbedding(qw, weight_dtype=dtype, padding_idx=entry.get("padding_idx"),
                          embed_scale=entry.get("embed_scale"))
    if source is None:
        qw = _read_weight(name, spec, (n, k), group, tensors, layout, int_quantized=act is not None)
    bias = tensors.get(f"{name}.bias", dtype, (n,)) if entry.get("bias") else None
    mod = QLinear(qw, bias, weight_dtype=dtype, act_spec=act)
    mod.act_zero_point = int(entry.get("act_zero_point", 0))
    mod.activation_fallback = entry.get("activation_fallback")
    if mod.needs_calibration:  # the calibrated activation scale: compressed-tensors' input_scale is [1]
        key, shape = ("input_scale", (1,)) if layout == "compressed-tensors" else ("act_scale", ())
        mod.act_scale = tensors.get(f"{name}.{key}", torch.float32, shape).reshape(())
    return mod


def _read_weight(name: str, spec, shape: tuple[int, int], group: int, tensors: SafetensorsFolder, layout: str,
                 int_quantized: bool = False):
    """A layer's QuantizedWeight, its tensors read and checked against what its spec stores."""
    from qexport import compressed
    from qexport.formats import DoubleQuant, QuantizedWeight, stored_layout

    n, k = shape
    expected = stored_layout(spec, (n, k))
    if layout == "compressed-tensors":
        stored = compressed.read_layer(name, spec, (n, k), tensors, int_quantized=int_quantized)
    else:
        stored = {key: tensors.get(f"{name}.{key}", dt, shape) for key, (dt, shape) in expected.items()}
    for key, (dt, shape) in expected.items():
        t = stored.get(key)
        if t is None or t.dtype != dt or tuple(t.shape) != shape:
            raise CheckpointError(f"layer {name!r}: stored {key} does not match its spec {spec.describe()}")
    dq = None
    if spec.double_quant:
        dq = DoubleQuant(stored["qscale"], stored["scale2"], stored["scale_offset"], spec.double_quant_block)
    return QuantizedWeight(spec, (n, k), group, stored["qdata"], stored.get("scale"), stored.get("zero_point"), dq)


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The provenance a saved folder's ``recipe.json`` records (empty when it has none)."""
    try:
        data = json.loads((Path(folder) / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data.get("provenance") or {} if isinstance(data, dict) else {}


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    Converting a layer from compressed-tensors' packing frees a few transient buffers between long-lived ones;
    glibc keeps such holes in its heap, which took the peak resident size of loading an int8 SmolLM2 folder to
    1.9x its tensors (docs/checkpoints.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None elsewhere (looked up once: find_library runs a subprocess)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _report(folder: Path):
    from qexport.api import LayerReport, QuantizationReport

    path = folder / RECIPE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = data["report"]
        layers = [LayerReport(**{**row, "shape": tuple(row["shape"]) if row.get("shape") else None})
                  for row in report["layers"]]
        return QuantizationReport(recipe=report["recipe"], layers=layers, rotation=report.get("rotation"),
                                  calibration=report.get("calibration"), algorithm=report.get("algorithm"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r} is missing or has no readable quantization report: {e}") from None


@torch.no_grad()
def load_quantized(path: str | os.PathLike) -> nn.Module:
    """The model saved in ``path`` by :func:`save_quantized`, rebuilt exactly (same logits, bit for bit).

    Modules are built empty (meta device) and filled from the safetensors files one tensor at a time, so the
    peak memory is about the folder's size, not the float model's. No algorithm runs; nothing is unpickled.
    Buffers that are not saved (rotary tables) are computed from the config, as transformers' ``from_pretrained``
    computes them.
    ``model.qexport_report`` is the report saved with it; the recipe's KV-cache spec is in its ``recipe``.
    Raises :class:`~qexport.errors.CheckpointError` for a folder that is incomplete or not well formed.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder")
    try:
        return _load(folder)
    except QExportError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OSError, UnicodeDecodeError) as e:  # a damaged file
        raise CheckpointError(f"{str(folder)!r} is not a well-formed quantized folder ({type(e).__name__}: {e}); "
                              "save it again") from None


def _load(folder: Path) -> nn.Module:
    from qexport.api import _set_submodule

    manifest = read_manifest(folder)
    config = _hf_config(folder, manifest)
    tensors = SafetensorsFolder(folder, WEIGHTS_FILE, INDEX_FILE)
    report = _report(folder)
    model = _skeleton(config, manifest)
    layers = manifest.get("layers") or {}
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{MANIFEST_FILE} in {str(folder)!r} lists no quantized layer")
    built: dict[str, nn.Module] = {}
    # layers holding their own stored weight first, then those that share one (a tied lm_head)
    for name, entry in sorted(layers.items(), key=lambda item: isinstance(item[1], dict) and "shares" in item[1]):
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{MANIFEST_FILE} names the layer {name!r}, which this {config.model_type} "
                                  "model does not have") from None
        built[name] = _build_layer(name, entry, tensors, manifest["layout"], built)
        _set_submodule(model, name, built[name])
        if manifest["layout"] == "compressed-tensors":
            _release_freed_memory()  # the conversion's transient buffers, before the next layer's
    aliases = manifest.get("aliases") or {}
    quantized_prefixes = tuple(f"{name}." for name in layers)
    state, read = {}, {}
    for name, param in model.state_dict(keep_vars=True).items():
        if name.startswith(quantized_prefixes):
            continue
        source = aliases.get(name, name)  # a tied or shared tensor is read once and shared again
        if source not in read:
            read[source] = tensors.get(source, param.dtype, tuple(param.shape))
        state[name] = read[source]
    model.load_state_dict(state, strict=False, assign=True)
    embedding_quantized = any(entry.get("kind") == "embedding" for entry in layers.values())
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights") and not embedding_quantized:
        model.tie_weights()  # a quantized embedding has no float weight to tie: its lm_head shares its stored one
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise CheckpointError(f"{str(folder)!r} does not hold {name}: the checkpoint is incomplete")
    for p in model.parameters():
        p.requires_grad_(False)
    model.qexport_report = report
    model.eval()
    return model
