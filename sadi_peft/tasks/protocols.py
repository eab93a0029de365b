"""Evaluation protocols and the :func:`evaluate` entry point.

Three protocols (sadi-method.md section 6), selected by name:

``"choice"`` -- restricted-choice log-likelihood (the robust metric)
    Each option is scored by the log-probability of its **whole token sequence** after ``prompt + " "``; with
    ``length_normalize=True`` (default) the sum is divided by the option's number of tokens. The prediction is the
    best option (first one on ties). When every option of an example is a single token, one forward pass reads all
    options from the next-token distribution at the prompt end (exactly the same numbers, fewer passes).
    TruthfulQA MC2 (``metric="mc2"``) reports the normalised probability mass ``sum_true p_i / sum_all p_i`` with
    ``p_i = exp(score_i)``; pass ``length_normalize=False`` for the standard MC2 on total log-probabilities.

``"argmax"`` -- the authors' teacher-forced exact match (weixuan-wang123/SADI ``trace.py``, ``evalone``)
    One pass on ``prompt + " " + gold answer``; at every answer position take the argmax over the **full
    vocabulary**, decode those tokens, remove punctuation and surrounding space, lower-case, compare with the gold
    string treated the same way. Any other token is wrong, which is why this protocol collapses to 0 at large gains.
    Comparable with the paper's numbers, not with ``"choice"``.

``"generate"`` -- greedy generation + exact match (TriviaQA)
    ``max_new_tokens`` greedy tokens after the prompt, cut at the first newline, SQuAD-normalised (lower case, no
    punctuation, no articles ``a/an/the``, single spaces) and compared with every normalised alias (``answers``, or
    the gold choice when a task has none).

Sequences. The prompt is ``prompt.strip()`` (``strip_prompt=True``, default: the same text ``sadi_peft.calibrate``
reads, so the scored sequence is token for token the calibration text) or the raw template. Prompt and answer are
tokenized separately (prompt with the tokenizer's special tokens, ``" " + answer`` without) and concatenated, so the
prompt/answer boundary is exact.

Batching. Rows are sorted by length and **left-padded** with explicit ``position_ids`` (cumulative sum of the
attention mask), so every real token keeps the position it has unpadded; only ``logits_to_keep`` trailing positions
are projected to the vocabulary. Batch size does not change the results beyond float noise (tested to 1e-4).

Steering. Prompt and answer run in **one** sequence. For a SADI adapter with ``positions="last"`` the steered token
must be the last *prompt* token, not the last token of the row, so the prompt end of every row is pinned with
:func:`sadi_peft.prompt_boundary` and the forward goes to the transformers model underneath a ``PeftModel`` (whose own
``forward`` would re-pin the end of the whole row). This matches prefill-then-decode with a KV cache, where only the
prompt's last token is steered (tested). ``model`` may be a transformers model (with or without a SADI adapter from
``load_adapter``) or a ``PeftModel``; for the unsteered baseline wrap the call in ``with model.disable_adapter():``.
Generation uses ``model.generate``, which pins the prompt end itself for a ``PeftModel``.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from sadi_peft import SADILayer, prompt_boundary

from .base import Example, Task, get_task

__all__ = [
    "PROTOCOLS",
    "AnswerScore",
    "evaluate",
    "generate_answers",
    "normalize_answer",
    "normalize_argmax",
    "score_answers",
]

#: Protocol names accepted by :func:`evaluate`.
PROTOCOLS = ("choice", "argmax", "generate")

_PUNCT = set(string.punctuation)


def normalize_argmax(text: str) -> str:
    """Argmax-protocol normalisation: drop punctuation, lower-case, collapse whitespace."""
    return " ".join("".join(ch for ch in text if ch not in _PUNCT).lower().split())


def normalize_answer(text: str) -> str:
    """SQuAD / TriviaQA normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------- helpers
def _runner(model: Any) -> Any:
    """The transformers model to call: the one inside a ``PeftModel``, else the model itself."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _has_sadi(model: Any) -> bool:
    return any(isinstance(m, SADILayer) for m in model.modules())


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError(
            "The tokenizer has no pad token, which batched evaluation needs. Set tokenizer.pad_token = "
            "tokenizer.eos_token (sadi_peft.zoo.load_model_and_tokenizer does this)."
        )
    return int(pad)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return batch_size


def _prompt_text(prompt: str, strip_prompt: bool) -> str:
    return prompt.strip() if strip_prompt else prompt


def _encode_prompt(tokenizer: Any, prompt: str, strip_prompt: bool) -> list[int]:
    ids = list(tokenizer(_prompt_text(prompt, strip_prompt))["input_ids"])
    if not ids:
        raise ValueError(f"The prompt {prompt[:60]!r} tokenizes to no token.")
    return ids


def _encode_answer(tokenizer: Any, answer: str) -> list[int]:
    if not answer.strip():
        raise ValueError("An answer/option is empty; scoring needs at least one answer token.")
    return list(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class AnswerScore:
    """Per (prompt, answer) row: log-probabilities of the answer tokens, full-vocabulary argmax at those positions,
    and log-probabilities of ``extra_ids`` at the first answer position (next-token distribution after the prompt)."""

    token_logprobs: torch.Tensor
    argmax_ids: torch.Tensor
    extra_logprobs: torch.Tensor

    @property
    def total(self) -> float:
        return float(self.token_logprobs.sum())

    @property
    def mean(self) -> float:
        return float(self.token_logprobs.mean())


class _Forward:
    """Batched teacher-forced passes on prompt + answer rows (left padding, explicit positions, pinned prompt end)."""

    def __init__(self, model: Any, pad_token_id: int, pin: Optional[bool] = None) -> None:
        self.model = model
        self.runner = _runner(model)
        # pin the prompt end for SADI adapters (and, with pin=True, for hook-based baselines that read the pin)
        self.steer = _has_sadi(self.runner) if pin is None else pin
        params = inspect.signature(self.runner.forward).parameters
        self.takes_positions = "position_ids" in params
        self.takes_keep = "logits_to_keep" in params
        self.takes_cache = "use_cache" in params
        self.pad = pad_token_id
        self.device = _device(self.runner)

    def run(
        self,
        rows: Sequence[tuple[list[int], list[int], list[int]]],
        batch_size: int,
        progress: bool = False,
        desc: str = "scoring",
    ) -> list[AnswerScore]:
        n = len(rows)
        results: list[Optional[AnswerScore]] = [None] * n
        order = sorted(range(n), key=lambda i: len(rows[i][0]) + len(rows[i][1]), reverse=True)
        for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in idx)
            keep = max(len(rows[i][1]) for i in idx)  # answer tokens are the last ones of every row
            input_ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            prompt_mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p_ids, a_ids, _ = rows[i]
                begin = width - len(p_ids) - len(a_ids)
                input_ids[r, begin:] = torch.tensor(p_ids + a_ids, dtype=torch.long)
                mask[r, begin:] = 1
                prompt_mask[r, begin : width - len(a_ids)] = 1
            kwargs: dict[str, Any] = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
            if self.takes_positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
            if self.takes_keep:
                kwargs["logits_to_keep"] = keep + 1
            if self.takes_cache:
                kwargs["use_cache"] = False
            pin = prompt_boundary(self.runner, prompt_mask.to(self.device)) if self.steer else nullcontext()
            with pin:
                logits = self.runner(**kwargs).logits
            # positions width-keep-1 .. width-2 predict the last `keep` tokens
            logprobs = torch.log_softmax(logits[:, -(keep + 1) : -1, :].float(), dim=-1)
            for r, i in enumerate(idx):
                _, a_ids, extra = rows[i]
                lp = logprobs[r, keep - len(a_ids) :]
                target = torch.tensor(a_ids, dtype=torch.long, device=lp.device)
                results[i] = AnswerScore(
                    token_logprobs=lp.gather(1, target[:, None]).squeeze(1).cpu(),
                    argmax_ids=lp.argmax(dim=-1).cpu(),
                    extra_logprobs=lp[0, torch.tensor(extra, dtype=torch.long, device=lp.device)].cpu()
                    if extra
                    else torch.empty(0),
                )
        return results  # type: ignore[return-value]


class _EvalMode:
    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = bool(getattr(self.model, "training", False))
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        if self.was_training:
            self.model.train()


def score_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    strip_prompt: bool = True,
    progress: bool = False,
) -> list[AnswerScore]:
    """Teacher-forced scores of ``answers[i]`` after ``prompts[i]`` (see the module docstring for batching/steering)."""
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers.")
    forward = _Forward(model, _pad_id(tokenizer))
    rows = [
        (_encode_prompt(tokenizer, p, strip_prompt), _encode_answer(tokenizer, a), []) for p, a in zip(prompts, answers)
    ]
    with _EvalMode(model):
        return forward.run(rows, _check_batch_size(batch_size), progress)


def score_token_rows(
    model: Any,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Log-probabilities of each row's answer ids after its prompt ids (already tokenized), batched like
    :func:`score_answers`; the prompt end is always pinned, so hook-based baselines steer the prompt's last token too."""
    rows = [(list(p), list(a), []) for p, a in rows]
    _check_rows(rows)
    forward = _Forward(model, int(pad_token_id), pin=True)
    with _EvalMode(model):
        return [score.token_logprobs for score in forward.run(rows, _check_batch_size(batch_size))]


def score_option_ids(
    model: Any,
    items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> list[list[float]]:
    """Mean log-probability of every option after its prompt, per ``(prompt_ids, [option_ids, ...])`` item.

    An item whose options are all one token long is scored from a single row (the next-token distribution after the
    prompt, read at every option's id: the same numbers, since a causal model's logits at the last prompt token do
    not depend on what follows); other items get one row per option. Prompt end pinned as in
    :func:`score_token_rows`."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    plan: list[tuple[bool, int, int]] = []  # (single-token options, first row, number of options) per item
    for prompt, options in items:
        options = [list(o) for o in options]
        single = all(len(o) == 1 for o in options)
        plan.append((single, len(rows), len(options)))
        if single:
            rows.append((list(prompt), options[0], [o[0] for o in options]))
        else:
            rows.extend((list(prompt), o, []) for o in options)
    _check_rows(rows)
    forward = _Forward(model, int(pad_token_id), pin=True)
    with _EvalMode(model):
        scored = forward.run(rows, _check_batch_size(batch_size))
    out = []
    for single, first, count in plan:
        if single:
            out.append([float(x) for x in scored[first].extra_logprobs])
        else:
            out.append([s.mean for s in scored[first : first + count]])
    return out


def _check_rows(rows: Sequence[tuple[list[int], list[int], list[int]]]) -> None:
    for i, (p_ids, a_ids, _) in enumerate(rows):
        if not p_ids or not a_ids:
            raise ValueError(f"row {i}: prompt and answer need at least one token each (got {len(p_ids)}, {len(a_ids)}).")


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    strip_prompt: bool = True,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches), cut at the first newline and stripped."""
    _check_batch_size(batch_size)
    pad = _pad_id(tokenizer)
    device = _device(_runner(model))
    texts = [_prompt_text(p, strip_prompt) for p in prompts]
    encoded = [list(tokenizer(t)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(texts)
    eos = getattr(getattr(_runner(model), "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    with _EvalMode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                input_ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, width - len(encoded[i]) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=eos,
                stop_strings=["\n"],
                tokenizer=tokenizer,
            )
            new_tokens = generated[:, width:].cpu()
            for r, i in enumerate(idx):
                text = tokenizer.decode(new_tokens[r], skip_special_tokens=True)
                outputs[i] = text.split("\n", 1)[0].strip()
    return outputs


# ------------------------------------------------------------------------------------------------- evaluate
def _choice_protocol(
    model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int, length_normalize: bool,
    strip_prompt: bool, progress: bool,
) -> list[list[float]]:
    forward = _Forward(model, _pad_id(tokenizer))
    rows: list[tuple[list[int], list[int], list[int]]] = []
    plan: list[tuple[str, int, int]] = []  # (kind, first row, number of rows) per example
    cache: dict[str, list[int]] = {}
    for ex in examples:
        if len(ex.choices) < 2:
            raise ValueError(f"Example {ex.id!r} has {len(ex.choices)} choice(s); the choice protocol needs >= 2.")
        p_ids = _encode_prompt(tokenizer, ex.prompt, strip_prompt)
        for choice in ex.choices:
            if choice not in cache:
                cache[choice] = _encode_answer(tokenizer, choice)
        options = [cache[c] for c in ex.choices]
        if all(len(o) == 1 for o in options):
            plan.append(("single", len(rows), 1))
            rows.append((p_ids, options[0], [o[0] for o in options]))
        else:
            plan.append(("multi", len(rows), len(options)))
            rows.extend((p_ids, o, []) for o in options)
    with _EvalMode(model):
        scored = forward.run(rows, batch_size, progress, desc="choice scoring")
    scores: list[list[float]] = []
    for kind, first, count in plan:
        if kind == "single":  # one-token options: sum == mean == the next-token log-probability
            scores.append([float(x) for x in scored[first].extra_logprobs])
        else:
            scores.append([s.mean if length_normalize else s.total for s in scored[first : first + count]])
    return scores


def mc2(scores: Sequence[float], true_labels: Sequence[int]) -> float:
    """TruthfulQA MC2 of one question: the probability mass of the true options after a softmax over the options'
    scores (log-likelihoods, length-normalised or not, as the caller scored them)."""
    return _mc2(scores, true_labels)


def _mc2(scores: Sequence[float], true_labels: Sequence[int]) -> float:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    return sum(weights[i] for i in true_labels) / sum(weights)


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task | str,
    examples: Sequence[Example],
    protocol: Optional[str] = None,
    batch_size: int = 16,
    *,
    length_normalize: bool = True,
    strip_prompt: bool = True,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``examples`` of ``task`` with one protocol.

    Args:
        model: transformers causal LM or ``PeftModel`` (steered as it is; ``with model.disable_adapter():`` for the
            baseline).
        tokenizer: its tokenizer (needs a pad token).
        task: a :class:`Task` or a registered task name.
        examples: from ``task.load(split)`` (or any :class:`Example` list).
        protocol: ``"choice"``, ``"argmax"`` or ``"generate"``; default ``task.default_protocol``.
        batch_size: rows per forward pass (``choice``: one row per example when all options are single tokens,
            else one per option).
        length_normalize: ``choice``: divide each option's log-probability by its token count.
        strip_prompt: score ``prompt.strip()`` (as ``calibrate`` reads it) instead of the raw template.
        max_new_tokens: ``generate``: greedy tokens per answer.
        progress: show progress bars.

    Returns:
        ``{"task", "protocol", "metric", "n", "accuracy", "correct", "predictions", ...}``: ``accuracy`` is the task's
        metric (mean MC2 for ``metric="mc2"``, exact match for ``exact_match``) as a fraction; ``correct`` one bool
        per example (for MC2: the top option is true); ``predictions`` the chosen index (``choice``) or the decoded
        string (``argmax``, ``generate``). ``choice`` adds ``scores`` (per-option scores) and, for MC2 tasks,
        ``mc2`` and ``mc1`` (top-option accuracy). ``per_example``: each example's value of the metric (MC2 mass or
        1.0 / 0.0), whose mean is ``accuracy`` — for paired comparisons of two models on the same examples.

    Raises:
        ValueError: unknown protocol or one the task does not support; no examples; no pad token.
    """
    task = get_task(task)
    protocol = task.default_protocol if protocol is None else protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}.")
    if protocol not in task.protocols:
        raise ValueError(f"Task {task.name!r} supports the protocols {list(task.protocols)}, not {protocol!r}.")
    examples = list(examples)
    if not examples:
        raise ValueError("No examples to evaluate.")
    bad = [type(ex).__name__ for ex in examples if not isinstance(ex, Example)]
    if bad:
        raise TypeError(f"evaluate needs Example objects (from task.load), got {bad[0]}.")
    batch_size = _check_batch_size(batch_size)
    _pad_id(tokenizer)
    result: dict[str, Any] = {"task": task.name, "protocol": protocol, "metric": task.metric, "n": len(examples)}

    if protocol == "choice":
        scores = _choice_protocol(model, tokenizer, examples, batch_size, length_normalize, strip_prompt, progress)
        predictions = [max(range(len(s)), key=lambda j, s=s: (s[j], -j)) for s in scores]
        if task.metric == "mc2":
            trues = [ex.true_labels or (ex.label,) for ex in examples]
            correct = [p in t for p, t in zip(predictions, trues)]
            mc2 = [_mc2(s, t) for s, t in zip(scores, trues)]
            result.update(accuracy=sum(mc2) / len(mc2), mc2=sum(mc2) / len(mc2), mc1=sum(correct) / len(correct),
                          per_example=mc2)
        else:
            correct = [p == ex.label for p, ex in zip(predictions, examples)]
            result.update(accuracy=sum(correct) / len(correct), per_example=[float(c) for c in correct])
        result.update(correct=correct, predictions=predictions, scores=scores, length_normalize=length_normalize)
        return result

    if protocol == "argmax":
        forward = _Forward(model, _pad_id(tokenizer))
        rows = [(_encode_prompt(tokenizer, ex.prompt, strip_prompt), _encode_answer(tokenizer, ex.gold), [])
                for ex in examples]
        with _EvalMode(model):
            scored = forward.run(rows, batch_size, progress, desc="argmax scoring")
        predictions = [tokenizer.decode(s.argmax_ids.tolist(), skip_special_tokens=True) for s in scored]
        correct = [normalize_argmax(p) == normalize_argmax(ex.gold) for p, ex in zip(predictions, examples)]
        result.update(accuracy=sum(correct) / len(correct), correct=correct, predictions=predictions,
                      per_example=[float(c) for c in correct])
        return result

    predictions = generate_answers(
        model, tokenizer, [ex.prompt for ex in examples], batch_size=batch_size, max_new_tokens=max_new_tokens,
        strip_prompt=strip_prompt, progress=progress,
    )
    correct = []
    for pred, ex in zip(predictions, examples):
        targets = {normalize_answer(a) for a in (ex.answers or (ex.gold,))}
        correct.append(normalize_answer(pred) in targets)
    result.update(accuracy=sum(correct) / len(correct), correct=correct, predictions=predictions,
                  per_example=[float(c) for c in correct], max_new_tokens=max_new_tokens)
    return result
