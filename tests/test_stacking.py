"""SADI stacked with LoRA: both active, saved and loaded as one folder, merged exactly in either nesting order."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama
from transformers import AutoModelForCausalLM

import sadi_peft
from sadi_peft import SADIConfig
from sadi_peft.stacking import add_sadi_adapter, load_sadi_adapter, load_stack, merge_and_unload, saved_adapter_dirs

TOK = CharTokenizer()
IDS = torch.tensor([[5, 9, 14, 3, 22, 31, 7], [8, 8, 40, 12, 6, 19, 25]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _lora(base, targets=("o_proj", "down_proj", "q_proj")):
    """A LoRA with non-zero B (as after training), so that dropping it would show."""
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    return model.eval()


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("variant, positions", [("head", "last"), ("hidden", "all"), ("neuron", "all")])
def test_lora_plus_sadi_save_load_round_trip(tmp_path, base_dir, variant, positions):
    torch.manual_seed(1)
    model = _lora(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    lora_only = logits(model)
    add_sadi_adapter(model, SADIConfig(variant=variant, top_k=3, delta=6.0, positions=positions), "sadi")
    sadi_peft.calibrate(model, TOK, PAIRS, adapter_name="sadi", show_progress=False)
    stacked = logits(model)
    assert not torch.allclose(stacked, lora_only)  # both are active
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(AutoModelForCausalLM.from_pretrained(base_dir).eval()))

    sadi_peft.save_pretrained(model, tmp_path / "stack")
    assert set(saved_adapter_dirs(tmp_path / "stack")) == {"default", "sadi"}
    loaded = load_stack(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "stack")
    assert torch.equal(logits(loaded), stacked)

    # the LoRA file alone loads in stock PEFT with the LoRA's own names, as if SADI had never been there
    lora_alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "stack").eval()
    assert torch.equal(logits(lora_alone), lora_only)

    # plain PeftModel.save_pretrained names SADI-wrapped LoRA keys "P.base_layer.lora_*"; load_stack copes
    model.save_pretrained(tmp_path / "plain")
    assert torch.equal(logits(load_stack(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "plain")), stacked)


def test_sadi_calibrated_on_top_of_lora_sees_the_lora():
    base = tiny_llama()
    plain = get_peft_model(tiny_llama(), SADIConfig(variant="hidden", top_k=3))
    torch.manual_seed(1)
    stack = _lora(base)
    add_sadi_adapter(stack, SADIConfig(variant="hidden", top_k=3), "sadi")
    on_lora = sadi_peft.calibrate(stack, TOK, PAIRS, adapter_name="sadi", show_progress=False)
    on_base = sadi_peft.calibrate(plain, TOK, PAIRS, show_progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(on_lora.scores[name], on_base.scores[name])


def test_merge_lora_first_then_sadi_equals_the_stack():
    torch.manual_seed(1)
    lora = _lora(tiny_llama())
    torch.manual_seed(1)
    reference = _lora(tiny_llama())
    merged_base = lora.merge_and_unload()
    steered = get_peft_model(merged_base, SADIConfig(variant="head", top_k=2, delta=6.0, positions="all"))
    result = sadi_peft.calibrate(steered, TOK, PAIRS, show_progress=False)

    add_sadi_adapter(reference, SADIConfig(variant="head", top_k=2, delta=6.0, positions="all"), "sadi")
    stacked = sadi_peft.calibrate(reference, TOK, PAIRS, adapter_name="sadi", show_progress=False)
    assert [(n, u) for n, u, _ in result.selected] == [(n, u) for n, u, _ in stacked.selected]
    torch.testing.assert_close(logits(steered), logits(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["head", "hidden"])
def test_peft_merge_and_unload_keeps_the_lora_under_sadi(variant):
    """PEFT merges only the outer layer of a nested stack; SADI's layer merges the LoRA it wraps first."""
    torch.manual_seed(1)
    model = _lora(tiny_llama())
    add_sadi_adapter(model, SADIConfig(variant=variant, top_k=3, delta=6.0, positions="all"), "sadi")
    sadi_peft.calibrate(model, TOK, PAIRS, adapter_name="sadi", show_progress=False)
    expected = logits(model)
    outer = model.base_model.model.model.layers[0].self_attn.o_proj
    if variant == "head":
        assert isinstance(outer, sadi_peft.SADILayer) and not isinstance(outer.base_layer, torch.nn.Linear)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)


def test_merge_and_unload_with_lora_outside_sadi(tmp_path, base_dir):
    """transformers' load_adapter in the order SADI then LoRA nests LoRA outside: our merge stays exact."""
    sadi = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(),
                          SADIConfig(variant="head", top_k=2, delta=6.0, positions="all"))
    sadi_peft.calibrate(sadi, TOK, PAIRS, show_progress=False)
    sadi.save_pretrained(tmp_path / "sadi")
    torch.manual_seed(1)
    lora = _lora(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    lora.save_pretrained(tmp_path / "lora")

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model.load_adapter(str(tmp_path / "sadi"), adapter_name="sadi")
    model.load_adapter(str(tmp_path / "lora"), adapter_name="lora")
    model.set_adapter(["sadi", "lora"])
    outer = model.model.layers[0].self_attn.o_proj
    assert not isinstance(outer, sadi_peft.SADILayer) and isinstance(outer.base_layer, sadi_peft.SADILayer)
    expected = logits(model)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, sadi_peft.SADILayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)


def test_transformers_native_lora_and_sadi_together(tmp_path, base_dir):
    torch.manual_seed(1)
    lora = _lora(AutoModelForCausalLM.from_pretrained(base_dir).eval())
    lora.save_pretrained(tmp_path / "lora")
    add_sadi_adapter(lora, SADIConfig(variant="head", top_k=2, delta=6.0), "sadi")
    sadi_peft.calibrate(lora, TOK, PAIRS, adapter_name="sadi", show_progress=False)
    expected = logits(lora)
    lora.save_pretrained(tmp_path / "stack")

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model.load_adapter(str(tmp_path / "lora"), adapter_name="lora")
    load_sadi_adapter(model, tmp_path / "stack" / "sadi", adapter_name="sadi")
    assert sorted(model.active_adapters()) == ["lora", "sadi"]
    assert torch.equal(logits(model), expected)
    model.disable_adapters()
    assert torch.equal(logits(model), logits(AutoModelForCausalLM.from_pretrained(base_dir).eval()))


def test_last_position_sadi_over_lora_refuses_merge_before_touching_weights():
    torch.manual_seed(1)
    model = _lora(tiny_llama())
    add_sadi_adapter(model, SADIConfig(variant="head", top_k=2, delta=6.0, positions="last"), "sadi")
    sadi_peft.calibrate(model, TOK, PAIRS, adapter_name="sadi", show_progress=False)
    expected = logits(model)
    with pytest.raises(ValueError, match="positions='last'.*cannot be merged"):
        merge_and_unload(model)
    assert torch.equal(logits(model), expected)
    # PEFT's own merge_and_unload, driven by the LoRA tuner, merges the LoRA layers it meets before the SADI one
    # refuses; the result stays numerically the same stack
    with pytest.raises(ValueError, match="positions='last'.*cannot be merged"):
        model.merge_and_unload()
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_loading_a_non_sadi_adapter_as_sadi_names_what_was_found(tmp_path):
    torch.manual_seed(1)
    _lora(tiny_llama()).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="holds a LORA adapter, not a SADI adapter"):
        load_sadi_adapter(_lora(tiny_llama()), tmp_path / "lora")
