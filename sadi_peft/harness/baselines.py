"""Baselines of the reproduction harness, each with its hyperparameters chosen on a validation split only.

Five methods, each as a small fitted object with an ``apply(model)`` context manager (hooks and adapter changes
are undone on exit; nothing global is touched) and ``select_on_validation(model, tokenizer, items, grid,
split="validation")`` (refuses ``split="test"`` through :func:`sadi_peft.tasks.require_selection_split`):

* :class:`NoIntervention` -- the plain model (SADI layers disabled). Nothing to fit or select.
* :class:`RandomMask` -- ablation "random top-K mask" (sadi-method.md Table 4): the SADI adapter's own gain
  ``1 + delta`` on K units drawn uniformly with a seed (:func:`random_mask` writes such a mask). Grid: ``(k, delta)``.
* :class:`FixedSteering` -- ablation "fixed vector" (Table 4): ``A' = A + delta * (D * M)`` at the SADI sites, D the
  per-feature mean difference (:func:`fit_fixed_steering`), M the SADI adapter's top-K mask. Grid: ``(k, delta)``.
* :class:`CAA` -- Contrastive Activation Addition (Rimsky et al. 2024): ``h_l += alpha * v_l`` on the residual stream
  after decoder layer ``l``, ``v_l`` the mean difference of that layer's output (:func:`fit_caa`).
  Grid: ``(layer, alpha)``.
* :class:`ITI` -- Inference-Time Intervention (Li et al. 2023): head ``h`` += ``alpha * sigma_h * theta_h`` on the K
  heads whose linear probes score best on held-out pairs (:func:`fit_iti`). Grid: ``(k, alpha)``.

Conventions shared by all of them:

* **Pairs** are read exactly as :func:`sadi_peft.calibrate` reads them: ``prompt.strip() + " " + answer.strip()``
  (``separator=`` / ``strip=``), right-padded batches, the statistic taken at the **last token of each text** (the
  answer token), the SADI adapter's own gain switched off while recording.
* **Sites.** SADI sites are the modules a SADI adapter wraps (input of ``self_attn.o_proj`` for heads, input of
  ``mlp.down_proj`` for neurons, output of ``mlp.down_proj`` for hidden dimensions). CAA hooks the output of the
  decoder layers ``model.model.layers[l]`` (the residual stream), ITI the input of ``self_attn.o_proj`` split into
  heads (head-major: head ``h`` = features ``h*d .. (h+1)*d-1``). CAA and ITI need a Llama-like model (a
  ``model_type`` of :data:`sadi_peft.ARCHITECTURES` with decoder layers at ``model.model.layers``); other models get a
  ``ValueError`` naming what is missing. Fixed steering and the random mask work wherever the SADI adapter does.
* **Positions** (``positions=`` of the additive baselines): ``"all"`` adds at every position of every forward
  (prompt, answer and generated tokens); ``"last"`` only at the last prompt token (SADI's regime: the prompt end
  pinned by :func:`sadi_peft.prompt_boundary` when set, else the last attended token of a forward without KV cache;
  decode steps get nothing); ``"from_last"`` at the last prompt token and every position after it (CAA's code adds
  "from the instruction end" on; ITI's multiple-choice scoring adds from the answer on). As with SADI, wrap
  uncached generation on a plain model in :func:`sadi_peft.prompt_boundary` for ``"last"`` / ``"from_last"``.
  :func:`sadi_peft.tasks.evaluate` pins the prompt end only on models that carry SADI layers: on a plain model its
  teacher-forced rows would steer their last *answer* token under ``"last"`` / ``"from_last"``, so score plain
  models with :func:`evaluate_items` (which always pins) or use ``"all"`` there.
* **SADI stays off** inside ``apply`` of the additive baselines (``disable_sadi=True``): every
  :class:`~sadi_peft.SADILayer` of the model is disabled for the block and restored after it, so a baseline is never
  mixed with the SADI gain. Other adapters (a LoRA under SADI) stay as they are.
* **Scoring** for selection is length-normalised restricted-choice log-likelihood of every option, the prompt end
  pinned. With ``positions`` ``"last"`` / ``"from_last"`` (``cached=None``, the default) nothing before the last
  prompt token changes between grid points, so each batch's prompt prefix runs once and every point only on the
  last prompt token + options (:func:`sadi_peft.harness.search.score_under`), as in the SADI grid search; with
  ``"all"`` every point runs prompt + option in full (:func:`sadi_peft.harness.search.score_naive`). Both give the
  same accuracies (tested). Ties between grid points keep the first one. Items given as
  :class:`~sadi_peft.harness.generation.GenerationItem` s (TriviaQA) are scored by greedy-generation exact match
  instead, with the same prefix-cache rule (:func:`sadi_peft.harness.generation.generate_under`).

Strength conventions: fixed steering uses SADI's ``delta`` as the multiplier of the raw mean difference D; CAA's
``alpha`` multiplies the **raw** (unnormalised) mean difference, as in Rimsky et al. 2024 (multipliers such as -1, 1,
2); ITI's ``alpha`` multiplies the unit mass-mean direction times the standard deviation of the head's activations
along it, as in Li et al. 2023 (their best: K = 48 heads, alpha = 15 on LLaMA-7B).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

import sadi_peft
from sadi_peft.architectures import ARCHITECTURES, num_attention_heads
from sadi_peft.calibration import normalize_pair
from sadi_peft.harness.generation import GenerationItem, exact_match, generate_under
from sadi_peft.harness.search import ChoiceItem, accuracy_of, encode_choice_item, score_naive, score_under
from sadi_peft.layer import SADILayer, prompt_end_positions
from sadi_peft.model import (
    _past_length,
    _tensor_arg as _arg,
    empty_mask_expected,
    pinned_prompt_end,
    resolve_adapter,
    sadi_layers,
    transformer_model,
)
from sadi_peft.tasks import Example, require_selection_split

__all__ = [
    "POSITION_REGIMES",
    "CAA",
    "FixedSteering",
    "ITI",
    "NoIntervention",
    "RandomMask",
    "Selection",
    "evaluate_items",
    "fit_caa",
    "fit_fixed_steering",
    "fit_iti",
    "fit_logistic_probes",
    "no_intervention",
    "prepare_items",
    "probe_accuracy",
    "random_mask",
    "sadi_disabled",
]

#: Position regimes of the additive baselines (see the module docstring).
POSITION_REGIMES = ("all", "last", "from_last")

CAA_ALPHAS = (-2.0, -1.0, 1.0, 2.0, 4.0, 8.0)
ITI_KS = (1, 2, 4, 8, 16, 32, 48, 64)
ITI_ALPHAS = (1.0, 5.0, 10.0, 15.0, 20.0)
SADI_HEAD_KS = (1, 2, 4, 6, 8, 10)


# ================================================================================================ model plumbing
@contextmanager
def sadi_disabled(model: nn.Module) -> Iterator[None]:
    """Disable every SADI layer of ``model`` for the block; each layer's previous state is restored afterwards.

    Works for a ``PeftModel`` and for a transformers model with SADI adapters from ``load_adapter``; non-SADI adapter
    layers (a LoRA under SADI) are left alone.
    """
    layers = [m for m in transformer_model(model).modules() if isinstance(m, SADILayer)]
    states = [bool(m.disable_adapters) for m in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, was_disabled in zip(layers, states):
            layer.enable_adapters(not was_disabled)


def no_intervention(model: nn.Module):
    """The unsteered model: a context in which every SADI layer is disabled (same as ``NoIntervention().apply``)."""
    return sadi_disabled(model)


@dataclass(frozen=True)
class _LlamaSites:
    """Module names (relative to the transformers model) of a Llama-like decoder stack."""

    layers: list[str]
    heads: list[str]
    num_heads: int
    head_dim: int
    hidden_size: int


def _llama_sites(model: nn.Module) -> _LlamaSites:
    inner = transformer_model(model)
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    decoder = getattr(getattr(inner, "model", None), "layers", None)
    if spec is None or not isinstance(decoder, nn.ModuleList) or len(decoder) == 0:
        where = "no decoder layers at model.model.layers" if not isinstance(decoder, nn.ModuleList) else ""
        raise ValueError(
            f"The CAA / ITI baselines support Llama-like models only (a model_type of sadi_peft.ARCHITECTURES with "
            f"decoder layers at model.model.layers); got {type(inner).__name__} with model_type={model_type!r}"
            f"{' and ' + where if where else ''}. Supported model types: {', '.join(sorted(ARCHITECTURES))}."
        )
    layers = [f"model.layers.{i}" for i in range(len(decoder))]
    heads = [f"{name}.{spec.head}" for name in layers]
    for name in heads:
        try:
            inner.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(
                f"{type(inner).__name__} (model_type={model_type!r}) has no attention output projection at {name!r}; "
                "the ITI baseline needs the Llama layout (self_attn.o_proj in every decoder layer)."
            ) from exc
    num_heads = num_attention_heads(config)
    in_features = _in_features(inner.get_submodule(heads[0]))
    if in_features % num_heads:
        raise ValueError(f"{heads[0]} has {in_features} input features, which do not split into {num_heads} heads.")
    hidden = getattr(text_config, "hidden_size", None) or in_features
    return _LlamaSites(layers, heads, num_heads, in_features // num_heads, int(hidden))


def _in_features(module: nn.Module) -> int:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, nn.Linear):
        return base.in_features
    weight = getattr(base, "weight", None)
    if weight is None:
        raise TypeError(f"Cannot read the input width of {type(base).__name__}.")
    return int(weight.shape[0])  # transformers Conv1D stores [in, out]


class _PromptTracker:
    """Where the prompt ends in the current top-level forward (hooks on the transformers model, installed by apply).

    ``end`` holds the absolute prompt-end position of every row, or ``None`` on a decode step (the prompt ended in an
    earlier chunk, already in the KV cache). The prompt end is the one pinned by :func:`sadi_peft.prompt_boundary`
    when a pin is set (so teacher-forced scoring steers the prompt's last token, not the answer's), else the last
    attended token of a forward that starts at position 0.
    """

    def __init__(self, inner: nn.Module) -> None:
        self.inner = inner
        self.active = False
        self.batch = 0
        self.past = 0
        self.end: Optional[torch.Tensor] = None

    def pre(self, module, args, kwargs):
        ref = _arg(args, kwargs, "input_ids", 0)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None or ref.dim() < 2:
            self.active = False
            return None
        batch, seq_len = ref.shape[0], ref.shape[1]
        self.active, self.batch, self.past = True, batch, _past_length(kwargs)
        pinned = pinned_prompt_end(self.inner)  # set by sadi_peft.prompt_boundary / PeftModel.generate
        if pinned is not None:
            pinned = pinned.to(ref.device)
            if pinned.shape[0] != batch:
                if batch % pinned.shape[0]:
                    raise RuntimeError(f"prompt end pinned for {pinned.shape[0]} rows, forward has {batch} rows")
                pinned = pinned.repeat_interleave(batch // pinned.shape[0])  # beams / num_return_sequences
            self.end = pinned
        elif self.past == 0:
            self.end = prompt_end_positions(_arg(args, kwargs, "attention_mask", 1), batch, seq_len, ref.device)
        else:
            self.end = None
        return None

    def post(self, module, args, kwargs, output):
        self.active, self.end = False, None
        return None


def _add(x: torch.Tensor, vector: torch.Tensor, regime: str, tracker: _PromptTracker) -> torch.Tensor:
    """``x + vector`` at the positions of ``regime``; ``x`` is [batch, seq, features], out of place."""
    vector = vector.to(dtype=x.dtype, device=x.device)
    if regime == "all":
        return x + vector
    if not tracker.active:
        raise RuntimeError(
            f"positions={regime!r} needs the prompt end, which the baseline learns from the model's top-level forward "
            "(input_ids / attention_mask). Call the model itself, not one of its sub-modules, or use positions='all'."
        )
    if x.dim() != 3 or x.shape[0] != tracker.batch:
        raise RuntimeError(
            f"positions={regime!r} expects [batch={tracker.batch}, seq, features] activations, got {tuple(x.shape)}."
        )
    seq_len = x.shape[1]
    end = tracker.end
    if end is None:  # decode step: the prompt ended in an earlier chunk
        return x if regime == "last" else x + vector
    end = end.to(x.device)
    if regime == "last":
        local = end - tracker.past
        valid = (end >= 0) & (local >= 0) & (local < seq_len)
        rows = torch.nonzero(valid).squeeze(1)
        if rows.numel() == 0:
            return x
        cols = local[rows]
        x = x.clone()
        x[rows, cols] = x[rows, cols] + vector
        return x
    positions = tracker.past + torch.arange(seq_len, device=x.device)
    where = (positions.unsqueeze(0) >= end.unsqueeze(1)) & (end.unsqueeze(1) >= 0)
    return torch.where(where.unsqueeze(-1), x + vector, x)


def _check_regime(positions: str) -> str:
    if positions not in POSITION_REGIMES:
        raise ValueError(f"positions={positions!r} is invalid: expected one of {list(POSITION_REGIMES)}.")
    return positions


@contextmanager
def _additions(
    model: nn.Module, additions: Sequence[tuple[str, str, torch.Tensor]], regime: str, disable_sadi: bool
) -> Iterator[None]:
    """Add ``vector`` to the input (``"input"``) or output (``"output"``) of the named modules for the block."""
    _check_regime(regime)
    inner = transformer_model(model)
    tracker = _PromptTracker(inner)
    handles = []
    with ExitStack() as stack:
        if disable_sadi:
            stack.enter_context(sadi_disabled(model))
        try:
            handles.append(inner.register_forward_pre_hook(tracker.pre, with_kwargs=True))
            handles.append(inner.register_forward_hook(tracker.post, with_kwargs=True, always_call=True))
            for name, side, vector in additions:
                module = inner.get_submodule(name)
                vec = vector.detach().clone()
                if side == "input":

                    def pre_hook(module, args, vec=vec):
                        if not args:
                            raise RuntimeError("baseline hook: the module was called without a positional input")
                        return (_add(args[0], vec, regime, tracker),) + tuple(args[1:])

                    handles.append(module.register_forward_pre_hook(pre_hook))
                elif side == "output":

                    def post_hook(module, args, output, vec=vec):
                        if isinstance(output, tuple):
                            return (_add(output[0], vec, regime, tracker),) + tuple(output[1:])
                        return _add(output, vec, regime, tracker)

                    handles.append(module.register_forward_hook(post_hook))
                else:
                    raise ValueError(f"side={side!r}: expected 'input' or 'output'")
            yield
        finally:
            for handle in reversed(handles):
                handle.remove()


# ================================================================================================ recording
def _join(prompt: str, answer: str, separator: str, strip: bool) -> str:
    return prompt.strip() + separator + answer.strip() if strip else prompt + separator + answer


def _record(
    model: nn.Module,
    tokenizer: Any,
    pairs: Iterable[Any],
    sites: Sequence[tuple[str, str]],
    *,
    keep_each: bool,
    batch_size: int,
    separator: str,
    strip: bool,
    show_progress: bool = False,
) -> tuple[dict[str, Any], int]:
    """Activations at the last token of ``prompt + separator + answer`` for both answers of every pair.

    ``sites``: (module name relative to the transformers model, ``"input"`` | ``"output"``). Returns, per site, the
    float64 sum over pairs of (positive - negative) (``keep_each=False``) or the pair ``(positive [N, F],
    negative [N, F])`` in float32 (``keep_each=True``), and the number of pairs. SADI layers are off meanwhile.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1.")
    triples = [normalize_pair(pair, i) for i, pair in enumerate(pairs)]
    if not triples:
        raise ValueError("pairs is empty: a baseline needs at least one (prompt, positive, negative) triple.")
    if batch_size > 1 and len(triples) > 1 and tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token, which batching needs; set one or use batch_size=1.")
    inner = transformer_model(model)
    device = next(inner.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    each: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {name: ([], []) for name, _ in sites}
    state: dict[str, Any] = {}

    def take(name: str, activation: torch.Tensor) -> None:
        rows = torch.arange(activation.shape[0], device=activation.device)
        last = activation[rows, state["last"].to(activation.device)].detach()  # [2B, F]
        half = state["half"]
        if keep_each:
            each[name][0].append(last[:half].float().cpu())
            each[name][1].append(last[half:].float().cpu())
        else:
            diff = (last[:half].double() - last[half:].double()).sum(0).cpu()
            sums[name] = sums[name] + diff if name in sums else diff

    handles = []
    for name, side in sites:
        module = inner.get_submodule(name)
        if side == "input":
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: take(name, args[0])))
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, args, out, name=name: take(name, out[0] if isinstance(out, tuple) else out)
                )
            )
    params = inspect.signature(inner.forward).parameters
    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    was_training = inner.training
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        inner.eval()
        with torch.no_grad(), sadi_disabled(model):
            starts = range(0, len(triples), batch_size)
            for start in tqdm(starts, desc="recording", unit="batch", disable=not show_progress):
                chunk = triples[start : start + batch_size]
                pos = [list(tokenizer(_join(p, y, separator, strip))["input_ids"]) for p, y, _ in chunk]
                neg = [list(tokenizer(_join(p, n, separator, strip))["input_ids"]) for p, _, n in chunk]
                for i, (a, b) in enumerate(zip(pos, neg)):
                    if not a or not b:
                        raise ValueError(f"pairs[{start + i}] tokenizes to an empty sequence.")
                texts = pos + neg
                width = max(len(t) for t in texts)
                input_ids = torch.full((len(texts), width), pad, dtype=torch.long)
                attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
                for row, ids in enumerate(texts):  # right padding: real tokens keep positions 0..n-1
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, : len(ids)] = 1
                state["last"] = torch.tensor([len(t) - 1 for t in texts], dtype=torch.long)
                state["half"] = len(chunk)
                inner(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra)
    finally:
        for handle in handles:
            handle.remove()
        inner.train(was_training)
    if keep_each:
        return {name: (torch.cat(p), torch.cat(n)) for name, (p, n) in each.items()}, len(triples)
    return sums, len(triples)


# ================================================================================================ scoring, selection
Item = Any  # ChoiceItem | GenerationItem | Example | (prompt, choices, label)


def prepare_items(tokenizer: Any, items: Sequence[Item], *, strip_prompt: bool = True) -> list[Any]:
    """:class:`~sadi_peft.harness.search.ChoiceItem` s from ChoiceItems, task :class:`~sadi_peft.tasks.Example` s or
    ``(prompt, choices, label)`` triples (prompts stripped when ``strip_prompt``, as calibration reads them).

    :class:`~sadi_peft.harness.generation.GenerationItem` s pass through as they are: a selection on them scores
    greedy-generation exact match instead of choice accuracy. A list mixing the two kinds is refused.
    """
    items = list(items)
    generation = [isinstance(item, GenerationItem) for item in items]
    if any(generation):
        if not all(generation):
            first = generation.index(False)
            raise TypeError(f"items mix GenerationItems with other items (item {first} is a "
                            f"{type(items[first]).__name__}); score one protocol at a time.")
        return items
    out = []
    for item in items:
        if isinstance(item, ChoiceItem):
            out.append(item)
            continue
        if isinstance(item, Example):
            prompt, choices, label = item.prompt, item.choices, item.label
        else:
            prompt, choices, label = item
        out.append(encode_choice_item(tokenizer, prompt.strip() if strip_prompt else prompt, list(choices), label))
    if not out:
        raise ValueError("No items to score.")
    return out


def evaluate_items(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    strip_prompt: bool = True,
    distributed: bool = False,
    prefix_cached: bool = False,
) -> dict[str, Any]:
    """Restricted-choice accuracy of ``model`` as it runs now (wrap in a baseline's ``apply``):
    ``{"accuracy", "n", "scores"}`` with :func:`~sadi_peft.harness.search.score_naive` scores, ``batch_size``
    (prompt, option) sequences per forward, sorted by length across the whole set.

    ``prefix_cached=True``: each prompt minus its last token runs once, under the model's intervention, and its KV
    cache serves every option of the item (:class:`~sadi_peft.harness.search.CachedBatch`; ``batch_size`` items of
    similar length per forward). Same scores up to float rounding (tested) for any intervention (attention is
    causal), several times faster when options are many and prompts long (TruthfulQA's six-shot primer).

    ``distributed=True``: every process of the ``torch.distributed`` group passes the same items, scores its shard,
    and gets the accuracy and scores of all items (:func:`sadi_peft.harness.distributed.evaluate_items_distributed`).
    """
    if prefix_cached:
        if distributed:
            raise ValueError("prefix_cached=True and distributed=True cannot be combined; pass one of them.")
        prepared = prepare_items(tokenizer, items, strip_prompt=strip_prompt)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scores = score_under(model, prepared, [nullcontext], pad_token_id=pad, cached=False, share_prefix=True,
                             batch_size=batch_size)[0]
        return {"accuracy": accuracy_of(scores, prepared), "n": len(prepared), "scores": scores}
    if distributed:
        from sadi_peft.harness.distributed import evaluate_items_distributed

        return evaluate_items_distributed(model, tokenizer, items, batch_size=batch_size, strip_prompt=strip_prompt)
    prepared = prepare_items(tokenizer, items, strip_prompt=strip_prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_naive(model, prepared, pad, batch_size=batch_size)
    return {"accuracy": accuracy_of(scores, prepared), "n": len(prepared), "scores": scores}


@dataclass
class Selection:
    """Outcome of a validation grid search: the chosen point, its accuracy, every point's result, and the baseline
    configured at the chosen point (``selection.baseline.apply(model)``)."""

    method: str
    split: str
    best: dict[str, Any]
    accuracy: float
    results: list[dict[str, Any]]
    baseline: Any

    def __repr__(self) -> str:
        return (
            f"Selection(method={self.method!r}, split={self.split!r}, best={self.best}, accuracy={self.accuracy:.4f}, "
            f"points={len(self.results)})"
        )


def _grid_points(grid: Iterable[Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    points = []
    for point in grid:
        if isinstance(point, Mapping):
            missing = [k for k in keys if k not in point]
            if missing:
                raise ValueError(f"grid point {dict(point)} lacks {missing}; expected the keys {list(keys)}.")
            points.append({k: point[k] for k in keys})
        elif isinstance(point, (tuple, list)) and len(point) == len(keys):
            points.append(dict(zip(keys, point)))
        else:
            raise ValueError(f"grid point {point!r}: expected a {len(keys)}-tuple {keys} or a dict with those keys.")
    if not points:
        raise ValueError("The grid is empty.")
    return points


def _select(
    method: str,
    split: str,
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Item],
    points: list[dict[str, Any]],
    contexts: Callable[[dict[str, Any]], list[Callable[[], Any]]],
    configured: Callable[[dict[str, Any]], Any],
    *,
    regime: str,
    cached: Optional[bool],
    batch_size: int,
    strip_prompt: bool,
    show_progress: bool,
    stack: bool = False,
) -> Selection:
    """Score every point; ``contexts(point)`` opens the configurations whose mean accuracy is the point's (several
    seeds of a random mask, else one). ``cached=None`` reuses the prompt prefix's KV cache whenever ``regime`` leaves
    the tokens before the last prompt token alone (``"last"``, ``"from_last"``)."""
    cacheable = regime in ("last", "from_last")
    if cached is None:
        cached = cacheable
    elif cached and not cacheable:
        raise ValueError(f"cached=True needs positions 'last' or 'from_last' (with {regime!r} the prompt prefix is "
                         "steered too, so its KV cache changes with every point); use cached=False or None.")
    prepared = prepare_items(tokenizer, items, strip_prompt=strip_prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_point = [contexts(point) for point in points]
    flat = [context for group in per_point for context in group]
    generation = isinstance(prepared[0], GenerationItem)
    if generation:  # exact match of greedy answers: "scores" are the per-item 0/1 outcomes
        answers = generate_under(model, tokenizer, prepared, flat, cached=cached, batch_size=batch_size,
                                 show_progress=show_progress, desc=f"{method} selection")
        flat_scores = [torch.tensor([float(exact_match(a, item.answers)) for a, item in zip(group, prepared)])
                       for group in answers]
    elif cached:
        flat_scores = score_under(model, prepared, flat, pad_token_id=pad, cached=True, batch_size=batch_size,
                                  show_progress=show_progress, desc=f"{method} selection")
    else:
        flat_scores = []
        for context in tqdm(flat, desc=f"{method} selection", disable=not show_progress):
            with context():
                flat_scores.append(_score(model, tokenizer, prepared, batch_size)[1])
    results, offset = [], 0
    for point, group in zip(points, per_point):
        group_scores = flat_scores[offset : offset + len(group)]
        offset += len(group)
        if generation:
            accuracy = sum(float(sc.sum()) / sc.numel() for sc in group_scores) / len(group_scores)
        else:
            accuracy = sum(accuracy_of(sc, prepared) for sc in group_scores) / len(group_scores)
        scores = torch.stack(group_scores) if stack else group_scores[0]
        results.append({**point, "accuracy": accuracy, "n": len(prepared), "scores": scores})
    best_index = max(range(len(results)), key=lambda i: (results[i]["accuracy"], -i))  # first maximum
    best = dict(points[best_index])
    return Selection(method, split, best, results[best_index]["accuracy"], results, configured(best))


def _score(model, tokenizer, prepared, batch_size) -> tuple[float, torch.Tensor]:
    result = evaluate_items(model, tokenizer, prepared, batch_size=batch_size)
    return result["accuracy"], result["scores"]


# ================================================================================================ no intervention
@dataclass(frozen=True)
class NoIntervention:
    """The plain model: SADI layers disabled (other adapters untouched). Nothing to fit, nothing to select."""

    def apply(self, model: nn.Module):
        return sadi_disabled(model)

    def select_on_validation(
        self,
        model: nn.Module,
        tokenizer: Any,
        items: Sequence[Item],
        grid: Optional[Iterable[Any]] = None,
        split: str = "validation",
        *,
        batch_size: int = 16,
        strip_prompt: bool = True,
        show_progress: bool = False,
    ) -> Selection:
        split = require_selection_split(split)
        if grid is not None and list(grid) not in ([], [()], [{}]):
            raise ValueError("NoIntervention has no hyperparameters; pass grid=None.")

        return _select("none", split, model, tokenizer, items, [{}], lambda point: [lambda: self.apply(model)],
                       lambda best: self, regime="all", cached=False, batch_size=batch_size,
                       strip_prompt=strip_prompt, show_progress=show_progress)


# ================================================================================================ random mask
def _draw_units(
    model: nn.Module, name: str, k: int, seed: int
) -> tuple[list[tuple[str, SADILayer]], list[torch.Tensor]]:
    layers = sadi_layers(model, name)
    if not layers:
        raise ValueError(f"SADI adapter {name!r} is not injected in this model (no SADI layer holds it).")
    total = sum(layer.num_units(name) for _, layer in layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ValueError(f"k={k!r} is invalid: expected an integer in [1, {total}] (units of this adapter).")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is invalid: expected an integer.")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[:k]
    flat = torch.zeros(total, dtype=torch.bool)
    flat[chosen] = True
    masks, offset = [], 0
    for _, layer in layers:
        n = layer.num_units(name)
        masks.append(flat[offset : offset + n].clone())
        offset += n
    return layers, masks


def random_mask(model: nn.Module, k: int, seed: int, adapter_name: Optional[str] = None) -> list[tuple[str, int]]:
    """Write a mask of ``k`` units drawn uniformly (``torch.randperm`` with ``seed``, over all units of all layers)
    into the SADI adapter; its stored scores are left untouched (:func:`sadi_peft.apply_top_k` brings the SADI mask
    back). ``config.top_k`` becomes ``k``; delta, variant and positions stay the adapter's. Returns the units as
    (module name, unit index) in model order. For a temporary mask use ``RandomMask(k, seed).apply(model)``."""
    name, config = resolve_adapter(model, adapter_name)
    layers, masks = _draw_units(model, name, k, seed)
    units = []
    for (layer_name, layer), mask in zip(layers, masks):
        layer.sadi_mask[name].copy_(mask.to(layer.sadi_mask[name].device))
        units.extend((layer_name, int(u)) for u in torch.nonzero(mask).squeeze(1).tolist())
    config.top_k = k
    return units


@dataclass(frozen=True)
class RandomMask:
    """Ablation "random top-K mask" (sadi-method.md Table 4): the SADI adapter's own variant, positions and gain, on
    ``k`` units drawn uniformly with ``seed``. ``delta=None`` keeps the adapter's delta."""

    k: int
    seed: int = 0
    delta: Optional[float] = None
    adapter_name: Optional[str] = None

    def units(self, model: nn.Module) -> list[tuple[str, int]]:
        """The units this mask selects on ``model`` (nothing is written)."""
        name, _ = resolve_adapter(model, self.adapter_name)
        layers, masks = _draw_units(model, name, self.k, self.seed)
        return [(ln, int(u)) for (ln, _), m in zip(layers, masks) for u in torch.nonzero(m).squeeze(1).tolist()]

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator["RandomMask"]:
        """Random mask (and ``delta``) in the adapter for the block; mask, delta and ``top_k`` restored after it."""
        name, config = resolve_adapter(model, self.adapter_name)
        layers = sadi_layers(model, name)
        saved_masks = [layer.sadi_mask[name].clone() for _, layer in layers]
        saved_delta = {id(layer): layer.sadi_delta[name] for _, layer in layers}
        saved_config = (config.top_k, config.delta)
        try:
            random_mask(model, self.k, self.seed, adapter_name=name)
            if self.delta is not None:
                sadi_peft.set_delta(model, self.delta, adapter_name=name)
            with empty_mask_expected(model, name):  # the ablation needs no calibration: nothing to warn about
                yield self
        finally:
            for (_, layer), mask in zip(layers, saved_masks):
                layer.sadi_mask[name].copy_(mask)
                layer.sadi_delta[name] = saved_delta[id(layer)]
            config.top_k, config.delta = saved_config

    def select_on_validation(
        self,
        model: nn.Module,
        tokenizer: Any,
        items: Sequence[Item],
        grid: Iterable[Any],
        split: str = "validation",
        *,
        seeds: Optional[Sequence[int]] = None,
        batch_size: int = 16,
        strip_prompt: bool = True,
        show_progress: bool = False,
        cached: Optional[bool] = None,
    ) -> Selection:
        """Grid of ``(k, delta)``; each point's accuracy is the mean over ``seeds`` (default: this mask's seed)."""
        split = require_selection_split(split)
        points = _grid_points(grid, ("k", "delta"))
        seeds = tuple(seeds) if seeds is not None else (self.seed,)

        def contexts(point):
            return [partial(dataclasses.replace(self, k=point["k"], delta=point["delta"], seed=seed).apply, model)
                    for seed in seeds]

        name, config = resolve_adapter(model, self.adapter_name)
        with empty_mask_expected(model, name):  # the prompt-prefix forwards run outside the masks' blocks
            return _select("random_mask", split, model, tokenizer, items, points, contexts,
                           lambda best: dataclasses.replace(self, k=best["k"], delta=best["delta"]),
                           regime=config.positions, cached=cached, batch_size=batch_size, strip_prompt=strip_prompt,
                           show_progress=show_progress, stack=True)


# ================================================================================================ fixed steering
def _top_k_masks(scores: dict[str, torch.Tensor], k: int, ranking: str) -> dict[str, torch.Tensor]:
    """The global top-K unit masks, cut exactly as :func:`sadi_peft.apply_top_k` cuts them (stable, signed/abs)."""
    names = list(scores)
    flat = torch.cat([scores[n].float() for n in names])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= flat.numel():
        raise ValueError(f"k={k!r} is invalid: expected an integer in [1, {flat.numel()}].")
    keys = flat.abs() if ranking == "absolute" else flat
    order = torch.sort(keys, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, offset = {}, 0
    for n in names:
        out[n] = chosen[offset : offset + scores[n].numel()].clone()
        offset += scores[n].numel()
    return out


@dataclass
class FixedSteering:
    """Ablation "fixed vector" (sadi-method.md Table 4): ``A' = A + delta * (D * M)`` at the SADI sites.

    ``directions[name]`` is D, the per-feature mean over pairs of (positive - negative) at the SADI site ``name``
    (for heads the full ``num_heads * head_dim`` vector; SADI's own head score is its mean over ``head_dim``);
    M is the global top-``top_k`` unit mask cut from the SADI adapter's scores (expanded to ``head_dim`` features
    for heads). ``positions`` defaults to the adapter's regime.
    """

    variant: str
    directions: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    unit_size: dict[str, int]
    sides: dict[str, str]
    ranking: str
    top_k: int
    delta: float
    positions: str
    num_pairs: int

    def masks(self, top_k: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Unit masks per site for ``top_k`` (default: this object's)."""
        return _top_k_masks(self.scores, self.top_k if top_k is None else top_k, self.ranking)

    def vectors(self) -> dict[str, torch.Tensor]:
        """``delta * D * M`` per site (features), the additions ``apply`` makes."""
        out = {}
        for name, mask in self.masks().items():
            features = mask.repeat_interleave(self.unit_size[name]).to(self.directions[name].dtype)
            out[name] = self.delta * self.directions[name] * features
        return out

    def apply(self, model: nn.Module, *, disable_sadi: bool = True):
        """Add ``delta * D * M`` at the SADI sites for the block (SADI's own gain off unless ``disable_sadi=False``)."""
        vectors = self.vectors()
        additions = [(name, self.sides[name], vec) for name, vec in vectors.items() if bool(vec.ne(0).any())]
        return _additions(model, additions, self.positions, disable_sadi)

    def select_on_validation(
        self,
        model: nn.Module,
        tokenizer: Any,
        items: Sequence[Item],
        grid: Iterable[Any],
        split: str = "validation",
        *,
        batch_size: int = 16,
        strip_prompt: bool = True,
        show_progress: bool = False,
        cached: Optional[bool] = None,
    ) -> Selection:
        """Grid of ``(k, delta)``."""
        split = require_selection_split(split)
        points = _grid_points(grid, ("k", "delta"))

        def configured(point):
            return dataclasses.replace(self, top_k=point["k"], delta=float(point["delta"]))

        return _select("fixed_steering", split, model, tokenizer, items, points,
                       lambda point: [partial(configured(point).apply, model)], configured, regime=self.positions,
                       cached=cached, batch_size=batch_size, strip_prompt=strip_prompt, show_progress=show_progress)


def fit_fixed_steering(
    model: nn.Module,
    tokenizer: Any,
    pairs: Iterable[Any],
    *,
    adapter_name: Optional[str] = None,
    top_k: Optional[int] = None,
    delta: Optional[float] = None,
    positions: Optional[str] = None,
    batch_size: int = 16,
    separator: str = " ",
    strip: bool = True,
    show_progress: bool = False,
) -> FixedSteering:
    """Record D, the per-feature mean difference at the sites of a **calibrated** SADI adapter.

    The sites are where the adapter acts: input of the attention output projection (head), input of the MLP down
    projection (neuron; note SADI *ranks* neurons on SiLU(gate) by default, but the addition happens where SADI
    scales, so D is taken there) or output of the down projection (hidden). ``top_k`` / ``delta`` / ``positions``
    default to the adapter's; the mask is re-cut from the adapter's stored scores for any K.
    """
    name, config = resolve_adapter(model, adapter_name)
    layers = sadi_layers(model, name)
    if not layers:
        raise ValueError(f"SADI adapter {name!r} is not injected in this model (no SADI layer holds it).")
    scores = {ln: layer.sadi_scores[name].detach().float().cpu().clone() for ln, layer in layers}
    if not any(bool(s.ne(0).any()) for s in scores.values()):
        raise ValueError(f"SADI adapter {name!r} has no scores yet; run sadi_peft.calibrate(model, ...) first.")
    side = "output" if config.variant == "hidden" else "input"
    sums, n = _record(model, tokenizer, pairs, [(ln, side) for ln, _ in layers], keep_each=False,
                      batch_size=batch_size, separator=separator, strip=strip, show_progress=show_progress)
    directions = {ln: (sums[ln] / n).float() for ln, _ in layers}
    unit_size = {ln: layer.sadi_unit_size[name] for ln, layer in layers}
    fitted = FixedSteering(
        variant=config.variant,
        directions=directions,
        scores=scores,
        unit_size=unit_size,
        sides={ln: side for ln, _ in layers},
        ranking=config.ranking,
        top_k=int(config.top_k if top_k is None else top_k),
        delta=float(config.delta if delta is None else delta),
        positions=_check_regime(config.positions if positions is None else positions),
        num_pairs=n,
    )
    fitted.masks()  # validates top_k
    return fitted


# ================================================================================================ CAA
@dataclass
class CAA:
    """Contrastive Activation Addition (Rimsky et al. 2024): ``h_l <- h_l + alpha * v_l`` on the output of decoder
    layer ``layer`` (the residual stream), ``v_l`` the raw mean over pairs of (positive - negative) decoder-layer
    outputs at the answer token. ``vectors`` is [num_layers, hidden] (rows of layers not recorded are 0)."""

    vectors: torch.Tensor
    layer: int
    alpha: float = 1.0
    positions: str = "all"
    num_pairs: int = 0
    recorded_layers: tuple[int, ...] = ()

    def vector(self, layer: Optional[int] = None) -> torch.Tensor:
        return self.vectors[self.layer if layer is None else layer]

    def apply(self, model: nn.Module, *, disable_sadi: bool = True):
        """Add ``alpha * v_layer`` to decoder layer ``layer``'s output for the block."""
        sites = _llama_sites(model)
        if not 0 <= self.layer < len(sites.layers):
            raise ValueError(f"layer={self.layer} is out of range for a model with {len(sites.layers)} layers.")
        if self.recorded_layers and self.layer not in self.recorded_layers:
            raise ValueError(
                f"layer={self.layer} was not recorded by fit_caa (recorded: {list(self.recorded_layers)})."
            )
        return _additions(model, [(sites.layers[self.layer], "output", self.alpha * self.vector())],
                          self.positions, disable_sadi)

    def select_on_validation(
        self,
        model: nn.Module,
        tokenizer: Any,
        items: Sequence[Item],
        grid: Optional[Iterable[Any]] = None,
        split: str = "validation",
        *,
        batch_size: int = 16,
        strip_prompt: bool = True,
        show_progress: bool = False,
        cached: Optional[bool] = None,
    ) -> Selection:
        """Grid of ``(layer, alpha)``; default every recorded layer x alpha in {-2, -1, 1, 2, 4, 8}."""
        split = require_selection_split(split)
        if grid is None:
            layers = self.recorded_layers or tuple(range(self.vectors.shape[0]))
            grid = [(layer, alpha) for layer in layers for alpha in CAA_ALPHAS]
        points = _grid_points(grid, ("layer", "alpha"))

        def configured(point):
            return dataclasses.replace(self, layer=int(point["layer"]), alpha=float(point["alpha"]))

        return _select("caa", split, model, tokenizer, items, points,
                       lambda point: [partial(configured(point).apply, model)], configured, regime=self.positions,
                       cached=cached, batch_size=batch_size, strip_prompt=strip_prompt, show_progress=show_progress)


def fit_caa(
    model: nn.Module,
    tokenizer: Any,
    pairs: Iterable[Any],
    *,
    layers: Optional[Sequence[int]] = None,
    layer: Optional[int] = None,
    alpha: float = 1.0,
    positions: str = "all",
    batch_size: int = 16,
    separator: str = " ",
    strip: bool = True,
    show_progress: bool = False,
) -> CAA:
    """Mean difference of decoder-layer outputs at the answer token, for ``layers`` (default all).

    ``layer`` (default the middle recorded layer) and ``alpha`` are the starting point; choose them with
    :meth:`CAA.select_on_validation`.
    """
    sites = _llama_sites(model)
    num_layers = len(sites.layers)
    chosen = tuple(range(num_layers)) if layers is None else tuple(int(i) for i in layers)
    if not chosen or any(not 0 <= i < num_layers for i in chosen):
        raise ValueError(f"layers={layers!r} is invalid for a model with {num_layers} decoder layers.")
    sums, n = _record(model, tokenizer, pairs, [(sites.layers[i], "output") for i in chosen], keep_each=False,
                      batch_size=batch_size, separator=separator, strip=strip, show_progress=show_progress)
    width = sums[sites.layers[chosen[0]]].numel()
    vectors = torch.zeros(num_layers, width, dtype=torch.float32)
    for i in chosen:
        vectors[i] = (sums[sites.layers[i]] / n).float()
    if layer is None:
        layer = chosen[len(chosen) // 2]
    return CAA(vectors, int(layer), float(alpha), _check_regime(positions), n, chosen)


# ================================================================================================ ITI
def fit_logistic_probes(
    x: torch.Tensor, y: torch.Tensor, *, C: float = 1.0, max_iter: int = 50, tol: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regressions, one per probe, fitted by damped Newton steps (float64, deterministic).

    ``x``: [P, n, d] features (standardise them first), ``y``: [n] or [P, n] labels in {0, 1}. Minimises, per probe,
    ``sum_i logloss_i + ||w||^2 / (2 C)`` (the bias unpenalised), sklearn's ``LogisticRegression(C=C)`` objective.
    Returns ``(weights [P, d], bias [P])``.
    """
    x = x.to(torch.float64)
    P, n, d = x.shape
    y = y.to(torch.float64).expand(P, n) if y.dim() == 1 else y.to(torch.float64)
    xb = torch.cat([x, torch.ones(P, n, 1, dtype=torch.float64)], dim=-1)
    reg = torch.full((d + 1,), 1.0 / C, dtype=torch.float64)
    reg[-1] = 0.0
    ridge = torch.diag(reg + 1e-10)
    w = torch.zeros(P, d + 1, dtype=torch.float64)

    def objective(w: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("pnd,pd->pn", xb, w)
        return (torch.nn.functional.softplus(z) - y * z).sum(-1) + 0.5 * (reg * w * w).sum(-1)

    current = objective(w)
    for _ in range(max_iter):
        z = torch.einsum("pnd,pd->pn", xb, w)
        p = torch.sigmoid(z)
        grad = torch.einsum("pnd,pn->pd", xb, p - y) + reg * w
        if float(grad.abs().max()) < tol:
            break
        hess = (xb * (p * (1 - p)).unsqueeze(-1)).transpose(1, 2) @ xb + ridge
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        t = torch.ones(P, dtype=torch.float64)
        candidate = w - step
        value = objective(candidate)
        for _ in range(30):  # per-probe step halving until the objective does not increase
            worse = value > current
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
            candidate = w - t.unsqueeze(-1) * step
            value = objective(candidate)
        keep = value <= current
        w = torch.where(keep.unsqueeze(-1), candidate, w)
        current = torch.where(keep, value, current)
    return w[:, :d], w[:, d]


def probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    C: float = 1.0,
    max_iter: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one probe per leading index on standardised ``train_x`` [P, n, d] and return its held-out accuracy and
    mean log-loss on ``test_x`` [P, m, d] (both [P]); labels 1 = positive, predicted when the logit is > 0."""
    train_x, test_x = train_x.to(torch.float64), test_x.to(torch.float64)
    mean = train_x.mean(dim=1, keepdim=True)
    std = train_x.std(dim=1, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    w, b = fit_logistic_probes((train_x - mean) / std, train_y, C=C, max_iter=max_iter)
    z = torch.einsum("pnd,pd->pn", (test_x - mean) / std, w) + b.unsqueeze(-1)
    ty = test_y.to(torch.float64).expand_as(z) if test_y.dim() == 1 else test_y.to(torch.float64)
    accuracy = ((z > 0).to(torch.float64) == ty).to(torch.float64).mean(-1)
    loss = (torch.nn.functional.softplus(z) - ty * z).mean(-1)
    return accuracy, loss


@dataclass
class ITI:
    """Inference-Time Intervention (Li et al. 2023): per head a logistic probe on the head's output at the answer
    token (``probe_accuracy`` [L, H], on held-out pairs); the ``k`` heads with the best probes (``ranking``, best
    first; ties: lower held-out log-loss, then earlier layer and head) are shifted by ``alpha * stds[l, h] *
    directions[l, h]`` (unit mass-mean direction, std of all activations projected on it) at the input of
    ``self_attn.o_proj``."""

    probe_accuracy: torch.Tensor
    probe_loss: torch.Tensor
    directions: torch.Tensor
    stds: torch.Tensor
    ranking: list[tuple[int, int]]
    k: int = 48
    alpha: float = 15.0
    positions: str = "all"
    num_pairs: int = 0
    num_heldout: int = 0

    def heads(self, k: Optional[int] = None) -> list[tuple[int, int]]:
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.ranking):
            raise ValueError(f"k={k!r} is invalid: expected an integer in [1, {len(self.ranking)}] (heads).")
        return self.ranking[:k]

    def vectors(self) -> dict[int, torch.Tensor]:
        """Per layer, the [num_heads * head_dim] addition to the o_proj input."""
        num_layers, num_heads, head_dim = self.directions.shape
        out: dict[int, torch.Tensor] = {}
        for layer, head in self.heads():
            vec = out.setdefault(layer, torch.zeros(num_heads * head_dim, dtype=torch.float32))
            shift = self.alpha * self.stds[layer, head] * self.directions[layer, head]
            vec[head * head_dim : (head + 1) * head_dim] += shift
        return out

    def apply(self, model: nn.Module, *, disable_sadi: bool = True):
        """Shift the top-``k`` heads for the block."""
        sites = _llama_sites(model)
        if (len(sites.heads), sites.num_heads, sites.head_dim) != tuple(self.directions.shape):
            raise ValueError(
                f"This ITI fit has {tuple(self.directions.shape)} (layers, heads, head_dim); the model has "
                f"{(len(sites.heads), sites.num_heads, sites.head_dim)}."
            )
        additions = [(sites.heads[layer], "input", vec) for layer, vec in sorted(self.vectors().items())]
        return _additions(model, additions, self.positions, disable_sadi)

    def select_on_validation(
        self,
        model: nn.Module,
        tokenizer: Any,
        items: Sequence[Item],
        grid: Optional[Iterable[Any]] = None,
        split: str = "validation",
        *,
        batch_size: int = 16,
        strip_prompt: bool = True,
        show_progress: bool = False,
        cached: Optional[bool] = None,
    ) -> Selection:
        """Grid of ``(k, alpha)``; default K in {1, 2, 4, ..., 64} (up to the number of heads) x alpha in
        {1, 5, 10, 15, 20}."""
        split = require_selection_split(split)
        if grid is None:
            ks = [k for k in ITI_KS if k <= len(self.ranking)] or [len(self.ranking)]
            grid = [(k, alpha) for k in ks for alpha in ITI_ALPHAS]
        points = _grid_points(grid, ("k", "alpha"))

        def configured(point):
            return dataclasses.replace(self, k=int(point["k"]), alpha=float(point["alpha"]))

        return _select("iti", split, model, tokenizer, items, points,
                       lambda point: [partial(configured(point).apply, model)], configured, regime=self.positions,
                       cached=cached, batch_size=batch_size, strip_prompt=strip_prompt, show_progress=show_progress)


def fit_iti(
    model: nn.Module,
    tokenizer: Any,
    pairs: Iterable[Any],
    *,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    C: float = 1.0,
    k: int = 48,
    alpha: float = 15.0,
    positions: str = "all",
    batch_size: int = 16,
    separator: str = " ",
    strip: bool = True,
    show_progress: bool = False,
) -> ITI:
    """Record every head's output at the answer token for both answers of every pair, fit one probe per head on the
    training pairs, score it on the held-out pairs (``heldout_fraction`` of the pairs, at least one, drawn with
    ``seed``; a pair's two texts stay on the same side), rank heads by held-out accuracy, and compute each head's
    mass-mean direction (mean positive - mean negative over all pairs, normalised) and the std of the activations
    (positive and negative, all pairs) projected on it. ``k`` is clipped to the number of heads.

    Memory: every head output of both texts of every pair is kept in float32 until the probes are fitted
    (2 x pairs x layers x hidden values: about 2 GB for 2000 pairs on a 7B Llama). Probes are L2 logistic
    regressions (sklearn's ``C``) on standardised features, fitted in torch by :func:`fit_logistic_probes`."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction!r} must be in (0, 1).")
    sites = _llama_sites(model)
    recorded, n = _record(model, tokenizer, pairs, [(name, "input") for name in sites.heads], keep_each=True,
                          batch_size=batch_size, separator=separator, strip=strip, show_progress=show_progress)
    if n < 2:
        raise ValueError("ITI needs at least 2 pairs (probes are scored on held-out pairs).")
    n_held = min(n - 1, max(1, int(round(n * heldout_fraction))))
    order = torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(seed))
    held, train = order[:n_held], order[n_held:]
    L, H, d = len(sites.heads), sites.num_heads, sites.head_dim
    accuracy = torch.zeros(L, H, dtype=torch.float64)
    loss = torch.zeros(L, H, dtype=torch.float64)
    directions = torch.zeros(L, H, d, dtype=torch.float32)
    stds = torch.zeros(L, H, dtype=torch.float32)
    for layer, name in enumerate(sites.heads):
        pos, neg = recorded[name]  # [n, H*d] each
        pos = pos.reshape(n, H, d).transpose(0, 1).to(torch.float64)  # [H, n, d]
        neg = neg.reshape(n, H, d).transpose(0, 1).to(torch.float64)

        def side(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.cat([pos[:, idx], neg[:, idx]], dim=1)
            y = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).to(torch.float64)
            return x, y

        train_x, train_y = side(train)
        test_x, test_y = side(held)
        accuracy[layer], loss[layer] = probe_accuracy(train_x, train_y, test_x, test_y, C=C)
        diff = pos.mean(1) - neg.mean(1)  # [H, d]
        norm = diff.norm(dim=-1, keepdim=True)
        unit = torch.where(norm > 0, diff / norm.clamp_min(1e-30), torch.zeros_like(diff))
        projections = torch.einsum("hnd,hd->hn", torch.cat([pos, neg], dim=1), unit)
        directions[layer] = unit.float()
        stds[layer] = projections.std(dim=1, unbiased=False).float()
    ranking = sorted(
        ((layer, head) for layer in range(L) for head in range(H)),
        key=lambda lh: (-float(accuracy[lh]), float(loss[lh]), lh),
    )
    return ITI(accuracy.float(), loss.float(), directions, stds, ranking, min(int(k), L * H), float(alpha),
               _check_regime(positions), n, n_held)
