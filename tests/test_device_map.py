"""A base model split by accelerate's device_map (CPU + disk offload) steers exactly like the unsplit model."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama
from transformers import AutoModelForCausalLM

import sadi_peft

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
         "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(num_hidden_layers=4).save_pretrained(path)
    return path


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("variant", ["head", "neuron", "hidden"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_split_model_matches_unsplit(tmp_path, base_dir, variant, positions):
    config = dict(variant=variant, top_k=3, delta=5.0, positions=positions)
    whole = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(), sadi_peft.SADIConfig(**config))
    split_base = AutoModelForCausalLM.from_pretrained(base_dir, device_map=SPLIT, offload_folder=tmp_path / "off")
    assert set(split_base.hf_device_map.values()) == {"cpu", "disk"}
    split = get_peft_model(split_base.eval(), sadi_peft.SADIConfig(**config))
    a = sadi_peft.calibrate(whole, CharTokenizer(), PAIRS, show_progress=False)
    b = sadi_peft.calibrate(split, CharTokenizer(), PAIRS, show_progress=False)
    for name in a.scores:
        torch.testing.assert_close(b.scores[name], a.scores[name], atol=1e-5, rtol=0)
    assert [(n, u) for n, u, _ in a.selected] == [(n, u) for n, u, _ in b.selected]
    expected = _logits(whole)
    torch.testing.assert_close(_logits(split), expected, atol=1e-5, rtol=0)
    kwargs = dict(input_ids=IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(split.generate(**kwargs), whole.generate(**kwargs))

    sadi_peft.save_pretrained(split, tmp_path / "adapter")
    reloaded = AutoModelForCausalLM.from_pretrained(base_dir, device_map=SPLIT, offload_folder=tmp_path / "off2")
    reloaded.load_adapter(str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded.eval()), expected, atol=1e-5, rtol=0)
