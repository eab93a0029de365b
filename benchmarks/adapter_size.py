#!/usr/bin/env python
"""Adapter file size per SADI variant, and the time to load a SADI adapter ÷ a LoRA r=8 on the same modules.

For each variant (head, neuron, hidden) a calibrated SADI adapter and a LoRA (r=8, PEFT defaults otherwise) on the
same target modules are saved; the sizes of their files are reported in bytes. Loading is timed as
``PeftModel.from_pretrained(fresh_base, folder)``, where ``fresh_base`` is a new copy of the base model's module tree
made outside the clock for every load (its weight tensors are shared with the template, which loading never
writes). SADI and LoRA loads are interleaved in rotated order; the ratio is taken per round, median [min–max].

    python benchmarks/adapter_size.py --threads 1
    python benchmarks/adapter_size.py --tiny --repeats 1 --out /tmp/a.json           # smoke size
    python benchmarks/adapter_size.py --device cuda --dtype bfloat16   # on a GPU: adapters load onto it, wall time
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    add_timing_arguments,
    apply_threads,
    examples_on_path,
    headline_clock,
    load_average,
    machine_info,
    ratio_summary,
    resolve_out,
    round_order,
    shared_weight_copy,
    spread,
    summary,
    timed,
    write_json,
)

examples_on_path()
from _common import add_model_arguments, load  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import sadi_peft  # noqa: E402
from sadi_peft.tasks import load_sst2, select_examples, sst2_pairs  # noqa: E402

VARIANTS = ("head", "neuron", "hidden")


def folder_sizes(folder: Path) -> dict[str, int]:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    sizes["total"] = sum(sizes.values())
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device_options=True)
    add_timing_arguments(parser, repeats=9, out="adapter_size.json")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--n-pairs", type=int, default=16, help="SST-2 calibration pairs per variant")
    args = parser.parse_args()
    apply_threads(args.threads)
    args.out = resolve_out(args)

    base, tokenizer = load(args)
    base.requires_grad_(False)
    base.eval()
    device = base.device
    pairs = sst2_pairs(select_examples(load_sst2("train"), args.n_pairs, 0))
    machine = machine_info(device, args.dtype)
    workdir = Path(tempfile.mkdtemp(prefix="sadi-adapter-size-"))
    folders: dict[str, Path] = {}
    sizes: dict[str, dict] = {}
    targets: dict[str, list[str]] = {}
    for variant in args.variants:
        model = get_peft_model(shared_weight_copy(base), sadi_peft.SADIConfig(variant=variant, top_k=4, delta=9.0))
        sadi_peft.calibrate(model, tokenizer, pairs, show_progress=False)
        folders[f"sadi {variant}"] = workdir / f"sadi-{variant}"
        sadi_peft.save_pretrained(model, folders[f"sadi {variant}"])
        targets[variant] = sorted(model.peft_config["default"].target_modules)
        lora = get_peft_model(shared_weight_copy(base), LoraConfig(r=args.lora_r, target_modules=targets[variant]))
        folders[f"lora {variant}"] = workdir / f"lora-{variant}"
        lora.save_pretrained(folders[f"lora {variant}"])
        del model, lora
    for name, folder in folders.items():
        sizes[name] = folder_sizes(folder)

    names = list(folders)
    for name in names:  # warm-up (file cache, imports)
        PeftModel.from_pretrained(shared_weight_copy(base), folders[name])
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    loads = []
    for rnd in range(args.repeats):
        for name in round_order(names, rnd):
            fresh = shared_weight_copy(base)
            gc.collect()
            w, c, loaded = timed(lambda: PeftModel.from_pretrained(fresh, folders[name]), device)  # noqa: B023
            wall[name].append(w)
            cpu[name].append(c)
            del loaded, fresh
        loads.append(load_average())
    shutil.rmtree(workdir, ignore_errors=True)
    headline = headline_clock(device)
    results = {}
    for variant in args.variants:
        s, l = f"sadi {variant}", f"lora {variant}"
        results[variant] = {
            "target_modules": targets[variant],
            "sadi_bytes": sizes[s], "lora_bytes": sizes[l],
            "sadi_load_wall_s": summary(wall[s]), "lora_load_wall_s": summary(wall[l]),
            "sadi_load_cpu_s": summary(cpu[s]), "lora_load_cpu_s": summary(cpu[l]),
            "load_wall_ratio": ratio_summary(wall[s], wall[l]), "load_cpu_ratio": ratio_summary(cpu[s], cpu[l]),
        }
    report = {
        "benchmark": "adapter_size", "machine": machine, "load_average_per_round": loads,
        "settings": {"model": "tiny-random" if args.tiny else args.model, "device": str(device),
                     "dtype": args.dtype, "lora_r": args.lora_r,
                     "repeats": args.repeats, "headline_clock": headline, "sadi": {"top_k": 4, "delta": 9.0},
                     "load": "PeftModel.from_pretrained(fresh module tree, folder)"},
        "results": results,
    }
    write_json(args.out, report)
    where = machine.get("gpu_name") or f"{machine['cpu_count']} cores, {machine['torch_threads']} torch threads"
    print(f"\nadapter files and load time; {device}, {args.dtype}, {where}; {args.repeats} rounds; "
          f"headline clock: {headline}")
    print(f"| variant | target modules | SADI adapter_model bytes | SADI total bytes | LoRA r={args.lora_r} "
          "adapter_model bytes | SADI load ms | LoRA load ms | SADI ÷ LoRA load (CPU) | SADI ÷ LoRA load (wall) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {', '.join(r['target_modules'])} | {r['sadi_bytes']['adapter_model.safetensors']} | "
              f"{r['sadi_bytes']['total']} | {r['lora_bytes']['adapter_model.safetensors']} | "
              f"{1000 * r[f'sadi_load_{headline}_s']['median']:.1f} | {1000 * r[f'lora_load_{headline}_s']['median']:.1f} | "
              f"{spread(r['load_cpu_ratio'])} | {spread(r['load_wall_ratio'])} |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
