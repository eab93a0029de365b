"""Publishing SADI adapters to the Hugging Face Hub with a proper model card, and checking what a repo holds.

``PeftModel.push_to_hub`` is transformers' ``PushToHubMixin.push_to_hub``: it replaces PEFT's ``README.md`` with a
generic transformers card (``library_name: transformers``, no ``base_model``; see the project's PEFT integration
notes, section 9). This module follows the recommended flow instead:

1. save the adapter atomically (:func:`sadi_peft.saving.save_pretrained`, or a copy of an adapter folder that is
   already saved, so a push needs no base model);
2. write a SADI card built from the template ``hub_cards/adapter_card.md`` (variant, K, delta and gain, position
   regime, the selected units, the calibration data, optional baseline-vs-steered results, how to load it with
   ``import sadi_peft`` first, and the paper's citation);
3. upload that folder with ``HfApi().create_repo(...)`` and ``HfApi().upload_folder(...)``.

:func:`load_adapter_config` reads ``adapter_config.json`` from a folder or a Hub repo id and refuses anything that
is not a SADI adapter with an error naming what was found (a LoRA, a full model, nothing, ...).
:func:`add_to_hf_cache` lays a saved folder into the huggingface_hub cache layout so that it loads by repo id with
``HF_HUB_OFFLINE=1`` (air-gapped machines, tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import string
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .config import SADIConfig
from .saving import atomic_directory, replace_directory

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_TEMPLATE_NAME",
    "HubLoginError",
    "NotASADIAdapterError",
    "add_to_hf_cache",
    "build_model_card",
    "is_hub_repo_id",
    "load_adapter_config",
    "push_to_hub",
    "save_with_card",
]

PathLike = Union[str, os.PathLike]

ADAPTER_CONFIG_NAME = "adapter_config.json"
CARD_TEMPLATE_NAME = "adapter_card.md"
DEFAULT_COMMIT_MESSAGE = "Upload SADI steering adapter"

_FULL_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")

_VARIANT_TEXT = {
    "head": "`head`: attention heads (the input of the attention output projection, one gain per whole head)",
    "neuron": "`neuron`: FFN neurons (the input of the MLP down projection)",
    "hidden": "`hidden`: MLP output dimensions (the output of the MLP down projection, before the residual add)",
}
_UNIT_NOUN = {"head": "head", "neuron": "neuron", "hidden": "dimension"}
_POSITIONS_TEXT = {
    "last": "`last`: only the last real prompt token, during the prefill (the authors' regime); generated tokens see "
    "it through the KV cache",
    "all": "`all`: every position, generated tokens included (a fixed diagonal gain, mergeable into the weights)",
}
_POSITIONS_NOTE = {
    "last": "This adapter steers the last prompt token only (`positions=\"last\"`), so it cannot be merged into the "
    "weights. `PeftModel.generate` needs nothing more. On a model loaded through transformers "
    "(`AutoModelForCausalLM.from_pretrained` or `load_adapter`) cached generation (the default) needs nothing either; "
    "wrap uncached generation (`use_cache=False`) in `with sadi_peft.prompt_boundary(model, "
    "inputs[\"attention_mask\"]): ...`.",
    "all": "This adapter steers every position (`positions=\"all\"`): a fixed diagonal gain, so "
    "`model.merge_and_unload()` folds it into the weights exactly, and `sadi_peft.export` can write it as a plain "
    "IA3 or LoRA adapter, or a merged checkpoint, that loads without `sadi_peft`.",
}
_RANKING_TEXT = {
    "signed": "`signed`: the largest positive mean differences (right − wrong), as in the authors' code",
    "absolute": "`absolute`: the largest mean differences in magnitude",
}


class HubLoginError(RuntimeError):
    """No Hugging Face token: the upload cannot be authenticated."""


class NotASADIAdapterError(ValueError):
    """The folder or Hub repo does not hold a SADI adapter; the message says what it holds instead."""


# ---------------------------------------------------------------------------------------------------- adapter facts
@dataclass
class _Unit:
    module: str
    unit: int
    score: Optional[float]

    @property
    def layer(self) -> Optional[int]:
        found = _LAYER_INDEX.findall(f".{self.module}.")
        return int(found[-1]) if found else None


@dataclass
class _AdapterFacts:
    """What a card needs to know about one SADI adapter."""

    config: SADIConfig
    adapter_name: str = "default"
    units: Optional[list[_Unit]] = None  # None: the mask is not known (built from a config alone)
    peft_version: Optional[str] = None
    unit_counts: dict[str, int] = field(default_factory=dict)


def _natural(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _rank_units(units: list[_Unit], ranking: str) -> list[_Unit]:
    """Best first, as ``apply_top_k`` ranks them; ties keep the earlier layer and unit."""

    def key(unit: _Unit):
        score = unit.score if unit.score is not None and math.isfinite(unit.score) else -math.inf
        return (-(abs(score) if ranking == "absolute" else score), _natural(unit.module), unit.unit)

    return sorted(units, key=key)


def _facts_from_model(model: Any, adapter_name: Optional[str]) -> _AdapterFacts:
    import peft

    from .model import resolve_adapter, sadi_layers

    name, config = resolve_adapter(model, adapter_name)
    units: list[_Unit] = []
    counts: dict[str, int] = {}
    for module_name, layer in sadi_layers(model, name):
        mask = layer.sadi_mask[name].detach().to("cpu").bool()
        scores = layer.sadi_scores[name].detach().to("cpu").float() if name in layer.sadi_scores else None
        counts[module_name] = int(mask.numel())
        for index in mask.nonzero().flatten().tolist():
            units.append(_Unit(module_name, int(index), float(scores[index]) if scores is not None else None))
    return _AdapterFacts(
        config=config,
        adapter_name=name,
        units=_rank_units(units, config.ranking),
        peft_version=getattr(config, "peft_version", None) or peft.__version__,
        unit_counts=dict(config.unit_counts or counts),
    )


def _module_name_from_key(key: str, suffix: str) -> str:
    name = key[: -len(suffix)]
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _read_mask_file(folder: Path) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """(masks, scores) by module name from the adapter weights in ``folder`` (safetensors, read without torch)."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    masks: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    with safe_open(str(weights), framework="numpy") as handle:
        for key in handle.keys():
            if key.endswith(".sadi_mask"):
                masks[_module_name_from_key(key, ".sadi_mask")] = handle.get_tensor(key)
            elif key.endswith(".sadi_scores"):
                scores[_module_name_from_key(key, ".sadi_scores")] = handle.get_tensor(key)
    return masks, scores


def _facts_from_folder(folder: Path, adapter_name: Optional[str] = None) -> _AdapterFacts:
    config = load_adapter_config(folder)
    read = _read_mask_file(folder)
    units: Optional[list[_Unit]] = None
    counts = dict(config.unit_counts or {})
    if read is not None:
        masks, scores = read
        if not masks:
            raise NotASADIAdapterError(
                f"{folder / 'adapter_model.safetensors'} holds no sadi_mask tensor although adapter_config.json says "
                "peft_type SADI: the weights file does not belong to this config."
            )
        units = []
        for module_name, mask in masks.items():
            flat = mask.reshape(-1).astype(bool)
            counts.setdefault(module_name, int(flat.size))
            module_scores = scores.get(module_name)
            for index in flat.nonzero()[0].tolist():
                score = float(module_scores.reshape(-1)[index]) if module_scores is not None else None
                units.append(_Unit(module_name, int(index), score))
        units = _rank_units(units, config.ranking)
    return _AdapterFacts(
        config=config,
        adapter_name=adapter_name or "default",
        units=units,
        peft_version=getattr(config, "peft_version", None),
        unit_counts=counts,
    )


def _facts(model_or_config: Any, adapter_name: Optional[str]) -> _AdapterFacts:
    if isinstance(model_or_config, SADIConfig):
        return _AdapterFacts(
            config=model_or_config,
            adapter_name=adapter_name or "default",
            units=None,
            peft_version=getattr(model_or_config, "peft_version", None),
            unit_counts=dict(model_or_config.unit_counts or {}),
        )
    if isinstance(model_or_config, (str, os.PathLike)):
        folder = _adapter_folder(Path(model_or_config), adapter_name)
        return _facts_from_folder(folder, adapter_name)
    return _facts_from_model(model_or_config, adapter_name)


def _adapter_folder(folder: Path, adapter_name: Optional[str]) -> Path:
    """The folder holding the adapter's files: ``folder`` or, for a named adapter saved by PEFT, ``folder/name``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: expected a saved SADI adapter (adapter_config.json).")
    if adapter_name and adapter_name != "default" and (folder / adapter_name / ADAPTER_CONFIG_NAME).is_file():
        return folder / adapter_name
    return folder


# ---------------------------------------------------------------------------------------------------- card helpers
def is_hub_repo_id(value: Optional[str]) -> bool:
    """True for something that reads as a Hub repo id (``org/name`` or ``name``), not a local path."""
    if not value or not isinstance(value, str):
        return False
    if value.startswith((".", "~", "/")) or os.path.isabs(value) or "\\" in value or os.path.exists(value):
        return False
    return bool(_HUB_ID.match(value)) and ".." not in value and "--" not in value


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML scalar: plain when YAML reads it back unchanged, else double-quoted (JSON is YAML)."""
    try:
        import yaml

        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/:+-]*", value) and yaml.safe_load(value) == value:
            return value
    except ImportError:  # pragma: no cover - huggingface_hub depends on PyYAML
        pass
    return json.dumps(value, ensure_ascii=False)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return _cell(value)


def _short_name(base_model: Optional[str]) -> Optional[str]:
    if not base_model:
        return None
    return base_model.rstrip("/\\").replace("\\", "/").split("/")[-1] or base_model


def _normalize_results(results: Any) -> list[dict[str, Any]]:
    """Rows ``{task, metric, split, n, baseline, steered}`` from the accepted ``results`` shapes.

    Accepted: one mapping with ``baseline`` and ``steered`` (and optional ``task``, ``metric``, ``split``, ``n``);
    a sequence of such mappings; or a mapping of task name to such a mapping. ``{"results": ...}`` is unwrapped.
    """
    if isinstance(results, Mapping) and set(results) == {"results"}:
        results = results["results"]
    rows: list[tuple[Optional[str], Any]]
    if isinstance(results, Mapping) and "baseline" in results and "steered" in results:
        rows = [(None, results)]
    elif isinstance(results, Mapping):
        rows = list(results.items())
    elif isinstance(results, Sequence) and not isinstance(results, (str, bytes)):
        rows = [(None, row) for row in results]
    else:
        raise ValueError(
            f"results={results!r:.120} is invalid: expected a mapping with 'baseline' and 'steered', a list of such "
            "mappings, or a mapping of task name to such a mapping."
        )
    out = []
    for index, (task, row) in enumerate(rows):
        where = f"results[{task!r}]" if task is not None else f"results[{index}]"
        if not isinstance(row, Mapping) or "baseline" not in row or "steered" not in row:
            raise ValueError(f"{where}={row!r:.120} is invalid: each row needs 'baseline' and 'steered' values.")
        for key in ("baseline", "steered"):
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}['{key}']={value!r} is invalid: expected a number.")
        out.append(
            {
                "task": row.get("task", task) or "",
                "metric": row.get("metric", "") or "",
                "split": row.get("split", "") or "",
                "n": row.get("n", row.get("num_examples", "")),
                "baseline": row["baseline"],
                "steered": row["steered"],
            }
        )
    if not out:
        raise ValueError("results is empty: pass None for a card without an evaluation table.")
    return out


def _evaluation_section(results: Any, gain: float) -> str:
    if results is None:
        return ""
    rows = _normalize_results(results)
    lines = [
        "## Evaluation",
        "",
        "| task | metric | split | n | baseline | steered (SADI) | Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = row["steered"] - row["baseline"]
        lines.append(
            "| " + " | ".join(
                [
                    _cell(row["task"]),
                    _cell(row["metric"]),
                    _cell(row["split"]),
                    _number(row["n"]) if row["n"] != "" else "",
                    _number(row["baseline"]),
                    _number(row["steered"]),
                    ("+" if delta > 0 else "") + _number(delta),
                ]
            ) + " |"
        )
    lines += [
        "",
        f"Baseline: the same base model with the adapter switched off. Steered: with this adapter (gain {gain:g}).",
        "",
        "",
    ]
    return "\n".join(lines)


def _units_section(facts: _AdapterFacts, max_units_listed: int) -> str:
    noun = _UNIT_NOUN.get(facts.config.variant, "unit")
    if facts.units is None:
        return (
            f"The mask (which {noun}s are steered) is stored in `adapter_model.safetensors` as `sadi_mask` tensors, "
            "next to the calibration scores (`sadi_scores`)."
        )
    if not facts.units:
        return (
            "**No unit is selected: this adapter is not calibrated and does nothing.** Fill its mask with "
            "`sadi_peft.calibrate(model, tokenizer, pairs)` before using or publishing it."
        )
    lines = [
        f"Ranked by calibration score (the mean over pairs of the {noun}'s statistic with the right answer minus with "
        "the wrong one). Stored in `adapter_model.safetensors` as `sadi_mask`, next to every unit's score "
        "(`sadi_scores`).",
        "",
        f"| rank | layer | module | {noun} | score |",
        "|---|---|---|---|---|",
    ]
    for rank, unit in enumerate(facts.units[:max_units_listed], start=1):
        layer = "" if unit.layer is None else str(unit.layer)
        score = "" if unit.score is None else f"{unit.score:.4g}"
        lines.append(f"| {rank} | {layer} | `{_cell(unit.module)}` | {unit.unit} | {score} |")
    rest = len(facts.units) - max_units_listed
    if rest > 0:
        lines += ["", f"… and {rest} more (all are in `adapter_model.safetensors`)."]
    return "\n".join(lines)


def _calibration_section(config: SADIConfig, dataset: Optional[str]) -> str:
    calibration = config.calibration or {}
    if dataset and is_hub_repo_id(dataset) and "/" in dataset:
        source = f"the dataset [`{dataset}`](https://huggingface.co/datasets/{dataset})"
    elif dataset:
        source = dataset.strip().rstrip(".")
    else:
        source = None
    num_pairs = calibration.get("num_pairs")
    pairs = f"**{num_pairs} contrastive pairs**" if num_pairs else "contrastive pairs"
    text = f"Calibrated with `sadi_peft.calibrate` on {pairs}" + (f" from {source}." if source else ".")
    if not calibration:
        text += " `adapter_config.json` records no calibration metadata (`calibration` is empty)."
        return text
    separator = calibration.get("separator", " ")
    strip = calibration.get("strip", True)
    stripped = " (stripped)" if strip else ""
    joined = f"prompt{stripped} + {json.dumps(separator)} + answer{stripped}"
    statistic = calibration.get("statistic")
    text += (
        f" Each pair is a prompt with a right and a wrong answer; each is read as `{joined}`. At the last token of "
        "each text every candidate unit records one statistic"
        + (f" ({statistic})" if statistic else "")
        + ", and a unit's score is the mean over pairs of right − wrong. The mask keeps the top-K scores ranked "
        "across all layers at once."
    )
    extra = {k: v for k, v in calibration.items() if k not in ("num_pairs", "separator", "strip", "statistic")}
    if extra:
        facts = ", ".join(f"`{k}` = `{_cell(v)}`" for k, v in sorted(extra.items()))
        text += f"\n\nOther calibration facts: {facts}."
    return text


def _template_text(template: Optional[PathLike]) -> str:
    if template is not None:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"Card template {path} does not exist.")
        return path.read_text(encoding="utf-8")
    candidates = [
        Path(__file__).resolve().parent.parent / "hub_cards" / CARD_TEMPLATE_NAME,  # source tree / editable install
        Path(sys.prefix) / "share" / "sadi-peft" / "hub_cards" / CARD_TEMPLATE_NAME,  # data-files install
    ]
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(
        f"The model card template {CARD_TEMPLATE_NAME} was not found (looked in: "
        + ", ".join(str(p) for p in candidates)
        + "). Pass template= the path of hub_cards/adapter_card.md from the sadi-peft sources."
    )


def build_model_card(
    model_or_config: Any,
    *,
    adapter_name: Optional[str] = None,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    results: Any = None,
    license: Optional[str] = None,
    title: Optional[str] = None,
    description: Optional[str] = None,
    tags: Sequence[str] = (),
    template: Optional[PathLike] = None,
    max_units_listed: int = 64,
) -> str:
    """The model card (``README.md`` text, with YAML front matter) of a SADI adapter.

    Args:
        model_or_config: a model holding the SADI adapter (``PeftModel`` or a transformers model with the adapter
            loaded), the path of a saved adapter folder (read without loading any model), or a bare ``SADIConfig``
            (the card then cannot list the selected units).
        adapter_name: which SADI adapter of the model (default: the single active one), or the subfolder of a
            saved folder holding several adapters.
        repo_id: the repo the card is for, used in the loading snippets (default: a ``<user>/<repo>`` placeholder).
        base_model: the base model's Hub id; default ``base_model_name_or_path`` from the adapter config. Only a
            Hub id goes into the front matter (``base_model`` and the ``base_model:adapter:<id>`` tag).
        dataset: the calibration data: a Hub dataset id (linked, and listed under ``datasets``) or a description.
        results: baseline vs steered numbers for an evaluation table: a mapping with ``baseline`` and
            ``steered`` (optional ``task``, ``metric``, ``split``, ``n``), a list of those, or a mapping of task
            name to one. No table when None.
        license: a Hub license id (``apache-2.0``, ``mit``, ...) for the front matter.
        title, description: the card's heading and a sentence on what the adapter is for.
        tags: extra tags, after ``sadi``, ``steering``, ``activation-steering``, ``peft``.
        template: a ``string.Template`` file to use instead of ``hub_cards/adapter_card.md``.
        max_units_listed: rows of the selected-units table.
    """
    facts = _facts(model_or_config, adapter_name)
    config = facts.config
    base = base_model or config.base_model_name_or_path
    base_is_hub = is_hub_repo_id(base)
    noun = _UNIT_NOUN.get(config.variant, "unit")

    if base_is_hub:
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    elif base:
        base_text = f"`{base}` (a local path where the adapter was made; load the same checkpoint as the base)"
    else:
        base_text = "a base model that the adapter config does not record"
    base_code = f"`{base}`" if base else "not recorded"
    if base and config.revision:
        base_code += f" at revision `{config.revision}`"

    extra_tags = [t for t in dict.fromkeys(tags) if t not in ("sadi", "steering", "activation-steering", "peft")]
    license_line = f"license: {_yaml_scalar(license)}\n" if license else ""
    dataset_is_hub = bool(dataset) and is_hub_repo_id(dataset) and "/" in dataset
    datasets_lines = f"datasets:\n- {_yaml_scalar(dataset)}\n" if dataset_is_hub else ""

    total = sum(facts.unit_counts.values()) if facts.unit_counts else None
    selected = len(facts.units) if facts.units is not None else None
    kept = f"{config.top_k}"
    if total:
        kept += f" of {total} {noun}s"
        layers = len(facts.unit_counts)
        if layers:
            kept += f" in {layers} wrapped modules"
    else:
        kept += f" {noun}s"
    if selected is not None and selected != config.top_k:
        kept += f" ({selected} selected in the stored mask)"

    target = config.target_modules
    if isinstance(target, (list, tuple, set)):
        modules_text = ", ".join(f"`{t}`" for t in sorted(target))
    elif target:
        modules_text = f"`{target}`"
    else:
        modules_text = "from the architecture table in `sadi_peft.architectures`"
    if config.layers_to_transform is not None:
        modules_text += f" (layers {config.layers_to_transform})"

    default_title = f"SADI-{config.variant.upper()} steering adapter" + (
        f" for {_short_name(base)}" if base else ""
    )
    mapping = {
        "base_model_line": f"base_model: {_yaml_scalar(base)}\n" if base_is_hub else "",
        "base_model_tag_line": f"- {_yaml_scalar('base_model:adapter:' + base)}\n" if base_is_hub else "",
        "license_line": license_line,
        "datasets_lines": datasets_lines,
        "extra_tag_lines": "".join(f"- {_yaml_scalar(str(t))}\n" for t in extra_tags),
        "title": title or default_title,
        "description": (" " + description.strip()) if description and description.strip() else "",
        "base_model_text": base_text,
        "base_model_code": base_code,
        "base_model_load": base if base else "<base model>",
        "repo_id": repo_id or "<user>/<repo>",
        "variant_text": _VARIANT_TEXT.get(config.variant, f"`{config.variant}`"),
        "units_kept_text": kept,
        "delta": f"{config.delta:g}",
        "gain": f"{config.gain:g}",
        "positions_text": _POSITIONS_TEXT.get(config.positions, f"`{config.positions}`"),
        "positions_note": _POSITIONS_NOTE.get(config.positions, ""),
        "ranking_text": _RANKING_TEXT.get(config.ranking, f"`{config.ranking}`"),
        "modules_text": modules_text,
        "peft_version": facts.peft_version or "(unknown version)",
        "units_section": _units_section(facts, max_units_listed),
        "calibration_section": _calibration_section(config, dataset),
        "evaluation_section": _evaluation_section(results, config.gain),
    }
    text = string.Template(_template_text(template)).substitute(mapping)
    return re.sub(r"\n{3,}", "\n\n", text)


# ---------------------------------------------------------------------------------------------------- saving
def _rewrite_base_model(folder: Path, base_model: str) -> None:
    path = folder / ADAPTER_CONFIG_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_adapter_folder(source: Path, destination: Path) -> None:
    """Copy a saved adapter's top-level files (not ``README.md``, hidden files or other adapters' subfolders)."""
    destination.mkdir(parents=True, exist_ok=True)
    skipped = []
    for entry in sorted(source.iterdir()):
        if entry.name.startswith(".") or entry.name == "README.md":
            continue
        if entry.is_dir():
            skipped.append(entry.name)
            continue
        shutil.copy2(entry, destination / entry.name)
    if skipped:
        logger.warning("Not included (subfolders, e.g. other adapters): %s", ", ".join(skipped))


def _stage(model_or_folder: Any, staging: Path, adapter_name: Optional[str]) -> None:
    """Write the adapter's files (no card yet) into the empty folder ``staging``."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        source = _adapter_folder(Path(model_or_folder), adapter_name)
        load_adapter_config(source)  # refuse anything that is not a SADI adapter, naming what it is
        _copy_adapter_folder(source, staging)
        return
    from peft import PeftModel

    from .model import resolve_adapter
    from .saving import save_pretrained

    name, _ = resolve_adapter(model_or_folder, adapter_name)
    inner = staging / "adapter"
    kwargs = {"selected_adapters": [name]} if isinstance(model_or_folder, PeftModel) else {}
    save_pretrained(model_or_folder, inner, **kwargs)
    source = inner / name if (inner / name / ADAPTER_CONFIG_NAME).is_file() else inner
    if not (source / ADAPTER_CONFIG_NAME).is_file():
        raise RuntimeError(f"Saving the adapter {name!r} wrote no {ADAPTER_CONFIG_NAME} (files: {os.listdir(inner)}).")
    _copy_adapter_folder(source, staging)
    shutil.rmtree(inner)


def save_with_card(
    model: Any,
    folder: PathLike,
    *,
    adapter_name: Optional[str] = None,
    base_model: Optional[str] = None,
    **card_kwargs: Any,
) -> Path:
    """Save one SADI adapter to ``folder`` with its SADI model card as ``README.md``; return the folder.

    ``model`` is a model holding the adapter (saved with :func:`sadi_peft.saving.save_pretrained`) or the path of a
    saved adapter folder (copied; nothing is loaded). The adapter's files land at the top of ``folder`` whatever
    its name, as a Hub repo expects. ``base_model`` (a Hub id) replaces ``base_model_name_or_path`` in the written
    ``adapter_config.json``, so that ``AutoModelForCausalLM.from_pretrained(repo_id)`` finds the base model
    elsewhere than on this machine. ``card_kwargs`` go to :func:`build_model_card`.

    The whole folder (adapter files and card) is written to a temporary sibling and renamed into place, so an
    interrupted save never leaves a half-written folder; an existing ``folder`` is replaced.
    """
    with atomic_directory(folder) as staging:
        _stage(model, staging, adapter_name)
        if base_model:
            _rewrite_base_model(staging, base_model)
        card = build_model_card(staging, base_model=base_model, **card_kwargs)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return Path(folder)


# ---------------------------------------------------------------------------------------------------- pushing
def _login_error(repo_id: str) -> HubLoginError:
    return HubLoginError(
        f"No Hugging Face token, so nothing was uploaded to {repo_id!r}. Log in once with `hf auth login` "
        "(older huggingface_hub: `huggingface-cli login`), or set the HF_TOKEN environment variable to a token with "
        "write access (https://huggingface.co/settings/tokens), or pass token=... (CLI: --token). "
        "To see what would be uploaded without a token, use dry_run_dir=... (CLI: --dry-run OUT_DIR)."
    )


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id={repo_id!r} is invalid: {error}") from None
    if "/" not in repo_id:
        raise ValueError(f"repo_id={repo_id!r} is invalid: expected 'user-or-org/name'.")


def _check_publishable(folder: Path) -> None:
    facts = _facts_from_folder(folder)
    if facts.units is not None and not facts.units:
        raise ValueError(
            "The adapter's mask is empty (it was never calibrated), so it would do nothing: run "
            "sadi_peft.calibrate(model, tokenizer, pairs) before publishing it."
        )
    base = facts.config.base_model_name_or_path
    if not is_hub_repo_id(base):
        warnings.warn(
            f"The adapter's base_model_name_or_path is {base!r}, not a Hub repo id: "
            "AutoModelForCausalLM.from_pretrained(repo_id) will not find the base model on another machine, and "
            "the card has no base_model metadata. Pass base_model='org/name' (CLI: --base-model) to record it.",
            UserWarning,
            stacklevel=3,
        )


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    adapter_name: Optional[str] = None,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: Optional[str] = None,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    results: Any = None,
    license: Optional[str] = None,
    title: Optional[str] = None,
    description: Optional[str] = None,
    tags: Sequence[str] = (),
    template: Optional[PathLike] = None,
    dry_run_dir: Optional[PathLike] = None,
) -> Union[str, Path]:
    """Publish one SADI adapter to the Hub as ``repo_id``, with a SADI model card; return the commit URL.

    ``model`` is a model holding the adapter or the path of a saved adapter folder (nothing heavy is loaded
    then). The folder that is uploaded is written by :func:`save_with_card` (adapter files at the top, the card as
    ``README.md``) and sent with ``HfApi().create_repo(repo_id, exist_ok=True)`` and ``HfApi().upload_folder``; for
    a ``revision`` other than ``main`` the branch is created first. ``PeftModel.push_to_hub`` is not used: it
    would replace the card with a generic transformers one.

    With ``dry_run_dir`` nothing is uploaded and no token is needed: the exact folder that would be uploaded is
    written there and its path returned. Without a token (none passed, ``huggingface_hub.get_token()`` is None)
    :class:`HubLoginError` is raised, saying how to log in, before anything is written.
    """
    _check_repo_id(repo_id)
    card_kwargs = dict(
        repo_id=repo_id,
        dataset=dataset,
        results=results,
        license=license,
        title=title,
        description=description,
        tags=tags,
        template=template,
    )
    if results is not None:
        _normalize_results(results)  # fail on malformed results before saving or uploading anything
    staging_parent: Optional[Path] = None
    if dry_run_dir is not None:
        target = Path(dry_run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging_parent = target.parent
    else:
        import huggingface_hub

        token = token or huggingface_hub.get_token()
        if not token:
            raise _login_error(repo_id)
    with tempfile.TemporaryDirectory(prefix=".sadi-push-", dir=staging_parent) as tmp:
        folder = save_with_card(
            model, Path(tmp) / "upload", adapter_name=adapter_name, base_model=base_model, **card_kwargs
        )
        _check_publishable(folder)
        if dry_run_dir is not None:
            replace_directory(folder, target)
            logger.info("Dry run: wrote the folder that would be uploaded as %s to %s", repo_id, target)
            return target

        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            revision=revision,
        )
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("Uploaded the SADI adapter to %s: %s", repo_id, url)
    return url


# ---------------------------------------------------------------------------------------------------- checking
def _describe_files(files: Sequence[str], read_json) -> str:
    """What a set of repo files looks like, for error messages. ``read_json(name)`` returns a dict or None."""
    names = sorted(files)
    visible = [f for f in names if not f.startswith(".")]
    if not visible:
        return "nothing (an empty repository or folder)"
    top = {f for f in visible if "/" not in f}
    nested_adapters = sorted({f.rsplit("/", 1)[0] for f in visible if f.endswith("/" + ADAPTER_CONFIG_NAME)})
    listing = ", ".join(visible[:8]) + (f", … ({len(visible)} files)" if len(visible) > 8 else "")
    if "config.json" in top and (top & set(_FULL_MODEL_WEIGHTS) or any(f.endswith(".gguf") for f in top)):
        config = read_json("config.json") or {}
        model_type = config.get("model_type")
        architectures = config.get("architectures")
        kind = f"model_type {model_type!r}" if model_type else "a config.json"
        if architectures:
            kind += f", {', '.join(architectures)}"
        return (
            f"a full model ({kind}; files: {listing}) without adapter_config.json. It is a base model, not an "
            "adapter: load it with AutoModelForCausalLM.from_pretrained"
        )
    if nested_adapters:
        return (
            f"no adapter_config.json at the top, but adapters in the subfolders {', '.join(nested_adapters)} "
            "(pass subfolder=... / the adapter name)"
        )
    return f"no adapter_config.json (files: {listing})"


def _describe_peft_config(data: Mapping[str, Any]) -> str:
    peft_type = data.get("peft_type")
    if not peft_type:
        return f"an adapter_config.json without peft_type (keys: {', '.join(sorted(data)[:10])}): not a PEFT adapter"
    details = []
    if data.get("r") is not None:
        details.append(f"r={data['r']}")
    if data.get("target_modules"):
        details.append(f"target_modules={data['target_modules']}")
    if data.get("base_model_name_or_path"):
        details.append(f"base model {data['base_model_name_or_path']!r}")
    extra = f" ({', '.join(details)})" if details else ""
    return (
        f"a {peft_type} adapter{extra}, not a SADI adapter (peft_type 'SADI'). A {peft_type} adapter loads with "
        "peft.PeftModel.from_pretrained without sadi_peft"
    )


def _cached_snapshot(repo_id: str, revision: Optional[str]) -> Optional[Path]:
    """The huggingface_hub cache snapshot folder of ``repo_id`` at ``revision``, if cached."""
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision) and (repo_dir / "snapshots" / revision).is_dir():
        return repo_dir / "snapshots" / revision
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    return None


def _remote_files(repo_id: str, revision: Optional[str], token: Optional[str]) -> tuple[Optional[list[str]], str]:
    """(files, where) of a Hub repo: listed online, else from the local cache; files is None if neither works."""
    from huggingface_hub import HfApi, is_offline_mode

    error_text = ""
    if not is_offline_mode():
        try:
            return HfApi().list_repo_files(repo_id, revision=revision, token=token), "on the Hub"
        except Exception as error:  # noqa: BLE001 - any failure: fall back to the cache, report it below
            error_text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    snapshot = _cached_snapshot(repo_id, revision)
    if snapshot is not None:
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        return files, "in the local Hugging Face cache"
    return None, error_text


def load_adapter_config(
    repo_id_or_path: PathLike,
    revision: Optional[str] = None,
    *,
    subfolder: Optional[str] = None,
    token: Optional[str] = None,
) -> SADIConfig:
    """The ``SADIConfig`` of the SADI adapter in a folder or a Hub repo (at ``revision``); refuses anything else.

    The error (:class:`NotASADIAdapterError`, a ``ValueError``) names what was found instead: another PEFT adapter
    type (e.g. a LoRA), a full model without ``adapter_config.json``, adapters only in subfolders, an empty or
    missing repo, or a revision that does not exist. Works offline from the huggingface_hub cache
    (``HF_HUB_OFFLINE=1``).
    """
    where = str(repo_id_or_path)
    local = Path(repo_id_or_path)
    if local.exists() or not is_hub_repo_id(str(repo_id_or_path)):
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise NotASADIAdapterError(
                f"{folder} is not a folder (nor a Hub repo id): expected a saved SADI adapter holding "
                f"{ADAPTER_CONFIG_NAME}."
            )
        config_file = folder / ADAPTER_CONFIG_NAME
        if not config_file.is_file():
            files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]

            def read_local(name: str) -> Optional[dict]:
                try:
                    return json.loads((folder / name).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return None

            found = _describe_files(files, read_local)
            raise NotASADIAdapterError(f"{folder} does not hold a SADI adapter: it holds {found}.")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RevisionNotFoundError

        repo_id = str(repo_id_or_path)
        at = f" at revision {revision!r}" if revision else ""
        where = f"the Hub repo {repo_id!r}{at}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        try:
            config_file = Path(
                hf_hub_download(repo_id, ADAPTER_CONFIG_NAME, subfolder=subfolder, revision=revision, token=token)
            )
        except RevisionNotFoundError:
            raise NotASADIAdapterError(f"{where} does not exist: the repo has no revision {revision!r}.") from None
        except Exception as error:  # noqa: BLE001 - missing file, missing repo, offline: describe what is there
            files, listed_where = _remote_files(repo_id, revision, token)
            if files is None:
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                raise NotASADIAdapterError(
                    f"{where} holds no SADI adapter that can be read: found nothing (no such repo or revision, a "
                    "private or gated repo without a token that has access, or the Hub is unreachable and the repo "
                    f"is not in the local cache). {reason}"
                ) from error
            if subfolder:
                prefix = subfolder.rstrip("/") + "/"
                files = [f[len(prefix) :] for f in files if f.startswith(prefix)]

            def read_remote(name: str) -> Optional[dict]:
                try:
                    path = hf_hub_download(repo_id, name, subfolder=subfolder, revision=revision, token=token)
                    return json.loads(Path(path).read_text(encoding="utf-8"))
                except Exception:  # noqa: BLE001
                    return None

            found = _describe_files(files, read_remote)
            message = f"{where} does not hold a SADI adapter: it holds ({listed_where}) {found}."
            raise NotASADIAdapterError(message) from None
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise NotASADIAdapterError(f"{where}: {ADAPTER_CONFIG_NAME} is not valid JSON ({error}).") from None
    if not isinstance(data, dict) or data.get("peft_type") != "SADI":
        found = _describe_peft_config(data) if isinstance(data, dict) else f"{type(data).__name__} JSON"
        raise NotASADIAdapterError(f"{where} does not hold a SADI adapter: it holds {found}.")
    try:
        return SADIConfig.from_pretrained(str(config_file.parent))
    except (TypeError, ValueError) as error:
        raise NotASADIAdapterError(f"{where} holds a SADI adapter_config.json that is not valid: {error}") from None


# ---------------------------------------------------------------------------------------------------- offline cache
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_to_hf_cache(
    folder: PathLike,
    repo_id: str,
    *,
    cache_dir: Optional[PathLike] = None,
    revision: str = "main",
    commit_hash: Optional[str] = None,
) -> str:
    """Lay the files of ``folder`` into the huggingface_hub cache as ``repo_id`` at ``revision``; return the commit.

    Writes huggingface_hub's own layout (``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` as
    relative symlinks to the blobs, ``refs/<revision>``), so that with ``HF_HUB_OFFLINE=1`` the real loading code
    (``PeftModel.from_pretrained(base, repo_id)``, ``AutoModelForCausalLM.from_pretrained(repo_id)``,
    ``revision=<commit>``) finds the files by repo id: for air-gapped machines and for tests. ``commit_hash``
    defaults to a hash of the files' names and contents (40 hex digits, like a git commit).
    """
    from huggingface_hub import constants

    _check_repo_id(repo_id)
    source = Path(folder)
    files = sorted(p for p in source.rglob("*") if p.is_file() and ".git" not in p.relative_to(source).parts)
    if not files:
        raise ValueError(f"{source} holds no files to cache.")
    hashes = {p: _sha256(p) for p in files}
    if commit_hash is None:
        commit_hash = hashlib.sha1(
            "".join(f"{p.relative_to(source).as_posix()}\0{hashes[p]}\n" for p in files).encode()
        ).hexdigest()
    if not re.fullmatch(r"[0-9a-f]{40}", commit_hash):
        raise ValueError(f"commit_hash={commit_hash!r} is invalid: expected 40 lowercase hex digits.")
    repo_dir = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit_hash
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path in files:
        relative = path.relative_to(source)
        blob = repo_dir / "blobs" / hashes[path]
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks (e.g. Windows without developer mode): a copy, as huggingface_hub does
            shutil.copyfile(blob, link)
    if revision != commit_hash:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit_hash)
    return commit_hash
