"""The benchmark scripts run end to end at a tiny size and write the JSON they promise.

Nothing here is timed or compares speeds: the figures come from running the scripts at full size (see
benchmarks/README.md). The scripts run concurrently in subprocesses, with a tiny random model (``--tiny``), one
round and the smallest inputs, so the whole file stays well under a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

CASES = {
    "generate_overhead": (
        ["--tiny", "--threads", "1", "--repeats", "1", "--new-tokens", "2", "--batch-sizes", "1", "2", "--n-pairs", "4"],
        {"machine", "settings", "configs", "results", "targets"},
    ),
    "calibration_throughput": (
        ["--tiny", "--threads", "1", "--repeats", "1", "--n-pairs", "4", "--batch-size", "2", "--memory-n", "4",
         "--no-bare-memory"],
        {"machine", "settings", "throughput", "memory", "memory_flat"},
    ),
    "adapter_size": (
        ["--tiny", "--threads", "1", "--repeats", "1", "--n-pairs", "4"],
        {"machine", "settings", "results"},
    ),
    "device_map_memory": (
        ["--tiny", "--threads", "1", "--n-pairs", "4", "--batch-size", "2", "--no-bare"],
        {"machine", "settings", "runs", "comparison"},
    ),
    "distributed_calibration": (
        ["--tiny", "--n-pairs", "4", "--batch-size", "2", "--rounds", "1"],
        {"machine", "settings", "results", "speedup", "cpu_per_pair_ratio", "max_abs_score_difference_vs_1_process",
         "load_average_per_round"},
    ),
}
# scripts that need something a test machine lacks (peers.py: a second venv with transformers 4.x), or that are
# covered elsewhere
NOT_RUN = {"peers", "search_cache"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_path, data_dir):
    """Start every script at once, wait for all: {name: (CompletedProcess-like, JSON path)}."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = {}
    for name, (args, _) in CASES.items():
        out = tmp / f"{name}.json"
        procs[name] = (subprocess.Popen([sys.executable, str(BENCHMARKS / f"{name}.py"), *args, "--out", str(out)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp, env=env),
                       out)
    results = {}
    for name, (proc, out) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results[name] = (proc.returncode, stdout, stderr, out)
    return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_writes_json(runs, name):
    returncode, stdout, stderr, out = runs[name]
    assert returncode == 0, stdout[-2000:] + stderr[-4000:]
    report = json.loads(out.read_text())
    missing = CASES[name][1] - set(report)
    assert not missing, f"{name}: JSON lacks {sorted(missing)}"
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_threads"] == 1
    if name == "generate_overhead":
        assert set(report["results"]) == {"batch_1", "batch_2"}
        for block in report["results"].values():
            assert {"base", "head/last", "head/all", "head/merged", "neuron/last", "hidden/all"} <= set(block)
            assert "median" in block["head/last"]["cpu_ratio"]
        assert 0.0 <= report["configs"]["head/merged"]["token_agreement_with_unmerged"] <= 1.0
    elif name == "calibration_throughput":
        assert {"bare", "calibrate head", "calibrate neuron", "calibrate hidden"} <= set(report["throughput"]["results"])
        assert set(report["memory"]) == {"calibrate/4"}
        assert all(m["peak_above_loaded_mib"] >= 0 for m in report["memory"].values())
    elif name == "device_map_memory":
        assert set(report["runs"]) == {"calibrate/unsplit", "calibrate/split"}
        assert "disk" in report["runs"]["calibrate/split"]["placement"]
        assert all(r["peak_above_loaded_mib"] >= 0 for r in report["runs"].values())
        assert report["comparison"]["max_abs_score_difference"] <= 1e-5
    elif name == "distributed_calibration":
        assert set(report["results"]) == {"world_1", "world_2"}
        assert report["results"]["world_2"]["pairs_per_process"] == [2, 2]
        assert "median" in report["speedup"]["world_2"]
        assert max(report["max_abs_score_difference_vs_1_process"].values()) <= 1e-5
    elif name == "adapter_size":
        assert set(report["results"]) == {"head", "neuron", "hidden"}
        for r in report["results"].values():
            assert r["sadi_bytes"]["adapter_model.safetensors"] > 0 and r["lora_bytes"]["adapter_model.safetensors"] > 0
            assert "median" in r["load_cpu_ratio"]


def test_every_benchmark_is_smoke_tested_and_peers_compile():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert scripts - NOT_RUN == set(CASES), f"benchmarks without a smoke test: {sorted(scripts - NOT_RUN - set(CASES))}"
    compile((BENCHMARKS / "peers.py").read_text(), "peers.py", "exec")  # runs in its own venv; at least it parses
    result = subprocess.run(["bash", "-n", str(BENCHMARKS / "setup_peer_env.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
