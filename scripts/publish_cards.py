#!/usr/bin/env python
"""Write the Hub model cards of the adapters in the published results (``hub_cards/<model>/``).

``scripts/reproduce.py`` saves the adapter it chose on validation next to each SADI result
(``<results>/<task>/<method>.adapter/``). For every such adapter whose result file is present this script builds
the card ``sadi_peft.push_to_hub`` would upload, with the evaluation table filled from the result files (the
unsteered ``none`` row of the same task as the baseline, never a typed-in number), and writes it as
``<out>/<task>-<method>.md``, plus ``<out>/index.md``: one line per card with base -> steered and, where both
result files hold per-example values of the same test examples, the paired difference (bootstrap 95 % interval,
exact McNemar p), and the same against the task's random-mask control (``random-head``) where it has run. Cards
also compare with the label-prior control where ``<results>/label_prior.json`` (``scripts/label_prior.py``) has the
task. Nothing is uploaded.

    python scripts/publish_cards.py results/smollm2 --base-model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --repo-prefix sadi-peft/smollm2-135m-instruct --out hub_cards/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _results import paired
from sadi_peft.hub import build_model_card

# the metric a result file names (``result["metric"]``, written by scripts/reproduce.py) -> how the card states it
METRICS = {
    "accuracy": "accuracy (restricted choice, length-normalised log-likelihood)",
    "mc2": "MC2 (normalised probability mass on the true answers, length-normalised log-likelihood)",
    "exact_match": "exact match (greedy answer, SQuAD-normalised, against any alias)",
}


def paired_difference(result: dict, other: dict) -> str:
    """``"+x.x points (paired bootstrap 95 % interval [lo, hi]; exact McNemar p = p)"``: the difference of
    ``result`` minus ``other`` on the same test examples (McNemar for 0/1 metrics only); "" when the two files lack
    per-example values of the same examples."""
    a, b = result.get("per_example"), other.get("per_example")
    if not a or not b or len(a) != len(b) or result.get("examples_digest") != other.get("examples_digest"):
        return ""
    stats = paired(a, b)
    low, high = stats["interval"]
    text = (f"{100 * stats['difference']:+.1f} points (paired bootstrap 95 % interval "
            f"[{100 * low:+.1f}, {100 * high:+.1f}]")
    if stats["mcnemar_p"] is not None:
        text += f"; exact McNemar p = {stats['mcnemar_p']:.2g}"
    return text + ")"


def paired_sentence(result: dict, baseline: dict) -> str:
    """The steered-minus-base difference on the same test examples (see :func:`paired_difference`); "" where it
    cannot be computed."""
    difference = paired_difference(result, baseline)
    return f"On the same {len(result['per_example'])} test examples the adapter differs from the base model by " \
           f"{difference}." if difference else ""


def control_sentence(result: dict, control: dict) -> str:
    """How the adapter compares with the random-mask control of the same task (same number of units and grid,
    chosen on the same validation split), so a reader can tell what the chosen units add over any units given the
    same gain; "" where the two files lack per-example values of the same examples."""
    difference = paired_difference(result, control)
    if not difference:
        return ""
    return (f"Control: a seeded random mask of attention heads at the last prompt token (`random-head`, searched over "
            f"the same K × δ grid as `sadi-head-last` and chosen on the same validation split) scores "
            f"{100 * control['accuracy']:.1f} on these examples; this adapter differs from it by {difference}.")


def prior_sentence(result: dict, control: dict) -> str:
    """How the adapter compares with the label-prior control of ``scripts/label_prior.py`` (the unsteered model
    with a per-option bias chosen on validation: what moving the answer prior alone gives); "" where the control
    lacks per-example values of the same examples."""
    difference = paired_difference(result, control)
    if not difference:
        return ""
    return (f"Label-prior control: the base model with a per-option bias on its choice scores (chosen on validation, "
            f"no steering; `scripts/label_prior.py`) scores {100 * control['accuracy']:.1f}; this adapter differs "
            f"from it by {difference}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results folder of scripts/reproduce.py (one model)")
    parser.add_argument("--base-model", required=True, help="Hub id of the base model the cards name")
    parser.add_argument("--base-note", default="", help="sentence on how the base weights were obtained")
    parser.add_argument("--repo-prefix", required=True, help="repo ids are <prefix>-<task>-<method>")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    prior_file = args.results / "label_prior.json"
    priors = json.loads(prior_file.read_text()) if prior_file.is_file() else {}
    written, index = 0, []
    for adapter in sorted(args.results.glob("*/*.adapter")):
        task, method = adapter.parent.name, adapter.name[: -len(".adapter")]
        result_file, baseline_file = adapter.parent / f"{method}.json", adapter.parent / "none.json"
        if not result_file.is_file():
            print(f"skip {adapter}: no {result_file.name} (run not finished)", file=sys.stderr)
            continue
        result = json.loads(result_file.read_text())
        results, comparison = None, ""
        if baseline_file.is_file():
            baseline = json.loads(baseline_file.read_text())
            if baseline.get("n") == result.get("n"):
                results = {task: {"baseline": baseline["accuracy"], "steered": result["accuracy"],
                                  "metric": METRICS[result.get("metric", "accuracy")],
                                  "split": "test", "n": result["n"]}}
                comparison = paired_sentence(result, baseline)
        control_file = adapter.parent / "random-head.json"
        control = ""
        if method != "random-head" and control_file.is_file():
            control = control_sentence(result, json.loads(control_file.read_text()))
        prior = prior_sentence(result, priors[task]) if task in priors else ""
        chosen = result.get("chosen", {})
        description = (
            f" K and δ were chosen on {result.get('n_validation')} validation examples of {task} "
            f"(top_k={chosen.get('top_k')}, δ={chosen.get('delta')}), calibrated on {result.get('num_pairs')} "
            f"contrastive pairs, seed {result.get('seed')}, by `scripts/reproduce.py` of sadi-peft.{args.base_note}"
            + "".join(f" {sentence}" for sentence in (comparison, control, prior) if sentence)
        )
        card = build_model_card(
            adapter, repo_id=f"{args.repo_prefix}-{task}-{method}", base_model=args.base_model, dataset=task,
            results=results, title=f"SADI steering adapter: {task}, {method}", description=description,
            tags=(task,),
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{task}-{method}.md").write_text(card, encoding="utf-8")
        written += 1
        steered = f"{result['accuracy']:.3f}"
        base = f"{results[task]['baseline']:.3f} → {steered} ({result['n']})" if results else f"– → {steered}"
        against_control = "–"
        if control:
            control_row = json.loads(control_file.read_text())
            against_control = f"{control_row['accuracy']:.3f}: {paired_difference(result, control_row)}"
        index.append(f"| [`{task}-{method}.md`]({task}-{method}.md) | `{adapter.as_posix()}` | {base} | "
                     f"{comparison or '–'} | {against_control} |")
    if index:
        (args.out / "index.md").write_text(
            "| card | adapter folder | test metric: base → steered (n) | against the base on the same examples | "
            "random mask (`random-head`): its metric, and the adapter against it |\n"
            "|---|---|---|---|---|\n" + "\n".join(index) + "\n", encoding="utf-8")
    print(f"wrote {written} cards to {args.out}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
