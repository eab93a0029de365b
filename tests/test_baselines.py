"""Baselines of the reproduction harness: no intervention, random mask, fixed steering, CAA, ITI."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import pytest
import torch
from peft import get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama

import sadi_peft
from sadi_peft.harness import baselines as B

TOK = CharTokenizer()
# pairs whose answers end in different tokens (the PAIRS answers both end in "e"): probes have something to find
YES_NO = [(f"Q{i}: is {w} fine? A:", "Yes", "No") for i, w in enumerate("abcdefghijkl")]
ITEMS = [
    ("Review: a wonderful film. Sentiment:", ["Positive", "Negative"], 0),
    ("Review: dull and long. Sentiment:", ["Positive", "Negative"], 1),
    ("Q: 2+2? A:", ["4", "five", "22"], 0),
    ("x", ["yes", "no"], 1),
    ("Review: the cast is superb and the script sparkles. Sentiment:", ["Positive", "Negative"], 0),
    ("Which is a colour?", ["red", "run", "rain"], 0),
    ("Review: I want my money back. Sentiment:", ["Positive", "Negative"], 1),
    ("Is it ok?", ["Yes", "No"], 0),
    ("Is it bad?", ["Yes", "No"], 1),
]
TEXT = torch.tensor([TOK.encode("Review: a joy. Sentiment: Positive")])


def _sadi_model(positions: str = "last", top_k: int = 2, delta: float = 5.0):
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=top_k, delta=delta, positions=positions))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    return model


def _logits(model, ids=TEXT, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def sadi_model():
    return _sadi_model()


@pytest.fixture(scope="module")
def fitted(sadi_model):
    return {
        "fixed": B.fit_fixed_steering(sadi_model, TOK, PAIRS, delta=20.0),
        "caa": B.fit_caa(sadi_model, TOK, YES_NO, layer=0, alpha=20.0),
        "iti": B.fit_iti(sadi_model, TOK, YES_NO, k=3, alpha=50.0),
    }


def _baselines(fitted):
    return {
        "none": B.NoIntervention(),
        "random_mask": B.RandomMask(k=3, seed=1, delta=8.0),
        "fixed": fitted["fixed"],
        "caa": fitted["caa"],
        "iti": fitted["iti"],
    }


# ------------------------------------------------------------------------------------------- apply / restore
def test_no_intervention_is_the_base_model(sadi_model):
    steered = _logits(sadi_model)
    plain = _logits(tiny_llama())
    assert not torch.equal(steered, plain)
    with B.NoIntervention().apply(sadi_model):
        assert torch.equal(_logits(sadi_model), plain)
    assert torch.equal(_logits(sadi_model), steered)


@pytest.mark.parametrize("name", ["random_mask", "fixed", "caa", "iti"])
def test_baseline_changes_logits_and_restores_them_exactly(sadi_model, fitted, name):
    baseline = _baselines(fitted)[name]
    before = _logits(sadi_model)
    with B.NoIntervention().apply(sadi_model):
        plain = _logits(sadi_model)
    hooks = _hook_count(sadi_model)
    with baseline.apply(sadi_model):
        inside = _logits(sadi_model)
    assert not torch.allclose(inside, plain, atol=1e-4)
    assert not torch.allclose(inside, before, atol=1e-4)
    assert torch.equal(_logits(sadi_model), before)
    assert _hook_count(sadi_model) == hooks
    # also restored when the block raises
    with pytest.raises(KeyError):
        with baseline.apply(sadi_model):
            raise KeyError("boom")
    assert torch.equal(_logits(sadi_model), before)


# ------------------------------------------------------------------------------------------- random mask
def test_random_mask_is_seeded_and_has_exactly_k_units():
    model = _sadi_model(top_k=2)
    layers = sadi_peft.model.sadi_layers(model, "default")
    sadi_mask = [layer.sadi_mask["default"].clone() for _, layer in layers]
    scores = [layer.sadi_scores["default"].clone() for _, layer in layers]
    for k in (1, 3, 8):
        units = B.RandomMask(k, seed=7).units(model)
        assert len(units) == len(set(units)) == k
        assert units == B.RandomMask(k, seed=7).units(model)
    assert len({tuple(B.RandomMask(3, seed=s).units(model)) for s in range(6)}) > 1
    with B.RandomMask(3, seed=7, delta=2.0).apply(model):
        assert sum(int(layer.sadi_mask["default"].sum()) for _, layer in layers) == 3
        chosen = [(n, u) for n, layer in layers for u in torch.nonzero(layer.sadi_mask["default"]).squeeze(1).tolist()]
        assert chosen == B.RandomMask(3, seed=7).units(model)
        assert all(layer.sadi_delta["default"] == 2.0 for _, layer in layers)
    for (_, layer), mask, score in zip(layers, sadi_mask, scores):
        assert torch.equal(layer.sadi_mask["default"], mask)
        assert torch.equal(layer.sadi_scores["default"], score)
        assert layer.sadi_delta["default"] == 5.0
    units = B.random_mask(model, 4, seed=3)  # the persistent form
    assert units == B.RandomMask(4, seed=3).units(model)
    assert sum(int(layer.sadi_mask["default"].sum()) for _, layer in layers) == 4
    assert all(torch.equal(layer.sadi_scores["default"], s) for (_, layer), s in zip(layers, scores))
    sadi_peft.apply_top_k(model, 2)
    assert all(torch.equal(layer.sadi_mask["default"], m) for (_, layer), m in zip(layers, sadi_mask))
    with pytest.raises(ValueError, match="k=9"):
        B.random_mask(model, 9, seed=0)


def test_random_mask_on_an_uncalibrated_adapter_does_not_warn_but_the_adapter_still_does_afterwards():
    """The random-mask ablation needs no calibration, so the "never calibrated" warning would mislead there; the
    warning must still fire for a plain forward of the uncalibrated adapter after the search."""
    import warnings

    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=1, positions="last"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*empty mask")
        selection = B.RandomMask(k=1, seed=0).select_on_validation(model, TOK, ITEMS, [(1, 2.0), (2, 4.0)])
        with B.RandomMask(k=2, seed=0, delta=4.0).apply(model):
            _logits(model)
    assert selection.best["k"] in (1, 2)
    with pytest.warns(UserWarning, match="empty mask"):
        _logits(model)


# ------------------------------------------------------------------------------------------- fixed steering
def test_fixed_steering_direction_matches_a_hand_computation(fitted):
    fs = fitted["fixed"]
    plain = tiny_llama()
    site = plain.model.layers[1].self_attn.o_proj
    seen = []
    handle = site.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, -1].double()))
    try:
        diffs = []
        for prompt, pos, neg in PAIRS:
            _logits(plain, torch.tensor([TOK.encode(prompt.strip() + " " + pos)]))
            _logits(plain, torch.tensor([TOK.encode(prompt.strip() + " " + neg)]))
            diffs.append(seen[-2] - seen[-1])
    finally:
        handle.remove()
    expected = torch.stack(diffs).mean(0).float()
    torch.testing.assert_close(fs.directions["model.layers.1.self_attn.o_proj"], expected, atol=1e-6, rtol=1e-5)
    # SADI's head score is D averaged over head_dim
    for name, direction in fs.directions.items():
        torch.testing.assert_close(direction.reshape(4, -1).mean(-1), fs.scores[name], atol=1e-6, rtol=1e-5)


def test_fixed_steering_mask_is_sadis_top_k(sadi_model, fitted):
    fs = fitted["fixed"]
    layers = sadi_peft.model.sadi_layers(sadi_model, "default")
    try:
        for k in (1, 2, 5):
            sadi_peft.apply_top_k(sadi_model, k)
            masks = fs.masks(k)
            assert all(torch.equal(masks[n], layer.sadi_mask["default"]) for n, layer in layers)
    finally:
        sadi_peft.apply_top_k(sadi_model, 2)


@pytest.mark.parametrize("positions", ["last", "all", "from_last"])
def test_fixed_steering_with_zero_delta_is_the_identity(sadi_model, fitted, positions):
    with B.NoIntervention().apply(sadi_model):
        plain = _logits(sadi_model)
    with dataclasses.replace(fitted["fixed"], delta=0.0, positions=positions).apply(sadi_model):
        assert torch.equal(_logits(sadi_model), plain)


# ------------------------------------------------------------------------------------------- CAA
def test_caa_vector_is_the_mean_difference_of_layer_outputs(fitted):
    caa = fitted["caa"]
    plain = tiny_llama()
    diffs = []
    for prompt, pos, neg in YES_NO:
        with torch.no_grad():
            hp = plain(input_ids=torch.tensor([TOK.encode(prompt.strip() + " " + pos)]), output_hidden_states=True)
            hn = plain(input_ids=torch.tensor([TOK.encode(prompt.strip() + " " + neg)]), output_hidden_states=True)
        diffs.append(hp.hidden_states[1][0, -1].double() - hn.hidden_states[1][0, -1].double())  # output of layer 0
    torch.testing.assert_close(caa.vectors[0], torch.stack(diffs).mean(0).float(), atol=1e-6, rtol=1e-5)
    assert caa.vectors.shape == (2, 32) and caa.num_pairs == len(YES_NO)


def test_position_regimes_steer_the_right_tokens(fitted):
    """With the prompt end pinned: 'last' and 'from_last' leave the tokens before it alone, 'all' does not;
    'from_last' also moves the answer tokens directly."""
    model = tiny_llama()
    prompt = TOK.encode("Review: a joy. Sentiment:")
    ids = torch.tensor([prompt + TOK.encode(" Positive")[1:]])
    end = len(prompt) - 1
    pin = torch.zeros_like(ids)
    pin[0, : len(prompt)] = 1
    plain = _logits(model, ids)
    out = {}
    for regime in B.POSITION_REGIMES:
        with dataclasses.replace(fitted["caa"], positions=regime).apply(model), sadi_peft.prompt_boundary(model, pin):
            out[regime] = _logits(model, ids)
    for regime in ("last", "from_last"):
        assert torch.equal(out[regime][0, :end], plain[0, :end])
        assert not torch.allclose(out[regime][0, end], plain[0, end], atol=1e-4)
    assert not torch.allclose(out["all"][0, :end], plain[0, :end], atol=1e-4)
    torch.testing.assert_close(out["last"][0, end], out["from_last"][0, end])
    assert not torch.allclose(out["last"][0, end + 1 :], out["from_last"][0, end + 1 :], atol=1e-4)


@pytest.mark.parametrize("regime", ["last", "from_last"])
def test_cached_generation_matches_uncached_pinned_generation(fitted, regime):
    """Prefill + decode steps with a KV cache steer what a full uncached pass with the prompt end pinned steers."""
    model = tiny_llama()
    caa = dataclasses.replace(fitted["caa"], positions=regime, alpha=200.0)
    ids = torch.tensor([TOK.encode("Review: a joy. Sentiment:")])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    with caa.apply(model):
        cached = model.generate(input_ids=ids, **kwargs)
        with sadi_peft.prompt_boundary(model, torch.ones_like(ids)):
            uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    plain = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached.logits[-1], plain.logits[-1], atol=1e-4)


# ------------------------------------------------------------------------------------------- ITI
def test_probes_reach_full_accuracy_on_linearly_separable_data():
    g = torch.Generator().manual_seed(0)
    n, d = 60, 6
    u = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1)  # one separating direction per probe
    y = torch.randint(0, 2, (n,), generator=g).double()
    noise = torch.randn(3, n, d, generator=g).double()
    along = torch.einsum("pnd,pd->pn", noise, u.double())
    # replace the component along u by +-(1 + |.|): separable with margin >= 1
    x = noise + ((2 * y - 1) * (1 + along.abs()) - along).unsqueeze(-1) * u.double().unsqueeze(1)
    acc, loss = B.probe_accuracy(x[:, :40], y[:40], x[:, 40:], y[40:])
    assert torch.equal(acc, torch.ones(3, dtype=acc.dtype))
    assert bool((loss < 0.3).all())
    # random labels are not learnable
    shuffled = torch.randint(0, 2, (n,), generator=g).double()
    acc, _ = B.probe_accuracy(noise[:, :40], shuffled[:40], noise[:, 40:], shuffled[40:])
    assert float(acc.max()) < 1.0


def test_iti_fit_on_the_tiny_model(fitted):
    iti = fitted["iti"]
    assert iti.probe_accuracy.shape == (2, 4) and iti.directions.shape == (2, 4, 8)
    assert float(iti.probe_accuracy.max()) > 0.5  # better than chance
    assert iti.num_heldout == 2 and iti.num_pairs == len(YES_NO)
    accs = [float(iti.probe_accuracy[lh]) for lh in iti.ranking]
    assert accs == sorted(accs, reverse=True)
    torch.testing.assert_close(iti.directions.norm(dim=-1), torch.ones(2, 4))
    layer, head = iti.ranking[0]
    vec = iti.vectors()[layer][head * 8 : (head + 1) * 8]
    torch.testing.assert_close(vec, iti.alpha * iti.stds[layer, head] * iti.directions[layer, head])
    assert iti.heads() == iti.ranking[:3]
    again = B.fit_iti(tiny_llama(), TOK, YES_NO, k=3, alpha=50.0)
    assert again.ranking == iti.ranking and torch.equal(again.probe_accuracy, iti.probe_accuracy)


# ------------------------------------------------------------------------------------------- selection
def _select(name, baseline, model, split="validation", **kwargs):
    grids = {
        "none": None,
        "random_mask": [(1, 5.0), (4, 40.0), (8, -0.9)],
        "fixed": [(1, 10.0), (4, 100.0), (8, -100.0)],
        "caa": [(0, 0.0), (0, 10.0), (1, 30.0), (0, -30.0)],
        "iti": [(1, 10.0), (8, -100.0), (8, -10.0), (4, 100.0)],
    }
    return baseline.select_on_validation(model, TOK, ITEMS, grids[name], split=split, batch_size=4, **kwargs)


@pytest.mark.parametrize("name", ["none", "random_mask", "fixed", "caa", "iti"])
def test_selection_refuses_the_test_split(sadi_model, fitted, name):
    with pytest.raises(ValueError, match="test"):
        _select(name, _baselines(fitted)[name], sadi_model, split="test")


@pytest.mark.parametrize("name", ["none", "random_mask", "fixed", "caa", "iti"])
def test_selection_returns_the_argmax_grid_point(sadi_model, fitted, name):
    baseline = _baselines(fitted)[name]
    before = _logits(sadi_model)
    selection = _select(name, baseline, sadi_model)
    accuracies = [r["accuracy"] for r in selection.results]
    first_best = accuracies.index(max(accuracies))
    assert selection.accuracy == max(accuracies)
    keys = [k for k in selection.results[0] if k not in ("accuracy", "n", "scores")]
    assert selection.best == {k: selection.results[first_best][k] for k in keys}
    assert selection.split == "validation"
    # the chosen baseline, applied on its own, scores what the search recorded
    with selection.baseline.apply(sadi_model):
        again = B.evaluate_items(sadi_model, TOK, ITEMS, batch_size=3)
    assert again["accuracy"] == selection.accuracy
    if name in ("caa", "iti"):  # these grids do move the accuracy on this tiny validation set
        assert len(set(accuracies)) > 1
    assert torch.equal(_logits(sadi_model), before)


@pytest.mark.parametrize("regime", ["last", "from_last"])
def test_task_evaluate_agrees_with_the_selection_scorer(sadi_model, fitted, regime):
    """sadi_peft.tasks.evaluate (left padding, explicit positions, prompt end pinned on a SADI model) scores what
    score_naive (right padding) scores under the same baseline."""
    from sadi_peft.tasks import Example, Task, evaluate

    task = Task(name="baseline-check", description="", loader=lambda role, data_dir: [])
    examples = [Example(p, tuple(c), y, id=str(i)) for i, (p, c, y) in enumerate(ITEMS)]
    for baseline in (fitted["caa"], fitted["fixed"]):
        with dataclasses.replace(baseline, positions=regime).apply(sadi_model):
            a = evaluate(sadi_model, TOK, task, examples, batch_size=4)
            b = B.evaluate_items(sadi_model, TOK, examples, batch_size=3)
        for i, scores in enumerate(a["scores"]):
            torch.testing.assert_close(torch.tensor(scores), b["scores"][i, : len(scores)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["none", "random_mask", "fixed", "caa", "iti"])
def test_prefix_cached_evaluation_scores_what_full_passes_score(sadi_model, fitted, name):
    """evaluate_items(prefix_cached=True): the prompt prefix runs once per item and its cache serves every option;
    the SADI gain (positions='last') and the from-last-token baselines see the same tokens as in full passes."""
    baseline = _baselines(fitted)[name]
    if name in ("caa", "iti"):
        baseline = dataclasses.replace(baseline, positions="from_last")
    before = _logits(sadi_model)
    with baseline.apply(sadi_model):
        full = B.evaluate_items(sadi_model, TOK, ITEMS, batch_size=3)
        cached = B.evaluate_items(sadi_model, TOK, ITEMS, batch_size=4, prefix_cached=True)
    torch.testing.assert_close(cached["scores"], full["scores"], atol=1e-5, rtol=0)
    assert cached["accuracy"] == full["accuracy"] and cached["n"] == len(ITEMS)
    assert torch.equal(_logits(sadi_model), before)


def test_prefix_cached_evaluation_runs_each_prompt_once():
    model = _sadi_model(delta=10.0)
    rows = []
    embed = model.get_base_model().get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    try:
        B.evaluate_items(model, TOK, ITEMS, batch_size=len(ITEMS), prefix_cached=True)
    finally:
        handle.remove()
    options = sum(len(c) for _, c, _ in ITEMS)
    # one prefix forward with a row per item (not per option), then one forward of the option rows
    assert [r[0] for r in rows] == [len(ITEMS), options]
    longest_option = max(len(" " + o) for _, c, _ in ITEMS for o in c)
    assert rows[1][1] == 1 + longest_option


@pytest.mark.parametrize("name", ["sadi-all", "caa", "iti"])
def test_prefix_cached_evaluation_is_exact_where_every_position_is_steered(fitted, name):
    """The prefix runs under the intervention, so its cache is the steered one: a SADI adapter at positions='all'
    and the additive baselines at every position score as in full passes."""
    model = _sadi_model(positions="all", delta=10.0)
    with model.disable_adapter():
        unsteered = B.evaluate_items(model, TOK, ITEMS, batch_size=3)["scores"]
    # the SADI adapter steers every position; the baselines add their hooks on top of it
    steering = nullcontext() if name == "sadi-all" else dataclasses.replace(fitted[name], positions="all").apply(model)
    with steering:
        full = B.evaluate_items(model, TOK, ITEMS, batch_size=3)
        cached = B.evaluate_items(model, TOK, ITEMS, batch_size=4, prefix_cached=True)
    torch.testing.assert_close(cached["scores"], full["scores"], atol=1e-5, rtol=0)
    assert cached["accuracy"] == full["accuracy"]
    real = unsteered.isfinite()  # -inf pads items with fewer options
    assert (full["scores"][real] - unsteered[real]).abs().max() > 1e-3  # the intervention is on


# ------------------------------------------------------------------------------------------- errors
def test_non_llama_models_get_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="Llama-like"):
        B.fit_caa(gpt2, TOK, PAIRS)
    with pytest.raises(ValueError, match="Llama-like"):
        B.fit_iti(gpt2, TOK, PAIRS)


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="positions"):
        B.fit_caa(model, TOK, PAIRS, positions="first")
    with pytest.raises(ValueError, match="empty"):
        B.fit_caa(model, TOK, [])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        B.fit_iti(model, TOK, PAIRS[:1])
    with pytest.raises(ValueError, match="no scores"):
        B.fit_fixed_steering(get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=1)), TOK, PAIRS)
    with pytest.raises(ValueError, match="grid point"):
        B.fit_caa(model, TOK, PAIRS).select_on_validation(model, TOK, ITEMS, [(1, 2, 3)])


@pytest.mark.parametrize("name", ["random_mask", "fixed", "caa", "iti"])
@pytest.mark.parametrize("regime", ["last", "from_last"])
def test_prefix_cached_selection_equals_the_naive_one(sadi_model, fitted, name, regime):
    """With "last" / "from_last" nothing before the last prompt token moves between grid points: the cached
    selection (prompt prefix run once per batch) scores every point like the full forwards."""
    baseline = _baselines(fitted)[name]
    if name == "random_mask":
        if regime == "from_last":
            pytest.skip("the random mask follows the SADI adapter's own regime")
    else:
        baseline = dataclasses.replace(baseline, positions=regime)
    before = _logits(sadi_model)
    naive = _select(name, baseline, sadi_model, cached=False)
    cached = _select(name, baseline, sadi_model, cached=True)
    assert [r["accuracy"] for r in cached.results] == [r["accuracy"] for r in naive.results]
    for a, b in zip(cached.results, naive.results):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
    assert len({float(r["scores"][r["scores"].isfinite()].sum()) for r in cached.results}) > 1  # points differ
    assert cached.best == naive.best
    assert torch.equal(_logits(sadi_model), before)


@pytest.mark.parametrize("name", ["fixed", "caa", "iti"])
def test_cached_selection_refuses_the_all_regime(sadi_model, fitted, name):
    baseline = dataclasses.replace(_baselines(fitted)[name], positions="all")
    with pytest.raises(ValueError, match="cached=True needs positions 'last' or 'from_last'"):
        _select(name, baseline, sadi_model, cached=True)
