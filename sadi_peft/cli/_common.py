"""Helpers shared by the CLI sub-commands (not part of the library API)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model alias (the demo model), Hugging Face id or local folder")
    parser.add_argument("--dtype", default="float32", help="torch dtype to load the model in")
    parser.add_argument("--data-dir", default=None, help="task data folder (default: $SADI_DATA_DIR, ../shared/data)")
    parser.add_argument("--seed", type=int, default=0, help="seed for pair and example selection")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=("head", "neuron", "hidden"), default="head", help="SADI variant")
    parser.add_argument("--positions", choices=("last", "all"), default="last", help="position regime")
    parser.add_argument("--n-pairs", type=int, default=200, help="contrastive pairs drawn from the task's pair split")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for calibration and scoring")


def load_model(args: argparse.Namespace):
    import torch

    from sadi_peft.zoo import load_model_and_tokenizer

    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--dtype {args.dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
    return load_model_and_tokenizer(args.model, dtype=dtype)


def task_pairs(task, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    from sadi_peft.tasks import select_examples

    examples = task.load("pairs", args.data_dir)
    chosen = select_examples(examples, min(args.n_pairs, len(examples)), args.seed)
    return task.pairs(chosen, seed=args.seed)


def write_json(path: Path, payload: Any) -> None:
    """Atomic JSON write (temp file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
    os.replace(tmp, path)
