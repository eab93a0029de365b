#!/usr/bin/env python
"""Calibration cost: pairs/s of ``sadi_peft.calibrate`` ÷ a bare forward over the same pairs, and its peak memory.

Throughput. Every variant's ``calibrate`` (batch size 16 pairs = 32 texts per forward, right padding) runs on the
same SST-2 pairs as a bare ``torch.no_grad()`` forward of the base model over the very same tokenized, right-padded
batches, with the same forward arguments as calibration uses (``use_cache=False``, ``logits_to_keep=1``). The bare
forward gets its batches pre-tokenized (outside the clock), so the ratio charges calibration with everything it does
beyond the forward: tokenizing, checking, the recording hooks, the score bookkeeping. A third baseline, "bare +
tokenize", tokenizes inside the clock, to tell tokenizing from the rest. Configurations are interleaved in rotated
order, one ratio per round (bare ÷ calibrate time = calibrate pairs/s ÷ bare pairs/s), median [min–max].
Target (issue "Performance and robustness"): >= 0.95.

Memory. For each N in ``--memory-n`` a fresh Python process loads the model, wraps it, reads every weight once (so
that weight pages the loader had not yet brought in count as the model), records its resident set (VmRSS), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), calibrates on N pairs, and reads the
peak (VmHWM): the peak above the loaded model. The pairs cycle through a fixed pool of distinct SST-2 pairs
(``--pool``), so every N sees the same batch shapes and only the number of pairs changes. Must be flat in N. Each
N's result is written to the JSON as soon as it finishes, so the large N can run in the background.

On a GPU (``--device cuda``, e.g. with ``--dtype bfloat16``) the inputs go to the GPU (inside the clock, as
``calibrate`` moves its own), the clocks are read after ``torch.cuda.synchronize()``, wall time is the headline
clock, and memory is ``torch.cuda.max_memory_allocated`` (reset after loading) above the allocated memory of the
loaded model, instead of the process RSS. Such runs write ``calibration_throughput_<device>_<dtype>.json``.

    python benchmarks/calibration_throughput.py --threads 1                       # throughput + memory at 100/1000/4000
    python benchmarks/calibration_throughput.py --threads 1 --skip-throughput --memory-n 4000 --out ...  # one N
    python benchmarks/calibration_throughput.py --tiny --repeats 1 --n-pairs 8 --memory-n 4 8 --out /tmp/c.json
    python benchmarks/calibration_throughput.py --device cuda --dtype bfloat16    # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    REPO,
    add_timing_arguments,
    calibration_batch,
    apply_threads,
    examples_on_path,
    gpu_memory_mib,
    headline_clock,
    load_average,
    machine_info,
    ratio_summary,
    reset_gpu_peak,
    resolve_out,
    round_order,
    shared_weight_copy,
    spread,
    summary,
    timed,
    write_json,
)

examples_on_path()
from _common import add_model_arguments, load, model_device  # noqa: E402
from peft import get_peft_model  # noqa: E402

import sadi_peft  # noqa: E402
from sadi_peft.tasks import load_sst2, select_examples, sst2_pairs  # noqa: E402

VARIANTS = ("head", "neuron", "hidden")
TARGET = 0.95


# ------------------------------------------------------------------------------------------------ bare forward
tokenize_batch = calibration_batch  # the batch calibration builds (benchmarks/_bench.py)


def chunks(pairs, batch_size):
    iterator = iter(pairs)
    while chunk := list(itertools.islice(iterator, batch_size)):
        yield chunk


def bare_forward(model, batches, device: torch.device) -> None:
    """The forward calls calibration makes, on batches tokenized beforehand (moved to ``device`` here, as
    ``calibrate`` moves its own)."""
    with torch.no_grad():
        for input_ids, attention_mask in batches:
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                  logits_to_keep=1)


# ------------------------------------------------------------------------------------------------ memory worker
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def pair_stream(pool, n: int, mode: str):
    if mode == "cycle":
        return itertools.islice(itertools.cycle(pool), n)
    if n > len(pool):
        raise SystemExit(f"--pool distinct: only {len(pool)} SST-2 train pairs, N={n} asked")
    return iter(pool[:n])


def memory_worker(args) -> None:
    """Runs in a fresh process: peak memory above the loaded (and wrapped) model while calibrating on N pairs:
    process RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU."""
    device = model_device(args)
    if device.type == "cuda":
        memory_worker_gpu(args, device)
        return
    import resource

    model, tokenizer = load(args)
    model.requires_grad_(False)
    train = load_sst2("train")
    pool = sst2_pairs(select_examples(train, None if args.pool == "distinct" else args.pool_size, 0))
    if args.worker_mode == "calibrate":
        model = get_peft_model(model, sadi_peft.SADIConfig(variant=args.variant, top_k=4, delta=9.0))
    rss_after_load = _proc_status_kib("VmRSS")
    with torch.no_grad():  # read every weight once, so that pages the loader left on disk count as the model
        for p in model.parameters():
            p.sum()
    gc.collect()
    rss_loaded = _proc_status_kib("VmRSS")
    hwm_before = _proc_status_kib("VmHWM")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    trace = []  # (pairs handed out so far, VmRSS MiB, VmHWM MiB), every --trace-every pairs

    def traced(stream):
        for i, pair in enumerate(stream):
            if args.trace_every and i % args.trace_every == 0:
                trace.append((i, _proc_status_kib("VmRSS") / 1024, _proc_status_kib("VmHWM") / 1024))
            yield pair

    stream = traced(pair_stream(pool, args.worker_n, args.pool))
    if args.worker_mode == "calibrate":
        # an iterator: calibrate reads it once, in batches
        sadi_peft.calibrate(model, tokenizer, stream, batch_size=args.batch_size, show_progress=False)
    else:  # bare forward over the same batches, tokenized one batch at a time
        with torch.no_grad():
            for chunk in chunks(stream, args.batch_size):
                input_ids, attention_mask = tokenize_batch(tokenizer, chunk)
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    seconds = time.perf_counter() - start
    hwm = _proc_status_kib("VmHWM")
    result = {
        "n_pairs": args.worker_n, "mode": args.worker_mode, "variant": args.variant, "pool": args.pool,
        "pool_size": len(pool), "rss_after_from_pretrained_mib": rss_after_load / 1024,
        "rss_loaded_mib": rss_loaded / 1024, "peak_rss_mib": hwm / 1024,
        "rss_after_mib": _proc_status_kib("VmRSS") / 1024,
        "peak_above_loaded_mib": (hwm - rss_loaded) / 1024, "peak_counter_reset": reset,
        "peak_before_reset_mib": hwm_before / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds, "pairs_per_s": args.worker_n / seconds, "torch_threads": torch.get_num_threads(),
        "trace_pairs_rss_hwm_mib": trace, "memory_measure": "process RSS (VmRSS, VmHWM)",
        "device": str(device), "dtype": args.dtype,
    }
    if not reset:
        result["note"] = "could not reset VmHWM: the peak includes model loading"
    Path(args.worker_out).write_text(json.dumps(result))


def memory_worker_gpu(args, device: torch.device) -> None:
    """The GPU form of :func:`memory_worker`: ``torch.cuda.max_memory_allocated`` above the allocated memory of the
    loaded (and wrapped) model, peak reset after loading; a trace of (pairs, allocated, peak) every --trace-every."""
    model, tokenizer = load(args)
    model.requires_grad_(False)
    pool = sst2_pairs(select_examples(load_sst2("train"), None if args.pool == "distinct" else args.pool_size, 0))
    if args.worker_mode == "calibrate":
        model = get_peft_model(model, sadi_peft.SADIConfig(variant=args.variant, top_k=4, delta=9.0))
    gc.collect()
    loaded, _ = gpu_memory_mib(device)
    reset_gpu_peak(device)
    trace = []  # (pairs handed out so far, allocated MiB, peak allocated MiB)

    def traced(stream):
        for i, pair in enumerate(stream):
            if args.trace_every and i % args.trace_every == 0:
                trace.append((i, *gpu_memory_mib(device)))
            yield pair

    stream = traced(pair_stream(pool, args.worker_n, args.pool))
    start = time.perf_counter()
    if args.worker_mode == "calibrate":
        sadi_peft.calibrate(model, tokenizer, stream, batch_size=args.batch_size, show_progress=False)
    else:
        with torch.no_grad():
            for chunk in chunks(stream, args.batch_size):
                input_ids, attention_mask = tokenize_batch(tokenizer, chunk)
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                      logits_to_keep=1)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    after, peak = gpu_memory_mib(device)
    result = {
        "n_pairs": args.worker_n, "mode": args.worker_mode, "variant": args.variant, "pool": args.pool,
        "pool_size": len(pool), "memory_measure": "torch.cuda.max_memory_allocated",
        "device": str(device), "dtype": args.dtype, "gpu_name": torch.cuda.get_device_name(device),
        "gpu_allocated_loaded_mib": loaded, "peak_gpu_allocated_mib": peak, "gpu_allocated_after_mib": after,
        "peak_above_loaded_mib": peak - loaded,
        "gpu_reserved_after_mib": torch.cuda.memory_reserved(device) / 2**20,
        "seconds": seconds, "pairs_per_s": args.worker_n / seconds, "torch_threads": torch.get_num_threads(),
        "trace_pairs_allocated_peak_mib": trace,
    }
    Path(args.worker_out).write_text(json.dumps(result))


def _loaded_and_peak(m: dict) -> tuple[float, float, list]:
    """(loaded MiB, peak MiB, trace) of a memory worker's result, RSS (CPU) or allocated GPU memory (CUDA)."""
    if "peak_gpu_allocated_mib" in m:
        return m["gpu_allocated_loaded_mib"], m["peak_gpu_allocated_mib"], m["trace_pairs_allocated_peak_mib"]
    return m["rss_loaded_mib"], m["peak_rss_mib"], m["trace_pairs_rss_hwm_mib"]


def run_memory(args, report) -> None:
    cases = [("calibrate", n) for n in args.memory_n]
    if not args.no_bare_memory:
        cases.insert(0, ("bare", min(args.memory_n)))
    report.setdefault("memory", {})
    for mode, n in cases:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "worker.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-n", str(n), "--worker-mode", mode,
                   "--worker-out", str(out), "--variant", args.variant, "--pool", args.pool,
                   "--pool-size", str(args.pool_size), "--batch-size", str(args.batch_size), "--model", args.model,
                   "--trace-every", str(args.trace_every), "--device", str(args.device), "--dtype", args.dtype]
            if args.tiny:
                cmd.append("--tiny")
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            if args.malloc_mmap_threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"memory worker {mode} N={n} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            result = json.loads(out.read_text())
        result["process_wall_s"] = time.perf_counter() - start
        result["load_average_end"] = load_average()
        report["memory"][f"{mode}/{n}"] = result
        write_json(args.out, report)  # as each N finishes
        print(f"memory {mode:9s} N={n:5d}: peak above loaded model {result['peak_above_loaded_mib']:.1f} MiB "
              f"(loaded {_loaded_and_peak(result)[0]:.0f} MiB, {result['memory_measure']}), "
              f"{result['pairs_per_s']:.2f} pairs/s", flush=True)
    calib = [report["memory"][f"calibrate/{n}"]["peak_above_loaded_mib"] for n in args.memory_n]
    # growth inside each run: final peak minus the peak once a tenth of the pairs (at least 100) had been handed out
    growth = {}
    for n in args.memory_n:
        _, peak, trace = _loaded_and_peak(report["memory"][f"calibrate/{n}"])
        early = [hwm for i, _, hwm in trace if i >= max(100, n // 10)]
        if early:
            growth[str(n)] = peak - early[0]
    report["memory_flat"] = {
        "n": list(args.memory_n), "measure": report["memory"][f"calibrate/{args.memory_n[0]}"]["memory_measure"],
        "peak_above_loaded_mib": calib, "max_minus_min_mib": max(calib) - min(calib),
        "peak_growth_within_run_mib": growth, "tolerance_mib": args.flat_tolerance_mib,
        "flat": max(calib) - min(calib) <= args.flat_tolerance_mib
        and all(g <= args.flat_tolerance_mib for g in growth.values()),
    }
    write_json(args.out, report)


# ------------------------------------------------------------------------------------------------ throughput
def run_throughput(args, report) -> None:
    loaded, tokenizer = load(args)
    loaded.requires_grad_(False)
    loaded.eval()
    device = loaded.device
    # the bare forward runs on a copy of the module tree too (sharing the weights), like the wrapped models: a
    # deep-copied model runs its Python a little slower than the one from_pretrained built
    base = shared_weight_copy(loaded)
    pairs = sst2_pairs(select_examples(load_sst2("train"), args.n_pairs, 0))
    batches = [tokenize_batch(tokenizer, chunk) for chunk in chunks(pairs, args.batch_size)]
    models = {v: get_peft_model(shared_weight_copy(loaded), sadi_peft.SADIConfig(variant=v, top_k=4, delta=9.0))
              for v in args.variants}
    runs = {
        "bare": lambda: bare_forward(base, batches, device),
        "bare + tokenize": lambda: bare_forward(
            base, (tokenize_batch(tokenizer, c) for c in chunks(pairs, args.batch_size)), device),
    }
    for v, model in models.items():
        runs[f"calibrate {v}"] = (lambda m=model: sadi_peft.calibrate(m, tokenizer, pairs, batch_size=args.batch_size,
                                                                      show_progress=False))
    names = list(runs)
    for name in names:  # warm-up
        runs[name]()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    loads = []
    for rnd in range(args.repeats):
        for name in round_order(names, rnd):
            w, c, _ = timed(runs[name], device)
            wall[name].append(w)
            cpu[name].append(c)
        loads.append(load_average())
        print(f"round {rnd + 1}/{args.repeats} done, load average {loads[-1]}", flush=True)
    headline = headline_clock(device)
    results = {}
    for name in names:
        clock = {"wall": wall[name], "cpu": cpu[name]}
        results[name] = {
            "wall_s": summary(wall[name]), "cpu_s": summary(cpu[name]),
            "pairs_per_s_wall": summary(len(pairs) / t for t in wall[name]),
            "pairs_per_s_cpu": summary(len(pairs) / t for t in cpu[name]),
            # throughput ratio = (pairs / t_config) / (pairs / t_bare) = t_bare / t_config
            "wall_throughput_ratio": ratio_summary(wall["bare"], clock["wall"]),
            "cpu_throughput_ratio": ratio_summary(cpu["bare"], clock["cpu"]),
        }
    widths = [int(ids.shape[1]) for ids, _ in batches]
    report["throughput"] = {
        "n_pairs": len(pairs), "batch_size": args.batch_size, "texts_per_forward": 2 * args.batch_size,
        "batch_widths": widths, "repeats": args.repeats, "headline_clock": headline,
        "load_average_per_round": loads, "results": results,
        "targets": {name: {"median_ratio": results[name][f"{headline}_throughput_ratio"]["median"], "target": TARGET,
                           "met": results[name][f"{headline}_throughput_ratio"]["median"] >= TARGET}
                    for name in names if name.startswith("calibrate")},
    }
    write_json(args.out, report)
    machine = report["machine"]
    where = machine.get("gpu_name") or f"{machine['cpu_count']} cores, {machine['torch_threads']} torch threads"
    print(f"\ncalibration throughput, {len(pairs)} SST-2 pairs, batch {args.batch_size} pairs "
          f"({2 * args.batch_size} texts); {device}, {args.dtype}, {where}; {args.repeats} rounds; "
          f"headline clock: {headline}")
    print("| run | pairs/s (median) | throughput ÷ bare, CPU time | throughput ÷ bare, wall time | target ≥ 0.95 |")
    print("|---|---|---|---|---|")
    for name in names:
        t = report["throughput"]["targets"].get(name)
        verdict = "baseline" if name == "bare" else ("reference" if t is None else ("met" if t["met"] else "MISSED"))
        print(f"| {name} | {results[name][f'pairs_per_s_{headline}']['median']:.2f} | "
              f"{spread(results[name]['cpu_throughput_ratio'])} | {spread(results[name]['wall_throughput_ratio'])} | "
              f"{verdict} |")
    del models, runs
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device_options=True)
    add_timing_arguments(parser, repeats=5, out="calibration_throughput.json")
    parser.add_argument("--n-pairs", type=int, default=64, help="pairs per timed throughput run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, default="head", help="variant of the memory runs")
    parser.add_argument("--memory-n", type=int, nargs="*", default=[100, 1000, 4000])
    parser.add_argument("--pool", choices=("cycle", "distinct"), default="cycle",
                        help="memory runs: cycle a pool of --pool-size pairs (same batch shapes for every N), or "
                             "N distinct pairs")
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--flat-tolerance-mib", type=float, default=16.0,
                        help="largest peak difference between the N that still counts as flat")
    parser.add_argument("--no-bare-memory", action="store_true", help="skip the bare-forward memory reference")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="memory runs: glibc MALLOC_MMAP_THRESHOLD_ for the worker (fixed, so that freed tensors go "
                             "back to the kernel and the peak is the live memory; 0: glibc's dynamic default, whose "
                             "heap retention moves the peak by up to ~130 MiB from one process to the next)")
    parser.add_argument("--trace-every", type=int, default=100,
                        help="memory runs: record VmRSS / VmHWM every this many pairs (0: off)")
    # internal: one memory measurement in a fresh process
    parser.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", choices=("calibrate", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_threads(args.threads)
    if args.worker_n is not None:
        memory_worker(args)
        return
    args.out = resolve_out(args)

    report = {
        "benchmark": "calibration_throughput",
        "machine": machine_info(args.device, args.dtype),
        "settings": {"model": "tiny-random" if args.tiny else args.model, "device": args.device, "dtype": args.dtype,
                     "memory_measure": "torch.cuda.max_memory_allocated" if model_device(args).type == "cuda"
                     else "process RSS (VmRSS, VmHWM)", "batch_size": args.batch_size,
                     "padding": "right", "forward_kwargs": {"use_cache": False, "logits_to_keep": 1},
                     "pairs": "SST-2 train (seed 0)", "memory_variant": args.variant, "memory_pool": args.pool,
                     "memory_pool_size": args.pool_size,
                     "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)"},
    }
    if not args.skip_throughput:
        run_throughput(args, report)
    if args.memory_n:
        run_memory(args, report)
    write_json(args.out, report)
    if "memory" in report:
        what = "peak GPU memory allocated" if model_device(args).type == "cuda" else "peak RSS"
        print(f"| run | N pairs | {what} above loaded model (MiB) | pairs/s |\n|---|---|---|---|")
        for key, m in report["memory"].items():
            print(f"| {m['mode']} | {m['n_pairs']} | {m['peak_above_loaded_mib']:.1f} | {m['pairs_per_s']:.2f} |")
        flat = report["memory_flat"]
        print(f"flat in N: {flat['flat']} (spread {flat['max_minus_min_mib']:.1f} MiB, tolerance "
              f"{flat['tolerance_mib']} MiB)")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
