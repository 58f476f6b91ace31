"""``QLinear``: an ``nn.Linear`` replacement that stores packed integer weights and their scales."""

from __future__ import annotations

import torch
from torch import nn

from qexport.config import QuantSpec
from qexport.formats import DoubleQuant, QuantizedWeight, quantize_weight


class QLinear(nn.Module):
    """A linear layer with a quantized weight, held in its stored form (real memory saving).

    The packed codes, scales, zero points and double-quantization tensors are registered as buffers, so
    ``state_dict()``, ``.to()`` and size accounting see exactly what is stored. The forward pass runs the
    reference kernel (dequantize, then matmul) in the dtype of the input.
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = qweight.spec
        self.out_features, self.in_features = qweight.shape
        self.group = qweight.group
        self.weight_dtype = weight_dtype
        self._dq_block = qweight.double_quant.block if qweight.double_quant is not None else None
        for name, t in qweight.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, name: str = "linear") -> "QLinear":
        qw = quantize_weight(linear.weight, spec, name=name)
        return cls(qw, linear.bias, weight_dtype=linear.weight.dtype)

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

    @property
    def weight_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            from qexport.errors import InvalidTensor

            raise InvalidTensor(f"QLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        from qexport.kernels import reference

        return reference.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}"
