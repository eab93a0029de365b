"""lm-evaluation-harness task configs for SADI (``sadi_copa``), usable with ``--include_path``.

* :func:`task_dir` is this folder; ``lm-eval ... --include_path <task_dir()> --tasks sadi_copa`` reads the data
  from ``$SADI_DATA_DIR`` / ``../shared/data`` / ``--metadata sadi_data_dir=DIR`` (see ``utils.py``).
* :func:`write_include_dir` writes a copy of the tasks with an absolute data directory baked in, for runs whose
  working directory or environment you do not control (plain ``lm_eval``, a scheduler, a notebook).

The task YAML is read by lm-eval, not imported; ``utils.py`` is loaded by lm-eval from its file path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from . import utils as _utils

__all__ = ["TASK_NAMES", "task_dir", "write_include_dir"]

#: Task names defined in this folder.
TASK_NAMES = ("sadi_copa",)

_METADATA_LINE = "metadata:\n  version: 1.0\n"


def task_dir() -> Path:
    """The folder holding the bundled task YAMLs (pass it to lm-eval's ``--include_path``)."""
    return Path(__file__).resolve().parent


def write_include_dir(
    data_dir: Optional[str | os.PathLike[str]] = None, dest: Optional[str | os.PathLike[str]] = None
) -> Path:
    """Write the SADI tasks into ``dest`` (a new temporary folder when ``None``) with ``data_dir`` baked in.

    Args:
        data_dir: Folder holding ``copa/{train,val,test}.jsonl``; default ``$SADI_DATA_DIR`` or ``../shared/data``.
            Resolved to an absolute path and checked now, so a wrong path fails here rather than inside lm-eval.
        dest: Target folder (created if needed; existing task files in it are overwritten).

    Returns:
        The folder, for lm-eval's ``--include_path`` (or ``TaskManager(include_path=...)``).
    """
    resolved = _utils.find_data_dir(data_dir)
    for split in _utils.SPLIT_FILES.values():
        if not (resolved / "copa" / split).is_file():
            raise FileNotFoundError(f"{resolved / 'copa' / split} does not exist; {resolved} is not a COPA data folder.")
    target = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="sadi_lm_eval_tasks-"))
    target.mkdir(parents=True, exist_ok=True)
    source = task_dir()
    shutil.copyfile(source / "utils.py", target / "utils.py")
    for name in TASK_NAMES:
        text = (source / f"{name}.yaml").read_text(encoding="utf-8")
        if _METADATA_LINE not in text:  # pragma: no cover - guards edits of the YAML
            raise RuntimeError(f"{name}.yaml lost its '{_METADATA_LINE.strip()}' block; update write_include_dir.")
        baked = _METADATA_LINE + f"  {_utils.METADATA_KEY}: {json.dumps(str(resolved))}\n"
        (target / f"{name}.yaml").write_text(text.replace(_METADATA_LINE, baked), encoding="utf-8")
    return target
