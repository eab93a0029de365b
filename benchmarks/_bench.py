"""Shared helpers of the benchmark scripts: machine facts, interleaved timing, robust summaries, JSON output.

Every comparison in these benchmarks is measured side by side in one process: the configurations are run in
rounds, each round in a rotated (and on odd rounds reversed) order, so that slow drifts of a shared machine hit all
of them alike. A ratio is computed per round (configuration ÷ baseline of the same round) and summarised by its
median and its min/max over the rounds.

Two clocks are recorded for every run: wall time (``time.perf_counter``) and the process CPU time
(``time.process_time``). On a machine whose cores are busy with other work, the wall time of a run includes the
time it waited for a core; with one torch thread the CPU time does not, which makes it the steadier measure of the
work a configuration does. With several torch threads the CPU time also counts the threads' spin-waits, so it is
only meaningful at ``--threads 1``.

On a GPU (``--device cuda``) the kernels run asynchronously: :func:`timed` synchronises the device before it reads
the clocks, and the wall time is the headline clock (the process CPU time then measures only the host's part, much
of it spent waiting for the GPU). Memory on a GPU is ``torch.cuda.max_memory_allocated`` (see :func:`gpu_memory_mib`).
Results that are not CPU float32 go to ``<name>_<device>_<dtype>.json`` (:func:`resolve_out`), beside the CPU ones.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def add_timing_arguments(parser: argparse.ArgumentParser, *, repeats: int, out: str) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (configurations interleaved)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's own choice; 1 gives steady CPU times on a busy machine)",
    )
    add_out_argument(parser, out)


def add_out_argument(parser: argparse.ArgumentParser, out: str) -> None:
    """``--out``; its default is ``benchmarks/results/<out>``, suffixed by device and dtype unless CPU float32
    (read it with :func:`resolve_out` once the arguments are parsed)."""
    stem = Path(out).stem
    parser.add_argument(
        "--out", type=Path, default=None,
        help=f"JSON file to write (default: benchmarks/results/{stem}.json on CPU in float32, "
             f"{stem}_<device>_<dtype>.json otherwise, e.g. {stem}_cuda_bfloat16.json)",
    )
    parser.set_defaults(default_out=out)


def results_path(out: str, device: str | torch.device = "cpu", dtype: str = "float32") -> Path:
    """Where a run's JSON goes by default: ``RESULTS/out`` on CPU in float32; otherwise the name suffixed with the
    device and the dtype (``generate_overhead_cuda_bfloat16.json``), so that GPU figures sit beside the CPU ones."""
    name = Path(out)
    device_tag = str(device).replace(":", "")
    if device_tag == "cpu" and dtype == "float32":
        return RESULTS / name
    return RESULTS / f"{name.stem}_{device_tag}_{dtype}{name.suffix or '.json'}"


def resolve_out(args: argparse.Namespace) -> Path:
    """``--out`` if given, else :func:`results_path` of the script's default name, ``--device`` and ``--dtype``."""
    if args.out is not None:
        return Path(args.out)
    default = getattr(args, "default_out", None)
    if default is None:
        raise ValueError("resolve_out: the parser has no --out default; add it with add_out_argument(parser, name).")
    return results_path(default, getattr(args, "device", "cpu"), getattr(args, "dtype", "float32"))


# ------------------------------------------------------------------------------------------------ devices
def is_cuda(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def synchronize(device: str | torch.device | None) -> None:
    """Wait for the GPU's queued work (no-op on CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def headline_clock(device: str | torch.device | None = None) -> str:
    """The clock a script's verdicts read: wall time on a GPU; on CPU the process CPU time at one torch thread
    (steady on a busy machine), else wall time."""
    if is_cuda(device):
        return "wall"
    return "cpu" if torch.get_num_threads() == 1 else "wall"


def device_info(device: str | torch.device = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """Device, dtype and, on a GPU, its name, memory and the CUDA version torch was built for."""
    info: dict[str, Any] = {"device": str(device), "dtype": dtype}
    if is_cuda(device):
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu_name=torch.cuda.get_device_name(device), gpu_memory_mib=properties.total_memory / 2**20,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def reset_gpu_peak(device: str | torch.device) -> None:
    """Start a new peak of ``torch.cuda.max_memory_allocated`` (after the queued work is done)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)


def gpu_memory_mib(device: str | torch.device) -> tuple[float, float]:
    """(allocated now, peak allocated since :func:`reset_gpu_peak`) on ``device``, MiB; tensors only (not the CUDA
    context, not the caching allocator's reserve)."""
    synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def machine_info(device: str | torch.device = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """What a reader needs to judge a figure: cores, threads, load, versions, date; device, dtype and GPU name."""
    import transformers

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_start": load_average(),
        "processor": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **device_info(device, dtype),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # the peer venv has no peft
        pass
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def timed(fn: Callable[[], Any], device: str | torch.device | None = None) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call; on a CUDA ``device`` the GPU is synchronised before
    the clocks start and before they are read, so the times include the kernels ``fn`` queued."""
    synchronize(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    synchronize(device)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall, cpu, result


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The order of one round: rotated by the round index, reversed on odd rounds."""
    names = list(names)
    k = round_index % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if round_index % 2 else order


def summary(values: Iterable[float]) -> dict[str, float]:
    """median, min, max, n; with 8 or more values also the quartiles p25/p75."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    result = {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }
    if len(values) >= 8:
        quartiles = statistics.quantiles(values, n=4)
        result["p25"], result["p75"] = quartiles[0], quartiles[2]
    return result


def ratio_summary(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Per-round ratios numerator[i] / denominator[i]: median, min, max; plus the ratio of the medians."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    result = summary(per_round)
    result["ratio_of_medians"] = statistics.median(numerator) / statistics.median(denominator)
    result["per_round"] = per_round
    return result


def spread(s: dict[str, float], quartiles: bool = False) -> str:
    """``median [min–max]`` (or ``median [p25–p75]``) of a summary, for tables."""
    if not s.get("n"):
        return "n/a"
    if quartiles and "p25" in s:
        return f"{s['median']:.3f} [{s['p25']:.3f}–{s['p75']:.3f}]"
    return f"{s['median']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def examples_on_path() -> None:
    """Make ``examples/_common.py`` importable (the --tiny model and the model arguments live there)."""
    path = str(REPO / "examples")
    if path not in sys.path:
        sys.path.insert(0, path)


def shared_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters are the original ones (no extra weight memory).

    The module tree, buffers and config are copied, so an adapter can be injected into the copy without touching
    ``model``; the two read the very same weight tensors, which keeps a side-by-side timing fair (same memory).
    Do not merge into such a copy: merging writes the weights.
    """
    import copy

    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def calibration_batch(tokenizer, chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch ``sadi_peft.calibrate`` builds for ``chunk`` of (prompt, positive, negative) pairs: positives then
    negatives, the exact texts calibration reads, right-padded, as (input_ids, attention_mask)."""
    from sadi_peft.calibration import _join

    texts = [tokenizer(_join(p, y, " ", True))["input_ids"] for p, y, _ in chunk]
    texts += [tokenizer(_join(p, n, " ", True))["input_ids"] for p, _, n in chunk]
    width = max(len(t) for t in texts)
    input_ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, ids in enumerate(texts):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
