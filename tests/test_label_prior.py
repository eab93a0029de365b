"""The label-prior control of ``scripts/label_prior.py``: the per-option bias, the λ chosen on validation, the
paired comparisons and the refusals. The end-to-end run on stored rows is in ``tests/test_reproduce_smoke.py``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def label_prior():
    return load_script("label_prior")


def test_option_bias_is_each_options_mean_score_centred(label_prior):
    scores = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -3.0, -2.0]])
    assert label_prior.option_bias(scores).tolist() == pytest.approx([1.0, -0.5, -0.5])


def test_lambda_removes_the_preference_and_is_chosen_on_the_given_scores(label_prior):
    # the model prefers option 0 by about 1 everywhere; the labels are half 0, half 1
    scores = torch.tensor([[0.0, -0.8], [0.0, -1.2], [0.0, -0.6], [0.0, -1.4]])
    labels = torch.tensor([1, 0, 1, 0])
    bias = label_prior.option_bias(scores)  # [+0.5, -0.5]
    assert label_prior.corrected(scores, bias, 0.0).tolist() == [0, 0, 0, 0]
    assert label_prior.corrected(scores, bias, 1.0).tolist() == [1, 0, 1, 0]  # margins -0.8+1 > 0, -1.2+1 < 0
    lam, grid = label_prior.choose_lambda(scores, labels, bias, [0.0, 0.5, 1.0, 2.0])
    assert lam == 1.0
    assert [p["accuracy"] for p in grid] == [0.5, 0.5, 1.0, 0.5]
    # equal accuracies: the first (least correction) wins
    lam, _ = label_prior.choose_lambda(scores, torch.tensor([0, 0, 0, 0]), bias, [0.0, 0.25])
    assert lam == 0.0
    with pytest.raises(ValueError, match="no λ to choose from"):
        label_prior.choose_lambda(scores, labels, bias, [])


def test_paired_counts_and_difference(label_prior):
    result = label_prior.paired([1, 1, 0, 1], [0, 1, 0, 0])
    assert result["difference"] == 0.5 and result["only_first"] == 2 and result["only_second"] == 0
    assert result["mcnemar_p"] == 0.5  # 2 discordant pairs, both one way
    low, high = result["interval"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0


def test_lambdas_option_rejects_bad_values(label_prior):
    assert label_prior.parse_lambdas("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("", "a,b", "-1"):
        with pytest.raises(Exception, match="--lambdas"):
            label_prior.parse_lambdas(bad)


def test_a_task_without_a_none_row_is_refused_with_its_folder(label_prior, tmp_path, caplog):
    (tmp_path / "sst2").mkdir()
    assert label_prior.main([str(tmp_path), "--tasks", "sst2"]) == 2
    assert "no model" in caplog.text or "has no `none` row" in caplog.text
    assert not (tmp_path / "label_prior.json").exists()


def test_tasks_without_a_fixed_set_of_options_are_refused(label_prior, tmp_path, data_dir):
    """TruthfulQA's options are each question's own answers: no per-option prior, refused before any scoring."""
    from sadi_peft.tasks import examples_digest, get_task, select_examples

    task = get_task("truthfulqa_mc1")
    test = select_examples(task.load("test", str(data_dir)), 5, 0, balanced=False)
    row = {"task": task.name, "method": "none", "protocol": "choice", "metric": "accuracy", "per_example": [0] * 5,
           "examples_digest": examples_digest(test), "seed": 0, "n": 5, "n_validation": 5, "model": "x"}
    (tmp_path / task.name).mkdir()
    (tmp_path / task.name / "none.json").write_text(json.dumps(row))
    args = label_prior.argparse.Namespace(data_dir=str(data_dir), batch_size=4, lambdas=[0.0])
    with pytest.raises(label_prior.ControlError, match="the options differ between examples"):
        label_prior.fit_task(task.name, tmp_path, None, None, args)
    with pytest.raises(label_prior.ControlError, match="needs a choice task scored by accuracy"):
        label_prior.fit_task("triviaqa", tmp_path, None, None, args)
    row["examples_digest"] = "0" * 16  # rows scored on other data
    (tmp_path / task.name / "none.json").write_text(json.dumps(row))
    with pytest.raises(label_prior.ControlError, match="pass the data folder they were scored on"):
        label_prior.fit_task(task.name, tmp_path, None, None, args)
