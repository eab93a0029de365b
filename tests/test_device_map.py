"""A base model split by accelerate's device_map (CPU + disk offload) steers exactly like the unsplit model.

Also: the real SmolLM2-135M split by ``max_memory`` (not a hand-written map), weights left on ``meta`` with nothing to
load them refused by name, and calibration's recording keeping only per-layer running sums (split or not).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from peft import get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama, tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import sadi_peft
from sadi_peft import calibration

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


# ------------------------------------------------------------------------------------------------ weights on meta
def test_a_device_map_sending_a_target_to_meta_is_refused_by_name(tmp_path, base_dir):
    device_map = dict(SPLIT, **{"model.layers.1": "meta"})  # accepted by transformers; nothing ever loads layer 1
    base = AutoModelForCausalLM.from_pretrained(base_dir, device_map=device_map, offload_folder=tmp_path / "off")
    model = get_peft_model(base.eval(), sadi_peft.SADIConfig(variant="head", top_k=3))
    with pytest.raises(ValueError) as info:
        sadi_peft.calibrate(model, CharTokenizer(), PAIRS, show_progress=False)
    message = str(info.value)
    assert message.startswith("9 module(s) have weights on the meta device and no accelerate offload hook to load "
                              "them: 'model.layers.1.self_attn.o_proj', ")  # the SADI target first
    assert "1 of them wrapped by the SADI adapter" in message and "offload_folder=" in message
    assert "model.layers.2" not in message  # disk-offloaded layers have a loader: fine
    assert not any(bool(layer.sadi_mask["default"].any()) for _, layer in sadi_peft.model.sadi_layers(model, "default"))


def test_a_model_never_loaded_from_init_empty_weights_is_refused():
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(tiny_llama_config())
    model = get_peft_model(base, sadi_peft.SADIConfig(variant="neuron", top_k=3))  # wrapping alone is fine
    with pytest.raises(ValueError, match=r"have weights on the meta device .*'model.layers.0.mlp.down_proj', "
                                         r"'model.layers.1.mlp.down_proj', 'model.embed_tokens'"):
        sadi_peft.calibrate(model, CharTokenizer(), PAIRS, show_progress=False)


def test_a_module_moved_to_meta_by_hand_is_refused():
    base = tiny_llama()
    base.model.layers[1].self_attn.o_proj.to("meta")  # before: calibrate ran and returned numbers
    model = get_peft_model(base, sadi_peft.SADIConfig(variant="head", top_k=3))
    with pytest.raises(ValueError, match=r"^1 module\(s\) have weights on the meta device .*"
                                         r"'model.layers.1.self_attn.o_proj'; 1 of them wrapped"):
        sadi_peft.calibrate(model, CharTokenizer(), PAIRS, show_progress=False)


# ------------------------------------------------------------------------------------------------ memory
def _live_tensors() -> tuple[int, int]:
    """(count, bytes) of the tensors alive in this process that hold memory (parameters and meta tensors excluded)."""
    gc.collect()
    count = size = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) and obj.device.type != "meta":
            count += 1
            size += obj.numel() * obj.element_size()
    return count, size


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "cpu+disk"])
def test_calibration_keeps_only_per_layer_running_sums(tmp_path, base_dir, monkeypatch, split):
    kwargs = dict(device_map=SPLIT, offload_folder=tmp_path / "off") if split else {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).eval()
    model = get_peft_model(base, sadi_peft.SADIConfig(variant="neuron", top_k=3))
    recorders = []
    monkeypatch.setattr(calibration._Recorder, "__init__", _spy(calibration._Recorder.__init__, recorders))
    batch_size, snapshots = 2, []

    def pairs():  # 8 batches of the same 2 pairs (same shapes); a snapshot of live tensors before each batch
        for i, pair in enumerate(PAIRS[:2] * 8):
            if i % batch_size == 0:
                snapshots.append(_live_tensors())
            yield pair

    result = sadi_peft.calibrate(model, CharTokenizer(), pairs(), batch_size=batch_size, show_progress=False)
    assert result.num_pairs == 16 and len(snapshots) == 8
    # after the first batch created the sums (and left its inputs), not one tensor or byte more per batch
    assert len(set(snapshots[1:])) == 1, snapshots
    (recorder,) = recorders
    assert set(vars(recorder)) == {"variant", "unit_counts", "sums", "last_index", "half"}
    assert set(recorder.sums) == set(result.scores)
    for name, total in recorder.sums.items():  # one float64 running sum per unit and layer
        assert total.shape == (recorder.unit_counts[name],) and total.dtype == torch.float64
    assert recorder.last_index.shape == (2 * batch_size,)  # this batch's last-token index, replaced per batch


def _spy(init, found):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        found.append(self)

    return wrapped


# ------------------------------------------------------------------------------------------------ SmolLM2 split
@pytest.fixture(scope="module")
def smol(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return smollm2_path, tokenizer


SMOL_PAIRS = [("Review: a delight. Sentiment:", "Positive", "Negative"),
              ("Review: dull and long. Sentiment:", "Negative", "Positive"),
              ("Review: the cast is superb. Sentiment:", "Positive", "Negative"),
              ("Review: I want my money back. Sentiment:", "Negative", "Positive")]
SMOL_TEXTS = ["Review: a fine film. Sentiment:", "The capital of France is"]


def _smol_split(path: str, offload: Path):
    """SmolLM2 under a CPU budget of half its weights: accelerate puts the first layers on CPU, the rest on disk."""
    budget = os.path.getsize(Path(path) / "model.safetensors") // 2
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": budget},
                                                 offload_folder=offload, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("variant, positions", [("head", "last"), ("neuron", "all")])  # hidden: tiny test above
def test_smollm2_split_by_max_memory_matches_unsplit(tmp_path, smol, variant, positions):
    path, tokenizer = smol
    config = dict(variant=variant, top_k=6, delta=4.0, positions=positions)
    whole = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                           sadi_peft.SADIConfig(**config))
    split_base = _smol_split(path, tmp_path / "off")
    placement = split_base.hf_device_map
    assert set(placement.values()) == {"cpu", "disk"}, placement
    assert any(placement.get(f"model.layers.{i}") == "disk" for i in range(30))
    split = get_peft_model(split_base, sadi_peft.SADIConfig(**config))

    a = sadi_peft.calibrate(whole, tokenizer, SMOL_PAIRS, batch_size=4, show_progress=False)
    b = sadi_peft.calibrate(split, tokenizer, SMOL_PAIRS, batch_size=4, show_progress=False)
    for name in a.scores:
        torch.testing.assert_close(b.scores[name], a.scores[name], atol=1e-5, rtol=0)
    assert [(n, u) for n, u, _ in b.selected] == [(n, u) for n, u, _ in a.selected]
    for name, mask in a.mask.items():
        assert torch.equal(b.mask[name], mask)
    assert any(placement.get(".".join(n.split(".")[:3])) == "disk" for n, _, _ in a.selected) or variant != "head"

    batch = tokenizer(SMOL_TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = whole(**batch).logits
        torch.testing.assert_close(split(**batch).logits, expected, atol=1e-5, rtol=0)
        with whole.disable_adapter():
            unsteered = whole(**batch).logits
    assert not torch.allclose(expected, unsteered, atol=1e-3)  # the comparison is of steered models

    if variant == "head":  # and back from disk with the same budget, through transformers' load_adapter
        sadi_peft.save_pretrained(split, tmp_path / "adapter")
        reloaded = _smol_split(path, tmp_path / "off2")
        reloaded.load_adapter(str(tmp_path / "adapter"))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)
