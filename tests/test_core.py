"""Unit tests of the SADI tuner on tiny Llama models: config, registration, calibration, loading, merge, generate."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from tiny_models import PAIRS, CharTokenizer, tiny_llama
from transformers import AutoModelForCausalLM

import sadi_peft
from sadi_peft import SADIConfig

TOK = CharTokenizer()
IDS = torch.tensor([[5, 9, 14, 3, 22, 31, 7], [8, 8, 40, 12, 6, 19, 25]])


def logits(model, input_ids=IDS, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def steered(variant="head", positions="last", top_k=2, delta=8.0, seed=0, **kw):
    model = get_peft_model(tiny_llama(seed), SADIConfig(variant=variant, top_k=top_k, delta=delta, positions=positions, **kw))
    sadi_peft.calibrate(model, TOK, PAIRS, batch_size=4, show_progress=False)
    return model


@pytest.fixture
def saved_base(tmp_path):
    """A tiny base saved to disk, so adapters record a loadable base_model_name_or_path."""
    path = tmp_path / "base"
    tiny_llama(0).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------- registration
def test_registration_is_idempotent_and_complete():
    sadi_peft.register()
    sadi_peft.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SADI"] is SADIConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SADI"] is sadi_peft.SADIModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SADI"] == "sadi_"
    assert SADIConfig().peft_type.value == "SADI"


def test_config_json_round_trip(tmp_path):
    config = SADIConfig(variant="neuron", top_k=7, delta=3.5, positions="all", layers_to_transform=[1])
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SADIConfig)
    assert loaded.peft_type is sadi_peft.SADIPeftType.SADI
    assert (loaded.variant, loaded.top_k, loaded.delta, loaded.positions) == ("neuron", 7, 3.5, "all")
    assert loaded.gain == 4.5


@pytest.mark.parametrize(
    "field, value",
    [
        ("variant", "heads"),
        ("top_k", 0),
        ("top_k", 2.5),
        ("top_k", True),
        ("delta", -1.0),
        ("delta", -3),
        ("delta", float("nan")),
        ("delta", "9"),
        ("positions", "first"),
        ("ranking", "abs"),
        ("num_heads", 0),
        ("layers_to_transform", [-1]),
        ("target_modules", []),
        ("neuron_statistic", "gate"),
    ],
)
def test_config_rejects_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SADIConfig(**{field: value})
    message = str(info.value)
    assert f"SADIConfig.{field}=" in message and repr(value) in message and "expected" in message


def test_top_k_larger_than_units_is_refused():
    with pytest.raises(ValueError, match=r"top_k=9 is larger than the number of head units .*\(8\)"):
        get_peft_model(tiny_llama(), SADIConfig(variant="head", top_k=9))


def test_default_targets_and_unit_counts():
    for variant, units in (("head", 4), ("neuron", 48), ("hidden", 32)):
        model = get_peft_model(tiny_llama(), SADIConfig(variant=variant, top_k=1))
        config = model.peft_config["default"]
        suffix = "self_attn.o_proj" if variant == "head" else "mlp.down_proj"
        assert config.unit_counts == {f"model.layers.{i}.{suffix}": units for i in range(2)}


def test_layers_to_transform_limits_the_candidates():
    model = get_peft_model(tiny_llama(), SADIConfig(variant="head", top_k=2, layers_to_transform=[1]))
    assert list(model.peft_config["default"].unit_counts) == ["model.layers.1.self_attn.o_proj"]
    result = sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    assert {name for name, _, _ in result.selected} == {"model.layers.1.self_attn.o_proj"}


# ---------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("variant", ["head", "neuron", "hidden"])
def test_calibration_is_batch_size_invariant_and_deterministic(variant):
    model = get_peft_model(tiny_llama(), SADIConfig(variant=variant, top_k=3))
    big = sadi_peft.calibrate(model, TOK, PAIRS, batch_size=16, show_progress=False)
    one = sadi_peft.calibrate(model, TOK, PAIRS, batch_size=1, show_progress=False)
    again = sadi_peft.calibrate(model, TOK, PAIRS, batch_size=16, show_progress=False)
    for name in big.scores:
        torch.testing.assert_close(big.scores[name], one.scores[name], atol=1e-5, rtol=0)
        assert torch.equal(big.scores[name], again.scores[name])
    assert big.num_pairs == len(PAIRS)
    assert [(n, u) for n, u, _ in big.selected] == [(n, u) for n, u, _ in one.selected]
    assert sum(int(m.sum()) for m in big.mask.values()) == 3


def test_head_score_is_mean_over_head_dim_of_signed_difference():
    """Recompute the head statistic by hand with a plain hook on the base model and compare."""
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, SADIConfig(variant="head", top_k=1))
    result = sadi_peft.calibrate(model, TOK, PAIRS, batch_size=3, show_progress=False)

    captured = {}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0][0, -1]))
        for i, layer in enumerate(reference.model.layers)
    ]
    diff = {i: torch.zeros(4, dtype=torch.float64) for i in range(2)}
    for prompt, pos, neg in PAIRS:
        for text, sign in ((f"{prompt.strip()} {pos}", 1), (f"{prompt.strip()} {neg}", -1)):
            with torch.no_grad():
                reference(input_ids=torch.tensor([TOK.encode(text)]))
            for i in range(2):
                diff[i] += sign * captured[i].double().reshape(4, 8).mean(-1)
    for h in hooks:
        h.remove()
    for i in range(2):
        expected = (diff[i] / len(PAIRS)).float()
        torch.testing.assert_close(result.scores[f"model.layers.{i}.self_attn.o_proj"], expected, atol=1e-6, rtol=0)
    flat = torch.cat([diff[0], diff[1]])
    assert result.selected[0][2] == pytest.approx(float(flat.max() / len(PAIRS)), abs=1e-6)


def test_neuron_ranks_on_gate_activation_and_input_option_differs():
    base = tiny_llama()
    act = get_peft_model(copy.deepcopy(base), SADIConfig(variant="neuron", top_k=5))
    inp = get_peft_model(copy.deepcopy(base), SADIConfig(variant="neuron", top_k=5, neuron_statistic="input"))
    a = sadi_peft.calibrate(act, TOK, PAIRS, show_progress=False)
    b = sadi_peft.calibrate(inp, TOK, PAIRS, show_progress=False)
    name = "model.layers.0.mlp.down_proj"
    assert not torch.allclose(a.scores[name], b.scores[name])

    captured = []
    hook = base.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, i, o: captured.append(o[0, -1]))
    total = torch.zeros(48, dtype=torch.float64)
    for prompt, pos, neg in PAIRS:
        for text, sign in ((f"{prompt} {pos}", 1), (f"{prompt} {neg}", -1)):
            with torch.no_grad():
                base(input_ids=torch.tensor([TOK.encode(text)]))
            total += sign * captured[-1].double()
    hook.remove()
    torch.testing.assert_close(a.scores[name], (total / len(PAIRS)).float(), atol=1e-6, rtol=0)


def test_pairs_as_dicts_and_generators_give_the_same_scores():
    model = get_peft_model(tiny_llama(), SADIConfig(variant="hidden", top_k=2))
    tuples = sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    dicts = sadi_peft.calibrate(
        model, TOK, (dict(prompt=p, positive=y, negative=n) for p, y, n in PAIRS), batch_size=3, show_progress=False
    )
    for name in tuples.scores:
        torch.testing.assert_close(tuples.scores[name], dicts.scores[name], atol=1e-6, rtol=0)


def test_scores_do_not_depend_on_pair_order():
    model = get_peft_model(tiny_llama(), SADIConfig(variant="head", top_k=2))
    forward = sadi_peft.calibrate(model, TOK, PAIRS, batch_size=3, show_progress=False)
    backward = sadi_peft.calibrate(model, TOK, PAIRS[::-1], batch_size=3, show_progress=False)
    for name in forward.scores:
        torch.testing.assert_close(forward.scores[name], backward.scores[name], atol=1e-6, rtol=0)


def test_apply_top_k_recuts_mask_from_stored_scores():
    model = steered(top_k=2)
    layers = sadi_peft.model.sadi_layers(model, "default")
    selected = sadi_peft.apply_top_k(model, 5)
    assert len(selected) == 5 and model.peft_config["default"].top_k == 5
    assert sum(int(layer.sadi_mask["default"].sum()) for _, layer in layers) == 5
    scores = [s for _, _, s in selected]
    assert scores == sorted(scores, reverse=True)
    absolute = sadi_peft.apply_top_k(model, 3, ranking="absolute")
    assert [abs(s) for _, _, s in absolute] == sorted((abs(s) for _, _, s in absolute), reverse=True)
    with pytest.raises(ValueError, match=r"top_k=9 is invalid: expected an integer in \[1, 8\]"):
        sadi_peft.apply_top_k(model, 9)


def test_calibration_does_not_see_its_own_gain():
    model = steered(variant="hidden", positions="all", top_k=3, delta=50.0)
    first = {n: s.clone() for n, s in sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False).scores.items()}
    second = sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False).scores
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- bad input
def _mask_snapshot(model):
    return {n: l.sadi_mask["default"].clone() for n, l in sadi_peft.model.sadi_layers(model, "default")}


@pytest.mark.parametrize(
    "pairs, error, pattern",
    [
        ([], ValueError, "pairs is empty"),
        ([("Q:", "Yes", "Yes")], ValueError, r"pairs\[0\]: the positive and negative texts tokenize identically"),
        ([PAIRS[0], ("Q:", "A", "B", "C")], TypeError, r"pairs\[1\] is tuple"),
        ([{"prompt": "Q:", "positive": "A"}], ValueError, r"pairs\[0\] is a dict without the key\(s\) \['negative'\]"),
        ([("Q:", "A", 3)], TypeError, r"pairs\[0\]\.negative is int"),
        ([("x" * 200, "A", "B")], ValueError, r"more than the model's context \(max_position_embeddings=128\)"),
    ],
)
def test_bad_pairs_raise_and_keep_the_previous_mask(pairs, error, pattern):
    model = steered()
    before = _mask_snapshot(model)
    with pytest.raises(error, match=pattern):
        sadi_peft.calibrate(model, TOK, pairs, batch_size=2, show_progress=False)
    after = _mask_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(m.any() for m in after.values())


def test_tokenizer_without_pad_token_is_refused_for_batches():
    model = get_peft_model(tiny_llama(), SADIConfig(top_k=1))
    with pytest.raises(ValueError, match="tokenizer has no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        sadi_peft.calibrate(model, CharTokenizer(pad_token_id=None), PAIRS, batch_size=4, show_progress=False)
    sadi_peft.calibrate(model, CharTokenizer(pad_token_id=None), PAIRS, batch_size=1, show_progress=False)


def test_calibrating_a_disabled_adapter_is_refused():
    model = get_peft_model(tiny_llama(), SADIConfig(top_k=1))
    with model.disable_adapter():
        with pytest.raises(ValueError, match="is disabled"):
            sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)


def test_generate_before_calibrate_warns_empty_mask():
    model = get_peft_model(tiny_llama(), SADIConfig(top_k=1))
    with pytest.warns(UserWarning, match="empty mask"):
        model.generate(input_ids=IDS, max_new_tokens=2, do_sample=False)


def test_unsupported_architecture_lists_supported_and_manual_override():
    from transformers import GPTJConfig

    config = GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=r"model_type='gptj'.*Supported: bloom, falcon.*target_modules"):
        get_peft_model(copy.deepcopy(base), SADIConfig(variant="head", top_k=1))
    model = get_peft_model(base, SADIConfig(variant="head", top_k=2, target_modules=["attn.out_proj"], num_heads=4))
    assert len(model.peft_config["default"].unit_counts) == 2
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)


# ---------------------------------------------------------------------------------------------- steering effect
def test_last_regime_changes_only_the_last_prompt_token_and_later():
    model = steered(positions="last", delta=20.0)
    am = torch.ones_like(IDS)
    am[1, 5:] = 0  # right padding on row 1: its last real token is at 4
    out = logits(model, attention_mask=am)
    with model.disable_adapter():
        base = logits(model, attention_mask=am)
    assert torch.equal(out[0, :6], base[0, :6]) and not torch.allclose(out[0, 6], base[0, 6])
    assert torch.equal(out[1, :4], base[1, :4]) and not torch.allclose(out[1, 4], base[1, 4])


def test_all_regime_changes_every_position_and_disable_gives_base_exactly():
    base_model = tiny_llama()
    reference = logits(base_model)
    model = get_peft_model(base_model, SADIConfig(variant="hidden", top_k=4, delta=5.0, positions="all"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    out = logits(model)
    assert not torch.allclose(out[:, 0], reference[:, 0])
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    assert torch.equal(logits(model), out)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_eager_and_sdpa_steer_identically(positions):
    outs = []
    for impl in ("eager", "sdpa"):
        model = get_peft_model(tiny_llama(attn_implementation=impl), SADIConfig(top_k=2, delta=10.0, positions=positions))
        sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
        with model.disable_adapter():
            base = logits(model)
        outs.append(logits(model))
        assert not torch.allclose(outs[-1], base)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- generate
def _left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        am[i, width - len(r):] = 1
    return ids, am


def _greedy(model, ids, am=None, **kw):
    return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_cached_and_uncached_generation_agree(positions):
    model = steered(positions=positions, delta=20.0)
    ids, am = _left_padded([TOK.encode("Review: great. Sentiment:"), TOK.encode("Bad film!")])
    assert torch.equal(_greedy(model, ids, am), _greedy(model, ids, am, use_cache=False))


@pytest.mark.parametrize("positions", ["last", "all"])
def test_left_padded_batch_rows_match_their_single_runs(positions):
    model = steered(positions=positions, delta=20.0)
    rows = [TOK.encode("Review: great. Sentiment:"), TOK.encode("Bad film!"), TOK.encode("so-so")]
    ids, am = _left_padded(rows)
    batched = _greedy(model, ids, am)
    for i, row in enumerate(rows):
        alone = _greedy(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))
        assert batched[i, -6:].tolist() == alone[0, -6:].tolist()


@pytest.mark.parametrize("positions", ["last", "all"])
def test_beam_search_runs_and_steering_changes_greedy_output(positions):
    model = steered(positions=positions, delta=40.0, top_k=3)
    ids = torch.tensor([TOK.encode("Review: great. Sentiment:")])
    beams = _greedy(model, ids, num_beams=3, num_return_sequences=2)
    assert beams.shape == (2, ids.shape[1] + 6)
    steered_out = _greedy(model, ids)
    with model.disable_adapter():
        base_out = _greedy(model, ids)
    assert not torch.equal(steered_out, base_out)


def test_empty_mask_generates_the_base_output():
    base = tiny_llama()
    ids = torch.tensor([TOK.encode("Review: great. Sentiment:")])
    expected = _greedy(base, ids)
    model = get_peft_model(base, SADIConfig(top_k=1))
    with pytest.warns(UserWarning, match="empty mask"):
        assert torch.equal(_greedy(model, ids), expected)


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip_all_paths(tmp_path, saved_base):
    base = AutoModelForCausalLM.from_pretrained(saved_base).eval()
    model = get_peft_model(base, SADIConfig(variant="head", top_k=2, delta=8.0, positions="last"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    expected = logits(model)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "SADI" and config["base_model_name_or_path"] == saved_base

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), adapter).eval()
    assert torch.equal(logits(loaded), expected)

    auto = AutoModelForCausalLM.from_pretrained(adapter).eval()  # base from base_model_name_or_path
    assert torch.equal(logits(auto), expected)

    fresh = AutoModelForCausalLM.from_pretrained(saved_base).eval()
    fresh.load_adapter(str(adapter), adapter_name="sst2")
    assert torch.equal(logits(fresh), expected)

    from peft import AutoPeftModelForCausalLM

    assert torch.equal(logits(AutoPeftModelForCausalLM.from_pretrained(adapter).eval()), expected)

    # the scores travel with the adapter: a new K without running pairs again
    selected = sadi_peft.apply_top_k(loaded, 4)
    assert len(selected) == 4


def test_saved_state_dict_holds_mask_and_scores(tmp_path):
    from safetensors.torch import load_file

    model = steered()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    masks = {k: v for k, v in tensors.items() if k.endswith("sadi_mask")}
    scores = {k: v for k, v in tensors.items() if k.endswith("sadi_scores")}
    assert len(masks) == 2 and len(scores) == 2
    assert all(v.dtype == torch.bool for v in masks.values())
    assert sum(int(v.sum()) for v in masks.values()) == 2


def test_native_transformers_path_generates_like_peft_model(tmp_path, saved_base):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base).eval(), SADIConfig(top_k=2, delta=20.0))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    model.save_pretrained(tmp_path / "a")
    ids, am = _left_padded([TOK.encode("Review: great. Sentiment:"), TOK.encode("Bad film!")])
    expected = _greedy(model, ids, am)
    native = AutoModelForCausalLM.from_pretrained(saved_base).eval()
    native.load_adapter(str(tmp_path / "a"))
    assert torch.equal(_greedy(native, ids, am), expected)
    with sadi_peft.prompt_boundary(native, am):
        assert torch.equal(_greedy(native, ids, am, use_cache=False), expected)


def test_several_adapters_set_adapter_and_delete(tmp_path, saved_base):
    a = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base).eval(), SADIConfig(top_k=1, delta=30.0))
    sadi_peft.calibrate(a, TOK, PAIRS, show_progress=False)
    a.save_pretrained(tmp_path / "head")
    b = get_peft_model(
        AutoModelForCausalLM.from_pretrained(saved_base).eval(),
        SADIConfig(variant="hidden", top_k=3, delta=5.0, positions="all"),
    )
    sadi_peft.calibrate(b, TOK, PAIRS, show_progress=False)
    b.save_pretrained(tmp_path / "hidden")
    expect_a, expect_b = logits(a), logits(b)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), tmp_path / "head", adapter_name="head")
    model.load_adapter(tmp_path / "hidden", adapter_name="hidden")
    model.eval()
    assert torch.equal(logits(model), expect_a)
    model.set_adapter("hidden")
    assert torch.equal(logits(model), expect_b)
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(AutoModelForCausalLM.from_pretrained(saved_base).eval()))
    model.delete_adapter("hidden")
    assert list(model.peft_config) == ["head"]
    model.set_adapter("head")
    assert torch.equal(logits(model), expect_a)


def test_adapter_for_another_base_is_refused_naming_both_shapes(tmp_path):
    model = steered()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"expects 2 modules with 4 units each, but this model has 3 modules with 4"):
        PeftModel.from_pretrained(tiny_llama(num_hidden_layers=3), tmp_path)
    with pytest.raises(ValueError, match=r"num_heads=4 attention heads, but this model has 8"):
        PeftModel.from_pretrained(tiny_llama(num_attention_heads=8, num_key_value_heads=2, hidden_size=64), tmp_path)
    hidden = steered(variant="hidden")
    hidden.save_pretrained(tmp_path / "hidden")
    with pytest.raises(ValueError, match=r"expects 2 modules with 32 units each, but this model has 2 modules with 64"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=64), tmp_path / "hidden")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_an_error_not_a_silent_load(tmp_path, damage):
    model = steered()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 16 + data[16:])
    with pytest.raises(Exception, match="(?i)safetensor|deserializ|header|invalid"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_atomic_save_never_leaves_a_half_written_adapter(tmp_path, monkeypatch):
    model = steered()
    target = tmp_path / "adapter"
    sadi_peft.save_pretrained(model, target)
    before = sorted(os.listdir(target))
    original = (target / "adapter_model.safetensors").read_bytes()

    def crash(directory, **kwargs):
        (open(os.path.join(directory, "adapter_model.safetensors"), "wb")).write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        sadi_peft.save_pretrained(model, target)
    assert sorted(os.listdir(target)) == before
    assert (target / "adapter_model.safetensors").read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


# ---------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("variant", ["head", "neuron", "hidden"])
def test_merge_and_unload_is_exact_for_all_positions(variant):
    model = steered(variant=variant, positions="all", top_k=3, delta=6.0)
    expected = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, sadi_peft.SADILayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=0)
    # the merged model is plain: its forward hooks are gone too
    assert not merged._forward_pre_hooks and "_sadi_context" not in merged.__dict__


def test_merge_unmerge_restores_weights_bit_exactly():
    model = steered(variant="hidden", positions="all", top_k=3, delta=6.0)
    base_weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    assert all(torch.equal(base_weights[k], after[k]) for k in base_weights)
    assert torch.equal(logits(model), expected)


def test_merge_is_refused_for_last_positions():
    model = steered(positions="last")
    with pytest.raises(ValueError, match="positions='last'.*cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="positions='last'.*cannot be merged"):
        model.merge_adapter()


def test_calibration_itself_raises_no_empty_mask_warning():
    import warnings

    model = get_peft_model(tiny_llama(), SADIConfig(top_k=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
        logits(model)


def test_native_load_adapter_several_and_switch(tmp_path, saved_base):
    expected = {}
    for name, top_k in (("a", 1), ("b", 3)):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base).eval(), SADIConfig(top_k=top_k, delta=20.0))
        sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
        model.save_pretrained(tmp_path / name)
        expected[name] = logits(model)
    native = AutoModelForCausalLM.from_pretrained(saved_base).eval()
    native.load_adapter(str(tmp_path / "a"), adapter_name="a")
    native.load_adapter(str(tmp_path / "b"), adapter_name="b")  # must not disturb "a"
    for name in ("a", "b", "a"):
        native.set_adapter(name)
        assert torch.equal(logits(native), expected[name])
    native.disable_adapters()
    assert torch.equal(logits(native), logits(AutoModelForCausalLM.from_pretrained(saved_base).eval()))
    native.enable_adapters()
    native.delete_adapter("b")
    native.set_adapter("a")
    assert torch.equal(logits(native), expected["a"])


def test_calibration_streams_pairs_batch_by_batch():
    """Pairs are read lazily, one batch at a time: only running sums are kept, never all activations."""
    model = get_peft_model(tiny_llama(), SADIConfig(top_k=1))
    consumed = []
    seen_at_forward = []

    def pairs():
        for i in range(40):
            consumed.append(i)
            yield PAIRS[i % len(PAIRS)]

    hook = model.get_base_model().register_forward_pre_hook(lambda *a: seen_at_forward.append(len(consumed)))
    result = sadi_peft.calibrate(model, TOK, pairs(), batch_size=4, show_progress=False)
    hook.remove()
    assert result.num_pairs == 40
    assert seen_at_forward == list(range(4, 41, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_overflow_is_reported(dtype):
    model = steered(variant="hidden", positions="all", top_k=3, delta=5.0)
    model.to(dtype)
    logits(model)  # a moderate gain runs
    sadi_peft.apply_top_k(model, 3)
    for _, layer in sadi_peft.model.sadi_layers(model, "default"):
        layer.sadi_delta["default"] = 1e6 if dtype == torch.float16 else float(torch.finfo(torch.float32).max)
    with pytest.raises(sadi_peft.SADIOverflowError, match=r"inf/nan in torch\.(float16|bfloat16) at model\.layers\.\d\.mlp"):
        logits(model)


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.update(brand_new_option=1), r"keys SADIConfig does not know: \['brand_new_option'\].*upgrade"),
    (lambda c: c.pop("variant"), r"lacks the SADI key\(s\) \['variant'\]"),
    (lambda c: c.pop("unit_counts"), r"lacks the SADI key\(s\) \['unit_counts'\]"),
])
def test_adapter_config_with_unknown_or_missing_keys_is_refused(tmp_path, edit, pattern):
    steered().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=pattern):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_wrong_peft_type_in_a_sadi_folder_is_not_loaded_as_sadi(tmp_path):
    """Documented behaviour: PEFT itself builds the named type; it warns about the SADI keys it does not know."""
    steered().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["peft_type"] = "LORA"
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['calibration', 'delta'"):
        model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(isinstance(m, sadi_peft.SADILayer) for m in model.modules())


def test_prompt_boundary_pins_the_steered_token_for_teacher_forcing_and_cached_prefixes():
    model = steered(positions="last", delta=20.0)
    prompt = TOK.encode("Review: great. Sentiment:")
    answer = TOK.encode(" Positive")[1:]
    full = torch.tensor([prompt + answer])
    prompt_mask = torch.tensor([[1] * len(prompt) + [0] * len(answer)])
    n = len(prompt)
    with sadi_peft.prompt_boundary(model, prompt_mask):
        forced = logits(model, full)
    with model.disable_adapter():
        base = logits(model, full)
    alone = logits(model, torch.tensor([prompt]))  # the prompt alone: steered at its last token
    assert torch.equal(forced[0, : n - 1], base[0, : n - 1])
    torch.testing.assert_close(forced[0, n - 1], alone[0, n - 1], atol=1e-5, rtol=0)
    assert not torch.allclose(forced[0, n - 1], base[0, n - 1])

    # the same scores from a KV cache of the prompt's prefix, continued with [last prompt token + answer]
    with torch.no_grad(), model.disable_adapter():
        cache = model(input_ids=torch.tensor([prompt[:-1]]), use_cache=True).past_key_values
    suffix = torch.tensor([prompt[-1:] + answer])
    with torch.no_grad(), sadi_peft.prompt_boundary(model, torch.ones(1, n, dtype=torch.long)):
        out = model(input_ids=suffix, past_key_values=cache, attention_mask=torch.ones(1, full.shape[1], dtype=torch.long),
                    position_ids=torch.arange(n - 1, full.shape[1]).unsqueeze(0)).logits
    torch.testing.assert_close(out[0], forced[0, n - 1 :], atol=1e-5, rtol=0)


def test_set_delta_changes_the_gain_and_validates():
    model = steered(positions="all", variant="hidden", delta=2.0)
    before = logits(model)
    sadi_peft.set_delta(model, 8.0)
    assert model.peft_config["default"].delta == 8.0
    assert not torch.allclose(logits(model), before)
    sadi_peft.set_delta(model, 2.0)
    assert torch.equal(logits(model), before)
    with pytest.raises(ValueError, match=r"delta=-1 is invalid"):
        sadi_peft.set_delta(model, -1)


@pytest.mark.parametrize("positions", ["last", "all"])
def test_layers_with_an_empty_mask_follow_every_later_change(positions):
    """A wrapped layer whose mask is empty skips straight to its base layer (the decode-step fast path); editing
    the mask in place, replacing it, changing delta, switching adapters or disabling them must still take effect."""
    model = steered(positions=positions, top_k=1)
    layers = [layer for _, layer in sadi_peft.model.sadi_layers(model, "default")]
    empty = next(layer for layer in layers if not bool(layer.sadi_mask["default"].any()))
    before = logits(model)
    assert torch.equal(logits(model), before)  # the cache is warm now
    empty.sadi_mask["default"][0] = True  # in place
    edited = logits(model)
    assert not torch.equal(edited, before)
    empty.sadi_mask["default"][0] = False
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    empty.sadi_mask["default"] = torch.ones_like(empty.sadi_mask["default"])  # replaced
    assert not torch.equal(logits(model), before)
    empty.sadi_mask["default"] = torch.zeros_like(empty.sadi_mask["default"])
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    with model.disable_adapter():
        plain = logits(model)
    assert not torch.equal(plain, before)
    sadi_peft.set_delta(model, 0.0)
    torch.testing.assert_close(logits(model), plain, atol=0, rtol=0)
