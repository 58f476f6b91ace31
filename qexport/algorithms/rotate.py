"""Incoherence by rotation (QuaRot / QuIP# style): turn a Llama-style model into an equivalent one whose
linear weights have no outlier columns, so that 2-bit grids lose far less.

An orthogonal ``Q`` (``Q Q^T = I``) inserted as ``x W^T = (x Q)(W Q)^T`` changes nothing in float, but
``W Q`` spreads every input channel over all of them: large columns of ``W`` (the inputs that matter most)
are mixed with small ones, and each group of 64 weights sees roughly Gaussian values whose range the grid
covers much better. A randomized Hadamard matrix ``diag(±1) H / sqrt(n)`` does this best (every entry has
magnitude ``1/sqrt(n)``); when no Hadamard matrix of the size is known, a seeded random orthogonal matrix
(QR of a Gaussian one) is used.

What :func:`rotate_model` does to a decoder whose layout the architecture table gives
(:mod:`qexport.models.architectures`; Llama's names below), all folded into weights, computed in float64:

- RMSNorm weights are folded into the linears that read the norm's output (``input_layernorm`` into
  q/k/v_proj, ``post_attention_layernorm`` into gate/up_proj, the final ``norm`` into ``lm_head``); the norms
  keep weight 1. A weightless RMSNorm commutes with an orthogonal ``Q`` (it only divides by the norm).
- The residual stream is rotated by ``Q`` (size ``hidden_size``): the embedding rows are multiplied by
  ``Q``, the inputs of q/k/v/gate/up_proj and lm_head by ``Q``, the outputs of o_proj and down_proj (and their
  biases) by ``Q^T``. A tied ``lm_head`` is untied (it then holds ``W diag(g) Q``, the embedding ``W Q``) and
  ``config.tie_word_embeddings`` is set to false: the lm_head becomes a separate float matrix.
- Every attention head's values are rotated by a ``head_dim`` Hadamard ``H_v`` between v_proj (output
  rows) and o_proj (input columns); attention mixes tokens, not channels, so this also folds exactly.
- The input of down_proj, ``act(gate(x)) * up(x)``, cannot be folded into anything before it: the MLP is
  replaced by :class:`RotatedMLP`, which applies one explicit *online* rotation :class:`OnlineRotation`
  (``x @ Q_mlp``, a plain MatMul of size ``intermediate_size``^2 that every back-end lowers as is) before
  down_proj, whose weight becomes ``W Q_mlp``. One matrix is shared by all layers (one module, held by each
  :class:`RotatedMLP`); it costs one ``intermediate^2`` MatMul per layer and token (SmolLM2: 1536 x 1536,
  30 per token, ~4% of the model's multiply-adds) and stays float32.

Where the math does not apply, rotation is refused with the reason (:func:`~qexport.models.architectures.
rotation_refusal`): LayerNorm families (OPT) subtract the mean, which does not commute with ``Q``; Gemma 2 / 3
normalize each sublayer's output with a weighted norm before the residual add, which would need two online
rotations per layer; Phi-3's fused projections are not handled yet.

The rotated model computes the same logits as the original up to float rounding (tests check it), and
everything downstream (GPTQ, round-to-nearest, ONNX export, the compile back-end) sees ordinary linears.
The recipe option ``rotate`` (``'hadamard'`` or ``'random'``, with ``rotate_seed``) applies it in
:func:`qexport.quantize` before the weights are quantized.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from qexport.algorithms.registry import Option
from qexport.errors import InvalidConfig, UnsupportedOp
from qexport.models.architectures import architecture, describe, find_architecture, rotation_refusal

__all__ = ["rotate_model", "RotationPlan", "install_online_rotation", "RotationReport", "RotatedMLP", "OnlineRotation",
           "hadamard_matrix", "orthogonal_matrix", "ROTATIONS", "ROTATE_OPTIONS"]

ROTATIONS = ("none", "hadamard", "random")  # values of the recipe option ``rotate``

# The options of the algorithms that may rotate first (rtn and gptq). AWQ does not take them: its scales are
# folded between up_proj and down_proj, which the online rotation separates. At their defaults they are left
# out of a recipe's JSON, so recipes without rotation are written as before.
ROTATE_OPTIONS: dict[str, Option] = {
    "rotate": Option("none", str, choices=ROTATIONS, omit_default=True,
                     doc="rotate a Llama model by orthogonal matrices folded into its weights before quantizing "
                         "('hadamard': randomized Hadamard where the size allows, else random orthogonal)"),
    "rotate_seed": Option(0, int, 0, None, "seed of the rotation's random signs / matrices", omit_default=True),
}


# ----------------------------------------------------------------------------------------------------
# Orthogonal matrices
# ----------------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q`` with ``q % 4 == 3``.

    With the Jacobsthal matrix ``J[i, j] = legendre(j - i, q)`` (antisymmetric for such q) and
    ``S = [[0, 1^T], [-1, J]]``, ``H = I + S`` satisfies ``H H^T = (q + 1) I``.
    """
    residues = {(x * x) % q for x in range(1, q)}
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q
    chi = torch.tensor([0.0] + [1.0 if r in residues else -1.0 for r in range(1, q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = chi[diff]
    return torch.eye(q + 1, dtype=torch.float64) + s


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order ``n`` (float64, ``H H^T = n I``), or None when none is constructed.

    Orders ``m * 2^k`` with ``m = 1`` or ``m = q + 1`` for a prime ``q % 4 == 3`` (Sylvester doubling of a
    Paley matrix): every power of two, and e.g. 12, 20, 24, 160 = 20 x 8, 576 = 72 x 8, 1536 = 12 x 128.
    """
    if n < 1:
        return None
    k = 0
    while n % (2 << k) == 0:
        k += 1
    for j in range(k, -1, -1):  # the largest power of two first: the smallest Paley factor
        m = n >> j
        if m == 1:
            return _sylvester(n)
        if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            return torch.kron(_paley(m - 1), _sylvester(1 << j))
    return None


def orthogonal_matrix(n: int, method: str, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """An ``n x n`` orthogonal matrix (float64) and how it was made.

    ``'hadamard'``: ``diag(s) H / sqrt(n)`` with random signs ``s`` when a Hadamard matrix of order n is
    known, otherwise a random orthogonal matrix; ``'random'``: always a random orthogonal matrix (Haar
    distributed: QR of a Gaussian matrix with the signs of R's diagonal moved into Q).
    """
    if method == "hadamard":
        h = hadamard_matrix(n)
        if h is not None:
            signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
            return signs[:, None] * h / math.sqrt(n), "randomized hadamard"
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal"


# ----------------------------------------------------------------------------------------------------
# The online rotation and the MLP that applies it
# ----------------------------------------------------------------------------------------------------
class OnlineRotation(nn.Module):
    """``x @ matrix`` on the last dimension: a rotation that could not be folded into a weight."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.matrix.to(x.dtype))

    def extra_repr(self) -> str:
        return f"size={self.matrix.shape[0]}"


class RotatedMLP(nn.Module):
    """A gated MLP with an online rotation before down_proj: ``down(R(act(gate(x)) * up(x)))``.

    It keeps the original module's children and their names (``gate_proj``, ``up_proj``, ``down_proj``,
    ``act_fn``), so recipe patterns and reports name the same layers as before.
    """

    def __init__(self, mlp: nn.Module, rotation: OnlineRotation):
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.online_rotation = rotation
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.online_rotation(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


# ----------------------------------------------------------------------------------------------------
# Rotating a model
# ----------------------------------------------------------------------------------------------------
@dataclass
class RotationReport:
    """What :func:`rotate_model` did (stored as ``model.qexport_rotation`` and in the quantization report)."""

    method: str
    seed: int
    residual: str  # e.g. "randomized hadamard 576"
    heads: str
    online: str
    online_rotations: int  # explicit rotations run per forward pass (one per decoder layer)
    untied_lm_head: bool
    folded_norms: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_rotatable(model: nn.Module):
    """The architecture entry of a float model that rotation applies to; the reason as an error otherwise."""
    from qexport.modules import QLinear

    arch = architecture(model, "rotation (recipe option 'rotate')", "use rotate='none' for this model")
    why = rotation_refusal(arch)
    if why is not None:
        raise UnsupportedOp(f"rotation (recipe option 'rotate') does not apply to {arch.family}: {why}; use "
                            "rotate='none' for this model")
    if getattr(model, "qexport_rotation", None) is not None:
        raise InvalidConfig("this model is rotated already (model.qexport_rotation); rotate a fresh copy of the "
                            "float model, once")
    if any(isinstance(m, QLinear) for m in model.modules()):
        raise InvalidConfig("rotate the float model before quantizing it: this one has quantized layers already")
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        for name in (*arch.mlp_in, arch.mlp_out):
            if not isinstance(arch.linear(layer, "mlp", name), nn.Linear):
                raise UnsupportedOp(f"{arch.layers}.{i}.{arch.mlp}.{name} is not an nn.Linear; rotation needs the "
                                    "float MLP")
    return arch


def install_online_rotation(model: nn.Module, online: "OnlineRotation | None" = None) -> None:
    """Replace every decoder layer's MLP by a :class:`RotatedMLP` sharing ``online`` (a rotation of the right
    size on the meta device when None: a saved folder's skeleton, filled when it loads)."""
    arch = find_architecture(model)
    layers = list(model.get_submodule(arch.layers))
    if not layers:
        return
    if online is None:
        inter = arch.linear(layers[0], "mlp", arch.mlp_out).in_features
        online = OnlineRotation(torch.empty(inter, inter, device="meta"))
    for layer in layers:
        layer.set_submodule(arch.mlp, RotatedMLP(arch.mlp_module(layer), online))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _assign(param_owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(param_owner, name)
    setattr(param_owner, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


def _rotate_input(linear: nn.Linear, q: torch.Tensor, norm_weight: torch.Tensor | None = None) -> None:
    """``W <- W diag(g) Q``: the layer now reads ``x Q`` (the norm's weight g folded in when given)."""
    w = _f64(linear.weight)
    if norm_weight is not None:
        w = w * norm_weight[None, :]
    _assign(linear, "weight", w @ q)


def _rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
    """``W <- Q^T W``, ``b <- b Q``: the layer now writes ``y Q``."""
    _assign(linear, "weight", q.T @ _f64(linear.weight))
    if linear.bias is not None:
        _assign(linear, "bias", _f64(linear.bias) @ q)


class RotationPlan:
    """The rotation of one model, made from its shapes only (a skeleton on the meta device will do), applied
    part by part: :meth:`fold_final_norm` and :meth:`rotate_tables` outside the decoder blocks,
    :meth:`rotate_layer` to each block, :meth:`install` for the online rotation. :func:`rotate_model` applies
    them all at once; :mod:`qexport.stream` applies each as its part of the model is read. The matrices come
    from one generator seeded with ``seed``, in the same order, so both give the same rotated weights."""

    def __init__(self, model: nn.Module, method: str = "hadamard", seed: int = 0):
        if method not in ROTATIONS or method == "none":
            raise InvalidConfig(f"rotation method {method!r} is not valid; allowed: 'hadamard', 'random'")
        self.arch = arch = _check_rotatable(model)
        self.method, self.seed = method, int(seed)
        self.facts = describe(model, arch)
        gen = torch.Generator().manual_seed(self.seed)
        self.q, self.q_kind = orthogonal_matrix(self.facts.hidden, method, gen)
        self.hv, self.hv_kind = orthogonal_matrix(self.facts.head_dim, method, gen)
        layers = list(model.get_submodule(arch.layers))
        self.layers = len(layers)
        self.online = None
        self.qm, self.qm_kind, self.inter = None, "none", 0
        if layers:
            down = arch.linear(layers[0], "mlp", arch.mlp_out)
            self.inter = down.in_features
            self.qm, self.qm_kind = orthogonal_matrix(self.inter, method, gen)
            self.online = OnlineRotation(self.qm.to(down.weight.dtype))
        self.untie = model.get_submodule(arch.lm_head).weight is model.get_submodule(arch.embed).weight
        self.final_norm: torch.Tensor | None = None

    def fold_final_norm(self, model: nn.Module) -> None:
        """Keep the final norm's weight for ``lm_head`` and set it to 1."""
        norm = model.get_submodule(self.arch.final_norm)
        self.final_norm = _f64(norm.weight).clone()
        norm.weight.fill_(1.0)

    def untie_head(self, model: nn.Module) -> None:
        """A ``lm_head`` that shares the embedding's weight gets a copy of its own (on the meta device for a
        skeleton), and the config says it is untied: the two are rotated differently."""
        embed, lm_head = model.get_submodule(self.arch.embed), model.get_submodule(self.arch.lm_head)
        if lm_head.weight is embed.weight:
            lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        if self.untie:
            cfg = model.config
            cfg.tie_word_embeddings = False
            if hasattr(cfg, "get_text_config"):
                cfg.get_text_config().tie_word_embeddings = False

    def rotate_tables(self, model: nn.Module) -> None:
        """The embedding's rows by ``Q``; ``lm_head`` (untied first when it shares the embedding's weight) with
        the final norm folded in (:meth:`fold_final_norm` first)."""
        self.untie_head(model)
        embed, lm_head = model.get_submodule(self.arch.embed), model.get_submodule(self.arch.lm_head)
        _assign(embed, "weight", _f64(embed.weight) @ self.q)
        _rotate_input(lm_head, self.q, self.final_norm)

    def rotate_layer(self, layer: nn.Module) -> None:
        """One decoder layer: its norms folded into the linears that read them, the residual stream by ``Q``,
        each head's values by ``H_v``, ``down_proj``'s input by the online rotation's matrix."""
        arch, q, hv = self.arch, self.q, self.hv
        heads, kv_heads, head_dim = self.facts.heads, self.facts.kv_heads, self.facts.head_dim
        attn, mlp = arch.attention(layer), arch.mlp_module(layer)
        norm1, norm2 = layer.get_submodule(arch.attn_norm), layer.get_submodule(arch.mlp_norm)
        g = _f64(norm1.weight)
        q_proj, k_proj, v = (attn.get_submodule(n) for n in arch.qkv)
        for lin in (q_proj, k_proj, v):
            _rotate_input(lin, q, g)
        norm1.weight.fill_(1.0)
        # values: each head's output rows by H_v (v_h -> v_h H_v), o_proj's matching input columns by H_v
        wv = _f64(v.weight).reshape(kv_heads, head_dim, -1)
        _assign(v, "weight", torch.einsum("dj,hdk->hjk", hv, wv).reshape(kv_heads * head_dim, -1))
        if v.bias is not None:
            _assign(v, "bias", (_f64(v.bias).reshape(kv_heads, head_dim) @ hv).reshape(-1))
        o = attn.get_submodule(arch.o)
        wo = _f64(o.weight).reshape(o.out_features, heads, head_dim)
        _assign(o, "weight", (wo @ hv).reshape(o.out_features, heads * head_dim))
        _rotate_output(o, q)

        g2 = _f64(norm2.weight)
        for name in arch.mlp_in:
            _rotate_input(mlp.get_submodule(name), q, g2)
        norm2.weight.fill_(1.0)
        down = mlp.get_submodule(arch.mlp_out)
        _rotate_output(down, q)
        _rotate_input(down, self.qm)

    def install(self, model: nn.Module) -> None:
        """Every layer's MLP replaced by a :class:`RotatedMLP` sharing the online rotation."""
        install_online_rotation(model, self.online)

    def report(self) -> RotationReport:
        arch = self.arch
        folded = [f"{arch.layers}.{i}.{n}" for i in range(self.layers) for n in (arch.attn_norm, arch.mlp_norm)]
        return RotationReport(
            method=self.method, seed=self.seed, residual=f"{self.q_kind} {self.facts.hidden}",
            heads=f"{self.hv_kind} {self.facts.head_dim} (v_proj -> o_proj, folded)",
            online=f"{self.qm_kind} {self.inter} before down_proj (one shared matrix)" if self.layers else "none",
            online_rotations=self.layers, untied_lm_head=self.untie, folded_norms=folded + [arch.final_norm],
        )


@torch.no_grad()
def rotate_model(model: nn.Module, method: str = "hadamard", seed: int = 0) -> RotationReport:
    """Rotate a float decoder in place (see the module docstring); returns what was done.

    The same ``method`` and ``seed`` give the same rotated weights. Raises
    :class:`~qexport.errors.UnsupportedOp` for another architecture and
    :class:`~qexport.errors.InvalidConfig` for a model rotated or quantized already.
    """
    plan = RotationPlan(model, method, seed)
    plan.fold_final_norm(model)
    plan.rotate_tables(model)
    for layer in model.get_submodule(plan.arch.layers):
        plan.rotate_layer(layer)
    plan.install(model)
    report = plan.report()
    model.qexport_rotation = report
    return report
