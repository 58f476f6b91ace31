"""``QLinear`` and ``QEmbedding``: ``nn.Linear`` / ``nn.Embedding`` replacements that store packed integer weights
and their scales."""

from __future__ import annotations

import torch
from torch import nn

from qexport import ops
from qexport.config import Granularity, NumberFormat, QuantSpec
from qexport.errors import CalibrationError, InvalidTensor
from qexport.formats import DoubleQuant, QuantizedWeight, quantize_weight


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """Static int8 activation scale (0-d tensor) and zero point from an observed range.

    Symmetric: ``scale = max(|lo|, |hi|) / 127``, zero point 0 (what TensorRT requires). Asymmetric: the
    range (widened to include 0) spread over the 256 int8 codes, with an integer zero point in [-128, 127].
    """
    lo = torch.clamp(lo.to(torch.float32), max=0.0)
    hi = torch.clamp(hi.to(torch.float32), min=0.0)
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        return torch.maximum(lo.abs(), hi.abs()).div(127.0).clamp_min(tiny).reshape(()), 0
    scale = ((hi - lo) / 255.0).clamp_min(tiny).reshape(())
    zero_point = int(torch.round(-128.0 - lo / scale).clamp(-128, 127))
    return scale, zero_point


class QLinear(nn.Module):
    """A linear layer with a quantized weight, held in its stored form (real memory saving).

    The packed codes, scales, zero points and double-quantization tensors are registered as buffers, so
    ``state_dict()``, ``.to()`` and size accounting see exactly what is stored. The forward pass runs the
    reference kernel (dequantize, then matmul) in the dtype of the input.
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                 weight_dtype: torch.dtype = torch.float32, act_spec: QuantSpec | None = None):
        super().__init__()
        self.spec = qweight.spec
        self.act_spec = act_spec
        if act_spec is not None and (qweight.spec.bits != 8 or qweight.double_quant is not None):
            raise InvalidTensor("quantized activations need int8 weights")
        self.out_features, self.in_features = qweight.shape
        self.group = qweight.group
        self.weight_dtype = weight_dtype
        self._dq_block = qweight.double_quant.block if qweight.double_quant is not None else None
        for name, t in qweight.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # static activation quantization: calibrated scale / zero point, and the running range while observing
        self.observing = False
        self.act_zero_point = 0
        self.activation_fallback: str | None = None  # why calibrated activations stayed float (static_fallback_ratio)
        self._token_ranges: list[torch.Tensor] = []  # per-token max |x| while observing, for static_fallback_ratio
        if act_spec is not None and not act_spec.dynamic:
            self.register_buffer("act_scale", torch.zeros(()))  # 0 until calibrated
            self.register_buffer("obs_min", torch.full((), float("inf")), persistent=False)
            self.register_buffer("obs_max", torch.full((), float("-inf")), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, name: str = "linear",
                    act_spec: QuantSpec | None = None) -> "QLinear":
        qw = quantize_weight(linear.weight, spec, name=name)
        return cls(qw, linear.bias, weight_dtype=linear.weight.dtype, act_spec=act_spec)

    @property
    def needs_calibration(self) -> bool:
        return self.act_spec is not None and not self.act_spec.dynamic

    @property
    def calibrated(self) -> bool:
        return self.needs_calibration and bool(self.act_scale > 0)

    def freeze_calibration(self) -> None:
        """Turn the observed activation range into the static scale and stop observing."""
        if not torch.isfinite(self.obs_min):
            raise CalibrationError("no calibration data reached this layer")
        ratio = self.act_spec.static_fallback_ratio
        tokens = torch.cat(self._token_ranges) if self._token_ranges else None
        self._token_ranges = []
        self.observing = False
        if ratio is not None and tokens is not None:
            median = float(tokens.median())
            peak = float(torch.maximum(self.obs_max.abs(), self.obs_min.abs()))
            if peak > ratio * median:
                self.activation_fallback = (f"calibrated range {peak:.3g} is {peak / max(median, 1e-30):.0f}x the "
                                            f"median token's {median:.3g} (> static_fallback_ratio {ratio:g}): "
                                            "activations kept float, weights quantized")
                self.act_spec = None
                for name in ("act_scale", "obs_min", "obs_max"):
                    delattr(self, name)
                return
        scale, self.act_zero_point = activation_qparams(self.obs_min, self.obs_max, self.act_spec)
        self.act_scale.copy_(scale)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as a :class:`QuantizedWeight` view on this module's buffers."""
        dq = None
        if self._dq_block is not None:
            dq = DoubleQuant(self.qscale, self.scale2, self.scale_offset, self._dq_block)
        return QuantizedWeight(
            spec=self.spec,
            shape=(self.out_features, self.in_features),
            group=self.group,
            qdata=self.qdata,
            scale=getattr(self, "scale", None),
            zero_point=getattr(self, "zero_point", None),
            double_quant=dq,
        )

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized_weight().dequantize().to(self.weight_dtype)

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.quantized_weight()
        return ops.qlinear(x, qw.qdata, qw.scales(), qw.zero_point, self.bias, self.spec.format.value, self.spec.bits,
                           self.group, self.in_features, self.spec.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InvalidTensor(f"QLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        a = self.act_spec
        if a is None:
            return self._weight_only(x)
        if a.outlier_threshold is not None:  # LLM.int8()
            return ops.qlinear_llm_int8(x, self.qdata, self.scale, self.bias, a.outlier_threshold).to(x.dtype)
        if a.dynamic:
            quant = ops.quantize_per_token if a.granularity is Granularity.PER_TOKEN else ops.quantize_per_tensor_dynamic
            xq, xs = quant(x)
            return ops.qlinear_a8(xq, xs, 0, self.qdata, self.scale, self.bias).to(x.dtype)
        if self.observing:
            self.obs_min = torch.minimum(self.obs_min, x.detach().amin().to(torch.float32))
            self.obs_max = torch.maximum(self.obs_max, x.detach().amax().to(torch.float32))
            if a.static_fallback_ratio is not None:
                self._token_ranges.append(x.detach().abs().amax(-1).flatten().to(torch.float32))
            return self._weight_only(x)
        # torch.export cannot branch on a buffer's value; qexport.export checks calibration before exporting
        if not torch.compiler.is_exporting() and not self.calibrated:
            raise CalibrationError("this layer quantizes activations statically: run qexport.calibrate(model, batches) first")
        xq = ops.quantize_per_tensor(x, self.act_scale, self.act_zero_point)
        return ops.qlinear_a8(xq, self.act_scale, self.act_zero_point, self.qdata, self.scale, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        act = f", act {self.act_spec.describe()}" if self.act_spec is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}{act}"


class QEmbedding(nn.Module):
    """An ``nn.Embedding`` replacement that stores its ``[num_embeddings, embedding_dim]`` table quantized: one
    row per token, groups along the hidden dimension (the layout of a ``QLinear`` weight ``[N, K]``, so a tied
    ``lm_head`` reads the very same tensors: :func:`qexport.quantize` shares one :class:`QuantizedWeight`
    between them). The forward pass gathers the codes, scales and zero points of the rows asked for and
    dequantizes only those rows (``qexport::qembedding``), in the table's original dtype. ``embed_scale``: the
    factor a scaled embedding (Gemma's ``sqrt(hidden_size)``, transformers' ``*ScaledWordEmbedding``) multiplies
    the looked-up rows by, applied as it does (a float32 scalar cast to the table's dtype).
    """

    def __init__(self, qweight: QuantizedWeight, weight_dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None, embed_scale: float | None = None):
        super().__init__()
        fmt = qweight.spec.format
        if not (fmt is NumberFormat.INT or fmt.ggml) or qweight.double_quant is not None:
            raise InvalidTensor(f"a quantized embedding stores integer grids or GGML blocks, not "
                                f"{qweight.spec.describe()}")
        self.spec = qweight.spec
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.group = qweight.group
        self.weight_dtype = weight_dtype
        self.padding_idx = padding_idx
        for name, t in qweight.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("embed_scale", None if embed_scale is None else torch.tensor(float(embed_scale)),
                             persistent=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: QuantSpec, name: str = "embedding",
                       qweight: QuantizedWeight | None = None) -> "QEmbedding":
        """The quantized form of ``emb`` (``qweight``: an already quantized form of its weight to share)."""
        if emb.max_norm is not None:
            raise InvalidTensor(f"{name}: an embedding with max_norm renormalizes its weight when looked up; "
                                "it has no fixed quantized form")
        qw = qweight if qweight is not None else quantize_weight(emb.weight, spec, name=name)
        return cls(qw, weight_dtype=emb.weight.dtype, padding_idx=emb.padding_idx, embed_scale=embed_scale_of(emb))

    def quantized_weight(self) -> QuantizedWeight:
        """The stored table as a :class:`QuantizedWeight` view on this module's buffers."""
        return QuantizedWeight(spec=self.spec, shape=(self.num_embeddings, self.embedding_dim), group=self.group,
                               qdata=self.qdata, scale=getattr(self, "scale", None),
                               zero_point=getattr(self, "zero_point", None))

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized_weight().dequantize().to(self.weight_dtype)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        s = self.spec
        y = ops.qembedding(indices, self.qdata, self.quantized_weight().scales(), getattr(self, "zero_point", None),
                           s.format.value, s.bits, self.group, self.embedding_dim, s.symmetric)
        y = y.to(self.weight_dtype)
        return y if self.embed_scale is None else y * self.embed_scale.to(self.weight_dtype)

    def extra_repr(self) -> str:
        scaled = "" if self.embed_scale is None else f", scaled by {float(self.embed_scale):g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.describe()}{scaled}"


def embed_scale_of(emb: nn.Embedding) -> float | None:
    """The factor of a scaled embedding (transformers' ``*ScaledWordEmbedding``: the lookup times a scalar
    ``embed_scale``), None for a plain ``nn.Embedding``; InvalidTensor for another subclass, whose forward
    qexport does not know."""
    if type(emb) is nn.Embedding:
        return None
    scale = getattr(emb, "embed_scale", None)
    if type(emb).__name__.endswith("ScaledWordEmbedding") and isinstance(scale, torch.Tensor) and scale.dim() == 0:
        return float(scale.to(torch.float32))
    raise InvalidTensor(f"{type(emb).__name__} is a subclass of nn.Embedding whose forward qexport does not "
                        "reproduce")


def tied_groups(modules) -> list[list[str]]:
    """The names of quantized modules that hold the same stored weight (a tied embedding and ``lm_head``), one
    list per stored weight, in the order of ``modules`` (``(name, module)`` pairs): the one place ties are found."""
    groups: dict[int, list[str]] = {}
    for name, mod in modules:
        groups.setdefault(id(mod.qdata), []).append(name)
    return list(groups.values())
