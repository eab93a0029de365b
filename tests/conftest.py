"""Shared pytest fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package), for testing its functions. The
    scripts folder goes on ``sys.path`` first, as when a script runs, so the scripts' shared ``_results`` imports."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
