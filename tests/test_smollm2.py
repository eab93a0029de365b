"""Integration tests on the real SmolLM2-135M-Instruct (CPU, fp32): calibration, steering, save/load."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import sadi_peft
from sadi_peft.tasks import SST2_LABEL_WORDS, choice_logprobs, load_sst2, select_examples, sst2_pairs, sst2_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return smollm2_path, tokenizer


@pytest.fixture(scope="module")
def sst2(data_dir):
    pairs = sst2_pairs(select_examples(load_sst2("train", data_dir), 24, seed=0))
    held_out = select_examples(load_sst2("dev", data_dir), 24, seed=1)
    return pairs, held_out


@pytest.fixture(scope="module")
def calibrated(smol, sst2):
    path, tokenizer = smol
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path).eval(),
        sadi_peft.SADIConfig(variant="head", top_k=4, delta=9.0, positions="last"),
    )
    result = sadi_peft.calibrate(model, tokenizer, sst2[0], batch_size=8, show_progress=False)
    return model, result


def test_calibration_on_real_model(calibrated, smol, sst2):
    model, result = calibrated
    assert result.num_pairs == len(sst2[0])
    assert all(torch.isfinite(s).all() for s in result.scores.values())
    assert len(result.scores) == 30 and all(s.numel() == 9 for s in result.scores.values())
    assert len(result.selected) == 4 and all(score > 0 for _, _, score in result.selected)
    # batched (right-padded) and one-by-one calibration agree on a real model too
    again = sadi_peft.calibrate(model, smol[1], sst2[0][:6], batch_size=1, show_progress=False)
    batched = sadi_peft.calibrate(model, smol[1], sst2[0][:6], batch_size=6, show_progress=False)
    for name in again.scores:
        torch.testing.assert_close(again.scores[name], batched.scores[name], atol=1e-5, rtol=0)
    sadi_peft.calibrate(model, smol[1], sst2[0], batch_size=8, show_progress=False)  # restore the fixture's mask


def test_steering_moves_the_label_choice(calibrated, smol, sst2):
    model, _ = calibrated
    prompts = [sst2_prompt(example["text"]) for example in sst2[1]]
    steered = choice_logprobs(model, smol[1], prompts, SST2_LABEL_WORDS, batch_size=8, progress=False)
    with model.disable_adapter():
        base = choice_logprobs(model, smol[1], prompts, SST2_LABEL_WORDS, batch_size=8, progress=False)
    margin_shift = ((steered[:, 1] - steered[:, 0]) - (base[:, 1] - base[:, 0])).abs()
    assert torch.isfinite(steered).all()
    assert float(margin_shift.mean()) > 0.05, "a K=4, gain-10 head mask should move the Positive/Negative margin"


def test_save_and_reload_give_identical_logits(calibrated, smol, tmp_path):
    model, _ = calibrated
    path, tokenizer = smol
    batch = tokenizer(["The film was a delight.", "Answer:"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
    sadi_peft.save_pretrained(model, tmp_path / "adapter")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    peft_loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        assert torch.equal(peft_loaded(**batch).logits, expected)
