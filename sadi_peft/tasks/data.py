"""Locating task data files and drawing seeded example subsets.

Task data (SST-2, COPA, BoolQ, ...) is read from a *data directory* that holds one sub-folder per task
(``<data_dir>/sst2/stsa.binary.train``, ``<data_dir>/copa/...``). :func:`resolve_data_dir` finds it, in this order:

1. the explicit ``data_dir`` argument,
2. the environment variable ``SADI_DATA_DIR``,
3. ``../shared/data`` relative to the current working directory,
4. ``../shared/data`` relative to the repository root (the folder above the ``sadi_peft`` package),
5. ``shared/data`` inside the current working directory or the repository root.

Task loaders may fall back to the Hugging Face Hub (``datasets``) when no directory is found.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DATA_DIR_ENV",
    "candidate_data_dirs",
    "resolve_data_dir",
    "select_examples",
    "task_file",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the data directory.
DATA_DIR_ENV = "SADI_DATA_DIR"

#: Repository root when running from a source checkout: ``<repo>/sadi_peft/tasks/data.py`` → ``<repo>``.
_REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def candidate_data_dirs() -> list[Path]:
    """Return the automatic search locations (steps 3–5 of :func:`resolve_data_dir`), without duplicates."""
    cwd = Path.cwd()
    candidates = [
        cwd.parent / "shared" / "data",
        _REPO_ROOT.parent / "shared" / "data",
        cwd / "shared" / "data",
        _REPO_ROOT / "shared" / "data",
    ]
    unique: list[Path] = []
    seen: set[Path] = set()
    for path in candidates:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the data directory (the folder that contains one sub-folder per task, e.g. ``sst2/``).

    Args:
        data_dir: Explicit directory. When given it must exist; no other location is tried.

    Returns:
        The resolved, existing directory.

    Raises:
        FileNotFoundError: the explicit directory or ``$SADI_DATA_DIR`` does not exist, or no automatic location
            exists. The message says where to put the files and which variable to set.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data_dir={os.fspath(data_dir)!r} is not an existing directory. Pass the folder that contains the "
                f"task sub-folders (e.g. <data_dir>/sst2/stsa.binary.train), or omit data_dir to use "
                f"${DATA_DIR_ENV} or ../shared/data."
            )
        return path.resolve()

    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={env!r} is not an existing directory. Point it at the folder that contains the "
                f"task sub-folders (e.g. $SADI_DATA_DIR/sst2/stsa.binary.train), or unset it to search "
                "../shared/data."
            )
        return path.resolve()

    candidates = candidate_data_dirs()
    for path in candidates:
        if path.is_dir():
            logger.debug("Using data directory %s", path)
            return path.resolve()

    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        "No task data directory found. Put the task folders (e.g. sst2/stsa.binary.train) into ../shared/data "
        f"next to the repository, set the environment variable {DATA_DIR_ENV}=/path/to/data, or pass "
        f"data_dir=... (the example scripts take --data-dir). Searched: {tried}."
    )


def task_file(task: str, file_name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return ``<data_dir>/<task>/<file_name>``, checking that it exists.

    Raises:
        FileNotFoundError: no data directory, or the file is missing in it (the message names the full path).
    """
    root = resolve_data_dir(data_dir)
    path = root / task / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the {task} data file {path} but it does not exist. Put {file_name} into {root / task} "
            f"(see {root / task / 'README.md'} if present), or point {DATA_DIR_ENV} / data_dir at a data "
            "directory that has it."
        )
    return path


def select_examples(
    examples: Sequence[T],
    n: int | None,
    seed: int = 0,
    *,
    balanced: bool = True,
    label_key: str = "label",
) -> list[T]:
    """Draw a seeded subset of ``n`` examples, balanced over labels when possible.

    With ``balanced=True`` and mapping-like examples that carry ``label_key``, the labels are drawn round-robin
    (each label's examples shuffled with ``seed``), so every label gets ``n // n_labels`` or one more example; when
    a label runs out the others fill the remaining slots. Otherwise a plain seeded random sample is returned. The
    result is shuffled, deterministic for a given ``seed`` and does not modify ``examples``.

    Args:
        examples: The pool to draw from.
        n: Number of examples; ``None`` means all of them (shuffled).
        seed: Random seed.
        balanced: Balance over ``example[label_key]``.
        label_key: Key of the label in each example.

    Raises:
        ValueError: ``n`` is negative or larger than the pool.
    """
    pool = list(examples)
    if n is None:
        n = len(pool)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}.")
    if n > len(pool):
        raise ValueError(
            f"Cannot select n={n} examples from a pool of {len(pool)}; pass n <= {len(pool)} (or n=None for all)."
        )
    rng = random.Random(seed)

    labelled = balanced and all(isinstance(ex, Mapping) and label_key in ex for ex in pool)
    if not labelled:
        if balanced and pool:
            logger.debug("select_examples: examples have no %r key; drawing a plain random sample.", label_key)
        return rng.sample(pool, n)

    groups: dict[Hashable, list[T]] = {}
    for ex in pool:
        groups.setdefault(_label_of(ex, label_key), []).append(ex)
    ordered = [groups[k] for k in sorted(groups, key=repr)]
    for group in ordered:
        rng.shuffle(group)
    chosen: list[T] = []
    cursor = 0
    while len(chosen) < n:
        progressed = False
        for group in ordered:
            if len(chosen) == n:
                break
            if cursor < len(group):
                chosen.append(group[cursor])
                progressed = True
        if not progressed:  # pragma: no cover - impossible because n <= len(pool)
            break
        cursor += 1
    rng.shuffle(chosen)
    return chosen


def _label_of(example: Any, label_key: str) -> Hashable:
    label = example[label_key]
    if not isinstance(label, Hashable):
        raise ValueError(f"select_examples needs hashable labels; got {label!r} under key {label_key!r}.")
    return label
