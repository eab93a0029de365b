"""Atomic saving: an interrupted save never leaves a half-written adapter folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

from torch import nn


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` written to a temporary sibling folder, then renamed.

    Works for a ``PeftModel`` and for a transformers model with adapters (``save_pretrained`` of either). An
    existing folder is replaced only once the new one is complete. For a stack where SADI wraps LoRA layers, the
    LoRA file gets the key names a LoRA-only model expects (see :func:`sadi_peft.stacking.fix_saved_stack`).
    """
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), **kwargs)
        from .stacking import fix_saved_stack

        fix_saved_stack(model, tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
