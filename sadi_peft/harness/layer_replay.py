"""Skip the decoder layers a grid point cannot change: the search speed-up for ``positions="all"`` adapters.

With ``positions="all"`` every token is steered, so no KV cache can be shared between grid points. But a point's
mask touches only some decoder layers: every layer below the lowest steered one computes exactly what the unsteered
model computes. In a teacher-forced scoring pass the hidden states entering layer ``d`` are therefore the same for
every point whose steering starts at layer ``d`` or above. :class:`LayerReplay` records them during one full pass
and feeds them back on the passes of the other points, with layers ``0 .. d-1`` skipped (they return their input
untouched, the recorded states replace it at layer ``d``).

The replay is exact (the same tensors enter layer ``d``), so scores equal the full passes' bit for bit on CPU, and
a test checks it against the naive search. It is used only where it is valid and cheap to check: decoder layers at
``model.model.layers`` returning a plain tensor, no accelerate offload hooks on them, teacher-forced scoring (no
decoding: generated tokens depend on the point).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

import sadi_peft

logger = logging.getLogger(__name__)

__all__ = ["LayerReplay", "decoder_layers", "first_steered_layer"]


def decoder_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder layers of a Llama-like transformers model (``model.model.layers``), else ``None``; ``None`` too
    when accelerate hooks (``device_map`` offload) wrap them, since skipping a layer would skip its weight loading."""
    inner = sadi_peft.model.transformer_model(model)
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    if any(hasattr(layer, "_hf_hook") for layer in layers):
        return None
    return layers


def first_steered_layer(model: nn.Module, adapter_name: str) -> int:
    """Index of the lowest decoder layer that holds a unit of adapter ``adapter_name``'s current mask.

    0 (no layer can be skipped) when the model has no usable decoder layers or a masked SADI module lies outside
    them; ``len(layers)`` for an empty mask (nothing is steered).
    """
    layers = decoder_layers(model)
    if layers is None:
        return 0
    owner = {id(module): index for index, layer in enumerate(layers) for module in layer.modules()}
    lowest = len(layers)
    for _, layer in sadi_peft.model.sadi_layers(model, adapter_name):
        mask = layer.sadi_mask[adapter_name]
        if not bool(mask.any()):
            continue
        if id(layer) not in owner:
            return 0
        lowest = min(lowest, owner[id(layer)])
    return lowest


class LayerReplay:
    """Inputs of chosen decoder layers, recorded forward by forward during one scoring pass, replayed on later ones.

    Usage: ``with replay.record(depths): run()`` (a full pass whose steering starts at or above every depth), then
    ``with replay.replay(depth): run()`` for each other pass of exactly the same forwards (same batches, in the same
    order) whose steering starts at ``depth``.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.plain_outputs = True

    @contextmanager
    def record(self, depths: Sequence[int]) -> Iterator[None]:
        self.inputs = {d: [] for d in sorted(set(depths)) if 0 < d < len(self.layers)}
        self.plain_outputs = True
        handles = []

        def check_output(module, args, output):
            if not isinstance(output, torch.Tensor):
                self.plain_outputs = False  # a layer returning a tuple cannot be skipped by returning its input

        handles.append(self.layers[0].register_forward_hook(check_output))
        for depth, store in self.inputs.items():

            def take(module, args, kwargs, store=store):
                hidden = args[0] if args else kwargs["hidden_states"]
                store.append(hidden.detach())

            handles.append(self.layers[depth].register_forward_pre_hook(take, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def can_replay(self, depth: int) -> bool:
        return self.plain_outputs and depth in self.inputs and bool(self.inputs[depth])

    @contextmanager
    def replay(self, depth: int) -> Iterator[None]:
        if not self.can_replay(depth):
            raise RuntimeError(f"nothing recorded at decoder layer {depth}; record a full pass first")
        recorded = self.inputs[depth]
        position = [0]

        def skip(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states

        def feed(module, args, kwargs):
            if position[0] >= len(recorded):
                raise RuntimeError(f"replay at layer {depth}: more forwards than the {len(recorded)} recorded")
            hidden = recorded[position[0]]
            position[0] += 1
            current = args[0] if args else kwargs["hidden_states"]
            if current.shape != hidden.shape:
                raise RuntimeError(f"replay at layer {depth}: forward {position[0]} has hidden states of shape "
                                   f"{tuple(current.shape)}, the recorded pass had {tuple(hidden.shape)}")
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = self.layers[depth].register_forward_pre_hook(feed, with_kwargs=True)
        for layer in self.layers[:depth]:
            layer.forward = skip  # instance attribute: shadows the class's forward until deleted below
        try:
            yield
        finally:
            handle.remove()
            for layer in self.layers[:depth]:
                del layer.forward
        if position[0] != len(recorded):
            raise RuntimeError(f"replay at layer {depth}: {position[0]} forwards, {len(recorded)} recorded")
