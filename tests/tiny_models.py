"""Tiny randomly initialised models and a character tokenizer for unit tests (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


class CharTokenizer:
    """Deterministic character-level tokenizer with the bits of the HF tokenizer API the library uses."""

    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int = 64, pad_token_id: int | None = 0) -> None:
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        bos = [self.bos_token_id] if add_special_tokens else []
        return bos + [3 + (ord(c) % (self.vocab_size - 3)) for c in text]

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs):
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """One character per id: the first printable ASCII character that encodes to it ("\\n" for the newline id);
        pad/BOS/EOS as ``<pad>``/``<s>``/``</s>`` unless skipped."""
        special = {0: "<pad>", self.bos_token_id: "<s>", self.eos_token_id: "</s>"}
        table: dict[int, str] = {}
        for code in range(32, 127):
            table.setdefault(3 + code % (self.vocab_size - 3), chr(code))
        table[3 + ord("\n") % (self.vocab_size - 3)] = "\n"
        out = []
        for i in (int(x) for x in ids):
            if i in special:
                out.append("" if skip_special_tokens else special[i])
            else:
                out.append(table.get(i, "?"))
        return "".join(out)


def tiny_llama_config(**overrides) -> LlamaConfig:
    params = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_llama(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**overrides), attn_implementation=attn_implementation)
    return model.eval()


PAIRS = [
    ("Review: a wonderful, moving film. Sentiment:", "Positive", "Negative"),
    ("Review: dull and far too long. Sentiment:", "Negative", "Positive"),
    ("Review: the cast is superb. Sentiment:", "Positive", "Negative"),
    ("Review: I want my money back. Sentiment:", "Negative", "Positive"),
    ("Review: a joy from start to end. Sentiment:", "Positive", "Negative"),
    ("Review: clumsy writing, flat acting. Sentiment:", "Negative", "Positive"),
    ("Review: smart and funny. Sentiment:", "Positive", "Negative"),
    ("Review: a waste of a good premise. Sentiment:", "Negative", "Positive"),
]
