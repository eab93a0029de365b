#!/usr/bin/env python
"""Calibrate a positions="all" SADI adapter and export it for serving without ``sadi_peft``.

1. load the demo model (or, with ``--tiny``, build a tiny random Llama for smoke tests; it runs in seconds);
2. calibrate a ``positions="all"`` SADI adapter on a handful of SST-2 train pairs (built-in pairs with ``--tiny``);
3. export it three ways with :mod:`sadi_peft.export`: a plain PEFT IA3 adapter, an exact LoRA, and a merged
   transformers checkpoint;
4. reload each export with stock PEFT / transformers and report the max |Δlogit| against the SADI model;
5. print how to serve the LoRA with vLLM and TGI (and the merged checkpoint with anything).

Run ``python examples/export_for_serving.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import sadi_peft
from sadi_peft.export import export_ia3, export_lora, export_merged, lora_rank, vllm_max_lora_rank
from sadi_peft.zoo import DEFAULT_MODEL

logger = logging.getLogger("export_for_serving")

PROBE = "Review: an absolute delight from start to finish. Sentiment:"
TINY_PAIRS = [
    ("Review: a wonderful, moving film. Sentiment:", "Positive", "Negative"),
    ("Review: dull and far too long. Sentiment:", "Negative", "Positive"),
    ("Review: the cast is superb. Sentiment:", "Positive", "Negative"),
    ("Review: I want my money back. Sentiment:", "Negative", "Positive"),
    ("Review: a joy from start to end. Sentiment:", "Positive", "Negative"),
    ("Review: clumsy writing, flat acting. Sentiment:", "Negative", "Positive"),
]


class CharTokenizer:
    """Character-level stand-in tokenizer for the ``--tiny`` model (what ``calibrate`` needs, nothing more)."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, return_tensors: str | None = None, **kwargs):
        ids = [self.bos_token_id] + [3 + ord(ch) % (self.vocab_size - 3) for ch in text]
        if return_tensors == "pt":
            ids_t = torch.tensor([ids])
            return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
        return {"input_ids": ids}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Calibrate a positions='all' SADI adapter and export it as IA3, exact LoRA and merged model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias, Hugging Face id or local folder")
    parser.add_argument("--tiny", action="store_true",
                        help="use a tiny random Llama and built-in pairs instead (seconds; for CI smoke tests)")
    parser.add_argument("--out", default="outputs/sadi-export", help="folder for the exports (ia3/, lora/, merged/)")
    parser.add_argument("--variant", choices=("head", "neuron", "hidden"), default="head", help="SADI variant")
    parser.add_argument("--top-k", type=int, default=4, help="units kept in the mask")
    parser.add_argument("--delta", type=float, default=2.0, help="steering strength; the gain is 1 + delta")
    parser.add_argument("--n-pairs", type=int, default=32, help="contrastive pairs from the SST-2 train split")
    parser.add_argument("--data-dir", default=None, help="data directory holding sst2/ (default: see sadi_peft.tasks)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing pairs (and the tiny model)")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the exports to compare logits")
    args = parser.parse_args(argv)
    for name in ("top_k", "n_pairs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.delta <= -1:
        parser.error(f"--delta must be > -1 (the gain 1 + delta must stay positive), got {args.delta}")
    return args


def tiny_model_and_tokenizer(folder: Path, seed: int):
    """A tiny random Llama saved to ``folder`` and reloaded from it, so exports record a loadable base path."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    # an absolute path: the exports record it as base_model_name_or_path
    return AutoModelForCausalLM.from_pretrained(str(folder.resolve())).eval(), CharTokenizer(config.vocab_size)


def max_diff(model, reference: torch.Tensor, batch: dict) -> float:
    with torch.no_grad():
        return float((model(**batch).logits - reference).abs().max())


def verify(base_path: str, out: Path, reference: torch.Tensor, batch: dict) -> dict[str, float]:
    """Reload every export with stock PEFT / transformers (no SADI code involved) and compare logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    diffs: dict[str, float] = {}
    for fmt in ("ia3", "lora"):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(out / fmt))
        diffs[f"{fmt} (PeftModel.from_pretrained)"] = max_diff(peft_model.eval(), reference, batch)
    diffs["merged (AutoModelForCausalLM.from_pretrained)"] = max_diff(
        AutoModelForCausalLM.from_pretrained(out / "merged").eval(), reference, batch
    )
    return diffs


def serving_instructions(base_path: str, out: Path, rank: int) -> str:
    lora, merged = (out / "lora").resolve(), (out / "merged").resolve()
    try:
        vllm_rank = str(vllm_max_lora_rank(rank))
    except ValueError as exc:
        vllm_rank = f"(not possible: {exc})"
    return f"""
Serving (the LoRA fits only this exact base checkpoint: {base_path})

  LoRA rank r = {rank}; vLLM's --max-lora-rank must be >= r and is one of 1, 8, 16, 32, 64, 128, 256, 320, 512.

  vLLM:
    vllm serve {base_path} --enable-lora --max-lora-rank {vllm_rank} --lora-modules sadi={lora}
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{{"model": "sadi", "prompt": "{PROBE}", "max_tokens": 5, "temperature": 0}}'

  TGI (text-generation-inference; mount both folders into the container):
    text-generation-launcher --model-id {base_path} --lora-adapters sadi={lora}
    curl localhost:8080/generate -H 'Content-Type: application/json' \\
         -d '{{"inputs": "{PROBE}", "parameters": {{"adapter_id": "sadi", "max_new_tokens": 5}}}}'

  Merged checkpoint (no adapter support needed anywhere):
    vllm serve {merged}
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from peft import get_peft_model

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer(out / "tiny-base", args.seed)
        pairs, save_tokenizer = TINY_PAIRS, None
        print(f"Model: tiny random Llama saved to {out / 'tiny-base'}; {len(pairs)} built-in pairs")
    else:
        from sadi_peft.tasks import load_sst2, select_examples, sst2_pairs
        from sadi_peft.zoo import load_model_and_tokenizer

        pairs = sst2_pairs(select_examples(load_sst2("train", args.data_dir), args.n_pairs, args.seed))
        model, tokenizer = load_model_and_tokenizer(args.model)
        save_tokenizer = tokenizer
        print(f"Model: {model.config._name_or_path}; {len(pairs)} SST-2 train pairs")
    base_path = model.config._name_or_path

    config = sadi_peft.SADIConfig(variant=args.variant, top_k=args.top_k, delta=args.delta, positions="all")
    model = get_peft_model(model, config)
    sadi_peft.calibrate(model, tokenizer, pairs, batch_size=args.batch_size, show_progress=False)

    export_ia3(model, out / "ia3")
    export_lora(model, out / "lora")
    export_merged(model, out / "merged", tokenizer=save_tokenizer)
    rank = lora_rank(out / "lora")
    print(f"Exported to {out}/: ia3/ (IA3 adapter), lora/ (exact LoRA, rank {rank}), merged/ (plain checkpoint)")

    if not args.no_verify:
        batch = dict(tokenizer(PROBE, return_tensors="pt"))
        with torch.no_grad():
            reference = model(**batch).logits
        for name, diff in verify(base_path, out, reference, batch).items():
            print(f"  max |Δlogit| vs the SADI model, {name}: {diff:.2e}")

    print(serving_instructions(base_path, out, rank))
    print(f"Done in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
