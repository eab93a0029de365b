"""The SADI math: a per-feature gain ``1 + delta * mask`` on one side of a Linear (or GPT-2 Conv1D) layer.

For a wrapped layer ``y = W x + b``:

* input side (SADI-HEAD, SADI-NEURON): ``y = W (g * x) + b``, merged form ``W' = W diag(g)``;
* output side (SADI-HIDDEN): ``y = g * (W x + b)``, merged form ``W' = diag(g) W``, ``b' = g * b``;

where ``g = 1 + delta`` on masked features and 1 elsewhere. A mask unit is one feature, except for heads, where one
unit covers ``head_dim`` contiguous input features. Several active SADI adapters on one layer compose
multiplicatively (like IA3): ``g = prod_k (1 + delta_k * M_k)``.

With ``positions="last"`` the gain applies at one position per row, the last real prompt token, which the model-level
:class:`ForwardContext` works out for each forward call; such an adapter cannot be merged.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)


@dataclass
class ForwardContext:
    """Per-model state shared by the SADI layers of one model: where "the last prompt token" is in this call.

    Set by a forward pre-hook on the top-level model (see ``SADIModel``); ``rows``/``cols`` index the
    (batch row, local position) pairs of the current forward that receive a ``positions="last"`` gain.
    ``pinned`` holds absolute prompt-end positions for the duration of a ``generate`` call (so that uncached
    generation steers the same token as cached generation).
    """

    in_forward: bool = False
    batch: int = 0
    seq_len: int = 0
    rows: Optional[torch.Tensor] = None
    cols: Optional[torch.Tensor] = None
    pinned: Optional[torch.Tensor] = None
    warned_empty: set = field(default_factory=set)
    layers: "weakref.WeakSet[SADILayer]" = field(default_factory=weakref.WeakSet)

    def clear_step(self) -> None:
        self.in_forward = False
        self.batch = self.seq_len = 0
        self.rows = None
        self.cols = None


def _last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a 2-D attention mask (works for left and right padding)."""
    mask = attention_mask.to(torch.bool)
    seq_len = mask.shape[-1]
    flipped_first = torch.flip(mask, dims=[-1]).to(torch.int8).argmax(dim=-1)
    last = seq_len - 1 - flipped_first
    # rows with no attended token at all: no position
    return torch.where(mask.any(dim=-1), last, torch.full_like(last, -1))


def prompt_end_positions(attention_mask: Optional[torch.Tensor], batch_size: int, seq_len: int, device) -> torch.Tensor:
    """Absolute index of the last real token of each row of a prompt batch."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.full((batch_size,), seq_len - 1, dtype=torch.long, device=device)
    return _last_attended(attention_mask).to(device=device, dtype=torch.long)


class SADIOverflowError(FloatingPointError):
    """Raised when a gain drives half-precision activations to inf/nan (reported, never passed on silently)."""


class SADILayer(BaseTunerLayer):
    """Per-module SADI state: for each adapter a bool unit mask and the calibration scores it came from."""

    # Nothing is trained: a bool buffer must never receive requires_grad_.
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = (
        "sadi_mask",
        "sadi_scores",
        "sadi_delta",
        "sadi_side",
        "sadi_unit_size",
        "sadi_positions",
        "_gain_cache",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        # persistent=True: PEFT's BufferDict default (False) would leave the mask out of the checkpoint.
        self.sadi_mask = BufferDict({}, persistent=True)
        self.sadi_scores = BufferDict({}, persistent=True)
        self.sadi_delta: dict[str, float] = {}
        self.sadi_side: dict[str, str] = {}
        self.sadi_unit_size: dict[str, int] = {}
        self.sadi_positions: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merge_backups: dict[str, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}
        self._sadi_context: Optional[ForwardContext] = None
        self._gain_cache: dict[str, tuple[torch.Tensor, tuple, Optional[torch.Tensor]]] = {}
        self._sadi_module_name: Optional[str] = None

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(
                f"SADI wraps torch.nn.Linear or transformers Conv1D layers, got {type(base).__name__}. "
                "Point target_modules at the attention output projection or the MLP down projection."
            )

    # ------------------------------------------------------------------ adapters
    def update_layer(
        self, adapter_name: str, *, delta: float, positions: str, side: str, num_units: int, unit_size: int
    ) -> None:
        features = self.in_features if side == "input" else self.out_features
        if num_units * unit_size != features:
            raise ValueError(
                f"Cannot split the {side} of a layer with {features} features into {num_units} units of "
                f"{unit_size}; for variant='head' check SADIConfig.num_heads."
            )
        device = self.get_base_layer().weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        self.sadi_mask[adapter_name] = torch.zeros(num_units, dtype=torch.bool, device=device)
        self.sadi_scores[adapter_name] = torch.zeros(num_units, dtype=torch.float32, device=device)
        self.sadi_delta[adapter_name] = float(delta)
        self.sadi_side[adapter_name] = side
        self.sadi_unit_size[adapter_name] = unit_size
        self.sadi_positions[adapter_name] = positions
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # Move only: PEFT's default also casts float buffers to the base dtype, which would round the stored
        # calibration scores to bf16/fp16. The mask is bool and the gain is built in the input's dtype anyway.
        target = device if device is not None else self.get_base_layer().weight.device
        if target is None or torch.device(target).type == "meta":
            return  # an offloaded base layer (accelerate device_map): the buffers stay where they were created
        for container in (self.sadi_mask, self.sadi_scores):
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)

    def num_units(self, adapter_name: str) -> int:
        return int(self.sadi_mask[adapter_name].numel())

    def feature_gain(self, adapter_name: str, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        """``1 + delta * mask`` expanded to features, or ``None`` when the mask is empty.

        Cached per adapter until the mask tensor is replaced or modified in place (its ``_version`` changes) or
        delta changes, so a forward pass does not rebuild (or synchronise on) the gain vector.
        """
        mask = self.sadi_mask[adapter_name]
        key = (mask._version, self.sadi_delta[adapter_name], self.sadi_unit_size[adapter_name], dtype, device)
        cached = self._gain_cache.get(adapter_name)
        # the cache holds the mask tensor itself, so a replaced mask can never be mistaken for the cached one
        if cached is not None and cached[0] is mask and cached[1] == key:
            return cached[2]
        gain = None
        if bool(mask.any()):
            unit_gain = 1.0 + self.sadi_delta[adapter_name] * mask.to(torch.float32)
            gain = unit_gain.repeat_interleave(self.sadi_unit_size[adapter_name]).to(device=device, dtype=dtype)
        self._gain_cache[adapter_name] = (mask, key, gain)
        return gain

    def _no_gain_cached(self) -> bool:
        """True when every active adapter held here has a cached *empty* gain that is still valid (same mask tensor,
        same in-place version): the forward can then go straight to the base layer.

        Plain attribute reads only. With K units spread over few layers most wrapped layers hold an empty mask, and
        on a decode step the full path costs as much Python as the Linear itself. A missing or stale cache entry
        answers False, so the full path runs and refreshes it; an empty mask gives no gain whatever delta is.
        """
        active = self._active_adapter
        masks, cache = self.sadi_mask, self._gain_cache
        for name in (active,) if isinstance(active, str) else active:
            if name not in masks:
                continue
            cached = cache.get(name)
            if cached is None or cached[2] is not None:
                return False
            mask = masks[name]
            if cached[0] is not mask or cached[1][0] != mask._version:
                return False
        return True

    def _held_active_adapters(self) -> list[str]:
        # transformers' set_adapter passes every adapter name to every tuner layer: ignore the ones not held here.
        return [name for name in self.active_adapters if name in self.sadi_mask]

    # ------------------------------------------------------------------ merge
    def _weight_views(self):
        """(weight, bias, transposed) where transposed is True for Conv1D (weight stored as [in, out])."""
        base = self.get_base_layer()
        return base.weight, getattr(base, "bias", None), isinstance(base, Conv1D)

    def _check_mergeable(self, adapter_names: list[str]) -> None:
        for name in adapter_names:
            if self.sadi_positions[name] != "all":
                raise ValueError(
                    f"SADI adapter {name!r} has positions='last': its gain applies only at the last prompt token "
                    "during the prefill, which no weight matrix can express, so it cannot be merged. Re-create it "
                    "with positions='all' (a fixed gain on every token) to merge or export it."
                )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the gains of ``positions="all"`` adapters into the weights (exact; the touched slices are backed up)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.sadi_mask]
        if not adapter_names:
            return
        self._check_mergeable(adapter_names)
        if isinstance(self.base_layer, BaseTunerLayer) and not self.base_layer.merged and any(
            True for _ in self.base_layer.active_adapters
        ) and not self.base_layer.disable_adapters:
            raise ValueError(
                "This SADI layer wraps another adapter layer with unmerged active adapters; merging SADI alone "
                "would apply the gain to the frozen weight but not to the inner adapter. Use merge_and_unload(), "
                "which merges the inner adapter first, or merge the inner adapter before SADI."
            )
        weight, bias, transposed = self._weight_views()
        for name in adapter_names:
            gain = self.feature_gain(name, torch.float32, weight.device)
            if gain is None:
                self.merged_adapters.append(name)
                continue
            idx = torch.nonzero(gain != 1.0).squeeze(1)
            g = gain[idx]
            with torch.no_grad():
                on_columns = (self.sadi_side[name] == "input") != transposed
                w_slice = weight[:, idx] if on_columns else weight[idx, :]
                b_slice = None
                if self.sadi_side[name] == "output" and bias is not None:
                    b_slice = bias[idx].clone()
                self._merge_backups[name] = (idx, w_slice.clone(), b_slice)
                scale = g.unsqueeze(0) if on_columns else g.unsqueeze(1)
                new_slice = (w_slice.to(torch.float32) * scale).to(weight.dtype)
                if safe_merge and not torch.isfinite(new_slice).all():
                    raise ValueError(f"Merging SADI adapter {name!r} produced non-finite weights; not merged.")
                if on_columns:
                    weight[:, idx] = new_slice
                else:
                    weight[idx, :] = new_slice
                if b_slice is not None:
                    bias[idx] = (b_slice.to(torch.float32) * g).to(bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the original weight slices (exact, also in bf16/fp16 and for any gain)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight, bias, transposed = self._weight_views()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            backup = self._merge_backups.pop(name, None)
            if backup is None:
                continue
            idx, w_slice, b_slice = backup
            on_columns = (self.sadi_side[name] == "input") != transposed
            with torch.no_grad():
                if on_columns:
                    weight[:, idx] = w_slice
                else:
                    weight[idx, :] = w_slice
                if b_slice is not None:
                    bias[idx] = b_slice

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Used by PEFT's ``merge_and_unload``: merge nested adapter layers innermost first, then this one.

        Without it PEFT merges only the outermost layer and keeps the innermost Linear, silently dropping a LoRA
        that SADI wraps. Merging inside out is exact: SADI over LoRA gives ``(W + BA) diag(g)``.
        """
        if merge:
            held = [name for name in (adapter_names or self.active_adapters) if name in self.sadi_mask]
            self._check_mergeable(held)  # before the inner layer is touched
            inner = self.base_layer
            if isinstance(inner, BaseTunerLayer):
                if hasattr(inner, "unload_and_optionally_merge_module"):
                    plain = inner.unload_and_optionally_merge_module(
                        merge=True, safe_merge=safe_merge, adapter_names=adapter_names
                    )
                else:
                    inner.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                    plain = inner.get_base_layer()
                self.base_layer = plain
            self.merge(safe_merge=safe_merge, adapter_names=held)
        return self.get_base_layer()

    # ------------------------------------------------------------------ forward
    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self._sadi_context
        if ctx is None or not ctx.in_forward:
            raise RuntimeError(
                "A positions='last' SADI adapter needs to know where the prompt ends, which it learns from the "
                "model's top-level forward (input_ids / attention_mask). Call the model itself rather than one "
                "of its sub-modules, or use positions='all'."
            )
        rows, cols = ctx.rows, ctx.cols
        if rows is None:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty
        return rows, cols

    @staticmethod
    def _scale_rows(
        t: torch.Tensor, rows: torch.Tensor, cols: Optional[torch.Tensor], gain: torch.Tensor
    ) -> torch.Tensor:
        """Multiply ``t[rows, cols]`` (3-D) or ``t[rows]`` (2-D, flattened tokens) by ``gain``, out of place."""
        if rows.numel() == 0:
            return t
        index = (rows.to(t.device),) if cols is None else (rows.to(t.device), cols.to(t.device))
        t = t.clone()
        t[index] = t[index] * gain
        return t

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._disable_adapters and not self.merged_adapters and self._no_gain_cached():
            return self.base_layer(x, *args, **kwargs)  # fast path: nothing selected in this layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        gains: dict[tuple[str, str], torch.Tensor] = {}
        for name in self._held_active_adapters():
            gain = self.feature_gain(name, x.dtype, x.device)
            if gain is None:
                continue
            key = (self.sadi_side[name], self.sadi_positions[name])
            gains[key] = gain if key not in gains else gains[key] * gain
        if not gains:
            return self.base_layer(x, *args, **kwargs)

        rows = cols = None
        if ("input", "last") in gains or ("output", "last") in gains:
            rows, cols = self._positions()
            if x.dim() == 2:
                # some models (OPT) run their MLP on [batch * seq, features]: address rows as batch * seq + pos
                seq_len = self._sadi_context.seq_len
                if seq_len == 0 or x.shape[0] != self._sadi_context.batch * seq_len:
                    raise RuntimeError(
                        f"positions='last' cannot locate the prompt token in activations of shape {tuple(x.shape)}."
                    )
                rows, cols = rows * seq_len + cols, None
            elif x.dim() != 3:
                raise RuntimeError(f"positions='last' expects [batch, seq, features] activations, got {tuple(x.shape)}")

        if ("input", "all") in gains:
            x = x * gains[("input", "all")]
        if ("input", "last") in gains:
            x = self._scale_rows(x, rows, cols, gains[("input", "last")])
        result = self.base_layer(x, *args, **kwargs)
        if ("output", "all") in gains:
            result = result * gains[("output", "all")]
        if ("output", "last") in gains:
            result = self._scale_rows(result, rows, cols, gains[("output", "last")])
        if result.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(result).all()):
            raise SADIOverflowError(
                f"SADI steering produced inf/nan in {result.dtype} at {self._sadi_module_name or 'a wrapped module'} "
                f"(active SADI gains up to {max(float(g.max()) for g in gains.values()):g}). Lower delta, or run "
                "the model in float32 (or bfloat16 instead of float16, whose range is 65504)."
            )
        return result


class Linear(nn.Module, SADILayer):
    """SADI wrapper for ``nn.Linear`` and transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        SADILayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    forward = SADILayer.forward  # no extra Python frame per call

    def __repr__(self) -> str:
        return "sadi." + super().__repr__()
