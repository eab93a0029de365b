"""Task data, prompt templates, contrastive pairs and restricted-choice evaluation for SADI.

Each task module (currently :mod:`sadi_peft.tasks.sst2`) provides a loader returning a list of dicts, a prompt
function, a pair builder producing ``(prompt, correct answer, wrong answer)`` triples for
:func:`sadi_peft.calibrate`, and a restricted-choice accuracy function. Shared helpers live in
:mod:`sadi_peft.tasks.data` (data directory, seeded subsets) and :mod:`sadi_peft.tasks.choice` (scoring).
"""

from __future__ import annotations

from .choice import choice_accuracy, choice_logprobs, first_token_ids
from .data import DATA_DIR_ENV, candidate_data_dirs, resolve_data_dir, select_examples, task_file
from .sst2 import (
    SST2_LABEL_WORDS,
    SST2_SPLITS,
    SST2_TEMPLATE,
    load_sst2,
    sst2_choice_accuracy,
    sst2_pairs,
    sst2_prompt,
)

__all__ = [
    "DATA_DIR_ENV",
    "SST2_LABEL_WORDS",
    "SST2_SPLITS",
    "SST2_TEMPLATE",
    "candidate_data_dirs",
    "choice_accuracy",
    "choice_logprobs",
    "first_token_ids",
    "load_sst2",
    "resolve_data_dir",
    "select_examples",
    "sst2_choice_accuracy",
    "sst2_pairs",
    "sst2_prompt",
    "task_file",
]
