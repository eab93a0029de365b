#!/usr/bin/env python
"""Write the Hub model cards of the adapters in the published results (``hub_cards/<model>/``).

``scripts/reproduce.py`` saves the adapter it chose on validation next to each SADI result
(``<results>/<task>/<method>.adapter/``). For every such adapter whose result file is present this script builds
the card ``sadi_peft.push_to_hub`` would upload, with the evaluation table filled from the result files (the
unsteered ``none`` row of the same task as the baseline, never a typed-in number), and writes it as
``<out>/<task>-<method>.md``. Nothing is uploaded.

    python scripts/publish_cards.py results/smollm2 --base-model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --repo-prefix sadi-peft/smollm2-135m-instruct --out hub_cards/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sadi_peft.hub import build_model_card

# the metric a result file names (``result["metric"]``, written by scripts/reproduce.py) -> how the card states it
METRICS = {
    "accuracy": "accuracy (restricted choice, length-normalised log-likelihood)",
    "mc2": "MC2 (normalised probability mass on the true answers, length-normalised log-likelihood)",
    "exact_match": "exact match (greedy answer, SQuAD-normalised, against any alias)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results folder of scripts/reproduce.py (one model)")
    parser.add_argument("--base-model", required=True, help="Hub id of the base model the cards name")
    parser.add_argument("--base-note", default="", help="sentence on how the base weights were obtained")
    parser.add_argument("--repo-prefix", required=True, help="repo ids are <prefix>-<task>-<method>")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    written = 0
    for adapter in sorted(args.results.glob("*/*.adapter")):
        task, method = adapter.parent.name, adapter.name[: -len(".adapter")]
        result_file, baseline_file = adapter.parent / f"{method}.json", adapter.parent / "none.json"
        if not result_file.is_file():
            print(f"skip {adapter}: no {result_file.name} (run not finished)", file=sys.stderr)
            continue
        result = json.loads(result_file.read_text())
        results = None
        if baseline_file.is_file():
            baseline = json.loads(baseline_file.read_text())
            if baseline.get("n") == result.get("n"):
                results = {task: {"baseline": baseline["accuracy"], "steered": result["accuracy"],
                                  "metric": METRICS[result.get("metric", "accuracy")],
                                  "split": "test", "n": result["n"]}}
        chosen = result.get("chosen", {})
        description = (
            f" K and δ were chosen on {result.get('n_validation')} validation examples of {task} "
            f"(top_k={chosen.get('top_k')}, δ={chosen.get('delta')}), calibrated on {result.get('num_pairs')} "
            f"contrastive pairs, seed {result.get('seed')}, by `scripts/reproduce.py` of sadi-peft.{args.base_note}"
        )
        card = build_model_card(
            adapter, repo_id=f"{args.repo_prefix}-{task}-{method}", base_model=args.base_model, dataset=task,
            results=results, title=f"SADI steering adapter: {task}, {method}", description=description,
            tags=(task,),
        )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{task}-{method}.md").write_text(card, encoding="utf-8")
        written += 1
    print(f"wrote {written} cards to {args.out}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
