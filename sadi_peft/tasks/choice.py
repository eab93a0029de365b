"""Restricted-choice scoring: compare the next-token log-probabilities of a few answer words after a prompt.

This is the evaluation used for classification-style tasks (SST-2 ``Positive``/``Negative``, COPA ``A``/``B``,
BoolQ ``Yes``/``No``, ...): the prediction is the choice whose **first token** is most likely right after the
prompt. Works with any causal LM that returns ``.logits``, including a PEFT ``PeftModel`` (steered or with
``disable_adapter()``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["choice_accuracy", "choice_logprobs", "first_token_ids"]

logger = logging.getLogger(__name__)


def first_token_ids(tokenizer: Any, words: Sequence[str], *, prefix: str = " ") -> list[int]:
    """Return the id of the first token of ``prefix + word`` for each word (no special tokens).

    The default ``prefix=" "`` matches prompts that end right before the answer (``...Answer:`` + `` Positive``).

    Raises:
        ValueError: a word encodes to no token, or two words share their first token (then they cannot be told
            apart by one next-token distribution).
    """
    ids: list[int] = []
    for word in words:
        encoded = tokenizer.encode(prefix + word, add_special_tokens=False)
        if not encoded:
            raise ValueError(f"The answer word {prefix + word!r} encodes to no token; use a non-empty answer word.")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        tokens = [tokenizer.convert_ids_to_tokens(i) for i in ids]
        raise ValueError(
            f"The answer words {list(words)!r} share first tokens {tokens!r} with this tokenizer, so restricted-choice "
            "scoring cannot separate them; choose answer words whose first tokens differ."
        )
    return ids


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def choice_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "scoring",
) -> torch.Tensor:
    """Next-token log-probabilities of each choice's first token after each prompt.

    Prompts are tokenized in batches with **left** padding (the tokenizer's ``padding_side`` is restored
    afterwards), the model is called as ``model(input_ids=..., attention_mask=...)`` under ``torch.no_grad()``,
    and the log-softmax over the full vocabulary is read at the last position. Prompts are processed in order of
    length to reduce padding; the result is in the original order.

    Args:
        model: A causal LM returning ``.logits`` (transformers model or ``PeftModel``).
        tokenizer: Its tokenizer; must have a pad token.
        prompts: Prompt strings (answers are appended after one space, so prompts should not end with a space).
        choices: Answer words, e.g. ``("Negative", "Positive")``; see :func:`first_token_ids`.
        batch_size: Prompts per forward pass.
        progress: Show a tqdm progress bar.
        desc: Progress-bar label.

    Returns:
        A float32 CPU tensor of shape ``[len(prompts), len(choices)]``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if len(choices) < 2:
        raise ValueError(f"Restricted-choice scoring needs at least two choices, got {list(choices)!r}.")
    if getattr(tokenizer, "pad_token", None) is None:
        raise ValueError(
            "The tokenizer has no pad token, which batched scoring needs. Set tokenizer.pad_token = "
            "tokenizer.eos_token (sadi_peft.zoo.load_model_and_tokenizer does this)."
        )
    choice_ids = torch.tensor(first_token_ids(tokenizer, choices))
    n = len(prompts)
    result = torch.empty(n, len(choices), dtype=torch.float32)
    if n == 0:
        return result
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    device = _model_device(model)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
                idx = order[start : start + batch_size]
                batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
                out = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
                last = out.logits[:, -1, :].float()
                logprobs = torch.log_softmax(last, dim=-1)[:, choice_ids.to(last.device)]
                result[torch.tensor(idx)] = logprobs.cpu()
    finally:
        tokenizer.padding_side = old_side
    return result


def choice_accuracy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "accuracy",
) -> float:
    """Fraction of prompts whose highest-scoring choice (see :func:`choice_logprobs`) is ``choices[label]``.

    Raises:
        ValueError: ``prompts`` and ``labels`` differ in length, there are no prompts, or a label is not an index
            into ``choices``.
    """
    if len(prompts) != len(labels):
        raise ValueError(f"Got {len(prompts)} prompts but {len(labels)} labels; pass one label per prompt.")
    if len(prompts) == 0:
        raise ValueError("Accuracy of zero examples is undefined; pass at least one prompt.")
    bad = [lab for lab in labels if not (isinstance(lab, int) and 0 <= lab < len(choices))]
    if bad:
        raise ValueError(
            f"Labels must be indices into choices {list(choices)!r} (0..{len(choices) - 1}); got e.g. {bad[0]!r}."
        )
    scores = choice_logprobs(model, tokenizer, prompts, choices, batch_size=batch_size, progress=progress, desc=desc)
    predictions = scores.argmax(dim=-1)
    correct = (predictions == torch.tensor(list(labels))).sum().item()
    return float(correct) / len(prompts)
