"""results/README.md's tables are exactly what `sadi-peft report` makes of the committed result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


def _script():
    return load_script("update_results_readme")


def test_published_tables_match_the_result_files():
    script = _script()
    readme = (REPO / "results" / "README.md").read_text(encoding="utf-8")
    assert script.update(readme, REPO) == readme, "run: python scripts/update_results_readme.py"


def _result(folder: Path, task: str, method: str, accuracy: float) -> None:
    (folder / task).mkdir(parents=True, exist_ok=True)
    record = {"task": task, "method": method, "split": "test", "accuracy": accuracy, "n": 10}
    (folder / task / f"{method}.json").write_text(json.dumps(record))


def test_update_replaces_only_the_generated_block(tmp_path):
    script = _script()
    _result(tmp_path / "res", "copa", "none", 0.5)
    _result(tmp_path / "res", "copa", "sadi-head-last", 0.7)
    text = "intro\n<!-- generated: sadi-peft report res -->\nstale | 99.00\n<!-- end generated -->\noutro\n"
    new = script.update(text, tmp_path)
    assert new.startswith("intro\n<!-- generated: sadi-peft report res -->\n| method | copa | average |")
    assert "| sadi-head-last | 70.00 (n=10) | 70.00 |" in new and "stale" not in new
    assert new.endswith("<!-- end generated -->\noutro\n")
    assert script.update(new, tmp_path) == new


@pytest.mark.parametrize("text, message", [
    ("no markers at all\n", "no `<!-- generated"),
    ("<!-- generated: rm -rf res -->\nx\n<!-- end generated -->\n", "expected a `sadi-peft report"),
    ("<!-- generated: sadi-peft report missing -->\nx\n<!-- end generated -->\n", "no results for split 'test'"),
    ("<!-- generated: coverage -->\nx\n<!-- end generated -->\n", "expected `coverage <result folder>"),
    ("<!-- generated: coverage nowhere -->\nx\n<!-- end generated -->\n", "'nowhere', which is not a folder"),
])
def test_update_bad_input_is_named(tmp_path, text, message):
    (tmp_path / "missing").mkdir()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _script().update(text, tmp_path)


def test_coverage_lists_present_missing_and_failed_rows(tmp_path):
    script = _script()
    _result(tmp_path / "res", "copa", "none", 0.5)
    _result(tmp_path / "res", "copa", "caa", 0.5)
    _result(tmp_path / "res", "sst2", "none", 0.5)
    (tmp_path / "res" / "sst2" / "caa.error.json").write_text("{}")
    text = script.coverage(["res"], tmp_path, tasks=["copa", "sst2", "boolq"], methods=["none", "caa", "iti"])
    assert "| res | copa | 2 of 3 | iti | – |" in text
    assert "| res | sst2 | 1 of 3 | iti | caa |" in text
    assert "| res | boolq | 0 of 3 | none, caa, iti | – |" in text
    assert "`res`: 3 of 9 cells" in text
    _result(tmp_path / "res", "copa", "iti", 0.5)
    assert "| res | copa | 3 of 3 (complete) | – | – |" in script.coverage(
        ["res"], tmp_path, tasks=["copa"], methods=["none", "caa", "iti"])


def test_coverage_defaults_to_the_reproduce_script_table(tmp_path):
    script = _script()
    tasks, methods = script._expected()
    assert "copa" in tasks and "triviaqa" in tasks and len(methods) == 11 and methods[0] == "none"
    (tmp_path / "res").mkdir()
    text = script.update("<!-- generated: coverage res -->\n<!-- end generated -->\n", tmp_path)
    assert f"`res`: 0 of {len(tasks) * 11} cells" in text


def _paired_result(folder: Path, task: str, method: str, values: list[int], seed: int) -> None:
    (folder / task).mkdir(parents=True, exist_ok=True)
    record = {"task": task, "method": method, "split": "test", "accuracy": sum(values) / len(values),
              "n": len(values), "seed": seed, "per_example": values, "examples_digest": f"d{seed}"}
    (folder / task / f"{method}.json").write_text(json.dumps(record))


def test_replicates_compare_each_run_with_its_own_none(tmp_path):
    script = _script()
    _paired_result(tmp_path / "s0", "sst2", "none", [0] * 10 + [1] * 10, 0)
    _paired_result(tmp_path / "s0", "sst2", "sadi-head-last", [1] * 6 + [0] * 4 + [1] * 10, 0)  # +6 of 20
    _paired_result(tmp_path / "s1", "sst2", "none", [1] * 20, 1)
    _paired_result(tmp_path / "s1", "sst2", "sadi-head-last", [1] * 18 + [0] * 2, 1)  # -2 of 20
    _result(tmp_path / "s0", "sst2", "caa", 0.5)  # only in one folder (not rerun): not listed, needs no values
    text = script.update("<!-- generated: replicates sst2 s0 s1 -->\n<!-- end generated -->\n", tmp_path)
    assert "| s0 | 0 | sadi-head-last | – | – | 20 | 80.00 | +30.00 |" in text
    assert "| s1 | 1 | sadi-head-last | – | – | 20 | 90.00 | -10.00 |" in text
    assert "| s1 | 1 | none | – | – | 20 | 100.00 | – | – | – |" in text
    assert "`sadi-head-last` +10.00 (above `none` in 1 of 2)" in text and "caa" not in text
    (tmp_path / "s1" / "sst2" / "none.json").unlink()
    with pytest.raises(ValueError, match="no `none` result for 'sst2' under 's1'"):
        script.update("<!-- generated: replicates sst2 s0 s1 -->\n<!-- end generated -->\n", tmp_path)
    _result(tmp_path / "s1", "sst2", "none", 1.0)  # no per-example values
    with pytest.raises(ValueError, match="lack per-example values"):
        script.update("<!-- generated: replicates sst2 s0 s1 -->\n<!-- end generated -->\n", tmp_path)


def test_label_prior_block_compares_the_rows_stored_now_with_the_control(tmp_path):
    script = _script()
    for method, values in (("none", [0] * 10 + [1] * 10), ("sadi-head-last", [1] * 16 + [0] * 4)):
        _paired_result(tmp_path / "res", "sst2", method, values, 0)
        path = tmp_path / "res" / "sst2" / f"{method}.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"protocol": "choice", "metric": "accuracy"}))
    block = "<!-- generated: label-prior res -->\n<!-- end generated -->\n"
    with pytest.raises(ValueError, match="'res', which has no label_prior.json"):
        script.update(block, tmp_path)
    control = {"task": "sst2", "n": 20, "n_validation": 10, "examples_digest": "d0", "options": ["Negative", "Positive"],
               "bias": [0.1, -0.1], "lambda": 0.5, "validation_accuracy": 0.7, "accuracy": 0.6,
               "per_example": [1] * 12 + [0] * 8, "predicted_counts": [9, 11], "label_counts": [10, 10]}
    (tmp_path / "res" / "label_prior.json").write_text(json.dumps({"sst2": control}))
    text = script.update(block, tmp_path)
    assert "Label-prior control for `res`" in text and "Chosen λ = 0.5 (validation 70.0 on 10" in text
    assert "| **label-prior control** (λ = 0.5) | 60.0 | [9, 11] |" in text
    # each row minus the control on the same examples (none 50 against 60; SADI 80)
    assert "| sadi-head-last | 80.0 | – | +20.0 |" in text and "| none | 50.0 | – | -10.0 |" in text
    # a row stored after the control was fitted is compared too
    _paired_result(tmp_path / "res", "sst2", "caa", [1] * 20, 0)
    path = tmp_path / "res" / "sst2" / "caa.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"protocol": "choice", "metric": "accuracy"}))
    assert "| caa | 100.0 | – | +40.0 | [+20.0, +60.0] | 8 / 0 |" in script.update(block, tmp_path)
