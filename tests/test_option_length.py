"""The option-length split of ``scripts/option_length.py``: groups, blind rules and per-group accuracies."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def option_length():
    return load_script("option_length")


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


def test_option_style_names_refusals_and_denials(option_length):
    assert option_length.option_style("I have no comment.") == "no comment"
    assert option_length.option_style(" i have no comment") == "no comment"
    for denial in ("No, it is not.", "Nothing happens.", "There is no such city.", "There are no albums.",
                   "None of them.", "Nobody knows.", "Never.", "Not at all."):
        assert option_length.option_style(denial) == "denial", denial
    for other in ("Nowhere is safe.", "Notably, yes.", "Yes.", "It is 10 AM.", "A", "I have a comment."):
        assert option_length.option_style(other) == "other", other


def test_style_rule_prefers_no_comment_then_denials_and_breaks_ties_at_random(option_length):
    rule = option_length.style_rule_accuracy
    assert rule(["other", "no comment", "denial"], 1) == 1.0
    assert rule(["other", "no comment", "denial"], 2) == 0.0  # a no-comment option is there: the rule takes it
    assert rule(["denial", "other", "denial"], 2) == 0.5
    assert rule(["other", "other", "other", "other"], 3) == 0.25


def test_analyse_style_splits_rows_by_the_gold_options_style(option_length):
    choices = [["I have no comment.", "Paris."], ["No, never.", "Yes, always.", "Nothing happens."],
               ["Red.", "Blue."]]
    labels = [0, 0, 1]  # gold: no comment, denial (tied with another denial), other
    rows = {"none": [0, 0, 1], "steered": [1, 1, 0]}
    result = option_length.analyse_style(choices, labels, rows, {"steered": [0, 0, 0]})
    assert result["group_sizes"] == {"no comment": 1, "denial": 1, "other": 1}
    assert result["no_style"] == 1
    rule = result["accuracy"]["pick no comment, else a denial"]
    assert rule == {"all": pytest.approx(2 / 3), "no comment": 1.0, "denial": 0.5, "other": 0.5}
    assert result["accuracy"]["steered"]["no comment"] == 1.0 and result["accuracy"]["none"]["other"] == 1.0
    # picks 0, 0, 0: the no-comment option once, a denial once, neither in the last example
    assert result["picks"]["steered"] == {"no comment": pytest.approx(1 / 3), "denial": pytest.approx(1 / 3)}
    assert result["picks"]["pick at random"]["no comment"] == pytest.approx((1 / 2) / 3)
    assert result["picks"]["pick at random"]["denial"] == pytest.approx((2 / 3) / 3)
    text = option_length.render(result, "truthfulqa_mc1", "results/x")
    assert text.startswith("Answer-style split of `results/x` / `truthfulqa_mc1`")
    assert "| steered | 66.7 (+33.3) | 100.0 (+100.0) | 100.0 (+100.0) | 0.0 (-100.0) | 33.3 | 33.3 |" in text
    assert "In 1 of the 3 examples no option is a no-comment answer or a denial" in text


def test_several_true_options_group_by_the_first_style_and_score_blind_rules_as_mass(option_length):
    # TruthfulQA MC2: a set of true options per question, rows store the probability mass on them
    choices = [["Paris.", "I have no comment.", "No, never.", "Rome."], ["No, it is not.", "Yes.", "Maybe."],
               ["Red.", "Blue.", "Green.", "Nothing happens."]]
    trues = [{1, 2}, {0, 2}, {0, 1}]  # a no comment among the true; a denial; neither (the denial is false)
    assert [option_length.style_group([option_length.option_style(o) for o in c], t)
            for c, t in zip(choices, trues)] == ["no comment", "denial", "other"]
    rows = {"none": [0.5, 0.25, 0.5], "steered": [0.75, 0.5, 0.25]}
    result = option_length.analyse_style(choices, trues, rows, {"steered": [1, 1, 3]})
    rule = result["accuracy"]["pick no comment, else a denial"]
    assert rule == {"all": pytest.approx(2 / 3), "no comment": 1.0, "denial": 1.0, "other": 0.0}
    # spreading the mass evenly: 2 of 4, 2 of 3, 2 of 4 options true
    assert result["accuracy"]["pick at random"] == {"all": pytest.approx(5 / 9), "no comment": 0.5,
                                                    "denial": pytest.approx(2 / 3), "other": 0.5}
    assert result["accuracy"]["steered"]["no comment"] == 0.75
    assert result["picks"]["steered"] == {"no comment": pytest.approx(1 / 3), "denial": pytest.approx(1 / 3)}
    result["metric"] = "mc2"
    text = option_length.render(result, "truthfulqa_mc2", "results/x")
    assert "MC2, the mean probability mass on the true options, in %" in text
    assert "| row | all (n=3) | true: no comment (n=1) | true: denial (n=1) | true: other (n=1) | top no comment" in text
    assert "| steered | 50.0 (+8.3) | 75.0 (+25.0) | 50.0 (+25.0) | 25.0 (-25.0) | 33.3 | 33.3 |" in text
    # by length: a true option alone the longest wins over one alone the shortest
    assert option_length.gold_group([5, 2, 3], {0, 1}) == "longest"
    assert option_length.gold_group([5, 2, 3], {1, 2}) == "shortest"
    assert option_length.blind_rule_accuracy([5, 5, 3], {0, 2}, "longest") == 0.5


def test_analyse_rejects_rows_of_another_length(option_length):
    with pytest.raises(ValueError, match="row 'none' has 3 per-example values; the examples are 2"):
        option_length.analyse([[1, 2], [2, 1]], [0, 0], {"none": [1, 0, 1]})
    with pytest.raises(ValueError, match="2 option lists but 1 labels"):
        option_length.analyse_style([["a"], ["b"]], [0], {})


def test_a_folder_without_rows_is_an_error_that_names_it(option_length, tmp_path, caplog):
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "none.json").write_text('{"task": "copa", "method": "none", "metric": "accuracy", '
                                                 '"protocol": "choice", "accuracy": 0.5}')  # no per-example values
    assert option_length.main([str(tmp_path), "--task", "copa"]) == 2
    assert f"{tmp_path / 'copa'} holds no choice-accuracy (or MC2) result with per-example values" in caplog.text


def test_rows_of_different_test_examples_are_refused(option_length, tmp_path, caplog):
    (tmp_path / "copa").mkdir()
    for method, digest in (("none", "a" * 16), ("caa", "b" * 16)):
        row = {"task": "copa", "method": method, "metric": "accuracy", "protocol": "choice", "accuracy": 0.5,
               "per_example": [1, 0], "examples_digest": digest, "seed": 0, "n": 2}
        (tmp_path / "copa" / f"{method}.json").write_text(json.dumps(row))
    assert option_length.main([str(tmp_path), "--task", "copa"]) == 2
    assert "scored different test examples" in caplog.text
