#!/usr/bin/env python
"""Quickstart: wrap a model with a SADI adapter, calibrate it on a few contrastive pairs, generate, save, reload.

    python examples/quickstart.py            # SmolLM2-135M-Instruct (the demo model), about a minute on CPU
    python examples/quickstart.py --tiny     # a tiny random model, seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _common import add_model_arguments, chat_generate, load
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import sadi_peft

# (prompt, the answer we want more of, the answer we want less of)
PAIRS = [
    ("How was the concert last night? Answer in one word:", "Wonderful", "Awful"),
    ("Describe the new phone in one word:", "Excellent", "Terrible"),
    ("How do you feel about Mondays? One word:", "Great", "Miserable"),
    ("Rate the food at the new restaurant in one word:", "Delicious", "Disgusting"),
    ("What did you think of the book? One word:", "Brilliant", "Boring"),
    ("How is the weather today? One word:", "Lovely", "Dreadful"),
    ("How was your holiday? One word:", "Fantastic", "Horrible"),
    ("What is your opinion of the movie? One word:", "Superb", "Dull"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--out", default=None, help="adapter folder (default: a temporary folder)")
    args = parser.parse_args()

    model, tokenizer = load(args)
    config = sadi_peft.SADIConfig(variant="head", top_k=4, delta=9.0, positions="last")
    model = get_peft_model(model, config)                               # wraps the attention output projections
    result = sadi_peft.calibrate(model, tokenizer, PAIRS, batch_size=8)  # fills the mask from the pairs
    print("steered heads:", [(name.split(".")[2], unit, round(score, 4)) for name, unit, score in result.selected])

    question = "How was your day? Answer in one sentence."
    with model.disable_adapter():
        print("base:   ", chat_generate(model, tokenizer, question))
    print("steered:", chat_generate(model, tokenizer, question))

    out = args.out or tempfile.mkdtemp(prefix="sadi-quickstart-")
    sadi_peft.save_pretrained(model, out)                               # adapter_config.json + safetensors
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()        # base from base_model_name_or_path
    batch = tokenizer(question, return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, reloaded(**batch).logits)
    print(f"saved to {out}; reloaded with AutoModelForCausalLM.from_pretrained: identical logits = {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
