#!/usr/bin/env python
"""Peak memory of calibrating a model split by ``device_map`` (CPU RAM + disk offload) against the unsplit model.

Each run is a fresh Python process that loads the model, wraps it in a SADI adapter, reads every resident weight
once (so that pages the loader mapped lazily count as the model), records its resident set (VmRSS), resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), calibrates on N pairs and reads the peak (VmHWM):

* **unsplit**: ``from_pretrained(path)``, every weight in CPU RAM;
* **split**: ``from_pretrained(path, device_map="auto", max_memory={"cpu": fraction x weights' size in --dtype},
  offload_folder=tmp)`` — accelerate keeps the first layers in RAM and the rest on disk (their weights stay on the
  ``meta`` device and are read from the checkpoint into RAM for each forward of their layer, then dropped).

Besides the kernel's peak, the resident set is sampled before and after every decoder layer's forward (RssAnon:
tensors; RssFile: mapped checkpoint pages), which tells how much is resident while each layer runs. What to expect:
the split model's resident weights are smaller (only the CPU layers), and its peak above the loaded model is the
unsplit one plus about one decoder layer's weights (the disk layer being run): calibration's recording adds only
per-layer running sums, so no more than one layer's activations for a batch exist at a time beyond what the forward
pass itself holds. Optional bare-forward runs (the same batches, no adapter) separate the forward's own memory.

glibc's allocator keeps freed heap memory, which moves the peak by up to ~130 MiB from one process to the next (see
``benchmarks/README.md``, section 2); the workers run with a fixed ``MALLOC_MMAP_THRESHOLD_`` (default 131072) so
freed tensors go back to the kernel and the peak is the live memory.

    python benchmarks/device_map_memory.py --threads 1                               # SmolLM2, 64 pairs
    python benchmarks/device_map_memory.py --tiny --threads 1 --n-pairs 4 --no-bare --out /tmp/m.json  # smoke

CPU only: what it measures is the process RSS of a model split over CPU RAM and disk; ``--device cuda`` is refused
(a GPU form — a model split over GPU and CPU by ``max_memory``, measured by ``torch.cuda.max_memory_allocated`` —
is not written). ``--dtype bfloat16`` / ``float16`` load the checkpoint in that dtype (results go to
``device_map_memory_cpu_<dtype>.json``).
"""

from __future__ import annotations

import argparse
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
    add_out_argument,
    apply_threads,
    calibration_batch,
    examples_on_path,
    load_average,
    machine_info,
    resolve_out,
    write_json,
)

examples_on_path()
from _common import add_model_arguments, load, model_dtype, require_cpu  # noqa: E402

MODES = ("unsplit", "split")
MIB = 1024 * 1024
CPU_ONLY = ("it measures the process RSS of a model split over CPU RAM and disk by device_map (a GPU form is not "
            "written)")


# ------------------------------------------------------------------------------------------------ worker
def _status_kib(*fields: str) -> dict[str, int]:
    found = {}
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            key = line.split(":", 1)[0]
            if key in fields:
                found[key] = int(line.split()[1])
    return found


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _LayerSampler:
    """Samples RssAnon / RssFile before and after each decoder layer's forward; keeps the maxima only."""

    def __init__(self) -> None:
        self.max_anon = self.max_file = self.max_rss = 0
        self.samples = 0

    def sample(self, *_args) -> None:
        s = _status_kib("RssAnon", "RssFile", "VmRSS")
        self.max_anon = max(self.max_anon, s["RssAnon"])
        self.max_file = max(self.max_file, s["RssFile"])
        self.max_rss = max(self.max_rss, s["VmRSS"])
        self.samples += 1

    def attach(self, layers) -> list:
        handles = []
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(lambda m, a: self.sample()))
            handles.append(layer.register_forward_hook(lambda m, a, o: self.sample()))
        return handles


_tokenize_batch = calibration_batch  # the batch calibration builds (benchmarks/_bench.py)


def weights_bytes(path: str | Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint's tensors take in ``dtype`` (from the safetensors headers; nothing is read beyond them).

    The split's CPU budget is a fraction of this, not of the file size, so that a float32 checkpoint loaded in
    bfloat16 is split as much as one loaded in float32."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}: the split runs need a safetensors checkpoint.")
    numel = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                numel += count
    return numel * dtype.itemsize


def worker(args) -> None:
    """One measurement in this (fresh) process; writes its JSON to ``--worker-out``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sadi_peft
    from sadi_peft.tasks import load_sst2, select_examples, sst2_pairs
    from sadi_peft.zoo import resolve_model_path

    rss_imports = _status_kib("VmRSS")["VmRSS"]
    if args.tiny:  # a random 2-layer Llama saved to a temp folder (loaded back below like a checkpoint)
        model, tokenizer = load(args)
        path = model.name_or_path
        del model
    else:  # the tokenizer only: the model is loaded once, below
        path = resolve_model_path(args.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    pairs = sst2_pairs(select_examples(load_sst2("train"), args.n_pairs, 0))
    checkpoint_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    budget = None
    dtype = model_dtype(args)
    model_bytes = weights_bytes(path, dtype)
    with tempfile.TemporaryDirectory(prefix="sadi-offload-") as offload:
        if args.worker_mode == "split":
            budget = int(model_bytes * args.cpu_fraction)
            model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": budget},
                                                         offload_folder=offload, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.eval().requires_grad_(False)
        placement = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
        decoder = model.model.layers
        layer_bytes = sum(p.numel() * p.element_size() for p in decoder[0].parameters())
        on_meta = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")
        if not args.bare:
            model = get_peft_model(model, sadi_peft.SADIConfig(variant=args.variant, top_k=4, delta=9.0))
        rss_after_load = _status_kib("VmRSS")["VmRSS"]
        with torch.no_grad():  # read every resident weight once
            for p in model.parameters():
                if p.device.type != "meta":
                    p.sum()
        loaded = _status_kib("VmRSS", "RssAnon", "RssFile", "VmHWM")
        reset = _reset_peak_rss()
        sampler = _LayerSampler()
        handles = sampler.attach(decoder)
        batches = [pairs[i : i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
        widest = max(_tokenize_batch(tokenizer, chunk)[0].shape[1] for chunk in batches)
        start, cpu_start = time.perf_counter(), time.process_time()
        if args.bare:
            with torch.no_grad():
                for chunk in batches:
                    input_ids, attention_mask = _tokenize_batch(tokenizer, chunk)
                    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
            scores = None
        else:
            result = sadi_peft.calibrate(model, tokenizer, pairs, batch_size=args.batch_size, show_progress=False)
            scores = {name: value.tolist() for name, value in result.scores.items()}
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        for handle in handles:
            handle.remove()
        end = _status_kib("VmRSS", "VmHWM")
    config = model.config if args.bare else model.base_model.model.config
    report = {
        "mode": args.worker_mode, "bare": args.bare, "n_pairs": len(pairs), "batch_size": args.batch_size,
        "variant": None if args.bare else args.variant,
        "cpu_budget_bytes": budget, "checkpoint_bytes": checkpoint_bytes, "weights_bytes_in_dtype": model_bytes,
        "placement": {device: sum(1 for v in placement.values() if v == device) for device in set(placement.values())},
        "disk_layers": sorted(k for k, v in placement.items() if v == "disk"),
        "weights_offloaded_mib": on_meta / MIB, "one_decoder_layer_weights_mib": layer_bytes / MIB,
        "widest_batch_tokens": int(widest),
        "one_layer_mlp_activation_mib_widest_batch":
            2 * args.batch_size * widest * config.intermediate_size * dtype.itemsize / MIB,
        "rss_after_imports_mib": rss_imports / 1024, "rss_after_from_pretrained_mib": rss_after_load / 1024,
        "rss_loaded_mib": loaded["VmRSS"] / 1024, "rss_anon_loaded_mib": loaded["RssAnon"] / 1024,
        "rss_file_loaded_mib": loaded["RssFile"] / 1024,
        "peak_rss_while_loading_mib": loaded["VmHWM"] / 1024,
        "peak_rss_calibrating_mib": end["VmHWM"] / 1024,
        "peak_above_loaded_mib": (end["VmHWM"] - loaded["VmRSS"]) / 1024,
        "sampled_max_rss_mib": sampler.max_rss / 1024, "sampled_max_anon_mib": sampler.max_anon / 1024,
        "sampled_max_file_mib": sampler.max_file / 1024, "samples": sampler.samples,
        "sampled_anon_above_loaded_mib": (sampler.max_anon - loaded["RssAnon"]) / 1024,
        "peak_counter_reset": reset, "rss_after_mib": end["VmRSS"] / 1024,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "pairs_per_s": len(pairs) / seconds,
        "torch_threads": torch.get_num_threads(), "scores": scores,
    }
    Path(args.worker_out).write_text(json.dumps(report))


# ------------------------------------------------------------------------------------------------ parent
def run_case(args, mode: str, bare: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-mode", mode, "--worker-out", str(out),
               "--model", args.model, "--n-pairs", str(args.n_pairs), "--batch-size", str(args.batch_size),
               "--variant", args.variant, "--cpu-fraction", str(args.cpu_fraction), "--dtype", args.dtype]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--bare"] if bare else []
        cmd += ["--threads", str(args.threads)] if args.threads is not None else []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if args.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker {mode} (bare={bare}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - start
    result["load_average_end"] = load_average()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device_options=True, cpu_only=CPU_ONLY)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the workers")
    add_out_argument(parser, "device_map_memory.json")
    parser.add_argument("--n-pairs", type=int, default=64, help="SST-2 train pairs calibrated on (seed 0)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--variant", choices=("head", "neuron", "hidden"), default="head")
    parser.add_argument("--cpu-fraction", type=float, default=0.5,
                        help="split runs: max_memory for the CPU as a fraction of the weights' size in --dtype "
                             "(float32: about the checkpoint size); the rest of "
                             "the layers go to disk")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-forward references")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="glibc MALLOC_MMAP_THRESHOLD_ of the workers (0: glibc's dynamic default)")
    parser.add_argument("--worker-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_cpu(parser, args, CPU_ONLY)
    apply_threads(args.threads)
    if args.worker_mode is not None:
        worker(args)
        return
    if not 0 < args.cpu_fraction < 1:
        raise SystemExit(f"--cpu-fraction {args.cpu_fraction} is invalid: expected a number in (0, 1).")
    args.out = resolve_out(args)

    report = {
        "benchmark": "device_map_memory",
        "machine": machine_info(args.device, args.dtype),
        "settings": {"model": "tiny-random" if args.tiny else args.model, "n_pairs": args.n_pairs,
                     "batch_size": args.batch_size, "variant": args.variant, "cpu_fraction": args.cpu_fraction,
                     "pairs": "SST-2 train (seed 0)", "device": args.device, "dtype": args.dtype,
                     "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)"},
        "runs": {},
    }
    cases = [(mode, False) for mode in MODES]
    if not args.no_bare:
        cases += [(mode, True) for mode in MODES]
    for mode, bare in cases:
        key = f"{'bare' if bare else 'calibrate'}/{mode}"
        report["runs"][key] = result = run_case(args, mode, bare)
        write_json(args.out, report)
        print(f"{key:18s} loaded {result['rss_loaded_mib']:.0f} MiB, peak {result['peak_rss_calibrating_mib']:.0f} "
              f"MiB, above loaded {result['peak_above_loaded_mib']:.1f} MiB ({result['pairs_per_s']:.2f} pairs/s)",
              flush=True)

    split, whole = report["runs"]["calibrate/split"], report["runs"]["calibrate/unsplit"]
    score_diff = max(
        (max(abs(a - b) for a, b in zip(split["scores"][name], values)) for name, values in whole["scores"].items()),
        default=0.0,
    )
    report["comparison"] = {
        "split_disk_layers": len(split["disk_layers"]),
        "peak_rss_split_minus_unsplit_mib": split["peak_rss_calibrating_mib"] - whole["peak_rss_calibrating_mib"],
        "peak_above_loaded_split_minus_unsplit_mib": split["peak_above_loaded_mib"] - whole["peak_above_loaded_mib"],
        "one_decoder_layer_weights_mib": whole["one_decoder_layer_weights_mib"],
        "loaded_rss_split_minus_unsplit_mib": split["rss_loaded_mib"] - whole["rss_loaded_mib"],
        "max_abs_score_difference": score_diff,
    }
    for run in report["runs"].values():  # the scores were for the comparison only
        run.pop("scores", None)
    report["machine"]["load_average_end"] = load_average()
    write_json(args.out, report)

    print(f"\nSADI calibration ({args.variant}, {args.dtype}) on {args.n_pairs} SST-2 pairs, batch {args.batch_size} "
          "pairs; split: "
          f"max_memory cpu = {args.cpu_fraction:.2f} x weights, {len(split['disk_layers'])} modules on disk")
    print("| run | weights offloaded | loaded RSS | peak RSS | **peak above loaded** | max sampled RssAnon above "
          "loaded | pairs/s |")
    print("|---|---|---|---|---|---|---|")
    for key, r in report["runs"].items():
        print(f"| {key} | {r['weights_offloaded_mib']:.0f} MiB | {r['rss_loaded_mib']:.0f} MiB | "
              f"{r['peak_rss_calibrating_mib']:.0f} MiB | {r['peak_above_loaded_mib']:.1f} MiB | "
              f"{r['sampled_anon_above_loaded_mib']:.1f} MiB | {r['pairs_per_s']:.2f} |")
    c = report["comparison"]
    print(f"split − unsplit: peak {c['peak_rss_split_minus_unsplit_mib']:+.1f} MiB, peak above loaded "
          f"{c['peak_above_loaded_split_minus_unsplit_mib']:+.1f} MiB (one decoder layer's weights: "
          f"{c['one_decoder_layer_weights_mib']:.1f} MiB); largest score difference "
          f"{c['max_abs_score_difference']:.2e}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
