"""Exact export of a ``positions="all"`` SADI adapter for stock PEFT, transformers and serving engines.

An all-positions SADI adapter is a fixed diagonal gain ``g = 1 + delta * mask`` on one side of some Linear (or
GPT-2 ``Conv1D``) layers, which standard formats can express exactly. Each export loads **without**
``sadi_peft``:

* :func:`export_ia3` writes a plain PEFT **IA3** adapter whose ``ia3_l`` vectors are ``g``: input side (variants
  ``head`` and ``neuron``) with shape ``(1, in_features)`` and the module listed in ``feedforward_modules``; output
  side (variant ``hidden``) with shape ``(out_features, 1)``. Loads with ``PeftModel.from_pretrained`` and
  ``AutoModelForCausalLM.from_pretrained(adapter_dir)``.
* :func:`export_lora` writes an exact **LoRA**. With ``S`` the masked features of one module (``r = |S|``) and
  ``P`` the ``r x n`` selector (``P[j, S_j] = 1``): input side ``W diag(g) = W + (delta W[:, S]) P``, so
  ``lora_B = delta * W[:, S]``, ``lora_A = P``; output side ``diag(g) W = W + P^T (delta W[S, :])``, so
  ``lora_B = P^T``, ``lora_A = delta * W[S, :]``, and for a layer with a bias, PEFT's ``lora_bias=True`` with the
  ``lora_B`` bias ``delta * b`` at the masked rows (``g * (Wx + b) = Wx + b + P^T(delta W[S, :] x + delta b[S])``).
  Every module is padded to the largest ``r`` with zero rows of ``A`` / zero columns of ``B`` (still exact) and
  ``lora_alpha = r`` so PEFT's scaling is 1. **The rank is ``r``** (written to ``adapter_config.json`` and the
  folder's ``README.md``): vLLM's ``--max-lora-rank`` must be at least that (vLLM accepts 1, 8, 16, 32, 64, 128,
  256, 320, 512). Head variant: ``r = head_dim x`` (masked heads in the busiest layer). ``lora_B`` / ``lora_A``
  hold slices of the base weights, so the LoRA fits only the exact base checkpoint it was exported from.
* :func:`export_merged` writes a plain **transformers checkpoint** with the gains folded into the weights (and any
  other active non-SADI adapter layers merged too, e.g. a LoRA the SADI adapter wraps), loadable with
  ``AutoModelForCausalLM.from_pretrained(folder)``. The user's model is merged in place and restored bit for bit
  afterwards (SADI keeps a copy of the touched slices; other adapter layers get a full copy of their weights).

All three refuse a ``positions="last"`` adapter (its gain applies at one token during the prefill, which no weight
can express), an uncalibrated adapter (empty mask), a model whose SADI layers are currently merged, and another
active SADI adapter with a non-empty mask on a module the exported one also steers (the model multiplies both
gains there; export one at a time after ``set_adapter``). IA3 and LoRA exports also refuse SADI layers nested with
another adapter layer (e.g. SADI wrapping a LoRA): neither format can express ``(W + BA) diag(g)`` as a separate
adapter over the base; use :func:`export_merged`, or merge the LoRA into the base first and re-calibrate on it.

Caveats: ``lora_bias`` is a PEFT feature that recent vLLM versions no longer support (vLLM removed LoRA biases in
late 2025), so for biased output-side layers (GPT-2, OPT, GPT-NeoX ``hidden``) prefer the IA3 or merged export for
serving. Folders are written atomically (temporary sibling folder, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SADIConfig
from .layer import SADILayer
from .model import resolve_adapter, sadi_layers, transformer_model
from .saving import atomic_directory

logger = logging.getLogger(__name__)

__all__ = ["VLLM_LORA_RANKS", "export_ia3", "export_lora", "export_merged", "lora_rank", "vllm_max_lora_rank"]

PathLike = Union[str, os.PathLike]

#: The values vLLM accepts for ``--max-lora-rank`` (``vllm.config.lora.MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest value vLLM accepts for ``--max-lora-rank`` that covers a LoRA of rank ``rank``."""
    for value in VLLM_LORA_RANKS:
        if value >= rank:
            return value
    raise ValueError(
        f"A LoRA of rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}); serve the merged "
        "export instead, or steer fewer units per layer (a smaller top_k)."
    )


# ---------------------------------------------------------------------------------------------------- checks
@dataclass
class _Target:
    """One module the exported adapter steers."""

    name: str  # module name relative to the transformers model (the name stock PEFT will match)
    layer: SADILayer
    side: str  # "input" or "output"
    gain: torch.Tensor  # float32, one entry per feature of that side, on the weight's device
    features: torch.Tensor  # long, indices of the masked features (S), ascending
    conv1d: bool  # transformers Conv1D: weight stored [in, out]


def _outer_tuner_names(tmodel: nn.Module) -> dict[str, BaseTunerLayer]:
    """Outermost adapter layers (not inside another adapter layer's ``base_layer``), by module name."""
    outer: dict[str, BaseTunerLayer] = {}
    for name, module in tmodel.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        parts = name.split(".")
        if any(".".join(parts[:i]) in outer for i in range(1, len(parts))):
            continue
        outer[name] = module
    return outer


def _chain(layer: BaseTunerLayer) -> list[BaseTunerLayer]:
    """An adapter layer and the adapter layers nested in it, outermost first."""
    chain = [layer]
    while isinstance(chain[-1].base_layer, BaseTunerLayer):
        chain.append(chain[-1].base_layer)
    return chain


def _prepare(model: nn.Module, adapter_name: Optional[str], fmt: str) -> tuple[str, SADIConfig, list[_Target]]:
    """Resolve the adapter and check it can be exported as ``fmt``; return its steered modules."""
    name, config = resolve_adapter(model, adapter_name)
    if config.positions != "all":
        raise ValueError(
            f"SADI adapter {name!r} has positions={config.positions!r}: its gain applies only at the last prompt "
            "token during the prefill (generated tokens see it through the KV cache), which no weight, IA3 vector "
            "or LoRA can express, so it cannot be exported exactly. Re-create the adapter with "
            "SADIConfig(positions='all', ...) (a fixed gain on every token) and calibrate it to export it."
        )
    tmodel = transformer_model(model)
    layers = sadi_layers(model, name)
    if not layers:
        raise ValueError(f"SADI adapter {name!r} is not injected in any module of this model; nothing to export.")

    merged = [n for n, m in tmodel.named_modules() if isinstance(m, SADILayer) and m.merged]
    if merged:
        raise ValueError(
            f"SADI layers of this model are currently merged ({merged[:3]}{'...' if len(merged) > 3 else ''}); "
            "the export needs the original base weights. Call model.unmerge_adapter() (exact) first."
        )

    outer = _outer_tuner_names(tmodel)
    targets: list[_Target] = []
    for layer_name, layer in layers:
        mask = layer.sadi_mask[name]
        if not bool(mask.any()):
            continue
        for other in layer._held_active_adapters():
            if other != name and not layer.disable_adapters and bool(layer.sadi_mask[other].any()):
                raise ValueError(
                    f"Another active SADI adapter, {other!r}, also steers {layer_name}; the model multiplies both "
                    f"gains there, so an export of {name!r} alone would not reproduce it. Export them one at a time "
                    f"after activating only that one (model.set_adapter({name!r})), or delete the other adapter."
                )
        nested = isinstance(layer.base_layer, BaseTunerLayer) or layer_name not in outer
        if nested and fmt in ("ia3", "lora"):
            raise ValueError(
                f"The SADI layer at {layer_name} is nested with another adapter layer (e.g. SADI wrapping a LoRA "
                f"on the same module). A {fmt.upper()} export applies to the plain base weights and cannot express "
                "the combination; use export_merged(), or merge the other adapter into the base first "
                "(merge_and_unload) and re-create and calibrate the SADI adapter on the merged model."
            )
        base = layer.get_base_layer()
        device = base.weight.device
        if device.type == "meta":
            raise ValueError(f"The weights of {layer_name} are on the meta device (offloaded); load them first.")
        unit_size = layer.sadi_unit_size[name]
        feature_mask = mask.to(torch.bool).repeat_interleave(unit_size).to(device)
        gain = 1.0 + layer.sadi_delta[name] * feature_mask.to(torch.float32)
        targets.append(
            _Target(
                name=_plain_name(layer_name),
                layer=layer,
                side=layer.sadi_side[name],
                gain=gain,
                features=torch.nonzero(feature_mask).squeeze(1),
                conv1d=isinstance(base, Conv1D),
            )
        )
    if not targets:
        raise ValueError(
            f"SADI adapter {name!r} has an empty mask (it was never calibrated), so there is nothing to export. "
            "Call sadi_peft.calibrate(model, tokenizer, pairs) first."
        )
    return name, config, targets


def _plain_name(module_name: str) -> str:
    """Module name without PEFT's ``.base_layer`` hops (the name the module has in the plain base model)."""
    return ".".join(part for part in module_name.split(".") if part != "base_layer")


def _base_info(config: SADIConfig) -> dict[str, Any]:
    return {"base_model_name_or_path": config.base_model_name_or_path, "revision": config.revision}


def _weight_dtype(targets: list[_Target]) -> torch.dtype:
    return targets[0].layer.get_base_layer().weight.dtype


# ---------------------------------------------------------------------------------------------------- writing
def _save_adapter(folder: Path, peft_config: Any, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    peft_config.save_pretrained(str(folder))
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})


def _write_readme(folder: Path, title: str, name: str, config: SADIConfig, lines: list[str]) -> None:
    num_pairs = (config.calibration or {}).get("num_pairs")
    pairs = f", calibrated on {num_pairs} pairs" if num_pairs else ""
    body = [
        f"# {title}",
        "",
        f"Exported from the SADI adapter `{name}` (variant `{config.variant}`, top_k {config.top_k}, gain "
        f"1 + delta = {config.gain:g}, positions `all`{pairs}) with `sadi_peft.export`. Loading it does not need "
        "`sadi_peft`.",
        "",
        f"Base model: `{config.base_model_name_or_path}`"
        + (f" (revision `{config.revision}`)" if config.revision else ""),
        "",
        *lines,
        "",
    ]
    (folder / "README.md").write_text("\n".join(body), encoding="utf-8")


def _fan_in_fan_out(targets: list[_Target]) -> bool:
    kinds = {t.conv1d for t in targets}
    if len(kinds) > 1:
        raise ValueError(
            "The exported modules mix transformers Conv1D and nn.Linear layers, which need different "
            "fan_in_fan_out settings in one PEFT config; this export does not support that."
        )
    return kinds.pop()


# ---------------------------------------------------------------------------------------------------- IA3
def export_ia3(model: nn.Module, output_dir: PathLike, *, adapter_name: Optional[str] = None) -> Path:
    """Write a ``positions="all"`` SADI adapter as an exact plain PEFT IA3 adapter.

    ``ia3_l`` is the SADI gain ``g`` (stored in the base weight dtype): shape ``(1, in_features)`` on the input side
    (variants ``head``, ``neuron``; the module is listed in ``feedforward_modules``), ``(out_features, 1)`` on the
    output side (``hidden``). Only modules with masked units are included, under their exact names.

    Args:
        model: a ``PeftModel`` with the SADI adapter, or a transformers model that got it through ``load_adapter``.
        output_dir: folder to write (replaced atomically if it exists).
        adapter_name: which SADI adapter; defaults to the single active one.

    Returns:
        The folder, holding ``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md``; it loads
        with stock ``PeftModel.from_pretrained(base, folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)``.

    Raises:
        ValueError: a ``positions="last"`` or uncalibrated adapter, merged SADI layers, another active SADI adapter
            on a shared module, or SADI nested with another adapter layer.
    """
    from peft import IA3Config

    name, config, targets = _prepare(model, adapter_name, "ia3")
    dtype = _weight_dtype(targets)
    tensors: dict[str, torch.Tensor] = {}
    for t in targets:
        vector = t.gain.to(dtype)
        tensors[f"base_model.model.{t.name}.ia3_l"] = vector.unsqueeze(0) if t.side == "input" else vector.unsqueeze(1)
    names = [t.name for t in targets]
    ia3_config = IA3Config(
        target_modules=names,
        feedforward_modules=[t.name for t in targets if t.side == "input"],
        fan_in_fan_out=_fan_in_fan_out(targets),
        task_type=config.task_type,
        inference_mode=True,
        **_base_info(config),
    )
    with atomic_directory(output_dir) as folder:
        _save_adapter(folder, ia3_config, tensors)
        _write_readme(
            folder, "IA3 export of a SADI steering adapter", name, config,
            [f"Modules ({len(names)}): " + ", ".join(f"`{n}`" for n in names)],
        )
    logger.info("Exported SADI adapter %r as IA3 (%d modules) to %s", name, len(names), output_dir)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------- LoRA
def export_lora(model: nn.Module, output_dir: PathLike, *, adapter_name: Optional[str] = None) -> Path:
    """Write a ``positions="all"`` SADI adapter as an exact LoRA (uniform rank ``r``, scaling 1).

    Input side (``head``, ``neuron``): ``lora_B = delta * W[:, S]``, ``lora_A`` = the selector of the masked input
    features ``S``. Output side (``hidden``): ``lora_B`` = the selector transposed, ``lora_A = delta * W[S, :]``,
    plus ``lora_bias=True`` with the ``lora_B`` bias ``delta * b`` at the masked rows when the layers have a bias.
    Computed in float32 from the current base weights, stored in the base weight dtype; every module is padded to
    the largest per-module rank with zero rows/columns. ``r`` (= ``lora_alpha``) is recorded in
    ``adapter_config.json`` and ``README.md``; vLLM needs ``--max-lora-rank`` >= ``r``
    (:func:`vllm_max_lora_rank`). GPT-2 ``Conv1D`` layers get ``fan_in_fan_out=True``.

    Args:
        model: a ``PeftModel`` with the SADI adapter, or a transformers model that got it through ``load_adapter``.
        output_dir: folder to write (replaced atomically if it exists).
        adapter_name: which SADI adapter; defaults to the single active one.

    Returns:
        The folder; it loads with stock ``PeftModel.from_pretrained`` (also after ``merge_and_unload()``) and
        ``AutoModelForCausalLM.from_pretrained(folder)``.

    Raises:
        ValueError: as :func:`export_ia3`, and for output-side layers of which only some have a bias.
    """
    from peft import LoraConfig

    name, config, targets = _prepare(model, adapter_name, "lora")
    dtype = _weight_dtype(targets)
    rank = max(int(t.features.numel()) for t in targets)
    fan_in_fan_out = _fan_in_fan_out(targets)
    output_side = targets[0].side == "output"
    has_bias = {getattr(t.layer.get_base_layer(), "bias", None) is not None for t in targets}
    lora_bias = output_side and True in has_bias
    if lora_bias and len(has_bias) > 1:
        raise ValueError(
            "Some of the steered output-side layers have a bias and others do not; LoRA's lora_bias is one setting "
            "for the whole adapter, so this cannot be exported exactly as one LoRA. Use export_ia3 or export_merged."
        )

    tensors: dict[str, torch.Tensor] = {}
    delta = float(config.delta)
    for t in targets:
        base = t.layer.get_base_layer()
        with torch.no_grad():
            weight = base.weight.detach().to(torch.float32)
            if t.conv1d:
                weight = weight.t()  # Conv1D stores [in, out]; LoRA's A/B are in nn.Linear's [out, in] convention
            out_features, in_features = weight.shape
            S = t.features.to(weight.device)
            r = int(S.numel())
            cols = torch.arange(r, device=weight.device)
            A = torch.zeros(rank, in_features, dtype=torch.float32, device=weight.device)
            B = torch.zeros(out_features, rank, dtype=torch.float32, device=weight.device)
            if t.side == "input":
                B[:, :r] = delta * weight[:, S]
                A[cols, S] = 1.0
            else:
                A[:r, :] = delta * weight[S, :]
                B[S, cols] = 1.0
            prefix = f"base_model.model.{t.name}"
            tensors[f"{prefix}.lora_A.weight"] = A.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = B.to(dtype)
            if lora_bias:
                bias = torch.zeros(out_features, dtype=torch.float32, device=weight.device)
                bias[S] = delta * base.bias.detach().to(torch.float32)[S]
                tensors[f"{prefix}.lora_B.bias"] = bias.to(base.bias.dtype)
    names = [t.name for t in targets]
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=names,
        lora_dropout=0.0,
        use_rslora=False,
        use_dora=False,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        lora_bias=lora_bias,
        task_type=config.task_type,
        inference_mode=True,
        **_base_info(config),
    )
    with atomic_directory(output_dir) as folder:
        _save_adapter(folder, lora_config, tensors)
        lines = [
            f"**LoRA rank r = {rank}** (lora_alpha = r, so the scaling is 1). vLLM: "
            f"`--enable-lora --max-lora-rank {_vllm_rank_text(rank)} --lora-modules sadi=<this folder>`.",
            "",
            f"Modules ({len(names)}): " + ", ".join(f"`{n}`" for n in names),
        ]
        if lora_bias:
            lines += ["", "Uses PEFT's `lora_bias=True` (biased output-side layers); vLLM no longer supports LoRA "
                      "biases, so serve the IA3 or merged export there."]
        _write_readme(folder, "Exact LoRA export of a SADI steering adapter", name, config, lines)
    logger.info(
        "Exported SADI adapter %r as LoRA (rank %d, %d modules%s) to %s; vLLM needs --max-lora-rank >= %d",
        name, rank, len(names), ", lora_bias" if lora_bias else "", output_dir, rank,
    )
    return Path(output_dir)


def _vllm_rank_text(rank: int) -> str:
    try:
        return str(vllm_max_lora_rank(rank))
    except ValueError:
        return f"{rank} (above vLLM's maximum: use the merged export)"


def lora_rank(folder: PathLike) -> int:
    """The rank ``r`` recorded in an exported LoRA's ``adapter_config.json``."""
    return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])


# ---------------------------------------------------------------------------------------------------- merged
def _plain_state_dict(tmodel: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under the plain base model's key names.

    For every outermost adapter layer only the tensors of its innermost base layer are kept, renamed without the
    ``.base_layer`` hops; adapter tensors (``sadi_*``, ``lora_*``, ...) are dropped.
    """
    outer = {name: _chain(layer) for name, layer in _outer_tuner_names(tmodel).items()}
    state = tmodel.state_dict()
    plain: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in outer), None)
        if owner is None:
            plain[key] = value
            continue
        hops = "base_layer." * len(outer[owner])
        rest = key[len(owner) + 1:]
        if rest.startswith(hops):
            plain[f"{owner}.{rest[len(hops):]}"] = value
    return plain


def _restore(layer: BaseTunerLayer, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Undo a non-SADI adapter layer's merge by writing back the copied base weight and bias."""
    base = layer.get_base_layer()
    with torch.no_grad():
        for param, value in ((base.weight, weight), (getattr(base, "bias", None), bias)):
            if value is None or param is None:
                continue
            if param.shape == value.shape and param.dtype == value.dtype:
                param.copy_(value)
            else:  # the merge replaced the tensor
                param.data = value
    layer.merged_adapters.clear()


@contextlib.contextmanager
def _saving_as_plain_model(tmodel: nn.Module) -> Iterator[None]:
    """Make transformers' ``save_pretrained`` write a full checkpoint for a model that got adapters through
    ``load_adapter``.

    Such a model has ``_hf_peft_config_loaded = True`` (``save_pretrained`` would write only the adapters) and its
    ``_weight_conversions`` replaced by PEFT's loading map (reverting it on save would prefix every key with
    ``base_model.model.``); both are set aside for the duration of the save: with ``_weight_conversions = None``
    transformers reverts the model class's default conversions, as for a model built from its config.
    """
    if not getattr(tmodel, "_hf_peft_config_loaded", False):
        yield
        return
    keys = ("_hf_peft_config_loaded", "_weight_conversions")
    saved = {key: tmodel.__dict__[key] for key in keys if key in tmodel.__dict__}
    tmodel.__dict__["_hf_peft_config_loaded"] = False
    tmodel.__dict__["_weight_conversions"] = None
    try:
        yield
    finally:
        for key in keys:
            if key in saved:
                tmodel.__dict__[key] = saved[key]
            else:
                tmodel.__dict__.pop(key, None)


def export_merged(
    model: nn.Module, output_dir: PathLike, *, adapter_name: Optional[str] = None, tokenizer: Any = None
) -> Path:
    """Write a plain transformers checkpoint with the SADI gains folded into the weights.

    The model is merged in place, its state dict saved under the plain key names (no ``.base_layer``, no adapter
    tensors) with ``save_pretrained(folder, state_dict=...)``, and then restored bit for bit, also when saving
    fails: SADI's unmerge restores the touched slices from its own copy. Other active, unmerged non-SADI adapter
    layers (for example a LoRA the SADI layer wraps, or one on other modules) are merged as well, innermost first,
    so the checkpoint computes what the model computes; their base weights are copied before and written back after
    (a full copy of each such module's weight and bias). Other SADI adapters are not folded.

    Args:
        model: a ``PeftModel`` with the SADI adapter, or a transformers model that got it through ``load_adapter``.
        output_dir: folder to write (replaced atomically if it exists).
        adapter_name: which SADI adapter; defaults to the single active one.
        tokenizer: saved into the folder too when given.

    Returns:
        The folder; it loads with ``AutoModelForCausalLM.from_pretrained(folder)``.

    Raises:
        ValueError: a ``positions="last"`` or uncalibrated adapter, merged SADI layers, another active SADI adapter
            on a shared module, or a PEFT ``modules_to_save`` / trainable-token wrapper in the model.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    name, config, _ = _prepare(model, adapter_name, "merged")
    tmodel = transformer_model(model)
    wrappers = [n for n, m in tmodel.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    if wrappers:
        raise ValueError(
            f"The model holds PEFT modules_to_save / trainable-token wrappers ({wrappers[:3]}); export_merged folds "
            "adapter layers only. Merge and unload that adapter first."
        )

    # merge plan: per outermost adapter layer, its chain innermost first
    plan: list[BaseTunerLayer] = []
    for layer in _outer_tuner_names(tmodel).values():
        plan.extend(reversed(_chain(layer)))

    # undo log, in merge order: (SADI layer, None) or (other adapter layer, (weight copy, bias copy))
    done: list[tuple[BaseTunerLayer, Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]]] = []
    try:
        for layer in plan:
            if isinstance(layer, SADILayer):
                if name in layer.sadi_mask and bool(layer.sadi_mask[name].any()):
                    done.append((layer, None))
                    layer.merge(adapter_names=[name])
                continue
            if layer.merged or layer.disable_adapters or not list(layer.active_adapters):
                continue
            base = layer.get_base_layer()
            bias = getattr(base, "bias", None)
            done.append((layer, (base.weight.detach().clone(), None if bias is None else bias.detach().clone())))
            layer.merge()
        state = _plain_state_dict(tmodel)
        with atomic_directory(output_dir) as folder, _saving_as_plain_model(tmodel):
            tmodel.save_pretrained(str(folder), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(folder))
    finally:
        for layer, backup in reversed(done):
            if backup is None:
                if layer.merged:
                    layer.unmerge()  # SADI: restores the touched slices from its own copy, bit for bit
                continue
            _restore(layer, *backup)
    n_sadi = sum(1 for _, backup in done if backup is None)
    n_other = len(done) - n_sadi
    logger.info(
        "Exported SADI adapter %r merged into a plain checkpoint (gains folded into %d layers%s) at %s",
        name, n_sadi, f", {n_other} other adapter layers merged" if n_other else "", output_dir,
    )
    return Path(output_dir)
