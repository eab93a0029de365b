"""SST-2 (binary sentiment): data loading, the SADI prompt template, contrastive pairs and choice accuracy.

Data: ``<data_dir>/sst2/stsa.binary.{train,dev,test}`` (Kim 2014 splits; 6920 / 872 / 1821 sentences), one
example per line: the label digit (1 positive, 0 negative), one space, the lower-cased PTB-tokenized sentence.
The PTB escapes ``-lrb-``, ``-rrb-`` and ``\\/`` are mapped to ``(``, ``)`` and ``/``.

Task ``"sst2"`` (:func:`sadi_peft.tasks.get_task`): split roles pairs = train (6920), validation = dev (872),
test = test (1821); answers ``Negative`` / ``Positive`` (label 0 / 1); pairs = gold word vs the other.

Prompt and answers follow the SADI reference code (weixuan-wang123/SADI ``load_dataset.py``; see
``docs/sadi-method.md`` §5): the answer word ``Positive``/``Negative`` is appended after one space.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .base import Example, Task, register_task
from .choice import choice_accuracy
from .data import DATA_DIR_ENV, normalize_split, select_examples, task_file

__all__ = [
    "SST2_LABEL_WORDS",
    "SST2_SPLITS",
    "SST2_TEMPLATE",
    "load_sst2",
    "load_sst2_examples",
    "sst2_example",
    "select_examples",
    "sst2_choice_accuracy",
    "sst2_pairs",
    "sst2_prompt",
]

logger = logging.getLogger(__name__)

#: Prompt template (sadi-method.md §5); ``{text}`` is the sentence.
SST2_TEMPLATE = (
    "Consider the sentiment expression in this sentence and respond briefly with 'positive' or 'negative'."
    "\n\n{text}\n\nAnswer:"
)
#: Answer words indexed by label (0 negative, 1 positive).
SST2_LABEL_WORDS: tuple[str, str] = ("Negative", "Positive")
#: Accepted split names → file suffix of ``stsa.binary.<suffix>``.
SST2_SPLITS: Mapping[str, str] = {"train": "train", "validation": "dev", "dev": "dev", "test": "test"}
_HF_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
_HF_DATASET = "SetFit/sst2"
_PTB_ESCAPES = (("-lrb-", "("), ("-rrb-", ")"), ("\\/", "/"))


def _unescape(text: str) -> str:
    for escaped, plain in _PTB_ESCAPES:
        text = text.replace(escaped, plain)
    return text.strip()


def _split_suffix(split: str) -> str:
    key = split.strip().lower() if isinstance(split, str) else split
    if key not in SST2_SPLITS:
        raise ValueError(f"Unknown SST-2 split {split!r}; expected one of {sorted(SST2_SPLITS)}.")
    return SST2_SPLITS[key]


def _parse_stsa(lines: Iterable[str], source: str) -> list[dict[str, Any]]:
    examples: list[dict[str, Any]] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        label_str, sep, text = line.partition(" ")
        if not sep or label_str not in ("0", "1") or not text.strip():
            raise ValueError(
                f"{source}:{lineno}: expected '<0|1> <sentence>', got {line[:80]!r}. The file is not in the "
                "stsa.binary format (see data/sst2/README.md)."
            )
        examples.append({"text": _unescape(text), "label": int(label_str)})
    return examples


def _load_from_hub(suffix: str, not_found: FileNotFoundError) -> list[dict[str, Any]]:
    """Last-resort fallback: ``datasets.load_dataset("SetFit/sst2")`` (needs ``datasets`` and network/cache)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise not_found from None
    hf_split = _HF_SPLITS[suffix]
    logger.info("No local SST-2 data (%s); trying the Hugging Face Hub dataset %s [%s].", not_found, _HF_DATASET,
                hf_split)
    try:
        dataset = datasets.load_dataset(_HF_DATASET, split=hf_split)
    except Exception as exc:  # noqa: BLE001 - network, cache and auth errors all mean "not available"
        raise FileNotFoundError(
            f"{not_found} The Hugging Face Hub fallback {_HF_DATASET!r} [{hf_split}] also failed: {exc}"
        ) from exc
    return [{"text": _unescape(str(row["text"])), "label": int(row["label"])} for row in dataset]


def load_sst2(split: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Load an SST-2 split as a list of ``{"text": str, "label": int}`` (1 positive, 0 negative), in file order.

    Args:
        split: ``"train"``, ``"validation"`` (alias ``"dev"``) or ``"test"``.
        data_dir: Data directory holding ``sst2/``; default: see :func:`sadi_peft.tasks.data.resolve_data_dir`.
            When no directory is given or found and the ``datasets`` package is installed, the Hugging Face Hub
            dataset ``SetFit/sst2`` is tried as a last resort.

    Raises:
        ValueError: unknown split or malformed file.
        FileNotFoundError: no data found (the message says where to put the files and which variable to set).
    """
    suffix = _split_suffix(split)
    file_name = f"stsa.binary.{suffix}"
    try:
        path = task_file("sst2", file_name, data_dir)
    except FileNotFoundError as exc:
        if data_dir is None and not os.environ.get(DATA_DIR_ENV, "").strip():
            return _load_from_hub(suffix, exc)
        raise
    with path.open(encoding="utf-8") as handle:
        examples = _parse_stsa(handle, str(path))
    logger.debug("Loaded %d SST-2 %s examples from %s", len(examples), split, path)
    return examples


def sst2_prompt(text: str) -> str:
    """Fill :data:`SST2_TEMPLATE` with one sentence."""
    return SST2_TEMPLATE.format(text=text.strip())


def _check_label(example: Mapping[str, Any]) -> int:
    label = example.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise ValueError(f"SST-2 labels must be 0 (negative) or 1 (positive); got {label!r} in {dict(example)!r}.")
    return int(label)


def sst2_pairs(examples: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """Build SADI contrastive pairs ``(prompt, correct label word, wrong label word)`` from SST-2 examples."""
    pairs: list[tuple[str, str, str]] = []
    for example in examples:
        label = _check_label(example)
        pairs.append((sst2_prompt(example["text"]), SST2_LABEL_WORDS[label], SST2_LABEL_WORDS[1 - label]))
    return pairs


def sst2_choice_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    batch_size: int = 16,
    *,
    progress: bool = True,
) -> float:
    """Restricted-choice accuracy: is the first token of `` Positive`` / `` Negative`` ranked right after the prompt?

    ``model`` may be a transformers causal LM or a ``PeftModel`` (wrap the call in ``model.disable_adapter()`` for
    the unsteered baseline). See :func:`sadi_peft.tasks.choice.choice_logprobs` for batching details.
    """
    labels = [_check_label(ex) for ex in examples]
    prompts = [sst2_prompt(ex["text"]) for ex in examples]
    return choice_accuracy(
        model, tokenizer, prompts, SST2_LABEL_WORDS, labels, batch_size=batch_size, progress=progress,
        desc="SST-2 accuracy",
    )


# ------------------------------------------------------------------------------------------ Task interface
_ROLE_TO_SPLIT = {"pairs": "train", "validation": "dev", "test": "test"}


def sst2_example(example: Mapping[str, Any], ident: str = "") -> Example:
    """An :class:`~sadi_peft.tasks.Example` from a ``{"text", "label"}`` dict of :func:`load_sst2`."""
    label = _check_label(example)
    return Example(
        prompt=sst2_prompt(example["text"]), choices=SST2_LABEL_WORDS, label=label, id=ident,
        meta={"text": example["text"]},
    )


def load_sst2_examples(split: str, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """SST-2 split role (``pairs`` = train, ``validation`` = dev, ``test`` = test) as :class:`Example` objects."""
    suffix = _ROLE_TO_SPLIT[normalize_split(split)]
    return [
        sst2_example(ex, f"sst2/stsa.binary.{suffix}:{i}")
        for i, ex in enumerate(load_sst2(suffix, data_dir), start=1)
    ]


register_task(
    "sst2",
    lambda: Task(
        name="sst2",
        description="SST-2 binary sentiment, answers Positive/Negative",
        loader=lambda role, data_dir: load_sst2_examples(role, data_dir),
        split_sources={
            "pairs": "sst2/stsa.binary.train",
            "validation": "sst2/stsa.binary.dev",
            "test": "sst2/stsa.binary.test",
        },
        split_sizes={"pairs": 6920, "validation": 872, "test": 1821},
    ),
)
