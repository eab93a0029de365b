#!/usr/bin/env python
"""Load a SADI adapter from the Hugging Face Hub by repo id and generate, with and without steering.

    python examples/load_from_hub.py --repo-id user/sadi-adapter [--revision COMMIT] [--base BASE_ID] [--prompt ...]
    python examples/load_from_hub.py --offline-demo

``import sadi_peft`` must come before loading: PEFT has no plugin discovery, and without the import loading a SADI
adapter fails inside PEFT with ``KeyError: 'SADI'``. The repo is checked first with
``sadi_peft.hub.load_adapter_config`` (a LoRA, a full model or a missing repo is refused with a message saying what
was found); the base model comes from ``--base`` or from the adapter's ``base_model_name_or_path``.

``--offline-demo`` needs no network and runs in seconds: it builds a tiny random Llama with a character-level
tokenizer, calibrates a SADI-HEAD adapter on a few hand-written pairs, lays the base model and the folder that
``sadi_peft.hub.push_to_hub`` would upload into a temporary huggingface_hub cache (``sadi_peft.hub.add_to_hf_cache``),
sets ``HF_HUB_OFFLINE=1`` and then loads both by repo id through the normal code path, with the revision pinned to
the adapter's commit. The tiny model is random, so its text is noise; the point is the loading path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEMO_BASE_ID = "sadi-demo/tiny-llama"
DEMO_REPO_ID = "sadi-demo/tiny-sadi-head"
DEMO_PAIRS = [
    ("Review: a wonderful, moving film. Sentiment:", "Positive", "Negative"),
    ("Review: dull and far too long. Sentiment:", "Negative", "Positive"),
    ("Review: the cast is superb. Sentiment:", "Positive", "Negative"),
    ("Review: I want my money back. Sentiment:", "Negative", "Positive"),
    ("Review: smart and funny. Sentiment:", "Positive", "Negative"),
    ("Review: a waste of a good premise. Sentiment:", "Negative", "Positive"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Load a SADI adapter from the Hub by repo id and generate with and without steering.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repo-id", default=None, help="Hub repo of the SADI adapter, 'user-or-org/name'")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the adapter repo (pins a version)")
    parser.add_argument("--base", default=None,
                        help="base model id or folder (default: base_model_name_or_path from the adapter config)")
    parser.add_argument("--prompt", default="Review: an absolute delight from start to end. Sentiment:",
                        help="prompt to complete")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (greedy)")
    parser.add_argument("--offline-demo", action="store_true",
                        help="build a tiny adapter, lay it into a temporary HF cache and load it by repo id offline")
    args = parser.parse_args(argv)
    if not args.offline_demo and not args.repo_id:
        parser.error("pass --repo-id (or --offline-demo)")
    return args


# ---------------------------------------------------------------------------------------------------- offline demo
def _char_tokenizer():
    """A character-level fast tokenizer (no download): printable ASCII plus the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


def build_offline_demo(root: Path) -> tuple[str, str, str]:
    """Publish a tiny base model and SADI adapter into the HF cache under ``root``; (repo id, commit, base id)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import sadi_peft
    from sadi_peft import hub

    tokenizer = _char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    base_dir = root / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    hub.add_to_hf_cache(base_dir, DEMO_BASE_ID)

    base = AutoModelForCausalLM.from_pretrained(DEMO_BASE_ID)  # by repo id, from the cache: recorded as the base
    model = get_peft_model(base, sadi_peft.SADIConfig(variant="head", top_k=3, delta=30.0))
    sadi_peft.calibrate(model, tokenizer, DEMO_PAIRS, batch_size=3, show_progress=False)
    upload = hub.push_to_hub(
        model, DEMO_REPO_ID, dataset=f"{len(DEMO_PAIRS)} hand-written movie-review pairs (demo)",
        description="A demo adapter on a tiny random model: it shows the loading path, not a steering effect.",
        dry_run_dir=root / "upload",
    )
    commit = hub.add_to_hf_cache(upload, DEMO_REPO_ID)
    print(f"Offline demo: laid {DEMO_BASE_ID} and {DEMO_REPO_ID}@{commit[:12]} into {os.environ['HF_HOME']}")
    return DEMO_REPO_ID, commit, DEMO_BASE_ID


# ---------------------------------------------------------------------------------------------------- loading
def load_and_generate(repo_id: str, revision: str | None, base: str | None, prompt: str, max_new_tokens: int,
                      check_transformers_path: bool = False) -> None:
    import sadi_peft  # noqa: F401, I001 - registers the "SADI" PEFT type: import it before loading
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sadi_peft.hub import load_adapter_config

    config = load_adapter_config(repo_id, revision=revision)  # refuses a repo that holds no SADI adapter
    base_id = base or config.base_model_name_or_path
    if not base_id:
        raise SystemExit(f"{repo_id} records no base model: pass --base.")
    tokenizer = AutoTokenizer.from_pretrained(base_id)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_id), repo_id, revision=revision)
    model.eval()
    print(
        f"SADI-{config.variant.upper()} adapter {repo_id}@{revision or 'main'} loaded by repo id on {base_id}: "
        f"K={config.top_k}, gain 1 + delta = {config.gain:g}, positions={config.positions!r}"
    )

    encoded = tokenizer(prompt, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        steered = model.generate(**inputs, **settings)
        with model.disable_adapter():
            baseline = model.generate(**inputs, **settings)
    print(f"prompt:   {prompt!r}")
    print(f"baseline: {tokenizer.decode(baseline[0, prompt_len:], skip_special_tokens=True)!r}")
    print(f"steered:  {tokenizer.decode(steered[0, prompt_len:], skip_special_tokens=True)!r}")

    if check_transformers_path:
        # The one-call transformers path; adapter_kwargs pins the adapter's revision only (a plain revision= would
        # also be applied to the base model's repo).
        other = AutoModelForCausalLM.from_pretrained(repo_id, adapter_kwargs={"revision": revision})
        with torch.no_grad():
            again = other.generate(**inputs, **settings)
        same = torch.equal(again, steered)
        print(f"AutoModelForCausalLM.from_pretrained({repo_id!r}) generates the same tokens: {same}")
        if not same:
            raise SystemExit("the transformers loading path disagrees with PEFT's")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo_id, revision, base = args.repo_id, args.revision, args.base
    if args.offline_demo:
        if "huggingface_hub" in sys.modules:  # its settings are read once, at import
            raise SystemExit("--offline-demo must set HF_HOME before huggingface_hub is imported")
        root = Path(tempfile.mkdtemp(prefix="sadi-hub-demo-"))
        os.environ["HF_HOME"] = str(root / "hf-home")
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            os.environ.pop(name, None)
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            repo_id, revision, base = build_offline_demo(root)
            load_and_generate(repo_id, revision, args.base or base, args.prompt, args.max_new_tokens,
                              check_transformers_path=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return 0
    load_and_generate(repo_id, revision, base, args.prompt, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
