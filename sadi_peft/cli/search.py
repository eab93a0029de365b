"""``sadi-peft search``: calibrate once, score a K x delta grid on the VALIDATION split, keep the best adapter."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import EXIT_OK
from ._common import add_model_arguments, add_steering_arguments, load_model, task_pairs, write_json


def _numbers(text: str, kind):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty")
    return values


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="K x delta grid on the validation split -> best adapter, grid JSON, heatmap",
        description="Calibrate a SADI adapter once on the task's pair split, score every (K, delta) point on the "
        "task's VALIDATION split (the task's metric: restricted-choice log-likelihood accuracy, TruthfulQA MC2 for "
        "truthfulqa_mc2, greedy-generation exact match for TriviaQA; for positions='last' the prompt prefix's KV "
        "cache is reused across grid points), and save the best adapter, grid.json and heatmap.png. The test split "
        "is never used for selection.",
    )
    parser.add_argument("--task", required=True, help="task name")
    add_model_arguments(parser)
    add_steering_arguments(parser)
    parser.add_argument("--k-grid", type=lambda t: _numbers(t, int), default=[1, 2, 4, 6, 8, 10], help="K values")
    parser.add_argument("--delta-grid", type=lambda t: _numbers(t, float), default=[4.0, 9.0, 14.0, 24.0, 34.0],
                        help="delta values (gain = 1 + delta)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N validation examples")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="generative tasks (TriviaQA): greedy tokens per answer (default 16, as `eval`)")
    parser.add_argument("--naive", action="store_true", help="no KV-cache reuse (reference implementation)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import peft

    import sadi_peft
    from sadi_peft.harness.baselines import evaluate_items
    from sadi_peft.harness.generation import encode_generation_item, evaluate_generation, generation_grid_search
    from sadi_peft.harness.search import encode_choice_item, grid_search
    from sadi_peft.tasks import get_task, require_selection_split
    from sadi_peft.tasks.protocols import mc2

    split = require_selection_split("validation")
    task = get_task(args.task)
    pairs = task_pairs(task, args)
    examples = task.load(split, args.data_dir)[: args.limit]
    model, tokenizer = load_model(args)
    config = sadi_peft.SADIConfig(variant=args.variant, top_k=min(args.k_grid), delta=args.delta_grid[0],
                                  positions=args.positions)
    model = peft.get_peft_model(model, config)
    start = time.perf_counter()
    sadi_peft.calibrate(model, tokenizer, pairs, batch_size=args.batch_size, show_progress=not args.no_progress)
    calibration_s = time.perf_counter() - start
    generative = task.default_protocol == "generate"
    if generative:
        items = [encode_generation_item(tokenizer, e.prompt, e.answers or (e.gold,), max_new_tokens=args.max_new_tokens)
                 for e in examples]
        search, score = generation_grid_search, evaluate_generation
    else:
        items = [encode_choice_item(tokenizer, e.prompt, e.choices, e.label) for e in examples]
        search, score = grid_search, evaluate_items

    def metric(result) -> float:  # the task's own metric (MC2: probability mass on the true options)
        if task.metric != "mc2":
            return result["accuracy"]
        values = [mc2([float(x) for x in row[: len(e.choices)]], e.true_labels or (e.label,))
                  for e, row in zip(examples, result["scores"])]
        return sum(values) / len(values)

    grid = [(k, d) for k in args.k_grid for d in args.delta_grid]
    with model.disable_adapter():  # scored exactly like the grid points
        baseline = metric(score(model, tokenizer, items, batch_size=args.batch_size))
    start = time.perf_counter()
    results = search(model, tokenizer, items, grid, cached=(args.positions == "last" and not args.naive),
                     batch_size=args.batch_size, show_progress=not args.no_progress)
    for r in results:
        r["accuracy"] = metric(r)
    search_s = time.perf_counter() - start
    best = max(results, key=lambda r: (r["accuracy"], -r["top_k"], -abs(r["delta"])))  # ties: smaller K, delta
    sadi_peft.apply_top_k(model, best["top_k"])
    sadi_peft.set_delta(model, best["delta"])
    sadi_peft.save_pretrained(model, args.out / "adapter")
    payload = {
        "task": task.name, "selection_split": split, "n": len(items), "model": args.model, "variant": args.variant,
        "metric": task.metric, "protocol": "generate" if generative else "choice",
        "positions": args.positions, "num_pairs": len(pairs), "seed": args.seed,
        "cached": args.positions == "last" and not args.naive, "calibration_seconds": calibration_s,
        "search_seconds": search_s, "baseline_accuracy": baseline,
        "best": {"top_k": best["top_k"], "delta": best["delta"], "accuracy": best["accuracy"]},
        "grid": [{"top_k": r["top_k"], "delta": r["delta"], "accuracy": r["accuracy"]} for r in results],
    }
    write_json(args.out / "grid.json", payload)
    heatmap = _heatmap(payload, args.out / "heatmap.png")
    print(f"{task.name}: validation accuracy {baseline:.4f} unsteered, best {best['accuracy']:.4f} at "
          f"K={best['top_k']}, delta={best['delta']:g} ({len(grid)} points, {search_s:.1f} s); "
          f"adapter -> {args.out / 'adapter'}{'; heatmap -> ' + str(heatmap) if heatmap else ''}")
    return EXIT_OK


def _heatmap(payload: dict, path: Path):
    """Validation accuracy over the grid (rows K, columns delta), like the paper's Fig. 2; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no heatmap (pip install matplotlib)")
        return None
    ks = sorted({g["top_k"] for g in payload["grid"]})
    deltas = sorted({g["delta"] for g in payload["grid"]})
    table = {(g["top_k"], g["delta"]): g["accuracy"] for g in payload["grid"]}
    values = [[table[(k, d)] for d in deltas] for k in ks]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(deltas), 1.0 + 0.5 * len(ks)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(deltas)), [f"{1 + d:g}" for d in deltas])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("gain 1 + delta")
    ax.set_ylabel("K")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_title(f"{payload['task']} validation {payload.get('metric', 'accuracy')} (unsteered {100 * payload['baseline_accuracy']:.1f})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
