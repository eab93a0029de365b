"""Restricted-choice evaluation spread over the processes of a ``torch.distributed`` group.

Every process passes the **same, full** list of items; process ``r`` of ``W`` scores the items ``r, r + W, r + 2W,
...`` (strided shards, so length-sorted data spreads evenly; uneven shards are fine), and the per-process correct
counts and item counts are all-reduced, so every process returns the accuracy of one process over all items. The
score rows are all-gathered back into the original item order when ``gather_scores`` (default).

Before anything is mixed the processes compare what they were given: the number of items, a digest of the tokenized
items (prompts, options, labels) and a fingerprint of the model (class, parameter count, and every SADI layer's
adapters, masks, deltas and on/off state). Processes that differ are refused with a ``ValueError`` naming them. A
process whose scoring fails tells the others, which raise a ``RuntimeError`` naming it instead of waiting; a process
that dies is noticed by gloo at once (closed connection), a silent one after the process group's ``timeout``.

Scores may differ from a single process's in the last float bits (other items share a padded batch), far below
anything that changes an argmax in practice; the accuracy is computed from the same argmaxes the scores give.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sadi_peft.calibration import agree_across_processes, input_device, run_collective
from sadi_peft.harness.search import ChoiceItem, score_naive
from sadi_peft.layer import SADILayer
from sadi_peft.model import transformer_model

logger = logging.getLogger(__name__)

__all__ = ["evaluate_items_distributed", "model_fingerprint", "items_digest"]


def items_digest(items: Sequence[ChoiceItem]) -> str:
    """SHA-256 of the tokenized items (prompt ids, option ids, label), in order."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr((item.prompt_ids, item.option_ids, item.label)).encode())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What two processes must share to score alike: model class, model type, parameter count and a digest of every
    SADI layer's adapters (mask, delta, active adapters, disabled flag). Weights are not hashed."""
    inner = transformer_model(model)
    config = getattr(inner, "config", None)
    digest = hashlib.sha256()
    layers = 0
    for name, module in inner.named_modules():
        if not isinstance(module, SADILayer):
            continue
        layers += 1
        digest.update(repr((name, sorted(module.active_adapters), bool(module.disable_adapters))).encode())
        for adapter in sorted(module.sadi_mask):
            mask = module.sadi_mask[adapter].detach().to("cpu", torch.uint8).contiguous()
            digest.update(repr((adapter, float(module.sadi_delta.get(adapter, 0.0)))).encode())
            digest.update(mask.numpy().tobytes())
    return {
        "class": type(inner).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in inner.parameters()),
        "sadi_layers": layers,
        "sadi_state": digest.hexdigest(),
    }


def evaluate_items_distributed(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[Any],
    *,
    batch_size: int = 16,
    strip_prompt: bool = True,
    gather_scores: bool = True,
) -> dict[str, Any]:
    """:func:`~sadi_peft.harness.baselines.evaluate_items` over every process of the default process group.

    Args:
        model: the model as it runs now (the same on every process; wrap in a baseline's ``apply`` on each).
        tokenizer: its tokenizer.
        items: the full item list, the same on every process (ChoiceItems, task Examples or
            ``(prompt, choices, label)`` triples); each process scores its strided shard.
        batch_size: (prompt, option) sequences per forward.
        strip_prompt: as in ``evaluate_items``.
        gather_scores: all-gather the score rows into the original order (``scores``); ``False`` exchanges only
            the counts (``scores`` is then this process's shard, ``shard`` its item indices).

    Returns:
        ``{"accuracy", "n", "correct", "scores", "world_size", "shard"}`` — the same accuracy and ``n`` on every
        process, equal to a single process scoring all items.
    """
    import torch.distributed as dist

    from sadi_peft.harness.baselines import prepare_items

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "evaluate_items_distributed needs an initialised torch.distributed process group (torchrun / accelerate "
            "launch, then torch.distributed.init_process_group(...)); for one process use evaluate_items."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1.")
    group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    what = "Distributed evaluation"
    try:  # local preparation; every process then learns whether the others succeeded and agree
        prepared = prepare_items(tokenizer, items, strip_prompt=strip_prompt)
        setup: Any = {"n": len(prepared), "items": items_digest(prepared), "model": model_fingerprint(model)}
        local_error = None
    except (ValueError, TypeError) as error:
        prepared, setup, local_error = [], None, error
    agree_across_processes(group, setup, local_error, what=what)

    n = len(prepared)
    width = max(len(item.option_ids) for item in prepared)
    shard = list(range(rank, n, world))
    local = torch.full((len(shard), width), float("-inf"))
    failed = False
    try:
        if shard:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            scored = score_naive(model, [prepared[i] for i in shard], pad, batch_size=batch_size)
            local[:, : scored.shape[1]] = scored
    except Exception as error:  # the others must hear of it rather than wait for our counts
        logger.error("%s: process %d failed while scoring its shard: %s", what, rank, error)
        failed, local_error = True, error

    labels = torch.tensor([prepared[i].label for i in shard], dtype=torch.long)
    correct = int((local.argmax(-1) == labels).sum()) if shard and not failed else 0
    device = input_device(model) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    flags = torch.zeros(world, dtype=torch.float64)
    flags[rank] = float(failed)
    counts = torch.cat([torch.tensor([float(correct), float(len(shard))], dtype=torch.float64), flags]).to(device)
    run_collective(lambda: dist.all_reduce(counts, group=group), what)
    counts = counts.cpu()
    if local_error is not None:
        raise local_error
    failed_ranks = [r for r in range(world) if counts[2 + r] > 0]
    if failed_ranks:
        raise RuntimeError(f"{what} failed on process(es) {failed_ranks} (see their error); no accuracy was computed.")
    total_correct, total_n = int(round(float(counts[0]))), int(round(float(counts[1])))
    if total_n != n:  # cannot happen when the shards partition the items; guards a change of the sharding rule
        raise RuntimeError(f"{what}: the shards cover {total_n} items, expected {n}.")

    scores = local
    if gather_scores:
        rows = math.ceil(n / world)
        padded = torch.full((rows, width), float("-inf"))
        padded[: len(shard)] = local
        padded = padded.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        run_collective(lambda: dist.all_gather(parts, padded, group=group), what)
        scores = torch.full((n, width), float("-inf"))
        for r, part in enumerate(parts):
            indices = torch.arange(r, n, world)
            scores[indices] = part[: len(indices)].cpu()
    logger.info("%s: %d/%d correct over %d processes (%d items here)", what, total_correct, total_n, world, len(shard))
    # float32, as accuracy_of computes it on one process (a float32 mean of 0/1 hits), so the two agree bit for bit
    accuracy = float(torch.tensor(float(total_correct), dtype=torch.float32) / total_n)
    return {
        "accuracy": accuracy,
        "n": total_n,
        "correct": total_correct,
        "scores": scores,
        "world_size": world,
        "shard": shard,
    }
