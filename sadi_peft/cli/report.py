"""``sadi-peft report``: result JSONs (from ``eval``) -> a markdown table, methods x tasks, plus the average."""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

from . import EXIT_OK


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="result JSONs -> a markdown table",
        description="Collect result JSONs written by `sadi-peft eval` (files or folders, searched recursively) into "
        "a markdown table: one row per method, one column per task, plus the average over the tasks a row has.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="result JSON files or folders")
    parser.add_argument("--split", default="test", help="only results of this split")
    parser.add_argument("--details", action="store_true",
                        help="add a second table: chosen hyperparameters, validation accuracy, sizes, seed, times")
    parser.add_argument("--paired", metavar="METHOD[,METHOD]", default=None,
                        help="add a table comparing every method with METHOD (e.g. none; several: comma-separated, "
                        "one table each) on the same test examples: difference, paired bootstrap 95%% interval, "
                        "discordant pairs, exact McNemar p and its Holm adjustment within the task; needs the "
                        "per-example values that `eval` and scripts/reproduce.py store")
    parser.add_argument("--out", type=Path, default=None, help="write the table here (default: print it)")
    parser.set_defaults(func=run)


def collect(paths: list[Path], split: str) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    files = [f for p in paths for f in (sorted(p.rglob("*.json")) if p.is_dir() else [p])]
    for file in files:
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{file}: not a readable JSON result ({error})") from None
        if not isinstance(result, dict) or not {"task", "method", "accuracy", "split"} <= set(result):
            continue  # grid.json, fit.json and other files
        if result["split"] == split:
            table.setdefault(result["method"], {})[result["task"]] = result
    return table


METHOD_ORDER = ["none", "sadi-head-last", "sadi-head-all", "sadi-neuron-last", "sadi-neuron-all", "sadi-hidden-last",
                "sadi-hidden-all", "random-head", "fixed-head", "caa", "iti"]


def _method_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def markdown(table: dict[str, dict[str, dict]]) -> str:
    """Accuracy (%) per method x task; the average is over the tasks the row has, flagged when that is not all.

    When some row lacks a task, a last column averages only the tasks every row has (named in its header), so that
    rows can be compared on the same tasks.
    """
    tasks = sorted({task for row in table.values() for task in row})
    common = [t for t in tasks if all(t in row for row in table.values())]
    partial = len(common) < len(tasks)
    header = ["method", *tasks, "average"]
    if partial and common:
        header.append(f"average of {', '.join(common)} (every row)")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method in sorted(table, key=_method_key):
        row = table[method]
        cells = [f"{100 * row[t]['accuracy']:.2f} (n={row[t]['n']})" if t in row else "–" for t in tasks]
        values = [row[t]["accuracy"] for t in tasks if t in row]
        average = f"{100 * sum(values) / len(values):.2f}" if values else "–"
        if values and len(values) < len(tasks):
            average += f" ({len(values)} of {len(tasks)} tasks)"
        cells.append(average)
        if partial and common:
            cells.append(f"{100 * sum(row[t]['accuracy'] for t in common) / len(common):.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _chosen(result: dict) -> str:
    chosen = result.get("chosen") or {}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items()) or "–"


def _answer_counts(result: dict) -> str:
    """``predicted (gold)`` per option index, e.g. ``0 (192) / 500 (308)``: shows a row that answers one way."""
    predicted, gold = result.get("predicted_counts"), result.get("label_counts")
    if not predicted or not gold or len(predicted) > 5:
        return "–"
    return " / ".join(f"{p} ({g})" for p, g in zip(predicted, gold))


def details(table: dict[str, dict[str, dict]]) -> str:
    """One line per (task, method): chosen hyperparameters, validation accuracy and size, pairs, seed, times."""
    lines = ["| task | method | chosen on validation | validation acc. | n validation | pairs | seed | test n | "
             "test answers per option (gold) | CPU s | wall s |", "|---" * 11 + "|"]
    rows = [(task, method, result) for method, row in table.items() for task, result in row.items()]
    for task, method, r in sorted(rows, key=lambda x: (x[0], _method_key(x[1]))):
        val = r.get("validation_accuracy")
        cells = [task, method, _chosen(r), f"{100 * val:.2f}" if val is not None else "–",
                 str(r.get("n_validation", "–")), str(r.get("num_pairs", "–")), str(r.get("seed", "–")), str(r["n"]),
                 _answer_counts(r),
                 f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "–",
                 f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: the probability, under "both methods are equally good", of a split of the
    ``only_a + only_b`` discordant examples at least as uneven as the one observed (binomial, p = 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


@functools.lru_cache(maxsize=4)
def _resample_counts(n: int, resamples: int, seed: int):
    """``[resamples, n]``: how often each example is drawn in each seeded resample. The draws depend only on ``n``
    and the seed, so every comparison on the same examples shares them (a results table makes hundreds)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n, dtype=torch.float64)
    return counts.scatter_add_(1, draws, torch.ones(resamples, n, dtype=torch.float64))


def bootstrap_interval(differences: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``differences`` over ``resamples`` seeded bootstrap resamples of the
    examples (paired: each resample keeps both methods' values of an example together)."""
    import torch  # the report needs no torch otherwise

    values = torch.tensor(differences, dtype=torch.float64)
    means = _resample_counts(len(values), resamples, seed) @ values / len(values)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (one family): the smallest p is multiplied by m, the next by
    m - 1, ..., each kept at least as large as the one before and at most 1. Controls the family-wise error rate
    without assuming the tests independent."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired(table: dict[str, dict[str, dict]], reference: str) -> str:
    """Every method against ``reference`` on each task where both results hold ``per_example`` values of the same test
    examples (same ``examples_digest``): mean difference in points, its paired bootstrap 95 % interval and, for 0/1
    metrics, the discordant examples, the exact McNemar p and that p Holm-adjusted over the methods compared with
    ``reference`` on the same task (one family per task)."""
    if reference not in table:
        raise ValueError(f"--paired {reference!r}: no results of that method; methods present: {sorted(table)}")
    lines = [f"Each method against `{reference}` on the same test examples; Holm p: the McNemar p adjusted over the "
             f"methods compared with `{reference}` on that task (no correction across tasks):",
             "", f"| task | method | n | {reference} | method | difference (points) | 95 % interval (paired bootstrap) | "
             f"right only with method / only with {reference} | McNemar p | Holm p |", "|---" * 10 + "|"]
    skipped: dict[str, list[str]] = {}
    for task in sorted(table[reference]):
        base = table[reference][task]
        rows: list[tuple[list[str], float | None]] = []
        for method in sorted((m for m in table if m != reference and task in table[m]), key=_method_key):
            other = table[method][task]
            a, b = other.get("per_example"), base.get("per_example")
            same_examples = other.get("examples_digest") == base.get("examples_digest")
            if a is None or b is None or not same_examples or len(a) != len(b):
                skipped.setdefault(task, []).append(method)
                continue
            differences = [x - y for x, y in zip(a, b)]
            low, high = bootstrap_interval(differences)
            binary = all(v in (0, 1) for v in (*a, *b))
            only_a = sum(1 for x, y in zip(a, b) if x > y)
            only_b = sum(1 for x, y in zip(a, b) if x < y)
            p_value = mcnemar_p(only_a, only_b) if binary else None
            cells = [task, method, str(len(a)), f"{100 * sum(b) / len(b):.2f}", f"{100 * sum(a) / len(a):.2f}",
                     f"{100 * sum(differences) / len(differences):+.2f}", f"[{100 * low:+.2f}, {100 * high:+.2f}]",
                     f"{only_a} / {only_b}" if binary else "–", f"{p_value:.3g}" if binary else "–"]
            rows.append((cells, p_value))
        tested = [p_value for _, p_value in rows if p_value is not None]
        adjusted = iter(holm(tested))
        for cells, p_value in rows:
            cells.append(f"{next(adjusted):.3g}" if p_value is not None else "–")
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if skipped:
        listed = "; ".join(f"{task}: {', '.join(methods)}" for task, methods in skipped.items())
        text += (f"\nNot compared ({sum(map(len, skipped.values()))}; no per-example values of the same test "
                 f"examples, e.g. results written before they were stored): {listed}\n")
    return text


def run(args: argparse.Namespace) -> int:
    table = collect(args.paths, args.split)
    if not table:
        raise ValueError(f"no `sadi-peft eval` results for split {args.split!r} under {[str(p) for p in args.paths]}")
    text = markdown(table)
    if args.details:
        text += "\n" + details(table)
    for reference in (args.paired.split(",") if args.paired else []):
        text += "\n" + paired(table, reference)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return EXIT_OK
