#!/usr/bin/env python
"""Regenerate the tables of ``results/README.md`` from the result files, so no number in it is typed by hand.

Each table sits between a marker that names the command producing it and an end marker::

    <!-- generated: sadi-peft report results/smollm2 --details -->
    | method | copa | ... |
    <!-- end generated -->

This script reruns every named ``sadi-peft report`` (paths relative to the repository root) and replaces the text
between the markers. A ``<!-- generated: coverage <folders> -->`` block lists, per result folder and task, which of
the rows ``scripts/reproduce.py`` makes are present, missing or failed (an ``.error.json``), so the document's
"what is not done" never goes stale. A ``<!-- generated: replicates <task> <folders> -->`` block compares, for one
task, each method with ``none`` in every folder (runs of the same table with other ``--seed`` values), one line per
folder and method, and the mean over the folders. A ``<!-- generated: label-prior <folder> -->`` block renders the
label-prior control of ``<folder>/label_prior.json`` (``scripts/label_prior.py``) against the rows stored now.
``--check`` changes nothing and exits 1 when a table is out of
date (the test suite runs it).

    python scripts/update_results_readme.py            # rewrite results/README.md
    python scripts/update_results_readme.py --check    # exit 1 if a table differs from the result files
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

from sadi_peft.cli.report import (
    _chosen, _method_key, bootstrap_interval, collect, details, markdown, mcnemar_p, paired,
)

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<command>[^\n]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected() -> tuple[list[str], list[str]]:
    """The tasks and methods of the whole table: ``scripts/reproduce.py``'s own lists."""
    module = _script("reproduce")
    return list(module.TASKS), list(module.METHODS)


def coverage(folders: list[str], root: Path, tasks: list[str] | None = None,
             methods: list[str] | None = None) -> str:
    """A markdown table of the rows each result folder holds, per task, against the full table (``tasks`` x
    ``methods``, by default those of ``scripts/reproduce.py``); one summary line per folder."""
    if tasks is None or methods is None:
        tasks, methods = _expected()
    lines = ["| results | task | rows | missing | failed (`.error.json`) |", "|---|---|---|---|---|"]
    totals = []
    for folder in folders:
        if not (root / folder).is_dir():
            raise ValueError(f"coverage block names {folder!r}, which is not a folder under {root}; expected a "
                             "result folder of scripts/reproduce.py (e.g. results/smollm2)")
        present_total = 0
        for task in tasks:
            present = [m for m in methods if (root / folder / task / f"{m}.json").is_file()]
            failed = [m for m in methods if m not in present and (root / folder / task / f"{m}.error.json").is_file()]
            missing = [m for m in methods if m not in present and m not in failed]
            present_total += len(present)
            if missing or failed:
                lines.append(f"| {folder} | {task} | {len(present)} of {len(methods)} | {', '.join(missing) or '–'} "
                             f"| {', '.join(failed) or '–'} |")
            else:
                lines.append(f"| {folder} | {task} | {len(present)} of {len(methods)} (complete) | – | – |")
        totals.append(f"`{folder}`: {present_total} of {len(tasks) * len(methods)} cells")
    return "\n".join(lines) + "\n\nIn all: " + "; ".join(totals) + ".\n"


def replicates(task: str, folders: list[str], root: Path) -> str:
    """``task``'s methods against ``none`` in each result folder (seeded reruns of the same protocol), for the methods
    found in at least two of the folders: test accuracy,
    the paired difference with its bootstrap 95 % interval and exact McNemar p; then each method's mean difference
    and in how many folders it was above ``none``."""
    lines = ["| results | seed | method | chosen on validation | validation acc. | test n | test acc. | "
             "difference to none (points) | 95 % interval (paired bootstrap) | McNemar p |", "|---" * 10 + "|"]
    differences: dict[str, list[float]] = {}
    rows = {folder: {m: r[task] for m, r in collect([root / folder], "test").items() if task in r}
            for folder in folders}
    for folder, row in rows.items():
        if "none" not in row:
            raise ValueError(f"replicates block: no `none` result for {task!r} under {folder!r}; every folder needs "
                             "one to compare with")
    # the methods rerun with other seeds: those in at least two folders (a full seed-0 table adds no other rows)
    replicated = {m for row in rows.values() for m in row if sum(m in other for other in rows.values()) >= 2}
    for folder, row in rows.items():
        base = row["none"]
        for method in sorted(replicated & set(row), key=_method_key):
            r = row[method]
            cells = [folder, str(r.get("seed", "–")), method, _chosen(r),
                     f"{100 * r['validation_accuracy']:.2f}" if r.get("validation_accuracy") is not None else "–",
                     str(r["n"]), f"{100 * r['accuracy']:.2f}"]
            a, b = r.get("per_example"), base.get("per_example")
            if method == "none":
                cells += ["–", "–", "–"]
            elif a is None or b is None or r.get("examples_digest") != base.get("examples_digest"):
                raise ValueError(f"replicates block: {folder}/{task}/{method} and its `none` lack per-example values "
                                 "of the same test examples; add them with scripts/reproduce.py --add-per-example")
            else:
                diff = [x - y for x, y in zip(a, b)]
                low, high = bootstrap_interval(diff)
                mean = sum(diff) / len(diff)
                differences.setdefault(method, []).append(mean)
                p_value = mcnemar_p(sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b)))
                cells += [f"{100 * mean:+.2f}", f"[{100 * low:+.2f}, {100 * high:+.2f}]", f"{p_value:.3g}"]
            lines.append("| " + " | ".join(cells) + " |")
    summary = [f"`{m}` {100 * sum(d) / len(d):+.2f} (above `none` in {sum(x > 0 for x in d)} of {len(d)})"
               for m, d in sorted(differences.items(), key=lambda item: _method_key(item[0]))]
    return "\n".join(lines) + "\n\nMean difference to `none` over the runs: " + "; ".join(summary) + ".\n"


def label_prior(folder: str, root: Path) -> str:
    """The tables of ``scripts/label_prior.py`` for ``<folder>/label_prior.json``, against the rows stored now."""
    path = root / folder / "label_prior.json"
    if not path.is_file():
        raise ValueError(f"label-prior block names {folder!r}, which has no label_prior.json; run "
                         f"scripts/label_prior.py {folder} --tasks ... first")
    entries = json.loads(path.read_text(encoding="utf-8"))
    return _script("label_prior").render(entries, root / folder, name=folder)


def render(command: str, root: Path) -> str:
    """The output of one ``sadi-peft report <paths> [--details] [--paired M] [--split S]`` command, run in-process,
    or of a ``coverage <folders>`` block."""
    words = shlex.split(command)
    if words[:1] == ["coverage"]:
        if len(words) < 2:
            raise ValueError(f"generated block names {command!r}; expected `coverage <result folder> ...`")
        return coverage(words[1:], root)
    if words[:1] == ["replicates"]:
        if len(words) < 3:
            raise ValueError(f"generated block names {command!r}; expected `replicates <task> <result folder> ...`")
        return replicates(words[1], words[2:], root)
    if words[:1] == ["label-prior"]:
        if len(words) != 2:
            raise ValueError(f"generated block names {command!r}; expected `label-prior <result folder>`")
        return label_prior(words[1], root)
    if words[:2] != ["sadi-peft", "report"]:
        raise ValueError(f"generated block names {command!r}; expected a `sadi-peft report ...` command or "
                         "`coverage <result folder> ...`")
    parser = argparse.ArgumentParser(prog="sadi-peft report", add_help=False)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--details", action="store_true")
    parser.add_argument("--paired", default=None)
    args = parser.parse_args(words[2:])
    table = collect([root / p for p in args.paths], args.split)
    if not table:
        raise ValueError(f"`{command}`: no results for split {args.split!r} under {args.paths}")
    return (markdown(table) + ("\n" + details(table) if args.details else "")
            + "".join("\n" + paired(table, m) for m in (args.paired.split(",") if args.paired else [])))


def update(text: str, root: Path) -> str:
    """``text`` with every generated block replaced by its command's current output."""
    if not BLOCK.search(text):
        raise ValueError("no `<!-- generated: ... -->` ... `<!-- end generated -->` block found")
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("command"), root) + m.group(4), text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("readme", nargs="?", type=Path, default=REPO / "results" / "README.md")
    parser.add_argument("--root", type=Path, default=REPO, help="folder the report paths are relative to")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args()
    text = args.readme.read_text(encoding="utf-8")
    new = update(text, args.root)
    if args.check:
        if new != text:
            print(f"{args.readme}: tables differ from the result files; run scripts/update_results_readme.py",
                  file=sys.stderr)
            return 1
        print(f"{args.readme}: tables match the result files")
        return 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{'updated' if new != text else 'unchanged'}: {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
