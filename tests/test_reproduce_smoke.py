"""The results script runs end to end at smoke size, writes one JSON per (task, method), and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_reproduce_smoke_and_resume(tmp_path, smollm2_path, data_dir):
    args = [str(REPO / "scripts" / "reproduce.py"), "--tiny", "--tasks", "copa", "--methods",
            "none,sadi-head-last,random-head,caa", "--limit", "6", "--n-pairs", "6", "--data-dir", str(data_dir),
            "--out", "results"]
    stale = tmp_path / "results" / "copa" / "caa.error.json"  # a failure of an earlier run, fixed since
    stale.parent.mkdir(parents=True)
    stale.write_text('{"error": "MemoryError()"}')
    first = run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "SADI calibration" not in first.stderr and "grid search" not in first.stderr  # no bars in a log file
    files = sorted(p.name for p in (tmp_path / "results" / "copa").glob("*.json"))
    assert files == ["caa.json", "none.json", "random-head.json", "sadi-head-last.json"]
    record = json.loads((tmp_path / "results" / "copa" / "sadi-head-last.json").read_text())
    assert record["split"] == "test" and record["n"] == 6 and "top_k" in record["chosen"]
    assert sum(record["predicted_counts"]) == 6 and sum(record["label_counts"]) == 6
    assert record["test_scoring"] == "prefix-cached"
    # each example's predicted option index, whose counts are predicted_counts
    assert len(record["predicted"]) == 6
    assert [record["predicted"].count(i) for i in range(2)] == record["predicted_counts"]
    second = run(*args, cwd=tmp_path)
    assert second.returncode == 0 and second.stderr.count("skip ") == 4
    report = run("-m", "sadi_peft.cli", "report", "results", cwd=tmp_path)
    assert report.returncode == 0 and "| none |" in report.stdout and "copa" in report.stdout
    # every result stores its per-example test values; results written before that get them by --add-per-example,
    # which rescores the stored chosen point and writes only when it reproduces the stored metric
    folder = tmp_path / "results" / "copa"
    stored = {m: json.loads((folder / f"{m}.json").read_text()) for m in ("none", "sadi-head-last", "random-head", "caa")}
    for r in stored.values():
        assert len(r["per_example"]) == 6 and set(r["per_example"]) <= {0, 1}
        assert sum(r["per_example"]) / 6 == pytest.approx(r["accuracy"])
        assert r["examples_digest"] == record["examples_digest"]
    for method, r in stored.items():
        old = {k: v for k, v in r.items()
               if k not in ("per_example", "examples_digest", "predicted_counts", "predicted")}
        if method == "none":
            del old["test_scoring"]  # a row from before 2026-12-05: rescored with full passes
        if method == "caa":
            old["accuracy"] += 1 / 6  # a stored metric the rescoring cannot reproduce
        if method == "random-head":  # per-example values but no predictions: rescored, checked, predictions added
            old = {k: v for k, v in r.items() if k != "predicted"}
        (folder / f"{method}.json").write_text(json.dumps(old))
    tampered = (folder / "caa.json").read_text()
    rescored = run(*args, "--add-per-example", "--progress", cwd=tmp_path)
    assert rescored.returncode == 1 and "differs from the stored" in rescored.stderr
    assert "SADI calibration" in rescored.stderr and "grid search" in rescored.stderr  # --progress: bars anyway
    assert (folder / "caa.json").read_text() == tampered
    for method in ("none", "sadi-head-last", "random-head"):
        again = json.loads((folder / f"{method}.json").read_text())
        assert again["per_example"] == stored[method]["per_example"] and "per_example_added" in again
        assert again["predicted_counts"] == stored[method]["predicted_counts"]
        assert again["predicted"] == stored[method]["predicted"]
    # stored per-example values the rescoring does not reproduce: refused, the file left as it is
    forged = {k: v for k, v in stored["random-head"].items() if k != "predicted"} | {"per_example": [2] * 6}
    (folder / "random-head.json").write_text(json.dumps(forged))
    refused = run(*args, "--add-per-example", "--methods", "random-head", cwd=tmp_path)
    assert refused.returncode == 1 and "rescored per-example values differ" in refused.stderr
    assert json.loads((folder / "random-head.json").read_text()) == forged
    # a second rescoring (a row given per-example values earlier, predictions now) keeps the first one's record
    first = {"wall_seconds": 1.0, "test_scoring": "prefix-cached"}
    (folder / "random-head.json").write_text(json.dumps(
        {k: v for k, v in stored["random-head"].items() if k != "predicted"} | {"per_example_added": first}))
    assert run(*args, "--add-per-example", "--methods", "random-head", cwd=tmp_path).returncode == 0
    history = json.loads((folder / "random-head.json").read_text())["per_example_added"]
    assert history[0] == first and history[1]["added"] == ["predicted"] and len(history) == 2
    (folder / "random-head.json").write_text(json.dumps(stored["random-head"]))
    # the option-length split reads the stored rows, rebuilds the same test examples and loads no model
    split = run(str(REPO / "scripts" / "option_length.py"), "results", "--task", "copa", "--tokenizer",
                str(smollm2_path), "--data-dir", str(data_dir), "--out", "split.md", cwd=tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    table = (tmp_path / "split.md").read_text()
    none_row = next(line for line in table.splitlines() if line.startswith("| none |"))
    assert none_row.split(" | ")[1] == f"{100 * stored['none']['accuracy']:.1f}"
    assert "| pick the longest option |" in table and "| sadi-head-last |" in table
    # the same rows by answer style: COPA's options are letters, so no example has a no-comment answer or a denial
    style = run(str(REPO / "scripts" / "option_length.py"), "results", "--task", "copa", "--by", "style",
                "--data-dir", str(data_dir), cwd=tmp_path)
    assert style.returncode == 0, style.stderr[-3000:]
    assert "In 6 of the 6 examples no option is a no-comment answer or a denial" in style.stdout
    # the label-prior control: rescores the unsteered model (checked against the stored none row), fits λ on
    # validation and compares every stored row with it on the same test examples
    prior = run(str(REPO / "scripts" / "label_prior.py"), "results", "--tasks", "copa", "--tiny", "--data-dir",
                str(data_dir), "--out", "prior.md", cwd=tmp_path)
    assert prior.returncode == 0, prior.stderr[-3000:]
    control = json.loads((tmp_path / "results" / "label_prior.json").read_text())["copa"]
    assert control["n"] == 6 and control["examples_digest"] == record["examples_digest"]
    assert control["accuracy"] == pytest.approx(sum(control["per_example"]) / 6)
    assert control["lambda"] in [g["lambda"] for g in control["grid"]] and control["grid"][0]["lambda"] == 0.0
    # every row with per-example values (caa's were refused above, so it has none), against the control
    table = (tmp_path / "prior.md").read_text()
    assert f"| **label-prior control** (λ = {control['lambda']:g}) | {100 * control['accuracy']:.1f} |" in table
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert {"none", "sadi-head-last", "random-head"} <= set(rows) and "caa" not in rows
    difference = sum(stored["none"]["per_example"]) / 6 - control["accuracy"]
    assert rows["none"][3] == f"{100 * difference:+.1f}"
    # an unsteered scoring that does not reproduce the stored none row: refused, the stored control kept
    before = (tmp_path / "results" / "label_prior.json").read_text()
    none_file = folder / "none.json"
    kept = none_file.read_text()
    none_file.write_text(json.dumps(json.loads(kept) | {"per_example": [1 - v for v in stored["none"]["per_example"]]}))
    refused = run(str(REPO / "scripts" / "label_prior.py"), "results", "--tasks", "copa", "--tiny", "--force",
                  "--data-dir", str(data_dir), cwd=tmp_path)
    assert refused.returncode == 2 and "differs from the stored `none` row on 6 of 6" in refused.stderr
    assert (tmp_path / "results" / "label_prior.json").read_text() == before
    none_file.write_text(kept)
    paired = run("-m", "sadi_peft.cli", "report", "results", "--paired", "none", cwd=tmp_path)
    assert paired.returncode == 0 and "| copa | sadi-head-last | 6 |" in paired.stdout and "copa: caa" in paired.stdout
    # the chosen adapter is saved beside its result, and its Hub card is built from the result files
    assert (tmp_path / "results" / "copa" / "sadi-head-last.adapter" / "adapter_config.json").is_file()
    cards = run(str(REPO / "scripts" / "publish_cards.py"), "results", "--base-model", "org/base", "--repo-prefix",
                "org/tiny", "--out", "cards", cwd=tmp_path)
    assert cards.returncode == 0, cards.stderr[-3000:]
    card = (tmp_path / "cards" / "copa-sadi-head-last.md").read_text()
    baseline = json.loads((tmp_path / "results" / "copa" / "none.json").read_text())["accuracy"]
    assert "base_model: org/base" in card and "| copa |" in card and f"{baseline:.4g}" in card
    assert f"top_k={record['chosen']['top_k']}" in card
    assert "accuracy (restricted choice" in card
    assert "On the same 6 test examples the adapter differs from the base model by" in card  # paired, per-example
    assert "Label-prior control: the base model with a per-option bias on its choice scores" in card
    assert f"scores {100 * control['accuracy']:.1f}; this adapter differs from it by" in card
    random_mask = json.loads((tmp_path / "results" / "copa" / "random-head.json").read_text())["accuracy"]
    assert "Control: a seeded random mask of attention heads at the last prompt token (`random-head`" in card
    assert f"scores {100 * random_mask:.1f} on these examples; this adapter differs from it by" in card
    index = (tmp_path / "cards" / "index.md").read_text()
    assert "| [`copa-sadi-head-last.md`](copa-sadi-head-last.md) | `results/copa/sadi-head-last.adapter` |" in index
    line = next(x for x in index.splitlines() if x.startswith("| [`copa-sadi-head-last.md`]"))
    assert f"| {random_mask:.3f}: " in line and line.count("points (paired bootstrap 95 % interval") == 2


def test_reproduce_triviaqa_selects_and_scores_by_generation(tmp_path, smollm2_path, data_dir):
    args = [str(REPO / "scripts" / "reproduce.py"), "--tiny", "--tasks", "triviaqa", "--methods",
            "none,sadi-head-last,caa", "--limit", "4", "--n-pairs", "4", "--max-new-tokens", "3", "--data-dir",
            str(data_dir), "--out", "results"]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("none", "sadi-head-last", "caa"):
        record = json.loads((tmp_path / "results" / "triviaqa" / f"{method}.json").read_text())
        assert record["protocol"] == "generate" and record["metric"] == "exact_match"
        assert record["max_new_tokens"] == 3 and record["n"] == 4 and 0 <= record["accuracy"] <= 1
        assert 0 <= record["empty_answers"] <= 4
        assert len(record["per_example"]) == 4 and sum(record["per_example"]) / 4 == pytest.approx(record["accuracy"])
    sadi = json.loads((tmp_path / "results" / "triviaqa" / "sadi-head-last.json").read_text())
    assert len(sadi["grid"]) > 1 and sadi["validation_accuracy"] == max(g["accuracy"] for g in sadi["grid"])
    cards = run(str(REPO / "scripts" / "publish_cards.py"), "results", "--base-model", "org/base", "--repo-prefix",
                "org/tiny", "--out", "cards", cwd=tmp_path)
    assert cards.returncode == 0, cards.stderr[-3000:]
    card = (tmp_path / "cards" / "triviaqa-sadi-head-last.md").read_text()
    assert "exact match (greedy answer" in card and "restricted choice" not in card


def test_plan_lists_missing_cells_with_estimates_and_computes_nothing(tmp_path):
    def row(folder, task, method, cpu):
        (folder / task).mkdir(parents=True, exist_ok=True)
        (folder / task / f"{method}.json").write_text(json.dumps({"accuracy": 0.5, "cpu_seconds": cpu}))

    out = tmp_path / "results" / "m"
    row(out, "copa", "none", 600)
    row(out, "copa", "caa", 3000)  # caa costs 5 x none
    row(out, "sst2", "none", 1200)
    row(tmp_path / "results" / "m-seed1", "sst2", "iti", 420)  # the same cell in another seed's folder
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # a model that does not exist: --plan must not load one
    result = run(str(REPO / "scripts" / "reproduce.py"), "--plan", "--model", "no/such-model", "--tasks",
                 "copa,sst2,boolq", "--methods", "none,caa,iti", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == f"6 missing cells in {out}:"
    assert "| copa | iti | ? | no comparable row |" in lines
    assert any(line.startswith("| sst2 | caa | 100 | sst2/none x 5.0") for line in lines)
    assert any(line.startswith("| sst2 | iti | 7 | same cell in ") for line in lines)
    assert "| boolq | none | ? | no comparable row |" in lines
    assert lines[-1] == "In all about 1.8 CPU hours, plus 4 cells with no estimate."
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_missing_model_package_stops_the_run_and_records_no_row_failure(tmp_path, monkeypatch):
    """A model package that is not installed is the set-up's fault, not a row's: the run stops with the pip hint
    instead of writing an .error.json for every (task, method) it was asked for."""
    import importlib.util

    from sadi_peft.zoo import MissingDependencyError

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("reproduce_under_test", REPO / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    calls = []

    def run_one(args, task, method):
        calls.append((task.name, method))
        raise MissingDependencyError("pip install some-model-package")

    monkeypatch.setattr(reproduce, "run_one", run_one)
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--tasks", "copa,sst2", "--methods", "none,caa", "--out", str(out)])
    with pytest.raises(MissingDependencyError, match="some-model-package"):
        reproduce.main()
    assert calls == [("copa", "none")]
    assert list(out.rglob("*.error.json")) == []


def test_plan_scales_an_estimate_by_what_the_task_costs_other_methods(tmp_path):
    """A task whose searches cost more per ``none`` row than elsewhere (TruthfulQA) scales its missing cells by that
    factor: caa costs 10 x none on tqa against 5 x elsewhere, so iti (2 x none elsewhere) is estimated at 4 x."""
    reproduce = load_script("reproduce")
    out = tmp_path / "results" / "m"
    for task, none, caa, iti in [("copa", 600, 3000, 1200), ("sst2", 1200, 6000, 2400), ("tqa", 600, 6000, None)]:
        (out / task).mkdir(parents=True)
        for method, cpu in (("none", none), ("caa", caa), ("iti", iti)):
            if cpu is not None:
                (out / task / f"{method}.json").write_text(json.dumps({"accuracy": 0.5, "cpu_seconds": cpu}))
    (out / "tqa" / "iti.error.json").write_text(json.dumps({"error": "stopped"}))  # a failed run is no cost
    cost, basis = reproduce.estimate_cost(out, "tqa", "iti")
    assert cost == pytest.approx(600 * 2 * 2)
    assert basis == "tqa/none x 2.0 (median iti/none over 2 tasks) x 2.00 (this task's factor over 1 row)"
    cost, basis = reproduce.estimate_cost(out, "copa", "fixed-head")  # no row of that method anywhere
    assert cost is None and basis == "no comparable row"


def test_plan_estimates_an_all_positions_cell_from_the_tasks_shared_prefix_rows(tmp_path):
    """A sadi-*-all cell is estimated from the task's other sadi-*-all rows searched with the shared prompt, not
    from ratios that older full-pass rows set (several times the cost on TruthfulQA)."""
    reproduce = load_script("reproduce")
    out = tmp_path / "results" / "m"
    rows = {("copa", "none"): (100, None), ("copa", "sadi-head-all"): (1000, None),  # ratio 10 x none, full passes
            ("tqa", "none"): (600, None), ("tqa", "sadi-head-all"): (1800, "shared-prefix"),
            ("tqa", "sadi-hidden-all"): (9000, None)}  # an old full-pass row on the task is not a peer
    for (task, method), (cpu, scoring) in rows.items():
        (out / task).mkdir(parents=True, exist_ok=True)
        record = {"accuracy": 0.5, "cpu_seconds": cpu} | ({"search_scoring": scoring} if scoring else {})
        (out / task / f"{method}.json").write_text(json.dumps(record))
    cost, basis = reproduce.estimate_cost(out, "tqa", "sadi-neuron-all")
    assert cost == 1800 and basis == "tqa's sadi-*-all rows searched with the shared prompt (1 row)"
    cost, basis = reproduce.estimate_cost(out, "copa", "sadi-hidden-all")  # no shared-prefix row on copa: ratios
    assert cost == pytest.approx(100 * 9000 / 600) and basis.startswith("copa/none x 15.0")
    cost, _ = reproduce.estimate_cost(out, "tqa", "iti")  # other methods keep the ratio estimate
    assert cost is None


def test_plan_estimates_a_generative_cell_from_generative_rows_only(tmp_path):
    """A generative task's search costs more per ``none`` row than a choice task's, so its missing cell is not
    estimated from choice tasks: with no generative row of the method here, the other model's same cell gives the
    ratio, scaled by the grid sizes and by how this model's other rows on the task compare with that model's."""
    reproduce = load_script("reproduce")
    here, there = tmp_path / "results" / "gemma", tmp_path / "results" / "smol"
    rows = {(here, "copa", "none"): (100, 0), (here, "copa", "caa"): (500, 108),  # choice task: caa 5 x none
            (here, "triviaqa", "none"): (200, 0), (here, "triviaqa", "iti"): (1200, 6),  # iti 6 x none here ...
            (there, "triviaqa", "none"): (100, 0), (there, "triviaqa", "iti"): (300, 6),  # ... against 3 x there
            (there, "triviaqa", "caa"): (1000, 60)}  # caa 10 x none on 60 grid points
    for (folder, task, method), (cpu, points) in rows.items():
        (folder / task).mkdir(parents=True, exist_ok=True)
        record = {"accuracy": 0.5, "cpu_seconds": cpu, "grid": [{"accuracy": 0.5}] * points}
        (folder / task / f"{method}.json").write_text(json.dumps(record))
    cost, basis = reproduce.estimate_cost(here, "triviaqa", "caa")
    assert cost == pytest.approx(200 * 10 * 108 / 60 * 2)
    assert basis == ("triviaqa/none x 18.0 (caa/none on triviaqa in smol x 1.80 for 108 grid points against 60) "
                     "x 2.00 (this model's factor against them over 1 row)")
    cost, basis = reproduce.estimate_cost(here, "copa", "iti")  # choice task: generative rows do not count
    assert cost is None and basis == "no comparable row"
    cost, basis = reproduce.estimate_cost(here, "triviaqa", "fixed-head")  # no row of it on any model
    assert cost is None and basis == "no comparable row"
