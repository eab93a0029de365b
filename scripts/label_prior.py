#!/usr/bin/env python
"""Is a method's gain more than a shift of the model's answer prior? A control that leaves the model unchanged.

Many of the published gains come with a change in how often the model gives each answer (BoolQ's "No" turning
into "Yes" everywhere, SST-2's "Positive" share moving). The cheapest way to move that share is not to steer the
model at all but to add a fixed bias per answer option to its choice scores. This script fits that control on
the validation split, with the same validation-only selection as every method in the table, and scores it on the
same test examples as the stored rows:

- score every validation and test example with the unsteered model (the ``none`` row's scoring, checked to give
  the stored ``none`` accuracy on test);
- the bias is ``λ · c``, where ``c`` is each option's mean validation score minus the mean over options (so
  ``λ = 1`` removes the average preference for an option), and the corrected choice is ``argmax(score − λ · c)``;
- ``λ`` is chosen on validation from ``--lambdas`` (the first best, so a tie keeps less correction; ``λ = 0`` is
  the unsteered model);
- every stored row of the task is compared with the control on the same test examples (difference, paired
  bootstrap 95 % interval, exact McNemar p).

A steering method whose gain does not exceed this control's moved the answer prior and no more. Only tasks whose
options are the same strings in every example (labels or letters) have a per-option prior; TruthfulQA (each
question's own answers) and generative tasks are refused.

Results go to ``<results>/label_prior.json`` (one entry per task, written atomically; tasks already there are
skipped unless ``--force``) and the tables to ``--out``.

    python scripts/label_prior.py results/gemma3-270m --tasks sst2,boolq --out results/gemma3-270m/label_prior.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _common import load  # noqa: E402
from _results import emit, load_rows, paired, write_json  # noqa: E402
import torch  # noqa: E402

from sadi_peft.cli.report import METHOD_ORDER  # noqa: E402
from sadi_peft.harness import baselines  # noqa: E402
from sadi_peft.tasks import examples_digest, get_task, select_examples  # noqa: E402
from sadi_peft.zoo import DEFAULT_MODEL, MissingDependencyError  # noqa: E402

logger = logging.getLogger("label_prior")

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
RESULT_FILE = "label_prior.json"


class ControlError(ValueError):
    """The control cannot be fitted for a task: no stored ``none`` row, options that differ between examples, or
    test examples / scores that do not match the stored rows."""


def option_bias(scores: torch.Tensor) -> torch.Tensor:
    """``c``: each option's mean score over the examples minus the mean over options (``[n, options]`` → ``[options]``)."""
    means = scores.double().mean(0)
    return means - means.mean()


def choose_lambda(scores: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor,
                  lambdas: Sequence[float] = LAMBDAS) -> tuple[float, list[dict]]:
    """The first ``λ`` of ``lambdas`` with the best accuracy of ``argmax(scores − λ · bias)`` (validation), and the
    grid ``[{"lambda", "accuracy"}]``."""
    if not lambdas:
        raise ValueError("no λ to choose from: pass at least one value, e.g. --lambdas 0,0.5,1")
    grid = [{"lambda": float(lam), "accuracy": float((corrected(scores, bias, lam) == labels).double().mean())}
            for lam in lambdas]
    best = max(grid, key=lambda point: point["accuracy"])  # max keeps the first of equal values
    return best["lambda"], grid


def corrected(scores: torch.Tensor, bias: torch.Tensor, lam: float) -> torch.Tensor:
    """The option picked per example once ``λ · bias`` is taken off the scores."""
    return (scores.double() - lam * bias).argmax(-1)


def rebuild_splits(task, reference: dict, data_dir: str | None):
    """The validation and test examples ``scripts/reproduce.py`` scored for ``reference`` (a stored row): the same
    split caps (``available``), seed and sizes; the test fingerprint is checked against the row's."""
    available = reference.get("available", {})
    splits = {}
    for split, n in (("validation", reference["n_validation"]), ("test", reference["n"])):
        examples = task.load(split, data_dir)
        examples = examples[: available.get(split, len(examples))]
        splits[split] = select_examples(examples, n, reference["seed"], balanced=False)
    if examples_digest(splits["test"]) != reference["examples_digest"]:
        raise ControlError(f"{task.name}: the test subsample rebuilt from {data_dir or 'the default data folder'} "
                           f"has digest {examples_digest(splits['test'])}, the stored rows "
                           f"{reference['examples_digest']}; pass the data folder they were scored on with --data-dir")
    return splits["validation"], splits["test"]


def fit_task(task_name: str, folder: Path, model, tokenizer, args) -> dict:
    """The control for one task: chosen ``λ``, its validation grid, its test values and the paired comparisons."""
    task = get_task(task_name)
    if task.default_protocol != "choice" or task.metric != "accuracy":
        raise ControlError(f"{task_name}: scored by {task.metric} / {task.default_protocol}; the label-prior control "
                           "needs a choice task scored by accuracy")
    rows = load_rows(folder / task_name)
    if "none" not in rows:
        raise ControlError(f"{folder / task_name} has no `none` row with per-example values; run "
                           f"scripts/reproduce.py --tasks {task_name} --methods none first")
    reference = rows["none"]
    validation, test = rebuild_splits(task, reference, args.data_dir)
    option_sets = {tuple(e.choices) for e in (*validation, *test)}
    if len(option_sets) != 1:
        raise ControlError(f"{task_name}: the options differ between examples ({len(option_sets)} different sets), so "
                           "there is no per-option prior to correct; the control applies to label and letter tasks")
    started = time.perf_counter()
    prefix_cached = reference.get("test_scoring") == "prefix-cached"  # rows without the field ran full passes
    scores = {}
    for name, examples in (("validation", validation), ("test", test)):
        result = baselines.evaluate_items(model, tokenizer, examples, batch_size=args.batch_size,
                                          prefix_cached=prefix_cached)
        scores[name] = result["scores"]
    labels = {name: torch.tensor([e.label for e in examples]) for name, examples in
              (("validation", validation), ("test", test))}
    unsteered = (scores["test"].argmax(-1) == labels["test"]).int().tolist()
    if unsteered != [int(v) for v in reference["per_example"]]:
        differing = sum(a != b for a, b in zip(unsteered, reference["per_example"]))
        raise ControlError(f"{task_name}: the unsteered model scored now differs from the stored `none` row on "
                           f"{differing} of {len(test)} test examples (another model or data?); nothing written")
    bias = option_bias(scores["validation"])
    lam, grid = choose_lambda(scores["validation"], labels["validation"], bias, args.lambdas)
    picked = corrected(scores["test"], bias, lam)
    values = (picked == labels["test"]).int().tolist()
    width = scores["test"].shape[1]
    entry = {
        "task": task_name, "model": reference["model"], "seed": reference["seed"], "n": len(test),
        "n_validation": len(validation), "examples_digest": reference["examples_digest"],
        "options": list(next(iter(option_sets))), "bias": [float(x) for x in bias], "lambda": lam, "grid": grid,
        "validation_accuracy": next(p["accuracy"] for p in grid if p["lambda"] == lam),
        "accuracy": sum(values) / len(values), "per_example": values, "predicted": picked.tolist(),
        "predicted_counts": torch.bincount(picked, minlength=width).tolist(),
        "label_counts": torch.bincount(labels["test"], minlength=width).tolist(),
        "test_scoring": "prefix-cached" if prefix_cached else "full",
        "wall_seconds": time.perf_counter() - started,
    }
    return entry


def against_control(entry: dict, folder: Path) -> dict[str, dict]:
    """Every stored row of ``entry``'s task in ``folder`` (as it is now, so rows added after the fit count) against
    the control on the same test examples: its accuracy, answer counts and :func:`paired` comparison."""
    rows = load_rows(folder / entry["task"])
    same = {m: r for m, r in rows.items() if r.get("examples_digest") == entry["examples_digest"]}
    order = sorted(same, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    return {m: {"accuracy": same[m]["accuracy"], "predicted_counts": same[m].get("predicted_counts"),
                **paired(same[m]["per_example"], entry["per_example"])} for m in order}


def render(entries: dict[str, dict], folder: Path, name: str | None = None) -> str:
    """Markdown: per task, the control beside every stored row of ``folder`` (difference from the control on the same
    examples); ``name``: how the heading names the folder (default: its path)."""
    lines = [f"Label-prior control for `{name or folder.as_posix()}`: a per-option bias on the unsteered model's choice "
             "scores, its size (λ) chosen on validation; each stored row against it on the same test examples.", ""]
    for task, e in sorted(entries.items()):
        lines += [f"**{task}**: options {' / '.join(e['options'])}; test answers {e['label_counts']} (n={e['n']}). "
                  f"Chosen λ = {e['lambda']:g} (validation {100 * e['validation_accuracy']:.1f} on "
                  f"{e['n_validation']}; bias per option {', '.join(f'{x:+.3f}' for x in e['bias'])}).", "",
                  "| row | test acc. | answers given | difference from the control | 95 % interval | "
                  "only row / only control | McNemar p |",
                  "|---|---|---|---|---|---|---|",
                  f"| **label-prior control** (λ = {e['lambda']:g}) | {100 * e['accuracy']:.1f} | "
                  f"{e['predicted_counts']} | – | – | – | – |"]
        for method, c in against_control(e, folder).items():
            low, high = c["interval"]
            lines.append(f"| {method} | {100 * c['accuracy']:.1f} | {c['predicted_counts'] or '–'} | "
                         f"{100 * c['difference']:+.1f} | [{100 * low:+.1f}, {100 * high:+.1f}] | "
                         f"{c['only_first']} / {c['only_second']} | {c['mcnemar_p']:.2g} |")
        lines.append("")
    return "\n".join(lines)


def parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lambdas {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--lambdas {text!r}: expected one or more numbers ≥ 0, e.g. 0,0.5,1")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a model's results folder (e.g. results/gemma3-270m)")
    parser.add_argument("--tasks", required=True, help="choice tasks with fixed options, comma-separated, e.g. sst2,boolq")
    parser.add_argument("--lambdas", type=parse_lambdas, default=list(LAMBDAS),
                        help=f"the λ grid chosen from on validation (default {','.join(f'{x:g}' for x in LAMBDAS)})")
    parser.add_argument("--data-dir", default=None, help="task data folder (default: $SADI_DATA_DIR, ../shared/data)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="the rows were scored with reproduce.py --tiny")
    parser.add_argument("--force", action="store_true", help="fit again tasks already in label_prior.json")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.folder / RESULT_FILE
    entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    todo = [t for t in tasks if args.force or t not in entries]
    loaded = None
    try:
        for task in todo:
            if loaded is None:
                models = {r["model"] for t in todo for r in load_rows(args.folder / t).values()}
                if len(models) != 1:
                    raise ControlError(f"the rows of {todo} name {sorted(models) or 'no'} model(s); expected one")
                model_name = next(iter(models))
                if (model_name == "tiny-random") != args.tiny:
                    raise ControlError(f"the rows were scored with model {model_name!r}: "
                                       + ("pass --tiny" if model_name == "tiny-random" else "leave out --tiny"))
                loaded = load(argparse.Namespace(model=DEFAULT_MODEL if args.tiny else model_name,
                                                 tiny=args.tiny))
            logger.info("fit the label-prior control on %s", task)
            entries[task] = fit_task(task, args.folder, *loaded, args)
            write_json(path, entries)  # after each task, so a stopped run keeps what it finished
            logger.info("%s: λ = %g, test accuracy %.4f", task, entries[task]["lambda"], entries[task]["accuracy"])
    except (ControlError, KeyError, FileNotFoundError, MissingDependencyError) as error:
        logger.error("%s", error.args[0] if error.args else error)
        return 2
    text = render({t: entries[t] for t in tasks if t in entries}, args.folder)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
