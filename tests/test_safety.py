"""Safety of loading: no pickle path in the project's code, and an adapter_config.json cannot make anything import
code it names."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import PAIRS, CharTokenizer, tiny_llama
from transformers import AutoModelForCausalLM

import sadi_peft

REPO = Path(__file__).resolve().parents[1]
SCANNED = ["sadi_peft", "scripts", "examples", "benchmarks", "tests"]


def _python_files():
    for folder in SCANNED:
        yield from sorted((REPO / folder).rglob("*.py"))


def _calls(text: str, name: str):
    """The argument text of every call ``name(...)`` (balanced parentheses, so multi-line calls are whole)."""
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield text[match.end() : i - 1]


def test_no_pickle_path_anywhere_in_the_project():
    offenders = []
    this_file = Path(__file__).resolve()
    for path in _python_files():
        if path.resolve() == this_file:
            continue
        text = path.read_text(encoding="utf-8")
        for args in _calls(text, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", args):
                offenders.append(f"{path.relative_to(REPO)}: torch.load({args.strip()[:60]}) without weights_only=True")
        for pattern in (r"trust_remote_code\s*=\s*True", r"^\s*import pickle", r"^\s*from pickle ", r"\bdill\b",
                        r"\bcloudpickle\b", r"pickle\.loads?\("):
            for match in re.finditer(pattern, text, flags=re.MULTILINE):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0).strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_scan_catches_what_it_looks_for():
    sample = 'x = torch.load(\n    path,\n    map_location="cpu")\ny = torch.load(p, weights_only=True)\n'
    found = [args for args in _calls(sample, "torch.load") if "weights_only=True" not in args]
    assert len(found) == 1 and "map_location" in found[0]


@pytest.fixture
def adapter_folder(tmp_path):
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), sadi_peft.SADIConfig(top_k=2, delta=4.0))
    sadi_peft.calibrate(model, CharTokenizer(), PAIRS, show_progress=False)
    model.save_pretrained(tmp_path / "adapter")
    return base, tmp_path / "adapter"


def _plant_module(tmp_path, monkeypatch) -> Path:
    """A module that records its own import in a file: importing it is the attack."""
    flag = tmp_path / "imported.flag"
    (tmp_path / "evil_sadi_module.py").write_text(f"open({str(flag)!r}, 'w').write('imported')\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("evil_sadi_module", None)
    return flag


@pytest.mark.parametrize(
    "edit",
    [
        {"auto_mapping": {"base_model_class": "Evil", "parent_library": "evil_sadi_module"}},
        {"peft_type": "evil_sadi_module.Evil"},
        {"task_type": "evil_sadi_module.Evil"},
        {"target_modules": "evil_sadi_module.Evil"},
    ],
    ids=["auto_mapping", "peft_type", "task_type", "target_modules"],
)
def test_adapter_config_cannot_import_what_it_names(adapter_folder, tmp_path, monkeypatch, edit):
    base, adapter = adapter_folder
    flag = _plant_module(tmp_path, monkeypatch)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(edit)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for load in (
        lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)),
        lambda: AutoModelForCausalLM.from_pretrained(str(adapter)),
    ):
        try:
            model = load()
        except Exception:  # noqa: BLE001 - refusing is fine; importing is not
            model = None
        assert not flag.exists(), f"loading imported the module named by {edit}"
        assert "evil_sadi_module" not in sys.modules
        if model is not None:  # loaded anyway: then the named thing played no part
            assert "Evil" not in type(model).__name__
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 2, 3]]))
