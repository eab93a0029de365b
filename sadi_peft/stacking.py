"""SADI together with other PEFT adapters (LoRA first of all): add, load, and merge the stack exactly.

PEFT refuses to mix adapter types in one ``PeftModel`` (``add_adapter`` / ``load_adapter`` raise "Cannot combine
adapters with different peft types") and ``PeftMixedModel`` does not admit SADI. The tuner layers themselves nest
fine, so a SADI adapter is injected into the model that already carries the LoRA layers; on a module both wrap,
SADI is the outer layer and scales what the LoRA-adapted layer sees: ``y = (W + BA) diag(g) x`` — the same as merging
the LoRA first and steering the merged model.

``PeftModel.save_pretrained`` then writes the LoRA adapter at the root of the folder and the SADI adapter in a
sub-folder named after it; :func:`load_sadi_adapter` puts it back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Union

from peft import PeftConfig, PeftModel, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict
from peft.utils.other import _get_submodules
from torch import nn

from .config import SADIConfig
from .layer import SADILayer
from .model import _release_context_if_unused, transformer_model

logger = logging.getLogger(__name__)


def _existing_names(model: nn.Module) -> list[str]:
    return list((getattr(model, "peft_config", None) or getattr(transformer_model(model), "peft_config", None) or {}))


def add_sadi_adapter(model: nn.Module, config: SADIConfig, adapter_name: str = "sadi") -> nn.Module:
    """Inject a new, active SADI adapter into a model that may already carry other adapters (e.g. a LoRA PeftModel).

    The other adapters stay active. Calibrate it with ``sadi_peft.calibrate(model, tok, pairs, adapter_name=...)``:
    the statistics are then taken on the model as it runs with those adapters.
    """
    if not isinstance(config, SADIConfig):
        raise TypeError(f"config must be a sadi_peft.SADIConfig, got {type(config).__name__}.")
    if adapter_name in _existing_names(model):
        raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another adapter_name.")
    inner = transformer_model(model)
    if config.base_model_name_or_path is None:
        others = getattr(inner, "peft_config", None) or {}
        config.base_model_name_or_path = next(
            (c.base_model_name_or_path for c in others.values() if c.base_model_name_or_path),
            getattr(inner, "name_or_path", None) or None,
        )
    inject_adapter_in_model(config, inner, adapter_name)
    if isinstance(model, PeftModel) and model.peft_config is not inner.peft_config:
        model.peft_config[adapter_name] = config
    return model


def load_sadi_adapter(
    model: nn.Module, model_id: Union[str, os.PathLike], adapter_name: str = "sadi", **hub_kwargs: Any
) -> nn.Module:
    """Load a saved SADI adapter on top of a model that may carry other adapters, keeping them all active.

    ``model`` is a ``PeftModel`` of any type (for instance the LoRA it was calibrated on, loaded with
    ``PeftModel.from_pretrained``) or a plain transformers model. ``model_id`` is a folder or Hub repo id;
    ``hub_kwargs`` (``revision``, ``token``, ...) go to the download.
    """
    config = PeftConfig.from_pretrained(str(model_id), **hub_kwargs)
    if not isinstance(config, SADIConfig):
        raise ValueError(
            f"{str(model_id)!r} holds a {getattr(config.peft_type, 'value', config.peft_type)} adapter, not a SADI "
            "adapter; load it with PeftModel.from_pretrained / load_adapter instead."
        )
    if not isinstance(model, PeftModel):
        # transformers' own adapter path; SADI layers join the adapters that are already active
        active = list(model.active_adapters()) if getattr(model, "_hf_peft_config_loaded", False) else []
        model.load_adapter(str(model_id), adapter_name=adapter_name, **hub_kwargs)
        if active:
            model.set_adapter(active + [adapter_name])
        return model
    config.inference_mode = True
    add_sadi_adapter(model, config, adapter_name)
    weights = load_peft_weights(str(model_id), **hub_kwargs)
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    missing = [key for key in result.missing_keys if "sadi_" in key and f".{adapter_name}" in key]
    if missing:
        raise ValueError(f"The SADI adapter at {str(model_id)!r} lacks {len(missing)} tensors, e.g. {missing[:3]}.")
    return model


def _merge_chain(layer: nn.Module) -> nn.Module:
    """Merge a chain of nested tuner layers innermost first and return the plain module."""
    if isinstance(layer, SADILayer):
        return layer.unload_and_optionally_merge_module(merge=True)
    if isinstance(layer, BaseTunerLayer):
        inner = layer.base_layer
        if isinstance(inner, BaseTunerLayer):
            layer.base_layer = _merge_chain(inner)
        layer.merge()
        return layer.get_base_layer()
    return layer


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter layer of the model into its weights, exactly, whatever the nesting order.

    PEFT's own ``merge_and_unload`` merges only the outermost layer of a nested stack; sadi-peft's layers merge what
    they wrap first, so ``PeftModel.merge_and_unload()`` is exact when SADI is outermost (the order that
    :func:`add_sadi_adapter` and :func:`load_sadi_adapter` produce). This function is exact for any order (e.g. a
    LoRA loaded after SADI through transformers' ``load_adapter``). Returns the plain transformers model.
    """
    inner = transformer_model(model)
    for module in inner.modules():  # refuse before any layer is merged
        if isinstance(module, SADILayer):
            module._check_mergeable(module._held_active_adapters())
    tuner_names = {name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)}
    outermost = [name for name in tuner_names if not any(name.startswith(other + ".") for other in tuner_names)]
    for name in sorted(outermost):
        parent, target, attr = _get_submodules(inner, name)
        setattr(parent, attr, _merge_chain(target))
    leftovers = [name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)]
    if leftovers:
        raise RuntimeError(f"Adapter layers left after merging: {leftovers[:3]}")
    _release_context_if_unused(inner)
    if hasattr(inner, "peft_config"):
        del inner.peft_config
    inner._hf_peft_config_loaded = False
    return inner


def _nested_paths(model: nn.Module) -> list[str]:
    """Module paths where a SADI layer wraps another adapter layer (PEFT then names the inner keys ``P.base_layer.*``)."""
    inner = transformer_model(model)
    return [
        name
        for name, module in inner.named_modules()
        if isinstance(module, SADILayer) and isinstance(module.base_layer, BaseTunerLayer)
    ]


def flatten_nested_keys(state_dict: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """``X.P.base_layer.lora_A.weight`` -> ``X.P.lora_A.weight`` for each SADI-wrapped module path ``P``.

    PEFT names adapter keys after the module tree, so a LoRA inside a SADI wrapper gets a ``base_layer`` segment that
    a LoRA-only model does not have. Flattening gives the LoRA file the names stock PEFT expects.
    """
    fixed = {}
    for key, value in state_dict.items():
        for path in paths:
            marker = f"{path}.base_layer."
            at = key.find(marker)
            if at >= 0 and (at == 0 or key[at - 1] == ".") and not key[at + len(marker) :].startswith("base_layer."):
                key = key[:at] + f"{path}." + key[at + len(marker) :]
                break
        fixed[key] = value
    return fixed


def fix_saved_stack(model: nn.Module, save_directory: Union[str, os.PathLike]) -> None:
    """Rewrite the non-SADI adapter files in ``save_directory`` with flattened key names (see above)."""
    from safetensors.torch import load_file, save_file

    paths = _nested_paths(model)
    if not paths:
        return
    for name, folder in saved_adapter_dirs(save_directory).items():
        config = PeftConfig.from_pretrained(str(folder))
        weights_file = folder / "adapter_model.safetensors"
        if isinstance(config, SADIConfig) or not weights_file.exists():
            continue
        tensors = load_file(str(weights_file))
        fixed = flatten_nested_keys(tensors, paths)
        if fixed != tensors:
            save_file(fixed, str(weights_file), metadata={"format": "pt"})
            logger.info("Rewrote %d nested key names of adapter %r in %s", len(tensors), name, weights_file)


def load_stack(base_model: nn.Module, model_id: Union[str, os.PathLike], **hub_kwargs: Any) -> PeftModel:
    """Load a folder written by ``save_pretrained`` of a stack (e.g. LoRA at the root, SADI in ``sadi/``).

    The other adapters load first through ``PeftModel.from_pretrained`` / ``load_adapter``, then the SADI adapters
    through :func:`load_sadi_adapter`, so SADI wraps the LoRA layers as when it was calibrated. All end up active.
    Folders written by plain ``PeftModel.save_pretrained`` (LoRA keys with ``base_layer`` segments) load too.
    """
    from safetensors.torch import load_file

    dirs = saved_adapter_dirs(model_id)
    configs = {name: PeftConfig.from_pretrained(str(folder)) for name, folder in dirs.items()}
    others = [name for name, config in configs.items() if not isinstance(config, SADIConfig)]
    sadis = [name for name, config in configs.items() if isinstance(config, SADIConfig)]
    if not others:
        raise ValueError(
            f"{str(model_id)!r} holds no non-SADI adapter ({sorted(configs)}); load a single SADI adapter with "
            "PeftModel.from_pretrained(base, path)."
        )
    model = PeftModel.from_pretrained(base_model, str(dirs[others[0]]), adapter_name=others[0], **hub_kwargs)
    for name in others[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name, **hub_kwargs)
    for name in sadis:
        load_sadi_adapter(model, dirs[name], adapter_name=name, **hub_kwargs)
    # LoRA files saved by plain PeftModel.save_pretrained name SADI-wrapped modules "P.base_layer.lora_*": now that
    # SADI wraps them again those names exist, so load them (again) as they are.
    for name in others:
        weights_file = dirs[name] / "adapter_model.safetensors"
        if weights_file.exists():
            tensors = load_file(str(weights_file))
            if any(".base_layer." in key for key in tensors):
                set_peft_model_state_dict(model, tensors, adapter_name=name)
    active = others + sadis
    from peft.tuners.tuners_utils import set_adapter

    set_adapter(transformer_model(model), active)
    model.eval()
    return model


def saved_adapter_dirs(path: Union[str, os.PathLike]) -> dict[str, Path]:
    """The adapters ``PeftModel.save_pretrained`` wrote to ``path``: ``{"default": path, name: path/name, ...}``."""
    root = Path(path)
    found = {}
    if (root / "adapter_config.json").exists():
        found["default"] = root
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if (child / "adapter_config.json").exists():
            found[child.name] = child
    return found

