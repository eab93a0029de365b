"""Shared bits of the example scripts: the model to run on (the demo model, any id/path, or a tiny random one).

The benchmark scripts (``benchmarks/``) share these too, and also take ``--device`` / ``--dtype``
(``add_model_arguments(parser, device_options=True)``): the examples compare freshly reloaded float32 CPU models
with the one they steer, so they stay on CPU in float32.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device(value: str) -> str:
    """``--device`` values: ``cpu``, ``cuda`` or ``cuda:N``, the CUDA ones only where torch sees that GPU.

    Returns the value as given (lower-cased); raises ``argparse.ArgumentTypeError`` naming it otherwise.
    """
    text = value.strip().lower()
    match = _DEVICE.match(text)
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device these scripts run on: expected cpu, cuda or "
                                         "cuda:N (N: a GPU index).")
    if match.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{value!r} asks for CUDA, but torch.cuda.is_available() is False (torch {torch.__version__}: "
                f"{f'built for CUDA {torch.version.cuda}, no GPU visible' if torch.version.cuda else 'a CPU-only build'}"
                "). Run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu."
            )
        index = int(match.group(2) or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{value!r}: there is no CUDA device {index}; torch sees {torch.cuda.device_count()} "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    return text


def add_model_arguments(parser: argparse.ArgumentParser, *, device_options: bool = False,
                        cpu_only: str | None = None) -> None:
    """``--model`` and ``--tiny``; with ``device_options`` also ``--device`` and ``--dtype``.

    ``cpu_only``: the reason a script runs on CPU only (said in ``--device``'s help; :func:`require_cpu` refuses
    anything else with it).
    """
    from sadi_peft.zoo import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias, Hugging Face id or local folder")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use a tiny randomly initialised Llama with the demo model's tokenizer (seconds; for smoke tests)",
    )
    if not device_options:
        return
    device_help = "cpu (default), cuda or cuda:N: where the model and its inputs go"
    if cpu_only:
        device_help = f"cpu only here: {cpu_only}"
    parser.add_argument("--device", type=parse_device, default="cpu", help=device_help)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype the model is loaded in (default float32; bfloat16 is the usual one on a GPU)")


def require_cpu(parser: argparse.ArgumentParser, args: argparse.Namespace, reason: str) -> None:
    """Refuse a ``--device`` other than cpu, with ``reason`` (a script whose design is CPU-specific)."""
    if model_device(args).type != "cpu":
        parser.error(f"--device {args.device}: this script runs on CPU only: {reason}. Use --device cpu.")


def model_device(args: argparse.Namespace) -> torch.device:
    """The ``--device`` of ``args`` (CPU for scripts without the option)."""
    return torch.device(getattr(args, "device", None) or "cpu")


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    """The ``--dtype`` of ``args`` as a torch dtype (float32 for scripts without the option)."""
    name = getattr(args, "dtype", None) or "float32"
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported here: expected one of {sorted(DTYPES)}.")
    return DTYPES[name]


def load(args: argparse.Namespace):
    """(model, tokenizer) on ``--device`` in ``--dtype`` (CPU, float32 without those options): ``--tiny`` builds a
    2-layer random Llama saved to a temp folder, so that adapters record a base path that loads again like a real
    checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sadi_peft.zoo import load_model_and_tokenizer

    device, dtype = model_device(args), model_dtype(args)
    if not args.tiny:
        return load_model_and_tokenizer(args.model, dtype=dtype, device=None if device.type == "cpu" else device)
    tokenizer = _tokenizer(args.model)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    folder = Path(tempfile.mkdtemp(prefix="sadi-tiny-base-"))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval(), tokenizer


def _tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    from sadi_peft.zoo import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_generate(model, tokenizer, text: str, max_new_tokens: int = 30) -> str:
    """Greedy generation of a reply to one user message; returns the new text only."""
    messages = [{"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
