"""What the results scripts share: writing a result file atomically, reading a task's stored rows back, and the
paired comparison of two rows on the same test examples.

The scripts are not a package; each one runs with this folder first on ``sys.path`` (Python puts a script's own
folder there), so ``from _results import ...`` works from any of them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from sadi_peft.cli.report import bootstrap_interval, mcnemar_p


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, so no reader or stopped run ever
    sees a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def row_metric(record: dict) -> str:
    """The metric a stored row reports; rows written before results named their metric are accuracy rows, except
    TruthfulQA MC2's probability mass."""
    return record.get("metric") or ("mc2" if record.get("task") == "truthfulqa_mc2" else "accuracy")


def load_rows(task_folder: Path, metrics: Sequence[str] = ("accuracy",)) -> dict[str, dict]:
    """The stored restricted-choice rows of one task folder that report one of ``metrics`` and carry per-example
    values, by method (failed runs' ``.error.json`` files left out)."""
    rows = {}
    for path in sorted(task_folder.glob("*.json")):
        if path.name.endswith(".error.json"):
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        if "per_example" in record and row_metric(record) in metrics and record.get("protocol") == "choice":
            rows[record["method"]] = record
    return rows


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a`` minus ``b`` on the same examples: the mean difference, its paired bootstrap 95 % interval, the
    discordant counts and, when every value is 0 or 1, the exact McNemar p (``None`` otherwise)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same, non-zero number of examples; got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_interval(differences)
    only_a, only_b = sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))
    binary = all(v in (0, 1) for v in (*a, *b))
    return {"difference": sum(differences) / len(differences), "interval": [low, high], "only_first": only_a,
            "only_second": only_b, "mcnemar_p": mcnemar_p(only_a, only_b) if binary else None}


def emit(text: str, out: Path | None) -> None:
    """Print a rendered table and, with ``--out``, also write it to that file."""
    sys.stdout.write(text)
    if out is not None:
        out.write_text(text, encoding="utf-8")
