"""Run an exported folder in ONNX Runtime: logits with a KV cache, perplexity, greedy generation, and
``verify`` against the PyTorch reference of the same quantized model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from qexport.errors import InvalidConfig, ModelLoadError, UnsupportedOp

__all__ = ["OnnxCausalLM", "verify", "load_export_report", "reference_model"]


def _folder(path: str | os.PathLike) -> Path:
    from qexport.export.onnx import MODEL_FILE

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"export folder {str(p)!r} does not exist: give a folder written by `qexport export`")
    if not p.is_dir():
        raise ModelLoadError(f"{str(p)!r} is a file, not an export folder (a folder with {MODEL_FILE})")
    if not (p / MODEL_FILE).is_file():
        raise ModelLoadError(f"{str(p)!r} has no {MODEL_FILE}: it is not a folder written by `qexport export`")
    return p


def load_export_report(path: str | os.PathLike) -> dict[str, Any]:
    """The folder's export report (an empty dict when the folder has none)."""
    from qexport.export.onnx import REPORT_FILE

    f = _folder(path) / REPORT_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(f)!r} is not valid JSON: {e}") from None


class OnnxCausalLM:
    """An exported folder as a causal LM in ONNX Runtime (CPU).

    ``step(ids, mask, past)`` runs the graph once; calling the object like a Hugging Face model
    (``model(input_ids=ids).logits``) runs it with an empty cache, which is what
    :func:`qexport.eval.perplexity` needs, so perplexity uses the very same protocol as the other back-ends.
    ``generate`` is a greedy loop that feeds back the KV cache.

    Args:
        path: the export folder.
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
        session_config: extra ``SessionOptions`` config entries, over the folder's ``ort_session_config``.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        from qexport.export.onnx import MODEL_FILE

        self.path = _folder(path)
        self.report = load_export_report(self.path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelLoadError("onnxruntime is not installed: pip install 'qexport[onnx]'") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session_config = {**self.report.get("ort_session_config", {}), **(session_config or {})}
        for key, value in self.session_config.items():
            so.add_session_config_entry(key, value)
        self.session_options = so
        try:
            self.session = ort.InferenceSession(str(self.path / MODEL_FILE), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"ONNX Runtime cannot load {str(self.path / MODEL_FILE)!r}: "
                                 f"{str(e).strip().splitlines()[0]}") from None
        names = [i.name for i in self.session.get_inputs()]
        # the GroupQueryAttention form (qexport.lowering.gqa) takes its positions from the mask: no position_ids
        self.attention_form = (self.report.get("attention_form") or {}).get("form", "standard")
        needed = {"input_ids", "attention_mask"} | ({"position_ids"} if self.attention_form != "gqa" else set())
        missing = needed - set(names)
        if missing:
            raise ModelLoadError(f"{str(self.path / MODEL_FILE)!r} lacks the KV-cache inputs {sorted(missing)}: "
                                 "it was not written by `qexport export`")
        # with a quantized KV cache, each past key / value is followed by its scale (and zero point) inputs
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.layers = sum(n.endswith((".key", ".value")) for n in self.past_names) // 2
        inputs = self.session.get_inputs()
        self._past_specs = [(inputs[names.index(n)].shape, _NP_TYPES.get(inputs[names.index(n)].type, np.float32))
                            for n in self.past_names]
        shape = self._past_specs[0][0] if self.past_names else []
        self.kv_heads, self.head_dim = (shape[1], shape[3]) if len(shape) == 4 else (0, 0)
        self.head_dim = self.report.get("kv_cache", {}).get("head_dim", self.head_dim)  # int4 codes: head_dim / 2
        self.kv_cache = (self.report.get("kv_cache") or {}).get("quantized")  # the KVCacheSpec dict, or None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past tensors of the right dtypes (float, or codes / scales / zero points)."""
        return [np.zeros((batch, shape[1], 0, shape[3]), dtype) for shape, dtype in self._past_specs]

    def feed(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]
             ) -> dict[str, np.ndarray]:
        """The session's inputs for one forward pass; positions follow the attention mask."""
        seq = input_ids.shape[1]
        positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -seq:].astype(np.int64)
        if self.attention_form == "gqa" and bool((np.diff(attention_mask, axis=1) > 0).any()):
            raise UnsupportedOp(f"{self.path}: a left-padded attention mask; the GroupQueryAttention form takes "
                                "positions from the mask's length (pad on the right, or export with "
                                "--attention-form standard)")
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 **dict(zip(self.past_names, past))}
        if self.attention_form != "gqa":
            feeds["position_ids"] = positions
        return feeds

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]):
        """One forward pass: ``(logits [B, S, V], present k/v list)``; positions follow the attention mask."""
        outs = self.session.run(None, self.feed(input_ids, attention_mask, past))
        return outs[0], outs[1:]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any):
        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        logits, _ = self.step(ids, mask, self.empty_past(ids.shape[0]))
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def parameters(self):
        """A single empty CPU tensor: where :func:`qexport.eval.perplexity` looks for the model's device."""
        return iter([torch.empty(0)])

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` ``[1, L]`` with the KV cache; returns the new ids ``[n]``.

        ``on_token(token)`` is called once per generated token, right after the forward pass that chose it
        (``qexport bench`` times decoding with it)."""
        if max_new_tokens < 1:
            raise InvalidConfig(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = input_ids.cpu().numpy().reshape(1, -1).astype(np.int64)
        mask = np.ones_like(ids)
        forward = (self._shared_buffer_steps(ids.shape[1] + max_new_tokens) if self.attention_form == "gqa"
                   else self._growing_cache_steps())
        new = []
        for _ in range(max_new_tokens):
            logits = forward(ids, mask)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if on_token is not None:
                on_token(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            ids = np.array([[token]], np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        return torch.tensor(new, dtype=torch.long)

    def _growing_cache_steps(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """A forward function over a cache that each step returns one token longer (``present = past + new``)."""
        past = self.empty_past(1)

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            nonlocal past
            logits, past = self.step(ids, mask, past)
            return logits

        return forward

    def _shared_buffer_steps(self, length: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """A forward function over one pre-allocated ``[1, kv_heads, length, head_dim]`` buffer per key / value,
        bound (I/O binding) as both past and present: GroupQueryAttention writes the new tokens in place, and
        nothing is copied or allocated for the cache between steps."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_output(self.output_names[0])  # the logits first: get_outputs() keeps the binding order
        presents = [o for o in self.output_names if o.startswith("present.")]
        for past_name, present, (shape, dtype) in zip(self.past_names, presents, self._past_specs):
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, shape[1], length, shape[3]), dtype))
            binding.bind_ortvalue_input(past_name, buffer)
            binding.bind_ortvalue_output(present, buffer)

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            binding.bind_output(self.output_names[0])  # unallocated: the prompt's logits are longer than a step's
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            self.session.run_with_iobinding(binding)
            return binding.get_outputs()[0].numpy()

        return forward


_NP_TYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
             "tensor(float16)": np.float16}


def reference_cache(report: dict[str, Any]):
    """The PyTorch cache matching an export: a ``QuantizedKVCache`` when its KV cache is quantized."""
    from transformers import DynamicCache

    spec = (report.get("kv_cache") or {}).get("quantized")
    if spec is None:
        return DynamicCache()
    from qexport.kvcache import QuantizedKVCache

    return QuantizedKVCache(spec)


def reference_model(report: dict[str, Any], path: Path, calibration=None):
    """The PyTorch reference of an export: the saved quantized folder it was exported from, loaded as it is;
    for an export made from a recipe, its source model quantized again with the folder's recipe and
    ``calibration`` (:func:`qexport.prepare.quantize_model`); the float model for a float export."""
    from qexport.checkpoint import is_quantized_folder
    from qexport.config import Recipe
    from qexport.export.onnx import RECIPE_FILE
    from qexport.models import load_model
    from qexport.prepare import quantize_model

    source = report.get("source_model")
    if not source:
        raise InvalidConfig(f"{str(path)!r} was exported from an in-memory model: pass reference=<the quantized "
                            "torch model> to verify()")
    model, tok = load_model(source)
    if is_quantized_folder(source) or not (path / RECIPE_FILE).is_file():  # saved quantized, or a float export
        return model
    recipe = Recipe.from_json(path / RECIPE_FILE)
    if calibration is None and recipe.needs_data:
        calibration = _recorded_calibration(report, path)
    return quantize_model(model, recipe, tok, calibration)


def _recorded_calibration(report: dict[str, Any], path: Path):
    """The calibration windows an export's report records; the default set when it records none (exports from
    before it was recorded, whose windows had no BOS)."""
    from qexport.errors import CalibrationError
    from qexport.prepare import CalibrationSet

    if not report.get("calibration"):
        return CalibrationSet(bos=False)
    try:
        return CalibrationSet.from_provenance(report["calibration"])
    except CalibrationError as e:
        raise CalibrationError(f"{str(path)!r}: {e}, or export from a saved folder (`qexport quantize`)") from None


@torch.no_grad()
def verify(path: str | os.PathLike, reference=None, input_ids: torch.Tensor | None = None, decode_steps: int = 8,
           threads: int | None = None, calibration=None, session_config: dict[str, str] | None = None
           ) -> dict[str, Any]:
    """Compare an exported folder in ONNX Runtime with the PyTorch reference of the same quantized model.

    Runs a prefill of ``input_ids`` ``[B, L]`` (default: 2 x 32 tokens of the bundled Emma text, or random ids
    when the folder has no tokenizer) and then ``decode_steps`` single-token steps through the KV cache
    (teacher-forced with the same next tokens in both), and reports over all those logits: ``max_abs``,
    ``max_rel`` (max abs error / max |reference logit|) and ``top1_agreement`` (fraction of positions whose
    argmax token agrees), and ``bos`` (whether the default rows start with the tokenizer's BOS token, as
    they do when it adds one by default). ``reference``: the quantized torch model (default: the folder's source model,
    quantized again with its recipe).
    """
    lm = OnnxCausalLM(path, threads=threads, session_config=session_config)
    if reference is None:
        reference = reference_model(lm.report, lm.path, calibration)
    reference.eval()
    total = 32 + decode_steps
    bos = None  # ids given by the caller
    if input_ids is None:
        input_ids, bos = _sample_ids(lm.path, reference.config.vocab_size, total)
    if input_ids.shape[1] <= decode_steps:
        raise InvalidConfig(f"input_ids need more than decode_steps={decode_steps} tokens")
    prefill = input_ids.shape[1] - decode_steps
    ids = input_ids[:, :prefill]
    cache = reference_cache(lm.report)
    ref_steps = [reference(input_ids=ids, cache=cache, use_cache=True).logits]
    mask = np.ones(ids.shape, np.int64)
    logits, past = lm.step(ids.numpy(), mask, lm.empty_past(ids.shape[0]))
    ort_steps = [logits]
    for t in range(prefill, input_ids.shape[1]):
        tok = input_ids[:, t:t + 1]
        ref_steps.append(reference(input_ids=tok, cache=cache, use_cache=True).logits)
        mask = np.concatenate([mask, np.ones((tok.shape[0], 1), np.int64)], axis=1)
        logits, past = lm.step(tok.numpy(), mask, past)
        ort_steps.append(logits)
    ref = torch.cat(ref_steps, dim=1).float()
    got = torch.from_numpy(np.concatenate(ort_steps, axis=1))
    err = (got - ref).abs()
    return {
        "path": str(lm.path),
        "recipe": lm.report.get("recipe"),
        "positions": int(ref.shape[0] * ref.shape[1]),
        "prefill_tokens": prefill,
        "decode_steps": decode_steps,
        "max_abs": float(err.max()),
        "max_rel": float(err.max() / ref.abs().max().clamp_min(1e-30)),
        "mean_abs": float(err.mean()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "ort_session_config": lm.session_config,
        "kv_cache": lm.kv_cache,
        "bos": bos,
    }


def _sample_ids(path: Path, vocab: int, total: int) -> tuple[torch.Tensor, bool]:
    """Two rows of ``total`` token ids: from the bundled Emma text with the folder's tokenizer (each row behind
    its BOS token when it adds one by default), else random; and whether the rows start with BOS."""
    from qexport.eval import adds_bos, tokenize, with_bos
    from qexport.models import bundled_text, read_text

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer saved in the folder
        tok = None
    if tok is not None:
        bos = adds_bos(tok)
        ids = tokenize(tok, read_text(bundled_text("emma"))[:20000])
        n = total - int(bos)
        if ids.numel() >= 2 * n:
            rows = ids[: 2 * n].reshape(2, n)
            return with_bos(rows, tok.bos_token_id if bos else None), bos
    return torch.randint(0, vocab, (2, total), generator=torch.Generator().manual_seed(0)), False
