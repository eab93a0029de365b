#!/usr/bin/env python
"""Steer your own behaviour: fit a SADI adapter from a JSONL file of contrastive pairs.

Each line of the file is {"prompt": ..., "positive": ..., "negative": ...}: the answer you want more of and the
one you want less of. The bundled examples/data/tone_pairs.jsonl steers towards a formal tone.

    python examples/steer_from_jsonl.py --pairs examples/data/tone_pairs.jsonl --out outputs/formal-tone
    python examples/steer_from_jsonl.py --tiny     # smoke test on a tiny random model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import add_model_arguments, chat_generate, load
from peft import get_peft_model

import sadi_peft

HERE = Path(__file__).resolve().parent


def read_pairs(path: Path) -> list[dict]:
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}:{number}: not valid JSON ({error})")
            missing = {"prompt", "positive", "negative"} - set(record)
            if missing:
                raise SystemExit(f"{path}:{number}: missing key(s) {sorted(missing)}; need prompt/positive/negative")
            pairs.append(record)
    if not pairs:
        raise SystemExit(f"{path} holds no pairs")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--pairs", type=Path, default=HERE / "data" / "tone_pairs.jsonl", help="JSONL of pairs")
    parser.add_argument("--variant", choices=("head", "neuron", "hidden"), default="head")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--delta", type=float, default=4.0, help="the gain is 1 + delta")
    parser.add_argument("--positions", choices=("last", "all"), default="last")
    parser.add_argument("--prompt", default="A colleague asks: can we move our meeting to Friday? Your reply:")
    parser.add_argument("--out", type=Path, default=Path("outputs/steer-from-jsonl"))
    args = parser.parse_args()

    pairs = read_pairs(args.pairs)
    model, tokenizer = load(args)
    config = sadi_peft.SADIConfig(variant=args.variant, top_k=args.top_k, delta=args.delta, positions=args.positions)
    model = get_peft_model(model, config)
    result = sadi_peft.calibrate(model, tokenizer, pairs, batch_size=8)
    print(f"{len(pairs)} pairs from {args.pairs}; kept {config.top_k} {config.variant} units:")
    for name, unit, score in result.selected:
        print(f"  {name}[{unit}]  score {score:+.4f}")
    with model.disable_adapter():
        print("base:   ", chat_generate(model, tokenizer, args.prompt))
    print("steered:", chat_generate(model, tokenizer, args.prompt))
    sadi_peft.save_pretrained(model, args.out)
    print(f"adapter saved to {args.out} (load it with `import sadi_peft` + PeftModel.from_pretrained)")


if __name__ == "__main__":
    main()
