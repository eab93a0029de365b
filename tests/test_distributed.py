"""Calibration over 2 processes (torch.distributed, gloo on CPU) equals one process over all pairs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
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
