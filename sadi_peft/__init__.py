"""sadi-peft: SADI activation steering as a parameter-free PEFT tuner.

``import sadi_peft`` registers the ``"SADI"`` PEFT type, after which ``peft.get_peft_model``,
``PeftModel.from_pretrained`` and transformers' ``load_adapter`` / ``AutoModelForCausalLM.from_pretrained(adapter_dir)``
handle SADI adapters like any other.
"""

from ._versions import check_versions as _check_versions

# Before torch/transformers/peft are imported: a version outside the supported range is one clear ImportError here,
# not a crash deep inside PEFT or transformers (see sadi_peft/_versions.py).
_check_versions()

from .architectures import ARCHITECTURES, ArchitectureSpec, supported_model_types
from .calibration import CalibrationResult, apply_top_k, calibrate
from .config import SADIConfig, SADIPeftType
from .export import export_ia3, export_lora, export_merged
from .layer import SADILayer, SADIOverflowError
from .model import SADIModel, prompt_boundary, register, set_delta
from .saving import save_pretrained
from .stacking import add_sadi_adapter, load_sadi_adapter, load_stack, merge_and_unload

register()

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "add_sadi_adapter",
    "load_sadi_adapter",
    "load_stack",
    "merge_and_unload",
    "CalibrationResult",
    "SADIConfig",
    "SADILayer",
    "SADIOverflowError",
    "SADIModel",
    "SADIPeftType",
    "apply_top_k",
    "export_ia3",
    "export_lora",
    "export_merged",
    "calibrate",
    "prompt_boundary",
    "register",
    "save_pretrained",
    "set_delta",
    "supported_model_types",
]
