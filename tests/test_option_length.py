"""The option-length split of ``scripts/option_length.py``: groups, blind rules and per-group accuracies."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "option_length.py"


@pytest.fixture(scope="module")
def option_length():
    spec = importlib.util.spec_from_file_location("option_length", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gold_group_needs_a_strict_longest_or_shortest(option_length):
    assert option_length.gold_group([5, 2, 3], 0) == "longest"
    assert option_length.gold_group([5, 2, 3], 1) == "shortest"
    assert option_length.gold_group([5, 2, 3], 2) == "other"
    assert option_length.gold_group([5, 5, 3], 0) == "other"  # tied for longest
    assert option_length.gold_group([4, 4], 1) == "other"


def test_blind_rules_break_ties_at_random(option_length):
    assert option_length.blind_rule_accuracy([5, 2, 3], 0, "longest") == 1.0
    assert option_length.blind_rule_accuracy([5, 2, 3], 0, "shortest") == 0.0
    assert option_length.blind_rule_accuracy([5, 5, 3], 1, "longest") == 0.5
    assert option_length.blind_rule_accuracy([2, 2, 2, 9], 0, "shortest") == pytest.approx(1 / 3)


def test_analyse_splits_each_row_by_the_gold_options_length(option_length):
    lengths = [[5, 2], [1, 4], [3, 3], [6, 1]]  # gold (index 0): longest, shortest, tied, longest
    labels = [0, 0, 0, 0]
    rows = {"none": [0, 1, 1, 0], "steered": [1, 0, 1, 1]}
    result = option_length.analyse(lengths, labels, rows, {"steered": [0, 1, 0, 0]})
    assert result["group_sizes"] == {"longest": 2, "shortest": 1, "other": 1}
    assert result["equal_lengths"] == 1
    assert result["accuracy"]["none"] == {"all": 0.5, "longest": 0.0, "shortest": 1.0, "other": 1.0}
    assert result["accuracy"]["steered"] == {"all": 0.75, "longest": 1.0, "shortest": 0.0, "other": 1.0}
    assert result["accuracy"]["pick the longest option"] == {"all": 0.625, "longest": 1.0, "shortest": 0.0,
                                                             "other": 0.5}
    # picks 0, 1, 0, 0: a longest option in all four (example 2 is a tie), a shortest one in example 2 only
    assert result["picks"] == {"steered": {"longest": 1.0, "shortest": 0.25},
                               "pick at random": {"longest": pytest.approx(0.625), "shortest": pytest.approx(0.625)}}
    assert result["accuracy"]["pick at random"]["all"] == 0.5
    text = option_length.render(result, "copa", "results/x")
    assert "| steered | 75.0 (+25.0) | 100.0 (+100.0) | 0.0 (-100.0) | 100.0 (+0.0) | 100.0 | 25.0 |" in text
    assert "| none | 50.0 | 0.0 | 100.0 | 100.0 | – | – |" in text
    assert "In 1 of the 4 examples every option has the same token length" in text


def test_analyse_rejects_rows_of_another_length(option_length):
    with pytest.raises(ValueError, match="row 'none' has 3 per-example values; the examples are 2"):
        option_length.analyse([[1, 2], [2, 1]], [0, 0], {"none": [1, 0, 1]})


def test_a_folder_without_rows_is_an_error_that_names_it(option_length, tmp_path, caplog):
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "none.json").write_text('{"task": "copa", "method": "none", "metric": "accuracy", '
                                                 '"protocol": "choice", "accuracy": 0.5}')  # no per-example values
    assert option_length.main([str(tmp_path), "--task", "copa"]) == 2
    assert f"{tmp_path / 'copa'} holds no choice-accuracy result with per-example values" in caplog.text


def test_rows_of_different_test_examples_are_refused(option_length, tmp_path, caplog):
    (tmp_path / "copa").mkdir()
    for method, digest in (("none", "a" * 16), ("caa", "b" * 16)):
        row = {"task": "copa", "method": method, "metric": "accuracy", "protocol": "choice", "accuracy": 0.5,
               "per_example": [1, 0], "examples_digest": digest, "seed": 0, "n": 2}
        (tmp_path / "copa" / f"{method}.json").write_text(json.dumps(row))
    assert option_length.main([str(tmp_path), "--task", "copa"]) == 2
    assert "scored different test examples" in caplog.text
