"""A task from your own JSONL file, so you can steer your own behaviours with the same harness.

One JSON object per line::

    {"prompt": "Is the sky green? Answer:", "choices": ["No", "Yes"], "label": 0}
    {"prompt": "Capital of France? Answer:", "choices": ["Paris", "Lyon", "Nice"], "label": 0, "split": "test"}

Fields:

* ``prompt`` (str), ``choices`` (list of str; each is appended to the prompt after one space), ``label`` (int index
  of the correct choice) -- required;
* ``split`` (optional): ``"pairs"``, ``"validation"`` or ``"test"``. Either every line has it or none does; without
  it the file is cut by :func:`~sadi_peft.tasks.data.seeded_split` (hash of prompt + choices, 20 % pairs,
  20 % validation, the rest test; stable across runs and machines);
* ``answers`` (optional list of str): accepted strings for the ``generate`` protocol (default: the gold choice);
* ``true_labels`` (optional list of int): all correct choices (used by ``pair_mode="true_vs_false"``);
* ``id`` (optional str) and ``meta`` (optional object) are kept.

:func:`write_jsonl` writes :class:`~sadi_peft.tasks.Example` objects in this format, so any task's examples
round-trip through a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from .base import Example, Task, check_sequence, read_jsonl
from .data import SPLIT_ROLES, seeded_split

__all__ = ["jsonl_task", "load_jsonl", "write_jsonl"]

_ALLOWED = {"prompt", "choices", "label", "split", "answers", "true_labels", "id", "meta"}


def _example_from_record(record: dict[str, Any], where: str, default_id: str) -> Example:
    unknown = sorted(set(record) - _ALLOWED)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_ALLOWED)}.")
    missing = [k for k in ("prompt", "choices", "label") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing} (need prompt, choices, label).")
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise ValueError(f"{where}: prompt must be a non-empty string.")
    choices = check_sequence(record["choices"], f"{where}: choices")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: every choice must be a non-empty string, got {choices!r}.")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: label must be an int index into the {len(choices)} choices, got {label!r}.")
    answers = check_sequence(record.get("answers", []), f"{where}: answers")
    true_labels = check_sequence(record.get("true_labels", []), f"{where}: true_labels")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta must be an object.")
    try:
        return Example(
            prompt=record["prompt"],
            choices=tuple(choices),
            label=label,
            answers=tuple(str(a) for a in answers),
            true_labels=tuple(true_labels),
            id=str(record.get("id") or default_id),
            meta=meta,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def load_jsonl(path: str | os.PathLike[str]) -> dict[str, list[Example]]:
    """Read a task JSONL file into its three split roles (see the module docstring for the format).

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed line (file and line named), mixed presence of ``split``, unknown split value,
            duplicate ids.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"Task file {file} does not exist; expected a JSONL file with prompt/choices/label lines."
        )
    rows = read_jsonl(file)
    if not rows:
        raise ValueError(f"{file} holds no examples.")
    with_split = [lineno for lineno, row in rows if "split" in row]
    if with_split and len(with_split) != len(rows):
        without = next(lineno for lineno, row in rows if "split" not in row)
        raise ValueError(
            f"{file}: line {with_split[0]} has a 'split' field but line {without} has none; give every line a split "
            "or none (then the file is split 20/20/60 by hash)."
        )
    examples: list[tuple[Optional[str], Example]] = []
    for lineno, row in rows:
        where = f"{file}:{lineno}"
        split = row.get("split")
        if split is not None and split not in SPLIT_ROLES:
            raise ValueError(f"{where}: split {split!r} is not one of {list(SPLIT_ROLES)}.")
        examples.append((split, _example_from_record(row, where, f"{file.name}:{lineno}")))
    ids = [ex.id for _, ex in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{file}: duplicate id {dup!r}; ids must be unique.")
    if with_split:
        return {role: [ex for split, ex in examples if split == role] for role in SPLIT_ROLES}
    return seeded_split(
        [ex for _, ex in examples],
        lambda ex: json.dumps([ex.prompt, list(ex.choices)], ensure_ascii=False),
        salt="sadi-peft/split/v1/jsonl",
    )


def write_jsonl(
    examples: Iterable[Example], path: str | os.PathLike[str], *, split: Optional[str] = None
) -> Path:
    """Write examples in the task JSONL format (with ``"split": split`` on every line when given)."""
    file = Path(path).expanduser()
    if split is not None and split not in SPLIT_ROLES:
        raise ValueError(f"split {split!r} is not one of {list(SPLIT_ROLES)}.")
    with file.open("w", encoding="utf-8") as handle:
        for ex in examples:
            record = ex.to_dict()
            if split is not None:
                record["split"] = split
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return file


def jsonl_task(
    path: str | os.PathLike[str],
    *,
    name: Optional[str] = None,
    pair_mode: str = "gold_vs_wrong",
    protocols: tuple[str, ...] = ("choice", "argmax", "generate"),
    default_protocol: str = "choice",
) -> Task:
    """A :class:`~sadi_peft.tasks.Task` over a user JSONL file (read on each ``load``; ``data_dir`` is ignored)."""
    file = Path(path).expanduser()

    def loader(role: str, data_dir: Optional[Path]) -> list[Example]:
        return load_jsonl(file)[role]

    return Task(
        name=name or f"jsonl:{file}",
        description=f"user task from {file}",
        loader=loader,
        pair_mode=pair_mode,
        protocols=protocols,
        default_protocol=default_protocol,
        split_sources={role: f"{file} ('split' field, else hash 20/20/60)" for role in SPLIT_ROLES},
    )
