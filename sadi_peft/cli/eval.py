"""``sadi-peft eval``: an adapter (or no intervention) on a task split -> a result JSON."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import EXIT_OK
from ._common import add_model_arguments, load_model, write_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate an adapter or the unsteered model on a task split",
        description="Evaluate a saved SADI adapter (--adapter) or the unsteered model (no --adapter) on a task "
        "split and write a JSON with accuracy, n, protocol, seed, wall time and each example's metric value "
        "(`sadi-peft report --paired` compares two such files example by example).",
    )
    parser.add_argument("--task", required=True, help="task name, e.g. sst2, copa, boolq, mmlu, jsonl:<path>")
    parser.add_argument("--split", default="validation", choices=("validation", "test"), help="split to score")
    parser.add_argument("--adapter", type=Path, default=None, help="saved SADI adapter folder (default: none)")
    parser.add_argument("--protocol", default=None, choices=("choice", "argmax", "generate"),
                        help="scoring protocol (default: the task's)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples of the split")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peft import PeftModel

    import sadi_peft  # noqa: F401  (registers the SADI type before loading an adapter)
    from sadi_peft.tasks import evaluate, examples_digest, get_task

    task = get_task(args.task)
    examples = task.load(args.split, args.data_dir)
    if args.limit is not None:
        examples = examples[: args.limit]
    model, tokenizer = load_model(args)
    method = "none"
    if args.adapter is not None:
        model = PeftModel.from_pretrained(model, str(args.adapter)).eval()
        config = model.peft_config["default"]
        method = f"sadi-{config.variant}-{config.positions}"
    start = time.perf_counter()
    result = evaluate(model, tokenizer, task, examples, args.protocol, args.batch_size, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    payload = {
        "task": task.name, "split": args.split, "method": method, "model": args.model,
        "adapter": str(args.adapter) if args.adapter else None, "accuracy": result["accuracy"], "n": result["n"],
        "protocol": result["protocol"], "metric": result.get("metric"), "seed": args.seed, "wall_seconds": seconds,
        # for `sadi-peft report --paired`: each example's metric value, and which examples (in order) they are
        "per_example": result["per_example"], "examples_digest": examples_digest(examples),
    }
    write_json(args.out, payload)
    print(f"{task.name} {args.split} ({method}, {payload['protocol']}): accuracy {payload['accuracy']:.4f} "
          f"on n={payload['n']} in {seconds:.1f} s -> {args.out}")
    return EXIT_OK
