"""Task layer of the SADI reproduction harness: benchmark data, prompt templates, contrastive pairs, evaluation.

* :class:`Task` / :class:`Example` (:mod:`.base`): ``task.load(split, data_dir)`` for the split roles ``pairs`` /
  ``validation`` / ``test``, ``task.pairs(examples, seed)`` for :func:`sadi_peft.calibrate`; :func:`get_task` by name:
  ``copa``, ``sst2``, ``boolq``, ``arc_easy``, ``arc_challenge``, ``mmlu`` (``mmlu:<subject>``),
  ``truthfulqa_mc1``, ``truthfulqa_mc2``, ``winogrande``, ``triviaqa``, and ``jsonl:<path>`` for your own data
  (:mod:`.custom`). Split sources, rules and sizes: :mod:`.benchmarks`.
* :func:`evaluate` (:mod:`.protocols`): ``"choice"`` (length-normalised option log-likelihood), ``"argmax"`` (the
  authors' teacher-forced full-vocabulary exact match), ``"generate"`` (greedy generation, exact match on aliases).
* :func:`require_selection_split` refuses ``"test"`` for any selection step (sadi-method.md section 8.2).
* Shared helpers: :mod:`.data` (data directory, seeded subsets and splits, Hub fallback) and :mod:`.choice`
  (first-token restricted-choice scoring used by the SST-2 demo: :func:`sst2_choice_accuracy`).

The task layer uses only the public API of :mod:`sadi_peft`; the core library never imports it.
"""

from __future__ import annotations

from . import benchmarks as _benchmarks  # noqa: F401 - registers the built-in tasks
from .base import PAIR_MODES, Example, Task, build_pairs, examples_digest, get_task, register_task, task_names
from .benchmarks import (
    ARC_CHALLENGE_SHIFTED_LINES,
    MMLU_SUBJECTS,
    load_arc,
    load_boolq,
    load_copa,
    load_mmlu,
    load_triviaqa,
    load_truthfulqa,
    load_truthfulqa_csv,
    load_winogrande,
    mmlu_task,
)
from .choice import choice_accuracy, choice_logprobs, first_token_ids
from .custom import jsonl_task, load_jsonl, write_jsonl
from .data import (
    DATA_DIR_ENV,
    SPLIT_ROLES,
    candidate_data_dirs,
    normalize_split,
    require_selection_split,
    resolve_data_dir,
    seeded_split,
    select_examples,
    split_sizes,
    task_file,
)
from .protocols import (
    PROTOCOLS,
    AnswerScore,
    evaluate,
    generate_answers,
    normalize_answer,
    normalize_argmax,
    score_answers,
)
from .sst2 import (
    SST2_LABEL_WORDS,
    SST2_SPLITS,
    SST2_TEMPLATE,
    load_sst2,
    load_sst2_examples,
    sst2_choice_accuracy,
    sst2_example,
    sst2_pairs,
    sst2_prompt,
)

__all__ = [
    "ARC_CHALLENGE_SHIFTED_LINES",
    "DATA_DIR_ENV",
    "MMLU_SUBJECTS",
    "PAIR_MODES",
    "PROTOCOLS",
    "SPLIT_ROLES",
    "SST2_LABEL_WORDS",
    "SST2_SPLITS",
    "SST2_TEMPLATE",
    "AnswerScore",
    "Example",
    "Task",
    "build_pairs",
    "candidate_data_dirs",
    "choice_accuracy",
    "choice_logprobs",
    "evaluate",
    "examples_digest",
    "first_token_ids",
    "generate_answers",
    "get_task",
    "jsonl_task",
    "load_arc",
    "load_boolq",
    "load_copa",
    "load_jsonl",
    "load_mmlu",
    "load_sst2",
    "load_sst2_examples",
    "load_triviaqa",
    "load_truthfulqa",
    "load_truthfulqa_csv",
    "load_winogrande",
    "mmlu_task",
    "normalize_answer",
    "normalize_argmax",
    "normalize_split",
    "register_task",
    "require_selection_split",
    "resolve_data_dir",
    "score_answers",
    "seeded_split",
    "select_examples",
    "split_sizes",
    "sst2_choice_accuracy",
    "sst2_example",
    "sst2_pairs",
    "sst2_prompt",
    "task_file",
    "task_names",
    "write_jsonl",
]
