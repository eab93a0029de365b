"""Property tests (hypothesis): merge exactness, save/load identity, calibration invariances; no shared state."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama

import sadi_peft
from sadi_peft import SADIConfig
from sadi_peft.model import sadi_layers

TOK = CharTokenizer()
IDS = torch.tensor([[5, 9, 14, 3, 22, 31, 7], [8, 8, 40, 12, 6, 19, 25]])
PROFILE = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _random_mask(model, data, density):
    for _, layer in sadi_layers(model, "default"):
        n = layer.num_units("default")
        bits = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        layer.sadi_mask["default"].copy_(torch.tensor(bits) & (torch.rand(n) < density))


@PROFILE
@given(data=st.data(), variant=st.sampled_from(["head", "neuron", "hidden"]),
       delta=st.floats(min_value=-0.9, max_value=50.0), density=st.floats(min_value=0.0, max_value=1.0))
def test_merged_equals_unmerged_for_random_masks_and_gains(data, variant, delta, density):
    model = get_peft_model(tiny_llama(), SADIConfig(variant=variant, top_k=1, delta=delta, positions="all"))
    _random_mask(model, data, density)
    expected = logits(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    assert torch.equal(logits(model), expected)


@PROFILE
@given(data=st.data(), variant=st.sampled_from(["head", "neuron", "hidden"]),
       positions=st.sampled_from(["last", "all"]), delta=st.floats(min_value=-0.9, max_value=50.0))
def test_save_load_is_identity_on_state_dict_and_logits(tmp_path_factory, data, variant, positions, delta):
    model = get_peft_model(tiny_llama(), SADIConfig(variant=variant, top_k=1, delta=delta, positions=positions))
    _random_mask(model, data, 0.5)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    loaded = PeftModel.from_pretrained(tiny_llama(), folder)
    original = {k: v for k, v in model.state_dict().items() if "sadi_" in k}
    reloaded = {k: v for k, v in loaded.state_dict().items() if "sadi_" in k}
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert torch.equal(logits(loaded), logits(model))


@settings(max_examples=8, deadline=None)
@given(batch_size=st.integers(min_value=1, max_value=9), order=st.permutations(list(range(len(PAIRS)))),
       variant=st.sampled_from(["head", "neuron", "hidden"]))
def test_scores_do_not_depend_on_batch_size_or_pair_order(batch_size, order, variant):
    model = get_peft_model(tiny_llama(), SADIConfig(variant=variant, top_k=2))
    reference = sadi_peft.calibrate(model, TOK, PAIRS, batch_size=len(PAIRS), show_progress=False)
    shuffled = sadi_peft.calibrate(model, TOK, [PAIRS[i] for i in order], batch_size=batch_size, show_progress=False)
    for name in reference.scores:
        torch.testing.assert_close(shuffled.scores[name], reference.scores[name], atol=1e-5, rtol=0)


def test_two_models_steered_in_two_threads_keep_their_own_results():
    models, expected = [], []
    for seed, (variant, positions) in enumerate((("head", "last"), ("hidden", "all"))):
        model = get_peft_model(tiny_llama(seed), SADIConfig(variant=variant, top_k=3, delta=10.0, positions=positions))
        sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
        models.append(model)
        expected.append(logits(model))
    errors, barrier = [], threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(20):
                if not torch.equal(logits(models[i]), expected[i]):
                    errors.append(i)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_package_holds_no_module_level_activation_cache():
    """Nothing in sadi_peft keeps tensors at module level: all state lives on the model instances."""
    import importlib
    import pkgutil

    offenders = []
    for info in pkgutil.walk_packages(sadi_peft.__path__, "sadi_peft."):
        if ".cli" in info.name or "lm_eval" in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) or (
                isinstance(value, (dict, list)) and any(isinstance(v, torch.Tensor) for v in (value.values() if isinstance(value, dict) else value))
            ):
                offenders.append(f"{info.name}.{name}")
    assert not offenders
