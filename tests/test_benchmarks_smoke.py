"""The benchmark scripts run end to end at a tiny size and write the JSON they promise.

Nothing here is timed or compares speeds: the figures come from running the scripts at full size (see
benchmarks/README.md). The scripts run concurrently in subprocesses, with a tiny random model (``--tiny``), one
round and the smallest inputs, so the whole file stays well under a minute. One script also runs in bfloat16 (on
CPU: the GPU runs, ``--device cuda --dtype bfloat16``, need a GPU), and the ``--device`` / ``--dtype`` / ``--out``
handling shared by all of them is tested in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    "choice_scoring": (
        ["--tiny", "--threads", "1", "--repeats", "1", "--task", "truthfulqa_mc1", "--n-eval", "3", "--steer"],
        {"machine", "wall_median_s", "cpu_median_s", "wall_ratio", "same_choices", "max_score_diff", "accuracy"},
    ),
    "distributed_calibration": (
        ["--tiny", "--n-pairs", "4", "--batch-size", "2", "--rounds", "1"],
        {"machine", "settings", "results", "speedup", "cpu_per_pair_ratio", "max_abs_score_difference_vs_1_process",
         "load_average_per_round"},
    ),
}
# further runs of a script with other settings: name -> (script, arguments)
VARIANT_CASES = {
    "generate_overhead_bfloat16": (
        "generate_overhead",
        ["--tiny", "--dtype", "bfloat16", "--threads", "1", "--repeats", "1", "--new-tokens", "2", "--batch-sizes", "1",
         "--n-pairs", "4", "--variants", "head", "--no-control", "--step-iterations", "1", "--step-warmup", "0"],
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
    launches = {name: (name, args) for name, (args, _) in CASES.items()} | VARIANT_CASES
    for name, (script, args) in launches.items():
        out = tmp / f"{name}.json"
        procs[name] = (subprocess.Popen([sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--out", str(out)],
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
    elif name == "choice_scoring":
        assert report["same_choices"] is True and report["max_score_diff"] <= 1e-4
        assert report["accuracy"]["full"] == report["accuracy"]["prefix_cached"] and report["steered"] is True
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


def test_benchmark_runs_in_bfloat16_and_records_it(runs):
    returncode, stdout, stderr, out = runs["generate_overhead_bfloat16"]
    assert returncode == 0, stdout[-2000:] + stderr[-4000:]
    report = json.loads(out.read_text())
    for block in ("settings", "machine"):
        assert report[block]["dtype"] == "bfloat16" and report[block]["device"] == "cpu", report[block]
    assert "gpu_name" not in report["machine"] and report["settings"]["headline_clock"] == "cpu"
    assert {"base", "head/last", "head/all", "head/merged"} <= set(report["results"]["batch_1"])


# ------------------------------------------------------------------------ --device / --dtype / --out, in-process
@pytest.fixture
def common():
    """examples/_common.py and benchmarks/_bench.py, imported as the scripts import them."""
    for folder in (REPO / "examples", BENCHMARKS):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import _bench
    import _common

    return _common, _bench


def _parser(common, **options) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    common.add_model_arguments(parser, device_options=True, **options)
    return parser


def test_device_cuda_without_cuda_is_refused_by_name(common, monkeypatch, capsys):
    _common, _ = common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match=r"'cuda:0' asks for CUDA.*is_available\(\) is False"):
        _common.parse_device("cuda:0")
    with pytest.raises(SystemExit) as exit_info:
        _parser(_common).parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: 'cuda' asks for CUDA" in err and "use --device cpu" in err
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu' is not a device.*cpu, cuda or cuda:N"):
        _common.parse_device("gpu")


def test_device_and_dtype_defaults_and_values(common):
    _common, _ = common
    args = _parser(_common).parse_args([])
    assert (args.device, args.dtype) == ("cpu", "float32")
    assert _common.model_device(args) == torch.device("cpu") and _common.model_dtype(args) is torch.float32
    args = _parser(_common).parse_args(["--device", "CPU", "--dtype", "bfloat16"])
    assert _common.model_device(args).type == "cpu" and _common.model_dtype(args) is torch.bfloat16
    plain = argparse.ArgumentParser()
    _common.add_model_arguments(plain)  # the examples: no --device / --dtype, CPU float32
    args = plain.parse_args(["--tiny"])
    assert not hasattr(args, "device") and _common.model_dtype(args) is torch.float32
    assert _common.model_device(args) == torch.device("cpu")


def test_cpu_only_scripts_refuse_cuda_by_name(common, monkeypatch, capsys):
    _common, _ = common
    parser = _parser(_common, cpu_only="gloo only")
    assert "cpu only here: gloo only" in " ".join(parser.format_help().split())
    _common.require_cpu(parser, argparse.Namespace(device="cpu"), "gloo only")  # no error
    with pytest.raises(SystemExit):
        _common.require_cpu(parser, argparse.Namespace(device="cuda"), "gloo only")
    assert "--device cuda: this script runs on CPU only: gloo only" in capsys.readouterr().err


def test_results_go_beside_the_cpu_float32_figures(common, tmp_path):
    _, _bench = common
    assert _bench.results_path("generate_overhead.json") == _bench.RESULTS / "generate_overhead.json"
    assert _bench.results_path("generate_overhead.json", "cuda", "bfloat16") == \
        _bench.RESULTS / "generate_overhead_cuda_bfloat16.json"
    assert _bench.results_path("adapter_size.json", "cuda:1", "float16").name == "adapter_size_cuda1_float16.json"
    assert _bench.results_path("adapter_size.json", "cpu", "bfloat16").name == "adapter_size_cpu_bfloat16.json"
    parser = argparse.ArgumentParser()
    _bench.add_out_argument(parser, "search_cache.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    assert _bench.resolve_out(parser.parse_args([])).name == "search_cache_cuda_bfloat16.json"
    assert _bench.resolve_out(parser.parse_args(["--out", str(tmp_path / "x.json")])) == tmp_path / "x.json"
    assert _bench.headline_clock("cuda") == "wall"
    assert _bench.device_info("cpu", "bfloat16") == {"device": "cpu", "dtype": "bfloat16"}
