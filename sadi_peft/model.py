"""PEFT glue: the ``SADIModel`` tuner, the prompt-position context, and the registration of the ``SADI`` type."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architectures import default_target, num_attention_heads
from .config import SADIConfig, SADIPeftType
from .layer import ForwardContext, Linear, SADILayer, prompt_end_positions

logger = logging.getLogger(__name__)

PREFIX = "sadi_"


# ---------------------------------------------------------------------------------------------------- context
def _past_length(kwargs: dict[str, Any]) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    past = kwargs.get("past_key_values")
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


def _tensor_arg(args: tuple, kwargs: dict[str, Any], name: str, position: int) -> Optional[torch.Tensor]:
    value = kwargs.get(name)
    if value is None and len(args) > position and isinstance(args[position], torch.Tensor):
        value = args[position]
    return value


def _expand_rows(positions: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat per-prompt positions for beam search / num_return_sequences (transformers uses repeat_interleave)."""
    if positions.shape[0] == batch:
        return positions
    if batch % positions.shape[0] == 0:
        return positions.repeat_interleave(batch // positions.shape[0])
    raise RuntimeError(
        f"SADI prompt positions were pinned for a batch of {positions.shape[0]} but the model received a batch of "
        f"{batch}, which is not a multiple of it."
    )


# The two hooks read the context from the module they run on instead of capturing it in a closure:
# ``copy.deepcopy(model)`` copies hook functions by reference, but gives the copy (and its SADI layers) a new context.
def _pre_forward(module, args, kwargs):
    ctx = module.__dict__.get("_sadi_context")
    if ctx is None:
        return None
    ctx.clear_step()
    ctx.in_forward = True
    _warn_uncalibrated(ctx, module)
    ref = _tensor_arg(args, kwargs, "input_ids", 0)
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None or ref.dim() < 2:
        return None
    batch, seq_len = ref.shape[0], ref.shape[1]
    ctx.batch, ctx.seq_len = batch, seq_len
    past = _past_length(kwargs)
    if ctx.pinned is not None:
        absolute = _expand_rows(ctx.pinned.to(ref.device), batch)
    elif past == 0:
        attention_mask = _tensor_arg(args, kwargs, "attention_mask", 1)
        absolute = prompt_end_positions(attention_mask, batch, seq_len, ref.device)
    else:
        return None  # a decode step: the prompt's last token is already in the KV cache
    local = absolute - past
    valid = (absolute >= 0) & (local >= 0) & (local < seq_len)
    rows = torch.nonzero(valid).squeeze(1)
    ctx.rows, ctx.cols = rows, local[rows]
    return None


def _post_forward(module, args, kwargs, output):
    ctx = module.__dict__.get("_sadi_context")
    if ctx is not None:
        ctx.clear_step()
    return None


def _warn_uncalibrated(ctx: ForwardContext, model: nn.Module) -> None:
    peft_config = getattr(model, "peft_config", None) or {}
    for name, config in peft_config.items():
        if not isinstance(config, SADIConfig) or config.calibration is not None or name in ctx.warned_empty:
            continue
        for layer in ctx.layers:
            if name in layer.sadi_mask and name in layer.active_adapters and not layer.disable_adapters:
                if not any(bool(l.sadi_mask[name].any()) for l in ctx.layers if name in l.sadi_mask):
                    ctx.warned_empty.add(name)
                    warnings.warn(
                        f"SADI adapter {name!r} has an empty mask (it was never calibrated), so the model runs "
                        "unsteered. Call sadi_peft.calibrate(model, tokenizer, pairs) first.",
                        UserWarning,
                        stacklevel=4,
                    )
                break


@contextmanager
def empty_mask_expected(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """No "empty mask, never calibrated" warning for ``adapter_name`` inside the block: for code that runs an
    uncalibrated adapter on purpose (calibration blanks the mask; the random-mask ablation needs no scores)."""
    ctx = get_context(transformer_model(model))
    already_warned = adapter_name in ctx.warned_empty
    ctx.warned_empty.add(adapter_name)
    try:
        yield
    finally:
        if not already_warned:
            ctx.warned_empty.discard(adapter_name)


def get_context(model: nn.Module) -> ForwardContext:
    """The model's SADI forward context, created (with its two forward hooks) on first use."""
    ctx = model.__dict__.get("_sadi_context")
    if ctx is None:
        ctx = ForwardContext()
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)
        model.__dict__["_sadi_context"] = ctx
    return ctx


def _release_context_if_unused(model: nn.Module) -> None:
    ctx = model.__dict__.get("_sadi_context")
    if ctx is None:
        return
    if any(isinstance(m, SADILayer) for m in model.modules()):
        return
    # Remove our hooks by identity rather than through handles: handles survive copy.deepcopy(model) pointing at
    # the original model's hook dicts.
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [key for key, fn in hooks.items() if fn is _pre_forward or fn is _post_forward]:
            del hooks[key]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(model, extra).pop(key, None)
    del model.__dict__["_sadi_context"]


def transformer_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (or the model itself)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, BaseTuner):
        return base.model
    return model


@contextmanager
def prompt_boundary(model: nn.Module, attention_mask: Optional[torch.Tensor] = None, *, input_ids=None):
    """Pin where the prompt ends for every forward inside the block (``positions="last"`` adapters).

    ``attention_mask`` marks the prompt's tokens (1) per row, in the same padded layout as the sequences the model
    will see; the steered token of each row is its last 1. Uses:

    * scoring answers teacher-forced: feed prompt + answer in one sequence, pin with the prompt-only mask, and the
      answer tokens see the steered prompt token, as during generation;
    * a continuation from a KV cache of the prompt's prefix: the pinned absolute position is steered when it falls
      in the chunk being run;
    * ``generate(..., use_cache=False)`` on a model that got its adapter through transformers' ``load_adapter``
      (``PeftModel.generate`` pins by itself; with the KV cache, the default, nothing is needed).
    """
    ctx = get_context(transformer_model(model))
    if attention_mask is not None:
        batch, seq_len = attention_mask.shape
        positions = prompt_end_positions(attention_mask, batch, seq_len, attention_mask.device)
    elif input_ids is not None:
        batch, seq_len = input_ids.shape[:2]
        positions = prompt_end_positions(None, batch, seq_len, input_ids.device)
    else:
        raise ValueError("prompt_boundary needs the prompt's attention_mask or input_ids.")
    previous, ctx.pinned = ctx.pinned, positions
    try:
        yield
    finally:
        ctx.pinned = previous


def pinned_prompt_end(model: nn.Module) -> Optional[torch.Tensor]:
    """The absolute prompt-end positions pinned by an enclosing :func:`prompt_boundary` (or ``generate``), if any."""
    ctx = transformer_model(model).__dict__.get("_sadi_context")
    return None if ctx is None else ctx.pinned


def set_delta(model: nn.Module, delta: float, *, adapter_name: Optional[str] = None) -> None:
    """Change the steering strength of a SADI adapter in place (gain = 1 + delta); the config follows."""
    name, config = resolve_adapter(model, adapter_name)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > -1 or delta != delta:
        raise ValueError(f"delta={delta!r} is invalid: expected a finite number > -1 (the gain is 1 + delta).")
    layers = sadi_layers(model, name)
    if any(name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"SADI adapter {name!r} is merged into the weights; unmerge it before changing delta.")
    for _, layer in layers:
        layer.sadi_delta[name] = float(delta)
    config.delta = float(delta)


# ---------------------------------------------------------------------------------------------------- tuner
def _units_of(module: nn.Module, config: SADIConfig) -> tuple[int, int]:
    """(number of units, features per unit) of one target module."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if isinstance(base, nn.Linear):
        in_features, out_features = base.in_features, base.out_features
    elif isinstance(base, Conv1D):
        in_features, out_features = base.weight.shape
    else:
        raise TypeError(
            f"SADI can only wrap torch.nn.Linear or transformers Conv1D layers; a target matched a "
            f"{type(base).__name__}. Check SADIConfig.target_modules={config.target_modules!r}."
        )
    if config.variant == "head":
        if in_features % config.num_heads:
            raise ValueError(
                f"variant='head': the attention output projection has {in_features} input features, which do not "
                f"split into num_heads={config.num_heads} heads. Check SADIConfig.num_heads / target_modules."
            )
        return config.num_heads, in_features // config.num_heads
    if config.variant == "neuron":
        return in_features, 1
    return out_features, 1


class SADIModel(BaseTuner):
    """Injects SADI scaling layers into a transformers model (the PEFT tuner registered as ``"SADI"``).

    Use it through ``peft.get_peft_model(model, SADIConfig(...))``, ``PeftModel.from_pretrained`` or transformers'
    ``load_adapter``; then fill the mask with :func:`sadi_peft.calibrate`.
    """

    prefix: str = PREFIX
    tuner_layer_cls = SADILayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ---- configuration --------------------------------------------------------------------------
    @staticmethod
    def _prepare_adapter_config(peft_config: SADIConfig, model_config: dict) -> SADIConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            peft_config.target_modules = [default_target(model_type, peft_config.variant)]
        return peft_config

    def _prepare_model(self, peft_config: SADIConfig, model: nn.Module) -> None:
        model_config = getattr(model, "config", None)  # PEFT also wraps plain nn.Modules, which have no config
        if peft_config.variant == "head":
            try:
                if model_config is None:
                    raise ValueError(
                        f"{type(model).__name__} has no transformers config to read the number of attention heads "
                        "from; pass SADIConfig(num_heads=<attention heads>) with the target_modules."
                    )
                model_heads = num_attention_heads(model_config)
            except ValueError:
                if peft_config.num_heads is None:
                    raise
                model_heads = None
            if peft_config.num_heads is None:
                peft_config.num_heads = model_heads
            elif model_heads is not None and peft_config.num_heads != model_heads and peft_config.unit_counts:
                raise ValueError(
                    f"This SADI adapter was made for a model with num_heads={peft_config.num_heads} attention heads, "
                    f"but this model has {model_heads}. Load it on the base it was calibrated on "
                    f"({peft_config.base_model_name_or_path!r})."
                )
        if getattr(model_config, "model_type", None) == "bloom" and getattr(model_config, "pretraining_tp", 1) > 1:
            if getattr(model_config, "slow_but_exact", False):
                raise ValueError(
                    "BLOOM with pretraining_tp > 1 and slow_but_exact=True applies weight slices directly and "
                    "bypasses a wrapped Linear; load the model with slow_but_exact=False to use SADI."
                )
        self._check_unit_counts(peft_config, model)
        get_context(model)

    def _check_unit_counts(self, config: SADIConfig, model: nn.Module) -> None:
        """Compute the units per target before anything is replaced; refuse an adapter made for another base."""
        found: dict[str, int] = {}
        for key, module in model.named_modules():
            # skip the insides of existing adapter layers (their base_layer and sadi_* containers)
            if not key or any(part == "base_layer" or part.startswith(PREFIX) for part in key.split(".")):
                continue
            result = self._check_target_module_exists(config, key)
            if not result or isinstance(result, _ExcludedModule):
                continue
            found[key] = _units_of(module, config)[0]
        if not found:
            raise ValueError(
                f"SADIConfig.target_modules={config.target_modules!r} matched no module of this "
                f"{type(model).__name__}; see sadi_peft.architectures for the names per architecture."
            )
        if config.unit_counts is not None and dict(config.unit_counts) != found:
            raise ValueError(
                "This SADI adapter was made for another base model: it expects "
                f"{_describe_units(config.unit_counts)}, but this model has {_describe_units(found)}. "
                f"Load it on the base it was calibrated on ({config.base_model_name_or_path!r})."
            )
        total = sum(found.values())
        if config.top_k > total:
            raise ValueError(
                f"SADIConfig.top_k={config.top_k} is larger than the number of {config.variant} units in the "
                f"targeted modules ({total}); choose 1 <= top_k <= {total}."
            )
        config.unit_counts = found

    # ---- module replacement ----------------------------------------------------------------------
    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ) -> None:
        num_units, unit_size = _units_of(target, peft_config)
        kwargs = dict(
            delta=peft_config.delta,
            positions=peft_config.positions,
            side=peft_config.side,
            num_units=num_units,
            unit_size=unit_size,
        )
        if isinstance(target, SADILayer):
            target.update_layer(adapter_name, **kwargs)
            layer = target
        else:
            layer = Linear(target, adapter_name, **kwargs)
            self._replace_module(parent, target_name, layer, target)
        ctx = get_context(self.model)
        layer._sadi_context = ctx
        layer._sadi_module_name = current_key
        ctx.layers.add(layer)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        super()._replace_module(parent, child_name, new_module, child)
        # PEFT moves the adapter containers to the base weight's device, which is "meta" for a layer that
        # accelerate offloads to CPU RAM or disk (device_map): keep the SADI buffers where the layer computes.
        hook = getattr(child, "_hf_hook", None) or getattr(getattr(child, "base_layer", None), "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        device = torch.device("cpu") if device is None or torch.device(device).type == "meta" else torch.device(device)
        if isinstance(new_module, SADILayer):
            for container in (new_module.sadi_mask, new_module.sadi_scores):
                for key in list(container):
                    if container[key].device.type == "meta":
                        container[key] = torch.zeros(container[key].shape, dtype=container[key].dtype, device=device)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if isinstance(config, SADIConfig) and config.positions != "all":
                raise ValueError(
                    f"SADI adapter {name!r} has positions='last': its gain applies only at the last prompt token "
                    "during the prefill, which no weight matrix can express, so it cannot be merged. Use "
                    "positions='all' for a mergeable (and exportable) adapter."
                )

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        _release_context_if_unused(self.model)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        _release_context_if_unused(self.model)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Called by ``PeftModel.forward``/``generate``: pin the prompt end so uncached generation matches cached."""
        ctx = get_context(self.model)
        if kwargs.get("past_key_values") is not None or ctx.pinned is not None:
            yield  # continuing from a cache, or an explicit prompt_boundary() around this call: keep what is set
            return
        input_ids = _tensor_arg(args, kwargs, "input_ids", 0)
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            yield
            return
        attention_mask = kwargs.get("attention_mask")
        positions = prompt_end_positions(attention_mask, ref.shape[0], ref.shape[1], ref.device)
        previous, ctx.pinned = ctx.pinned, positions
        try:
            yield
        finally:
            ctx.pinned = previous


def _describe_units(counts: dict[str, int]) -> str:
    sizes = sorted(set(counts.values()))
    return f"{len(counts)} modules with {'/'.join(map(str, sizes))} units each"


# ---------------------------------------------------------------------------------------------------- helpers
def sadi_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, SADILayer]]:
    """(module name, layer) of every SADI layer holding ``adapter_name``, in model order."""
    return [
        (name, module)
        for name, module in transformer_model(model).named_modules()
        if isinstance(module, SADILayer) and adapter_name in module.sadi_mask
    ]


def resolve_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> tuple[str, SADIConfig]:
    """The SADI adapter to act on: ``adapter_name`` or the single active SADI adapter."""
    peft_config = getattr(model, "peft_config", None) or getattr(transformer_model(model), "peft_config", None)
    if not peft_config:
        raise ValueError(
            "This model has no PEFT adapter. Wrap it first: model = peft.get_peft_model(model, "
            "sadi_peft.SADIConfig(...)), or load an adapter with PeftModel.from_pretrained / load_adapter."
        )
    sadi_names = [name for name, cfg in peft_config.items() if isinstance(cfg, SADIConfig)]
    if adapter_name is not None:
        if adapter_name not in sadi_names:
            raise ValueError(f"No SADI adapter named {adapter_name!r}; SADI adapters on this model: {sadi_names}.")
        return adapter_name, peft_config[adapter_name]
    active: list[str] = []
    for _, module in transformer_model(model).named_modules():
        if isinstance(module, SADILayer):
            active = [name for name in module.active_adapters if name in sadi_names]
            break
    candidates = active or sadi_names
    if len(candidates) != 1:
        raise ValueError(
            f"Several SADI adapters are present ({candidates}); pass adapter_name= to say which one to use."
        )
    return candidates[0], peft_config[candidates[0]]


# ---------------------------------------------------------------------------------------------------- registration
def register() -> None:
    """Make ``"SADI"`` a PEFT type (config, tuner, prefix ``sadi_``). Idempotent; runs on ``import sadi_peft``.

    PEFT's ``PeftType`` enum is closed and ``register_peft_method`` only accepts its members, so the SADI member is
    our own ``(str, Enum)`` and goes into PEFT's public mappings directly (needs peft >= 0.21, whose state-dict code
    is generic over tuner types).
    """
    from peft import mapping

    key = SADIPeftType.SADI
    if mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(key) is SADIModel:
        return
    for prefix_type, prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == PREFIX and prefix_type != key:
            raise RuntimeError(f"The PEFT prefix {PREFIX!r} is already taken by {prefix_type!r}.")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = SADIConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = SADIModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX

