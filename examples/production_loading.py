#!/usr/bin/env python
"""Production loading: one base model, several SADI adapters, switched per request with transformers' own API.

    model = AutoModelForCausalLM.from_pretrained(base)          # the base, loaded once
    model.load_adapter(path_a, adapter_name="positive")         # SADI adapters, loaded once each
    model.load_adapter(path_b, adapter_name="formal")
    model.set_adapter("formal"); model.generate(...)            # per request
    model.disable_adapters(); ...; model.enable_adapters()      # the unsteered base

`import sadi_peft` must run before load_adapter: it registers the SADI adapter type with PEFT.

    python examples/production_loading.py --adapter positive=outputs/a --adapter formal=outputs/b
    python examples/production_loading.py            # builds two small adapters first (demo model)
    python examples/production_loading.py --tiny     # smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import add_model_arguments, chat_generate, load
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import sadi_peft  # noqa: F401  (registers the "SADI" PEFT type)

HERE = Path(__file__).resolve().parent
SENTIMENT_PAIRS = [
    ("How was the concert? One word:", "Wonderful", "Awful"),
    ("Describe the new phone in one word:", "Excellent", "Terrible"),
    ("How was your holiday? One word:", "Fantastic", "Horrible"),
    ("What did you think of the book? One word:", "Brilliant", "Boring"),
]


def build_adapters(args) -> dict[str, str]:
    """Two quick adapters (a sentiment one and a formal-tone one) when none are given."""
    tone = [json.loads(line) for line in open(HERE / "data" / "tone_pairs.jsonl", encoding="utf-8") if line.strip()]
    folders = {}
    for name, pairs, config in (
        ("positive", SENTIMENT_PAIRS, sadi_peft.SADIConfig(variant="head", top_k=4, delta=9.0)),
        ("formal", tone, sadi_peft.SADIConfig(variant="head", top_k=4, delta=4.0)),
    ):
        model, tokenizer = load(args)
        model = get_peft_model(model, config)
        sadi_peft.calibrate(model, tokenizer, pairs, batch_size=8, show_progress=False)
        folders[name] = tempfile.mkdtemp(prefix=f"sadi-{name}-")
        sadi_peft.save_pretrained(model, folders[name])
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="a saved SADI adapter")
    args = parser.parse_args()
    adapters = dict(item.split("=", 1) for item in args.adapter) if args.adapter else build_adapters(args)

    config = json.loads((Path(next(iter(adapters.values()))) / "adapter_config.json").read_text())
    base_path = config["base_model_name_or_path"]
    _, tokenizer = load(args) if args.tiny else (None, None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path).eval()  # loaded once
    for name, path in adapters.items():
        model.load_adapter(path, adapter_name=name)                  # each adapter loaded once

    requests = [("positive", "How was your day? One sentence."), ("formal", "Tell me you will be late."),
                (None, "How was your day? One sentence.")]
    outputs = {}
    for adapter, text in requests:
        if adapter is None:
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(adapter)
        outputs[adapter] = chat_generate(model, tokenizer, text)
        print(f"[{adapter or 'base'}] {text!r} -> {outputs[adapter]!r}")

    # switching is exact: the base path through disable_adapters equals a model that never saw an adapter
    plain = AutoModelForCausalLM.from_pretrained(base_path).eval()
    batch = tokenizer("How was your day?", return_tensors="pt")
    with torch.no_grad():
        model.disable_adapters()
        exact = torch.equal(model(**batch).logits, plain(**batch).logits)
    print(f"disable_adapters() gives the base model's logits exactly: {exact}")
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
