"""The task abstraction: :class:`Example`, :class:`Task`, contrastive-pair construction and the task registry.

A :class:`Task` bundles what the reproduction harness needs per benchmark:

* ``load(split, data_dir)`` -> ``list[Example]`` for the split roles ``pairs`` / ``validation`` / ``test``
  (:data:`~sadi_peft.tasks.data.SPLIT_ROLES`);
* ``pairs(examples, seed)`` -> ``(prompt, positive, negative)`` triples for :func:`sadi_peft.calibrate`, built as in
  sadi-method.md section 3.4 (:func:`build_pairs`);
* the evaluation protocols it supports (``protocols``, ``default_protocol``; see :mod:`sadi_peft.tasks.protocols`).

An :class:`Example` holds the filled prompt template (sadi-method.md section 5), the answer strings ``choices`` (the
strings appended after one space: ``A``/``B``, ``Positive``/``Negative``, full answers for TruthfulQA), the gold
index ``label``, and, where relevant, ``answers`` (TriviaQA aliases) and ``true_labels`` (TruthfulQA MC2).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .data import SPLIT_ROLES, normalize_split

__all__ = [
    "PAIR_MODES",
    "Example",
    "Task",
    "build_pairs",
    "get_task",
    "register_task",
    "task_names",
]

#: How :func:`build_pairs` picks the negative answer.
#:
#: * ``"gold_vs_wrong"``: two choices -> the other one; more -> a seeded random wrong choice (COPA, SST-2, BoolQ,
#:   Winogrande, ARC, MMLU, TruthfulQA MC1, user tasks);
#: * ``"true_vs_false"``: a seeded random true answer vs a seeded random false one (TruthfulQA MC2);
#: * ``"gold_vs_empty"``: the gold answer vs the empty string (TriviaQA, sadi-method.md section 3.4).
PAIR_MODES = ("gold_vs_wrong", "true_vs_false", "gold_vs_empty")


@dataclass(frozen=True)
class Example:
    """One evaluation item.

    Attributes:
        prompt: The filled prompt template; answers are appended after one space.
        choices: Answer strings; ``choices[label]`` is the gold answer.
        label: Index of the gold answer in ``choices``.
        answers: Accepted answer strings for exact-match protocols (TriviaQA aliases); empty for choice tasks.
        true_labels: Indices of all true choices (TruthfulQA MC2); empty otherwise.
        id: Stable identifier, ``"<dataset>/<file>:<n>"`` (1-based JSONL line, CSV row or example number),
            unique within a task.
        meta: Source fields (subject, raw question, ...); not compared.
    """

    prompt: str
    choices: tuple[str, ...]
    label: int
    answers: tuple[str, ...] = ()
    true_labels: tuple[int, ...] = ()
    id: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"Example.prompt must be a str, got {type(self.prompt).__name__}.")
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "answers", tuple(self.answers))
        object.__setattr__(self, "true_labels", tuple(self.true_labels))
        if not self.choices or not all(isinstance(c, str) for c in self.choices):
            raise ValueError(f"Example {self.id!r}: choices must be a non-empty sequence of str, got {self.choices!r}.")
        if isinstance(self.label, bool) or not isinstance(self.label, int) or not 0 <= self.label < len(self.choices):
            raise ValueError(
                f"Example {self.id!r}: label must be an index into its {len(self.choices)} choices, got {self.label!r}."
            )
        n = len(self.choices)
        bad = [i for i in self.true_labels if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad:
            raise ValueError(
                f"Example {self.id!r}: true_labels {list(self.true_labels)} contain invalid index {bad[0]!r}."
            )

    @property
    def gold(self) -> str:
        """The gold answer string ``choices[label]``."""
        return self.choices[self.label]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the generic JSONL task reads it back: :func:`sadi_peft.tasks.load_jsonl`)."""
        record: dict[str, Any] = {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}
        if self.answers:
            record["answers"] = list(self.answers)
        if self.true_labels:
            record["true_labels"] = list(self.true_labels)
        if self.id:
            record["id"] = self.id
        if self.meta:
            record["meta"] = dict(self.meta)
        return record


def examples_digest(examples: Iterable[Example]) -> str:
    """A 16-hex-digit fingerprint of ``examples`` in order (their :meth:`Example.to_dict` forms): two results with
    the same digest scored the same examples in the same order, so their per-example values can be paired."""
    text = json.dumps([example.to_dict() for example in examples], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _example_rng(seed: int, example: Example) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs, machines and PYTHONHASHSEED.
    return random.Random(f"{seed}|{example.id or example.prompt}")


def build_pairs(examples: Iterable[Example], seed: int = 0, mode: str = "gold_vs_wrong") -> list[tuple[str, str, str]]:
    """Contrastive pairs ``(prompt, positive, negative)`` from examples (sadi-method.md section 3.4).

    Random choices are drawn per example from ``random.Random(f"{seed}|{example.id}")`` (the prompt when there is no
    id), so a pair does not depend
    on which other examples are in the list or on their order.

    Raises:
        ValueError: unknown ``mode``; an example without a usable negative (one choice, all choices equal, no false
            answer for ``true_vs_false``).
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"Unknown pair mode {mode!r}; expected one of {list(PAIR_MODES)}.")
    pairs: list[tuple[str, str, str]] = []
    for index, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise TypeError(f"build_pairs needs Example objects, got {type(ex).__name__} at position {index}.")
        if mode == "gold_vs_empty":
            pairs.append((ex.prompt, ex.gold, ""))
            continue
        rng = _example_rng(seed, ex)
        if mode == "true_vs_false":
            trues = list(ex.true_labels) or [ex.label]
            falses = [i for i in range(len(ex.choices)) if i not in trues]
            positive = ex.choices[rng.choice(trues)]
            falses = [i for i in falses if ex.choices[i].strip() != positive.strip()]
            if not falses:
                raise ValueError(f"Example {ex.id!r} has no false answer to contrast with its true ones.")
            pairs.append((ex.prompt, positive, ex.choices[rng.choice(falses)]))
            continue
        wrong = [i for i in range(len(ex.choices)) if i != ex.label and ex.choices[i].strip() != ex.gold.strip()]
        if not wrong:
            raise ValueError(
                f"Example {ex.id!r} has no wrong choice different from its gold answer {ex.gold!r}; a contrastive pair "
                "needs one."
            )
        negative = ex.choices[wrong[0]] if len(ex.choices) == 2 else ex.choices[rng.choice(wrong)]
        pairs.append((ex.prompt, ex.gold, negative))
    return pairs


Loader = Callable[[str, Optional[Path]], list[Example]]


@dataclass(frozen=True)
class Task:
    """A benchmark: data loading per split role, contrastive pairs, supported evaluation protocols.

    Attributes:
        name: Registry name (``"copa"``, ``"mmlu"``, ``"truthfulqa_mc2"``, ...).
        description: One line.
        loader: ``loader(role, data_dir)`` -> examples of one split role (use :meth:`load`).
        pair_mode: One of :data:`PAIR_MODES`.
        protocols: Protocols :func:`sadi_peft.tasks.evaluate` accepts for this task.
        default_protocol: The protocol used when none is given.
        metric: ``"accuracy"``, ``"mc2"`` (normalised probability mass on the true answers) or ``"exact_match"``.
        split_sources: Human-readable source of each split role (files, fractions).
        split_sizes: Documented size of each split role on the bundled data (``None`` for user tasks).
    """

    name: str
    description: str
    loader: Loader = field(repr=False)
    pair_mode: str = "gold_vs_wrong"
    protocols: tuple[str, ...] = ("choice", "argmax")
    default_protocol: str = "choice"
    metric: str = "accuracy"
    split_sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    split_sizes: Optional[Mapping[str, int]] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.pair_mode not in PAIR_MODES:
            raise ValueError(f"Task {self.name!r}: pair_mode {self.pair_mode!r} is not one of {list(PAIR_MODES)}.")
        if self.default_protocol not in self.protocols:
            raise ValueError(f"Task {self.name!r}: default_protocol {self.default_protocol!r} not in {self.protocols}.")

    @property
    def splits(self) -> tuple[str, ...]:
        """The split roles: ``("pairs", "validation", "test")``."""
        return SPLIT_ROLES

    def load(self, split: str, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
        """Examples of one split role (``"pairs"``, ``"validation"`` or ``"test"``), in source-file order."""
        role = normalize_split(split)
        return self.loader(role, None if data_dir is None else Path(data_dir))

    def load_all(self, data_dir: str | os.PathLike[str] | None = None) -> dict[str, list[Example]]:
        """All three split roles."""
        return {role: self.load(role, data_dir) for role in SPLIT_ROLES}

    def pairs(self, examples: Iterable[Example], seed: int = 0) -> list[tuple[str, str, str]]:
        """Contrastive pairs for :func:`sadi_peft.calibrate` (see :func:`build_pairs` and ``pair_mode``)."""
        return build_pairs(examples, seed=seed, mode=self.pair_mode)


# ---------------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Callable[[], Task]] = {}
_CACHE: dict[str, Task] = {}


def register_task(name: str, factory: Callable[[], Task] | Task, *, overwrite: bool = False) -> None:
    """Register a task (or a zero-argument factory) under ``name`` for :func:`get_task`."""
    key = name.strip().lower()
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"A task named {key!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[key] = factory if callable(factory) and not isinstance(factory, Task) else (lambda t=factory: t)
    _CACHE.pop(key, None)


def task_names() -> list[str]:
    """Names of the registered tasks (MMLU subjects are reachable as ``"mmlu:<subject>"`` too)."""
    return sorted(_REGISTRY)


def get_task(name: str | Task) -> Task:
    """Look up a task by name.

    Besides the registered names, ``"mmlu:<subject>[,<subject>...]"`` gives MMLU restricted to those subjects and
    ``"jsonl:<path>"`` a user task from a JSONL file (:func:`sadi_peft.tasks.jsonl_task`).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if isinstance(name, Task):
        return name
    key = name.strip()
    lowered = key.lower()
    if lowered.startswith("jsonl:"):
        from .custom import jsonl_task  # noqa: PLC0415 - avoid an import cycle

        return jsonl_task(key[len("jsonl:") :])
    if lowered.startswith("mmlu:"):
        from .benchmarks import mmlu_task  # noqa: PLC0415

        return mmlu_task([s.strip() for s in lowered[len("mmlu:") :].split(",") if s.strip()])
    if lowered not in _REGISTRY:
        raise KeyError(
            f"Unknown task {name!r}; known tasks: {', '.join(task_names())} (also 'mmlu:<subject>' and "
            "'jsonl:<path>')."
        )
    if lowered not in _CACHE:
        _CACHE[lowered] = _REGISTRY[lowered]()
    return _CACHE[lowered]


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(1-based line number, object)`` for each non-empty line of a JSONL file."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}).") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}.")
            rows.append((lineno, obj))
    return rows


def check_sequence(value: Any, what: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}.")
    return value
