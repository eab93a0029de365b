#!/usr/bin/env python
"""Do a method's gains on a multiple-choice task come from a preference for long or short options?

Choice scoring is length-normalised (mean log-probability over each option's tokens), and a strong intervention can
move the model's preference between long and short options without making it read the question any better. This
script splits the stored test rows of one task by where the gold option's token length ranks among its options
(the longest, the shortest, or neither) and reports each method's accuracy on each group, next to the accuracy of
the blind rules "pick the longest option", "pick the shortest option" and "pick at random". A gain that sits only
in the "gold is the longest" group, with a loss elsewhere, is a length preference, not steering.

Only tasks whose options are the answers themselves can show this (TruthfulQA MC1 and MC2); where the options are
letters (ARC, MMLU, COPA and Winogrande in our templates) every option has the same length, which the table says.

``--by style`` splits the same rows by the gold option's answer style instead: TruthfulQA's refusal "I have no
comment.", an answer that opens by denying the premise ("No, ...", "Nothing happens ...", "There is no ..."), or
other, next to the blind rule "pick no comment, else a denial, else any option". A model that learns to prefer
those styles gains on TruthfulQA without reading the question any better.

TruthfulQA MC2 has several true options per question and scores the probability mass on them, so there an example's
group is the first of "no comment", "denial" (or "longest", "shortest") that any of its true options has, a blind
rule spreads its mass evenly over the options it would pick, and "pick at random" is the share of true options.
The MC2 rows store only the top option, so the shares of picks are those of each row's top option.

It reads the per-example values that ``scripts/reproduce.py`` stores, rebuilds the same test subsample (the rows'
seed and size) and checks its fingerprint against the rows', so no model runs; only the tokenizer is loaded.

    python scripts/option_length.py results/gemma3-270m --task truthfulqa_mc1
    python scripts/option_length.py results/smollm2 --task arc_easy --out results/smollm2/arc_easy/option_length.md
    python scripts/option_length.py results/gemma3-270m --task truthfulqa_mc1 --by style
    python scripts/option_length.py results/smollm2 --task truthfulqa_mc2 --by style
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Collection, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import _tokenizer  # noqa: E402
from _results import emit, load_rows, row_metric  # noqa: E402

from sadi_peft.harness.search import encode_choice_item  # noqa: E402
from sadi_peft.tasks import examples_digest, get_task, select_examples  # noqa: E402
from sadi_peft.zoo import MissingDependencyError  # noqa: E402

logger = logging.getLogger("option_length")

GROUPS = ("longest", "shortest", "other")
STYLE_GROUPS = ("no comment", "denial", "other")
# TruthfulQA's answer styles that a model can prefer without reading the question: the refusal "I have no
# comment." and answers that open by denying the premise ("No, ...", "Nothing happens ...", "There is no ...")
NO_COMMENT = re.compile(r"^\s*i have no comment\b", re.IGNORECASE)
DENIAL = re.compile(r"^\s*(no|not|none|nothing|nobody|never|there (is|are|was|were) no)\b", re.IGNORECASE)


Gold = int | Collection[int]  # the gold option (MC1 and the like) or the set of true options (TruthfulQA MC2)


def true_set(gold: Gold) -> set[int]:
    """The indices of an example's true options: ``{gold}`` for a single gold option."""
    return {gold} if isinstance(gold, int) else set(gold)


def gold_group(lengths: Sequence[int], gold: Gold) -> str:
    """``"longest"`` / ``"shortest"`` when a true option alone is the longest / shortest, else ``"other"``
    (a tie for first or last place, or a middle rank)."""
    trues = true_set(gold)
    if any(sum(1 for n in lengths if n >= lengths[g]) == 1 for g in trues):
        return "longest"
    if any(sum(1 for n in lengths if n <= lengths[g]) == 1 for g in trues):
        return "shortest"
    return "other"


def share_true(tied: Sequence[int], gold: Gold) -> float:
    """What a rule that picks among ``tied`` at random scores: the share of them that are true (for MC2, the mass on
    true options when it spreads its mass evenly over ``tied``)."""
    trues = true_set(gold)
    return sum(1 for i in tied if i in trues) / len(tied) if tied else 0.0


def blind_rule_accuracy(lengths: Sequence[int], gold: Gold, pick: str) -> float:
    """Expected accuracy of always picking the longest (``pick="longest"``) or shortest option, ties broken at
    random."""
    target = max(lengths) if pick == "longest" else min(lengths)
    return share_true([i for i, n in enumerate(lengths) if n == target], gold)


def option_style(text: str) -> str:
    """``"no comment"`` for the refusal "I have no comment.", ``"denial"`` for an answer that opens with a negation
    (No, Not, None, Nothing, Nobody, Never, There is/are no), else ``"other"``."""
    if NO_COMMENT.match(text):
        return "no comment"
    return "denial" if DENIAL.match(text) else "other"


def style_group(styles: Sequence[str], gold: Gold) -> str:
    """The gold option's style; with several true options, the first of ``STYLE_GROUPS`` that one of them has."""
    trues = true_set(gold)
    return next(style for style in STYLE_GROUPS if any(styles[i] == style for i in trues))


def style_rule_accuracy(styles: Sequence[str], gold: Gold) -> float:
    """Expected accuracy of the blind rule "pick a no-comment option, else a denial, else any option", ties broken
    at random."""
    for style in STYLE_GROUPS:
        tied = [i for i, s in enumerate(styles) if s == style]
        if tied:
            return share_true(tied, gold)
    return 0.0  # no options


def split_rows(groups: Sequence[str], group_names: Sequence[str], kinds: dict[str, Sequence[set[int]]],
               golds: Sequence[Gold], n_options: Sequence[int], blind: dict[str, Sequence[float]],
               rows: dict[str, Sequence[float]], predictions: dict[str, Sequence[int]] | None = None) -> dict:
    """Each row's accuracy on every group of examples, and how often it picked an option of each kind.

    ``groups[i]``: example ``i``'s group (one of ``group_names``); ``kinds[kind][i]``: the indices of example
    ``i``'s options of that kind; ``golds[i]``: its gold option or set of true options; ``blind``: the per-example
    expected accuracies of rules blind to the question, listed before the rows; ``rows[method][i]``: its 1/0
    correctness (or MC2 mass); ``predictions[method][i]`` (where a row stores them): the option it picked (its top
    option)."""
    predictions = predictions or {}
    for method, values in [*rows.items(), *predictions.items()]:
        if len(values) != len(groups):
            raise ValueError(f"row {method!r} has {len(values)} per-example values; the examples are {len(groups)}")
    members = {g: [i for i, x in enumerate(groups) if x == g] for g in group_names}

    def accuracy(values: Sequence[float], idx: list[int]) -> float | None:
        return sum(values[i] for i in idx) / len(idx) if idx else None

    everyone = list(range(len(groups)))
    table = {**blind, "pick at random": [share_true(range(n), g) for n, g in zip(n_options, golds)], **rows}
    picks = {name: {kind: sum(p in sets[i] for i, p in enumerate(picked)) / len(groups) for kind, sets in kinds.items()}
             for name, picked in predictions.items()}
    # what a pick blind to the options gives: the share of each example's options that are of the kind
    picks["pick at random"] = {kind: sum(len(s) / n for s, n in zip(sets, n_options)) / len(groups)
                               for kind, sets in kinds.items()}
    return {
        "n": len(groups),
        "groups": list(group_names),
        "kinds": list(kinds),
        "group_sizes": {g: len(idx) for g, idx in members.items()},
        "accuracy": {name: {"all": accuracy(values, everyone),
                            **{g: accuracy(values, idx) for g, idx in members.items()}}
                     for name, values in table.items()},
        "picks": picks,
    }


def analyse(lengths: Sequence[Sequence[int]], labels: Sequence[Gold], rows: dict[str, Sequence[float]],
            predictions: dict[str, Sequence[int]] | None = None) -> dict:
    """The split by option length: groups by where the gold option's token length ranks, the blind rules "pick the
    longest / shortest option", and the shares of picks that are a longest and a shortest option (ties included).

    ``lengths[i]``: token lengths of example ``i``'s options; ``labels[i]``: its gold option, or (MC2) the set of
    its true options."""
    if len(lengths) != len(labels):
        raise ValueError(f"{len(lengths)} option-length lists but {len(labels)} labels")
    blind = {f"pick the {pick} option": [blind_rule_accuracy(n, y, pick) for n, y in zip(lengths, labels)]
             for pick in ("longest", "shortest")}
    kinds = {kind: [{i for i, x in enumerate(n) if x == f(n)} for n in lengths]
             for kind, f in (("longest", max), ("shortest", min))}
    result = split_rows([gold_group(n, y) for n, y in zip(lengths, labels)], GROUPS, kinds, labels,
                        [len(n) for n in lengths], blind, rows, predictions)
    result["equal_lengths"] = sum(1 for n in lengths if min(n) == max(n))
    return result


def analyse_style(choices: Sequence[Sequence[str]], labels: Sequence[Gold], rows: dict[str, Sequence[float]],
                  predictions: dict[str, Sequence[int]] | None = None) -> dict:
    """The split by answer style (see :func:`option_style`): groups by the gold option's style, the blind rule
    "pick a no-comment option, else a denial, else any", and the shares of picks that are a no-comment option and
    a denial."""
    if len(choices) != len(labels):
        raise ValueError(f"{len(choices)} option lists but {len(labels)} labels")
    styles = [[option_style(o) for o in options] for options in choices]
    blind = {"pick no comment, else a denial": [style_rule_accuracy(s, y) for s, y in zip(styles, labels)]}
    kinds = {kind: [{i for i, x in enumerate(s) if x == kind} for s in styles] for kind in STYLE_GROUPS[:2]}
    result = split_rows([style_group(s, y) for s, y in zip(styles, labels)], STYLE_GROUPS, kinds, labels,
                        [len(s) for s in styles], blind, rows, predictions)
    result["no_style"] = sum(1 for s in styles if set(s) == {"other"})
    return result


def render(result: dict, task: str, folder: str, reference: str = "none") -> str:
    """A markdown table: accuracy on every group (in %), each row's change from ``reference`` per group, and the
    shares of its picks of each kind."""
    sizes, groups, kinds = result["group_sizes"], result["groups"], result["kinds"]
    by_length = "equal_lengths" in result
    mc2 = result.get("metric") == "mc2"
    gold = "true:" if mc2 else "gold"
    head = ["row", f"all (n={result['n']})", *[f"{gold} {g} (n={sizes[g]})" for g in groups],
            *[f"{'top' if mc2 else 'picks a'} {k} option" for k in kinds]]
    what = "Option-length" if by_length else "Answer-style"
    values = "MC2, the mean probability mass on the true options, in %" if mc2 else "accuracy in %"
    lines = [f"{what} split of `{folder}` / `{task}` (test rows with per-example values; {values}).", "",
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
        shares = ["–"] * len(kinds) if picks is None else [f"{100 * picks[k]:.1f}" for k in kinds]
        lines.append("| " + " | ".join([name, *[cell(name, k) for k in ("all", *groups)], *shares]) + " |")
    if result.get("equal_lengths"):
        lines += ["", f"In {result['equal_lengths']} of the {result['n']} examples every option has the same token "
                  "length: no length preference can change those (where the options are letters, that is every example)."]
    if result.get("no_style"):
        lines += ["", f"In {result['no_style']} of the {result['n']} examples no option is a no-comment answer or a "
                  "denial: no preference for those styles can change those."]
    picks = "\"Top … option\"" if mc2 else "\"Picks a … option\""
    chose = "whose highest-scored option is" if mc2 else "where the row chose"
    if by_length:
        picks = picks.replace("…", "longest (shortest)")
        kinds_text = (f"{picks}: the share of examples {chose} an option of the greatest (least) token length, ties "
                      "included")
    else:
        kinds_text = ("\"No comment\": the option \"I have no comment.\"; \"denial\": an option that opens with No, "
                      f"Not, None, Nothing, Nobody, Never or There is/are no. {picks}: the share of examples {chose} "
                      "one")
    if mc2:
        kinds_text += (". \"True: …\": a question counts in the first group that one of its true options belongs to. "
                       "A blind rule spreads its mass evenly over the options it would pick, so \"pick at random\" "
                       "scores the share of true options")
    lines += ["", f"In parentheses: the change from `{reference}` on the same examples. {kinds_text}; rows stored "
              "without their predictions show –."]
    return "\n".join(lines) + "\n"


class RowsError(ValueError):
    """The stored rows cannot be split: none with per-example values, or not all on the same test examples."""


def task_split(folder: Path, task_name: str, tokenizer_name: str | None, data_dir: str | None,
               reference: str = "none", tokenizers: dict | None = None, by: str = "length") -> str:
    """The markdown split of one task's rows in ``folder`` (see the module docstring), ``by`` option length or
    answer style. ``tokenizers``: a cache shared across tasks, by name."""
    task_folder = folder / task_name
    rows = load_rows(task_folder, metrics=("accuracy", "mc2"))
    if not rows:
        raise RowsError(f"{task_folder} holds no choice-accuracy (or MC2) result with per-example values; run "
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
    predictions = {m: r["predicted"] for m, r in rows.items() if "predicted" in r}
    per_example = {m: r["per_example"] for m, r in rows.items()}
    metric = row_metric(first)
    golds = [set(e.true_labels) if metric == "mc2" else e.label for e in test]
    if by == "style":  # the option texts alone: no tokenizer
        result = analyse_style([e.choices for e in test], golds, per_example, predictions)
        result["metric"] = metric
        return render(result, task_name, str(folder), reference=reference)
    name = tokenizer_name or first["model"]
    tokenizers = {} if tokenizers is None else tokenizers
    if name not in tokenizers:
        tokenizers[name] = _tokenizer(name)
    lengths = [[len(o) for o in encode_choice_item(tokenizers[name], e.prompt, e.choices, e.label).option_ids]
               for e in test]
    result = analyse(lengths, golds, per_example, predictions)
    result["metric"] = metric
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
    parser.add_argument("--by", choices=("length", "style"), default="length",
                        help="split by the gold option's token-length rank (default) or by its answer style "
                             "(\"I have no comment.\", an answer opening with a denial, other)")
    parser.add_argument("--reference", default="none", help="row the changes are measured from (default: none)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tokenizers: dict = {}
    try:
        text = "\n".join(task_split(args.folder, t.strip(), args.tokenizer, args.data_dir, args.reference, tokenizers,
                                    args.by)
                         for t in args.task.split(",") if t.strip())
    except (RowsError, KeyError, FileNotFoundError, MissingDependencyError) as error:
        logger.error("%s", error.args[0] if error.args else error)
        return 2
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
