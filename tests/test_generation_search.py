"""Greedy-generation exact match (TriviaQA): the prefix-cached search decodes exactly what the naive one and
``model.generate`` decode, and the baselines select on it like on choice accuracy."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama

import sadi_peft
from sadi_peft.harness import baselines
from sadi_peft.harness.search import encode_choice_item, grid_search
from sadi_peft.harness.generation import (
    GreedyBatch,
    encode_generation_item,
    evaluate_generation,
    exact_match,
    generate_under,
    generation_grid_search,
)

TOK = CharTokenizer()
PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "Question: Who wrote Hamlet?\nAnswer:",
    "x",  # BOS + one token: no prefix to cache
    "Question: Which planet is red?\nAnswer:",
    "Question: 2 + 2?\nAnswer:",
]
GRID = [(1, 0.0), (2, 5.0), (3, 20.0), (4, 60.0)]


def _items(model, tokenizer=TOK, max_new_tokens=6):
    """Items whose accepted answer is the unsteered model's own greedy answer for half of them, so that accuracy is
    neither 0 nor 1 and moves with the steering."""
    items = [encode_generation_item(tokenizer, p, ["zzzz"], max_new_tokens=max_new_tokens) for p in PROMPTS]
    with baselines.sadi_disabled(model):
        plain = evaluate_generation(model, tokenizer, items, batch_size=2)["predictions"]
    return [encode_generation_item(tokenizer, p, [plain[i] if i % 2 == 0 and plain[i] else "zzzz"],
                                   max_new_tokens=max_new_tokens) for i, p in enumerate(PROMPTS)]


def _calibrated(positions: str, attn: str = "sdpa"):
    model = get_peft_model(tiny_llama(attn_implementation=attn), sadi_peft.SADIConfig(top_k=2, positions=positions))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_search_matches_naive(attn):
    model = _calibrated("last", attn)
    items = _items(model)
    cached = generation_grid_search(model, TOK, items, GRID, cached=True, batch_size=3, show_progress=False)
    naive = generation_grid_search(model, TOK, items, GRID, cached=False, batch_size=3, show_progress=False)
    for a, b in zip(cached, naive):
        assert (a["top_k"], a["delta"]) == (b["top_k"], b["delta"])
        assert a["predictions"] == b["predictions"] and a["accuracy"] == b["accuracy"]
    # the search is not vacuous: delta = 0 is the plain model (its own answers count for items 0, 2, 4), and a
    # strong gain changes what the model says
    assert cached[0]["accuracy"] == pytest.approx(sum(1 for i in (0, 2, 4) if items[i].answers != ("zzzz",)) / 5)
    assert cached[0]["predictions"] != cached[-1]["predictions"]
    assert all(len(TOK.encode(p, add_special_tokens=False)) <= 6 for r in cached for p in r["predictions"])


def test_generation_search_refuses_cache_with_all_positions_and_empty_grid():
    model = _calibrated("all")
    items = [encode_generation_item(TOK, "Q: hi\nA:", ["yes"])]
    with pytest.raises(ValueError, match="needs positions='last'"):
        generation_grid_search(model, TOK, items, [(1, 1.0)], cached=True)
    with pytest.raises(ValueError, match="grid is empty"):
        generation_grid_search(model, TOK, items, [], cached=False)


def test_all_positions_generation_search_runs_uncached():
    model = _calibrated("all")
    items = _items(model)
    results = generation_grid_search(model, TOK, items, GRID, cached=False, batch_size=2, show_progress=False)
    assert results[0]["predictions"] != results[-1]["predictions"]
    # batch size does not change the answers
    again = generation_grid_search(model, TOK, items, GRID, cached=False, batch_size=5, show_progress=False)
    assert [r["predictions"] for r in results] == [r["predictions"] for r in again]


def test_cache_is_cropped_back_after_each_point():
    model = _calibrated("last")
    items = _items(model)[:2]
    batch = GreedyBatch(model, TOK, items, cached=True)
    first = batch.generate()
    assert batch.cache.get_seq_length() == batch.prefix_len
    assert batch.generate() == first  # decoding again from the same cache gives the same answers


@pytest.mark.parametrize("positions", ["last", "all"])
def test_greedy_decoder_equals_model_generate(smol_tokenizer, positions):
    """What the search decodes is what ``sadi_peft.tasks.evaluate(protocol="generate")`` (``model.generate``,
    stop string ``"\\n"``) decodes, steered and not: the search selects on the quantity the test split measures."""
    from sadi_peft.tasks.protocols import generate_answers

    torch.manual_seed(0)
    base = tiny_llama(seed=1, vocab_size=len(smol_tokenizer), max_position_embeddings=512)
    model = get_peft_model(base, sadi_peft.SADIConfig(top_k=3, delta=30.0, positions=positions))
    sadi_peft.calibrate(model, smol_tokenizer, PAIRS, show_progress=False)
    items = [encode_generation_item(smol_tokenizer, p, ["x"], max_new_tokens=8) for p in PROMPTS]
    ours = evaluate_generation(model, smol_tokenizer, items, batch_size=3)["predictions"]
    reference = generate_answers(model, smol_tokenizer, PROMPTS, batch_size=3, max_new_tokens=8)
    assert ours == reference
    with model.disable_adapter():
        plain = evaluate_generation(model, smol_tokenizer, items, batch_size=3)["predictions"]
        assert plain == generate_answers(model, smol_tokenizer, PROMPTS, batch_size=3, max_new_tokens=8)
    assert plain != ours  # the steering is on


def test_baseline_selection_on_generation_items_cached_equals_uncached():
    model = _calibrated("last")
    items = _items(model)
    caa = baselines.fit_caa(model, TOK, PAIRS, positions="from_last")
    grid = [(0, 1.0), (1, 8.0), (1, -8.0)]
    cached = caa.select_on_validation(model, TOK, items, grid, cached=True, batch_size=2)
    naive = caa.select_on_validation(model, TOK, items, grid, cached=False, batch_size=2)
    assert [r["accuracy"] for r in cached.results] == [r["accuracy"] for r in naive.results]
    assert cached.best == naive.best and cached.results[0]["scores"].shape == (len(items),)
    # the chosen CAA point, applied, gives the accuracy the selection saw
    with cached.baseline.apply(model):
        assert evaluate_generation(model, TOK, items, batch_size=2)["accuracy"] == cached.accuracy
    with pytest.raises(ValueError, match="Refusing to select"):
        caa.select_on_validation(model, TOK, items, grid, "test")
    with pytest.raises(TypeError, match="mix GenerationItems"):
        caa.select_on_validation(model, TOK, items + [("p", ["a", "b"], 0)], grid)


def test_random_mask_and_fixed_steering_select_on_generation():
    model = _calibrated("last")
    items = _items(model)
    plain = evaluate_generation(model, TOK, items)
    fixed = baselines.fit_fixed_steering(model, TOK, PAIRS)
    selection = fixed.select_on_validation(model, TOK, items, [(1, 0.0), (4, 50.0)])
    with baselines.sadi_disabled(model):
        unsteered = evaluate_generation(model, TOK, items)
    assert selection.results[0]["accuracy"] == unsteered["accuracy"]  # delta 0 adds nothing: the unsteered model
    random = baselines.RandomMask(k=1, seed=0).select_on_validation(model, TOK, items, [(2, 40.0)], seeds=[0, 1])
    assert 0.0 <= random.accuracy <= 1.0 and random.results[0]["scores"].shape == (2, len(items))
    # after selection the model is as it was
    assert evaluate_generation(model, TOK, items)["predictions"] == plain["predictions"]


def test_exact_match_and_item_errors():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) and not exact_match("Paris, France", ["Paris"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        encode_generation_item(TOK, "Q", ["yes"], max_new_tokens=0)
    with pytest.raises(ValueError, match="no non-empty accepted answer"):
        encode_generation_item(TOK, "Q", ["", "the"])
    with pytest.raises(TypeError, match="GenerationItem"):
        generate_under(_calibrated("last"), TOK, [("p", ["a"], 0)], [baselines.no_intervention], cached=False)


def _tiny_gemma3(sliding_window: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, query_pre_attn_scalar=16, sliding_window=sliding_window,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = get_peft_model(model, sadi_peft.SADIConfig(top_k=2, positions="last"))
    sadi_peft.calibrate(model, TOK, PAIRS, show_progress=False)
    return model


def test_sliding_window_models_search_cached_equals_naive(monkeypatch):
    """Gemma 3 (sliding-window layers): the cached search equals the naive one, also once the window fills during a
    grid point (the cache records the keys a rollback needs); where transformers cannot record them, the search says
    so instead of going wrong."""
    items = [encode_generation_item(TOK, p, ["x"], max_new_tokens=5) for p in PROMPTS]
    choice_items = [encode_choice_item(TOK, p, ["yes", "no"], 0) for p in PROMPTS]
    assert max(len(i.prompt_ids) for i in items) + 5 > 8  # the narrow window below does fill up
    for window in (512, 8):
        model = _tiny_gemma3(sliding_window=window)
        cached = generation_grid_search(model, TOK, items, GRID, cached=True, batch_size=3, show_progress=False)
        naive = generation_grid_search(model, TOK, items, GRID, cached=False, batch_size=3, show_progress=False)
        assert [r["predictions"] for r in cached] == [r["predictions"] for r in naive], window
        cached = grid_search(model, TOK, choice_items, GRID, cached=True, show_progress=False)
        naive = grid_search(model, TOK, choice_items, GRID, cached=False, show_progress=False)
        assert [r["accuracy"] for r in cached] == [r["accuracy"] for r in naive], window
    # transformers without activate_past_recording: the rollback fails loudly, the naive search still works
    monkeypatch.setattr("sadi_peft.harness.search.prepare_rollback", lambda cache: None)
    monkeypatch.setattr("sadi_peft.harness.generation.prepare_rollback", lambda cache: None)
    with pytest.raises(RuntimeError, match="cached=False"):
        generation_grid_search(model, TOK, items, GRID, cached=True, batch_size=3, show_progress=False)
    with pytest.raises(RuntimeError, match="cached=False"):
        grid_search(model, TOK, choice_items, GRID, cached=True, show_progress=False)
    generation_grid_search(model, TOK, items, GRID, cached=False, batch_size=3, show_progress=False)  # works
