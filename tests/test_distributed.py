"""Calibration and harness evaluation over 2 processes (torch.distributed, gloo on CPU) equal one process over all
pairs / items; mismatched processes are refused, and a process that fails or dies mid-run makes the others stop with
an error (no hang, no adapter written)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from tiny_models import PAIRS, CharTokenizer, tiny_llama

import sadi_peft

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from peft import get_peft_model
    from safetensors.torch import save_file
    from tiny_models import PAIRS, CharTokenizer, tiny_llama
    import sadi_peft

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    variant = sys.argv[1] if rank == 0 else sys.argv[2]
    pairs = (PAIRS + PAIRS[:3])[rank::world]          # 11 pairs: shards of 6 and 5
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(variant=variant, top_k=3))
    try:
        result = sadi_peft.calibrate(model, CharTokenizer(), pairs, batch_size=4, show_progress=False)
        save_file({{k: v.contiguous() for k, v in result.scores.items()}}, os.path.join(sys.argv[3], f"scores{{rank}}.safetensors"))
        open(os.path.join(sys.argv[3], f"pairs{{rank}}.txt"), "w").write(str(result.num_pairs))
    except ValueError as error:
        open(os.path.join(sys.argv[3], f"error{{rank}}.txt"), "w").write(str(error))
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: Path, variant0: str, variant1: str) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(REPO / "tests")))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        procs.append(subprocess.Popen([sys.executable, str(script), variant0, variant1, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


def test_two_processes_give_the_single_process_scores(tmp_path):
    _launch(tmp_path, "head", "head")
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(variant="head", top_k=3))
    single = sadi_peft.calibrate(model, CharTokenizer(), PAIRS + PAIRS[:3], batch_size=4, show_progress=False)
    for rank in range(2):
        assert (tmp_path / f"pairs{rank}.txt").read_text() == "11"
        scores = load_file(str(tmp_path / f"scores{rank}.safetensors"))
        for name, value in single.scores.items():
            torch.testing.assert_close(scores[name], value, atol=1e-5, rtol=0)


def test_processes_with_different_configs_are_refused(tmp_path):
    _launch(tmp_path, "head", "hidden")
    for rank in range(2):
        message = (tmp_path / f"error{rank}.txt").read_text()
        assert "Distributed calibration refused: processes [1]" in message


def test_distributed_true_without_a_process_group_is_an_error():
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=1))
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        sadi_peft.calibrate(model, CharTokenizer(), PAIRS, distributed=True, show_progress=False)


# ------------------------------------------------------------------------------------------------ shared launcher
def _start(tmp_path: Path, source: str, args: list[str]) -> list[subprocess.Popen]:
    """Start a 2-process gloo group running ``source`` (rank and rendezvous in the environment, like torchrun)."""
    script = tmp_path / "worker.py"
    script.write_text(source)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        procs.append(subprocess.Popen([sys.executable, str(script), *args, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """(return code, stderr) of a worker; a worker still running after ``timeout`` seconds is killed (code None)."""
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err


# ------------------------------------------------------------------------------------------------ evaluation
EVAL_WORKER = textwrap.dedent(
    """
    import datetime, json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from peft import get_peft_model
    from tiny_models import PAIRS, CharTokenizer, tiny_llama
    import sadi_peft
    from sadi_peft.harness.baselines import evaluate_items
    from sadi_peft.harness.distributed import evaluate_items_distributed

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    out = sys.argv[1]
    items = {items!r}
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(variant="head", top_k=3, delta=5.0))
    sadi_peft.calibrate(model, CharTokenizer(), PAIRS, batch_size=4, show_progress=False, distributed=False)
    report = {{}}
    result = evaluate_items(model, CharTokenizer(), items, batch_size=3, distributed=True)
    report["equal"] = {{"accuracy": result["accuracy"], "n": result["n"], "correct": result["correct"],
                       "shard": result["shard"], "scores": result["scores"].tolist()}}

    def refused(case, **kwargs):
        try:
            evaluate_items_distributed(model, CharTokenizer(), kwargs.pop("items", items), batch_size=3)
            report[case] = "no error"
        except (ValueError, RuntimeError) as error:
            report[case] = type(error).__name__ + ": " + str(error)

    refused("fewer_items", items=items if rank == 0 else items[:-1])
    refused("other_items", items=items if rank == 0 else items[1:] + items[:1])
    if rank == 1:
        sadi_peft.set_delta(model, 2.0)
    refused("other_delta")
    sadi_peft.set_delta(model, 5.0)

    def broken(module, args):
        raise RuntimeError("simulated failure inside the forward")

    inner = sadi_peft.model.transformer_model(model)
    handle = inner.register_forward_pre_hook(broken) if rank == 1 else None
    refused("scoring_fails")
    if handle is not None:
        handle.remove()
    report["after"] = evaluate_items_distributed(model, CharTokenizer(), items, batch_size=3)["accuracy"]
    open(os.path.join(out, f"eval{{rank}}.json"), "w").write(json.dumps(report))
    dist.destroy_process_group()
    """
)

# 11 items (shards of 6 and 5), 2 to 4 options, so the shards' score widths differ
ITEMS = [(prompt, [pos, neg], i % 2) if i % 2 == 0 else (prompt, [neg, pos], 1) for i, (prompt, pos, neg) in
         enumerate(PAIRS)]
ITEMS += [("Review: not bad at all. Sentiment:", ["Negative", "Positive", "Neutral"], 1),
          ("Review: it was fine. Sentiment:", ["Positive", "Negative", "Neutral", "Mixed"], 2),
          ("Review: loved it. Sentiment:", ["Positive", "Negative"], 0)]


@pytest.fixture(scope="module")
def evaluation_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    procs = _start(tmp, EVAL_WORKER.format(tests=str(REPO / "tests"), items=ITEMS), [])
    for proc in procs:
        code, err = _finish(proc, 300)
        assert code == 0, err[-3000:]
    return [json.loads((tmp / f"eval{rank}.json").read_text()) for rank in range(2)]


def test_distributed_evaluation_equals_one_process(evaluation_runs):
    from sadi_peft.harness.baselines import evaluate_items

    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(variant="head", top_k=3, delta=5.0))
    sadi_peft.calibrate(model, CharTokenizer(), PAIRS, batch_size=4, show_progress=False)
    single = evaluate_items(model, CharTokenizer(), ITEMS, batch_size=3)
    assert single["n"] == 11 and single["scores"].shape == (11, 4)
    assert evaluation_runs[0]["equal"]["shard"] == [0, 2, 4, 6, 8, 10]
    assert evaluation_runs[1]["equal"]["shard"] == [1, 3, 5, 7, 9]
    for report in evaluation_runs:
        result = report["equal"]
        assert result["n"] == 11
        assert result["accuracy"] == single["accuracy"]
        assert result["correct"] == round(single["accuracy"] * 11)
        torch.testing.assert_close(torch.tensor(result["scores"]), single["scores"], atol=1e-5, rtol=0)
        assert report["after"] == single["accuracy"]  # the group is usable after every refusal below


@pytest.mark.parametrize(
    "case, message",
    [
        ("fewer_items", "Distributed evaluation refused: processes [1] have another adapter, model or input"),
        ("other_items", "Distributed evaluation refused: processes [1] have another adapter, model or input"),
        ("other_delta", "Distributed evaluation refused: processes [1] have another adapter, model or input"),
    ],
)
def test_distributed_evaluation_refuses_mismatched_processes(evaluation_runs, case, message):
    for report in evaluation_runs:
        assert report[case].startswith("ValueError: " + message), report[case]


def test_distributed_evaluation_failing_process_stops_the_others(evaluation_runs):
    assert "simulated failure inside the forward" in evaluation_runs[1]["scoring_fails"]
    assert evaluation_runs[0]["scoring_fails"].startswith(
        "RuntimeError: Distributed evaluation failed on process(es) [1]")


def test_distributed_evaluation_without_a_process_group_is_an_error():
    from sadi_peft.harness.distributed import evaluate_items_distributed

    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=1))
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        evaluate_items_distributed(model, CharTokenizer(), ITEMS)


# ------------------------------------------------------------------------------------------------ failures
FAIL_WORKER = textwrap.dedent(
    """
    import datetime, json, os, sys, time
    import torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from peft import get_peft_model
    from tiny_models import PAIRS, CharTokenizer, tiny_llama
    import sadi_peft

    mode, timeout, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    rank = dist.get_rank()
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(variant="head", top_k=3))

    def shard():  # process 1 breaks at its third pair, in its second batch (one forward already ran)
        for i, pair in enumerate(PAIRS[rank::2]):
            if rank == 1 and i == 2:
                if mode == "die":
                    os._exit(17)
                if mode == "hang":
                    time.sleep(300)
                if mode == "raise":
                    pair = (pair[0], "same", "same")
            yield pair

    start = time.monotonic()
    try:
        tokenizer = CharTokenizer(pad_token_id=None) if mode == "check" and rank == 1 else CharTokenizer()
        sadi_peft.calibrate(model, tokenizer, shard(), batch_size=2, show_progress=False)
        if rank == 0:
            sadi_peft.save_pretrained(model, os.path.join(out, "adapter"))
        status = {{"error": None}}
    except Exception as error:
        status = {{"error": type(error).__name__ + ": " + str(error)}}
    status["seconds"] = time.monotonic() - start
    status["mask_units"] = sum(int(layer.sadi_mask["default"].sum())
                               for _, layer in sadi_peft.model.sadi_layers(model, "default"))
    open(os.path.join(out, f"status{{rank}}.json"), "w").write(json.dumps(status))
    sys.exit(1 if status["error"] else 0)
    """
)


def _run_failure(tmp_path: Path, mode: str, timeout: int) -> list[tuple[int, dict]]:
    procs = _start(tmp_path, FAIL_WORKER.format(tests=str(REPO / "tests")), [mode, str(timeout)])
    start = time.monotonic()
    code0, err0 = _finish(procs[0], 240)  # a hang would be killed here and fail the test, not the suite
    waited = time.monotonic() - start
    code1, err1 = _finish(procs[1], 5 if mode == "hang" else 240)  # the silent one is ours to stop
    assert code0 is not None, f"process 0 still running after {waited:.0f} s (hang):\n{err0[-3000:]}"
    statuses = []
    for rank, code, err in ((0, code0, err0), (1, code1, err1)):
        path = tmp_path / f"status{rank}.json"
        statuses.append((code, json.loads(path.read_text()) if path.exists() else None, err))
    # nothing was saved, not even a temporary folder
    assert not [p.name for p in tmp_path.iterdir() if "adapter" in p.name]
    return statuses


def test_a_process_failing_its_checks_stops_the_others_before_any_pair(tmp_path):
    (code0, status0, err0), (code1, status1, err1) = _run_failure(tmp_path, "check", 60)
    assert code1 == 1 and status1["error"].startswith("ValueError: The tokenizer has no pad token"), err1
    assert code0 == 1, err0[-3000:]
    assert status0["error"].startswith("ValueError: Distributed calibration refused: processes [1] failed their "
                                       "input checks (process 1: ValueError: The tokenizer has no pad token")
    assert status0["mask_units"] == 0 and status1["mask_units"] == 0


def test_a_process_failing_mid_calibration_stops_the_others(tmp_path):
    (code0, status0, err0), (code1, status1, err1) = _run_failure(tmp_path, "raise", 60)
    assert code1 == 1 and status1["error"].startswith("ValueError: pairs[2]: the positive and negative texts"), err1
    assert code0 == 1, err0[-3000:]
    assert status0["error"].startswith("RuntimeError: Distributed calibration failed on process(es) [1]")
    assert status0["mask_units"] == 0 and status1["mask_units"] == 0  # the previous (empty) masks are kept


def test_a_process_dying_mid_calibration_stops_the_others(tmp_path):
    (code0, status0, err0), (code1, status1, _) = _run_failure(tmp_path, "die", 60)
    assert code1 == 17 and status1 is None
    assert code0 == 1, err0[-3000:]
    assert status0["error"].startswith("RuntimeError: Distributed calibration failed: a torch.distributed collective")
    assert "Another process probably died" in status0["error"]
    assert status0["seconds"] < 60  # gloo sees the closed connection: no wait for the timeout
    assert status0["mask_units"] == 0


def test_a_silent_process_ends_the_others_at_the_group_timeout(tmp_path):
    (code0, status0, err0), (code1, _, _) = _run_failure(tmp_path, "hang", 15)
    assert code1 is None  # still sleeping: killed by the test
    assert code0 == 1, err0[-3000:]
    assert status0["error"].startswith("RuntimeError: Distributed calibration failed: a torch.distributed collective")
    assert status0["seconds"] < 120
    assert status0["mask_units"] == 0
