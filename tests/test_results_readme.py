"""results/README.md's tables are exactly what `sadi-peft report` makes of the committed result files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("update_results_readme", REPO / "scripts" / "update_results_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_published_tables_match_the_result_files():
    script = _script()
    readme = (REPO / "results" / "README.md").read_text(encoding="utf-8")
    assert script.update(readme, REPO) == readme, "run: python scripts/update_results_readme.py"


def _result(folder: Path, task: str, method: str, accuracy: float) -> None:
    (folder / task).mkdir(parents=True, exist_ok=True)
    record = {"task": task, "method": method, "split": "test", "accuracy": accuracy, "n": 10}
    (folder / task / f"{method}.json").write_text(json.dumps(record))


def test_update_replaces_only_the_generated_block(tmp_path):
    script = _script()
    _result(tmp_path / "res", "copa", "none", 0.5)
    _result(tmp_path / "res", "copa", "sadi-head-last", 0.7)
    text = "intro\n<!-- generated: sadi-peft report res -->\nstale | 99.00\n<!-- end generated -->\noutro\n"
    new = script.update(text, tmp_path)
    assert new.startswith("intro\n<!-- generated: sadi-peft report res -->\n| method | copa | average |")
    assert "| sadi-head-last | 70.00 (n=10) | 70.00 |" in new and "stale" not in new
    assert new.endswith("<!-- end generated -->\noutro\n")
    assert script.update(new, tmp_path) == new


@pytest.mark.parametrize("text, message", [
    ("no markers at all\n", "no `<!-- generated"),
    ("<!-- generated: rm -rf res -->\nx\n<!-- end generated -->\n", "expected a `sadi-peft report"),
    ("<!-- generated: sadi-peft report missing -->\nx\n<!-- end generated -->\n", "no results for split 'test'"),
])
def test_update_bad_input_is_named(tmp_path, text, message):
    (tmp_path / "missing").mkdir()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _script().update(text, tmp_path)
