"""K x delta grid search for ``positions="last"`` adapters, scored by restricted-choice log-likelihood.

With ``positions="last"`` the gain acts on the prompt's last token only, so the tokens before it never change with
K or delta (attention is causal). The cached search runs that prefix once per batch of examples, keeps its KV cache,
and for every grid point runs only the last prompt token plus the answer options on top of it, cropping the cache
back afterwards. The naive search runs prompt + option in full for every grid point. Both give the same scores (up
to float rounding of the attention kernels), so the same accuracies — tested.

Where every token is steered (``positions="all"``) the prefix changes with each point, but it is still the same for
all options of an example: the shared-prefix search runs it once per example and point, under the point's
intervention, and its KV cache serves every option (TruthfulQA's six-shot primer is then run once instead of once
per option). Exact for any intervention, since attention is causal — tested.

Scores are length-normalised: the mean log-probability of an option's tokens after ``prompt + separator``.
Uses only sadi_peft's public API.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Optional

import torch
from tqdm.auto import tqdm

import sadi_peft
from sadi_peft.harness.layer_replay import LayerReplay, decoder_layers, first_steered_layer
from sadi_peft.tasks.protocols import _runner, score_option_ids

logger = logging.getLogger(__name__)


@dataclass
class ChoiceItem:
    """One example tokenized for scoring: prompt ids, each option's ids after the prompt, and the gold index."""

    prompt_ids: list[int]
    option_ids: list[list[int]]
    label: int


def encode_choice_item(tokenizer: Any, prompt: str, choices: Sequence[str], label: int, separator: str = " ") -> ChoiceItem:
    """Tokenize like ``sadi_peft.tasks.evaluate(protocol="choice")``: ``prompt.strip()`` with special tokens, each
    option as ``separator + choice.strip()`` without them, so that search and evaluation score the same tokens."""
    prompt_ids = list(tokenizer(prompt.strip())["input_ids"])
    if not prompt_ids:
        raise ValueError(f"the prompt {prompt[:60]!r} tokenizes to nothing")
    options = []
    for choice in choices:
        ids = list(tokenizer(separator + choice.strip(), add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"choice {choice!r} tokenizes to nothing")
        options.append(ids)
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} is not an index into {len(choices)} choices")
    return ChoiceItem(prompt_ids, options, label)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(_runner(model).forward).parameters


# float32 logits plus their float32 log-softmax, per forward of the search; a batch is split below this
MAX_LOGITS_BYTES = 2 * 1024**3


def _vocab_size(model) -> Optional[int]:
    runner = _runner(model)
    head = runner.get_output_embeddings() if hasattr(runner, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(runner, "config", None), "vocab_size", None)
    return int(size) if size else None


def item_batches(
    items: Sequence[ChoiceItem], batch_size: int, vocab_size: Optional[int], max_logits_bytes: int = MAX_LOGITS_BYTES
) -> list[Sequence[ChoiceItem]]:
    """Consecutive batches of at most ``batch_size`` items whose scoring forward projects at most
    ``max_logits_bytes`` of logits (float32 logits and log-softmax) over ``vocab_size`` tokens; an item that alone
    passes the budget gets a batch of its own. Order is kept, so the scores concatenate back in item order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1.")
    batches: list[Sequence[ChoiceItem]] = []
    start, rows, width = 0, 0, 0
    for i, item in enumerate(items):
        single = all(len(o) == 1 for o in item.option_ids)
        item_rows = 1 if single else len(item.option_ids)
        item_width = 2 if single else 1 + max(len(o) for o in item.option_ids)
        new_rows, new_width = rows + item_rows, max(width, item_width)
        over = vocab_size is not None and new_rows * new_width * vocab_size * 8 > max_logits_bytes
        if i > start and (i - start >= batch_size or over):
            batches.append(items[start:i])
            start, new_rows, new_width = i, item_rows, item_width
        rows, width = new_rows, new_width
    if start < len(items):
        batches.append(items[start:])
    return batches


def _rows(items: Sequence[ChoiceItem]) -> list[tuple[int, int]]:
    return [(i, j) for i, item in enumerate(items) for j in range(len(item.option_ids))]


def _collect(items, rows, row_scores) -> torch.Tensor:
    width = max(len(item.option_ids) for item in items)
    scores = torch.full((len(items), width), float("-inf"))
    for (i, j), value in zip(rows, row_scores):
        scores[i, j] = value
    return scores


def score_naive(model, items: Sequence[ChoiceItem], pad_token_id: int, batch_size: Optional[int] = None) -> torch.Tensor:
    """[n_items, max_options] mean option log-probs, each prompt + option run in full: rows sorted by length,
    ``batch_size`` rows per forward (default: all in one), left padding, logits projected only at the option
    positions, one row per item when its options are single tokens
    (:func:`sadi_peft.tasks.protocols.score_option_ids`)."""
    scores = score_option_ids(model, [(item.prompt_ids, item.option_ids) for item in items],
                              pad_token_id=pad_token_id, batch_size=batch_size or sum(len(i.option_ids) for i in items))
    rows = _rows(items)
    return _collect(items, rows, [scores[i][j] for i, j in rows])


def prepare_rollback(cache) -> None:
    """Make ``cache`` croppable back to its current length after later forwards.

    A sliding-window layer (Gemma 2/3, Mistral) keeps only its last ``window - 1`` keys; once a grid point's tokens
    push it past the window, the keys a rollback needs are gone. transformers 5 can keep them until the next
    ``crop`` (``activate_past_recording``), which changes no attention output: the same keys are visible. Older
    versions lack it; there :func:`crop_cache` raises a clear error instead."""
    if cache is not None and hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()


def crop_cache(cache, length: int) -> None:
    """Drop the tokens of ``cache`` past ``length`` (the prompt prefix), so the next grid point starts from it.

    Raises:
        RuntimeError: the cache cannot be rolled back, e.g. a sliding-window layer whose window filled up (its older
            keys are gone): the cached search cannot be used there; run it with ``cached=False``.
    """
    extra = cache.get_seq_length() - length
    try:
        if extra > 0:
            cache.crop(-extra)  # crop(-n) drops the last n tokens (transformers 4.57 and 5)
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(
            f"The KV cache cannot be cropped back to the {length}-token prompt prefix ({error}). This happens when a "
            "sliding-window attention layer's window fills up during a grid point, which discards the keys a rollback "
            "needs. Run the search with cached=False (same results, slower), or use shorter prompts/answers."
        ) from error
    if cache.get_seq_length() != length:
        raise RuntimeError(f"The KV cache could not be cropped back to the {length}-token prompt prefix "
                           f"(it holds {cache.get_seq_length()}); run the search with cached=False.")


class CachedBatch:
    """A batch of examples with the KV cache of their prompts minus the last token, ready for many grid points.

    Each prompt prefix runs once, however many options its item has: the cache is computed on one row per item and
    then copied to the item's option rows (a multi-token option needs a row of its own).

    ``steered_prefix=False``: the prefix runs once, here, with no intervention, and every :meth:`score` continues
    from that cache (valid only when no point changes the tokens before the last prompt token).
    ``steered_prefix=True``: each :meth:`score` runs the prefix again, under whatever intervention is active, so the
    scores are those of full passes for any intervention; the saving is that a prompt runs once for all its
    options rather than once per option."""

    def __init__(self, model, items: Sequence[ChoiceItem], pad_token_id: int, *, steered_prefix: bool = False) -> None:
        self.model, self.items, self.steered_prefix = model, items, steered_prefix
        # one row per option; one row per item when its options are single tokens (all read at the last prompt token)
        self.rows: list[tuple[int, Optional[int]]] = []
        for i, item in enumerate(items):
            if all(len(o) == 1 for o in item.option_ids):
                self.rows.append((i, None))
            else:
                self.rows.extend((i, j) for j in range(len(item.option_ids)))
        device = _device(model)
        prefixes = [item.prompt_ids[:-1] for item in items]
        suffixes = [items[i].prompt_ids[-1:] + ([] if j is None else items[i].option_ids[j]) for i, j in self.rows]
        self.prefix_len = max(len(p) for p in prefixes)
        L, S, R = self.prefix_len, max(len(s) for s in suffixes), len(self.rows)
        prefix_ids = torch.full((len(items), L), pad_token_id, dtype=torch.long)
        item_mask = torch.zeros((len(items), L), dtype=torch.long)
        for i, p in enumerate(prefixes):
            if p:  # left padding: every prefix ends at column L - 1
                prefix_ids[i, L - len(p) :] = torch.tensor(p)
                item_mask[i, L - len(p) :] = 1
        row_item = torch.tensor([i for i, _ in self.rows])
        prefix_mask = item_mask[row_item]
        suffix_ids = torch.full((R, S), pad_token_id, dtype=torch.long)
        suffix_mask = torch.zeros((R, S), dtype=torch.long)
        for r, s in enumerate(suffixes):
            suffix_ids[r, : len(s)] = torch.tensor(s)  # right padding after the prefix
            suffix_mask[r, : len(s)] = 1
        lengths = prefix_mask.sum(-1)
        self.suffix_ids = suffix_ids.to(device)
        self.attention = torch.cat([prefix_mask, suffix_mask], dim=1).to(device)
        self.suffix_positions = (lengths.unsqueeze(1) + torch.arange(S)).to(device)
        # the steered token is the first suffix column, absolute position L in the padded layout
        self.pin = torch.cat([torch.ones(R, L + 1, dtype=torch.long), torch.zeros(R, S - 1, dtype=torch.long)], 1).to(device)
        self._prefix = None
        if L > 0:
            positions = (item_mask.cumsum(-1) - 1).clamp(min=0)
            self._prefix = (prefix_ids.to(device), item_mask.to(device), positions.to(device),
                            None if R == len(items) else row_item.to(device))
        self.cache = None
        if self._prefix is not None and not steered_prefix:
            self.cache = self._prefix_cache()
            prepare_rollback(self.cache)

    def _prefix_cache(self):
        """The KV cache of the prompt prefixes under the active intervention, one row per option row."""
        model, (ids, mask, positions, row_item) = self.model, self._prefix
        # only the cache is wanted: project the vocabulary at one position, not at all of them (Gemma 3's
        # 262k-token vocabulary at 16 x 1 900 MMLU prefix tokens would take 31 GB of logits)
        keep = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
        # the prompt end is pinned past the prefix: a positions="last" gain or a hook-based baseline at the last
        # token touches none of these tokens, and every other adapter (a LoRA under the SADI adapter, a gain at
        # every position) acts as it does in a full pass
        with torch.no_grad(), sadi_peft.prompt_boundary(model, self.pin[: len(self.items)]):
            cache = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          **keep).past_key_values
        if row_item is not None:  # one cache row per option row
            cache.batch_select_indices(row_item)
        return cache

    def score(self) -> torch.Tensor:
        """Scores under the active intervention (the adapter's current mask and delta, a baseline's hooks); a cache
        that outlives the call is cropped back to the prefix afterwards."""
        model = self.model
        cache = self._prefix_cache() if self.steered_prefix and self._prefix is not None else self.cache
        with torch.no_grad(), sadi_peft.prompt_boundary(model, self.pin):
            out = model(input_ids=self.suffix_ids, attention_mask=self.attention, position_ids=self.suffix_positions,
                        past_key_values=cache, use_cache=cache is not None)
        if self.cache is not None:
            crop_cache(self.cache, self.prefix_len)
        logprobs = torch.log_softmax(out.logits.float(), -1)
        cells, scores = [], []
        for r, (i, j) in enumerate(self.rows):
            options = self.items[i].option_ids
            if j is None:  # single-token options: the next-token distribution after the prompt
                cells.extend((i, k) for k in range(len(options)))
                scores.extend(float(logprobs[r, 0, o[0]]) for o in options)
            else:
                cells.append((i, j))
                scores.append(float(logprobs[r, torch.arange(len(options[j])), torch.tensor(options[j])].mean()))
        return _collect(self.items, cells, scores)


def accuracy_of(scores: torch.Tensor, items: Sequence[ChoiceItem]) -> float:
    labels = torch.tensor([item.label for item in items])
    return float((scores.argmax(-1) == labels).float().mean())


def concat_scores(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-batch ``[n, options]`` score blocks into one, padding missing options with ``-inf``."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=float("-inf")) for p in parts])


def score_under(
    model,
    items: Sequence[ChoiceItem],
    contexts: Sequence[Callable[[], ContextManager[Any]]],
    *,
    pad_token_id: int,
    cached: bool,
    batch_size: int = 16,
    show_progress: bool = False,
    desc: str = "grid search",
    depths: Optional[Sequence[int]] = None,
    max_logits_bytes: int = MAX_LOGITS_BYTES,
    share_prefix: bool = False,
) -> list[torch.Tensor]:
    """Scores of ``items`` under each intervention: ``contexts[g]()`` opens grid point ``g`` (sets a mask and delta,
    registers a baseline's hooks ...) for the forwards run inside it. Returns one ``[n_items, options]`` tensor per
    point.

    ``cached=True`` runs each batch's prompt prefix once, with no intervention, and every point only on the last
    prompt token + options: valid only when no point changes the tokens before the last prompt token (a SADI
    adapter with ``positions="last"``, an additive baseline with ``"last"`` or ``"from_last"``). The caller checks.

    ``share_prefix=True`` (``cached=False`` only; valid for any intervention): in a batch where some option is
    longer than one token (one row per option), every point runs each prompt prefix once, under its intervention,
    and continues all the item's options from that cache (:class:`CachedBatch` with ``steered_prefix=True``)
    instead of running prompt + option once per option. Batches of single-token options (one row per item) take the
    path below.

    ``depths`` (``cached=False`` only): ``depths[g]`` is the lowest decoder layer point ``g`` steers. Per batch the
    deepest point runs in full and records the inputs of the other points' first steered layers; the others start
    there (:class:`~sadi_peft.harness.layer_replay.LayerReplay`: same scores, fewer layers run). The caller vouches
    that point ``g`` changes nothing below layer ``depths[g]``.

    Batches hold ``batch_size`` items of similar length (sorted by their longest row; the scores come back in the
    order of ``items``), fewer where their logits (one row per option of multi-token items, one
    position per option token, the whole vocabulary) would pass ``max_logits_bytes``.
    """
    replay = None
    if depths is not None and not cached:
        if len(depths) != len(contexts):
            raise ValueError(f"{len(depths)} depths for {len(contexts)} grid points")
        layers = decoder_layers(model)
        replay = LayerReplay(layers) if layers is not None and max(depths) > 0 else None
    # the deepest point first: its full pass can record the inputs of every shallower point's first layer
    order = sorted(range(len(contexts)), key=lambda g: -depths[g]) if replay is not None else range(len(contexts))
    parts: list[list[torch.Tensor]] = [[] for _ in contexts]
    # items of similar length batched together (less padding: TruthfulQA's options run from 2 to 60 tokens); the
    # scores go back to the callers' order at the end
    by_length = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids) + max(map(len, items[i].option_ids)))
    batches = item_batches([items[i] for i in by_length], batch_size, _vocab_size(model), max_logits_bytes)
    for batch in tqdm(batches, desc=desc, disable=not show_progress):
        shared = share_prefix and not cached and any(len(o) > 1 for item in batch for o in item.option_ids)
        prepared = CachedBatch(model, batch, pad_token_id, steered_prefix=shared) if cached or shared else None
        for rank, g in enumerate(order):
            with contexts[g]():
                if prepared is not None:
                    parts[g].append(prepared.score())
                elif replay is None:
                    parts[g].append(score_naive(model, batch, pad_token_id))
                elif rank == 0:
                    with replay.record(depths):
                        parts[g].append(score_naive(model, batch, pad_token_id))
                elif replay.can_replay(depths[g]):
                    with replay.replay(depths[g]):
                        parts[g].append(score_naive(model, batch, pad_token_id))
                else:  # depth 0, or a layer that returns more than its hidden states: run in full
                    parts[g].append(score_naive(model, batch, pad_token_id))
    restore = torch.argsort(torch.tensor(by_length))
    return [concat_scores(p)[restore] for p in parts]


def sadi_grid_points(
    model, grid: Sequence[tuple[int, float]], *, cached: bool, adapter_name: Optional[str] = None
) -> tuple[Any, list[Callable[[], ContextManager[Any]]]]:
    """``(config, contexts)`` for a K x delta grid of a calibrated SADI adapter: ``contexts[g]()`` sets point ``g``'s
    mask (each K's top-K mask cut once from the stored scores) and delta. Refuses an empty grid and ``cached=True``
    without ``positions="last"``."""
    name, config = sadi_peft.model.resolve_adapter(model, adapter_name)
    if cached and config.positions != "last":
        raise ValueError("The prefix-cached search needs positions='last' (with 'all' every token is steered); "
                         "use cached=False.")
    if not grid:
        raise ValueError("The grid is empty: give at least one (top_k, delta) point.")
    layers = [layer for _, layer in sadi_peft.model.sadi_layers(model, name)]
    masks = {}
    for k in sorted({k for k, _ in grid}):  # cut each K's mask once, then copy it in per grid point
        sadi_peft.apply_top_k(model, k, adapter_name=name)
        masks[k] = [layer.sadi_mask[name].clone() for layer in layers]

    @contextmanager
    def point(k: int, delta: float) -> Iterator[None]:
        for layer, mask in zip(layers, masks[k]):
            layer.sadi_mask[name].copy_(mask)
        sadi_peft.set_delta(model, delta, adapter_name=name)
        config.top_k = k
        yield

    return config, [partial(point, k, d) for k, d in grid]


def grid_search(
    model,
    tokenizer,
    items: Sequence[ChoiceItem],
    grid: Sequence[tuple[int, float]],
    *,
    cached: bool = True,
    batch_size: int = 16,
    adapter_name: Optional[str] = None,
    show_progress: bool = True,
    skip_layers: bool = True,
    max_logits_bytes: int = MAX_LOGITS_BYTES,
    share_prefix: bool = True,
) -> list[dict[str, Any]]:
    """Accuracy of every (K, delta) grid point on ``items`` (a validation split: choose on it, never on test).

    ``model`` carries a calibrated SADI adapter (its stored scores are re-cut for each K); ``cached=True`` needs
    ``positions="last"``. With ``cached=False`` and ``skip_layers=True`` each point runs only the decoder layers from
    its lowest steered one up, fed the states that one full pass per batch recorded there (exact; see
    :mod:`sadi_peft.harness.layer_replay`); with ``cached=False`` and ``share_prefix=True`` a batch with multi-token
    options runs each prompt once per point for all its options instead (see :func:`score_under`; exact, and the
    larger saving when prompts are long and options many). ``batch_size`` items per forward, fewer where their logits would pass
    ``max_logits_bytes`` (large vocabularies, many long options). Returns one dict per grid point: ``top_k``, ``delta``, ``accuracy``,
    ``n``, ``scores``; the adapter is left at the last grid point.
    """
    config, contexts = sadi_grid_points(model, grid, cached=cached, adapter_name=adapter_name)
    depths = None
    if skip_layers and not cached:
        name, _ = sadi_peft.model.resolve_adapter(model, adapter_name)
        depths = []
        for context in contexts:
            with context():
                depths.append(first_steered_layer(model, name))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_under(model, items, contexts, pad_token_id=pad, cached=cached, batch_size=batch_size,
                         show_progress=show_progress, depths=depths, max_logits_bytes=max_logits_bytes,
                         share_prefix=share_prefix)
    with contexts[-1]():  # leave the adapter at the last grid point (the points may have run in another order)
        pass
    return [{"top_k": k, "delta": d, "accuracy": accuracy_of(s, items), "n": len(items), "scores": s}
            for (k, d), s in zip(grid, scores)]


def timed_grid_search(*args, **kwargs) -> tuple[list[dict[str, Any]], float]:
    start = time.perf_counter()
    results = grid_search(*args, **kwargs)
    return results, time.perf_counter() - start
