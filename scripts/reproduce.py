#!/usr/bin/env python
"""Regenerate the results table: every (model, task, method) -> one JSON file, written atomically, skipped when
present, so a run can be stopped and resumed across sittings.

For each task: calibration pairs come from the task's ``pairs`` split, every hyperparameter (K and delta for SADI,
the random mask and fixed steering; layer and multiplier for CAA; K and alpha for ITI) is chosen on the
``validation`` split only, and the chosen configuration is scored once on the ``test`` split. Scoring is
restricted-choice log-likelihood (length-normalised) for every multiple-choice task, and greedy generation + exact
match against the aliases (at most ``--max-new-tokens`` tokens, cut at the first newline) for TriviaQA, in the
selection and on the test split alike.

    python scripts/reproduce.py --out results/smollm2                     # everything (hours on 2 CPU cores)
    python scripts/reproduce.py --tasks copa,sst2 --methods none,sadi-head-last --out results/smollm2
    python scripts/reproduce.py --tiny --tasks copa --limit 8 --out /tmp/r  # smoke size
    sadi-peft report results/smollm2 --out results/smollm2/table.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import add_model_arguments, load  # noqa: E402
from _results import write_json  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import sadi_peft  # noqa: E402
from sadi_peft.harness import baselines  # noqa: E402
from sadi_peft.harness.generation import (  # noqa: E402
    encode_generation_item,
    evaluate_generation,
    generation_grid_search,
)
from sadi_peft.harness.search import encode_choice_item, grid_search  # noqa: E402
from sadi_peft.tasks import examples_digest, get_task, select_examples  # noqa: E402
from sadi_peft.tasks.protocols import mc2  # noqa: E402
from sadi_peft.zoo import MissingDependencyError  # noqa: E402

logger = logging.getLogger("reproduce")

TASKS = ["copa", "sst2", "boolq", "arc_easy", "arc_challenge", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande",
         "triviaqa"]
METHODS = [
    "none",
    *[f"sadi-{v}-{p}" for v in ("head", "neuron", "hidden") for p in ("last", "all")],
    "random-head", "fixed-head", "caa", "iti",
]
# the authors' grids (sadi-method.md section 4.4), cut to what a 2-core CPU run can afford; gain = 1 + delta
K_GRID = {"head": [1, 2, 4, 6, 8, 10], "neuron": [3, 10, 30, 100, 300], "hidden": [1, 2, 4, 8, 16]}
DELTA_GRID = [4.0, 9.0, 14.0, 24.0, 34.0]
# positions="all" has no prefix cache shared across points (every token is steered), so each point runs its prompts
# again (once per prompt, shared by its options, where an option is longer than one token): a 3 x 4 grid, with
# milder gains since every token of the prompt and answer is scaled
ALL_GRID = {"head": ([1, 4, 10], [0.5, 2.0, 4.0, 9.0]), "neuron": ([3, 30, 300], [0.5, 2.0, 4.0, 9.0]),
            "hidden": ([1, 4, 16], [0.5, 2.0, 4.0, 9.0])}
# CAA and ITI add their vector from the last prompt token on ("from_last": CAA's "after the instruction", ITI's
# answer-only scoring), which also lets their selection reuse the prompt prefix's KV cache
ADDITIVE_POSITIONS = "from_last"
CAA_ALPHAS = [-2.0, -1.0, 1.0, 2.0, 4.0, 8.0]
ITI_GRID = [(k, a) for k in (4, 16, 48) for a in (5.0, 15.0)]


def generative(task) -> bool:
    """Tasks scored by greedy generation + exact match (TriviaQA) rather than by choice log-likelihood."""
    return task.default_protocol == "generate"


def items_of(tokenizer, task, examples, max_new_tokens: int):
    if generative(task):
        return [encode_generation_item(tokenizer, e.prompt, e.answers or (e.gold,), max_new_tokens=max_new_tokens)
                for e in examples]
    return [encode_choice_item(tokenizer, e.prompt, e.choices, e.label) for e in examples]


def evaluate_test(args, task, model, tokenizer, test, prefix_cached: bool = False) -> dict:
    """The task's metric on the test examples, the model as it runs now (the one scoring of the test split):
    ``accuracy``, ``n``, ``per_example`` (each example's value of the metric, in test order, for paired comparisons
    between methods: ``sadi-peft report --paired``) and, for choice tasks, how often each option index was predicted
    and was gold (so that a method that only moves the model to always giving one answer shows as such), and each
    example's predicted option index (``predicted``, for analyses such as ``scripts/option_length.py``).

    ``prefix_cached``: each prompt's prefix runs once for all its options, under the intervention (same scores up to
    float rounding). Recorded as ``test_scoring``."""
    paired = {"examples_digest": examples_digest(test)}
    if generative(task):
        items = items_of(tokenizer, task, test, args.max_new_tokens)
        result = evaluate_generation(model, tokenizer, items, batch_size=args.batch_size)
        return {"accuracy": result["accuracy"], "n": result["n"],
                "empty_answers": sum(1 for p in result["predictions"] if not p),
                "per_example": [int(c) for c in result["correct"]], **paired}
    if prefix_cached:
        result = baselines.evaluate_items(model, tokenizer, test, batch_size=args.search_batch_size,
                                          prefix_cached=True)
    else:
        result = baselines.evaluate_items(model, tokenizer, test, batch_size=args.batch_size)
    width = result["scores"].shape[1]
    predicted = torch.bincount(result["scores"].argmax(-1), minlength=width).tolist()
    gold = torch.bincount(torch.tensor([e.label for e in test]), minlength=width).tolist()
    values = per_example_metric(task, test, result["scores"])
    return {"accuracy": sum(values) / len(values), "n": result["n"],
            "predicted_counts": predicted, "label_counts": gold, "predicted": result["scores"].argmax(-1).tolist(),
            "test_scoring": "prefix-cached" if prefix_cached else "full",
            "per_example": values if task.metric == "mc2" else [int(v) for v in values], **paired}


def per_example_metric(task, examples, scores: torch.Tensor) -> list[float]:
    """Each example's value of the task's metric from ``[n, options]`` choice scores: TruthfulQA MC2's probability
    mass on the true options for ``truthfulqa_mc2``, else 1.0 / 0.0 for a right / wrong argmax."""
    if task.metric == "mc2":
        return [mc2([float(x) for x in row[: len(ex.choices)]], ex.true_labels or (ex.label,))
                for ex, row in zip(examples, scores)]
    labels = torch.tensor([ex.label for ex in examples])
    return (scores.argmax(-1) == labels).double().tolist()


def task_metric(task, examples, scores: torch.Tensor) -> float:
    """The task's metric from ``[n, options]`` choice scores (``[seeds, n, options]``: mean over seeds): the mean of
    :func:`per_example_metric`. For a generative task the "scores" are the per-example exact-match outcomes
    (``[n]``, ``[seeds, n]``): their mean."""
    if generative(task):
        return float(scores.double().mean())
    if scores.dim() == 3:
        return sum(task_metric(task, examples, s) for s in scores) / scores.shape[0]
    values = per_example_metric(task, examples, scores)
    return sum(values) / len(values)


_CALIBRATION_CACHE: dict[tuple[str, str], tuple[list[torch.Tensor], dict]] = {}


def calibrated(args, task, model, tokenizer, pairs, variant: str, positions: str):
    """``model`` with a SADI adapter of ``variant`` / ``positions`` calibrated on ``pairs``. Calibration ignores the
    position regime and is deterministic, so its scores are computed once per (task, variant) in this process and
    copied into later adapters."""
    model = get_peft_model(model, sadi_peft.SADIConfig(variant=variant, top_k=1, positions=positions))
    layers = [layer for _, layer in sadi_peft.model.sadi_layers(model, "default")]
    key = (task.name, variant)
    if key not in _CALIBRATION_CACHE:
        sadi_peft.calibrate(model, tokenizer, pairs, batch_size=args.batch_size, show_progress=args.progress)
        _CALIBRATION_CACHE[key] = ([layer.sadi_scores["default"].clone() for layer in layers],
                                   dict(model.peft_config["default"].calibration or {}))
        return model
    scores, record = _CALIBRATION_CACHE[key]
    for layer, score in zip(layers, scores):
        layer.sadi_scores["default"].copy_(score)
    model.peft_config["default"].calibration = dict(record)
    sadi_peft.apply_top_k(model, 1)
    return model


def run_one(args, task, method: str, only_point: dict | None = None) -> dict:
    """Search ``method``'s grid on validation, score the chosen point on test: the result record.

    ``only_point`` (a result's ``chosen``): the grid is that one point, for re-scoring a stored result's test split
    without its search (``--add-per-example``)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    model, tokenizer = load(args)
    split_examples = {s: task.load(s, args.data_dir) for s in ("pairs", "validation", "test")}
    if args.limit:
        split_examples = {s: e[: args.limit] for s, e in split_examples.items()}
    available = {s: len(e) for s, e in split_examples.items()}
    pairs = task.pairs(select_examples(split_examples["pairs"], min(args.n_pairs, available["pairs"]), args.seed),
                       seed=args.seed)
    # seeded plain random subsamples (label proportions as in the split) where a split is larger than the cap
    validation = select_examples(split_examples["validation"], min(args.max_validation, available["validation"]),
                                 args.seed, balanced=False)
    test = select_examples(split_examples["test"], min(args.max_test, available["test"]), args.seed, balanced=False)
    record = {"task": task.name, "method": method, "split": "test", "model": "tiny-random" if args.tiny else args.model,
              "protocol": "generate" if generative(task) else "choice", "metric": task.metric, "seed": args.seed,
              "num_pairs": len(pairs), "n_validation": len(validation), "available": available,
              "torch_threads": torch.get_num_threads()}
    if generative(task):
        record["max_new_tokens"] = args.max_new_tokens
    validation_items = items_of(tokenizer, task, validation, args.max_new_tokens)

    if method == "none":
        record.update(evaluate_test(args, task, model, tokenizer, test, prefix_cached=args.prefix_cached_test),
                      chosen={})
    elif method.startswith("sadi-"):
        _, variant, positions = method.split("-")
        model = calibrated(args, task, model, tokenizer, pairs, variant, positions)
        units = sum(model.peft_config["default"].unit_counts.values())
        k_grid, delta_grid = (K_GRID[variant], DELTA_GRID) if positions == "last" else ALL_GRID[variant]
        grid = [(k, d) for k in k_grid if k <= units for d in delta_grid]
        if only_point is not None:
            grid = [(only_point["top_k"], only_point["delta"])]
        search = generation_grid_search if generative(task) else grid_search
        results = search(model, tokenizer, validation_items, grid, cached=(positions == "last"),
                         batch_size=args.search_batch_size, show_progress=args.progress)
        for r in results:
            r["metric"] = r["accuracy"] if generative(task) else task_metric(task, validation, r["scores"])
        best = max(results, key=lambda r: (r["metric"], -r["top_k"], -r["delta"]))
        sadi_peft.apply_top_k(model, best["top_k"])
        sadi_peft.set_delta(model, best["delta"])
        scored = evaluate_test(args, task, model, tokenizer, test,
                               prefix_cached=args.prefix_cached_test)
        if args.save_adapters:  # the chosen adapter, before the result file that vouches for it
            model.save_pretrained(args.out / task.name / f"{method}.adapter")
        if positions == "all":  # rows written before 2026-12-07 ran prompt + option in full for every option
            record["search_scoring"] = "shared-prefix"
        record.update(scored,
                      chosen={"top_k": best["top_k"], "delta": best["delta"]}, validation_accuracy=best["metric"],
                      grid=[{"top_k": r["top_k"], "delta": r["delta"], "accuracy": r["metric"]} for r in results])
    else:
        if method in ("random-head", "fixed-head"):
            if method == "random-head":  # the random mask ignores the calibration scores
                model = get_peft_model(model, sadi_peft.SADIConfig(variant="head", top_k=1, positions="last"))
            else:
                model = calibrated(args, task, model, tokenizer, pairs, "head", "last")
            units = sum(model.peft_config["default"].unit_counts.values())
            grid = [(k, d) for k in K_GRID["head"] if k <= units for d in DELTA_GRID]
            if method == "random-head":
                base = baselines.RandomMask(k=1, seed=args.seed)
            else:
                base = baselines.fit_fixed_steering(model, tokenizer, pairs, batch_size=args.batch_size,
                                                   show_progress=args.progress)
        elif method == "caa":
            base = baselines.fit_caa(model, tokenizer, pairs, batch_size=args.batch_size, positions=ADDITIVE_POSITIONS,
                                    show_progress=args.progress)
            n_layers = base.vectors.shape[0]
            layers = range(0, n_layers, max(1, n_layers // 10))  # every n_layers // 10-th layer: 10 of 30, all 18 of 18
            grid = [(layer, alpha) for layer in layers for alpha in CAA_ALPHAS]
        elif method == "iti":
            base = baselines.fit_iti(model, tokenizer, pairs, seed=args.seed, batch_size=args.batch_size,
                                     positions=ADDITIVE_POSITIONS, show_progress=args.progress)
            grid = [(k, a) for k, a in ITI_GRID if k <= len(base.ranking)]
        else:
            raise ValueError(f"unknown method {method!r}; known: {METHODS}")
        if only_point is not None:
            grid = [dict(only_point)]
        selection = base.select_on_validation(model, tokenizer, validation_items, grid, "validation",
                                              batch_size=args.search_batch_size, show_progress=args.progress)
        points = selection.results
        values = [task_metric(task, validation, r["scores"]) for r in points]
        best_index = values.index(max(values))  # first maximum, as the selection does for accuracy
        if task.metric == "mc2":  # the baseline configured at the best point of the task's own metric
            point = {k: v for k, v in points[best_index].items() if k not in ("accuracy", "n", "scores")}
            selection = base.select_on_validation(model, tokenizer, validation_items[:1], [point], "validation",
                                                  batch_size=args.batch_size)
        with selection.baseline.apply(model):
            scored = evaluate_test(args, task, model, tokenizer, test, prefix_cached=args.prefix_cached_test)
        grid_rows = [{k: v for k, v in r.items() if k not in ("scores", "accuracy")} | {"accuracy": value}
                     for r, value in zip(points, values)]
        record.update(scored, chosen=selection.best,
                      validation_accuracy=values[best_index], grid=grid_rows)
    record["wall_seconds"] = time.perf_counter() - started
    record["cpu_seconds"] = time.process_time() - cpu_started  # the steadier clock on a shared machine
    return record


def add_per_example(args, task, method: str, path: Path) -> bool:
    """Give the stored result at ``path`` its ``per_example`` values, and for a choice task each example's predicted
    option (``predicted``) and the answer counts where it predates them, by scoring its chosen point on the test
    split again; False (the file untouched) when the rescoring does not reproduce the stored metric or the stored
    per-example values."""
    if not path.exists():
        logger.info("skip %s (no result)", path)
        return True
    stored = json.loads(path.read_text(encoding="utf-8"))
    if "per_example" in stored and ("predicted" in stored or generative(task)):
        logger.info("skip %s (has per-example values)", path)
        return True
    logger.info("rescore %s / %s at %s", task.name, method, stored.get("chosen"))
    started = time.perf_counter()
    # the stored row's own test scoring (rows without the field ran full passes); its adapter is already saved
    same = argparse.Namespace(**{**vars(args), "save_adapters": False,
                                 "prefix_cached_test": stored.get("test_scoring") == "prefix-cached"})
    record = run_one(same, task, method, only_point=stored.get("chosen") or None)
    if abs(record["accuracy"] - stored["accuracy"]) > 1e-6 or record["n"] != stored["n"]:
        logger.error("%s: rescored %.6f (n=%d) differs from the stored %.6f (n=%d); file left as it is", path,
                     record["accuracy"], record["n"], stored["accuracy"], stored["n"])
        return False
    if "per_example" in stored and (record["examples_digest"] != stored.get("examples_digest") or any(
            abs(a - b) > 1e-6 for a, b in zip(record["per_example"], stored["per_example"]))):
        logger.error("%s: rescored per-example values differ from the stored ones; file left as it is", path)
        return False
    added = sorted(k for k in ("per_example", "predicted") if k in record and k not in stored)
    # rows older than these fields get them too
    for key in ("predicted_counts", "label_counts", "predicted", "empty_answers"):
        if key in record and key not in stored:
            stored[key] = record[key]
    # one entry per rescoring, so a later one (e.g. adding predictions) keeps the record of the earlier one
    earlier = stored.get("per_example_added") or []
    history = [earlier] if isinstance(earlier, dict) else list(earlier)
    history.append({"wall_seconds": time.perf_counter() - started, "test_scoring": record.get("test_scoring"),
                    "added": added})
    stored.update(per_example=record["per_example"], examples_digest=record["examples_digest"],
                  per_example_added=history)
    write_json(path, stored)
    logger.info("%s: per-example values added (metric %.4f reproduced)", path, record["accuracy"])
    return True


def _stored_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def stored_cost(path: Path) -> float | None:
    """CPU seconds a stored result took (wall seconds for a row that has no CPU time), or None. CPU time first,
    because wall times on shared cores depend on what else ran beside the job."""
    record = _stored_record(path)
    cost = record and (record.get("cpu_seconds") or record.get("wall_seconds"))
    return float(cost) if cost else None


def _upper_median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _is_generative(task_name: str) -> bool:
    try:
        return generative(get_task(task_name))
    except KeyError:  # a folder that is not a registered task
        return False


def _grid_size(path: Path) -> int | None:
    grid = (_stored_record(path) or {}).get("grid")
    return len(grid) if isinstance(grid, list) and grid else None


def _model_of(folder: Path) -> str:
    """The model a results folder belongs to: ``results/smollm2-seed1`` holds the same model as ``results/smollm2``."""
    return folder.name.split("-seed")[0]


def _other_models_ratio(out: Path, task: str, method: str) -> tuple[float | None, str]:
    """Ratio method / none of the same task in other models' folders beside ``out`` (median), each scaled by this
    model's grid size for the method (from any of its rows) over that row's."""
    sizes = [size for path in sorted(out.glob(f"*/{method}.json")) if (size := _grid_size(path))]
    here = _upper_median(sizes) if sizes else None
    ratios, sources = [], []
    for folder in sorted(out.parent.glob("*/")):
        if _model_of(folder) == _model_of(out):
            continue
        row = folder / task / f"{method}.json"
        cost, none, there = stored_cost(row), stored_cost(folder / task / "none.json"), _grid_size(row)
        if cost is None or not none:
            continue
        scale = here / there if here and there else 1.0
        ratios.append(cost / none * scale)
        sources.append(folder.name + (f" x {scale:.2f} for {here} grid points against {there}" if scale != 1.0 else ""))
    if not ratios:
        return None, ""
    ratio = _upper_median(ratios)
    return ratio, f"{task}/none x {ratio:.1f} ({method}/none on {task} in {'; '.join(sources)})"


def estimate_cost(out: Path, task: str, method: str) -> tuple[float | None, str]:
    """Estimated CPU seconds of the missing cell (task, method) of ``out`` and what the estimate rests on.

    First choice: the same cell in a sibling folder of the same model (``<out>-seed1`` for ``<out>``, and the
    other way round). Otherwise the task's ``none`` row in ``out`` times the median ratio method / none over the
    tasks of ``out`` that have both, times the task's own factor: the median, over the other methods already run
    on the task, of how much their ratio to ``none`` there exceeds their median ratio (TruthfulQA's searches cost
    more per ``none`` than other tasks'; without rows on the task the factor is 1). Otherwise unknown.

    Between the two, for a ``sadi-*-all`` cell: the median cost of the task's other ``sadi-*-all`` rows searched
    with the shared prompt (``"search_scoring": "shared-prefix"``, from 2026-12-07; the three variants search grids
    of one size). The ratios to ``none`` come mostly from older rows that ran prompt + option in full for every
    option, several times the cost on tasks with long options (TruthfulQA: 63 CPU minutes measured against 192
    estimated that way).

    Ratios come from tasks of the task's kind: a generative task's search (greedy generation at every grid point)
    costs several times more per ``none`` row than a choice task's. Where ``out`` has no row of the method on a
    generative task, the same cell of another model's folder gives the ratio, scaled by the two rows' grid sizes
    (CAA searches every layer of an 18-layer model, 108 points, against 60 on a 30-layer one)."""
    siblings = [d for d in sorted(out.parent.glob(f"{_model_of(out)}*")) if d != out and _model_of(d) == _model_of(out)]
    for sibling in siblings:
        cost = stored_cost(sibling / task / f"{method}.json")
        if cost is not None:
            return cost, f"same cell in {sibling}"
    if method.startswith("sadi-") and method.endswith("-all"):
        peers = [cost for path in sorted((out / task).glob("sadi-*-all.json"))
                 if path.stem != method and (_stored_record(path) or {}).get("search_scoring") == "shared-prefix"
                 and (cost := stored_cost(path)) is not None]
        if peers:
            rows = f"{len(peers)} row{'s' if len(peers) > 1 else ''}"
            return _upper_median(peers), f"{task}'s sadi-*-all rows searched with the shared prompt ({rows})"
    base = stored_cost(out / task / "none.json")
    kind = _is_generative(task)
    folders = [folder for folder in sorted(out.glob("*/")) if _is_generative(folder.name) == kind]

    def median_ratio(name: str) -> tuple[float | None, int]:
        ratios = []
        for folder in folders:
            cost, none = stored_cost(folder / f"{name}.json"), stored_cost(folder / "none.json")
            if cost is not None and none:
                ratios.append(cost / none)
        return (_upper_median(ratios) if ratios else None), len(ratios)

    ratio, count = median_ratio(method)
    from_other_models = ratio is None and kind
    if from_other_models:
        ratio, basis = _other_models_ratio(out, task, method)
    if base is None or ratio is None:
        return None, "no comparable row"
    if not from_other_models:
        basis = f"{task}/none x {ratio:.1f} (median {method}/none over {count} tasks)"
    factor_of = "this model's factor against them" if from_other_models else "this task's factor"

    def typical_ratio(name: str) -> float | None:
        return (_other_models_ratio(out, task, name) if from_other_models else median_ratio(name))[0]

    factors = []
    for path in sorted((out / task).glob("*.json")):
        other = path.stem
        if other in ("none", method) or path.name.endswith(".error.json"):
            continue
        cost, typical = stored_cost(path), typical_ratio(other)
        if cost is not None and typical:
            factors.append(cost / base / typical)
    if not factors:
        return base * ratio, basis
    factor = _upper_median(factors)
    rows = f"{len(factors)} row{'s' if len(factors) > 1 else ''}"
    return base * ratio * factor, f"{basis} x {factor:.2f} ({factor_of} over {rows})"


def plan(args) -> int:
    """Print the cells a run with these arguments would compute, with their estimated cost; compute nothing."""
    total, unknown, rows = 0.0, 0, []
    for task_name in args.tasks.split(","):
        name = get_task(task_name).name
        for method in args.methods.split(","):
            if (args.out / name / f"{method}.json").exists():
                continue
            cost, basis = estimate_cost(args.out, name, method)
            rows.append(f"| {name} | {method} | {'?' if cost is None else f'{cost / 60:.0f}'} | {basis} |")
            if cost is None:
                unknown += 1
            else:
                total += cost
    print(f"{len(rows)} missing cells in {args.out}" + ("" if not rows else ":\n| task | method | CPU minutes | "
          "estimated from |\n|---|---|---|---|\n" + "\n".join(rows)))
    if rows:
        print(f"In all about {total / 3600:.1f} CPU hours" + (f", plus {unknown} cells with no estimate" if unknown
                                                              else "") + ".")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--data-dir", default=None, help="task data folder (default: $SADI_DATA_DIR, ../shared/data)")
    parser.add_argument("--n-pairs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per calibration forward; sequences per "
                        "scoring forward")
    parser.add_argument("--search-batch-size", type=int, default=64,
                        help="examples per batch of the validation searches and of the prefix-cached test scoring "
                        "(a prefix-cached search amortises the weight reads of its one-token forwards over the "
                        "batch; benchmarks/README.md section 7)")
    parser.add_argument("--max-validation", type=int, default=200,
                        help="seeded random subsample of the validation split used for selection (default 200)")
    parser.add_argument("--max-test", type=int, default=500,
                        help="seeded random subsample of the test split that is scored (default 500)")
    parser.add_argument("--max-new-tokens", type=int, default=16,
                        help="greedy tokens per answer on generative tasks (TriviaQA), in selection and test alike")
    parser.add_argument("--full-test-passes", dest="prefix_cached_test", action="store_false",
                        help="score the test split with prompt + option in full for every option (the scorer of "
                             "rows written before 2026-12-05) instead of one prompt-prefix KV cache per item shared "
                             "by its options (the default; the prefix runs under the intervention, so this holds for "
                             "every method, positions='all' included, from 2026-12-07 on; same scores up to float "
                             "rounding, several times faster on TruthfulQA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-save-adapters", dest="save_adapters", action="store_false",
                        help="do not save the chosen SADI adapters (default: <out>/<task>/<method>.adapter/)")
    parser.add_argument("--limit", type=int, default=None, help="cap every split (smoke runs only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars for calibration, fits and validation searches (default: on when stderr "
                             "is a terminal, off in a log file)")
    parser.add_argument("--add-per-example", action="store_true",
                        help="instead of running missing results, add the per-example test values (for `sadi-peft "
                             "report --paired`) and, for choice tasks, each example's predicted option (for "
                             "scripts/option_length.py) to present result files that lack them: the stored chosen "
                             "point is scored again on the test split (no search) and written only if it reproduces "
                             "the stored test metric and any stored per-example values")
    parser.add_argument("--plan", action="store_true",
                        help="list the missing cells this run would compute, with their cost estimated from the "
                             "stored rows (CPU minutes), and exit without loading a model")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    if args.plan:
        return plan(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    failures = 0
    for task_name in args.tasks.split(","):
        task = get_task(task_name)
        for method in args.methods.split(","):
            path = args.out / task.name / f"{method}.json"
            if args.add_per_example:
                failures += not add_per_example(args, task, method, path)
                continue
            if path.exists():
                logger.info("skip %s (present)", path)
                continue
            logger.info("run %s / %s", task.name, method)
            try:
                record = run_one(args, task, method)
            except MissingDependencyError:  # the set-up, not this row: stop, and leave no .error.json behind
                raise
            except Exception as error:  # record the failure, go on with the rest
                failures += 1
                logger.exception("%s / %s failed", task.name, method)
                write_json(args.out / task.name / f"{method}.error.json", {"task": task.name, "method": method,
                                                                          "error": repr(error)})
                continue
            write_json(path, record)
            (args.out / task.name / f"{method}.error.json").unlink(missing_ok=True)  # an earlier failure, now fixed
            logger.info("%s / %s: test accuracy %.4f (n=%d) in %.0f s", task.name, method, record["accuracy"],
                        record["n"], record["wall_seconds"])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
