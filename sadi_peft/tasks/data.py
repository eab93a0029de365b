"""Locating task data files and drawing seeded example subsets.

Task data (SST-2, COPA, BoolQ, ...) is read from a *data directory* that holds one sub-folder per task
(``<data_dir>/sst2/stsa.binary.train``, ``<data_dir>/copa/...``). :func:`resolve_data_dir` finds it, in this order:

1. the explicit ``data_dir`` argument,
2. the environment variable ``SADI_DATA_DIR``,
3. ``../shared/data`` relative to the current working directory,
4. ``../shared/data`` relative to the repository root (the folder above the ``sadi_peft`` package),
5. ``shared/data`` inside the current working directory or the repository root.

Task loaders may fall back to the Hugging Face Hub (``datasets``) when no directory is found (:func:`load_from_hub`;
only when neither ``data_dir`` nor ``$SADI_DATA_DIR`` was given, and only when ``datasets`` is installed and the
Hub answers).

Split roles. Every task exposes three parts with fixed roles (:data:`SPLIT_ROLES`):

* ``pairs`` -- the source of contrastive calibration pairs (never scored);
* ``validation`` -- where K and delta (and anything else) are selected;
* ``test`` -- scored once, for the final report. Selection code calls :func:`require_selection_split`, which refuses
  ``"test"`` (sadi-method.md section 8.2: the authors tuned on the test set).

Datasets with a single labeled split are cut by :func:`seeded_split`: each example is ranked by the SHA-256 of
``salt | seed | key(example)`` (no Python ``hash``, no RNG state, so the cut is the same on every machine, Python
version and file order); the first ``floor(0.2 * N)`` form ``pairs``, the next ``floor(0.2 * N)`` ``validation``,
the rest ``test``; each part keeps file order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "DATA_DIR_ENV",
    "PAIRS_FRACTION",
    "SPLIT_ROLES",
    "SPLIT_SALT",
    "SPLIT_SEED",
    "VALIDATION_FRACTION",
    "candidate_data_dirs",
    "hub_allowed",
    "load_from_hub",
    "normalize_split",
    "require_selection_split",
    "resolve_data_dir",
    "seeded_split",
    "select_examples",
    "split_sizes",
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

    With ``balanced=True`` and examples that carry ``label_key`` (a mapping key, or an attribute such as
    :attr:`sadi_peft.tasks.Example.label`), the labels are drawn round-robin
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

    labelled = balanced and all(_has_label(ex, label_key) for ex in pool)
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


def _has_label(example: Any, label_key: str) -> bool:
    if isinstance(example, Mapping):
        return label_key in example
    return hasattr(example, label_key)


def _label_of(example: Any, label_key: str) -> Hashable:
    label = example[label_key] if isinstance(example, Mapping) else getattr(example, label_key)
    if not isinstance(label, Hashable):
        raise ValueError(f"select_examples needs hashable labels; got {label!r} under key {label_key!r}.")
    return label


# ------------------------------------------------------------------------------------------------ split roles

#: The three parts every task exposes, in order: calibration-pair source, selection data, final test data.
SPLIT_ROLES: tuple[str, str, str] = ("pairs", "validation", "test")
#: Fractions of a single labeled split that go to ``pairs`` and ``validation`` (the rest is ``test``).
PAIRS_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
#: Salt and seed of :func:`seeded_split`; changing either changes every derived split (bump the ``v1``).
SPLIT_SALT = "sadi-peft/split/v1"
SPLIT_SEED = 0


def normalize_split(split: str) -> str:
    """Return the split role ``"pairs"``, ``"validation"`` or ``"test"`` (case and surrounding space ignored).

    Raises:
        ValueError: anything else (the message lists the roles).
    """
    key = split.strip().lower() if isinstance(split, str) else split
    if key not in SPLIT_ROLES:
        raise ValueError(
            f"Unknown split {split!r}; expected one of {list(SPLIT_ROLES)} (pairs: calibration-pair source, "
            "validation: hyperparameter selection, test: final evaluation)."
        )
    return key


def require_selection_split(split: str) -> str:
    """Guard for code that *selects* something (K, delta, a checkpoint): return the role, refusing ``"test"``.

    Selecting on the test split is the pitfall of sadi-method.md section 8.2 (the authors' grid maxima are test-set
    maxima). ``"validation"`` is the intended split; ``"pairs"`` is accepted too (selection on the calibration
    data, e.g. for a quick look).

    Raises:
        ValueError: ``split`` is ``"test"`` or not a split role.
    """
    role = normalize_split(split)
    if role == "test":
        raise ValueError(
            "Refusing to select hyperparameters on the 'test' split: selection must use 'validation' (or 'pairs'), "
            "and 'test' is scored once with the selected setting (sadi-method.md section 8.2)."
        )
    return role


def split_sizes(
    n: int, pairs_fraction: float = PAIRS_FRACTION, validation_fraction: float = VALIDATION_FRACTION
) -> dict[str, int]:
    """Sizes of the parts :func:`seeded_split` makes from ``n`` items: floor, floor, rest."""
    if not (0.0 <= pairs_fraction and 0.0 <= validation_fraction and pairs_fraction + validation_fraction <= 1.0):
        raise ValueError(
            f"pairs_fraction={pairs_fraction!r} and validation_fraction={validation_fraction!r} must be >= 0 and sum "
            "to at most 1."
        )
    n_pairs = math.floor(n * pairs_fraction)
    n_validation = math.floor(n * validation_fraction)
    return {"pairs": n_pairs, "validation": n_validation, "test": n - n_pairs - n_validation}


def _rank(salt: str, seed: int, key: str) -> str:
    return hashlib.sha256(f"{salt}|{seed}|{key}".encode("utf-8")).hexdigest()


def seeded_split(
    items: Sequence[T],
    key: Callable[[T], str],
    *,
    salt: str = SPLIT_SALT,
    seed: int = SPLIT_SEED,
    pairs_fraction: float = PAIRS_FRACTION,
    validation_fraction: float = VALIDATION_FRACTION,
) -> dict[str, list[T]]:
    """Cut ``items`` into ``pairs`` / ``validation`` / ``test`` by a hash of each item's text.

    Items are ordered by ``sha256(f"{salt}|{seed}|{key(item)}")`` (ties: file order); the first
    ``floor(pairs_fraction * N)`` are ``pairs``, the next ``floor(validation_fraction * N)`` ``validation``, the rest
    ``test``. Each part is returned in the original order. The result depends only on the item texts, so it is the
    same on every machine and run, and the same questions land in the same part for two tasks built from one
    dataset (TruthfulQA MC1 and MC2) when they use the same ``key`` and ``salt``.
    """
    sizes = split_sizes(len(items), pairs_fraction, validation_fraction)
    ranked = sorted(range(len(items)), key=lambda i: (_rank(salt, seed, key(items[i])), i))
    cut1, cut2 = sizes["pairs"], sizes["pairs"] + sizes["validation"]
    parts = {"pairs": ranked[:cut1], "validation": ranked[cut1:cut2], "test": ranked[cut2:]}
    return {role: [items[i] for i in sorted(idx)] for role, idx in parts.items()}


# ------------------------------------------------------------------------------------------------ Hub fallback


def hub_allowed(data_dir: str | os.PathLike[str] | None) -> bool:
    """The Hub may be tried only when no directory was named (neither ``data_dir`` nor ``$SADI_DATA_DIR``)."""
    return data_dir is None and not os.environ.get(DATA_DIR_ENV, "").strip()


def load_from_hub(
    dataset: str,
    config: str | None,
    split: str,
    not_found: FileNotFoundError,
) -> Iterable[Mapping[str, Any]]:
    """Last-resort fallback: ``datasets.load_dataset(dataset, config, split=split)``.

    Raises:
        FileNotFoundError: ``not_found`` itself when ``datasets`` is not installed; a combined message when the Hub
            (network, cache, authentication) fails.
    """
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise not_found from None
    label = f"{dataset}" + (f" ({config})" if config else "") + f" [{split}]"
    logger.info("No local data (%s); trying the Hugging Face Hub dataset %s.", not_found, label)
    try:
        if config is None:
            return datasets.load_dataset(dataset, split=split)
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:  # noqa: BLE001 - network, cache and auth errors all mean "not available"
        raise FileNotFoundError(f"{not_found} The Hugging Face Hub fallback {label} also failed: {exc}") from exc
