"""The helpers the results scripts share (``scripts/_results.py``): atomic writes, reading rows back, paired stats."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def results():
    return load_script("_results")


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(results, tmp_path):
    path = tmp_path / "copa" / "none.json"
    results.write_json(path, {"accuracy": 0.5})
    results.write_json(path, {"accuracy": 0.75})
    assert json.loads(path.read_text()) == {"accuracy": 0.75}
    assert [p.name for p in path.parent.iterdir()] == ["none.json"]


def test_write_json_that_fails_keeps_the_old_file(results, tmp_path):
    path = tmp_path / "none.json"
    results.write_json(path, {"accuracy": 0.5})
    with pytest.raises(TypeError):
        results.write_json(path, {"accuracy": object()})  # not JSON-serialisable halfway through
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["none.json"]


def test_load_rows_keeps_choice_accuracy_rows_with_per_example_values(results, tmp_path):
    def row(name, **fields):
        (tmp_path / f"{name}.json").write_text(json.dumps({"method": name, "protocol": "choice", **fields}))

    row("none", per_example=[1, 0], metric="accuracy")
    row("caa", per_example=[1, 1])  # written before rows named their metric: accuracy
    row("iti")  # no per-example values
    row("fixed-head", per_example=[1, 0], protocol="exact_match")
    row("random-head", per_example=[0.2, 0.4], task="truthfulqa_mc2")  # old MC2 row: probability mass
    (tmp_path / "sadi-head-last.error.json").write_text(json.dumps({"method": "sadi-head-last"}))
    assert sorted(results.load_rows(tmp_path)) == ["caa", "none"]
    assert sorted(results.load_rows(tmp_path, metrics=("accuracy", "mc2"))) == ["caa", "none", "random-head"]


def test_paired_counts_discordant_examples_and_tests_only_binary_values(results):
    stats = results.paired([1, 1, 1, 0, 1], [0, 0, 1, 0, 1])
    assert stats["difference"] == pytest.approx(0.4)
    assert (stats["only_first"], stats["only_second"]) == (2, 0)
    assert stats["mcnemar_p"] == pytest.approx(0.5)  # exact two-sided binomial: 2 × 0.5 ** 2
    low, high = stats["interval"]
    assert low <= 0.4 <= high
    assert results.paired([0.5, 0.25], [0.25, 0.25])["mcnemar_p"] is None
    with pytest.raises(ValueError, match="got 2 and 1"):
        results.paired([1, 0], [1])
