"""Exports of positions="all" SADI adapters (IA3, exact LoRA, merged checkpoint) run without sadi_peft.

Each case calibrates an adapter on a tiny random model saved to disk (so the exports record a loadable
``base_model_name_or_path``), exports it in all three formats, and ONE child Python process that never imports
``sadi_peft`` loads every export with stock PEFT / transformers:

* IA3 and LoRA: ``PeftModel.from_pretrained(base, folder)``, the same after ``merge_and_unload()``, and
  ``AutoModelForCausalLM.from_pretrained(folder)`` (base resolved through ``base_model_name_or_path``);
* merged: ``AutoModelForCausalLM.from_pretrained(folder)``.

The child writes its logits to a safetensors file; the parent compares them with the SADI model's logits
(max |Δ| <= 1e-4 in fp32). Biased architectures get random biases so the output-side bias path (IA3's bias scaling,
LoRA's ``lora_bias``) is actually exercised.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import PAIRS, CharTokenizer, tiny_llama
from transformers import AutoModelForCausalLM

import sadi_peft
from sadi_peft import SADIConfig, SADILayer
from sadi_peft.export import export_ia3, export_lora, export_merged, lora_rank, vllm_max_lora_rank

TOK = CharTokenizer()
IDS = torch.tensor([[5, 9, 14, 3, 22, 31, 7], [8, 8, 40, 12, 6, 19, 25]])
TOL = 1e-4
EXPORTS = (("ia3", export_ia3), ("lora", export_lora), ("merged", export_merged))


def logits(model, input_ids=IDS):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---------------------------------------------------------------------------------------------------- tiny bases
def _randomize_biases(model):
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(0.0, 0.5)
    return model


def _tiny(arch: str):
    torch.manual_seed(0)
    tokens = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return tiny_llama(0)
    if arch == "gpt2":  # Conv1D projections, biased, tied embeddings
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48, **tokens)
    elif arch == "opt":  # biased nn.Linear, MLP on flattened [batch * seq, features]
        config = transformers.OPTConfig(
            hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4,
            do_layer_norm_before=True, max_position_embeddings=64, **tokens,
        )
    else:
        raise ValueError(arch)
    return _randomize_biases(AutoModelForCausalLM.from_config(config).eval())


# (architecture, variant, top_k, entry point): "peft" = get_peft_model, "load_adapter" = transformers load_adapter
CASES = {
    "llama-head": ("llama", "head", 3, "peft"),
    "llama-neuron": ("llama", "neuron", 10, "load_adapter"),
    "llama-hidden": ("llama", "hidden", 6, "peft"),
    "gpt2-head": ("gpt2", "head", 3, "peft"),
    "gpt2-hidden": ("gpt2", "hidden", 6, "peft"),
    "opt-hidden": ("opt", "hidden", 6, "peft"),
}
FORMATS = ("ia3/peft", "ia3/peft-merged", "ia3/auto", "lora/peft", "lora/peft-merged", "lora/auto", "merged/auto")

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    manifest = json.load(open(sys.argv[1]))
    ids = torch.tensor(manifest["input_ids"])
    out = {}

    def run(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits.contiguous()

    for case, paths in manifest["cases"].items():
        base = lambda: AutoModelForCausalLM.from_pretrained(paths["base"])
        out[f"{case}/base"] = run(base())
        for fmt in ("ia3", "lora"):
            config = json.load(open(paths[fmt] + "/adapter_config.json"))
            assert config["peft_type"] == fmt.upper(), config["peft_type"]
            peft_model = PeftModel.from_pretrained(base(), paths[fmt])
            out[f"{case}/{fmt}/peft"] = run(peft_model)
            out[f"{case}/{fmt}/peft-merged"] = run(peft_model.merge_and_unload())
            out[f"{case}/{fmt}/auto"] = run(AutoModelForCausalLM.from_pretrained(paths[fmt]))
        out[f"{case}/merged/auto"] = run(AutoModelForCausalLM.from_pretrained(paths["merged"]))

    assert "sadi_peft" not in sys.modules, "the child must not import sadi_peft"
    save_file(out, manifest["output"])
    """
)


def _build_case(arch: str, variant: str, top_k: int, entry: str, base_dir: Path, work: Path):
    """A calibrated positions='all' SADI model on the saved base; returns (model, steered logits)."""
    config = SADIConfig(variant=variant, top_k=top_k, delta=4.0, positions="all")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    sadi_peft.calibrate(model, TOK, PAIRS, batch_size=4, show_progress=False)
    if entry == "load_adapter":
        adapter_dir = work / "sadi-adapter"
        model.save_pretrained(adapter_dir)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        model.load_adapter(str(adapter_dir))
        assert not isinstance(model, PeftModel) and any(isinstance(m, SADILayer) for m in model.modules())
    return model, logits(model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Build and export every case, then load all exports in one sadi_peft-free child process."""
    root = tmp_path_factory.mktemp("export")
    bases = {}
    for arch in sorted({arch for arch, *_ in CASES.values()}):
        bases[arch] = root / f"base-{arch}"
        _tiny(arch).save_pretrained(bases[arch])
    manifest = {"input_ids": IDS.tolist(), "output": str(root / "child_logits.safetensors"), "cases": {}}
    reference, ranks = {}, {}
    for case, (arch, variant, top_k, entry) in CASES.items():
        work = root / case
        model, reference[case] = _build_case(arch, variant, top_k, entry, bases[arch], work)
        paths = {"base": str(bases[arch])}
        for fmt, export in EXPORTS:
            paths[fmt] = str(export(model, work / fmt))
        ranks[case] = lora_rank(paths["lora"])
        manifest["cases"][case] = paths
    (root / "manifest.json").write_text(json.dumps(manifest))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(root / "manifest.json")], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, f"child process failed:\n{child.stderr[-4000:]}"
    return reference, load_file(manifest["output"]), manifest, ranks


@pytest.mark.parametrize("case", list(CASES))
def test_exports_reproduce_sadi_logits_without_sadi_peft(exported, case):
    reference, child, manifest, ranks = exported
    ref = reference[case]
    assert (child[f"{case}/base"] - ref).abs().max() > 1e-3, "steering must visibly change the logits"
    diffs = {fmt: float((child[f"{case}/{fmt}"] - ref).abs().max()) for fmt in FORMATS}
    print(f"{case}: LoRA rank {ranks[case]}; max |Δlogit| " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    bad = {fmt: diff for fmt, diff in diffs.items() if not diff <= TOL}
    assert not bad, f"{case}: exports differ from the SADI model: {bad}"


def test_export_files_and_configs(exported):
    _, _, manifest, ranks = exported
    for case, paths in manifest["cases"].items():
        arch, variant = CASES[case][:2]
        for fmt in ("ia3", "lora"):
            folder = Path(paths[fmt])
            files = {p.name for p in folder.iterdir()}
            assert files == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
            config = json.loads((folder / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == paths["base"]
            assert all(name.startswith(("model.", "transformer.")) for name in config["target_modules"])
            tensors = load_file(str(folder / "adapter_model.safetensors"))
            assert all(key.startswith("base_model.model.") for key in tensors)
            if fmt == "ia3":
                inputs = variant != "hidden"
                assert set(config["feedforward_modules"]) == (set(config["target_modules"]) if inputs else set())
                assert config["fan_in_fan_out"] == (arch == "gpt2")
            else:
                assert config["r"] == config["lora_alpha"] == ranks[case]
                assert (config["use_rslora"], config["use_dora"], config["lora_dropout"]) == (False, False, 0.0)
                assert config["lora_bias"] == (variant == "hidden" and arch != "llama")
                assert f"r = {ranks[case]}" in (folder / "README.md").read_text()
        merged = {p.name for p in Path(paths["merged"]).iterdir()}
        assert "config.json" in merged and "adapter_config.json" not in merged
        keys = load_file(str(Path(paths["merged"]) / "model.safetensors")).keys()
        assert not any("base_layer" in k or "sadi_" in k for k in keys)
    # head variant: r = head_dim x masked heads in the busiest layer (head_dim 8 here)
    assert ranks["llama-head"] % 8 == 0 and vllm_max_lora_rank(ranks["llama-head"]) >= ranks["llama-head"]


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "base"
    tiny_llama(0).save_pretrained(path)
    return path


def _sadi(base_dir, calibrate=True, **config):
    config = {"variant": "head", "top_k": 2, "delta": 4.0, "positions": "all", **config}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), SADIConfig(**config))
    if calibrate:
        sadi_peft.calibrate(model, TOK, PAIRS, batch_size=4, show_progress=False)
    return model


@pytest.mark.parametrize("fmt, export", EXPORTS)
def test_positions_last_is_refused(llama_base, tmp_path, fmt, export):
    model = _sadi(llama_base, positions="last")
    with pytest.raises(ValueError, match=r"positions='last'.*cannot be exported exactly.*positions='all'"):
        export(model, tmp_path / fmt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt, export", EXPORTS)
def test_uncalibrated_is_refused(llama_base, tmp_path, fmt, export):
    model = _sadi(llama_base, calibrate=False)
    with pytest.raises(ValueError, match="empty mask.*calibrate"):
        export(model, tmp_path / fmt)
    assert list(tmp_path.iterdir()) == []


def test_another_active_sadi_adapter_on_a_shared_module_is_refused(llama_base, tmp_path):
    model = _sadi(llama_base)
    model.add_adapter("other", SADIConfig(variant="head", top_k=2, delta=2.0, positions="all"))
    sadi_peft.calibrate(model, TOK, PAIRS, batch_size=4, show_progress=False, adapter_name="other")
    model.base_model.set_adapter(["default", "other"])
    for _, export in EXPORTS:
        with pytest.raises(ValueError, match="Another active SADI adapter"):
            export(model, tmp_path / "out", adapter_name="default")
    model.base_model.set_adapter("default")  # only one active: fine
    export_ia3(model, tmp_path / "out", adapter_name="default")


def _snapshot(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert not changed, f"export_merged changed the model: {changed[:5]}"


def test_export_merged_leaves_the_model_unchanged(llama_base, tmp_path):
    model = _sadi(llama_base, variant="hidden", top_k=5)
    before, ref = _snapshot(model), logits(model)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "stale.txt").write_text("replaced atomically")
    export_merged(model, tmp_path / "merged")
    _assert_same_state(model, before)
    assert torch.equal(logits(model), ref)
    assert isinstance(model, PeftModel)
    layers = [m for m in model.modules() if isinstance(m, SADILayer)]
    assert layers and not any(layer.merged for layer in layers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folders left behind
    assert not (tmp_path / "merged" / "stale.txt").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - ref).abs().max() <= TOL


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
@pytest.mark.parametrize("outer", ["sadi", "lora"])
def test_sadi_nested_with_lora(llama_base, tmp_path, outer):
    """SADI and a LoRA on the same o_proj (transformers load_adapter route), either one outside; the LoRA also sits
    on q_proj. IA3/LoRA exports refuse; the merged export folds both, exactly, and leaves the model as it was."""
    torch.manual_seed(1)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "q_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "lora")
    sadi_model = _sadi(llama_base)
    sadi_model.save_pretrained(tmp_path / "sadi")
    sadi_only = logits(sadi_model)

    model = AutoModelForCausalLM.from_pretrained(llama_base)
    for adapter in ("sadi", "lora") if outer == "lora" else ("lora", "sadi"):  # the one loaded last wraps
        model.load_adapter(str(tmp_path / adapter), adapter_name=adapter)
    model.set_adapter(["lora", "sadi"])
    o_proj = model.model.layers[0].self_attn.o_proj
    inner = o_proj.base_layer
    assert isinstance(o_proj if outer == "sadi" else inner, SADILayer)
    assert not isinstance(o_proj if outer == "lora" else inner, SADILayer)

    for _, export in EXPORTS[:2]:
        with pytest.raises(ValueError, match="nested with another adapter layer"):
            export(model, tmp_path / "out", adapter_name="sadi")
    before, ref = _snapshot(model), logits(model)
    export_merged(model, tmp_path / "merged", adapter_name="sadi")
    _assert_same_state(model, before)
    assert torch.equal(logits(model), ref)
    assert (ref - sadi_only).abs().max() > 1e-3  # the LoRA matters: dropping it would be caught
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - ref).abs().max() <= TOL


def test_example_script_runs_with_tiny(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "export_for_serving.py"
    run = subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "--enable-lora --max-lora-rank" in run.stdout and "--lora-adapters sadi=" in run.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"ia3", "lora", "merged"}
    diffs = [float(line.rsplit(":", 1)[1]) for line in run.stdout.splitlines() if "max |Δlogit|" in line]
    assert len(diffs) == 3 and max(diffs) <= TOL
