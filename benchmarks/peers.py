#!/usr/bin/env python
"""Peers: steering-vectors and repeng (an additive vector on the decoder blocks) on the same model, same inputs.

Each peer adds one vector to the output of every decoder block (all 30 layers of SmolLM2-135M-Instruct, the layers
SADI wraps), on every position. Measured, as for SADI, side by side in one process, interleaved in rotated order,
median [min–max] of per-round ratios:

* generate: 64 new tokens, greedy, batch 1 and 8 (left-padded SST-2 prompts) with the peer's vector on ÷ the bare
  base (and a full copy of the base as the noise-floor control);
* calibration: the peer's training call (steering-vectors ``train_steering_vector``, repeng ``ControlVector.train``)
  on the same SST-2 pairs (2 texts per pair) ÷ a bare ``torch.no_grad()`` forward over the same right-padded batches
  of 2 x 16 texts (``use_cache=False``, ``logits_to_keep=1``: the baseline SADI's calibration is measured against).

steering-vectors needs transformers < 5, so this script runs in a separate venv (``benchmarks/setup_peer_env.sh``,
default ``/tmp/sadi-peer-venv``: torch 2.13.0 CPU + transformers 4.57.6 + the peers). It imports neither sadi_peft
nor peft there. The inputs (model folder, prompts, pairs, a reference greedy continuation) are written by the same
script run in the project's venv (``--write-inputs``), which it does by itself through ``--main-python``. The
converted SmolLM2 checkpoint was saved by transformers 5: 4.57 does not read its ``rope_parameters`` (the RoPE base
is passed explicitly as ``rope_theta``) nor its ``TokenizersBackend`` tokenizer class (loaded as
``PreTrainedTokenizerFast`` from ``tokenizer.json``); the reference continuation checks that the model is the same.

    bash benchmarks/setup_peer_env.sh
    /tmp/sadi-peer-venv/bin/python benchmarks/peers.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (  # noqa: E402
    REPO,
    RESULTS,
    apply_threads,
    load_average,
    machine_info,
    ratio_summary,
    round_order,
    shared_weight_copy,
    spread,
    summary,
    timed,
    write_json,
)

REFERENCE_TOKENS = 16


# ------------------------------------------------------------------------------------------ main-venv side
def write_inputs(path: Path, n_pairs: int, model_name: str) -> None:
    """Run in the project's venv: everything the peer side needs, from sadi_peft's own loaders."""
    from sadi_peft.calibration import _join
    from sadi_peft.tasks import load_sst2, select_examples, sst2_pairs, sst2_prompt
    from sadi_peft.zoo import load_model_and_tokenizer, resolve_model_path

    model_path = resolve_model_path(model_name)
    model, tokenizer = load_model_and_tokenizer(model_path)
    pairs = sst2_pairs(select_examples(load_sst2("train"), n_pairs, 0))
    prompts = [sst2_prompt(e["text"]) for e in select_examples(load_sst2("validation"), 8, 1)]
    batch = tokenizer(prompts[:1], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=REFERENCE_TOKENS, min_new_tokens=REFERENCE_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    inputs = {
        "model_path": str(model_path),
        "prompts": prompts,
        "pairs": [{"positive": _join(p, y, " ", True), "negative": _join(p, n, " ", True)} for p, y, n in pairs],
        "reference": {"prompt_ids": batch["input_ids"][0].tolist(),
                      "greedy_ids": out[0, batch["input_ids"].shape[1]:].tolist()},
    }
    Path(path).write_text(json.dumps(inputs), encoding="utf-8")


# ------------------------------------------------------------------------------------------ peer-venv side
def load_peer_model(model_path: str):
    """The converted checkpoint under transformers 4.x: explicit rope_theta, tokenizer from tokenizer.json."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = Path(model_path)
    raw = json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    special = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), model_input_names=["input_ids", "attention_mask"],
        **{k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special.get(k)},
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def right_padded_batches(tokenizer, pairs, batch_size):
    """Same layout as sadi_peft.calibrate: per chunk, positives then negatives, right padding."""
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        texts = [tokenizer(p["positive"])["input_ids"] for p in chunk] + [tokenizer(p["negative"])["input_ids"] for p in chunk]
        width = max(map(len, texts))
        ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, t in enumerate(texts):
            ids[row, :len(t)] = torch.tensor(t)
            mask[row, :len(t)] = 1
        batches.append((ids, mask))
    return batches


class DecodeStep:
    """Replays the forward call ``run`` (a generate) makes at call ``step`` on ``inner``; the KV cache is cropped back."""

    def __init__(self, inner, run, step: int) -> None:
        captured: dict = {}
        calls = [0]

        def hook(module, hook_args, kwargs):
            if calls[0] == step:
                captured.update(args=hook_args, kwargs=dict(kwargs),
                                cache_len=kwargs["past_key_values"].get_seq_length())
            calls[0] += 1

        handle = inner.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            run()
        finally:
            handle.remove()
        self.inner, self.args, self.kwargs = inner, captured["args"], captured["kwargs"]
        self.cache = self.kwargs["past_key_values"]
        self.cache.crop(-(self.cache.get_seq_length() - captured["cache_len"]))

    def __call__(self) -> None:
        with torch.no_grad():
            self.inner(*self.args, **self.kwargs)

    def reset(self) -> None:
        self.cache.crop(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder (main-venv side)")
    parser.add_argument("--inputs", type=Path, help="inputs JSON written by --write-inputs (default: made now)")
    parser.add_argument("--write-inputs", type=Path, help="(run in the project's venv) write the inputs and exit")
    parser.add_argument("--main-python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="the project's interpreter, used to write the inputs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--n-pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per calibration forward")
    parser.add_argument("--multiplier", type=float, default=4.0, help="steering-vectors multiplier / repeng coeff")
    parser.add_argument("--step-iterations", type=int, default=100, help="decode-step replays (0: skip)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("generate", "calibration"))
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args()
    if args.write_inputs:
        write_inputs(args.write_inputs, args.n_pairs, args.model)
        return
    apply_threads(args.threads)

    if args.inputs is None:
        args.inputs = Path(tempfile.mkdtemp(prefix="sadi-peer-inputs-")) / "inputs.json"
        subprocess.run([args.main_python, __file__, "--write-inputs", str(args.inputs), "--n-pairs",
                        str(args.n_pairs), "--model", args.model], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    inputs = json.loads(args.inputs.read_text())
    pairs = inputs["pairs"][: args.n_pairs]

    import repeng
    import steering_vectors

    versions = {name: importlib.metadata.version(name) for name in ("steering-vectors", "repeng", "transformers", "torch")}
    loaded, tokenizer = load_peer_model(inputs["model_path"])
    # every configuration is a copy of the loaded model's module tree (sharing its weights): a deep-copied model runs
    # its Python a little slower than the one from_pretrained built, which would otherwise bias the ratios
    base = shared_weight_copy(loaded)
    n_layers = base.config.num_hidden_layers
    layers = list(range(n_layers))

    # the same model as in the project's venv? same token ids, same greedy continuation
    ref = inputs["reference"]
    ids = tokenizer(inputs["prompts"][:1], return_tensors="pt")
    with torch.no_grad():
        cont = base.generate(**ids, max_new_tokens=REFERENCE_TOKENS, min_new_tokens=REFERENCE_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    check = {"same_prompt_ids": ids["input_ids"][0].tolist() == ref["prompt_ids"],
             "same_greedy_continuation": cont[0, ids["input_ids"].shape[1]:].tolist() == ref["greedy_ids"]}
    print(f"model check against the project's venv: {check}", flush=True)

    report = {"benchmark": "peers", "machine": machine_info(), "versions": versions, "model_check": check,
              "settings": {"model_path": inputs["model_path"], "layers": f"all {n_layers} decoder blocks",
                           "multiplier": args.multiplier, "n_pairs": len(pairs), "batch_size_pairs": args.batch_size,
                           "new_tokens": args.new_tokens, "batch_sizes": args.batch_sizes, "repeats": args.repeats}}
    headline = "cpu" if torch.get_num_threads() == 1 else "wall"
    report["settings"]["headline_clock"] = headline

    # ---- calibration: the peers' training calls vs the bare forward
    sv_samples = [(p["positive"], p["negative"]) for p in pairs]
    rp_dataset = [repeng.DatasetEntry(positive=p["positive"], negative=p["negative"]) for p in pairs]
    tokenizer.padding_side = "right"
    batches = right_padded_batches(tokenizer, pairs, args.batch_size)
    rp_model = repeng.ControlModel(shared_weight_copy(loaded), layers)

    def bare():
        with torch.no_grad():
            for input_ids, attention_mask in batches:
                base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)

    def train_sv():
        return steering_vectors.train_steering_vector(base, tokenizer, sv_samples, layers=layers,
                                                      layer_type="decoder_block", read_token_index=-1,
                                                      batch_size=args.batch_size)

    def train_rp():
        rp_model.reset()
        return repeng.ControlVector.train(rp_model, tokenizer, rp_dataset, batch_size=2 * args.batch_size,
                                          hidden_layers=layers)

    calib_runs = {"bare": bare, "steering-vectors train": train_sv, "repeng train": train_rp}
    vectors = {name: run() for name, run in calib_runs.items()}  # warm-up, and the vectors used below
    if "calibration" not in args.skip:
        wall = {n: [] for n in calib_runs}
        cpu = {n: [] for n in calib_runs}
        for rnd in range(args.repeats):
            for name in round_order(list(calib_runs), rnd):
                w, c, _ = timed(calib_runs[name])
                wall[name].append(w)
                cpu[name].append(c)
            print(f"calibration round {rnd + 1}/{args.repeats}, load {load_average()}", flush=True)
        report["calibration"] = {
            name: {"wall_s": summary(wall[name]), "cpu_s": summary(cpu[name]),
                   "pairs_per_s": summary(len(pairs) / t for t in (cpu if headline == "cpu" else wall)[name]),
                   "cpu_throughput_ratio": ratio_summary(cpu["bare"], cpu[name]),
                   "wall_throughput_ratio": ratio_summary(wall["bare"], wall[name])}
            for name in calib_runs
        }
        write_json(args.out, report)

    # ---- generate: vector on ÷ bare base
    sv_model = shared_weight_copy(loaded)
    vectors["steering-vectors train"].patch_activations(sv_model, multiplier=args.multiplier)  # every position
    rp_model.set_control(vectors["repeng train"], args.multiplier)
    gen_models = {"base": base, "base copy": copy.deepcopy(loaded), "steering-vectors": sv_model, "repeng": rp_model}
    tokenizer.padding_side = "left"
    gen_batches = {bs: tokenizer((inputs["prompts"] * bs)[:bs], return_tensors="pt", padding=True)
                   for bs in args.batch_sizes}

    def generator(model, batch):
        def run():
            with torch.no_grad():
                return model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return run

    if "generate" not in args.skip and args.step_iterations > 0:
        # decode steps, as in generate_overhead.py: the forward call generate makes halfway, replayed many times
        steps = {bs: {n: DecodeStep(getattr(m, "model", m) if isinstance(m, repeng.ControlModel) else m,
                                    generator(m, gen_batches[bs]), args.new_tokens // 2)
                      for n, m in gen_models.items()} for bs in args.batch_sizes}
        sw = {bs: {n: [] for n in gen_models} for bs in args.batch_sizes}
        for it in range(3 + args.step_iterations):
            for bs in args.batch_sizes:
                for name in round_order(list(gen_models), it):
                    _, c, _ = timed(steps[bs][name])
                    steps[bs][name].reset()
                    if it >= 3:
                        sw[bs][name].append(c)
        report["decode_steps"] = {
            f"batch_{bs}": {n: {"cpu_ms": summary(1000 * t for t in sw[bs][n]),
                                "cpu_ratio": {k: v for k, v in ratio_summary(sw[bs][n], sw[bs]["base"]).items()
                                              if k != "per_round"}}
                            for n in gen_models}
            for bs in args.batch_sizes
        }
        write_json(args.out, report)
        print(f"decode steps done, load {load_average()}", flush=True)

    if "generate" not in args.skip:
        first = {bs: {n: generator(m, gen_batches[bs])() for n, m in gen_models.items()} for bs in args.batch_sizes}
        big = max(args.batch_sizes)
        report["generate_checks"] = {n: {"differs_from_base": bool(not torch.equal(first[big][n], first[big]["base"]))}
                                     for n in gen_models if n != "base"}
        names = list(gen_models)
        wall = {bs: {n: [] for n in names} for bs in args.batch_sizes}
        cpu = {bs: {n: [] for n in names} for bs in args.batch_sizes}
        for rnd in range(args.repeats):
            for bs in args.batch_sizes:
                for name in round_order(names, rnd):
                    w, c, _ = timed(generator(gen_models[name], gen_batches[bs]))
                    wall[bs][name].append(w)
                    cpu[bs][name].append(c)
            print(f"generate round {rnd + 1}/{args.repeats}, load {load_average()}", flush=True)
        report["generate"] = {
            f"batch_{bs}": {name: {"wall_s": summary(wall[bs][name]), "cpu_s": summary(cpu[bs][name]),
                                   "wall_ratio": ratio_summary(wall[bs][name], wall[bs]["base"]),
                                   "cpu_ratio": ratio_summary(cpu[bs][name], cpu[bs]["base"])}
                            for name in names}
            for bs in args.batch_sizes
        }
    write_json(args.out, report)

    print(f"\npeers ({', '.join(f'{k} {v}' for k, v in versions.items())}); {report['machine']['cpu_count']} cores, "
          f"{report['machine']['torch_threads']} torch threads; {args.repeats} rounds; headline clock: {headline}")
    if "generate" in report:
        print("| generate | batch | ÷ base, CPU time | ÷ base, wall time |\n|---|---|---|---|")
        for bs in args.batch_sizes:
            for name in names[1:]:
                r = report["generate"][f"batch_{bs}"][name]
                print(f"| {name} | {bs} | {spread(r['cpu_ratio'])} | {spread(r['wall_ratio'])} |")
    if "decode_steps" in report:
        print("| decode step | batch | ms (median) | ÷ base, CPU [p25–p75] |\n|---|---|---|---|")
        for bs in args.batch_sizes:
            for name in names[1:]:
                r = report["decode_steps"][f"batch_{bs}"][name]
                print(f"| {name} | {bs} | {r['cpu_ms']['median']:.1f} | {spread(r['cpu_ratio'], True)} |")
    if "calibration" in report:
        print("| calibration | pairs/s | throughput ÷ bare, CPU | throughput ÷ bare, wall |\n|---|---|---|---|")
        for name, r in report["calibration"].items():
            print(f"| {name} | {r['pairs_per_s']['median']:.2f} | {spread(r['cpu_throughput_ratio'])} | "
                  f"{spread(r['wall_throughput_ratio'])} |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
