#!/usr/bin/env python
"""Naive vs prefix-cached K x delta search (positions="last"), side by side in one process: SST-2 validation scored
by restricted-choice log-likelihood (default; ``--task truthfulqa_mc1`` / ``truthfulqa_mc2`` for multi-token answer
options after a long few-shot prompt), or TriviaQA validation scored by greedy-generation exact match
(``--task triviaqa``: every point decodes up to ``--max-new-tokens`` tokens per question).

Both searches score the same examples at the same grid points; the script checks that the accuracies (and, for
TriviaQA, the generated answers) are identical, then reports the wall times, their ratio, the machine's core count
and torch's thread count, as a table and JSON.

    python benchmarks/search_cache.py                       # 30 grid points, 200 SST-2 validation sentences
    python benchmarks/search_cache.py --task triviaqa --n-eval 64 --k-grid 2,6 --delta-grid 4,14,34
    python benchmarks/search_cache.py --positions all --variant hidden --k-grid 1,4,16 --delta-grid 0.5,2,4,9
    python benchmarks/search_cache.py --task truthfulqa_mc1 --positions all --k-grid 1,4,10 --delta-grid 0.5,9
    python benchmarks/search_cache.py --n-eval 8 --tiny     # smoke size (CI)

With ``--positions all`` there is no prompt cache to share (every token is steered): "naive" then runs every point
through all decoder layers, "cached" runs each point only from its lowest steered layer up, on the states one full
pass per batch recorded there (``grid_search(skip_layers=True)``, :mod:`sadi_peft.harness.layer_replay`), and a
third search, "shared", runs each prompt once per point for all its options (``grid_search(share_prefix=True)``,
the default; it differs from the others only where some option is longer than one token, as on TruthfulQA).
    python benchmarks/search_cache.py --device cuda --dtype bfloat16   # on a GPU (-> search_cache_cuda_bfloat16.json)

On a GPU the clocks are read after ``torch.cuda.synchronize()``; the ratio is then one of wall times (the CPU time
is in the JSON too, but measures only the host's part).
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
from sadi_peft.harness.generation import encode_generation_item, generation_grid_search  # noqa: E402
from sadi_peft.harness.search import encode_choice_item, grid_search  # noqa: E402
from sadi_peft.tasks import (  # noqa: E402
    SST2_LABEL_WORDS,
    get_task,
    load_sst2,
    select_examples,
    sst2_pairs,
    sst2_prompt,
)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device_options=True)
    parser.add_argument("--task", choices=("sst2", "truthfulqa_mc1", "truthfulqa_mc2", "triviaqa"), default="sst2",
                        help="sst2 (default), truthfulqa_mc1/mc2: choice log-likelihood; triviaqa: greedy "
                             "generation + exact match")
    parser.add_argument("--k-grid", default="1,2,4,6,8,10", help="comma-separated K values (default: the paper's)")
    parser.add_argument("--delta-grid", default="4,9,14,24,34", help="comma-separated delta values")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="triviaqa: greedy tokens per answer")
    parser.add_argument("--variant", choices=("head", "neuron", "hidden"), default="head", help="SADI variant")
    parser.add_argument("--positions", choices=("last", "all"), default="last",
                        help="last: naive vs prefix-cached search; all: full passes vs skipped unsteered layers vs "
                        "each prompt shared by its options (choice tasks only)")
    parser.add_argument("--n-pairs", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions of each search (order alternates)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_out_argument(parser, "search_cache.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = resolve_out(args)

    model, tokenizer = load(args)
    device = model.device
    if args.positions == "all" and args.task == "triviaqa":
        parser.error("--positions all: only with a choice task (generation cannot replay recorded layer states)")
    model = get_peft_model(model, sadi_peft.SADIConfig(variant=args.variant, top_k=1, delta=9.0,
                                                       positions=args.positions))
    if args.task == "sst2":
        pairs = sst2_pairs(select_examples(load_sst2("train"), args.n_pairs, 0))
        examples = select_examples(load_sst2("validation"), args.n_eval, 1)
        items = [encode_choice_item(tokenizer, sst2_prompt(e["text"]), SST2_LABEL_WORDS, e["label"]) for e in examples]
        search = grid_search
    elif args.task.startswith("truthfulqa"):
        task = get_task(args.task)
        pairs = task.pairs(select_examples(task.load("pairs"), args.n_pairs, 0), seed=0)
        examples = select_examples(task.load("validation"), args.n_eval, 1, balanced=False)
        items = [encode_choice_item(tokenizer, e.prompt, e.choices, e.label) for e in examples]
        search = grid_search
    else:
        task = get_task("triviaqa")
        pairs = task.pairs(select_examples(task.load("pairs"), args.n_pairs, 0), seed=0)
        examples = select_examples(task.load("validation"), args.n_eval, 1, balanced=False)
        items = [encode_generation_item(tokenizer, e.prompt, e.answers, max_new_tokens=args.max_new_tokens)
                 for e in examples]
        search = generation_grid_search
    sadi_peft.calibrate(model, tokenizer, pairs, show_progress=False)
    units = sum(model.peft_config["default"].unit_counts.values())
    grid = [(int(k), float(d)) for k in args.k_grid.split(",") for d in args.delta_grid.split(",")]
    grid = [(k, d) for k, d in grid if k <= units]  # the tiny model has fewer heads than the paper's K grid

    choice = args.task != "triviaqa"
    if args.positions == "last":
        options = {"naive": {"cached": False}, "cached": {"cached": True}}
    else:  # full passes; skipping each point's unsteered layers; each prompt run once for all its options
        options = {"naive": {"cached": False, "skip_layers": False}, "cached": {"cached": False, "skip_layers": True},
                   "shared": {"cached": False, "share_prefix": True}}
    if choice:  # the first two run prompt + option in full for every option
        options["naive"]["share_prefix"] = options["cached"]["share_prefix"] = False
    times = {mode: [] for mode in options}
    cpu = {mode: [] for mode in options}
    results = {}
    for rep in range(args.repeats):
        order = list(options) if rep % 2 == 0 else list(reversed(options))
        for mode in order:
            wall_s, cpu_s, results[mode] = timed(
                lambda mode=mode: search(model, tokenizer, items, grid, batch_size=args.batch_size,
                                         show_progress=False, **options[mode]),
                device,
            )
            times[mode].append(wall_s)
            cpu[mode].append(cpu_s)
    same = all([a["accuracy"] for a in results["naive"]] == [a["accuracy"] for a in results[mode]] for mode in options)
    if choice:
        finite = [a["scores"].isfinite() for a in results["naive"]]  # -inf pads items with fewer options
        max_diff = max(float((a["scores"][f] - b["scores"][f]).abs().max())
                       for mode in options for a, b, f in zip(results["naive"], results[mode], finite))
    else:  # generated answers: the number of (point, question) cells whose answers differ
        max_diff = sum(x != y for a, b in zip(results["naive"], results["cached"])
                       for x, y in zip(a["predictions"], b["predictions"]))
    naive, cached = statistics.median(times["naive"]), statistics.median(times["cached"])
    machine = machine_info(device, args.dtype)
    report = {
        "model": "tiny-random" if args.tiny else args.model, "device": str(device), "dtype": args.dtype,
        "gpu_name": machine.get("gpu_name"), "headline_clock": "wall",
        "task": args.task, "protocol": "choice" if choice else "generate", "variant": args.variant,
        "positions": args.positions,
        "cached_means": "prefix KV cache" if args.positions == "last" else "unsteered layers skipped",
        **({"shared_means": "each prompt run once per point for all its options",
            "shared_s": times["shared"], "shared_median_s": statistics.median(times["shared"]),
            "shared_ratio": naive / statistics.median(times["shared"]), "shared_cpu_s": cpu["shared"],
            "shared_cpu_ratio": statistics.median(cpu["naive"]) / statistics.median(cpu["shared"])}
           if "shared" in options else {}),
        "max_new_tokens": args.max_new_tokens if args.task == "triviaqa" else None,
        "grid_points": len(grid), "examples": len(items),
        "batch_size": args.batch_size, "repeats": args.repeats, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "naive_s": times["naive"], "cached_s": times["cached"],
        "naive_median_s": naive, "cached_median_s": cached, "ratio": naive / cached,
        "naive_cpu_s": cpu["naive"], "cached_cpu_s": cpu["cached"],
        "cpu_ratio": statistics.median(cpu["naive"]) / statistics.median(cpu["cached"]),
        "load_average": os.getloadavg(),
        "identical_accuracies": same,
        ("max_score_diff" if choice else "differing_answers"): max_diff,
        "accuracies": [{"top_k": r["top_k"], "delta": r["delta"], "accuracy": r["accuracy"]} for r in results["cached"]],
        "machine": machine,
    }
    write_json(args.out, report)
    where = machine.get("gpu_name") or f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print("| search | median wall s | grid points x examples |\n|---|---|---|")
    for mode in options:
        print(f"| {mode} | {statistics.median(times[mode]):.2f} | {len(grid)} x {len(items)} |")
    if "shared" in options:
        print(f"ratio naive / shared: {report['shared_ratio']:.1f}x wall, {report['shared_cpu_ratio']:.1f}x CPU")
    difference = f"max |score diff| {max_diff:.2e}" if choice else f"differing answers {max_diff}"
    print(f"ratio naive / cached: {naive / cached:.1f}x wall, {report['cpu_ratio']:.1f}x CPU; identical accuracies: "
          f"{same}; {difference}; "
          f"{device}, {args.dtype}, {where} -> {args.out}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
