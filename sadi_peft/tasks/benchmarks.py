"""Benchmark loaders and task definitions: COPA, BoolQ, ARC-Easy, ARC-Challenge, MMLU, TruthfulQA MC1/MC2,
Winogrande and TriviaQA (SST-2 lives in :mod:`sadi_peft.tasks.sst2`).

Data comes from ``<data_dir>/<dataset>/`` (see :func:`sadi_peft.tasks.data.resolve_data_dir`; the bundled copy is
``../shared/data``, whose per-dataset READMEs describe formats and quirks). When no directory is named or found and
``datasets`` is installed and online, BoolQ, ARC, MMLU, TruthfulQA and Winogrande fall back to their Hugging Face Hub
copies; COPA (the labeled test set) and TriviaQA (llm-foundry's 3,000-question subsample) have no identical Hub copy
and do not.

Split roles and sizes on the bundled data (``pairs`` = calibration-pair source, ``validation`` = selection of K and
delta, ``test`` = final evaluation; :func:`~sadi_peft.tasks.data.require_selection_split` refuses ``test`` for
selection). "hash 20/20/60" is :func:`~sadi_peft.tasks.data.seeded_split`: examples ranked by
``sha256("sadi-peft/split/v1/<dataset>|0|<key>")`` (key: the item's text -- BoolQ passage + question, ARC
stem + gold answer text, MMLU subject + question + options, TruthfulQA question, Winogrande options + continuation,
TriviaQA question), the first
``floor(0.2 N)`` -> pairs, the next ``floor(0.2 N)`` -> validation, the rest -> test, each part in file order. The
tests pin these sizes and a digest of the ids in every part. The ``pairs`` parts hold every candidate; the
number of pairs N is drawn from them by later code (e.g. :func:`~sadi_peft.tasks.data.select_examples`).

================  =====================================================  =======  ==========  =====
task              source -> split rule                                     pairs    validation  test
================  =====================================================  =======  ==========  =====
copa              train.jsonl / val.jsonl / test.jsonl (official)             400         100    500
sst2              stsa.binary.train / .dev / .test (official)                6920         872   1821
boolq             validation.jsonl (3270), hash 20/20/60                      654         654   1962
arc_easy          arc_easy_test.jsonl (2376), hash 20/20/60                   475         475   1426
arc_challenge     arc_challenge_test.jsonl (1172, 20 golds fixed), 20/20/60   234         234    704
mmlu              pairs = dev (5 x 57); test per subject hash 0/20/80         285        2792  11250
truthfulqa_mc1    mc_task.json (817), hash 20/20/60 on the question           163         163    491
truthfulqa_mc2    same questions and parts as truthfulqa_mc1                  163         163    491
winogrande        dev.jsonl (1267), hash 20/20/60                             253         253    761
triviaqa          triviaqa_sm_sub.jsonl (3000), hash 20/20/60                 600         600   1800
================  =====================================================  =======  ==========  =====

Per-task decisions (prompt templates from sadi-method.md section 5 where the authors give one):

* **COPA** -- template ending in ``Answer:\\n`` (kept verbatim; the protocols strip it like ``calibrate`` does unless
  ``strip_prompt=False``), answers ``A`` / ``B``. The official 400/100/500 split (SuperGLUE train/val, COPA test).
* **BoolQ** -- ``query`` is split back into passage and question (on the *last* ``"\\nQuestion: "``; the appended ``?``
  is dropped, so the question reads as in the original release). Answers ``No`` / ``Yes`` (label 0 / 1).
* **ARC** -- no authors' template: the MMLU one with the ARC stem. The processed files (always 4 choices) are used for
  both levels. In ``arc_challenge_test.jsonl`` the 20 rows listed in ``arc/README.md`` have ``gold`` one position too
  far; the loader sets ``gold - 1`` there (``meta["gold_fixed"] = True``). The other 1150 rows agree with
  ``original_format/ARC-Challenge-Test.jsonl`` (checked in the tests); the original-format files are otherwise unused.
  ARC-Easy may hold the same shift on its digit-keyed items, but without ids they cannot be located (README), so
  ARC-Easy is used as is.
* **MMLU** -- 57 subjects, template of section 5, answers ``A``-``D``. The 5-per-subject ``dev`` items (the usual
  few-shot exemplars) are the zero-shot pair source, so no evaluated item is ever a calibration item (the authors
  calibrated on the evaluated test items, section 8.2); each subject's test items are cut 20 % validation / 80 %
  test by hash. ``mmlu_task(subjects)`` / ``get_task("mmlu:<subject>")`` restrict to subjects.
* **TruthfulQA** -- prompt = the standard TruthfulQA QA primer (six Q/A pairs, as in lm-eval's ``truthfulqa_mc``)
  + ``Q: {question}\\nA:``; choices are the full answer strings of ``mc1_targets`` / ``mc2_targets``. MC1: is the
  single true answer ranked first. MC2: normalised probability mass on the true answers. Pairs: MC1 gold vs a seeded
  random false answer; MC2 a seeded random true vs a seeded random false answer. ``Type`` and ``Category`` are
  joined from ``TruthfulQA.csv`` (read with ``utf-8-sig`` for the BOM; joined on the stripped question).
* **Winogrande** -- ``option1``/``option2`` and the ``_`` sentence are recovered from ``context_options`` word by
  word (README recipe; no space before a continuation that starts with punctuation). Answers ``A`` / ``B``.
* **TriviaQA** -- prompt = the file's ``context`` (``Question: ...\\nAnswer:``), ``choices = (answer,)``,
  ``answers`` = the aliases; pairs are gold answer vs the empty string. ``calibrate`` reads the negative as
  ``prompt.strip() + " "``, i.e. the prompt's tokens plus one lone-space token (SmolLM2: ``Ġ``), whose activations
  are recorded -- literally the "blank space" of the review post, not the bare prompt. Default protocol: greedy
  generation and exact match against the normalised aliases.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

from .base import Example, Task, register_task
from .data import hub_allowed, load_from_hub, resolve_data_dir, seeded_split, task_file

__all__ = [
    "ARC_CHALLENGE_SHIFTED_LINES",
    "BOOLQ_TEMPLATE",
    "COPA_TEMPLATE",
    "MC_TEMPLATE",
    "MMLU_SUBJECTS",
    "TRUTHFULQA_PRIMER",
    "WINOGRANDE_TEMPLATE",
    "arc_prompt",
    "load_arc",
    "load_boolq",
    "load_copa",
    "load_mmlu",
    "load_triviaqa",
    "load_truthfulqa",
    "load_truthfulqa_csv",
    "load_winogrande",
    "mmlu_task",
]

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"

# ------------------------------------------------------------------------------------------------- templates
#: sadi-method.md section 5 (weixuan-wang123/SADI ``load_dataset.py``).
COPA_TEMPLATE = (
    "Question:\n{premise} Based on the previous passage, choose the most reasonable {question}.\n"
    "A:{choice1}\nB:{choice2}\n\nAnswer:\n"
)
BOOLQ_TEMPLATE = (
    "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'.\n\n"
    "Passage: {passage}\n\nQuestion: {question}\n\nAnswer:"
)
WINOGRANDE_TEMPLATE = (
    "Please fill in the blanks. Write A or B as the answer.\n\n"
    "Sentence: {sentence}\nA. {option1}\nB. {option2}\nAnswer:"
)
#: The MMLU template (section 5), also used for ARC.
MC_TEMPLATE = (
    "Question: {question}\nWhich of the following answers is correct?\n{options}\n"
    "State the letter corresponding to the correct answer.\nAnswer:"
)
#: The TruthfulQA "QA" primer (Lin et al. 2021, ``presets.py``), the usual few-shot prefix for MC1/MC2.
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
TRUTHFULQA_TEMPLATE = "{primer}\n\nQ: {question}\nA:"

#: 1-based lines of ``arc/arc_challenge_test.jsonl`` whose ``gold`` is one position after the correct choice.
ARC_CHALLENGE_SHIFTED_LINES = frozenset(
    {45, 136, 314, 386, 428, 438, 445, 454, 547, 671, 826, 846, 858, 887, 954, 964, 976, 1093, 1114, 1153}
)

#: The 57 MMLU subjects (file names without ``_test.csv``).
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)  # fmt: skip


def mc_prompt(question: str, options: Sequence[str]) -> str:
    """Fill :data:`MC_TEMPLATE`: ``A. <option>`` lines."""
    lines = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
    return MC_TEMPLATE.format(question=question.strip(), options=lines)


arc_prompt = mc_prompt


# ---------------------------------------------------------------------------------------------------- helpers
def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    from .base import read_jsonl  # noqa: PLC0415

    return read_jsonl(path)


def _local_or_hub(
    folder: str,
    file_name: str,
    data_dir: Optional[Path],
    parse: Callable[[Path], list[Example]],
    hub: Optional[Callable[[FileNotFoundError], list[Example]]],
) -> list[Example]:
    try:
        path = task_file(folder, file_name, data_dir)
    except FileNotFoundError as exc:
        if hub is not None and hub_allowed(data_dir):
            return hub(exc)
        raise
    return parse(path)


def _local_only(folder: str, file_name: str, data_dir: Optional[Path], why: str) -> Path:
    try:
        return task_file(folder, file_name, data_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc} There is no Hugging Face Hub fallback for {folder}/{file_name}: {why}"
        ) from None


def _require(row: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; see the dataset README for the expected format.")


# ------------------------------------------------------------------------------------------------------- COPA
_COPA_FILES = {"pairs": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}
_COPA_ID_OFFSET = {"train.jsonl": 1, "val.jsonl": 401, "test.jsonl": 501}


def _copa_example(row: Mapping[str, Any], ident: str, copa_id: Optional[int]) -> Example:
    if row["question"] not in ("cause", "effect") or row["label"] not in (0, 1):
        raise ValueError(
            f"{ident}: expected question cause/effect and label 0/1, got {row['question']!r}, {row['label']!r}."
        )
    prompt = COPA_TEMPLATE.format(
        premise=row["premise"], question=row["question"], choice1=row["choice1"], choice2=row["choice2"]
    )
    meta = {k: row[k] for k in ("premise", "choice1", "choice2", "question")}
    meta["copa_id"] = copa_id
    return Example(prompt=prompt, choices=("A", "B"), label=int(row["label"]), id=ident, meta=meta)


def load_copa(split: str, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """COPA split role -> ``copa/train.jsonl`` (pairs, 400), ``val.jsonl`` (validation, 100), ``test.jsonl`` (500)."""
    from .data import normalize_split  # noqa: PLC0415

    file_name = _COPA_FILES[normalize_split(split)]
    path = _local_only("copa", file_name, _opt_path(data_dir), "the Hub copies of COPA have no test labels.")
    examples = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _require(row, ("premise", "choice1", "choice2", "question", "label", "idx"), where)
        examples.append(_copa_example(row, f"copa/{file_name}:{lineno}", int(row["idx"]) + _COPA_ID_OFFSET[file_name]))
    return examples


# ------------------------------------------------------------------------------------------------------ BoolQ
def _boolq_example(passage: str, question: str, label: int, ident: str) -> Example:
    prompt = BOOLQ_TEMPLATE.format(passage=passage.strip(), question=question.strip())
    return Example(
        prompt=prompt, choices=("No", "Yes"), label=label, id=ident, meta={"passage": passage, "question": question}
    )


def _parse_boolq(path: Path) -> list[Example]:
    examples = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _require(row, ("query", "choices", "gold"), where)
        query = row["query"]
        if not query.startswith("Passage: ") or "\nQuestion: " not in query or row["gold"] not in (0, 1):
            raise ValueError(f"{where}: not in the processed BoolQ format (see boolq/README.md).")
        passage, _, question = query[len("Passage: ") :].rpartition("\nQuestion: ")
        question = question[:-1] if question.endswith("?") else question
        examples.append(_boolq_example(passage, question, int(row["gold"]), f"boolq/validation.jsonl:{lineno}"))
    return examples


def _boolq_from_hub(not_found: FileNotFoundError) -> list[Example]:
    rows = load_from_hub("google/boolq", None, "validation", not_found)
    return [
        _boolq_example(str(r["passage"]), str(r["question"]), int(bool(r["answer"])), f"boolq/hub:{i + 1}")
        for i, r in enumerate(rows)
    ]


def load_boolq(data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """All 3270 BoolQ validation questions (``boolq/validation.jsonl``), in file order."""
    return _local_or_hub("boolq", "validation.jsonl", _opt_path(data_dir), _parse_boolq, _boolq_from_hub)


def _boolq_key(ex: Example) -> str:
    return f"{ex.meta['passage']}\n{ex.meta['question']}"


# -------------------------------------------------------------------------------------------------------- ARC
_ARC_FILES = {"easy": "arc_easy_test.jsonl", "challenge": "arc_challenge_test.jsonl"}
_ARC_HUB = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}


def _arc_example(stem: str, choices: Sequence[str], gold: int, ident: str, **meta: Any) -> Example:
    letters = tuple(LETTERS[: len(choices)])
    return Example(
        prompt=mc_prompt(stem, choices),
        choices=letters,
        label=gold,
        id=ident,
        meta={"question": stem, "options": list(choices), "answer_text": choices[gold], **meta},
    )


def _parse_arc(level: str, path: Path) -> list[Example]:
    examples = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _require(row, ("query", "choices", "gold"), where)
        choices = [str(c) for c in row["choices"]]
        gold = row["gold"]
        if not isinstance(gold, int) or not 0 <= gold < len(choices) or not row["query"].startswith("Question: "):
            raise ValueError(f"{where}: not in the processed ARC format (see arc/README.md).")
        fixed = level == "challenge" and lineno in ARC_CHALLENGE_SHIFTED_LINES
        if fixed:
            gold -= 1
        stem = row["query"][len("Question: ") :]
        examples.append(_arc_example(stem, choices, gold, f"arc/{path.name}:{lineno}", gold_fixed=fixed))
    return examples


def _arc_from_hub(level: str, not_found: FileNotFoundError) -> list[Example]:
    rows = load_from_hub("allenai/ai2_arc", _ARC_HUB[level], "test", not_found)
    examples = []
    for i, r in enumerate(rows):
        labels = list(r["choices"]["label"])
        gold = labels.index(r["answerKey"])
        examples.append(_arc_example(str(r["question"]), list(r["choices"]["text"]), gold, f"arc/hub-{level}:{i + 1}"))
    return examples


def load_arc(level: str, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """All ARC test questions of ``level`` (``"easy"``: 2376, ``"challenge"``: 1172, 20 shifted golds fixed)."""
    if level not in _ARC_FILES:
        raise ValueError(f"Unknown ARC level {level!r}; expected 'easy' or 'challenge'.")
    return _local_or_hub(
        "arc", _ARC_FILES[level], _opt_path(data_dir), partial(_parse_arc, level), partial(_arc_from_hub, level)
    )


def _arc_key(ex: Example) -> str:
    return f"{ex.meta['question']}\n{ex.meta['answer_text']}"


# ------------------------------------------------------------------------------------------------------- MMLU
def _mmlu_example(subject: str, question: str, options: Sequence[str], answer: int, ident: str) -> Example:
    return Example(
        prompt=mc_prompt(question, options),
        choices=("A", "B", "C", "D"),
        label=answer,
        id=ident,
        meta={"subject": subject, "question": question, "options": list(options)},
    )


def _parse_mmlu_csv(path: Path, subject: str, part: str) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8", newline="") as handle:  # newline="": quoted fields may hold (CR)LF
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != ["question", "choice0", "choice1", "choice2", "choice3", "answer"]:
            raise ValueError(f"{path}: expected the header question,choice0..choice3,answer, got {header!r}.")
        for rownum, row in enumerate(reader, start=1):
            if len(row) != 6 or row[5].strip() not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}: row {rownum} is not question,4 choices,answer 0-3: {row!r:.120}.")
            examples.append(_mmlu_example(subject, row[0], row[1:5], int(row[5]), f"mmlu/{part}/{path.name}:{rownum}"))
    return examples


def _mmlu_from_hub(part: str, subjects: Sequence[str], not_found: FileNotFoundError) -> list[Example]:
    rows = load_from_hub("cais/mmlu", "all", part, not_found)
    wanted = set(subjects)
    counters: dict[str, int] = {}
    examples = []
    for r in rows:
        subject = str(r["subject"])
        if subject not in wanted:
            continue
        counters[subject] = counters.get(subject, 0) + 1
        examples.append(
            _mmlu_example(subject, str(r["question"]), [str(c) for c in r["choices"]], int(r["answer"]),
                          f"mmlu/hub-{part}/{subject}:{counters[subject]}")
        )
    examples.sort(key=lambda ex: MMLU_SUBJECTS.index(ex.meta["subject"]))  # stable: subject order, then row order
    return examples


def _check_subjects(subjects: Optional[Iterable[str]]) -> tuple[str, ...]:
    if subjects is None:
        return MMLU_SUBJECTS
    chosen = tuple(dict.fromkeys(subjects))
    unknown = [s for s in chosen if s not in MMLU_SUBJECTS]
    if unknown or not chosen:
        raise ValueError(
            f"Unknown MMLU subject(s) {unknown or chosen!r}; expected names from MMLU_SUBJECTS, e.g. 'anatomy'."
        )
    return tuple(s for s in MMLU_SUBJECTS if s in chosen)


def load_mmlu(
    part: str, data_dir: str | os.PathLike[str] | None = None, subjects: Optional[Iterable[str]] = None
) -> list[Example]:
    """MMLU ``part`` (``"dev"``: 285, ``"test"``: 14042) for ``subjects`` (default all 57), subject by subject.

    Read with the csv module (quoted fields span lines); ``answer`` is an int 0-3; every other column is text.
    """
    if part not in ("dev", "test"):
        raise ValueError(f"Unknown MMLU part {part!r}; expected 'dev' or 'test'.")
    chosen = _check_subjects(subjects)
    path_dir = _opt_path(data_dir)
    try:
        root = resolve_data_dir(path_dir)
        folder = root / "mmlu" / part
        if not folder.is_dir():
            task_file("mmlu", f"{part}/{chosen[0]}_{part}.csv", path_dir)  # raises with the expected path
    except FileNotFoundError as exc:
        if hub_allowed(path_dir):
            return _mmlu_from_hub(part, chosen, exc)
        raise
    examples: list[Example] = []
    for subject in chosen:
        path = task_file("mmlu", f"{part}/{subject}_{part}.csv", path_dir)
        examples.extend(_parse_mmlu_csv(path, subject, part))
    return examples


def _mmlu_key(ex: Example) -> str:
    return "\n".join([ex.meta["subject"], ex.meta["question"], *ex.meta["options"]])


# ------------------------------------------------------------------------------------------------- TruthfulQA
def load_truthfulqa_csv(data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, str]]:
    """``truthfulqa/TruthfulQA.csv`` rows as dicts (817; read with ``utf-8-sig`` so the BOM is not in the header)."""
    path = task_file("truthfulqa", "TruthfulQA.csv", data_dir)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "Type" not in rows[0]:
        raise ValueError(f"{path}: expected the columns Type, Category, Question, ...; got {list(rows[0])}.")
    return rows


def _truthfulqa_examples(entries: Sequence[Mapping[str, Any]], mode: str, source: str, csv_meta) -> list[Example]:
    examples = []
    for i, entry in enumerate(entries, start=1):
        question = str(entry["question"]).strip()
        targets = entry[f"{mode}_targets"]
        if isinstance(targets, Mapping) and "choices" in targets:  # Hub layout: {"choices": [...], "labels": [...]}
            choices, labels = list(targets["choices"]), [int(x) for x in targets["labels"]]
        else:
            choices, labels = list(targets), [int(v) for v in targets.values()]
        trues = tuple(j for j, v in enumerate(labels) if v == 1)
        if not trues or len(trues) == len(labels) or (mode == "mc1" and len(trues) != 1):
            need = "exactly one true answer" if mode == "mc1" else "at least one true and one false answer"
            raise ValueError(f"{source} entry {i}: {mode}_targets must mark {need}.")
        meta = {"question": question, **csv_meta.get(question, {})}
        examples.append(
            Example(
                prompt=TRUTHFULQA_TEMPLATE.format(primer=TRUTHFULQA_PRIMER, question=question),
                choices=tuple(choices),
                label=trues[0],
                true_labels=trues if mode == "mc2" else (),
                id=f"truthfulqa/{source}:{i}",
                meta=meta,
            )
        )
    return examples


def load_truthfulqa(mode: str, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """All 817 TruthfulQA questions as ``mode`` (``"mc1"`` or ``"mc2"``) examples, in ``mc_task.json`` order."""
    if mode not in ("mc1", "mc2"):
        raise ValueError(f"Unknown TruthfulQA mode {mode!r}; expected 'mc1' or 'mc2'.")
    path_dir = _opt_path(data_dir)

    def parse(path: Path) -> list[Example]:
        with path.open(encoding="utf-8-sig") as handle:
            entries = json.load(handle)
        try:
            meta = {row["Question"].strip(): {"type": row["Type"], "category": row["Category"]}
                    for row in load_truthfulqa_csv(path_dir)}
        except FileNotFoundError:
            meta = {}
        return _truthfulqa_examples(entries, mode, "mc_task.json", meta)

    def hub(not_found: FileNotFoundError) -> list[Example]:
        rows = load_from_hub("truthfulqa/truthful_qa", "multiple_choice", "validation", not_found)
        return _truthfulqa_examples(list(rows), mode, "hub", {})

    return _local_or_hub("truthfulqa", "mc_task.json", path_dir, parse, hub)


def _question_key(ex: Example) -> str:
    return ex.meta["question"]


# ------------------------------------------------------------------------------------------------- Winogrande
def winogrande_fields(context_options: Sequence[str], continuation: str) -> tuple[str, str, str]:
    """Recover ``(sentence with _, option1, option2)`` from the processed row (winogrande/README.md recipe)."""
    words = [c.split(" ") for c in context_options]
    k = 0
    while k < min(len(w) for w in words) - 1 and words[0][k] == words[1][k]:
        k += 1
    shared = " ".join(words[0][:k])
    option1, option2 = " ".join(words[0][k:]), " ".join(words[1][k:])
    cont = continuation.strip()
    joiner = "" if cont[:1] in (".", "'", ",", "!", "?", ";", ":") else " "
    sentence = (shared + " " if shared else "") + "_" + joiner + cont
    return sentence, option1, option2


def _winogrande_example(sentence: str, option1: str, option2: str, label: int, ident: str) -> Example:
    prompt = WINOGRANDE_TEMPLATE.format(sentence=sentence, option1=option1, option2=option2)
    return Example(
        prompt=prompt, choices=("A", "B"), label=label, id=ident,
        meta={"sentence": sentence, "option1": option1, "option2": option2},
    )


def _parse_winogrande(path: Path) -> list[Example]:
    examples = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _require(row, ("context_options", "continuation", "gold"), where)
        if len(row["context_options"]) != 2 or row["gold"] not in (0, 1):
            raise ValueError(f"{where}: expected 2 context_options and gold 0/1.")
        sentence, o1, o2 = winogrande_fields(row["context_options"], row["continuation"])
        examples.append(_winogrande_example(sentence, o1, o2, int(row["gold"]), f"winogrande/dev.jsonl:{lineno}"))
    return examples


def _winogrande_from_hub(not_found: FileNotFoundError) -> list[Example]:
    rows = load_from_hub("allenai/winogrande", "winogrande_xl", "validation", not_found)
    return [
        _winogrande_example(str(r["sentence"]), str(r["option1"]), str(r["option2"]), int(r["answer"]) - 1,
                            f"winogrande/hub:{i + 1}")
        for i, r in enumerate(rows)
    ]


def load_winogrande(data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """All 1267 WinoGrande 1.1 dev problems (``winogrande/dev.jsonl``), in file order."""
    return _local_or_hub("winogrande", "dev.jsonl", _opt_path(data_dir), _parse_winogrande, _winogrande_from_hub)


def _winogrande_key(ex: Example) -> str:
    m = ex.meta
    return f"{m['option1']}|{m['option2']}|{m['sentence'].split('_', 1)[-1].strip()}"


# --------------------------------------------------------------------------------------------------- TriviaQA
def load_triviaqa(data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """All 3000 TriviaQA questions (``triviaqa/triviaqa_sm_sub.jsonl``); ``answers`` are the aliases."""
    path = _local_only(
        "triviaqa",
        "triviaqa_sm_sub.jsonl",
        _opt_path(data_dir),
        "llm-foundry's 3,000-question subsample is not on the Hub.",
    )
    examples = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        _require(row, ("context", "answer", "aliases"), where)
        aliases = tuple(str(a) for a in row["aliases"])
        if not aliases or not str(row["answer"]).strip():
            raise ValueError(f"{where}: empty answer or aliases.")
        examples.append(
            Example(
                prompt=row["context"],
                choices=(str(row["answer"]),),
                label=0,
                answers=aliases,
                id=f"triviaqa/triviaqa_sm_sub.jsonl:{lineno}",
                meta={"question": row["context"]},
            )
        )
    return examples


# ---------------------------------------------------------------------------------------------------- tasks
def _opt_path(data_dir: str | os.PathLike[str] | None) -> Optional[Path]:
    return None if data_dir is None else Path(data_dir)


def _split_loader(load_all: Callable[[Optional[Path]], list[Example]], key: Callable[[Example], str], salt: str):
    def loader(role: str, data_dir: Optional[Path]) -> list[Example]:
        return seeded_split(load_all(data_dir), key, salt=f"sadi-peft/split/v1/{salt}")[role]

    return loader


def _mmlu_loader(subjects: tuple[str, ...]):
    def loader(role: str, data_dir: Optional[Path]) -> list[Example]:
        if role == "pairs":
            return load_mmlu("dev", data_dir, subjects)
        test = load_mmlu("test", data_dir, subjects)
        chosen: list[Example] = []
        for subject in subjects:
            rows = [ex for ex in test if ex.meta["subject"] == subject]
            parts = seeded_split(rows, _mmlu_key, salt="sadi-peft/split/v1/mmlu", pairs_fraction=0.0,
                                 validation_fraction=0.2)
            chosen.extend(parts[role])
        return chosen

    return loader


def _hash_sources(file: str, n: int) -> dict[str, str]:
    return {role: f"{file} ({n}), hash 20/20/60 -> {role}" for role in ("pairs", "validation", "test")}


def mmlu_task(subjects: Optional[Iterable[str]] = None) -> Task:
    """MMLU over ``subjects`` (default: all 57): pairs = dev, validation/test = per-subject 20/80 hash cut of test."""
    chosen = _check_subjects(subjects)
    full = chosen == MMLU_SUBJECTS
    return Task(
        name="mmlu" if full else "mmlu:" + ",".join(chosen),
        description=f"MMLU, {len(chosen)} subject(s), 4-way multiple choice, answers A-D",
        loader=_mmlu_loader(chosen),
        split_sources={
            "pairs": "dev/<subject>_dev.csv (5 per subject)",
            "validation": "test/<subject>_test.csv, per subject hash 20 % (floor)",
            "test": "test/<subject>_test.csv, per subject the other 80 %",
        },
        split_sizes={"pairs": 285, "validation": 2792, "test": 11250} if full else None,
    )


def _builtin_tasks() -> dict[str, Callable[[], Task]]:
    return {
        "copa": lambda: Task(
            name="copa",
            description="COPA, 2-way causal commonsense choice, answers A/B",
            loader=lambda role, d: load_copa(role, d),
            split_sources={"pairs": "copa/train.jsonl", "validation": "copa/val.jsonl", "test": "copa/test.jsonl"},
            split_sizes={"pairs": 400, "validation": 100, "test": 500},
        ),
        "boolq": lambda: Task(
            name="boolq",
            description="BoolQ, yes/no reading comprehension, answers Yes/No",
            loader=_split_loader(load_boolq, _boolq_key, "boolq"),
            split_sources=_hash_sources("boolq/validation.jsonl", 3270),
            split_sizes={"pairs": 654, "validation": 654, "test": 1962},
        ),
        "arc_easy": lambda: Task(
            name="arc_easy",
            description="ARC-Easy, 4-way science multiple choice, answers A-D",
            loader=_split_loader(partial(load_arc, "easy"), _arc_key, "arc_easy"),
            split_sources=_hash_sources("arc/arc_easy_test.jsonl", 2376),
            split_sizes={"pairs": 475, "validation": 475, "test": 1426},
        ),
        "arc_challenge": lambda: Task(
            name="arc_challenge",
            description="ARC-Challenge, 4-way science multiple choice (20 shifted golds fixed), answers A-D",
            loader=_split_loader(partial(load_arc, "challenge"), _arc_key, "arc_challenge"),
            split_sources=_hash_sources("arc/arc_challenge_test.jsonl", 1172),
            split_sizes={"pairs": 234, "validation": 234, "test": 704},
        ),
        "mmlu": mmlu_task,
        "truthfulqa_mc1": lambda: Task(
            name="truthfulqa_mc1",
            description="TruthfulQA MC1: is the single true answer the most likely one",
            loader=_split_loader(partial(load_truthfulqa, "mc1"), _question_key, "truthfulqa"),
            split_sources=_hash_sources("truthfulqa/mc_task.json", 817),
            split_sizes={"pairs": 163, "validation": 163, "test": 491},
        ),
        "truthfulqa_mc2": lambda: Task(
            name="truthfulqa_mc2",
            description="TruthfulQA MC2: normalised probability mass on the true answers",
            loader=_split_loader(partial(load_truthfulqa, "mc2"), _question_key, "truthfulqa"),
            pair_mode="true_vs_false",
            protocols=("choice",),
            metric="mc2",
            split_sources=_hash_sources("truthfulqa/mc_task.json", 817),
            split_sizes={"pairs": 163, "validation": 163, "test": 491},
        ),
        "winogrande": lambda: Task(
            name="winogrande",
            description="WinoGrande 1.1, 2-way fill-in-the-blank, answers A/B",
            loader=_split_loader(load_winogrande, _winogrande_key, "winogrande"),
            split_sources=_hash_sources("winogrande/dev.jsonl", 1267),
            split_sizes={"pairs": 253, "validation": 253, "test": 761},
        ),
        "triviaqa": lambda: Task(
            name="triviaqa",
            description="TriviaQA (3,000-question subsample), closed-book exact match against aliases",
            loader=_split_loader(load_triviaqa, _question_key, "triviaqa"),
            pair_mode="gold_vs_empty",
            protocols=("generate", "argmax"),
            default_protocol="generate",
            metric="exact_match",
            split_sources=_hash_sources("triviaqa/triviaqa_sm_sub.jsonl", 3000),
            split_sizes={"pairs": 600, "validation": 600, "test": 1800},
        ),
    }


for _name, _factory in _builtin_tasks().items():
    register_task(_name, _factory)
