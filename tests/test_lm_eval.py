"""`sadi-peft lm-eval`: lm-evaluation-harness with a SADI adapter through its `hf` model's `peft=`.

The fast tests need neither lm-eval nor a model. The slow ones calibrate a small SADI-HEAD adapter on SmolLM2, then
run lm-eval (0.4.13) in subprocesses on the bundled `sadi_copa` task: with the adapter, without it, and plain
`python -m lm_eval` (which cannot load the adapter: PEFT has no plugin discovery, hence `KeyError: 'SADI'`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sadi_peft.cli import main
from sadi_peft.cli import lm_eval as cli_lm_eval
from sadi_peft.lm_eval_tasks import task_dir, write_include_dir
from sadi_peft.lm_eval_tasks import utils as task_utils

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(
    not HAS_LM_EVAL, reason=f"lm-eval is not installed ({cli_lm_eval.LM_EVAL_PIP}, or pip install -e '.[lm-eval]')"
)
LIMIT = 8
TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------ fast tests
def test_help_explains_the_pass_through(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["lm-eval", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in ("KeyError: 'SADI'", "peft=<adapter_dir>", "--tasks sadi_copa", "--include_path", "simple_evaluate",
                 "lm-eval==0.4.13", "--batch_size 1"):
        assert text in out, text


def test_no_arguments_is_a_usage_error(capsys):
    assert main(["lm-eval"]) == 2
    assert "no lm-eval arguments given" in capsys.readouterr().err


def test_missing_lm_eval_names_the_pip_command(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        cli_lm_eval.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    assert main(["lm-eval", "--model", "hf", "--tasks", "sadi_copa"]) == 1
    assert "pip install 'lm-eval==0.4.13'" in capsys.readouterr().err
    with pytest.raises(cli_lm_eval.LmEvalMissingError, match="pip install"):
        cli_lm_eval.simple_evaluate(model="hf", tasks=["sadi_copa"])


def _adapter_config(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(fields), encoding="utf-8")
    return folder


def test_positions_last_adapter_is_refused_with_padded_batches(tmp_path, capsys):
    last = _adapter_config(tmp_path / "last", peft_type="SADI", positions="last")
    every = _adapter_config(tmp_path / "all", peft_type="SADI", positions="all")
    lora = _adapter_config(tmp_path / "lora", peft_type="LORA")
    args = ["--model", "hf", "--model_args", f"pretrained=x,peft={last},dtype=float32", "--tasks", "sadi_copa"]
    assert cli_lm_eval.check_batching(args) is None  # lm-eval's default batch size is 1
    assert cli_lm_eval.check_batching(args + ["--batch_size", "1"]) is None
    assert "positions='last'" in cli_lm_eval.check_batching(args + ["--batch_size", "4"])
    assert "positions='last'" in cli_lm_eval.check_batching(args + ["-b=auto"])
    assert cli_lm_eval.check_batching(["--model_args", f"pretrained=x,peft={every}", "--batch_size", "4"]) is None
    assert cli_lm_eval.check_batching(["--model_args", f"pretrained=x,peft={lora}", "--batch_size", "4"]) is None
    assert cli_lm_eval.check_batching(["--model_args", "pretrained=x", f"peft={last}", "-b", "8"]) is not None
    # Refused before lm-eval is even imported.
    assert main(["lm-eval", *args, "--batch_size", "4"]) == 2
    assert "--sadi-allow-batching" in capsys.readouterr().err


def test_wrong_data_dir_is_a_usage_error(tmp_path, capsys):
    if not HAS_LM_EVAL:
        pytest.skip("lm-eval is not installed")
    assert main(["lm-eval", "--sadi-data-dir", str(tmp_path), "--model", "hf", "--tasks", "sadi_copa"]) == 2
    assert "no COPA data folder" in capsys.readouterr().err


def test_write_include_dir_bakes_in_the_data_dir(tmp_path, data_dir):
    folder = write_include_dir(data_dir, tmp_path / "tasks")
    text = (folder / "sadi_copa.yaml").read_text(encoding="utf-8")
    assert f"sadi_data_dir: {json.dumps(str(Path(data_dir).resolve()))}" in text
    assert (folder / "utils.py").is_file()
    assert (task_dir() / "sadi_copa.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="--sadi-data-dir"):
        write_include_dir(tmp_path / "nothing-here")
    rows = task_utils.read_split(data_dir, "train")
    assert len(rows) == 400 and set(rows[0]) == set(task_utils.FIELDS)


@needs_lm_eval
def test_task_renders_the_authors_copa_prompt(tmp_path, data_dir):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(write_include_dir(data_dir, tmp_path)), include_defaults=False)
    task = manager.load(["sadi_copa"])["tasks"]["sadi_copa"]
    assert (len(task.training_docs()), len(task.validation_docs()), len(task.test_docs())) == (400, 100, 500)
    doc = task.test_docs()[0]
    assert task.doc_to_text(doc) == (
        f"Question:\n{doc['premise']} Based on the previous passage, choose the most reasonable {doc['question']}."
        f"\nA:{doc['choice1']}\nB:{doc['choice2']}\n\nAnswer:"
    )
    assert task.doc_to_text(doc) == task_utils.COPA_TEMPLATE.format(**doc)
    assert task.doc_to_choice(doc) == ["A", "B"] and task.doc_to_target(doc) == doc["label"]
    assert task.config.target_delimiter == " "


# ------------------------------------------------------------------------------------------------ slow tests
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _lm_eval_args(model_args: str, output: Path, include: Path) -> list[str]:
    return [
        "--model", "hf", "--model_args", model_args, "--tasks", "sadi_copa", "--include_path", str(include),
        "--limit", str(LIMIT), "--device", "cpu", "--batch_size", "1", "--output_path", str(output), "--log_samples",
    ]


def _results(output: Path) -> tuple[dict, dict[int, list[float]]]:
    (results_file,) = sorted(output.rglob("results_*.json"))
    (samples_file,) = sorted(output.rglob("samples_sadi_copa_*.jsonl"))
    samples = {}
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        samples[row["doc_id"]] = [float(resp[0]) for resp in row["filtered_resps"]]
    return json.loads(results_file.read_text(encoding="utf-8")), samples


def _failure(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def sadi_adapter(smollm2_path, data_dir, tmp_path_factory) -> Path:
    """A SADI-HEAD adapter calibrated on 16 COPA train pairs in sadi_copa's own prompt format."""
    import sadi_peft
    from peft import get_peft_model
    from sadi_peft.zoo import load_model_and_tokenizer

    rows = task_utils.read_split(data_dir, "train")[:16]
    pairs = [
        (task_utils.COPA_TEMPLATE.format(**row), task_utils.CHOICES[row["label"]], task_utils.CHOICES[1 - row["label"]])
        for row in rows
    ]
    model, tokenizer = load_model_and_tokenizer(smollm2_path)
    peft_model = get_peft_model(model, sadi_peft.SADIConfig(variant="head", top_k=4, delta=9.0, positions="last"))
    sadi_peft.calibrate(peft_model, tokenizer, pairs, batch_size=8, show_progress=False)
    return sadi_peft.save_pretrained(peft_model, tmp_path_factory.mktemp("lm_eval") / "copa_head")


@pytest.fixture(scope="module")
def include_dir(data_dir, tmp_path_factory) -> Path:
    return write_include_dir(data_dir, tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def cli_runs(smollm2_path, data_dir, sadi_adapter, include_dir, tmp_path_factory):
    """`sadi-peft lm-eval` on sadi_copa with and without the adapter: {"sadi"|"base": (results, samples)}."""
    work = tmp_path_factory.mktemp("lm_eval_runs")
    runs = {}
    for name, model_args in (
        ("sadi", f"pretrained={smollm2_path},peft={sadi_adapter},dtype=float32"),
        ("base", f"pretrained={smollm2_path},dtype=float32"),
    ):
        proc = _run(
            ["-m", "sadi_peft.cli", "lm-eval", "--sadi-data-dir", str(data_dir),
             *_lm_eval_args(model_args, work / name, include_dir)],
            cwd=work,
        )
        assert proc.returncode == 0, _failure(proc)
        runs[name] = _results(work / name)
    return runs


@pytest.mark.slow
@needs_lm_eval
def test_lm_eval_scores_sadi_copa_with_and_without_the_adapter(cli_runs, sadi_adapter):
    for name, (results, samples) in cli_runs.items():
        accuracy = results["results"]["sadi_copa"]["acc,none"]
        assert 0.0 <= accuracy <= 1.0, name
        assert results["n-samples"]["sadi_copa"]["effective"] == LIMIT
        assert sorted(samples) == list(range(LIMIT)) and all(len(v) == 2 for v in samples.values())
    sadi_results = cli_runs["sadi"][0]
    assert sadi_results["config"]["model_args"]["peft"] == str(sadi_adapter)
    # lm-eval really ran the steered model: every doc's log-likelihoods of " A" / " B" moved.
    sadi, base = cli_runs["sadi"][1], cli_runs["base"][1]
    moved = [doc for doc in sadi if max(abs(a - b) for a, b in zip(sadi[doc], base[doc])) > 1e-3]
    assert moved == list(range(LIMIT)), (sadi, base)
    print(
        f"\nsadi_copa acc (limit {LIMIT}): base {cli_runs['base'][0]['results']['sadi_copa']['acc,none']:.3f}, "
        f"SADI-HEAD {sadi_results['results']['sadi_copa']['acc,none']:.3f}"
    )


@pytest.mark.slow
@needs_lm_eval
def test_plain_lm_eval_cannot_load_a_sadi_adapter(smollm2_path, sadi_adapter, include_dir, tmp_path):
    """Why the entry point exists: without `import sadi_peft`, PEFT does not know the adapter type."""
    model_args = f"pretrained={smollm2_path},peft={sadi_adapter},dtype=float32"
    args = _lm_eval_args(model_args, tmp_path / "out", include_dir)
    args[args.index("--limit") + 1] = "1"
    proc = _run(["-m", "lm_eval", *args], cwd=tmp_path)
    assert proc.returncode != 0
    assert "KeyError: 'SADI'" in proc.stderr, _failure(proc)


@pytest.mark.slow
@needs_lm_eval
def test_simple_evaluate_helper_matches_the_cli(smollm2_path, data_dir, sadi_adapter, cli_runs):
    results = cli_lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={smollm2_path},peft={sadi_adapter},dtype=float32",
        tasks=["sadi_copa"],
        limit=2,
        device="cpu",
        batch_size=1,
        sadi_data_dir=data_dir,
    )
    assert 0.0 <= results["results"]["sadi_copa"]["acc,none"] <= 1.0
    cli_sadi = cli_runs["sadi"][1]
    for sample in results["samples"]["sadi_copa"]:
        loglik = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert loglik == pytest.approx(cli_sadi[sample["doc_id"]], abs=1e-4)
