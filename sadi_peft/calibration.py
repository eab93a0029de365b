"""From contrastive pairs to a SADI mask: record, average the differences, keep the global top-K.

For each pair (prompt, positive, negative) the model reads ``prompt + separator + positive`` and
``prompt + separator + negative``; at the last token of each text every SADI site records one statistic per unit:

* head: the attention output projection input at that token, split into heads, **mean over head_dim**;
* neuron: the gate activation output (SiLU(gate) on Llama; ``neuron_statistic="input"``: the down projection input);
* hidden: the MLP down projection output.

The score of a unit is the mean over pairs of (positive - negative), signed. The mask keeps the top-K scores ranked
across all layers at once. Only running sums are kept, so memory does not grow with the number of pairs.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import ARCHITECTURES
from .config import SADIConfig
from .model import empty_mask_expected, resolve_adapter, sadi_layers, transformer_model

logger = logging.getLogger(__name__)

Pair = Union[tuple[str, str, str], Mapping[str, str]]


@dataclass
class CalibrationResult:
    """What :func:`calibrate` found: per-unit scores per module, and the units kept in the mask."""

    adapter_name: str
    variant: str
    num_pairs: int
    scores: dict[str, torch.Tensor]
    selected: list[tuple[str, int, float]] = field(default_factory=list)

    @property
    def mask(self) -> dict[str, torch.Tensor]:
        masks = {name: torch.zeros(s.numel(), dtype=torch.bool) for name, s in self.scores.items()}
        for name, unit, _ in self.selected:
            masks[name][unit] = True
        return masks

    def __repr__(self) -> str:
        top = ", ".join(f"{name}[{unit}]={score:.4g}" for name, unit, score in self.selected[:8])
        more = ", ..." if len(self.selected) > 8 else ""
        return (
            f"CalibrationResult(adapter={self.adapter_name!r}, variant={self.variant!r}, "
            f"num_pairs={self.num_pairs}, selected=[{top}{more}])"
        )


def normalize_pair(pair: Any, index: int) -> tuple[str, str, str]:
    """A (prompt, positive, negative) triple from a tuple/list or a dict with those keys."""
    if isinstance(pair, Mapping):
        missing = [key for key in ("prompt", "positive", "negative") if key not in pair]
        if missing:
            raise ValueError(f"pairs[{index}] is a dict without the key(s) {missing}; expected prompt/positive/negative.")
        triple = (pair["prompt"], pair["positive"], pair["negative"])
    elif isinstance(pair, (tuple, list)) and len(pair) == 3:
        triple = tuple(pair)
    else:
        raise TypeError(
            f"pairs[{index}] is {type(pair).__name__} {pair!r:.80}; expected a (prompt, positive, negative) triple "
            "or a dict with those keys."
        )
    for part, value in zip(("prompt", "positive", "negative"), triple):
        if not isinstance(value, str):
            raise TypeError(f"pairs[{index}].{part} is {type(value).__name__}; expected str.")
    return triple  # type: ignore[return-value]


def _join(prompt: str, answer: str, separator: str, strip: bool) -> str:
    if strip:
        return prompt.strip() + separator + answer.strip()
    return prompt + separator + answer


class _Recorder:
    """Forward hooks that add (positive - negative) statistics at the last token of each text into running sums."""

    def __init__(self, variant: str, unit_counts: dict[str, int]) -> None:
        self.variant = variant
        self.unit_counts = unit_counts
        self.sums: dict[str, torch.Tensor] = {}
        self.last_index: Optional[torch.Tensor] = None  # [2B], set per batch
        self.half: int = 0

    def record(self, name: str, activation: torch.Tensor) -> None:
        if activation.dim() == 2:  # [batch * seq, features] (OPT's MLP): restore the batch axis
            activation = activation.reshape(self.last_index.shape[0], -1, activation.shape[-1])
        rows = torch.arange(activation.shape[0], device=activation.device)
        last = activation[rows, self.last_index.to(activation.device)].to(torch.float64)  # [2B, F]
        units = self.unit_counts[name]
        if last.shape[-1] != units:
            last = last.reshape(last.shape[0], units, -1).mean(dim=-1)  # heads: mean over head_dim
        diff = (last[: self.half] - last[self.half :]).sum(dim=0).cpu()
        if name in self.sums:
            self.sums[name] += diff
        else:
            self.sums[name] = diff

    def input_hook(self, name: str):
        def hook(module, args, kwargs=None):
            self.record(name, args[0])

        return hook

    def output_hook(self, name: str):
        def hook(module, args, output):
            self.record(name, output[0] if isinstance(output, tuple) else output)

        return hook


def _recording_sites(model: nn.Module, config: SADIConfig, layers) -> list[tuple[str, nn.Module, str]]:
    """(layer name, module to hook, "input"|"output") for each SADI layer of the adapter."""
    inner = transformer_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    sites = []
    seen_activation_modules: set[int] = set()
    for name, layer in layers:
        if config.variant == "hidden":
            sites.append((name, layer.base_layer, "output"))
        elif config.variant == "neuron" and config.neuron_statistic == "activation" and spec and spec.activation:
            if not name.endswith(spec.mlp_out):
                raise ValueError(
                    f"Cannot locate the gate activation for {name!r} (expected a name ending in {spec.mlp_out!r}). "
                    "Use SADIConfig(neuron_statistic='input') to rank neurons on the down projection input."
                )
            act_name = name[: -len(spec.mlp_out)] + spec.activation
            act = inner.get_submodule(act_name)
            if id(act) in seen_activation_modules:
                raise ValueError(
                    f"The activation module {act_name!r} is shared between layers, so its output cannot be "
                    "attributed to one layer. Use SADIConfig(neuron_statistic='input')."
                )
            seen_activation_modules.add(id(act))
            sites.append((name, act, "output"))
        else:
            sites.append((name, layer, "input"))
    return sites


def _batches(pairs: Iterable[Any], batch_size: int):
    iterator = iter(pairs)
    start = 0
    while True:
        chunk = list(islice(iterator, batch_size))
        if not chunk:
            return
        yield start, chunk
        start += len(chunk)


def calibrate(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[Pair],
    *,
    batch_size: int = 16,
    adapter_name: Optional[str] = None,
    top_k: Optional[int] = None,
    separator: str = " ",
    strip: bool = True,
    show_progress: bool = True,
    distributed: Optional[bool] = None,
) -> CalibrationResult:
    """Fill a SADI adapter's mask from contrastive pairs and return the per-unit scores.

    Args:
        model: a ``PeftModel`` from ``get_peft_model(model, SADIConfig(...))``, or a transformers model with a SADI
            adapter loaded through ``load_adapter``.
        tokenizer: the model's tokenizer (needs a pad token when ``batch_size > 1``).
        pairs: (prompt, positive, negative) triples or dicts with those keys; any iterable, read once, in batches.
        batch_size: pairs per forward pass (each pass runs ``2 * batch_size`` texts).
        adapter_name: which SADI adapter; defaults to the single active one.
        top_k: overrides ``SADIConfig.top_k`` (the config is updated).
        separator, strip: each text is ``prompt + separator + answer`` (both stripped first when ``strip``, as in
            the authors' code).
        show_progress: show a tqdm bar.
        distributed: with ``torch.distributed`` initialised (``torchrun`` / ``accelerate launch``; gloo on CPU,
            NCCL on GPUs) each process passes its own shard of the pairs, and the running sums and pair counts are
            all-reduced, so every process ends with exactly the scores of one process over all pairs. ``None``
            (default): do so whenever a process group with more than one process is initialised. Processes with a
            different adapter, variant or model shape are refused before any statistics are mixed. A process whose
            checks or pairs fail tells the others, which then raise a ``RuntimeError`` / ``ValueError`` naming it;
            a process that dies or falls silent makes the others raise once gloo/NCCL notice (a closed connection
            at once, else the process group's ``timeout``). Every process keeps its previous mask on any failure.

    Weights left on the ``meta`` device with no accelerate offload hook to load them are refused up front
    (:func:`check_materialised`); a model split by ``device_map`` (CPU RAM / disk offload) is fine.

    The scores are stored in the adapter (``sadi_scores``) and saved with it; :func:`apply_top_k` re-cuts the mask
    for another K without running the pairs again. On any error the adapter's previous mask and scores are kept.
    """
    group = _process_group(distributed)
    try:  # local checks; with a process group, every process learns whether the others passed theirs
        name, config, layers, sites = _checked_adapter(model, tokenizer, batch_size, adapter_name)
        local_error: Optional[Exception] = None
    except (ValueError, TypeError) as error:
        if group is None:
            raise
        name, config, layers, sites, local_error = "", None, [], [], error
    unit_counts = {layer_name: layer.num_units(name) for layer_name, layer in layers}
    if group is not None:
        setup = None if config is None else {
            "variant": config.variant, "positions": config.positions, "neuron_statistic": config.neuron_statistic,
            "unit_counts": sorted(unit_counts.items())}
        agree_across_processes(group, setup, local_error, what="Distributed calibration")
    if local_error is not None or config is None:  # not reached: agree_across_processes raised it
        raise local_error or RuntimeError("calibration setup failed")
    inner = transformer_model(model)
    max_positions = getattr(getattr(inner, "config", None), "max_position_embeddings", None)
    recorder = _Recorder(config.variant, unit_counts)

    saved = {layer_name: (layer.sadi_mask[name].clone(), layer.sadi_scores[name].clone()) for layer_name, layer in layers}
    handles = []
    was_training = inner.training
    forward_params = inspect.signature(inner.forward).parameters
    extra = {"use_cache": False} if "use_cache" in forward_params else {}
    if "logits_to_keep" in forward_params:
        extra["logits_to_keep"] = 1
    device = input_device(inner)
    total = None
    if hasattr(pairs, "__len__"):
        total = math.ceil(len(pairs) / batch_size)  # type: ignore[arg-type]
    num_pairs = 0
    # the mask is blanked on purpose below: no "empty mask" warning meanwhile
    with empty_mask_expected(inner, name):
        try:
            for _, layer in layers:  # the adapter's own gain must not colour its statistics
                layer.sadi_mask[name].zero_()
            for layer_name, module, side in sites:
                if side == "input":
                    handles.append(module.register_forward_pre_hook(recorder.input_hook(layer_name)))
                else:
                    handles.append(module.register_forward_hook(recorder.output_hook(layer_name)))
            inner.eval()
            try:
                num_pairs = _run_pairs(inner, tokenizer, pairs, batch_size, separator, strip, recorder, device, extra,
                                       max_positions, total, show_progress)
                local_error = None
            except Exception as error:  # with a process group the others must hear of it, not wait for our sums
                if group is None:
                    raise
                local_error = error
            for layer_name, units in unit_counts.items():  # a process may have seen no pair of its shard
                recorder.sums.setdefault(layer_name, torch.zeros(units, dtype=torch.float64))
            if group is not None:
                num_pairs, failed = _all_reduce_sums(group, recorder.sums, num_pairs, device, local_error is not None)
                if local_error is not None:
                    raise local_error
                if failed:
                    raise RuntimeError(
                        f"Distributed calibration failed on process(es) {failed} (see their error); the statistics "
                        "were not combined and this process's adapter keeps its previous mask and scores. Fix the "
                        "pairs of that process and calibrate again on every process."
                    )
            if num_pairs == 0:
                raise ValueError("pairs is empty: calibration needs at least one (prompt, positive, negative) triple.")
            for layer_name, layer in layers:
                mean = (recorder.sums[layer_name] / num_pairs).to(torch.float32)
                layer.sadi_scores[name] = mean.to(layer.sadi_scores[name].device)
            if top_k is not None:
                config.top_k = top_k
            selected = apply_top_k(model, config.top_k, adapter_name=name)
        except BaseException:
            for layer_name, layer in layers:
                mask, scores = saved[layer_name]
                layer.sadi_mask[name].copy_(mask)
                layer.sadi_scores[name] = scores
            raise
        finally:
            for handle in handles:
                handle.remove()
            inner.train(was_training)

    config.calibration = {
        "num_pairs": num_pairs,
        "statistic": _statistic_name(config),
        "separator": separator,
        "strip": strip,
    }
    scores = {layer_name: layer.sadi_scores[name].detach().float().cpu().clone() for layer_name, layer in layers}
    result = CalibrationResult(name, config.variant, num_pairs, scores, selected)
    logger.info("Calibrated SADI adapter %r on %d pairs: %s", name, num_pairs, result)
    return result


def _checked_adapter(model: nn.Module, tokenizer, batch_size: int, adapter_name: Optional[str]):
    """(adapter name, config, SADI layers, recording sites) after the checks that need no forward pass."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1.")
    name, config = resolve_adapter(model, adapter_name)
    layers = sadi_layers(model, name)
    if not layers:
        raise ValueError(f"SADI adapter {name!r} is not injected in this model (no SADI layer holds it).")
    if batch_size > 1 and tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token, which batched calibration needs. Set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (padded positions are masked out), or use batch_size=1."
        )
    if any(layer.disable_adapters for _, layer in layers):
        raise ValueError(
            f"SADI adapter {name!r} is disabled (inside disable_adapter() or after disable_adapters()); enable it "
            "before calibrating so that the mask lands on the adapter that will run."
        )
    if any(name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"SADI adapter {name!r} is merged into the weights; unmerge it before calibrating.")
    check_materialised(model, targets=[layer_name for layer_name, _ in layers])
    return name, config, layers, _recording_sites(model, config, layers)


def _run_pairs(inner, tokenizer, pairs, batch_size, separator, strip, recorder, device, extra, max_positions, total,
               show_progress) -> int:
    """Run every pair through the model (hooks record into ``recorder``); returns the number of pairs."""
    num_pairs = 0
    progress = tqdm(
        _batches(pairs, batch_size), total=total, desc="SADI calibration", unit="batch", disable=not show_progress
    )
    with torch.no_grad():
        for start, chunk in progress:
            triples = [normalize_pair(pair, start + i) for i, pair in enumerate(chunk)]
            pos = [tokenizer(_join(p, y, separator, strip))["input_ids"] for p, y, _ in triples]
            neg = [tokenizer(_join(p, n, separator, strip))["input_ids"] for p, _, n in triples]
            for i, (a, b) in enumerate(zip(pos, neg)):
                if a == b:
                    raise ValueError(
                        f"pairs[{start + i}]: the positive and negative texts tokenize identically "
                        f"({triples[i][1]!r} vs {triples[i][2]!r}), so the pair carries no contrast."
                    )
                longest = max(len(a), len(b))
                if max_positions is not None and longest > max_positions:
                    raise ValueError(
                        f"pairs[{start + i}] is {longest} tokens long, more than the model's context "
                        f"(max_position_embeddings={max_positions}); shorten the prompt."
                    )
                if len(a) == 0 or len(b) == 0:
                    raise ValueError(f"pairs[{start + i}] tokenizes to an empty sequence.")
            texts = pos + neg
            width = max(len(t) for t in texts)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            input_ids = torch.full((len(texts), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
            for row, ids in enumerate(texts):  # right padding: positions of real tokens stay 0..n-1
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            recorder.last_index = torch.tensor([len(t) - 1 for t in texts], dtype=torch.long)
            recorder.half = len(triples)
            inner(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra)
            num_pairs += len(triples)
    return num_pairs


# ---------------------------------------------------------------------------------------------------- placement
def _offload_hooks(module: nn.Module) -> list[Any]:
    """accelerate hooks on ``module`` that load its weights before each forward (``offload=True`` + a weights map)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def check_materialised(model: nn.Module, targets: Sequence[str] = ()) -> None:
    """Refuse a model with weights left on the ``meta`` device that nothing will load.

    accelerate's offloading (``device_map`` with CPU-RAM or disk offload) keeps offloaded weights on ``meta`` and
    loads them in a hook before each forward: such modules pass. A module whose parameters or buffers are on ``meta``
    without such a hook (a model built under ``init_empty_weights`` and never loaded, a ``device_map`` that sends a
    module to ``"meta"``) would compute on placeholders, silently or with an obscure error; this raises a ``ValueError``
    naming those modules, SADI targets (``targets``: module names) first.
    """
    inner = transformer_model(model)
    loaders: set[str] = set()  # modules whose hook loads their own tensors
    subtree_loaders: list[str] = []  # modules whose hook also places every submodule's tensors
    unloaded: list[str] = []
    for module_name, module in inner.named_modules():
        for hook in _offload_hooks(module):
            loaders.add(module_name)
            if getattr(hook, "place_submodules", False):
                subtree_loaders.append(module_name)
        tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
        if not any(t.device.type == "meta" for t in tensors):
            continue
        if module_name in loaders or any(p == "" or module_name.startswith(p + ".") for p in subtree_loaders):
            continue
        unloaded.append(module_name)
    if not unloaded:
        return
    shown = [n[: -len(".base_layer")] if n.endswith(".base_layer") else n for n in unloaded]
    targeted = [n for n in shown if n in set(targets)]
    others = [n for n in shown if n not in set(targets)]
    listed = ", ".join(repr(n) for n in (targeted + others)[:6]) + (", ..." if len(shown) > 6 else "")
    which = f"; {len(targeted)} of them wrapped by the SADI adapter" if targeted else ""
    raise ValueError(
        f"{len(shown)} module(s) have weights on the meta device and no accelerate offload hook to load them: "
        f"{listed}{which}. A forward pass would compute on placeholders. This happens with a model built under "
        "init_empty_weights() whose weights were never loaded, or a device_map that sends modules to 'meta'. Give "
        "every module a real device ('cpu', a GPU, or 'disk' with offload_folder=) and load the weights: "
        "AutoModelForCausalLM.from_pretrained(path, device_map=..., max_memory=..., offload_folder=...) or "
        "accelerate's load_checkpoint_and_dispatch(model, checkpoint, device_map=...)."
    )


def input_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the first parameter's device; CPU when it is offloaded (accelerate moves them)."""
    for parameter in transformer_model(model).parameters():
        return torch.device("cpu") if parameter.device.type == "meta" else parameter.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------- processes
def _process_group(distributed: Optional[bool]) -> Any:
    """The default process group when the work is to be shared, else ``None``."""
    import torch.distributed as dist

    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is None:
        distributed = active
    if not distributed:
        return None
    if not active:
        raise ValueError(f"distributed={distributed!r} needs an initialised torch.distributed process group with "
                         "more than one process (torchrun / accelerate launch); call "
                         "torch.distributed.init_process_group(...) first, or pass distributed=False.")
    return dist.group.WORLD


def run_collective(fn: Callable[[], Any], what: str) -> Any:
    """Run one collective; a dead or silent peer becomes a ``RuntimeError`` that says so (not a bare gloo/NCCL one)."""
    try:
        return fn()
    except RuntimeError as error:  # torch.distributed.DistError is a RuntimeError
        raise RuntimeError(
            f"{what} failed: a torch.distributed collective did not complete ({error}). Another process probably "
            "died or did not reach this point within the process group's timeout. This process's adapter is left as "
            "it was, so there is nothing to save; check the other processes' logs. init_process_group(..., "
            "timeout=datetime.timedelta(...)) bounds how long a silent process is waited for."
        ) from error


def agree_across_processes(group: Any, setup: Any, local_error: Optional[BaseException], *, what: str) -> None:
    """Exchange every process's ``setup`` (and whether its local checks failed); raise unless all passed and agree.

    The process whose checks failed raises its own error; the others raise a ``ValueError`` naming it, so no process
    waits for statistics that will never come.
    """
    import torch.distributed as dist

    payload = {"setup": setup, "error": None if local_error is None else f"{type(local_error).__name__}: {local_error}"}
    gathered: list = [None] * dist.get_world_size(group)
    run_collective(lambda: dist.all_gather_object(gathered, payload, group=group), what)
    if local_error is not None:
        raise local_error
    failed = [rank for rank, other in enumerate(gathered) if other["error"] is not None]
    if failed:
        raise ValueError(
            f"{what} refused: processes {failed} failed their input checks (process {failed[0]}: "
            f"{gathered[failed[0]]['error']}); fix their input and start again on every process."
        )
    mismatched = [rank for rank, other in enumerate(gathered) if other["setup"] != gathered[0]["setup"]]
    if mismatched:
        raise ValueError(
            f"{what} refused: processes {mismatched} have another adapter, model or input than process 0 "
            f"({gathered[0]['setup']} vs {gathered[mismatched[0]]['setup']}); every process must wrap the same "
            "model with the same config."
        )


def _all_reduce_sums(group, sums: dict[str, torch.Tensor], num_pairs: int, device: torch.device,
                     failed: bool) -> tuple[int, list[int]]:
    """Sum the per-unit running sums and the pair count over all processes (float64; on the model's device for NCCL).

    Returns the total pair count and the ranks that report a failure (``failed``) instead of statistics.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    on_device = dist.get_backend(group) == "nccl"
    names = sorted(sums)
    flags = torch.zeros(world, dtype=torch.float64)
    flags[rank] = float(failed)
    flat = torch.cat([sums[n] for n in names] + [torch.tensor([float(num_pairs)], dtype=torch.float64), flags])
    flat = flat.to(device) if on_device else flat
    run_collective(lambda: dist.all_reduce(flat, group=group), "Distributed calibration")
    flat = flat.cpu()
    offset = 0
    for n in names:
        size = sums[n].numel()
        sums[n] = flat[offset : offset + size].clone()
        offset += size
    failed_ranks = [r for r in range(world) if flat[offset + 1 + r] > 0]
    return int(round(float(flat[offset]))), failed_ranks


def _statistic_name(config: SADIConfig) -> str:
    if config.variant == "head":
        return "head output mean over head_dim"
    if config.variant == "neuron":
        return "gate activation" if config.neuron_statistic == "activation" else "down projection input"
    return "MLP output"


def apply_top_k(
    model: nn.Module, top_k: Optional[int] = None, *, adapter_name: Optional[str] = None, ranking: Optional[str] = None
) -> list[tuple[str, int, float]]:
    """Re-cut the mask of a calibrated adapter from its stored scores: the global top-K units across layers.

    Returns the kept units as (module name, unit index, score), best first. Ties keep the earlier layer and unit.
    """
    name, config = resolve_adapter(model, adapter_name)
    layers = sadi_layers(model, name)
    top_k = config.top_k if top_k is None else top_k
    ranking = ranking or config.ranking
    if ranking not in ("signed", "absolute"):
        raise ValueError(f"ranking={ranking!r} is invalid: expected 'signed' or 'absolute'.")
    total = sum(layer.num_units(name) for _, layer in layers)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= total:
        raise ValueError(f"top_k={top_k!r} is invalid: expected an integer in [1, {total}] (units of this adapter).")
    flat = torch.cat([layer.sadi_scores[name].detach().float().cpu() for _, layer in layers])
    keys = flat.abs() if ranking == "absolute" else flat
    order = torch.sort(keys, descending=True, stable=True).indices[:top_k]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    offset = 0
    owners: list[tuple[str, int]] = []
    for layer_name, layer in layers:
        n = layer.num_units(name)
        layer.sadi_mask[name].copy_(chosen[offset : offset + n].to(layer.sadi_mask[name].device))
        owners.extend((layer_name, unit) for unit in range(n))
        offset += n
    config.top_k = top_k
    config.ranking = ranking
    return [(owners[i][0], owners[i][1], float(flat[i])) for i in order.tolist()]
