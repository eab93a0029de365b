"""Greedy-generation exact match for the harness (TriviaQA), with a K x delta search that reuses the prompt's KV cache.

The ``"generate"`` protocol of :func:`sadi_peft.tasks.evaluate` generates greedily after the prompt, cuts the text at
the first newline and compares it, SQuAD-normalised, with every accepted answer. This module runs the same decision
for many interventions at once:

* :func:`generate_under` -- the predictions of a list of items under each of several interventions (``contexts``,
  as in :func:`sadi_peft.harness.search.score_under`): one greedy decode per item and intervention.
* :func:`generation_grid_search` -- exact match of every (K, delta) point of a calibrated SADI adapter.
* :func:`evaluate_generation` -- exact match of the model as it runs now (a test split, scored once).

With ``cached=True`` (``positions="last"`` adapters, ``"last"`` / ``"from_last"`` additive baselines) the tokens
before the prompt's last token never change between grid points, so each batch runs that prefix once, keeps its KV
cache, and every point decodes from the last prompt token on, cropping the cache back afterwards. With
``cached=False`` every point runs the whole prompt, then decodes: what ``model.generate`` does. Both give the same
predictions (tested), and both pin the prompt end (:func:`sadi_peft.prompt_boundary`), so a ``positions="last"``
intervention steers the prompt's last token and no generated token. Uses only sadi_peft's public API.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from tqdm.auto import tqdm

import sadi_peft
from sadi_peft.harness.search import crop_cache, prepare_rollback, sadi_grid_points
from sadi_peft.tasks.protocols import normalize_answer

logger = logging.getLogger(__name__)

__all__ = [
    "GenerationItem",
    "encode_generation_item",
    "evaluate_generation",
    "exact_match",
    "generate_under",
    "generation_grid_search",
]


@dataclass(frozen=True)
class GenerationItem:
    """One example tokenized for greedy generation: the prompt's ids, the accepted answers (as given; compared
    SQuAD-normalised) and the generation budget."""

    prompt_ids: list[int]
    answers: tuple[str, ...]
    max_new_tokens: int = 16


def encode_generation_item(
    tokenizer: Any, prompt: str, answers: Sequence[str], *, max_new_tokens: int = 16
) -> GenerationItem:
    """Tokenize like ``sadi_peft.tasks.evaluate(protocol="generate")``: ``prompt.strip()`` with special tokens.

    Raises:
        ValueError: the prompt tokenizes to nothing, no answer is given, or ``max_new_tokens`` is not a positive int.
    """
    prompt_ids = list(tokenizer(prompt.strip())["input_ids"])
    if not prompt_ids:
        raise ValueError(f"the prompt {prompt[:60]!r} tokenizes to nothing")
    answers = tuple(str(a) for a in answers)
    if not any(normalize_answer(a) for a in answers):
        raise ValueError(f"the prompt {prompt[:60]!r} has no non-empty accepted answer (got {list(answers)!r})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return GenerationItem(prompt_ids, answers, max_new_tokens)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """SQuAD / TriviaQA exact match: the normalised prediction equals one normalised accepted answer."""
    return normalize_answer(prediction) in {normalize_answer(a) for a in answers}


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids of the model's generation config (else the tokenizer's)."""
    runner = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = getattr(getattr(runner, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _answer_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The generated text up to the first newline, stripped (as ``generate_answers`` cuts it)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).split("\n", 1)[0].strip()


class GreedyBatch:
    """A batch of prompts laid out for greedy decoding under many interventions.

    Every row is left-padded so that its last prompt token sits in the same column ``L``; the prompt end is pinned
    there. With ``cached=True`` the ``L`` prefix columns run once here (nothing in them is steered: the pinned end
    lies past them) and each :meth:`generate` starts from the last prompt token on that KV cache.
    """

    def __init__(self, model: Any, tokenizer: Any, items: Sequence[GenerationItem], *, cached: bool) -> None:
        self.model, self.tokenizer, self.items, self.cached = model, tokenizer, list(items), cached
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad = int(pad)
        self.stop = _stop_ids(model, tokenizer)
        device = next(model.parameters()).device
        rows = len(self.items)
        self.prefix_len = L = max(len(item.prompt_ids) - 1 for item in self.items)
        ids = torch.full((rows, L + 1), self.pad, dtype=torch.long)
        mask = torch.zeros((rows, L + 1), dtype=torch.long)
        for r, item in enumerate(self.items):
            ids[r, L + 1 - len(item.prompt_ids) :] = torch.tensor(item.prompt_ids)
            mask[r, L + 1 - len(item.prompt_ids) :] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        self.pin = torch.ones((rows, L + 1), dtype=torch.long, device=device)  # prompt end: column L in every row
        self.budget = torch.tensor([item.max_new_tokens for item in self.items], device=device)
        self.cache = None
        if cached and L > 0:
            with torch.no_grad(), sadi_peft.prompt_boundary(model, self.pin):
                out = model(input_ids=self.ids[:, :L], attention_mask=self.mask[:, :L],
                            position_ids=self.positions[:, :L], use_cache=True, logits_to_keep=1)
            self.cache = out.past_key_values
            prepare_rollback(self.cache)

    def generate(self) -> list[str]:
        """Greedy answers (text up to the first newline) under the interventions active now."""
        model, L = self.model, self.prefix_len
        rows = len(self.items)
        device = self.ids.device
        if self.cache is not None:
            start = {"input_ids": self.ids[:, L:], "position_ids": self.positions[:, L:], "past_key_values": self.cache}
        else:  # the whole prompt: the naive path, and the cached one when the prompts are one token long
            start = {"input_ids": self.ids, "position_ids": self.positions}
        mask = self.mask
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        stop = torch.tensor(sorted(self.stop), dtype=torch.long, device=device)
        tokens: list[torch.Tensor] = []
        try:
            with torch.no_grad(), sadi_peft.prompt_boundary(model, self.pin):
                out = model(attention_mask=mask, use_cache=True, logits_to_keep=1, **start)
                past, positions = out.past_key_values, start["position_ids"][:, -1:]
                for step in range(int(self.budget.max())):
                    token = out.logits[:, -1].argmax(-1)
                    token = torch.where(done, torch.full_like(token, self.pad), token)
                    tokens.append(token)
                    done = done | torch.isin(token, stop) | (step + 1 >= self.budget)
                    done = done | self._has_newline(token, done)
                    if bool(done.all()):
                        break
                    mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
                    positions = positions + 1
                    out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                                past_key_values=past, use_cache=True, logits_to_keep=1)
        finally:
            if self.cache is not None:
                crop_cache(self.cache, L)  # back to the prefix for the next intervention
        generated = torch.stack(tokens, dim=1).cpu() if tokens else torch.empty((rows, 0), dtype=torch.long)
        answers = []
        for r, item in enumerate(self.items):
            row = [int(t) for t in generated[r, : item.max_new_tokens]]
            cut = next((i for i, t in enumerate(row) if t in self.stop), len(row))
            answers.append(_answer_text(self.tokenizer, row[: cut + 1]))
        return answers

    def _has_newline(self, token: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """Rows still running whose new token holds a newline (the answer ends there)."""
        flags = torch.zeros_like(done)
        for r in torch.nonzero(~done).flatten().tolist():
            if "\n" in self.tokenizer.decode([int(token[r])], skip_special_tokens=False):
                flags[r] = True
        return flags


def generate_under(
    model: Any,
    tokenizer: Any,
    items: Sequence[GenerationItem],
    contexts: Sequence[Callable[[], ContextManager[Any]]],
    *,
    cached: bool,
    batch_size: int = 16,
    show_progress: bool = False,
    desc: str = "generation search",
) -> list[list[str]]:
    """Greedy answers of ``items`` under each intervention: ``contexts[g]()`` opens grid point ``g``. Returns one list
    of answer strings (in ``items`` order) per point.

    Items are batched by prompt length (longest first). ``cached=True`` is valid only when no point changes the tokens
    before the last prompt token; the caller checks (see the module docstring).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    items = list(items)
    if not items:
        raise ValueError("No items to generate for.")
    bad = [type(item).__name__ for item in items if not isinstance(item, GenerationItem)]
    if bad:
        raise TypeError(f"generate_under needs GenerationItem objects (encode_generation_item), got {bad[0]}")
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids), reverse=True)
    answers: list[list[str]] = [[""] * len(items) for _ in contexts]
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        for begin in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress):
            index = order[begin : begin + batch_size]
            batch = GreedyBatch(model, tokenizer, [items[i] for i in index], cached=cached)
            for g, context in enumerate(contexts):
                with context():
                    for i, text in zip(index, batch.generate()):
                        answers[g][i] = text
    finally:
        if was_training:
            model.train()
    return answers


def _scored(items: Sequence[GenerationItem], answers: Sequence[str]) -> dict[str, Any]:
    correct = [exact_match(a, item.answers) for a, item in zip(answers, items)]
    return {"accuracy": sum(correct) / len(correct), "n": len(items), "correct": correct, "predictions": list(answers)}


def evaluate_generation(model: Any, tokenizer: Any, items: Sequence[GenerationItem], *,
                        batch_size: int = 16) -> dict[str, Any]:
    """Exact match of ``model`` as it runs now (wrap in a baseline's ``apply`` to score a baseline):
    ``{"accuracy", "n", "correct", "predictions"}``, every prompt run in full (no prefix cache)."""
    answers = generate_under(model, tokenizer, items, [_nothing], cached=False, batch_size=batch_size)[0]
    return _scored(items, answers)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def generation_grid_search(
    model: Any,
    tokenizer: Any,
    items: Sequence[GenerationItem],
    grid: Sequence[tuple[int, float]],
    *,
    cached: bool = True,
    batch_size: int = 16,
    adapter_name: Optional[str] = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Exact match of every (K, delta) grid point on ``items`` (a validation split: choose on it, never on test).

    ``model`` carries a calibrated SADI adapter (its stored scores are re-cut for each K); ``cached=True`` needs
    ``positions="last"``. Returns one dict per point: ``top_k``, ``delta``, ``accuracy``, ``n``, ``correct``,
    ``predictions``; the adapter is left at the last grid point.
    """
    _, contexts = sadi_grid_points(model, grid, cached=cached, adapter_name=adapter_name)
    answers = generate_under(model, tokenizer, items, contexts, cached=cached, batch_size=batch_size,
                             show_progress=show_progress)
    return [{"top_k": k, "delta": d, **_scored(items, a)} for (k, d), a in zip(grid, answers)]
