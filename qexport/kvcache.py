"""A quantized attention KV cache: keys and values stored as int8 or packed int4 codes plus scales.

Layout (the same in the PyTorch cache and in a KV-quantized ONNX export, so one reads the other's tensors):
for a key or value tensor ``x`` of shape ``[batch, kv_heads, seq, head_dim]`` (keys after RoPE, as Hugging
Face models hand them to the cache) and a :class:`~qexport.config.KVCacheSpec` with ``G`` groups of ``g``
elements along ``head_dim`` (``G * g = head_dim``; one group when ``group_size`` is None):

* ``codes``: ``[batch, kv_heads, seq, head_dim]`` int8 (8-bit symmetric) or uint8 (8-bit asymmetric), or
  ``[batch, kv_heads, seq, head_dim / 2]`` uint8 for 4 bits: element ``2j`` in the low nibble of byte ``j``,
  ``2j + 1`` in the high nibble. Symmetric 4-bit codes are stored offset by 8 (nibble = code + 8).
* ``scale``: ``[batch, kv_heads, seq, G]`` float32, one per token, head and group.
* ``zero_point``: ``[batch, kv_heads, seq, G]`` uint8, asymmetric only.

Dequantization is ``(code - zero_point) * scale`` (ONNX ``DequantizeLinear``); quantization is
``clamp(round(x / scale) + zero_point)`` with round-half-to-even (ONNX ``QuantizeLinear``). Symmetric:
``scale = max|x| / (2^(b-1) - 1)``; asymmetric: the group's range widened to include 0, ``scale = (max - min)
/ (2^b - 1)``, ``zero_point = round(-min / scale)``.

Every token is quantized on its own (its scales depend on nothing else), so a cache filled by one prefill
holds exactly the codes that token-by-token decoding would have written: a forward over a whole window
with a fresh :class:`QuantizedKVCache` is the decode path, and that is how perplexity is measured
(:func:`qexport.eval.perplexity` with ``kv_cache=``). The tokens of the current step are quantized before
attention too, so each query sees the quantized keys and values of every earlier token and of itself.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qexport.config import KVCacheSpec
from qexport.errors import InvalidTensor

__all__ = ["QuantizedKV", "quantize_kv", "dequantize_kv", "QuantizedKVLayer", "QuantizedKVCache",
           "kv_cache_bytes"]

# The smallest scale: a group of zeros gets this instead of 0 (no division by zero; its codes dequantize to 0).
_TINY = 1e-12


class QuantizedKV(NamedTuple):
    """The stored form of a key or value tensor (see the module docstring); ``zero_point`` is None when
    symmetric."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    def cat(self, other: "QuantizedKV") -> "QuantizedKV":
        """Both, concatenated along the sequence axis."""
        return QuantizedKV(*(None if a is None else torch.cat([a, b], dim=-2) for a, b in zip(self, other)))

    def map(self, fn) -> "QuantizedKV":
        return QuantizedKV(*(None if t is None else fn(t) for t in self))

    @property
    def seq_len(self) -> int:
        return self.codes.shape[-2]


def _grid(spec: KVCacheSpec) -> tuple[int, int]:
    """(lowest, highest) integer code before storage."""
    if spec.symmetric:
        q = 2 ** (spec.bits - 1) - 1
        return -q, q
    return 0, 2**spec.bits - 1


# Packing is float arithmetic (exact for integers below 2^24), not bit operations: the ONNX exporter types
# uint8 shifts wrongly (ONNX Runtime refuses the graph), and Mul / Div / Floor on floats run everywhere.
def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """Integer-valued floats in [0, 15] along the last axis, two per uint8: element 2j low, 2j + 1 high."""
    return (nibbles[..., 0::2] + 16.0 * nibbles[..., 1::2]).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., n]`` uint8 -> ``[..., 2n]`` float codes in [0, 15]."""
    b = packed.float()
    high = torch.floor(b * 0.0625)
    return torch.stack([b - 16.0 * high, high], dim=-1).flatten(-2)


def quantize_kv(x: torch.Tensor, spec: KVCacheSpec) -> QuantizedKV:
    """``x`` ``[..., head_dim]`` (float) as codes, scales and zero points (see the module docstring)."""
    if not x.is_floating_point():
        raise InvalidTensor(f"quantize_kv expects float keys / values, got {x.dtype}")
    head_dim = x.shape[-1]
    groups = spec.groups(head_dim)
    lo, hi = _grid(spec)
    xg = x.float().unflatten(-1, (groups, head_dim // groups))
    if spec.symmetric:
        scale = (xg.abs().amax(dim=-1, keepdim=True) / hi).clamp_min(_TINY)
        q = torch.clamp(torch.round(xg / scale), lo, hi)
        zero = None
    else:
        mn = xg.amin(dim=-1, keepdim=True).clamp(max=0.0)
        mx = xg.amax(dim=-1, keepdim=True).clamp(min=0.0)
        scale = ((mx - mn) / hi).clamp_min(_TINY)
        zero = torch.clamp(torch.round(-mn / scale), lo, hi)
        q = torch.clamp(torch.round(xg / scale) + zero, lo, hi)
        zero = zero.squeeze(-1).to(torch.uint8)
    q = q.flatten(-2)
    if spec.bits == 4:
        codes = pack_int4(q + 8.0 if spec.symmetric else q)
    else:
        codes = q.to(torch.int8 if spec.symmetric else torch.uint8)
    return QuantizedKV(codes, scale.squeeze(-1), zero)


def dequantize_kv(q: QuantizedKV, spec: KVCacheSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor ``(code - zero_point) * scale`` of ``q``, as ``dtype``."""
    codes = q.codes
    if spec.bits == 4:
        codes = unpack_int4(codes)
    values = codes.float()
    if spec.bits == 4 and spec.symmetric:
        values = values - 8.0
    groups = q.scale.shape[-1]
    values = values.unflatten(-1, (groups, values.shape[-1] // groups))
    if q.zero_point is not None:
        values = values - q.zero_point.float().unsqueeze(-1)
    return (values * q.scale.unsqueeze(-1)).flatten(-2).to(dtype)


def kv_cache_bytes(spec: KVCacheSpec | None, head_dim: int, dtype_bytes: int = 4) -> float:
    """Bytes stored per token, per head, for keys or values: codes plus scales (plus zero points)."""
    if spec is None:
        return float(head_dim * dtype_bytes)
    groups = spec.groups(head_dim)
    return head_dim * spec.bits / 8 + groups * (4 + (0 if spec.symmetric else 1))


def _dequantized_view(store: str, name: str) -> property:
    """A read-only property: the layer's quantized ``store`` dequantized (None while empty). The base class's
    ``__init__`` assigns None, which is accepted."""

    def get(self) -> torch.Tensor | None:
        q = getattr(self, store)
        return None if q is None else dequantize_kv(q, self.spec, self.dtype)

    def set_(self, value) -> None:
        if value is not None:
            raise AttributeError(f"QuantizedKVLayer.{name} is read-only: use update()")

    return property(get, set_)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: quantizes what it receives, stores codes, and hands attention the
    dequantized keys and values of the whole cache (including the tokens just added).

    ``keys`` / ``values`` read as the dequantized float tensors (what ``cache[i]`` returns); the stored
    form is ``qkeys`` / ``qvalues`` (:class:`QuantizedKV`).
    """

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        self.qkeys: QuantizedKV | None = None
        self.qvalues: QuantizedKV | None = None
        super().__init__()

    # The base class assigns keys / values; here they are views of the quantized store.
    keys = _dequantized_view("qkeys", "keys")
    values = _dequantized_view("qvalues", "values")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.spec.groups(key_states.shape[-1])  # a spec that does not fit head_dim fails here, clearly
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def load(self, keys: QuantizedKV, values: QuantizedKV, dtype: torch.dtype = torch.float32) -> None:
        """Start from stored tensors (an ONNX export's past inputs)."""
        self.dtype, self.device = dtype, keys.codes.device
        self.qkeys, self.qvalues = keys, values
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        qk, qv = quantize_kv(key_states, self.spec), quantize_kv(value_states, self.spec)
        self.qkeys = qk if self.qkeys is None else self.qkeys.cat(qk)
        self.qvalues = qv if self.qvalues is None else self.qvalues.cat(qv)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.seq_len

    def _apply(self, fn) -> None:
        if self.qkeys is not None:
            self.qkeys, self.qvalues = self.qkeys.map(fn), self.qvalues.map(fn)

    def reset(self) -> None:
        self.qkeys = self.qvalues = None

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() - abs(max_length)
        if self.get_seq_length() > max_length:
            self._apply(lambda t: t[..., :max_length, :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.qkeys is not None and self.qkeys.codes.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def stored_bytes(self) -> int:
        """Bytes this layer holds (codes, scales, zero points of keys and values)."""
        if self.qkeys is None:
            return 0
        return sum(t.numel() * t.element_size() for q in (self.qkeys, self.qvalues) for t in q if t is not None)


class QuantizedKVCache(Cache):
    """A Hugging Face ``Cache`` whose layers store keys and values quantized by ``spec``
    (:class:`QuantizedKVLayer`). Pass it as ``cache`` to a forward pass or to ``generate()``::

        cache = QuantizedKVCache("int8")
        model.generate(**inputs, cache=cache, max_new_tokens=32)

    Args:
        spec: a :class:`~qexport.config.KVCacheSpec`, a dict, or a name in ``KV_CACHE_PRESETS``.
    """

    def __init__(self, spec: KVCacheSpec | str | dict):
        self.spec = KVCacheSpec.parse(spec)
        if self.spec is None:
            from qexport.errors import InvalidConfig

            raise InvalidConfig("QuantizedKVCache needs a KV-cache spec (e.g. 'int8'); use DynamicCache for float")
        super().__init__(layer_class_to_replicate=functools.partial(QuantizedKVLayer, self.spec))

    @classmethod
    def from_stored(cls, spec: KVCacheSpec, layers: list[tuple[QuantizedKV, QuantizedKV]],
                    dtype: torch.dtype = torch.float32) -> "QuantizedKVCache":
        """A cache holding already-quantized ``(keys, values)`` per layer."""
        cache = cls(spec)
        for k, v in layers:
            layer = QuantizedKVLayer(cache.spec)
            layer.load(k, v, dtype)
            cache.layers.append(layer)
        return cache

    def stored_bytes(self) -> int:
        """Bytes held by all layers (codes, scales, zero points)."""
        return sum(layer.stored_bytes() for layer in self.layers)


# ---- ONNX export interface ------------------------------------------------------------------------------
def stored_names(spec: KVCacheSpec | None, prefix: str, layers: int) -> list[str]:
    """Graph input (``prefix='past_key_values'``) or output (``'present'``) names of the cache, in order:
    per layer, ``key`` then ``value``, each followed by its ``_scale`` and (asymmetric) ``_zero_point``."""
    parts = [""] if spec is None else ["", "_scale"] + ([] if spec.symmetric else ["_zero_point"])
    return [f"{prefix}.{i}.{kind}{p}" for i in range(layers) for kind in ("key", "value") for p in parts]


def stored_layout(spec: KVCacheSpec, head_dim: int) -> dict[str, Any]:
    """Dtype and shape of each stored tensor (for the export report)."""
    groups = spec.groups(head_dim)
    codes = "uint8" if spec.bits == 4 or not spec.symmetric else "int8"
    out = {
        "codes": {"dtype": codes, "shape": ["batch", "kv_heads", "seq", head_dim // 2 if spec.bits == 4 else head_dim],
                  "values": ("two 4-bit codes per byte along head_dim (element 2j low nibble, 2j+1 high)"
                             + ("; stored as code + 8" if spec.symmetric else "")) if spec.bits == 4 else
                  f"{spec.bits}-bit codes"},
        "scale": {"dtype": "float32", "shape": ["batch", "kv_heads", "seq", groups]},
        "dequantize": "(code - zero_point) * scale, per group of "
                      f"{head_dim // groups} elements of head_dim",
    }
    if not spec.symmetric:
        out["zero_point"] = {"dtype": "uint8", "shape": ["batch", "kv_heads", "seq", groups]}
    return out


def example_stored(spec: KVCacheSpec, batch: int, kv_heads: int, past: int, head_dim: int) -> list[torch.Tensor]:
    """Example past tensors of one key or value (codes, scale, zero point), as the export traces them."""
    q = quantize_kv(torch.randn(batch, kv_heads, past, head_dim), spec)
    return [t for t in q if t is not None]


def cache_from_flat(spec: KVCacheSpec, flat: tuple[torch.Tensor, ...], layers: int) -> QuantizedKVCache:
    """A cache from the flat past tensors of an export (order of :func:`stored_names`)."""
    per = 2 if spec.symmetric else 3
    if len(flat) != 2 * per * layers:
        raise InvalidTensor(f"expected {2 * per * layers} past tensors for {layers} layers, got {len(flat)}")

    def one(j: int) -> QuantizedKV:
        t = flat[j * per:(j + 1) * per]
        return QuantizedKV(t[0], t[1], None if spec.symmetric else t[2])

    return QuantizedKVCache.from_stored(spec, [(one(2 * i), one(2 * i + 1)) for i in range(layers)])


def flat_from_cache(cache: QuantizedKVCache) -> list[torch.Tensor]:
    """The stored tensors of every layer, in the order of :func:`stored_names`."""
    return [t for layer in cache.layers for q in (layer.qkeys, layer.qvalues) for t in q if t is not None]
