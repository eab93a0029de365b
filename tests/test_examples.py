"""Every example runs (small sizes) — the scripts are documentation, so CI keeps them working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

pytestmark = pytest.mark.slow

CASES = {
    "quickstart": ["--tiny"],
    "steer_from_jsonl": ["--tiny"],
    "stack_with_lora": ["--tiny"],
    "production_loading": ["--tiny"],
    "export_for_serving": ["--tiny"],
    "load_from_hub": ["--offline-demo"],
    "sst2_demo": ["--n-pairs", "8", "--n-eval", "8", "--max-new-tokens", "4", "--no-progress"],
}


NO_OUT = {"production_loading", "load_from_hub"}  # scripts that write nothing worth keeping


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, tmp_path, smollm2_path, data_dir):
    args = [*CASES[name], *([] if name in NO_OUT else ["--out", str(tmp_path / "out")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_every_example_is_smoke_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    missing = scripts - set(CASES)
    assert not missing, f"examples without a smoke test: {sorted(missing)}"
