#!/usr/bin/env python
"""Calibration pairs/s with 1 process and with 2 processes (torch.distributed, gloo on CPU), on the same pairs.

Each configuration runs as fresh processes (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in the
environment, as torchrun sets them), each with **one torch thread**. Every process loads the model, wraps it
(``SADIConfig(variant, top_k=4, delta=9)``), warms up on one batch of its shard, waits at a barrier, and times
``sadi_peft.calibrate`` on its shard ``pairs[rank::world]`` — with 2 processes the all-reduce of the running sums at
the end is inside the clock, and each process's wall time includes waiting for the slower one.

Per configuration and round: pairs/s = N pairs ÷ the slowest process's wall time, and CPU seconds per pair = the
processes' CPU time summed ÷ N (with one thread per process, CPU time excludes waiting for a core, so it is the
steadier measure on a shared machine; it includes gloo's work). Configurations are interleaved in rotated order
over the rounds; the speed-up (2-process ÷ 1-process pairs/s) is taken per round, median [min–max]. The 2-process
scores are checked against the 1-process scores (largest absolute difference reported).

On a machine with fewer free cores than processes, the 2 processes share cores with each other and with whatever
else runs: the wall-time speed-up then measures the machine's load, not calibration. Read it with the load average
recorded per round.

    python benchmarks/distributed_calibration.py                                 # SmolLM2, 64 pairs, 3 rounds
    python benchmarks/distributed_calibration.py --tiny --n-pairs 8 --rounds 1 --out /tmp/d.json   # smoke

CPU only: the processes talk through gloo and each gets one CPU thread; ``--device cuda`` is refused (one GPU per
process with NCCL is a different benchmark, not written). ``--dtype bfloat16`` / ``float16`` load the model in that
dtype in every process (results go to ``distributed_calibration_cpu_<dtype>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    REPO,
    add_out_argument,
    examples_on_path,
    load_average,
    machine_info,
    ratio_summary,
    resolve_out,
    round_order,
    spread,
    summary,
    write_json,
)

examples_on_path()
from _common import add_model_arguments, load, require_cpu  # noqa: E402

CPU_ONLY = "the processes run on CPU cores and all-reduce through gloo (NCCL across GPUs is not written)"


# ------------------------------------------------------------------------------------------------ worker
def worker(args) -> None:
    """One process of one configuration: time calibrate on this rank's shard, write the figures to JSON."""
    import torch.distributed as dist
    from peft import get_peft_model

    import sadi_peft
    from sadi_peft.tasks import load_sst2, select_examples, sst2_pairs

    torch.set_num_threads(1)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # load first: under an initialised process group transformers writes a checkpoint (--tiny) on rank 0 only
    model, tokenizer = load(args)  # the same weights in every process (--tiny: seeded)
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    model.requires_grad_(False)
    pairs = sst2_pairs(select_examples(load_sst2("train"), args.n_pairs, 0))
    shard = pairs[rank::world]
    model = get_peft_model(model, sadi_peft.SADIConfig(variant=args.variant, top_k=4, delta=9.0))
    sadi_peft.calibrate(model, tokenizer, shard[: args.batch_size], batch_size=args.batch_size, show_progress=False)
    if world > 1:
        dist.barrier()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = sadi_peft.calibrate(model, tokenizer, shard, batch_size=args.batch_size, show_progress=False)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    report = {"rank": rank, "world": world, "local_pairs": len(shard), "num_pairs": result.num_pairs,
              "wall_s": wall, "cpu_s": cpu, "torch_threads": torch.get_num_threads()}
    if rank == 0:
        report["scores"] = {name: value.tolist() for name, value in result.scores.items()}
    Path(args.worker_out, f"rank{rank}.json").write_text(json.dumps(report))
    if world > 1:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ parent
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, world: int) -> list[dict]:
    """Run ``world`` worker processes to the end; their reports, by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        port = str(_free_port())
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-out", tmp, "--model", args.model,
               "--n-pairs", str(args.n_pairs), "--batch-size", str(args.batch_size), "--variant", args.variant,
               "--timeout", str(args.timeout), "--dtype", args.dtype]
        cmd += ["--tiny"] if args.tiny else []
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        failures = []
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=args.timeout + 600)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"rank {rank} of {world} exited with {proc.returncode}:\n{out[-1000:]}\n{err[-3000:]}")
        if failures:
            raise SystemExit("\n".join(failures))
        return [json.loads(Path(tmp, f"rank{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device_options=True, cpu_only=CPU_ONLY)
    add_out_argument(parser, "distributed_calibration.json")
    parser.add_argument("--n-pairs", type=int, default=64, help="SST-2 train pairs (seed 0), split over the processes")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward in every process")
    parser.add_argument("--variant", choices=("head", "neuron", "hidden"), default="head")
    parser.add_argument("--rounds", type=int, default=3, help="launches of each configuration (interleaved)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--timeout", type=int, default=600, help="process-group timeout of the workers (s)")
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_cpu(parser, args, CPU_ONLY)
    if args.worker_out is not None:
        worker(args)
        return
    if 1 not in args.worlds:
        raise SystemExit(f"--worlds {args.worlds}: include 1, the reference the speed-up is taken against.")
    args.out = resolve_out(args)

    torch.set_num_threads(1)
    report = {
        "benchmark": "distributed_calibration",
        "machine": machine_info(args.device, args.dtype),
        "settings": {"model": "tiny-random" if args.tiny else args.model, "device": args.device,
                     "dtype": args.dtype, "n_pairs": args.n_pairs,
                     "batch_size_per_process": args.batch_size, "variant": args.variant, "backend": "gloo",
                     "torch_threads_per_process": 1, "rounds": args.rounds, "worlds": args.worlds,
                     "pairs": "SST-2 train (seed 0), shard = pairs[rank::world]"},
    }
    runs: dict[int, list[list[dict]]] = {w: [] for w in args.worlds}
    loads = []
    for rnd in range(args.rounds):
        for world in round_order(args.worlds, rnd):
            runs[world].append(launch(args, world))
            wall = max(r["wall_s"] for r in runs[world][-1])
            print(f"round {rnd + 1}/{args.rounds}, {world} process(es): {args.n_pairs / wall:.2f} pairs/s, "
                  f"load average {load_average()}", flush=True)
        loads.append(load_average())

    results, walls = {}, {}
    for world, rounds in runs.items():
        walls[world] = [max(r["wall_s"] for r in ranks) for ranks in rounds]
        cpu_per_pair = [sum(r["cpu_s"] for r in ranks) / args.n_pairs for ranks in rounds]
        results[f"world_{world}"] = {
            "processes": world,
            "pairs_per_process": [r["local_pairs"] for r in rounds[0]],
            "wall_s": summary(walls[world]),
            "pairs_per_s_wall": summary(args.n_pairs / w for w in walls[world]),
            "cpu_s_per_pair": summary(cpu_per_pair),
            "per_round": [[{k: v for k, v in r.items() if k != "scores"} for r in ranks] for ranks in rounds],
        }
    reference = runs[1][-1][0]["scores"]
    differences = {}
    for world in args.worlds:
        scores = runs[world][-1][0]["scores"]
        differences[f"world_{world}"] = max(
            max(abs(a - b) for a, b in zip(scores[name], values)) for name, values in reference.items())
    report["results"] = results
    # pairs/s ratio = wall(1 process) / wall(W processes), per round
    report["speedup"] = {f"world_{w}": ratio_summary(walls[1], walls[w]) for w in args.worlds if w != 1}
    report["cpu_per_pair_ratio"] = {
        f"world_{w}": results[f"world_{w}"]["cpu_s_per_pair"]["median"] / results["world_1"]["cpu_s_per_pair"]["median"]
        for w in args.worlds if w != 1}
    report["max_abs_score_difference_vs_1_process"] = differences
    report["load_average_per_round"] = loads
    report["machine"]["load_average_end"] = load_average()
    write_json(args.out, report)

    print(f"\nSADI calibration ({args.variant}, {args.dtype}), {args.n_pairs} SST-2 pairs, batch {args.batch_size} "
          "pairs per "
          f"process, gloo, 1 torch thread per process; {report['machine']['cpu_count']} cores; {args.rounds} "
          f"rounds; load average per round {loads}")
    print("| processes | pairs/s (wall) | speed-up vs 1 process (wall) | CPU ms per pair | CPU per pair vs 1 process "
          "| score diff vs 1 process |")
    print("|---|---|---|---|---|---|")
    for world in args.worlds:
        r = results[f"world_{world}"]
        speed = "reference" if world == 1 else spread(report["speedup"][f"world_{world}"])
        cpu = r["cpu_s_per_pair"]
        cpu_ratio = "reference" if world == 1 else f"{report['cpu_per_pair_ratio'][f'world_{world}']:.3f}"
        print(f"| {world} | {spread(r['pairs_per_s_wall'])} | {speed} | {1e3 * cpu['median']:.1f} "
              f"[{1e3 * cpu['min']:.1f}–{1e3 * cpu['max']:.1f}] | {cpu_ratio} | "
              f"{differences[f'world_{world}']:.1e} |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
