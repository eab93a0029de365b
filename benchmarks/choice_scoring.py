#!/usr/bin/env python
"""Scoring a task split, full passes vs one prompt-prefix KV cache per item, side by side in one process.

``evaluate_items(prefix_cached=False)`` runs prompt + option in full for every option; with ``prefix_cached=True``
each prompt minus its last token runs once and its KV cache serves all the item's options (what
``scripts/reproduce.py`` uses for the test split of every ``positions="last"`` / ``"from_last"`` method). The gain
grows with the prompt length and the number of options: TruthfulQA (a six-shot primer, 4-13 options) is the case it
was built for. Both scorings run on the same examples, unsteered or with a SADI adapter (``--steer``), in alternating
order; the script checks that they pick the same options and reports the largest score difference, the median wall
and CPU times and their ratios, as a table and JSON.

    python benchmarks/choice_scoring.py --threads 1                                # TruthfulQA MC1, 100 test items
    python benchmarks/choice_scoring.py --threads 1 --task mmlu --n-eval 200       # single-token options
    python benchmarks/choice_scoring.py --tiny --task copa --n-eval 4 --repeats 1  # smoke size (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_out_argument, examples_on_path, machine_info, resolve_out, timed, write_json  # noqa: E402

examples_on_path()
from _common import add_model_arguments, load  # noqa: E402
from peft import get_peft_model  # noqa: E402

import sadi_peft  # noqa: E402
from sadi_peft.harness.baselines import evaluate_items  # noqa: E402
from sadi_peft.tasks import get_task, select_examples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device_options=True)
    parser.add_argument("--task", default="truthfulqa_mc1", help="a choice task of sadi_peft.tasks (default: "
                        "truthfulqa_mc1)")
    parser.add_argument("--split", default="test", help="the split to score (default: test)")
    parser.add_argument("--n-eval", type=int, default=100, help="seeded subsample of the split (seed 0)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="full passes: (prompt, option) rows per forward; prefix-cached: items per forward")
    parser.add_argument("--cached-batch-size", type=int, default=None,
                        help="items per forward of the prefix-cached scoring (default: --batch-size)")
    parser.add_argument("--steer", action="store_true",
                        help="score under a SADI head adapter (positions='last', K=4, delta=9, calibrated on 64 "
                        "pairs) instead of the unsteered model")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (the order alternates)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_out_argument(parser, "choice_scoring.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = resolve_out(args)

    task = get_task(args.task)
    if task.default_protocol != "choice":
        parser.error(f"--task {args.task}: a generation task; this benchmark scores choice tasks only")
    model, tokenizer = load(args)
    device = model.device
    split = task.load(args.split)
    examples = select_examples(split, min(args.n_eval, len(split)), 0, balanced=False)
    if args.steer:
        model = get_peft_model(model, sadi_peft.SADIConfig(variant="head", top_k=4, delta=9.0, positions="last"))
        pairs = task.pairs(select_examples(task.load("pairs"), 64, 0), seed=0)
        sadi_peft.calibrate(model, tokenizer, pairs, show_progress=False)
    modes = {
        "full": {"batch_size": args.batch_size},
        "prefix_cached": {"batch_size": args.cached_batch_size or args.batch_size, "prefix_cached": True},
    }
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    results = {}
    for rep in range(args.repeats):
        for mode in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
            wall_s, cpu_s, results[mode] = timed(
                lambda mode=mode: evaluate_items(model, tokenizer, examples, **modes[mode]), device)
            wall[mode].append(wall_s)
            cpu[mode].append(cpu_s)
    full, cached = results["full"]["scores"], results["prefix_cached"]["scores"]
    finite = torch.isfinite(full)
    max_diff = float((full[finite] - cached[finite]).abs().max())
    same_choices = bool(torch.equal(full.argmax(-1), cached.argmax(-1)))
    median = {m: statistics.median(wall[m]) for m in modes}
    cpu_median = {m: statistics.median(cpu[m]) for m in modes}
    options = [len(e.choices) for e in examples]
    machine = machine_info(device, args.dtype)
    report = {
        "model": "tiny-random" if args.tiny else args.model, "device": str(device), "dtype": args.dtype,
        "task": args.task, "split": args.split, "examples": len(examples), "steered": args.steer,
        "options_per_item_mean": sum(options) / len(options), "batch_size": args.batch_size,
        "cached_batch_size": modes["prefix_cached"]["batch_size"], "repeats": args.repeats,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "wall_s": wall, "cpu_s": cpu, "wall_median_s": median, "cpu_median_s": cpu_median,
        "wall_ratio": median["full"] / median["prefix_cached"],
        "cpu_ratio": cpu_median["full"] / cpu_median["prefix_cached"],
        "accuracy": {m: results[m]["accuracy"] for m in modes},
        "same_choices": same_choices, "max_score_diff": max_diff, "machine": machine,
    }
    write_json(args.out, report)
    print("| scoring | median wall s | median CPU s | items x mean options |\n|---|---|---|---|")
    for m in modes:
        print(f"| {m} | {median[m]:.2f} | {cpu_median[m]:.2f} | {len(examples)} x {report['options_per_item_mean']:.1f} |")
    print(f"ratio full / prefix-cached: {report['wall_ratio']:.1f}x wall, {report['cpu_ratio']:.1f}x CPU; same "
          f"choices: {same_choices}; max |score diff| {max_diff:.2e}; accuracy {report['accuracy']['full']:.4f}; "
          f"{args.task} {args.split}, {device}, {args.dtype}, {torch.get_num_threads()} torch threads -> {args.out}")
    if not same_choices:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
