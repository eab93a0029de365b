"""The sadi-peft command: fit, search, eval, report, plot end to end on SmolLM2 at small sizes; exit codes."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "sadi_peft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_help_lists_every_command(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("fit", "search", "eval", "report", "plot", "push", "lm-eval"):
        assert command in result.stdout


@pytest.mark.parametrize("args, message", [
    (["fit", "--pairs", "missing.jsonl", "--out", "a"], "missing.jsonl: no such file"),
    (["fit", "--task", "sst2", "--top-k", "0", "--out", "a"], "SADIConfig.top_k=0 is invalid"),
    (["search", "--task", "sst2", "--k-grid", "x", "--out", "a"], "not a comma-separated list of int"),
    (["eval", "--task", "no-such-task", "--out", "r.json"], "no-such-task"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


@pytest.mark.slow
def test_fit_search_eval_report_plot(tmp_path, smollm2_path, data_dir):
    common = ["--data-dir", str(data_dir), "--no-progress"]
    fit = cli("fit", "--task", "sst2", "--n-pairs", "8", "--out", "fitted", *common, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (tmp_path / "fitted" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "fitted" / "fit.json").read_text())["num_pairs"] == 8

    search = cli("search", "--task", "sst2", "--n-pairs", "8", "--limit", "6", "--k-grid", "1,2",
                 "--delta-grid", "2,9", "--out", "searched", *common, cwd=tmp_path)
    assert search.returncode == 0, search.stderr[-3000:]
    grid = json.loads((tmp_path / "searched" / "grid.json").read_text())
    assert grid["selection_split"] == "validation" and grid["cached"] and len(grid["grid"]) == 4
    assert (tmp_path / "searched" / "heatmap.png").stat().st_size > 0
    assert grid["best"]["accuracy"] == max(g["accuracy"] for g in grid["grid"])

    for name, extra in (("none", []), ("sadi", ["--adapter", str(tmp_path / "searched" / "adapter")])):
        result = cli("eval", "--task", "sst2", "--split", "test", "--limit", "6", "--out", f"results/{name}.json",
                     *extra, *common, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "results" / "sadi.json").read_text())
    assert payload["method"] == "sadi-head-last" and payload["n"] == 6 and 0 <= payload["accuracy"] <= 1

    assert len(payload["per_example"]) == 6 and sum(payload["per_example"]) / 6 == pytest.approx(payload["accuracy"])

    report = cli("report", "results", "--paired", "none", cwd=tmp_path)
    assert report.returncode == 0 and "| none |" in report.stdout and "| sadi-head-last |" in report.stdout
    assert "| sst2 | sadi-head-last | 6 |" in report.stdout  # same examples: compared pairwise

    plot = cli("plot", "fitted", cwd=tmp_path)
    assert plot.returncode == 0 and (tmp_path / "fitted" / "scores.png").stat().st_size > 0


def test_report_flags_partial_averages_and_lists_the_chosen_hyperparameters(tmp_path):
    from sadi_peft.cli import report

    def result(task, method, accuracy, **extra):
        path = tmp_path / task / f"{method}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"task": task, "method": method, "split": "test", "accuracy": accuracy, "n": 4,
                                    **extra}))

    result("copa", "none", 0.5)
    result("sst2", "none", 0.75)
    result("copa", "sadi-head-last", 1.0, chosen={"top_k": 2, "delta": 9.0}, validation_accuracy=0.5, cpu_seconds=3.2,
           predicted_counts=[1, 3], label_counts=[1, 3])
    (tmp_path / "copa" / "grid.json").write_text("[]")  # not a result: ignored
    table = report.collect([tmp_path], "test")
    text = report.markdown(table)
    assert "| method | copa | sst2 | average | average of copa (every row) |" in text
    assert "| none | 50.00 (n=4) | 75.00 (n=4) | 62.50 | 50.00 |" in text
    assert "| sadi-head-last | 100.00 (n=4) | – | 100.00 (1 of 2 tasks) | 100.00 |" in text
    assert text.index("| none |") < text.index("| sadi-head-last |")
    assert "| copa | sadi-head-last | top_k=2, delta=9 | 50.00 |" in report.details(table)
    assert "| 4 | 1 (1) / 3 (3) | 3 |" in report.details(table)
    result("sst2", "sadi-head-last", 0.25)  # complete: no extra column
    text = report.markdown(report.collect([tmp_path], "test"))
    assert "every row" not in text and "| sadi-head-last | 100.00 (n=4) | 25.00 (n=4) | 62.50 |" in text


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_means():
    """The shared resample counts give what indexing the values with each resample's draws gives: exactly for 0/1
    differences, to float rounding for fractional ones (MC2)."""
    import torch

    from sadi_peft.cli.report import bootstrap_interval

    def direct(values, resamples=2_000, seed=3):
        v = torch.tensor(values, dtype=torch.float64)
        draws = torch.randint(len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed))
        return torch.quantile(v[draws].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()

    generator = torch.Generator().manual_seed(0)
    binary = (torch.randint(3, (97,), generator=generator) - 1).tolist()  # differences of 0/1 values
    fractional = (torch.rand(97, generator=generator) - 0.4).tolist()
    assert list(bootstrap_interval(binary, resamples=2_000, seed=3)) == direct(binary)
    assert bootstrap_interval(fractional, resamples=2_000, seed=3) == pytest.approx(direct(fractional), abs=1e-12)
    low, high = bootstrap_interval(fractional, resamples=2_000, seed=3)
    assert low < sum(fractional) / len(fractional) < high


def test_report_paired_compares_methods_on_the_same_examples(tmp_path):
    from sadi_peft.cli import report

    def result(task, method, values, digest="d1"):
        path = tmp_path / task / f"{method}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"task": task, "method": method, "split": "test", "n": len(values),
                                    "accuracy": sum(values) / len(values), "per_example": values,
                                    "examples_digest": digest}))

    # 40 examples: the method is right on 12 the reference gets wrong, wrong on 2 it gets right
    reference = [0] * 20 + [1] * 20
    method = [1] * 12 + [0] * 8 + [1] * 18 + [0] * 2
    result("sst2", "none", reference)
    result("sst2", "sadi-head-last", method)
    result("sst2", "caa", reference)  # identical answers
    result("sst2", "iti", method, digest="other test set")  # not the same examples: never paired
    result("truthfulqa_mc2", "none", [0.5, 0.25, 0.75, 0.5])
    result("truthfulqa_mc2", "sadi-head-last", [0.75, 0.25, 0.5, 1.0])
    result("copa", "none", [1, 0])  # stored before per-example values: no reference values
    (tmp_path / "copa" / "none.json").write_text(json.dumps({"task": "copa", "method": "none", "split": "test",
                                                              "n": 2, "accuracy": 0.5}))
    result("copa", "caa", [1, 1])
    text = report.paired(report.collect([tmp_path], "test"), "none")
    expected_p = 2 * sum(math.comb(14, i) for i in range(3)) / 2**14  # exact binomial tail, 14 discordant
    assert f"| sst2 | sadi-head-last | 40 | 50.00 | 75.00 | +25.00 | " in text
    # two methods compared on sst2: Holm doubles the smaller p, and caa's p = 1 stays 1
    assert f"| 12 / 2 | {expected_p:.3g} | {2 * expected_p:.3g} |" in text and 0.004 < expected_p < 0.02
    row = next(line for line in text.splitlines() if line.startswith("| sst2 | sadi-head-last"))
    low, high = (float(x) for x in row.split("| [")[1].split("]")[0].split(", "))
    assert 0 < low < 25 < high  # the interval holds the observed difference and excludes 0 here
    assert "| sst2 | caa | 40 | 50.00 | 50.00 | +0.00 | [+0.00, +0.00] | 0 / 0 | 1 | 1 |" in text
    assert "| truthfulqa_mc2 | sadi-head-last | 4 | 50.00 | 62.50 | +12.50 |" in text and "| – | – | – |" in text
    assert "Not compared (2;" in text and "sst2: iti" in text and "copa: caa" in text
    assert report.mcnemar_p(5, 5) == 1.0 and report.mcnemar_p(0, 0) == 1.0
    assert report.mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # step-down, kept monotone
    assert report.holm([0.5, 0.9]) == [1.0, 1.0] and report.holm([]) == []
    with pytest.raises(ValueError, match="no results of that method"):
        report.paired(report.collect([tmp_path], "test"), "random-head")
    out = tmp_path / "table.md"  # several references: one table each
    args = argparse.Namespace(paths=[tmp_path], split="test", details=False, paired="none,sadi-head-last", out=out)
    assert report.run(args) == 0
    text = out.read_text()
    assert "against `none`" in text and "against `sadi-head-last`" in text
    assert "| sst2 | none | 40 | 75.00 | 50.00 | -25.00 |" in text


@pytest.mark.slow
def test_search_scores_the_tasks_own_metric(tmp_path, smollm2_path, data_dir):
    """TriviaQA is searched by greedy-generation exact match (a single gold "choice" would score 100 % everywhere),
    TruthfulQA MC2 by MC2; the unsteered validation value equals what `eval` reports on the same examples."""
    common = ["--data-dir", str(data_dir), "--no-progress", "--n-pairs", "4", "--k-grid", "1", "--delta-grid", "2,9"]
    trivia = cli("search", "--task", "triviaqa", "--limit", "4", "--max-new-tokens", "4", "--out", "tq", *common,
                 cwd=tmp_path)
    assert trivia.returncode == 0, trivia.stderr[-3000:]
    grid = json.loads((tmp_path / "tq" / "grid.json").read_text())
    assert grid["protocol"] == "generate" and grid["metric"] == "exact_match" and len(grid["grid"]) == 2
    assert all(g["accuracy"] * 4 == int(g["accuracy"] * 4) and g["accuracy"] < 1 for g in grid["grid"])

    mc2 = cli("search", "--task", "truthfulqa_mc2", "--limit", "3", "--out", "mc2", *common, cwd=tmp_path)
    assert mc2.returncode == 0, mc2.stderr[-3000:]
    grid = json.loads((tmp_path / "mc2" / "grid.json").read_text())
    assert grid["protocol"] == "choice" and grid["metric"] == "mc2"
    evaluated = cli("eval", "--task", "truthfulqa_mc2", "--split", "validation", "--limit", "3", "--out", "e.json",
                    "--data-dir", str(data_dir), "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    reference = json.loads((tmp_path / "e.json").read_text())["accuracy"]
    assert grid["baseline_accuracy"] == pytest.approx(reference, abs=1e-5)
    assert 0 < reference < 1
