"""Publishing to and loading from the Hugging Face Hub (``sadi_peft.hub``, ``sadi-peft push``), without network.

* Cards: front matter parsed by ``huggingface_hub.ModelCard`` (and PyYAML), required fields and tags, the
  ``import sadi_peft`` line, the loading snippets, the evaluation table only with results.
* Upload side: ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` are replaced by recorders that copy the
  folder they are handed, so the exact files and card that would be uploaded are checked; no token means the login
  error and no call at all.
* Download side, through the real loading code in a fresh interpreter (the Hub settings are read at import):
  - from huggingface_hub's own cache layout with ``HF_HUB_OFFLINE=1`` (always): ``PeftModel.from_pretrained(base,
    repo_id)``, ``AutoModelForCausalLM.from_pretrained(repo_id)`` with the base model itself also fetched by repo id,
    and ``revision=<commit>`` pinning;
  - from an ``olah`` Hub mirror on 127.0.0.1 (when ``olah`` is installed: the ``test`` extra), offline, serving
    local git repos (its ``mirrors-path`` feature), with ``HF_ENDPOINT`` pointed at it: the same loads plus
    revision pinning to real git commits. olah answers a missing file of a local repo with 401 "repo not found"
    instead of 404, which breaks transformers' probing for optional files of a *full* model, so there the base model
    is a local folder; the adapter itself comes from the mirror.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_models import PAIRS, CharTokenizer, tiny_llama

import sadi_peft
from sadi_peft import hub
from sadi_peft.cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_ID = "sadi-test/tiny-llama"
REPO_ID = "sadi-test/tiny-sadi-head"
LORA_ID = "sadi-test/tiny-lora"
MISSING_ID = "sadi-test/does-not-exist"
REQUIRED_TAGS = {"sadi", "steering", "activation-steering", "peft", f"base_model:adapter:{BASE_ID}"}
RESULTS = {"task": "sst2", "metric": "accuracy", "split": "validation", "n": 200, "baseline": 0.615, "steered": 0.83}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _inputs() -> dict[str, torch.Tensor]:
    tok = CharTokenizer()
    rows = [tok.encode("Review: a joy. Sentiment:"), tok.encode("Review: dull. Sentiment:")]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):  # left padding, as for generation
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(autouse=True)
def _no_hub_lookups(monkeypatch):
    """PEFT's save looks up the base model's config on the Hub unless HF_HUB_OFFLINE is set (read at call time)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny base model, a calibrated SADI-HEAD adapter saved at K=3 (v1) and K=1 (v2), a LoRA, reference logits."""
    root = tmp_path_factory.mktemp("hub")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        base = tiny_llama(seed=0)
        base_dir = root / "base"
        base.save_pretrained(base_dir)
        base.name_or_path = BASE_ID  # recorded as base_model_name_or_path, as for a base loaded by repo id
        model = get_peft_model(base, sadi_peft.SADIConfig(variant="head", top_k=3, delta=4.0))
        sadi_peft.calibrate(model, CharTokenizer(), PAIRS, show_progress=False)
        inputs = _inputs()
        with torch.no_grad():
            ref_v1 = model(**inputs).logits
            v1 = sadi_peft.save_pretrained(model, root / "v1")
            sadi_peft.apply_top_k(model, 1)
            ref_v2 = model(**inputs).logits
            v2 = sadi_peft.save_pretrained(model, root / "v2")
            with model.disable_adapter():
                ref_base = model(**inputs).logits
        assert not torch.allclose(ref_v1, ref_v2) and not torch.allclose(ref_v2, ref_base)
        torch.save({"inputs": inputs, "v1": ref_v1, "v2": ref_v2, "base": ref_base}, root / "reference.pt")

        lora = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        lora_dir = root / "lora"
        lora.save_pretrained(lora_dir)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return {
        "root": root,
        "model": model,  # at K=1, like v2
        "base_dir": base_dir,
        "v1": v1,
        "v2": v2,
        "lora": lora_dir,
        "reference": root / "reference.pt",
    }


def _mask_units(folder: Path) -> set[tuple[str, int]]:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return {
        (key.removeprefix("base_model.model.").removesuffix(".sadi_mask"), int(i))
        for key, mask in tensors.items()
        if key.endswith(".sadi_mask")
        for i in mask.nonzero().flatten().tolist()
    }


# ---------------------------------------------------------------------------------------------------- cards
def test_card_front_matter_fields_and_loading_instructions(adapters):
    card = hub.build_model_card(adapters["model"], repo_id=REPO_ID, dataset="stanfordnlp/sst2")
    data = ModelCard(card).data.to_dict()
    assert data == _front_matter(card)
    assert data["base_model"] == BASE_ID
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert REQUIRED_TAGS <= set(data["tags"])
    assert data["datasets"] == ["stanfordnlp/sst2"]
    assert "license" not in data

    body = card.split("---\n", 2)[2]
    assert "import sadi_peft" in body and "KeyError: 'SADI'" in body
    # the import comes before each loading snippet
    snippets = (f'PeftModel.from_pretrained(base, "{REPO_ID}")', f'AutoModelForCausalLM.from_pretrained("{REPO_ID}")')
    for snippet in snippets:
        position = body.index(snippet)
        assert body.rfind("import sadi_peft", 0, position) != -1
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_ID}")' in body
    assert "| variant | `head`" in body
    assert "| units kept (K) | 1 of 8 heads" in body
    assert "| δ (`delta`) | 4 |" in body and "| gain (= 1 + δ) | 5 |" in body
    assert "| positions | `last`" in body
    assert "**8 contrastive pairs**" in body and "stanfordnlp/sst2" in body
    (module, unit), = _mask_units(adapters["v2"])
    assert f"| 1 | {module.split('.')[2]} | `{module}` | {unit} |" in body
    assert "2410.12299" in body and "Wang, Weixuan and Yang, Jingyuan and Peng, Wei" in body and "ICLR" in body
    assert "## Evaluation" not in body


def test_card_evaluation_table_only_with_results(adapters):
    with_results = hub.build_model_card(adapters["v1"], repo_id=REPO_ID, results=RESULTS, license="apache-2.0")
    assert ModelCard(with_results).data.license == "apache-2.0"
    assert "## Evaluation" in with_results
    assert "| sst2 | accuracy | validation | 200 | 0.615 | 0.83 | +0.215 |" in with_results
    per_task = {"sst2": {"baseline": 0.5, "steered": 0.75}, "boolq": {"baseline": 0.6, "steered": 0.55}}
    several = hub.build_model_card(adapters["v1"], results=per_task)
    assert "| sst2 |" in several and "| boolq |" in several and "-0.05" in several
    assert "## Evaluation" not in hub.build_model_card(adapters["v1"])
    with pytest.raises(ValueError, match="baseline"):
        hub.build_model_card(adapters["v1"], results={"sst2": {"steered": 0.8}})


def test_card_from_saved_folder_matches_card_from_model(adapters):
    """The CLI builds the card from the folder alone (config + safetensors mask): same card as from the model."""
    kwargs = dict(repo_id=REPO_ID, dataset="SST-2 train split", results=RESULTS)
    assert hub.build_model_card(adapters["v2"], **kwargs) == hub.build_model_card(adapters["model"], **kwargs)
    v1 = hub.build_model_card(adapters["v1"], **kwargs)
    assert "| units kept (K) | 3 of 8 heads" in v1 and "| 3 | " in v1 and "| 4 | " not in v1


def test_card_variants_positions_and_local_base():
    config = sadi_peft.SADIConfig(variant="hidden", top_k=16, delta=-0.5, positions="all")
    config.base_model_name_or_path = "/home/someone/models/llama"
    card = hub.build_model_card(config, tags=["truthfulqa"])
    data = _front_matter(card)
    assert "base_model" not in data and not any(t.startswith("base_model:adapter:") for t in data["tags"])
    assert data["tags"][-1] == "truthfulqa"
    assert "`hidden`: MLP output dimensions" in card and "| gain (= 1 + δ) | 0.5 |" in card
    assert "`all`: every position" in card and "merge_and_unload" in card
    assert "stored in `adapter_model.safetensors`" in card  # no mask known from a bare config


# ---------------------------------------------------------------------------------------------------- saving
def test_save_with_card_named_adapter_lands_at_top(tmp_path):
    base = tiny_llama(seed=1)
    base.name_or_path = BASE_ID
    model = get_peft_model(base, sadi_peft.SADIConfig(variant="neuron", top_k=2), adapter_name="sst2")
    sadi_peft.calibrate(model, CharTokenizer(), PAIRS[:4], show_progress=False)
    folder = hub.save_with_card(model, tmp_path / "out", repo_id=REPO_ID, base_model="org/other-base")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/other-base"
    card = (folder / "README.md").read_text()
    assert card == hub.build_model_card(folder, repo_id=REPO_ID)
    assert _front_matter(card)["base_model"] == "org/other-base" and "`neuron`: FFN neurons" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


# ---------------------------------------------------------------------------------------------------- uploading
class _Recorder:
    """Stands in for the HfApi methods that reach the network; keeps a copy of the uploaded folder."""

    def __init__(self, monkeypatch, tmp_path):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, **kwargs):
            recorder.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def upload_folder(api, **kwargs):
            recorder.calls.append(("upload_folder", kwargs))
            folder = Path(kwargs["folder_path"])
            recorder.uploaded = {
                p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            }
            shutil.copytree(folder, tmp_path / "uploaded", dirs_exist_ok=True)

            class Commit:
                commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/{'a' * 40}"

            return Commit()

        from huggingface_hub import HfApi

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert huggingface_hub.get_token() is None


def test_push_uploads_exact_folder_and_card(adapters, monkeypatch, tmp_path, no_token):
    recorder = _Recorder(monkeypatch, tmp_path)
    url = hub.push_to_hub(
        adapters["model"], REPO_ID, token="hf_test", private=True, revision="dev", dataset="stanfordnlp/sst2",
        results=RESULTS, license="mit",
    )
    assert url == f"https://huggingface.co/{REPO_ID}/commit/{'a' * 40}"
    assert recorder.names == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in recorder.calls)
    assert create == {"repo_id": REPO_ID, "token": "hf_test", "private": True, "exist_ok": True}
    assert branch["branch"] == "dev" and branch["exist_ok"] is True
    assert upload["repo_id"] == REPO_ID and upload["revision"] == "dev" and upload["token"] == "hf_test"
    assert upload["commit_message"] == hub.DEFAULT_COMMIT_MESSAGE

    assert sorted(recorder.uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    uploaded = tmp_path / "uploaded"
    card = recorder.uploaded["README.md"].decode()
    assert card == hub.build_model_card(
        adapters["model"], repo_id=REPO_ID, dataset="stanfordnlp/sst2", results=RESULTS, license="mit"
    )
    assert ModelCard(card).data.library_name == "peft"  # not replaced by a generic transformers card
    config = json.loads(recorder.uploaded["adapter_config.json"])
    assert config["peft_type"] == "SADI" and config["top_k"] == 1 and config["base_model_name_or_path"] == BASE_ID
    assert _mask_units(uploaded) == _mask_units(adapters["v2"])


def test_push_with_hf_token_env_and_main_branch(adapters, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    recorder = _Recorder(monkeypatch, tmp_path)
    hub.push_to_hub(adapters["v1"], REPO_ID)  # a saved folder: nothing is loaded
    assert recorder.names == ["create_repo", "upload_folder"]  # no branch for main
    assert recorder.calls[0][1]["token"] == "hf_from_env"
    assert _mask_units(tmp_path / "uploaded") == _mask_units(adapters["v1"])


def test_push_without_token_says_how_to_log_in_and_uploads_nothing(adapters, monkeypatch, tmp_path, no_token):
    recorder = _Recorder(monkeypatch, tmp_path)
    before = sorted(os.listdir(adapters["root"]))
    with pytest.raises(hub.HubLoginError, match="hf auth login") as error:
        hub.push_to_hub(adapters["model"], REPO_ID)
    assert "HF_TOKEN" in str(error.value) and "huggingface-cli login" in str(error.value)
    assert recorder.calls == [] and sorted(os.listdir(adapters["root"])) == before

    code = cli_main(["push", str(adapters["v1"]), REPO_ID])
    assert code == 1 and recorder.calls == []


def test_push_refuses_uncalibrated_adapter(monkeypatch, tmp_path):
    recorder = _Recorder(monkeypatch, tmp_path)
    model = get_peft_model(tiny_llama(), sadi_peft.SADIConfig(top_k=2))
    with pytest.raises(ValueError, match="never calibrated"):
        hub.push_to_hub(model, REPO_ID, token="hf_test", base_model=BASE_ID)
    assert recorder.calls == []


def test_cli_push_dry_run_writes_the_upload_folder(adapters, tmp_path, capsys, no_token):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    out = tmp_path / "dry"
    code = cli_main([
        "push", str(adapters["v1"]), REPO_ID, "--dry-run", str(out), "--results", str(results),
        "--dataset", "stanfordnlp/sst2", "--license", "apache-2.0", "--base-model", "org/real-base",
    ])
    assert code == 0, capsys.readouterr().err
    assert "Dry run: nothing uploaded" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = (out / "README.md").read_text()
    assert card == hub.build_model_card(
        out, repo_id=REPO_ID, results=RESULTS, dataset="stanfordnlp/sst2", license="apache-2.0"
    )
    assert _front_matter(card)["base_model"] == "org/real-base" and "| sst2 | accuracy |" in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/real-base"

    assert cli_main(["push", str(adapters["lora"]), REPO_ID, "--dry-run", str(tmp_path / "x")]) == 2
    assert "LORA adapter" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_push_uploads_with_token_and_revision(adapters, monkeypatch, tmp_path, capsys, no_token):
    recorder = _Recorder(monkeypatch, tmp_path)
    code = cli_main(["push", str(adapters["v2"]), REPO_ID, "--token", "hf_cli", "--private", "--revision", "v2"])
    assert code == 0, capsys.readouterr().err
    assert recorder.names == ["create_repo", "create_branch", "upload_folder"]
    assert recorder.calls[0][1]["private"] is True and recorder.calls[2][1]["revision"] == "v2"
    assert recorder.uploaded["README.md"].decode() == hub.build_model_card(adapters["v2"], repo_id=REPO_ID)


# ---------------------------------------------------------------------------------------------------- checking a repo
def test_load_adapter_config_local_folders(adapters, tmp_path):
    assert hub.load_adapter_config(adapters["v1"]).top_k == 3
    with pytest.raises(hub.NotASADIAdapterError, match=r"a LORA adapter \(r=2"):
        hub.load_adapter_config(adapters["lora"])
    with pytest.raises(hub.NotASADIAdapterError, match=r"a full model \(model_type 'llama'"):
        hub.load_adapter_config(adapters["base_dir"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.NotASADIAdapterError, match="nothing"):
        hub.load_adapter_config(tmp_path / "empty")
    shutil.copytree(adapters["v1"], tmp_path / "multi" / "sst2")
    with pytest.raises(hub.NotASADIAdapterError, match="subfolders sst2"):
        hub.load_adapter_config(tmp_path / "multi")
    assert hub.load_adapter_config(tmp_path / "multi", subfolder="sst2").variant == "head"


# ---------------------------------------------------------------------------------------------------- downloading
LOAD_SCRIPT = r'''
import json, sys, traceback
import sadi_peft  # first: PEFT has no plugin discovery
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from sadi_peft.hub import NotASADIAdapterError, load_adapter_config

spec = json.loads(sys.argv[1])
ref = torch.load(spec["reference"], weights_only=True)
out = {}

def same(model, key):
    with torch.no_grad():
        return bool(torch.allclose(model(**ref["inputs"]).logits, ref[key], atol=1e-5))

def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as error:
        out[name] = "ERROR " + type(error).__name__ + ": " + str(error)[:400]

base = lambda: AutoModelForCausalLM.from_pretrained(spec["base"])
attempt("peft_main", lambda: same(PeftModel.from_pretrained(base(), spec["repo"]), "v2"))
attempt("peft_v1", lambda: same(PeftModel.from_pretrained(base(), spec["repo"], revision=spec["v1"]), "v1"))
attempt("peft_v2", lambda: same(PeftModel.from_pretrained(base(), spec["repo"], revision=spec["v2"]), "v2"))
attempt("auto_main", lambda: same(AutoModelForCausalLM.from_pretrained(spec["repo"]), "v2"))
attempt("auto_v1_adapter_kwargs",
        lambda: same(AutoModelForCausalLM.from_pretrained(spec["repo"], adapter_kwargs={"revision": spec["v1"]}), "v1"))
attempt("auto_v1_revision", lambda: same(AutoModelForCausalLM.from_pretrained(spec["repo"], revision=spec["v1"]), "v1"))
attempt("config_main", lambda: load_adapter_config(spec["repo"]).top_k)
attempt("config_v1", lambda: load_adapter_config(spec["repo"], revision=spec["v1"]).top_k)
for name, repo in spec["not_sadi"].items():
    attempt("not_sadi_" + name, lambda repo=repo: load_adapter_config(repo).top_k)
print("RESULT " + json.dumps(out))
'''


def _hub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    dropped = ("HF_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def _run_loads(env: dict[str, str], spec: dict, cwd: Path) -> dict:
    script = cwd / "load_from_hub_check.py"
    script.write_text(LOAD_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(spec)], env=env, cwd=cwd, capture_output=True, text=True, timeout=240
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _check_not_sadi_messages(out: dict) -> None:
    assert "a LORA adapter" in out["not_sadi_lora"], out["not_sadi_lora"]
    assert "a full model (model_type 'llama'" in out["not_sadi_full_model"], out["not_sadi_full_model"]
    assert "found nothing" in out["not_sadi_missing"], out["not_sadi_missing"]


def _upload_folders(adapters, tmp_path: Path, base_model: str) -> tuple[Path, Path]:
    """The exact folders push_to_hub would upload for v1 and v2 (its dry run)."""
    with pytest.warns(UserWarning, match="not a Hub repo id") if not hub.is_hub_repo_id(base_model) else nullcontext():
        v1 = hub.push_to_hub(adapters["v1"], REPO_ID, base_model=base_model, dry_run_dir=tmp_path / "up-v1")
        v2 = hub.push_to_hub(adapters["v2"], REPO_ID, base_model=base_model, dry_run_dir=tmp_path / "up-v2")
    return v1, v2


def test_load_by_repo_id_from_hf_cache_offline(adapters, tmp_path):
    """huggingface_hub's cache layout + HF_HUB_OFFLINE=1: repo ids, the base model by repo id, revision pinning."""
    cache = tmp_path / "hf-home" / "hub"
    up_v1, up_v2 = _upload_folders(adapters, tmp_path, BASE_ID)
    v1 = hub.add_to_hf_cache(up_v1, REPO_ID, cache_dir=cache)
    v2 = hub.add_to_hf_cache(up_v2, REPO_ID, cache_dir=cache)  # refs/main now points at v2
    assert v1 != v2 and (cache / "models--sadi-test--tiny-sadi-head" / "refs" / "main").read_text() == v2
    hub.add_to_hf_cache(adapters["base_dir"], BASE_ID, cache_dir=cache)
    hub.add_to_hf_cache(adapters["lora"], LORA_ID, cache_dir=cache)
    spec = {
        "reference": str(adapters["reference"]), "base": BASE_ID, "repo": REPO_ID, "v1": v1, "v2": v2,
        "not_sadi": {"lora": LORA_ID, "full_model": BASE_ID, "missing": MISSING_ID},
    }
    out = _run_loads(_hub_env(tmp_path, HF_HUB_OFFLINE="1"), spec, tmp_path)
    for key in ("peft_main", "peft_v1", "peft_v2", "auto_main", "auto_v1_adapter_kwargs"):
        assert out[key] is True, (key, out[key])
    # transformers applies a plain revision= to the base model's repo too: the adapter's commit is not one of its.
    assert out["auto_v1_revision"] is not True
    assert out["config_main"] == 1 and out["config_v1"] == 3
    _check_not_sadi_messages(out)


# ---------------------------------------------------------------------------------------------------- olah mirror
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git(*args: str, cwd: Path) -> str:
    env = dict(
        os.environ, GIT_AUTHOR_NAME="sadi", GIT_AUTHOR_EMAIL="sadi@localhost", GIT_COMMITTER_NAME="sadi",
        GIT_COMMITTER_EMAIL="sadi@localhost", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_SYSTEM=os.devnull,
    )
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _commit_folder(repo: Path, source: Path, message: str) -> str:
    """Make ``repo`` (a git repo, created if needed) hold exactly the files of ``source``; return the commit."""
    if not (repo / ".git").is_dir():
        repo.mkdir(parents=True, exist_ok=True)
        _git("init", "-q", "-b", "main", cwd=repo)
    for entry in repo.iterdir():
        if entry.name != ".git":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    shutil.copytree(source, repo, dirs_exist_ok=True)
    # Files of the same size with copied mtimes look unchanged to git's stat check: hash everything afresh.
    _git("rm", "-r", "-q", "--cached", "--ignore-unmatch", ".", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("commit", "-q", "-m", message, cwd=repo)
    return _git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture
def olah_mirror(tmp_path):
    """An olah Hub mirror on 127.0.0.1, offline, serving the git repos under ``mirrors/models/<org>/<name>``."""
    pytest.importorskip("olah", reason="olah (Hub mirror, in the test extra) is not installed")
    if shutil.which("git") is None:
        pytest.skip("git is needed for olah's local repos")
    root = tmp_path / "olah"
    (root / "mirrors" / "models").mkdir(parents=True)
    port = _free_port()
    config = root / "olah.toml"
    config.write_text(textwrap.dedent(f"""\
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = "{(root / 'cache').as_posix()}"
        mirrors-path = ["{(root / 'mirrors').as_posix()}"]
        [accessibility]
        offline = true
        """))
    command = [sys.executable, "-c", "from olah.server import cli; cli()", "-c", str(config)]
    command += ["--log-path", str(root / "logs")]
    if shutil.which("timeout"):
        command = ["timeout", "300", *command]  # a hard bound, even if this test process dies
    log = open(root / "server.log", "w")
    env = dict(os.environ, HOME=str(root / "home"))  # olah keeps state under ~/.olah
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"olah exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/models/none/none/refs", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"olah did not start in 30 s:\n{(root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.2)
        yield url, root / "mirrors" / "models"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_load_by_repo_id_through_olah_mirror(adapters, tmp_path, olah_mirror):
    url, models = olah_mirror
    base_dir = str(adapters["base_dir"])  # see the module docstring: olah cannot serve a full model to transformers
    up_v1, up_v2 = _upload_folders(adapters, tmp_path, base_dir)
    org, name = REPO_ID.split("/")
    v1 = _commit_folder(models / org / name, up_v1, "v1: K=3")
    v2 = _commit_folder(models / org / name, up_v2, "v2: K=1")
    assert "adapter_model.safetensors" in _git("diff", "--name-only", v1, v2, cwd=models / org / name)
    _commit_folder(models / org / LORA_ID.split("/")[1], adapters["lora"], "lora")
    _commit_folder(models / org / BASE_ID.split("/")[1], adapters["base_dir"], "full model")
    with urllib.request.urlopen(f"{url}/{REPO_ID}/resolve/{v1}/adapter_config.json", timeout=10) as response:
        assert json.loads(response.read())["top_k"] == 3  # served by the mirror at the pinned commit

    spec = {
        "reference": str(adapters["reference"]), "base": base_dir, "repo": REPO_ID, "v1": v1, "v2": v2,
        "not_sadi": {"lora": LORA_ID, "full_model": BASE_ID, "missing": MISSING_ID},
    }
    env = _hub_env(tmp_path, HF_ENDPOINT=url, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    out = _run_loads(env, spec, tmp_path)
    for key in ("peft_main", "peft_v1", "peft_v2", "auto_main", "auto_v1_adapter_kwargs", "auto_v1_revision"):
        assert out[key] is True, (key, out[key])
    assert out["config_main"] == 1 and out["config_v1"] == 3
    _check_not_sadi_messages(out)
    # the files came through the mirror into the client's cache
    assert (tmp_path / "hf-home" / "hub" / "models--sadi-test--tiny-sadi-head" / "snapshots" / v1).is_dir()


# ---------------------------------------------------------------------------------------------------- example
def test_example_offline_demo(tmp_path):
    env = _hub_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "load_from_hub.py"), "--offline-demo", "--max-new-tokens", "5"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "loaded by repo id" in proc.stdout
