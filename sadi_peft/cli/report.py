"""``sadi-peft report``: result JSONs (from ``eval``) -> a markdown table, methods x tasks, plus the average."""

from __future__ import annotations

import argparse
import json
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


def markdown(table: dict[str, dict[str, dict]]) -> str:
    tasks = sorted({task for row in table.values() for task in row})
    lines = ["| method | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for method in sorted(table, key=lambda m: (m != "none", m)):
        row = table[method]
        cells = [f"{100 * row[t]['accuracy']:.2f} (n={row[t]['n']})" if t in row else "–" for t in tasks]
        values = [row[t]["accuracy"] for t in tasks if t in row]
        average = f"{100 * sum(values) / len(values):.2f}" if values else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    table = collect(args.paths, args.split)
    if not table:
        raise ValueError(f"no `sadi-peft eval` results for split {args.split!r} under {[str(p) for p in args.paths]}")
    text = markdown(table)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return EXIT_OK
