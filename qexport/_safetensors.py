"""safetensors files written one tensor at a time, and read back with every check a loader needs.

The ``safetensors`` package writes a file from a dict of tensors and serializes the whole dict in memory
first; a quantized checkpoint may convert each layer's tensors to another layout as it goes (the
compressed-tensors packing), so the writer here takes tensors lazily: the header is built from shapes and
dtypes known in advance, then each tensor is produced, written and dropped. The bytes are the format's own
(an 8-byte little-endian header length, a JSON header padded with spaces to 8 bytes, then the raw
little-endian data in header order), so the ``safetensors`` package, transformers and vLLM read the files;
reading goes through ``safetensors.safe_open``, never through pickle.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from qexport.errors import CheckpointError

__all__ = ["TensorEntry", "write_safetensors", "shard_entries", "SafetensorsFolder", "DTYPES"]

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_CODE = {code: dtype for dtype, code in DTYPES.items()}
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive


def _looks_pickled(head: bytes) -> bool:
    """A torch.save zip archive, or a pickle stream (protocol 2-5: ``\\x80`` then the protocol number)."""
    return head.startswith(_ZIP_MAGIC) or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


@dataclass
class TensorEntry:
    """One tensor to write: its name, dtype and shape up front, and a function that makes it when written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorEntry":
        return cls(name, tensor.dtype, tuple(tensor.shape), lambda: tensor)


def write_safetensors(path: str | os.PathLike, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None
                      ) -> int:
    """Write ``entries`` to ``path`` one at a time; returns the bytes of tensor data written."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for e in entries:
        if e.dtype not in DTYPES:
            raise CheckpointError(f"{e.name}: dtype {e.dtype} cannot be stored in safetensors")
        header[e.name] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            t = e.make().detach().to("cpu")
            if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                raise CheckpointError(f"{e.name}: made {t.dtype} {tuple(t.shape)}, announced {e.dtype} {e.shape}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
        f.flush()
        os.fsync(f.fileno())
    return offset


def shard_entries(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


class SafetensorsFolder:
    """The tensors of a checkpoint folder: ``model.safetensors``, or the shards an index names.

    Shard paths must be plain file names inside the folder; a file that is not safetensors (a pickle, a
    truncated file) is refused with a :class:`~qexport.errors.CheckpointError` naming it (``safe_open``
    validates each file's header and extent). Tensors are read one at a time (``get``) with plain file reads
    into fresh memory, not through a memory map: a tensor converted on load (compressed-tensors' packing) then
    leaves no mapped pages behind, so the peak memory is about the tensors kept.
    """

    def __init__(self, folder: Path, single: str = "model.safetensors", index: str = "model.safetensors.index.json"):
        self.folder = folder
        self._where: dict[str, Path] = {}
        self._headers: dict[Path, tuple[dict, int]] = {}  # file -> (header, offset of its data)
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{str(folder / index)!r} is not a safetensors index (weight_map): {e}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{str(folder / index)!r}: weight_map must map tensor names to shard files")
            for name, file in weight_map.items():
                self._where[name] = self._shard(file, index)
        elif (folder / single).is_file():
            self._where = {name: folder / single for name in self._open(folder / single).keys()}
        else:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            extra = f" (it has {', '.join(pickles)}: qexport reads safetensors only, never pickle)" if pickles else ""
            raise CheckpointError(f"{str(folder)!r} has no {single} or {index}{extra}")
        for path in set(self._where.values()):
            self._open(path)

    @property
    def names(self) -> set[str]:
        """The names of every tensor in the folder."""
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of the tensor ``name``, from its file's header (nothing read)."""
        return tuple(self._open(self._where[name])[name]["shape"])

    def _shard(self, file: object, index: str) -> Path:
        inside = isinstance(file, str) and file and Path(file).name == file and file not in (".", "..")
        if not inside or (self.folder / file).resolve().parent != self.folder.resolve():  # a link that leads out
            raise CheckpointError(f"{index} names the shard {file!r}, which is not a file inside {str(self.folder)!r}")
        return self.folder / file

    def _open(self, path: Path) -> dict:
        """The header of ``path`` (tensor name -> dtype, shape, offsets), after ``safe_open`` validated the file."""
        if path in self._headers:
            return self._headers[path][0]
        from safetensors import safe_open

        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing (named by the folder's safetensors index)")
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except Exception as e:  # safetensors raises its own error types for truncated or malformed files
            with open(path, "rb") as f:
                head = f.read(4)
            if _looks_pickled(head):
                raise CheckpointError(f"{str(path)!r} is a pickle / torch.save file, not safetensors: qexport never "
                                      "unpickles; save the tensors with safetensors") from None
            raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({str(e).splitlines()[0]}): "
                                  "it may be truncated; save the checkpoint again") from None
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self._headers[path] = (header, 8 + length)
        return header

    def get(self, name: str, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor ``name``; with ``dtype`` / ``shape``, checked against them (a clear error, not a later crash)."""
        if name not in self._where:
            raise CheckpointError(f"{str(self.folder)!r} lacks the tensor {name!r}: the checkpoint is incomplete")
        path = self._where[name]
        header = self._open(path)
        if name not in header:
            raise CheckpointError(f"{str(path)!r} lacks the tensor {name!r} its index names")
        info = header[name]
        got = tuple(info["shape"])
        if shape is not None and got != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")
        stored = _FROM_CODE.get(info["dtype"])
        if stored is None or (dtype is not None and stored != dtype):
            raise CheckpointError(f"tensor {name!r} is {stored or info['dtype']}, expected {dtype}")
        t = torch.empty(got, dtype=stored)
        begin, end = info["data_offsets"]
        buf = t.reshape(-1).view(torch.uint8).numpy()
        with open(path, "rb") as f:
            f.seek(self._headers[path][1] + begin)
            if end - begin != buf.nbytes or f.readinto(memoryview(buf)) != buf.nbytes:
                raise CheckpointError(f"tensor {name!r} in {str(path)!r} is cut short: save the checkpoint again")
        return t
