"""Tiny models and tokenizers built in-process for fast tests (no downloads)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

EMMA = Path(__file__).resolve().parent.parent / "qexport" / "data" / "austen" / "emma.txt"


def tiny_llama(seed: int = 0, tie: bool = False, vocab: int = 512, attn_implementation: str = "sdpa", **sizes):
    """A random Llama of 2 blocks, hidden size 64; ``sizes`` override config fields (``hidden_size=256`` ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **sizes,
    })
    cfg._attn_implementation = attn_implementation
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def word_tokenizer(vocab: int = 512, text_path: Path = EMMA):
    """A word-level fast tokenizer over the most common words of ``text_path`` (unknown words -> [UNK])."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(re.findall(r"\w+|[^\w\s]", text_path.read_text()))
    specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    vocab_map = {t: i for i, t in enumerate(specials)}
    for w, _ in words.most_common(vocab - len(specials)):
        vocab_map[w] = len(vocab_map)
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]")


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on a page of Emma (llama.cpp's 'gpt2' tokenizer model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([EMMA.read_text(encoding="utf-8")[:20000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_checkpoint(path: Path) -> Path:
    model = tiny_llama()
    tok = word_tokenizer()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
