"""``SADIConfig``: the adapter configuration written to ``adapter_config.json``."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .architectures import VARIANTS


class SADIPeftType(str, enum.Enum):
    """PEFT's ``PeftType`` is a closed enum; SADI brings its own ``(str, Enum)`` member of value ``"SADI"``.

    With the ``str`` mix-in the member hashes and compares like ``"SADI"``, so PEFT's mappings and the plain string
    in ``adapter_config.json`` find it, and transformers can read ``peft_type.value``.
    """

    SADI = "SADI"


POSITIONS = ("last", "all")
RANKINGS = ("signed", "absolute")
NEURON_STATISTICS = ("activation", "input")
#: keys every saved SADI adapter_config.json carries (what decides which units are steered and how)
SAVED_KEYS = frozenset({"variant", "top_k", "delta", "positions", "target_modules", "unit_counts"})


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"SADIConfig.{name}={value!r} is invalid: expected {expected}.")


@dataclass
class SADIConfig(PeftConfig):
    """Configuration of a SADI steering adapter.

    SADI multiplies a few units of a model's activations, chosen from contrastive pairs by
    :func:`sadi_peft.calibrate`, by the gain ``1 + delta``. The adapter's only state is the binary mask (and the
    calibration scores it was cut from); ``delta`` lives here.
    """

    variant: Literal["head", "neuron", "hidden"] = field(
        default="head",
        metadata={
            "help": "Which units are steered: 'head' = attention heads (input of the attention output projection, "
            "one gain per whole head), 'neuron' = FFN neurons (input of the MLP down projection), 'hidden' = "
            "MLP output dimensions (output of the MLP down projection, before the residual add)."
        },
    )
    top_k: int = field(
        default=4,
        metadata={"help": "Number of units kept in the mask, ranked globally across all targeted layers (>= 1)."},
    )
    delta: float = field(
        default=9.0,
        metadata={
            "help": "Steering strength: masked activations are multiplied by the gain 1 + delta (the authors' "
            "`strength`). Must be > -1 so that the gain stays positive."
        },
    )
    positions: Literal["last", "all"] = field(
        default="last",
        metadata={
            "help": "'last': the gain applies at the last non-pad prompt token during the prefill only (the "
            "authors' regime; generated tokens see it through the KV cache). 'all': every position, generated "
            "tokens included; a fixed diagonal gain that can be merged into the weights and exported."
        },
    )
    ranking: Literal["signed", "absolute"] = field(
        default="signed",
        metadata={
            "help": "How calibration scores are ranked: 'signed' keeps the largest positive mean differences "
            "(authors' code), 'absolute' the largest magnitudes."
        },
    )
    neuron_statistic: Literal["activation", "input"] = field(
        default="activation",
        metadata={
            "help": "variant='neuron' only: rank neurons on the gate activation output (SiLU(gate) on Llama, as "
            "in the authors' code) or on the down projection input (act(gate) * up). Identical for MLPs without a "
            "gate."
        },
    )
    num_heads: Optional[int] = field(
        default=None,
        metadata={
            "help": "variant='head' only: number of attention (query) heads the output projection input is split "
            "into. Filled from the model config when None."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to wrap, as PEFT matches them (suffixes or a regex). When None they come from the "
            "architecture table in sadi_peft.architectures for the model's model_type."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to leave out, as PEFT matches them."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Only these layer indices are candidates for the mask (default: every layer)."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer container used with layers_to_transform (PEFT's convention)."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Kept for PEFT compatibility; SADI trains nothing, leave it None."}
    )
    unit_counts: Optional[dict[str, int]] = field(
        default=None,
        metadata={
            "help": "Filled when the adapter is created: number of steerable units per wrapped module. Loading "
            "the adapter on a base model with other layers or widths is refused with both shapes named."
        },
    )
    calibration: Optional[dict[str, Any]] = field(
        default=None,
        metadata={"help": "Filled by sadi_peft.calibrate: number of pairs and other facts about the calibration."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # JSON delivers a plain string; PEFT and transformers need the enum member (``.value``).
        self.peft_type = SADIPeftType.SADI
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        self.validate()

    def validate(self) -> None:
        """Check every field; raises ``ValueError`` naming the field, the value and the allowed range."""
        if self.variant not in VARIANTS:
            _fail("variant", self.variant, f"one of {VARIANTS}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            _fail("top_k", self.top_k, "an integer >= 1")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)):
            _fail("delta", self.delta, "a number > -1 (the gain is 1 + delta)")
        self.delta = float(self.delta)
        if not math.isfinite(self.delta) or self.delta <= -1.0:
            _fail("delta", self.delta, "a finite number > -1 (the gain is 1 + delta; delta = -1 zeroes the units)")
        if self.positions not in POSITIONS:
            _fail("positions", self.positions, f"one of {POSITIONS}")
        if self.ranking not in RANKINGS:
            _fail("ranking", self.ranking, f"one of {RANKINGS}")
        if self.neuron_statistic not in NEURON_STATISTICS:
            _fail("neuron_statistic", self.neuron_statistic, f"one of {NEURON_STATISTICS}")
        if self.num_heads is not None and (
            isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1
        ):
            _fail("num_heads", self.num_heads, "None or an integer >= 1")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                _fail("layers_to_transform", self.layers_to_transform, "None, or non-negative layer indices")
        if isinstance(self.target_modules, (list, tuple, set)) and len(self.target_modules) == 0:
            _fail("target_modules", self.target_modules, "None or at least one module name")
        if self.modules_to_save:
            _fail("modules_to_save", self.modules_to_save, "None: SADI trains no module")

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "SADIConfig":
        """Build from a saved ``adapter_config.json`` (PEFT's loading path), refusing unknown and missing keys.

        PEFT drops unknown keys with a warning and fills missing ones with defaults; for SADI either could change
        what the adapter does (a newer field, or ``variant`` silently becoming ``"head"``), so both are errors.
        """
        if cls is SADIConfig and kwargs.get("peft_type", "SADI") in ("SADI", SADIPeftType.SADI):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise ValueError(
                    f"adapter_config.json has keys SADIConfig does not know: {unknown}. It was probably written by a "
                    "newer sadi-peft; upgrade sadi-peft (pip install -U sadi-peft) to load it."
                )
            missing = sorted(SAVED_KEYS - set(kwargs))
            if missing:
                raise ValueError(
                    f"adapter_config.json lacks the SADI key(s) {missing}; the file is incomplete or was edited by "
                    "hand. Re-save the adapter with sadi_peft.save_pretrained."
                )
        return super().from_peft_type(**kwargs)

    @property
    def gain(self) -> float:
        """The multiplicative gain ``1 + delta`` applied to masked units."""
        return 1.0 + self.delta

    @property
    def side(self) -> Literal["input", "output"]:
        """Which side of the wrapped Linear the gain acts on."""
        return "output" if self.variant == "hidden" else "input"
