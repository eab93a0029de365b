"""Atomic writes of folders: an interrupted save never leaves a half-written adapter folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from torch import nn

PathLike = Union[str, os.PathLike]


def replace_directory(staging: Path, target: Path) -> None:
    """Move the complete folder ``staging`` to ``target`` (same file system), replacing an existing ``target`` only
    once the new one is in place. ``staging`` gets the mode a plain ``mkdir`` would give (``mkdtemp`` makes 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


@contextlib.contextmanager
def atomic_directory(target: PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; on success it replaces ``target``, on any error (or an
    interrupt) it is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_pretrained(model: nn.Module, save_directory: PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` written to a temporary sibling folder, then renamed.

    Works for a ``PeftModel`` and for a transformers model with adapters (``save_pretrained`` of either). An
    existing folder is replaced only once the new one is complete. For a stack where SADI wraps LoRA layers, the
    LoRA file gets the key names a LoRA-only model expects (see :func:`sadi_peft.stacking.fix_saved_stack`).
    """
    from .stacking import fix_saved_stack

    with atomic_directory(save_directory) as staging:
        model.save_pretrained(str(staging), **kwargs)
        fix_saved_stack(model, staging)
    return Path(save_directory)
