"""Data loader for the ``sadi_copa`` lm-evaluation-harness task (referenced as ``!function utils.load_copa``).

Deliberately imports nothing from ``sadi_peft`` (importing it would register the SADI PEFT type as a side effect
of loading a task, hiding whether the caller did so) and never touches the Hugging Face Hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "SADI_DATA_DIR"
METADATA_KEY = "sadi_data_dir"
SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}
FIELDS = ("premise", "choice1", "choice2", "question", "label", "idx")

#: ``sadi_copa.yaml``'s ``doc_to_text`` as a ``str.format`` template, for building calibration pairs with the very
#: prompt lm-eval scores: ``(COPA_TEMPLATE.format(**row), CHOICES[row["label"]], CHOICES[1 - row["label"]])``.
COPA_TEMPLATE = (
    "Question:\n{premise} Based on the previous passage, choose the most reasonable {question}.\n"
    "A:{choice1}\nB:{choice2}\n\nAnswer:"
)
#: The answer strings (lm-eval prepends the target delimiter " ").
CHOICES = ("A", "B")

# <repo>/sadi_peft/lm_eval_tasks/utils.py -> <repo>
_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory holding ``copa/``: ``data_dir``, else ``$SADI_DATA_DIR``, else ``../shared/data``."""
    if data_dir:
        source, candidates = "sadi_data_dir", [Path(data_dir).expanduser()]
    elif os.environ.get(DATA_DIR_ENV, "").strip():
        source, candidates = f"${DATA_DIR_ENV}", [Path(os.environ[DATA_DIR_ENV].strip()).expanduser()]
    else:
        source = "../shared/data"
        candidates = [Path.cwd().parent / "shared" / "data", _REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if (candidate / "copa").is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c / "copa") for c in candidates)
    raise FileNotFoundError(
        f"sadi_copa: no COPA data folder found (from {source}; looked for {tried}). Pass the folder that contains "
        f"copa/{{train,val,test}}.jsonl with `sadi-peft lm-eval --sadi-data-dir DIR`, lm-eval's "
        f"`--metadata {METADATA_KEY}=DIR`, or the environment variable {DATA_DIR_ENV}=DIR."
    )


def read_split(data_dir: str | os.PathLike[str] | None, split: str) -> list[dict[str, Any]]:
    """The rows of one COPA split (``train``, ``validation`` or ``test``) as dicts with :data:`FIELDS`."""
    path = find_data_dir(data_dir) / "copa" / SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"sadi_copa: expected the COPA {split} file {path}, which does not exist.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [key for key in FIELDS if key not in row]
            if missing or row["label"] not in (0, 1):
                raise ValueError(f"sadi_copa: {path}:{number} is not a COPA row (missing {missing} or bad label).")
            rows.append({key: row[key] for key in FIELDS})
    return rows


def load_copa(**metadata: Any):
    """``custom_dataset`` hook: lm-eval calls it with the task metadata merged with ``--model_args`` and
    ``--metadata``; only ``sadi_data_dir`` is read, everything else is ignored."""
    import datasets

    data_dir = metadata.get(METADATA_KEY)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(read_split(data_dir, split)) for split in SPLIT_FILES}
    )
