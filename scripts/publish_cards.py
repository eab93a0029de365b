#!/usr/bin/env python
"""Write the Hub model cards of the adapters in the published results (``hub_cards/<model>/``).

``scripts/reproduce.py`` saves the adapter it chose on validation next to each SADI result
(``<results>/<task>/<method>.adapter/``). For every such adapter whose result file is present this script builds
the card ``sadi_peft.push_to_hub`` would upload, with the evaluation table filled from the result files (the
unsteered ``none`` row of the same task as the baseline, never a typed-in number), and writes it as
``<out>/<task>-<method>.md``, plus ``<out>/index.md``: one line per card with base -> steered and, where both
result files hold per-example values of the same test examples, the paired difference (bootstrap 95 % interval,
exact McNemar p). Nothing is uploaded.

    python scripts/publish_cards.py results/smollm2 --base-model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --repo-prefix sadi-peft/smollm2-135m-instruct --out hub_cards/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sadi_peft.cli.report import bootstrap_interval, mcnemar_p
from sadi_peft.hub import build_model_card

# the metric a result file names (``result["metric"]``, written by scripts/reproduce.py) -> how the card states it
METRICS = {
    "accuracy": "accuracy (restricted choice, length-normalised log-likelihood)",
    "mc2": "MC2 (normalised probability mass on the true answers, length-normalised log-likelihood)",
    "exact_match": "exact match (greedy answer, SQuAD-normalised, against any alias)",
}


def paired_sentence(result: dict, baseline: dict) -> str:
    """The steered-minus-base difference on the same test examples, with its paired bootstrap 95 % interval and, for
    0/1 metrics, the exact McNemar p; "" when the result files lack per-example values of the same examples."""
    a, b = result.get("per_example"), baseline.get("per_example")
    if not a or not b or len(a) != len(b) or result.get("examples_digest") != baseline.get("examples_digest"):
        return ""
    differences = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_interval(differences)
    text = (f"On the same {len(a)} test examples the adapter differs from the base model by "
            f"{100 * sum(differences) / len(a):+.1f} points (paired bootstrap 95 % interval "
            f"[{100 * low:+.1f}, {100 * high:+.1f}]")
    if all(v in (0, 1) for v in (*a, *b)):
        only_steered, only_base = sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))
        text += f"; exact McNemar p = {mcnemar_p(only_steered, only_base):.2g}"
    return text + ")."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results folder of scripts/reproduce.py (one model)")
    parser.add_argument("--base-model", required=True, help="Hub id of the base model the cards name")
    parser.add_argument("--base-note", default="", help="sentence on how the base weights were obtained")
    parser.add_argument("--repo-prefix", required=True, help="repo ids are <prefix>-<task>-<method>")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

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
        chosen = result.get("chosen", {})
        description = (
            f" K and δ were chosen on {result.get('n_validation')} validation examples of {task} "
            f"(top_k={chosen.get('top_k')}, δ={chosen.get('delta')}), calibrated on {result.get('num_pairs')} "
            f"contrastive pairs, seed {result.get('seed')}, by `scripts/reproduce.py` of sadi-peft.{args.base_note}"
            + (f" {comparison}" if comparison else "")
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
        index.append(f"| [`{task}-{method}.md`]({task}-{method}.md) | `{adapter.as_posix()}` | {base} | "
                     f"{comparison or '–'} |")
    if index:
        (args.out / "index.md").write_text(
            "| card | adapter folder | test metric: base → steered (n) | against the base on the same examples |\n"
            "|---|---|---|---|\n" + "\n".join(index) + "\n", encoding="utf-8")
    print(f"wrote {written} cards to {args.out}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
