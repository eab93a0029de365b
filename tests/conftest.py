"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the converted SmolLM2-135M-Instruct demo checkpoint (converted once into the cache dir)."""
    from sadi_peft.zoo import MissingDependencyError, resolve_model_path

    try:
        return resolve_model_path()
    except MissingDependencyError as exc:
        pytest.skip(f"demo model unavailable: {exc}")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The task data directory ($SADI_DATA_DIR or ../shared/data)."""
    from sadi_peft.tasks.data import resolve_data_dir

    try:
        return resolve_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"task data unavailable: {exc}")


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_path):
    """The demo model's tokenizer, with its EOS as pad token (batched scoring needs one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
