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
    "sst2_demo": ["--n-pairs", "8", "--n-eval", "8", "--max-new-tokens", "4", "--no-progress"],
}


def run_example(name: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name, tmp_path, smollm2_path, data_dir):
    if name == "production_loading":
        args = CASES[name]  # takes no --out
        env = dict(os.environ, PYTHONPATH=str(REPO))
        result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], capture_output=True,
                                text=True, cwd=tmp_path, env=env, timeout=600)
    else:
        result = run_example(name, CASES[name], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_every_example_is_smoke_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    missing = scripts - set(CASES) - {"load_from_hub"}
    assert not missing, f"examples without a smoke test: {sorted(missing)}"
