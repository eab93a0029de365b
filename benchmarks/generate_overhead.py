#!/usr/bin/env python
"""Inference overhead of a SADI adapter: ``generate`` with the adapter ÷ ``generate`` with the same base model.

For every variant (head, neuron, hidden) and position regime ("last", "all") a calibrated SADI adapter is put on a
copy of the base model that shares its weights, and greedy generation of exactly ``--new-tokens`` tokens is timed
against the bare base at batch sizes 1 and 8 (left-padded SST-2 prompts). The ``positions="all"`` adapters are also
merged (``merge_and_unload()``, into a full copy of the weights) and timed again. A second full copy of the bare
base ("base copy") is timed as a control: its ratio to the base is the noise floor of the comparison.

All configurations run in the same process, interleaved: each round runs every configuration once, in a rotated
order (reversed on odd rounds); the ratio is taken per round and reported as median [min–max] over the rounds.
Targets (issue "Performance and robustness"): adapter ÷ base <= 1.02; merged ÷ base = 1.00 within noise.

On a shared machine one generate call (4-10 s) is too coarse to resolve 2 %: the base-copy control alone moves by
several percent between rounds. So the script also times single decode steps (``--step-iterations``): the exact
forward call that ``generate`` makes halfway through the generation (captured from a real ``generate``, KV cache
cropped back after every call, prompt end pinned as ``PeftModel.generate`` pins it), every configuration once per
iteration in rotated order, many iterations. 63 of the 64 forwards of a 64-token generation are such decode steps,
and they are where a per-forward overhead weighs most, so their ratio bounds the generate ratio closely.

    python benchmarks/generate_overhead.py --threads 1            # SmolLM2-135M-Instruct, 5 rounds, batch 1 and 8
    python benchmarks/generate_overhead.py --tiny --repeats 1 --new-tokens 4 --out /tmp/g.json   # smoke size
    python benchmarks/generate_overhead.py --threads 1 --profile head/last   # + torch.profiler of one config
    python benchmarks/generate_overhead.py --device cuda --dtype bfloat16   # on a GPU: wall time, JSON in
                                                              # benchmarks/results/generate_overhead_cuda_bfloat16.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

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
    synchronize,
    timed,
    write_json,
)

examples_on_path()
from _common import add_model_arguments, load  # noqa: E402
from peft import get_peft_model  # noqa: E402

import sadi_peft  # noqa: E402
from sadi_peft.model import sadi_layers, transformer_model  # noqa: E402
from sadi_peft.tasks import load_sst2, select_examples, sst2_pairs, sst2_prompt  # noqa: E402

VARIANTS = ("head", "neuron", "hidden")
POSITIONS = ("last", "all")
TARGET = 1.02


def copy_adapter_state(src, dst, adapter: str = "default") -> None:
    """Give ``dst`` the mask, scores and calibration record of ``src`` (same variant, same base)."""
    source = dict(sadi_layers(src, adapter))
    for name, layer in sadi_layers(dst, adapter):
        layer.sadi_mask[adapter].copy_(source[name].sadi_mask[adapter])
        layer.sadi_scores[adapter] = source[name].sadi_scores[adapter].clone()
    dst.peft_config[adapter].calibration = dict(src.peft_config[adapter].calibration)


def layers_with_units(model, adapter: str = "default") -> int:
    return sum(bool(layer.sadi_mask[adapter].any()) for _, layer in sadi_layers(model, adapter))


def build_configs(loaded, tokenizer, args) -> tuple[dict, dict]:
    """name -> model, and name -> description.

    Every configuration is a deep copy of the loaded model's module tree: a deep-copied model runs its Python a
    little slower (measured: ~2.5 % per decode step on the tiny model) than the one ``from_pretrained`` built, so
    timing adapters on copies against the loaded model itself would charge that to SADI. The base and the adapters
    share the loaded weights; the merged models and the "base copy" control own a full copy of them.
    """
    pairs = sst2_pairs(select_examples(load_sst2("train"), args.n_pairs, 0))
    base = shared_weight_copy(loaded)
    models: dict[str, torch.nn.Module] = {"base": base}
    info: dict[str, dict] = {"base": {"kind": "base", "note": "module tree copied, weights shared with the loaded model"}}
    if not args.no_control:
        models["base copy"] = copy.deepcopy(loaded)
        info["base copy"] = {"kind": "control", "note": "a full deep copy of the bare base, own weights (noise floor; "
                                                        "same kind of memory as the merged models)"}
    for variant in args.variants:
        calibrated = None
        for positions in POSITIONS:
            config = sadi_peft.SADIConfig(variant=variant, top_k=args.top_k, delta=args.delta, positions=positions)
            model = get_peft_model(shared_weight_copy(loaded), config)
            if calibrated is None:
                sadi_peft.calibrate(model, tokenizer, pairs, batch_size=16, show_progress=False)
                calibrated = model
            else:
                copy_adapter_state(calibrated, model)
            model.eval()
            name = f"{variant}/{positions}"
            models[name] = model
            info[name] = {"kind": "adapter", "variant": variant, "positions": positions,
                          "layers_with_units": layers_with_units(model), "wrapped_layers": len(sadi_layers(model, "default"))}
        if not args.no_merged:
            config = sadi_peft.SADIConfig(variant=variant, top_k=args.top_k, delta=args.delta, positions="all")
            model = get_peft_model(copy.deepcopy(loaded), config)
            copy_adapter_state(calibrated, model)
            merged = model.merge_and_unload().eval()
            name = f"{variant}/merged"
            models[name] = merged
            info[name] = {"kind": "merged", "variant": variant, "positions": "all"}
    return models, info


def make_inputs(tokenizer, batch_size: int, device: torch.device):
    """``batch_size`` left-padded SST-2 validation prompts, on ``device``."""
    prompts = [sst2_prompt(e["text"]) for e in select_examples(load_sst2("validation"), 8, 1)]
    prompts = (prompts * batch_size)[:batch_size]
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True).to(device)


def generator(model, batch, new_tokens: int, pad_token_id: int):
    def run():
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad_token_id)
    return run


class DecodeStep:
    """Replays the forward call that ``generate`` makes at decode step ``step`` (KV cache cropped back each time)."""

    def __init__(self, model, batch, args, step: int) -> None:
        self.inner = transformer_model(model)
        self.model, self.batch = model, batch
        captured: dict = {}
        calls = [0]

        def hook(module, hook_args, kwargs):
            if calls[0] == step:
                captured["args"], captured["kwargs"] = hook_args, dict(kwargs)
                captured["cache_len"] = kwargs["past_key_values"].get_seq_length()
            calls[0] += 1

        handle = self.inner.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            generator(model, batch, args.new_tokens, args.pad_token_id)()
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"generate made fewer than {step + 1} forward calls")
        self.args, self.kwargs = captured["args"], captured["kwargs"]
        self.cache = self.kwargs["past_key_values"]
        self.cache.crop(-(self.cache.get_seq_length() - captured["cache_len"]))
        self.is_peft = self.inner is not model

    def __call__(self) -> None:
        # PeftModel.generate pins the prompt end for the whole call; do the same around the replayed step
        pin = (sadi_peft.prompt_boundary(self.model, attention_mask=self.batch["attention_mask"]) if self.is_peft
               else contextlib.nullcontext())
        with torch.no_grad(), pin:
            self.inner(*self.args, **self.kwargs)

    def reset(self) -> None:
        self.cache.crop(-1)


def time_decode_steps(models, batches, args) -> dict:
    names = list(models)
    steps = {bs: {name: DecodeStep(models[name], batches[bs], args, args.step_index) for name in names}
             for bs in args.batch_sizes}
    wall = {bs: {n: [] for n in names} for bs in args.batch_sizes}
    cpu = {bs: {n: [] for n in names} for bs in args.batch_sizes}
    for it in range(args.step_warmup + args.step_iterations):
        for bs in args.batch_sizes:
            for name in round_order(names, it):
                step = steps[bs][name]
                w, c, _ = timed(step, args.device)
                step.reset()
                if it >= args.step_warmup:
                    wall[bs][name].append(w)
                    cpu[bs][name].append(c)
    out = {}
    for bs in args.batch_sizes:
        out[f"batch_{bs}"] = {
            name: {"wall_ms": summary(1000 * t for t in wall[bs][name]), "cpu_ms": summary(1000 * t for t in cpu[bs][name]),
                   "wall_ratio": _no_runs(ratio_summary(wall[bs][name], wall[bs]["base"])),
                   "cpu_ratio": _no_runs(ratio_summary(cpu[bs][name], cpu[bs]["base"]))}
            for name in names
        }
        for name in names:
            if "base copy" in names and name.endswith("/merged"):
                out[f"batch_{bs}"][name]["cpu_ratio_vs_base_copy"] = _no_runs(
                    ratio_summary(cpu[bs][name], cpu[bs]["base copy"]))
                out[f"batch_{bs}"][name]["wall_ratio_vs_base_copy"] = _no_runs(
                    ratio_summary(wall[bs][name], wall[bs]["base copy"]))
    return out


def _no_runs(r: dict) -> dict:
    r.pop("per_round", None)  # hundreds of values: keep the JSON readable
    return r


def profile(models, batches, args, headline: str) -> dict:
    """torch.profiler of one generate (batch 1) of the base and of ``args.profile``: the top ops by self CPU time
    (host time: what a per-forward overhead such as SADI's hooks costs; on a GPU the CUDA kernels are recorded too)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])

    result = {}
    for name in ("base", args.profile):
        run = generator(models[name], batches[1 if 1 in batches else args.batch_sizes[0]], args.new_tokens,
                        args.pad_token_id)
        run()
        with torch_profile(activities=activities) as prof:
            run()
            synchronize(args.device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
        print(f"\n== torch.profiler: {name} (batch 1, {args.new_tokens} new tokens) ==\n{table}")
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        result[name] = {
            "total_self_cpu_ms": sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000,
            "top": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000}
                    for e in events[: args.profile_rows]],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, device_options=True)
    add_timing_arguments(parser, repeats=5, out="generate_overhead.json")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--delta", type=float, default=9.0)
    parser.add_argument("--n-pairs", type=int, default=16, help="SST-2 calibration pairs per variant")
    parser.add_argument("--no-merged", action="store_true", help="skip the merged models")
    parser.add_argument("--no-control", action="store_true", help="skip the base-copy control")
    parser.add_argument("--step-iterations", type=int, default=100,
                        help="timed decode-step iterations (every configuration once per iteration; 0: skip)")
    parser.add_argument("--step-warmup", type=int, default=3)
    parser.add_argument("--step-index", type=int, default=None,
                        help="which forward call of generate to replay (default: the middle decode step)")
    parser.add_argument("--profile", default=None, help="also profile one configuration, e.g. head/last")
    parser.add_argument("--profile-rows", type=int, default=20)
    args = parser.parse_args()
    apply_threads(args.threads)
    args.out = resolve_out(args)

    loaded, tokenizer = load(args)
    args.device = loaded.device  # a torch.device from here on (--device is validated and normalised by the parser)
    loaded.requires_grad_(False)
    loaded.eval()
    args.pad_token_id = tokenizer.pad_token_id
    if args.step_index is None:
        args.step_index = max(1, args.new_tokens // 2)
    models, info = build_configs(loaded, tokenizer, args)
    names = list(models)
    headline = headline_clock(args.device)
    machine = machine_info(args.device, args.dtype)
    batches = {bs: make_inputs(tokenizer, bs, args.device) for bs in args.batch_sizes}

    # warm-up (untimed) + output checks: every steered model must generate something else than the base, every
    # merged model the same tokens as its unmerged positions="all" adapter
    outputs = {bs: {} for bs in args.batch_sizes}
    for bs in args.batch_sizes:
        for name in names:
            outputs[bs][name] = generator(models[name], batches[bs], args.new_tokens, args.pad_token_id)()
    for name in names:
        ref = outputs[max(args.batch_sizes)]
        info[name]["new_tokens_generated"] = int(ref[name].shape[1] - batches[max(args.batch_sizes)]["input_ids"].shape[1])
        if info[name]["kind"] in ("adapter", "merged"):
            info[name]["differs_from_base"] = bool(not torch.equal(ref[name], ref["base"]))
        if info[name]["kind"] == "merged":
            same = ref[name] == ref[f"{info[name]['variant']}/all"]
            info[name]["token_agreement_with_unmerged"] = float(same.float().mean())

    wall = {bs: {n: [] for n in names} for bs in args.batch_sizes}
    cpu = {bs: {n: [] for n in names} for bs in args.batch_sizes}
    loads = []
    for rnd in range(args.repeats):
        for bs in args.batch_sizes:
            for name in round_order(names, rnd):
                w, c, _ = timed(generator(models[name], batches[bs], args.new_tokens, args.pad_token_id), args.device)
                wall[bs][name].append(w)
                cpu[bs][name].append(c)
        loads.append(load_average())
        print(f"round {rnd + 1}/{args.repeats} done, load average {loads[-1]}", flush=True)

    results = {}
    for bs in args.batch_sizes if args.repeats > 0 else []:  # --repeats 0: decode steps only
        results[f"batch_{bs}"] = {
            name: {
                "wall_s": summary(wall[bs][name]), "cpu_s": summary(cpu[bs][name]),
                "wall_ratio": ratio_summary(wall[bs][name], wall[bs]["base"]),
                "cpu_ratio": ratio_summary(cpu[bs][name], cpu[bs]["base"]),
                "wall_runs_s": wall[bs][name], "cpu_runs_s": cpu[bs][name],
            }
            for name in names
        }
        if "base copy" in names:
            for name in names:
                if name.endswith("/merged"):
                    results[f"batch_{bs}"][name]["cpu_ratio_vs_base_copy"] = ratio_summary(cpu[bs][name], cpu[bs]["base copy"])
                    results[f"batch_{bs}"][name]["wall_ratio_vs_base_copy"] = ratio_summary(wall[bs][name], wall[bs]["base copy"])

    steps = time_decode_steps(models, batches, args) if args.step_iterations > 0 else None
    if steps:
        print(f"decode steps done ({args.step_iterations} iterations), load average {load_average()}", flush=True)

    targets = {}
    for bs in args.batch_sizes:
        block = results.get(f"batch_{bs}", {})
        control = block.get("base copy", {}).get(f"{headline}_ratio")
        for name in names:
            if info[name]["kind"] not in ("adapter", "merged"):
                continue
            entry = {"target": TARGET}
            if block:
                r = block[name][f"{headline}_ratio"]
                entry.update(generate_median_ratio=r["median"], generate_met=r["median"] <= TARGET)
            if control:
                entry["generate_control_range"] = [control["min"], control["max"]]
            if steps:
                sr = steps[f"batch_{bs}"][name][f"{headline}_ratio"]
                entry["decode_step_median_ratio"] = sr["median"]
                entry["decode_step_met"] = sr["median"] <= TARGET
                if info[name]["kind"] == "merged" and "base copy" in steps[f"batch_{bs}"]:
                    entry["decode_step_ratio_vs_base_copy"] = steps[f"batch_{bs}"][name][f"{headline}_ratio_vs_base_copy"]["median"]
            targets[f"batch_{bs}/{name}"] = entry

    report = {
        "benchmark": "generate_overhead",
        "machine": machine,
        "load_average_per_round": loads,
        "settings": {
            "model": "tiny-random" if args.tiny else args.model, "device": str(args.device), "dtype": args.dtype,
            "batch_sizes": args.batch_sizes,
            "new_tokens": args.new_tokens, "greedy": True, "repeats": args.repeats, "top_k": args.top_k,
            "delta": args.delta, "n_pairs": args.n_pairs, "headline_clock": headline,
            "padding": "left", "prompts": "SST-2 validation (seed 1)", "step_iterations": args.step_iterations,
            "step_index": args.step_index,
        },
        "configs": info,
        "results": results,
        "decode_steps": steps,
        "targets": targets,
    }
    if args.profile:
        report["profile"] = profile(models, batches, args, headline)
    write_json(args.out, report)

    where = machine.get("gpu_name") or f"{machine['cpu_count']} cores, {machine['torch_threads']} torch threads"
    print(f"\ngenerate, {args.new_tokens} new tokens, greedy; {args.device}, {args.dtype}, {where}; "
          f"{args.repeats} rounds; ratio = config / base per round, "
          f"median [min–max]; headline clock: {headline} time")
    print("| config | batch | base s | config s | generate ratio, CPU | generate ratio, wall | decode step ms "
          "(base / config) | decode-step ratio, CPU [p25–p75] | decode-step ratio, wall [p25–p75] |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bs in args.batch_sizes:
        block = results.get(f"batch_{bs}")
        sblock = steps[f"batch_{bs}"] if steps else None
        for name in names:
            if name == "base":
                continue
            step_cols = "n/a | n/a | n/a"
            if sblock:
                step_cols = (f"{sblock['base'][f'{headline}_ms']['median']:.1f} / {sblock[name][f'{headline}_ms']['median']:.1f}"
                             f" | {spread(sblock[name]['cpu_ratio'], True)} | {spread(sblock[name]['wall_ratio'], True)}")
            gen_cols = "n/a | n/a | n/a | n/a"
            if block:
                gen_cols = (f"{block['base'][f'{headline}_s']['median']:.2f} | {block[name][f'{headline}_s']['median']:.2f}"
                            f" | {spread(block[name]['cpu_ratio'])} | {spread(block[name]['wall_ratio'])}")
            print(f"| {name} | {bs} | {gen_cols} | {step_cols} |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
