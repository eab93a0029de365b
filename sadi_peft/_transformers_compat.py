"""Checkpoints that transformers 4.57 and 5.x read alike.

transformers 4.57 misreads two things in a folder saved by transformers 5 (verified with 4.57.6 and 5.23.0):

* the RoPE setting: 5.x writes it only as ``rope_parameters``; 4.57 reads ``rope_theta`` / ``rope_scaling`` (Gemma 3:
  also ``rope_local_base_freq``) and, when they are absent, **silently** uses its default base: a different model;
* the tokenizer class: 5.x writes ``tokenizer_class: TokenizersBackend``, which 4.57 does not know ("Tokenizer class
  TokenizersBackend does not exist"); ``PreTrainedTokenizerFast`` reads the same ``tokenizer.json`` in both.

:func:`make_readable_by_transformers4` adds the 4.x keys to such a folder (5.x reads it exactly as before);
:func:`transformers4_overrides` gives the same mapping in memory for loading a folder that is not ours to edit.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# transformers 5 tokenizer class -> the transformers 4 class that reads the same tokenizer.json.
_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Per-layer-type rope_parameters (Gemma 3) -> the transformers 4 key of each type's base.
_LAYER_TYPE_THETA_KEYS = {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"}


def transformers_major() -> int:
    """Major version of the installed transformers."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).major


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rope_keys(rope: dict[str, Any], theta_key: str, config: dict[str, Any], keys: dict[str, Any]) -> None:
    if theta_key not in config and "rope_theta" in rope:
        keys[theta_key] = rope["rope_theta"]
    scaled = rope.get("rope_type", "default") != "default"
    if theta_key == "rope_theta" and scaled and config.get("rope_scaling") is None:
        keys["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}


def legacy_config_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers 4 keys that a ``config.json`` written by transformers 5 lacks (``{}`` when none)."""
    rope = config.get("rope_parameters")
    keys: dict[str, Any] = {}
    if not isinstance(rope, dict):
        return keys
    if "rope_theta" in rope:
        _rope_keys(rope, "rope_theta", config, keys)
    else:
        for layer_type, theta_key in _LAYER_TYPE_THETA_KEYS.items():
            if isinstance(rope.get(layer_type), dict):
                _rope_keys(rope[layer_type], theta_key, config, keys)
    return keys


def legacy_tokenizer_class(tokenizer_config: dict[str, Any]) -> str | None:
    """The transformers 4 name of a transformers 5 ``tokenizer_class``, or None when no mapping is needed."""
    return _TOKENIZER_CLASSES.get(tokenizer_config.get("tokenizer_class"))


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_readable_by_transformers4(folder: str | os.PathLike[str]) -> list[str]:
    """Add to a checkpoint folder saved by transformers 5 the keys that transformers 4.57 needs to read it alike.

    ``config.json`` gains ``rope_theta`` (and ``rope_scaling`` for a non-default RoPE type; ``rope_local_base_freq``
    for Gemma 3's sliding layers) next to ``rope_parameters``; ``tokenizer_config.json`` names
    ``PreTrainedTokenizerFast`` instead of ``TokenizersBackend`` when a ``tokenizer.json`` is there. transformers 5
    reads the result as before. Idempotent; each file is replaced atomically, so concurrent readers see either
    version.

    Returns:
        The names of the files changed (empty when the folder already reads alike in 4.x and 5.x).
    """
    folder = Path(folder)
    changed = []
    config_path = folder / "config.json"
    config = read_json(config_path)
    legacy = legacy_config_keys(config)
    if legacy:
        _write_json_atomically(config_path, {**config, **legacy})
        changed.append(config_path.name)
    tokenizer_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json(tokenizer_path)
    tokenizer_class = legacy_tokenizer_class(tokenizer_config)
    if tokenizer_class is not None and (folder / "tokenizer.json").is_file():
        _write_json_atomically(tokenizer_path, {**tokenizer_config, "tokenizer_class": tokenizer_class})
        changed.append(tokenizer_path.name)
    if changed:
        logger.info("Added the transformers 4.x keys to %s in %s.", " and ".join(changed), folder)
    return changed


def transformers4_overrides(path: str | os.PathLike[str]) -> tuple[Any | None, Any | None]:
    """For loading a local folder saved by transformers 5 under transformers 4 without editing it.

    Returns:
        ``(config, tokenizer_class)``: a config with the 4.x RoPE keys set (pass it as ``config=`` to
        ``from_pretrained``) and ``PreTrainedTokenizerFast`` for a ``TokenizersBackend`` tokenizer; each is None
        when not needed (always both under transformers 5, or for a folder that 4.x reads correctly).
    """
    if not os.path.isdir(path) or transformers_major() >= 5:
        return None, None
    config = None
    legacy = legacy_config_keys(read_json(Path(path) / "config.json"))
    if legacy:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        for key, value in legacy.items():
            setattr(config, key, value)
        logger.info("%s was saved by transformers 5: using %s from its rope_parameters.", path, legacy)
    tokenizer_class = None
    if legacy_tokenizer_class(read_json(Path(path) / "tokenizer_config.json")) is not None:
        from transformers import PreTrainedTokenizerFast

        tokenizer_class = PreTrainedTokenizerFast
    return config, tokenizer_class
