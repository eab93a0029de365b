#!/usr/bin/env python
"""Do a method's gains on a multiple-choice task come from a preference for long or short options?

Choice scoring is length-normalised (mean log-probability over each option's tokens), and a strong intervention can
move the model's preference between long and short options without making it read the question any better. This
script splits the stored test rows of one task by where the gold option's token length ranks among its options
(the longest, the shortest, or neither) and reports each method's accuracy on each group, next to the accuracy of
the blind rules "pick the longest option", "pick the shortest option" and "pick at random". A gain that sits only
in the "gold is the longest" group, with a loss elsewhere, is a length preference, not steering.

Only tasks whose options are the answers themselves can show this (TruthfulQA MC1); where the options are letters
(ARC, MMLU, COPA and Winogrande in our templates) every option has the same length, which the table says.

It reads the per-example values that ``scripts/reproduce.py`` stores, rebuilds the same test subsample (the rows'
seed and size) and checks its fingerprint against the rows', so no model runs; only the tokenizer is loaded.

    python scripts/option_length.py results/gemma3-270m --task truthfulqa_mc1
    python scripts/option_length.py results/smollm2 --task arc_easy --out results/smollm2/arc_easy/option_length.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import _tokenizer  # noqa: E402

from sadi_peft.harness.search import encode_choice_item  # noqa: E402
from sadi_peft.tasks import examples_digest, get_task, select_examples  # noqa: E402
from sadi_peft.zoo import MissingDependencyError  # noqa: E402

logger = logging.getLogger("option_length")

GROUPS = ("longest", "shortest", "other")


def gold_group(lengths: Sequence[int], label: int) -> str:
    """``"longest"`` / ``"shortest"`` when the gold option alone is the longest / shortest, else ``"other"``
    (a tie for first or last place, or a middle rank)."""
    gold = lengths[label]
    if sum(1 for n in lengths if n >= gold) == 1:
        return "longest"
    if sum(1 for n in lengths if n <= gold) == 1:
        return "shortest"
    return "other"


def blind_rule_accuracy(lengths: Sequence[int], label: int, pick: str) -> float:
    """Expected accuracy of always picking the longest (``pick="longest"``) or shortest option, ties broken at
    random."""
    target = max(lengths) if pick == "longest" else min(lengths)
    tied = [i for i, n in enumerate(lengths) if n == target]
    return 1.0 / len(tied) if label in tied else 0.0


def analyse(lengths: Sequence[Sequence[int]], labels: Sequence[int], rows: dict[str, Sequence[float]],
            predictions: dict[str, Sequence[int]] | None = None) -> dict:
    """Per-group sizes, the blind rules' accuracies and each row's accuracy on every group.

    ``lengths[i]``: token lengths of example ``i``'s options; ``rows[method][i]``: its 1/0 correctness;
    ``predictions[method][i]`` (where a row stores them): the option it picked, from which ``picks`` gives the
    share of examples where the row picked a longest and a shortest option (ties included)."""
    if len(lengths) != len(labels):
        raise ValueError(f"{len(lengths)} option-length lists but {len(labels)} labels")
    predictions = predictions or {}
    for method, values in [*rows.items(), *predictions.items()]:
        if len(values) != len(labels):
            raise ValueError(f"row {method!r} has {len(values)} per-example values; the examples are {len(labels)}")
    groups = [gold_group(n, y) for n, y in zip(lengths, labels)]
    members = {g: [i for i, x in enumerate(groups) if x == g] for g in GROUPS}

    def accuracy(values: Sequence[float], idx: list[int]) -> float | None:
        return sum(values[i] for i in idx) / len(idx) if idx else None

    everyone = list(range(len(labels)))
    table = {}
    for pick in ("longest", "shortest"):
        values = [blind_rule_accuracy(n, y, pick) for n, y in zip(lengths, labels)]
        table[f"pick the {pick} option"] = values
    table["pick at random"] = [1 / len(n) for n in lengths]
    table.update(rows)
    extreme = {"longest": max, "shortest": min}
    picks = {name: {kind: sum(n[p] == f(n) for n, p in zip(lengths, picked)) / len(labels)
                    for kind, f in extreme.items()}
             for name, picked in predictions.items()}
    # what a pick blind to length gives: the share of each example's options that are a longest (shortest) one
    picks["pick at random"] = {kind: sum(sum(x == f(n) for x in n) / len(n) for n in lengths) / len(labels)
                               for kind, f in extreme.items()}
    return {
        "n": len(labels),
        "group_sizes": {g: len(idx) for g, idx in members.items()},
        "equal_lengths": sum(1 for n in lengths if min(n) == max(n)),
        "accuracy": {name: {"all": accuracy(values, everyone),
                            **{g: accuracy(values, idx) for g, idx in members.items()}}
                     for name, values in table.items()},
        "picks": picks,
    }


def render(result: dict, task: str, folder: str, reference: str = "none") -> str:
    """A markdown table: accuracy on every group (in %), and each row's change from ``reference`` per group."""
    sizes = result["group_sizes"]
    head = ["row", f"all (n={result['n']})", *[f"gold {g} (n={sizes[g]})" for g in GROUPS], "picks a longest option",
            "picks a shortest option"]
    lines = [f"Option-length split of `{folder}` / `{task}` (test rows with per-example values).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = result["accuracy"].get(reference)

    def cell(name: str, key: str) -> str:
        value = result["accuracy"][name][key]
        if value is None:
            return "–"
        text = f"{100 * value:.1f}"
        if base is not None and name != reference and not name.startswith("pick ") and base[key] is not None:
            text += f" ({100 * (value - base[key]):+.1f})"
        return text

    for name in result["accuracy"]:
        picks = result["picks"].get(name)
        shares = ["–", "–"] if picks is None else [f"{100 * picks[k]:.1f}" for k in ("longest", "shortest")]
        lines.append("| " + " | ".join([name, *[cell(name, k) for k in ("all", *GROUPS)], *shares]) + " |")
    if result["equal_lengths"]:
        lines += ["", f"In {result['equal_lengths']} of the {result['n']} examples every option has the same token "
                  "length: no length preference can change those (where the options are letters, that is every example)."]
    lines += ["", f"In parentheses: the change from `{reference}` on the same examples. \"Picks a longest (shortest) "
              "option\": the share of examples where the row chose an option of the greatest (least) token length, "
              "ties included; rows stored without their predictions show –."]
    return "\n".join(lines) + "\n"


def load_rows(task_folder: Path) -> dict[str, dict]:
    """The result rows of one task folder that carry per-example values, by method."""
    rows = {}
    for path in sorted(task_folder.glob("*.json")):
        if path.name.endswith(".error.json"):
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        # rows written before results named their metric are accuracy rows, but for TruthfulQA MC2's mass
        metric = record.get("metric") or ("mc2" if record.get("task") == "truthfulqa_mc2" else "accuracy")
        if "per_example" in record and metric == "accuracy" and record.get("protocol") == "choice":
            rows[record["method"]] = record
    return rows


class RowsError(ValueError):
    """The stored rows cannot be split: none with per-example values, or not all on the same test examples."""


def task_split(folder: Path, task_name: str, tokenizer_name: str | None, data_dir: str | None,
               reference: str = "none", tokenizers: dict | None = None) -> str:
    """The markdown split of one task's rows in ``folder`` (see the module docstring). ``tokenizers``: a cache
    shared across tasks, by name."""
    task_folder = folder / task_name
    rows = load_rows(task_folder)
    if not rows:
        raise RowsError(f"{task_folder} holds no choice-accuracy result with per-example values; run "
                        "scripts/reproduce.py for it first, or leave the task out")
    digests = {r["examples_digest"] for r in rows.values()}
    if len(digests) != 1 or len({(r["seed"], r["n"]) for r in rows.values()}) != 1:
        raise RowsError(f"the rows in {task_folder} scored different test examples (digests {sorted(digests)}); "
                        "keep one seed per results folder")
    first = next(iter(rows.values()))
    # as reproduce.py drew it: the split (its first ``available`` examples, less than all under --limit), then the
    # seeded subsample
    examples = get_task(task_name).load("test", data_dir)
    examples = examples[: first.get("available", {}).get("test", len(examples))]
    test = select_examples(examples, first["n"], first["seed"], balanced=False)
    if examples_digest(test) != first["examples_digest"]:
        raise RowsError(f"the test subsample rebuilt from {data_dir or 'the default data folder'} (seed "
                        f"{first['seed']}, n={first['n']}) has digest {examples_digest(test)}, the rows "
                        f"{first['examples_digest']}: the data differs from the one the rows were scored on; pass "
                        "that folder with --data-dir")
    name = tokenizer_name or first["model"]
    tokenizers = {} if tokenizers is None else tokenizers
    if name not in tokenizers:
        tokenizers[name] = _tokenizer(name)
    lengths = [[len(o) for o in encode_choice_item(tokenizers[name], e.prompt, e.choices, e.label).option_ids]
               for e in test]
    result = analyse(lengths, [e.label for e in test], {m: r["per_example"] for m, r in rows.items()},
                     {m: r["predicted"] for m, r in rows.items() if "predicted" in r})
    return render(result, task_name, str(folder), reference=reference)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model's results folder (e.g. results/gemma3-270m)")
    parser.add_argument("--task", required=True,
                        help="multiple-choice tasks scored by accuracy, comma-separated, e.g. truthfulqa_mc1,arc_easy")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to measure options with (default: the rows' model; a local path or zoo name)")
    parser.add_argument("--data-dir", default=None, help="task data folder (default: $SADI_DATA_DIR, ../shared/data)")
    parser.add_argument("--reference", default="none", help="row the changes are measured from (default: none)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tokenizers: dict = {}
    try:
        text = "\n".join(task_split(args.folder, t.strip(), args.tokenizer, args.data_dir, args.reference, tokenizers)
                         for t in args.task.split(",") if t.strip())
    except (RowsError, KeyError, FileNotFoundError, MissingDependencyError) as error:
        logger.error("%s", error.args[0] if error.args else error)
        return 2
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
