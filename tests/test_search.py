"""The prefix-cached K x delta search scores exactly what the naive search scores."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama

import sadi_peft
from sadi_peft.harness.search import ChoiceItem, encode_choice_item, grid_search, item_batches

TOK = CharTokenizer()
EXAMPLES = [
    ("Review: a wonderful film. Sentiment:", ["Positive", "Negative"], 0),
    ("Review: dull and long. Sentiment:", ["Positive", "Negative"], 1),
    ("Q: 2+2? A:", ["4", "five", "22"], 0),
    ("x", ["yes", "no"], 1),  # a one-character prompt: BOS + 1 token
    ("Review: the cast is superb and the script sparkles. Sentiment:", ["Positive", "Negative"], 0),
    ("Which is a colour?", ["red", "run", "rain"], 0),
    ("Review: I want my money back. Sentiment:", ["Positive", "Negative"], 1),
]
GRID = [(1, 0.0), (1, 5.0), (2, 20.0), (3, 50.0), (4, -0.5)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_search_matches_naive_search(attn):
    model = get_peft_model(tiny_llama(attn_implementation=attn), sadi_peft.SADIConfig(top_k=2, positions="last"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    items = [encode_choice_item(TOK, p, c, y) for p, c, y in EXAMPLES]
    cached = grid_search(model, TOK, items, GRID, cached=True, batch_size=3, show_progress=False)
    naive = grid_search(model, TOK, items, GRID, cached=False, batch_size=3, show_progress=False)
    for a, b in zip(cached, naive):
        assert (a["top_k"], a["delta"]) == (b["top_k"], b["delta"])
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
        assert a["accuracy"] == b["accuracy"]
    # the steering is really on: some grid point moves the scores away from delta = 0
    assert not torch.allclose(cached[0]["scores"], cached[3]["scores"])


def _alone(model, item, j) -> float:
    """Mean log-prob of option ``j``: prompt + option through the model on its own, prompt end pinned."""
    option, n = item.option_ids[j], len(item.prompt_ids)
    ids = torch.tensor([item.prompt_ids + option])
    with torch.no_grad(), sadi_peft.prompt_boundary(model, torch.tensor([[1] * n + [0] * len(option)])):
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    return logprobs[torch.arange(n - 1, n - 1 + len(option)), torch.tensor(option)].mean().item()


def test_naive_scores_equal_one_by_one_steered_scoring():
    """Independent check of the scorer: per example, per option, prompt + option through the model alone."""
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=2, delta=10.0, positions="last"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    items = [encode_choice_item(TOK, p, c, y) for p, c, y in EXAMPLES]
    result = grid_search(model, TOK, items, [(2, 10.0)], cached=True, batch_size=4, show_progress=False)[0]
    for i, item in enumerate(items):
        for j in range(len(item.option_ids)):
            assert result["scores"][i, j].item() == pytest.approx(_alone(model, item, j), abs=1e-5)


def test_cached_search_refuses_all_positions():
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=1, positions="all"))
    with pytest.raises(ValueError, match="needs positions='last'"):
        grid_search(model, TOK, [], [(1, 1.0)], cached=True)


@pytest.mark.slow
@pytest.mark.parametrize("task, positions", [("sst2", "last"), ("triviaqa", "last"), ("sst2", "all"),
                                            ("truthfulqa_mc1", "all")])
def test_search_cache_benchmark_smoke(tmp_path, smollm2_path, data_dir, task, positions):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(repo / "benchmarks" / "search_cache.py"), "--tiny", "--n-eval", "4",
                             "--n-pairs", "4", "--task", task, "--max-new-tokens", "3", "--positions", positions, "--variant",
                             "hidden", "--k-grid", "1,4", "--delta-grid", "0.5,9", "--out", str(tmp_path / "sc.json")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "sc.json").read_text())
    assert report["identical_accuracies"] and {"naive_median_s", "cached_median_s", "ratio"} <= set(report)
    assert report["task"] == task and report["protocol"] == ("generate" if task == "triviaqa" else "choice")
    assert report["positions"] == positions
    assert ("shared_ratio" in report) == (positions == "all")


@pytest.mark.parametrize("positions", ["last", "all"])
def test_single_token_options_are_read_from_one_row_with_the_same_scores(positions):
    """Items whose options are all one token take one forward of the prompt (the next-token distribution); their
    scores equal prompt + option run one by one, also in a batch mixed with multi-token items."""
    from sadi_peft.harness.search import score_naive

    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=3, delta=10.0, positions=positions))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    single = [encode_choice_item(TOK, p, c, 0, separator="") for p, c in
              [("Review: a joy. Sentiment:", ["P", "N"]), ("Q: pick a letter", ["a", "b", "c", "d"])]]
    items = single + [encode_choice_item(TOK, p, c, y) for p, c, y in EXAMPLES[:3]]
    assert all(len(o) == 1 for item in single for o in item.option_ids)
    scores = score_naive(model, items, pad_token_id=0, batch_size=3)
    for i, item in enumerate(items):
        for j in range(len(item.option_ids)):
            assert scores[i, j].item() == pytest.approx(_alone(model, item, j), abs=1e-5)
        assert torch.isinf(scores[i, len(item.option_ids):]).all()


def test_cached_search_with_single_token_options_matches_naive():
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=2, positions="last"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    items = [encode_choice_item(TOK, p, c, 0, separator="") for p, c in
             [("Review: a joy. Sentiment:", ["P", "N"]), ("Q: pick a letter", ["a", "b", "c", "d"]), ("x", ["y", "n"])]]
    items += [encode_choice_item(TOK, p, c, y) for p, c, y in EXAMPLES[:2]]
    cached = grid_search(model, TOK, items, GRID, cached=True, batch_size=4, show_progress=False)
    naive = grid_search(model, TOK, items, GRID, cached=False, batch_size=4, show_progress=False)
    for a, b in zip(cached, naive):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
    assert not torch.allclose(cached[0]["scores"], cached[3]["scores"])


@pytest.mark.parametrize("variant", ["head", "neuron", "hidden"])
def test_all_positions_search_skipping_unsteered_layers_equals_full_passes(variant):
    """positions='all': each point runs only the layers from its lowest steered one up, on states one full pass
    recorded; the scores equal full passes at every point, and layers really are skipped."""
    from sadi_peft.harness import layer_replay

    model = get_peft_model(tiny_llama(num_hidden_layers=4),
                           sadi_peft.SADIConfig(variant=variant, top_k=1, positions="all"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    for name, layer in sadi_peft.model.sadi_layers(model, "default"):  # best units in layers 2 and 3 (random model)
        if ".layers.2." in name or ".layers.3." in name:
            layer.sadi_scores["default"].add_(1.0)
    scores = torch.cat([layer.sadi_scores["default"] for _, layer in sadi_peft.model.sadi_layers(model, "default")])
    # K values whose masks start in different layers (K = 1: the best unit's layer; K = all units: layer 0)
    grid = [(k, d) for k in (1, 2, 5, int(scores.numel())) for d in (0.5, 9.0)]
    items = [encode_choice_item(TOK, p, c, y) for p, c, y in EXAMPLES]
    depths = []
    for k in (1, 2, 5):
        sadi_peft.apply_top_k(model, k)
        depths.append(layer_replay.first_steered_layer(model, "default"))
    assert max(depths) > 0  # something to skip in this test

    skipped = []
    original = layer_replay.LayerReplay.replay

    def counting(self, depth):
        skipped.append(depth)
        return original(self, depth)

    layer_replay.LayerReplay.replay = counting
    try:
        fast = grid_search(model, TOK, items, grid, cached=False, batch_size=3, show_progress=False,
                           share_prefix=False)
    finally:
        layer_replay.LayerReplay.replay = original
    full = grid_search(model, TOK, items, grid, cached=False, batch_size=3, show_progress=False, skip_layers=False)
    for a, b in zip(fast, full):
        assert (a["top_k"], a["delta"]) == (b["top_k"], b["delta"])
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-6, rtol=0)
        assert a["accuracy"] == b["accuracy"]
    assert skipped and max(skipped) == max(depths)
    assert not torch.allclose(fast[0]["scores"], fast[-1]["scores"])  # the points differ
    # the adapter is left at the last grid point, and no layer keeps a patched forward
    assert model.peft_config["default"].top_k == grid[-1][0]
    assert all("forward" not in vars(layer) for layer in layer_replay.decoder_layers(model))


@pytest.mark.parametrize("variant", ["head", "neuron", "hidden"])
def test_all_positions_search_sharing_each_prompt_among_its_options_equals_full_passes(variant):
    """positions='all', share_prefix=True: per point, each prompt runs once under the point's gains and its cache
    serves all the item's options. Same scores as prompt + option in full for each option; batches of single-token
    options keep one row per item."""
    model = get_peft_model(tiny_llama(num_hidden_layers=3),
                           sadi_peft.SADIConfig(variant=variant, top_k=1, positions="all"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    items = [encode_choice_item(TOK, p, c, y) for p, c, y in EXAMPLES]
    grid = [(1, 0.5), (2, 9.0), (4, 30.0)]
    rows = []
    embed = model.get_base_model().get_input_embeddings()
    handle = embed.register_forward_hook(lambda m, args, out: rows.append(tuple(args[0].shape)))
    try:
        shared = grid_search(model, TOK, items, grid, cached=False, batch_size=len(items), show_progress=False)
    finally:
        handle.remove()
    full = grid_search(model, TOK, items, grid, cached=False, batch_size=len(items), show_progress=False,
                       skip_layers=False, share_prefix=False)
    for a, b in zip(shared, full):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
        assert a["accuracy"] == b["accuracy"]
    assert not torch.allclose(full[0]["scores"], full[-1]["scores"])  # the points differ
    # one batch, multi-token options: per point a prefix forward of one row per item, then the option rows
    options = sum(len(c) for _, c, _ in EXAMPLES)
    assert [r[0] for r in rows] == [len(items), options] * len(grid)


def test_layer_replay_refuses_mismatched_passes():
    from sadi_peft.harness.layer_replay import LayerReplay, decoder_layers

    model = tiny_llama(num_hidden_layers=3)
    replay = LayerReplay(decoder_layers(model))
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad(), replay.record([2]):
        model(input_ids=ids)
    with torch.no_grad(), replay.replay(2):
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, model(input_ids=ids).logits.detach(), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="shape"), torch.no_grad(), replay.replay(2):
        model(input_ids=torch.tensor([[1, 5, 6]]))
    with pytest.raises(RuntimeError, match="nothing recorded at decoder layer 1"):
        with replay.replay(1):
            pass
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_item_batches_respect_batch_size_and_logits_budget():
    single = ChoiceItem([1, 2, 3], [[4], [5]], 0)  # one row, 2 positions
    multi = ChoiceItem([1, 2], [[4, 5, 6], [7], [8, 9]], 1)  # 3 rows, 4 positions
    items = [single, multi, single, single, multi]
    assert [len(b) for b in item_batches(items, 2, None)] == [2, 2, 1]
    assert [len(b) for b in item_batches(items, 16, None)] == [5]
    # vocabulary 10, 8 bytes per logit: single = 160 bytes, single + multi = 4 rows x 4 positions = 1 280 bytes
    assert [len(b) for b in item_batches(items, 16, 10, max_logits_bytes=1280)] == [2, 2, 1]
    assert [len(b) for b in item_batches(items, 16, 10, max_logits_bytes=1279)] == [1, 1, 2, 1]
    # an item over the budget on its own still gets scored, alone
    assert [len(b) for b in item_batches(items, 16, 10, max_logits_bytes=1)] == [1, 1, 1, 1, 1]
    assert [x for b in item_batches(items, 3, 10, max_logits_bytes=500) for x in b] == items
    with pytest.raises(ValueError, match="batch_size=0"):
        item_batches(items, 0, 10)


@pytest.mark.parametrize("cached", [True, False])
def test_search_split_by_logits_budget_scores_the_same_and_prefix_projects_one_position(cached):
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=2, positions="last"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    items = [encode_choice_item(TOK, p, c, y) for p, c, y in EXAMPLES]
    projected = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: projected.append(args[0].shape[:2]))
    try:
        whole = grid_search(model, TOK, items, GRID, cached=cached, batch_size=16, show_progress=False)
        n_whole = len(projected)
        split = grid_search(model, TOK, items, GRID, cached=cached, batch_size=16, show_progress=False,
                            max_logits_bytes=1)
    finally:
        handle.remove()
    assert len(projected) - n_whole > n_whole  # the 1-byte budget really split the batch
    for a, b in zip(whole, split):
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
    if cached:  # prefix forwards (no grid point yet) project the last position only, never every prefix token
        longest_option = max(len(o) for item in items for o in item.option_ids)
        assert max(positions for _, positions in projected) <= 1 + longest_option
