"""Where each SADI variant reads and scales activations, per transformers architecture.

One row per ``model_type``. Module names are suffixes relative to a decoder layer, matched the way PEFT matches
``target_modules`` (``name == suffix`` or ``name.endswith("." + suffix)``):

* ``head``: the attention output projection. SADI-HEAD scales its *input*, split into ``num_attention_heads``
  contiguous slices of ``head_dim`` columns (head-major layout, also under GQA).
* ``mlp_out``: the MLP down projection. SADI-NEURON scales its *input* (one unit per intermediate neuron),
  SADI-HIDDEN scales its *output* (one unit per hidden dimension, before the residual add).
* ``activation``: the module whose output is the post-non-linearity gate activation of a gated MLP
  (SiLU(gate) on Llama). SADI-NEURON ranks neurons on it, as the authors' code does; ``None`` for MLPs without a
  gate, where the activation output *is* the down projection input.

Architectures outside the table work when ``target_modules`` is given by hand (see :func:`get_architecture`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module-name suffixes of one architecture's SADI sites."""

    head: str
    mlp_out: str
    activation: Optional[str]
    #: name of the config attribute holding the number of attention (query) heads
    num_heads_attr: str = "num_attention_heads"


_LLAMA_LIKE = ArchitectureSpec(head="self_attn.o_proj", mlp_out="mlp.down_proj", activation="mlp.act_fn")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchitectureSpec(head="self_attn.o_proj", mlp_out="mlp.down_proj", activation="mlp.activation_fn"),
    # GPT-2 uses Conv1D (weight stored as [in, out]) and names both projections ``c_proj``.
    "gpt2": ArchitectureSpec(head="attn.c_proj", mlp_out="mlp.c_proj", activation=None, num_heads_attr="n_head"),
    "gpt_neox": ArchitectureSpec(head="attention.dense", mlp_out="mlp.dense_4h_to_h", activation=None),
    "opt": ArchitectureSpec(head="self_attn.out_proj", mlp_out="fc2", activation=None),
    "falcon": ArchitectureSpec(head="self_attention.dense", mlp_out="mlp.dense_4h_to_h", activation=None),
    # BloomMLP adds the residual *inside* the module, after dense_4h_to_h: wrapping dense_4h_to_h keeps
    # SADI-HIDDEN on the MLP output proper.
    "bloom": ArchitectureSpec(
        head="self_attention.dense", mlp_out="mlp.dense_4h_to_h", activation=None, num_heads_attr="n_head"
    ),
}

VARIANTS = ("head", "neuron", "hidden")


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def get_architecture(model_type: Optional[str]) -> ArchitectureSpec:
    """The spec for ``model_type``, or a ``ValueError`` that lists the table and the manual override."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise ValueError(
        f"SADI has no built-in module table for model_type={model_type!r}. Supported: "
        f"{', '.join(supported_model_types())}. For another architecture pass the modules by hand, e.g. "
        "SADIConfig(variant='head', target_modules=['self_attn.o_proj'], num_heads=<attention heads>) for heads, "
        "or target_modules=['mlp.down_proj'] for variant='neuron' / 'hidden' (the MLP's output projection)."
    )


def default_target(model_type: Optional[str], variant: str) -> str:
    spec = get_architecture(model_type)
    return spec.head if variant == "head" else spec.mlp_out


def activation_module(model_type: Optional[str]) -> Optional[str]:
    """Suffix of the gated-MLP activation module used to rank neurons, or ``None``."""
    if model_type not in ARCHITECTURES:
        return None
    return ARCHITECTURES[model_type].activation


def num_attention_heads(model_config) -> int:
    """Number of query heads from a transformers config (text sub-config for multimodal ones)."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    spec = ARCHITECTURES.get(getattr(text_config, "model_type", None))
    names = ([spec.num_heads_attr] if spec else []) + ["num_attention_heads", "n_head", "num_heads"]
    for name in names:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"Cannot find the number of attention heads in the config of model_type="
        f"{getattr(text_config, 'model_type', None)!r} (looked for {names}). Pass SADIConfig(num_heads=...)."
    )
