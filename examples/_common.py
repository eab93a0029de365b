"""Shared bits of the example scripts: the model to run on (the demo model, any id/path, or a tiny random one)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from sadi_peft.zoo import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias, Hugging Face id or local folder")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use a tiny randomly initialised Llama with the demo model's tokenizer (seconds; for smoke tests)",
    )


def load(args: argparse.Namespace):
    """(model, tokenizer): ``--tiny`` builds a 2-layer random Llama saved to a temp folder, so that adapters record a
    base path that loads again like a real checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sadi_peft.zoo import load_model_and_tokenizer

    if not args.tiny:
        return load_model_and_tokenizer(args.model)
    tokenizer = _tokenizer(args.model)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    folder = Path(tempfile.mkdtemp(prefix="sadi-tiny-base-"))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer


def _tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    from sadi_peft.zoo import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_generate(model, tokenizer, text: str, max_new_tokens: int = 30) -> str:
    """Greedy generation of a reply to one user message; returns the new text only."""
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
