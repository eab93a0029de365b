#!/usr/bin/env python
"""SFT + SADI: fine-tune a LoRA on SST-2, then calibrate a SADI adapter on top of it (the paper's SFT+SADI rows).

1. a short LoRA fine-tune of the model on SST-2 train sentences (loss on the label word only), on CPU;
2. a SADI-HEAD adapter added on top of the LoRA (both active) and calibrated on other SST-2 train pairs;
3. accuracy on held-out SST-2 validation sentences for base / LoRA / LoRA+SADI (restricted choice Positive/Negative);
4. the stack saved as one folder (LoRA at the root, SADI in sadi/) and loaded back with identical logits;
5. the other route: LoRA merged into the weights first, SADI calibrated on the merged model.

K and delta are fixed here, not tuned (the harness's search picks them on validation data).

    python examples/stack_with_lora.py           # SmolLM2-135M-Instruct, a few minutes on 2 CPU cores
    python examples/stack_with_lora.py --tiny    # smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import add_model_arguments, load
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import sadi_peft
from sadi_peft.tasks import SST2_LABEL_WORDS, first_token_ids, load_sst2, select_examples, sst2_choice_accuracy
from sadi_peft.tasks import sst2_pairs, sst2_prompt


def train_lora(model, tokenizer, examples, *, steps: int, batch_size: int, lr: float, seed: int):
    """Next-token cross-entropy on the label word's first token after the SST-2 prompt (left-padded batches)."""
    label_ids = torch.tensor(first_token_ids(tokenizer, SST2_LABEL_WORDS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    tokenizer.padding_side = "left"
    model.train()
    for step in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        batch = tokenizer([sst2_prompt(examples[i]["text"]) for i in idx], return_tensors="pt", padding=True)
        targets = label_ids[torch.tensor([examples[i]["label"] for i in idx])]
        logits = model(**batch).logits[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  LoRA step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=60, help="LoRA optimisation steps")
    parser.add_argument("--n-pairs", type=int, default=200, help="SADI calibration pairs (SST-2 train)")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out SST-2 validation sentences")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--delta", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("outputs/lora-plus-sadi"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.n_pairs, args.n_eval = 3, 8, 8

    train = load_sst2("train", args.data_dir)
    lora_examples = select_examples(train[: len(train) // 2], 2000, args.seed)  # disjoint halves of train
    pairs = sst2_pairs(select_examples(train[len(train) // 2 :], args.n_pairs, args.seed))
    held_out = select_examples(load_sst2("validation", args.data_dir), args.n_eval, args.seed)
    model, tokenizer = load(args)
    base_path = model.name_or_path
    t0 = time.perf_counter()

    def accuracy(m) -> float:
        return sst2_choice_accuracy(m, tokenizer, held_out, 16, progress=False)

    results = {"base": accuracy(model)}
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    train_lora(model, tokenizer, lora_examples, steps=args.steps, batch_size=8, lr=1e-3, seed=args.seed)
    results["LoRA"] = accuracy(model)

    sadi_peft.add_sadi_adapter(model, sadi_peft.SADIConfig(variant="head", top_k=args.top_k, delta=args.delta), "sadi")
    sadi_peft.calibrate(model, tokenizer, pairs, adapter_name="sadi", batch_size=16, show_progress=False)
    results["LoRA+SADI-HEAD"] = accuracy(model)

    sadi_peft.save_pretrained(model, args.out)
    reloaded = sadi_peft.load_stack(AutoModelForCausalLM.from_pretrained(base_path), args.out)
    batch = tokenizer([sst2_prompt(held_out[0]["text"])], return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, reloaded(**batch).logits)

    # Route 2: merge the LoRA into the weights first, then calibrate SADI on the merged model. For a SADI adapter on
    # a module the LoRA also wraps this is the same function as the stack (SADI scales what W + BA sees).
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), args.out).merge_and_unload()
    steered_merged = get_peft_model(merged, sadi_peft.SADIConfig(variant="head", top_k=args.top_k, delta=args.delta))
    sadi_peft.calibrate(steered_merged, tokenizer, pairs, batch_size=16, show_progress=False)
    results["LoRA merged, +SADI"] = accuracy(steered_merged)

    print(f"Held-out SST-2 accuracy ({len(held_out)} validation sentences; {time.perf_counter() - t0:.0f} s):")
    for name, value in results.items():
        print(f"  {name:<20} {value:.3f}")
    print(f"stack saved to {args.out} (LoRA at the root, SADI in sadi/); reloaded with load_stack: identical = {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
