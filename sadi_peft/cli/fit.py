"""``sadi-peft fit``: contrastive pairs (a task's pair split or a JSONL file) -> a calibrated SADI adapter folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import EXIT_OK
from ._common import add_model_arguments, add_steering_arguments, load_model, task_pairs, write_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit", help="calibrate a SADI adapter from contrastive pairs and save it",
        description="Calibrate a SADI adapter from contrastive pairs and save it (adapter_config.json + "
        "adapter_model.safetensors + fit.json). Pairs come from a task's pair split (--task) or from a JSONL file "
        "of {\"prompt\", \"positive\", \"negative\"} lines (--pairs).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="task name (see sadi_peft.tasks.task_names()), e.g. sst2, copa")
    source.add_argument("--pairs", type=Path, help="JSONL file of prompt/positive/negative pairs")
    add_model_arguments(parser)
    add_steering_arguments(parser)
    parser.add_argument("--top-k", type=int, default=4, help="units kept in the mask")
    parser.add_argument("--delta", type=float, default=9.0, help="steering strength; the gain is 1 + delta")
    parser.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    parser.set_defaults(func=run)


def read_pairs(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path}: no such file")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        missing = {"prompt", "positive", "negative"} - set(record)
        if missing:
            raise ValueError(f"{path}:{number}: missing key(s) {sorted(missing)}; each line needs prompt/positive/negative")
        pairs.append(record)
    return pairs


def run(args: argparse.Namespace) -> int:
    import peft

    import sadi_peft
    from sadi_peft.tasks import get_task

    config = sadi_peft.SADIConfig(variant=args.variant, top_k=args.top_k, delta=args.delta, positions=args.positions)
    pairs = read_pairs(args.pairs) if args.pairs else task_pairs(get_task(args.task), args)
    model, tokenizer = load_model(args)
    model = peft.get_peft_model(model, config)
    start = time.perf_counter()
    result = sadi_peft.calibrate(model, tokenizer, pairs, batch_size=args.batch_size, show_progress=not args.no_progress)
    seconds = time.perf_counter() - start
    sadi_peft.save_pretrained(model, args.out)
    write_json(args.out / "fit.json", {
        "source": {"task": args.task} if args.task else {"pairs": str(args.pairs)},
        "model": args.model, "num_pairs": result.num_pairs, "seed": args.seed, "calibration_seconds": seconds,
        "selected": [{"module": m, "unit": u, "score": s} for m, u, s in result.selected],
    })
    print(f"calibrated on {result.num_pairs} pairs in {seconds:.1f} s; adapter saved to {args.out}")
    return EXIT_OK
