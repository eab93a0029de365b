"""Supported version ranges: the import-time check, its agreement with pyproject.toml, and checkpoints that
transformers 4.57 and 5.x read alike. Runs in both environments (`make test` and `make test-compat`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from tiny_models import tiny_llama

import sadi_peft
from sadi_peft import _versions
from sadi_peft._transformers_compat import legacy_config_keys, make_readable_by_transformers4
from sadi_peft.zoo import convert_smollm2_gguf, load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


# ---------------------------------------------------------------------------------------------- version check
def test_import_check_uses_the_ranges_declared_in_pyproject():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = {Requirement(line).name: Requirement(line).specifier for line in declared}
    for name, spec in _versions.SUPPORTED.items():
        assert requirements[name] == SpecifierSet(spec), f"pyproject.toml says {name}{requirements[name]}"
    for name, tested in _versions.TESTED.items():
        assert all(SpecifierSet(_versions.SUPPORTED[name]).contains(v) for v in tested)


def test_this_environment_is_supported():
    assert _versions.version_problems() == []
    _versions.check_versions()


@pytest.mark.parametrize(
    "versions",
    [
        {"torch": "2.13.0+cpu", "transformers": "4.57.0", "peft": "0.21.0"},
        {"torch": "2.14.1", "transformers": "5.23.0", "peft": "0.21.2"},
        {"torch": "2.13.0", "transformers": "4.57.6", "peft": "0.21.3.dev0"},
    ],
)
def test_versions_inside_the_ranges_pass(versions):
    assert _versions.version_problems(versions) == []


@pytest.mark.parametrize(
    "package, version, spec",
    [
        ("transformers", "5.24.0", ">=4.57,<5.24"),
        ("transformers", "5.24.0.dev0", ">=4.57,<5.24"),
        ("transformers", "4.56.2", ">=4.57,<5.24"),
        ("peft", "0.22.0", ">=0.21,<0.22"),
        ("peft", "0.20.0", ">=0.21,<0.22"),
        ("torch", "2.12.1+cu126", ">=2.13"),
    ],
)
def test_a_version_outside_the_range_is_an_import_error_naming_version_range_and_fix(package, version, spec):
    versions = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", package: version}
    with pytest.raises(ImportError) as info:
        _versions.check_versions(versions)
    message = str(info.value)
    assert f"{package} {version} is installed, but sadi-peft supports {package}{spec}" in message
    assert f'pip install "{package}{spec}"' in message
    assert _versions.SKIP_ENV in message
    assert message.count("\n  - ") == 1  # only the offending package is listed


def test_missing_and_unparsable_versions_are_reported():
    with pytest.raises(ImportError, match=r'peft is not installed; .*Fix: pip install "peft>=0.21,<0.22"'):
        _versions.check_versions({"peft": None})
    with pytest.raises(ImportError, match=r"torch reports the version 'banana'"):
        _versions.check_versions({"torch": "banana"})


def test_skip_variable_turns_the_error_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(_versions.SKIP_ENV, "1")
    with caplog.at_level("WARNING", logger="sadi_peft._versions"):
        _versions.check_versions({"transformers": "5.24.0"})
    assert "transformers 5.24.0 is installed" in caplog.text


def _import_with_patched_metadata(version: str, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    """`import sadi_peft` in a fresh interpreter whose package metadata reports `transformers==version`."""
    code = f"""
        from importlib import metadata
        real = metadata.version
        metadata.version = lambda name: {version!r} if name == "transformers" else real(name)
        import sadi_peft
        print("imported", sadi_peft.__version__)
        """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop(_versions.SKIP_ENV, None)
    env.update(extra_env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_sadi_peft_refuses_an_unsupported_transformers():
    refused = _import_with_patched_metadata("5.24.0", {})
    assert refused.returncode != 0 and "imported" not in refused.stdout
    assert "ImportError: sadi-peft cannot run with the installed packages" in refused.stderr
    assert 'transformers 5.24.0 is installed, but sadi-peft supports transformers>=4.57,<5.24' in refused.stderr
    assert 'pip install "transformers>=4.57,<5.24"' in refused.stderr
    forced = _import_with_patched_metadata("5.24.0", {_versions.SKIP_ENV: "1"})
    assert forced.returncode == 0, forced.stderr
    assert f"imported {sadi_peft.__version__}" in forced.stdout


# ---------------------------------------------------------------------------------------------- 4.57 vs 5.x checkpoints
@pytest.mark.parametrize(
    "config, expected",
    [
        ({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}, {"rope_theta": 1e5}),
        (
            {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}},
            {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        ),
        (
            {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                 "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}},
            {"rope_theta": 1e6, "rope_local_base_freq": 1e4},
        ),
        ({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}, "rope_theta": 1e5}, {}),  # both already
        ({"rope_theta": 1e4, "rope_scaling": None}, {}),  # written by transformers 4
        ({}, {}),
    ],
)
def test_legacy_config_keys(config, expected):
    assert legacy_config_keys(config) == expected


THETA = 5e5  # not the Llama default (1e4): a loader that misses it builds a different model


def _save_in_transformers5_layout(folder: Path, rope_scaling: dict | None = None) -> tuple[torch.nn.Module, object]:
    """A tiny Llama (RoPE base THETA) and a tokenizer saved as transformers 5 writes them, whatever version runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama(rope_theta=THETA, **({"rope_scaling": rope_scaling} if rope_scaling else {}))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    theta = config.pop("rope_theta", None) or config["rope_parameters"]["rope_theta"]
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": theta, **(rope_scaling or {"rope_type": "default"})}
    (folder / "config.json").write_text(json.dumps(config))

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "TokenizersBackend"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return model, tokenizer


def _assert_same_model(loaded, reference):
    default = 1.0 / (1e4 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))  # head_dim 8
    assert not torch.allclose(reference.model.rotary_emb.inv_freq, default)
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq, atol=0, rtol=0)
    ids = torch.tensor([[5, 9, 14, 3, 22, 31, 7, 40, 12, 6, 19, 25]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_load_model_and_tokenizer_reads_a_transformers5_folder_alike(tmp_path):
    reference, tokenizer = _save_in_transformers5_layout(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "tokenizer_config.json")}
    model, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    _assert_same_model(model, reference)
    assert loaded_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    assert tokenizer("hello there world")["input_ids"] == [4, 3, 5]
    assert loaded_tokenizer.pad_token == "<pad>"
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # a user's folder is not edited


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 4.0}])
def test_make_readable_by_transformers4_is_read_alike_by_both_versions(tmp_path, rope_scaling):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    reference, tokenizer = _save_in_transformers5_layout(tmp_path, rope_scaling)
    as_saved = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert make_readable_by_transformers4(tmp_path) == ["config.json", "tokenizer_config.json"]
    assert make_readable_by_transformers4(tmp_path) == []  # idempotent
    # plain transformers now reads the folder right, whatever its version
    _assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), reference)
    assert AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    if TRANSFORMERS_5:  # and transformers 5 reads exactly what it read before
        assert AutoConfig.from_pretrained(tmp_path).to_dict() == as_saved


def test_a_cached_demo_checkpoint_from_transformers5_is_upgraded_on_use(tmp_path):
    _save_in_transformers5_layout(tmp_path)
    assert "rope_theta" not in json.loads((tmp_path / "config.json").read_text())
    assert convert_smollm2_gguf(tmp_path) == tmp_path  # complete: no conversion, only the 4.x keys added
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == THETA
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
