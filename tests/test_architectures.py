"""Architecture matrix: every model_type of ``sadi_peft.architectures`` x every SADI variant, on tiny random models.

For each (architecture, variant) the test checks, on a 2-layer randomly initialised float32 model built offline
from its config:

1. ``get_peft_model`` wraps exactly the expected module of every layer and records the right unit counts;
2. ``calibrate`` gives finite scores, a global top-K mask, and the same scores for batch sizes 1 and 4
   (right padding must not leak into the statistics);
3. positions="all": steering changes the logits, ``disable_adapter`` restores them exactly, ``merge_and_unload``
   reproduces the steered logits; positions="last": only the last real prompt token (and later) changes;
4. (head variant) eager and SDPA attention give the same steered logits: the hook sits on the attention output
   projection input, which every attention backend goes through;
5. ``save_pretrained`` -> ``PeftModel.from_pretrained`` on a fresh identical base reproduces the logits.

The expected module names below are written out independently of ``sadi_peft.architectures`` on purpose.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Callable, Optional

import peft
import pytest
import torch
import transformers
from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

from sadi_peft import SADIConfig, SADILayer, calibrate
from sadi_peft.architectures import ARCHITECTURES, VARIANTS, get_architecture

VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 48
HEADS = 4
LAYERS = 2
PAD, BOS, EOS = 0, 1, 2
TOP_K = {"head": 3, "neuron": 10, "hidden": 6}
DELTA = 4.0  # gain 5: large enough that any selected unit visibly moves the logits


# ---------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    """One architecture: how to build it tiny, and what SADI must find in it."""

    make_config: Callable[[], transformers.PretrainedConfig]
    layer: str  # module path of decoder layer i, with "{}" for i
    head: str  # attention output projection, relative to the layer
    mlp_out: str  # MLP down projection, relative to the layer
    activation: Optional[str]  # gated-MLP activation module (None: no gate)
    intermediate: int  # input features of the MLP down projection
    sdpa: Optional[str] = None  # None if SDPA is supported, else the reason to skip
    conv1d: bool = False  # projections are transformers Conv1D (GPT-2)
    model_type: Optional[str] = None  # defaults to the case name; set for a second config of one architecture


_TOKENS = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
_LLAMA_ARGS = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,  # GQA: 2 KV heads for 4 query heads
    max_position_embeddings=64,
    **_TOKENS,
)
_GEMMA_ARGS = dict(_LLAMA_ARGS, head_dim=16)  # head_dim * heads = 64 != hidden_size: o_proj input is 64 wide


def _llama_like(config_cls, **extra) -> Callable[[], transformers.PretrainedConfig]:
    return lambda: config_cls(**{**_LLAMA_ARGS, **extra})


CASES: dict[str, Case] = {
    "llama": Case(_llama_like(transformers.LlamaConfig), "model.layers.{}", "self_attn.o_proj", "mlp.down_proj",
                  "mlp.act_fn", INTERMEDIATE),
    "mistral": Case(_llama_like(transformers.MistralConfig, sliding_window=None), "model.layers.{}",
                    "self_attn.o_proj", "mlp.down_proj", "mlp.act_fn", INTERMEDIATE),
    "qwen2": Case(_llama_like(transformers.Qwen2Config), "model.layers.{}", "self_attn.o_proj", "mlp.down_proj",
                  "mlp.act_fn", INTERMEDIATE),
    # Qwen3's head_dim defaults to 128, independent of hidden_size / num_attention_heads.
    "qwen3": Case(_llama_like(transformers.Qwen3Config, head_dim=8), "model.layers.{}", "self_attn.o_proj",
                  "mlp.down_proj", "mlp.act_fn", INTERMEDIATE),
    "gemma": Case(lambda: transformers.GemmaConfig(**_GEMMA_ARGS), "model.layers.{}", "self_attn.o_proj",
                  "mlp.down_proj", "mlp.act_fn", INTERMEDIATE),
    "gemma2": Case(
        lambda: transformers.Gemma2Config(**_GEMMA_ARGS, query_pre_attn_scalar=16, sliding_window=8),
        "model.layers.{}", "self_attn.o_proj", "mlp.down_proj", "mlp.act_fn", INTERMEDIATE,
        sdpa="transformers 5.23 refuses SDPA for Gemma2 (_supports_sdpa=False: SDPA cannot soft-cap logits)",
    ),
    "gemma3_text": Case(
        lambda: transformers.Gemma3TextConfig(**_GEMMA_ARGS, query_pre_attn_scalar=16, sliding_window=8),
        "model.layers.{}", "self_attn.o_proj", "mlp.down_proj", "mlp.act_fn", INTERMEDIATE,
    ),
    # Phi-3 fuses q/k/v (qkv_proj) and gate/up (gate_up_proj); its default pad/eos ids (32000) exceed our vocab.
    "phi3": Case(_llama_like(transformers.Phi3Config), "model.layers.{}", "self_attn.o_proj", "mlp.down_proj",
                 "mlp.activation_fn", INTERMEDIATE),
    "gpt2": Case(
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE,
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        ),
        "transformer.h.{}", "attn.c_proj", "mlp.c_proj", None, INTERMEDIATE, conv1d=True,
    ),
    "gpt_neox": Case(
        lambda: transformers.GPTNeoXConfig(
            hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=64, **_TOKENS,
        ),
        "gpt_neox.layers.{}", "attention.dense", "mlp.dense_4h_to_h", None, INTERMEDIATE,
    ),
    "opt": Case(
        lambda: transformers.OPTConfig(
            hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, do_layer_norm_before=True, max_position_embeddings=64, **_TOKENS,
        ),
        "model.decoder.layers.{}", "self_attn.out_proj", "fc2", None, INTERMEDIATE,
    ),
    # Falcon-40B/180B layout: new_decoder_architecture (GQA with num_kv_heads, two layer norms)
    "falcon": Case(
        lambda: transformers.FalconConfig(
            hidden_size=HIDDEN, ffn_hidden_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            new_decoder_architecture=True, num_kv_heads=2, alibi=False, max_position_embeddings=64, **_TOKENS,
        ),
        "transformer.h.{}", "self_attention.dense", "mlp.dense_4h_to_h", None, INTERMEDIATE,
    ),
    # Falcon-7B layout: multi-query attention, parallel attention/MLP
    "falcon-7b": Case(
        lambda: transformers.FalconConfig(
            hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, new_decoder_architecture=False,
            multi_query=True, parallel_attn=True, alibi=False, max_position_embeddings=64, **_TOKENS,
        ),
        "transformer.h.{}", "self_attention.dense", "mlp.dense_4h_to_h", None, 4 * HIDDEN, model_type="falcon",
    ),
    # BLOOM has no intermediate-size setting: its MLP is always 4 * hidden_size wide.
    "bloom": Case(
        lambda: transformers.BloomConfig(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_TOKENS),
        "transformer.h.{}", "self_attention.dense", "mlp.dense_4h_to_h", None, 4 * HIDDEN,
        sdpa="transformers 5.23 has no SDPA path for BLOOM (its ALiBi attention is written out with baddbmm)",
    ),
}
CASES = {name: dataclasses.replace(case, model_type=case.model_type or name) for name, case in CASES.items()}
ARCHS = list(CASES)
MATRIX = [(arch, variant) for arch in ARCHS for variant in VARIANTS]


def expected_units(arch: str, variant: str) -> dict[str, int]:
    case = CASES[arch]
    suffix = case.head if variant == "head" else case.mlp_out
    count = {"head": HEADS, "neuron": case.intermediate, "hidden": HIDDEN}[variant]
    return {f"{case.layer.format(i)}.{suffix}": count for i in range(LAYERS)}


# ---------------------------------------------------------------------------------------------------- data
class CharTokenizer:
    """Deterministic character-level tokenizer: BOS, then one id in [3, VOCAB) per character."""

    pad_token_id = PAD
    bos_token_id = BOS
    eos_token_id = EOS

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [BOS] + [3 + ord(ch) % (VOCAB - 3) for ch in text]}


TOKENIZER = CharTokenizer()
_WORDS = ["good", "bad", "fine", "awful", "great", "dull", "ok", "superb"]
# positive and negative answers of different lengths, so batched calibration pads on the right
PAIRS = [(f"Review {i}: {word}. Sentiment?", "yes" if i % 2 else "positive", "no") for i, word in enumerate(_WORDS)]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: list[int]  # index of the last real token per row


def make_batch(texts: list[str]) -> Batch:
    """Right-padded batch (the padded row's last real token is not the last position)."""
    ids = [TOKENIZER(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    return Batch(input_ids, attention_mask, [len(seq) - 1 for seq in ids])


BATCH = make_batch(["Review: a superb film. Sentiment? yes", "Review: dull. Sentiment?"])


def left_padded(batch: Batch) -> Batch:
    """The same rows padded on the left: every row's last real token is the last position."""
    ids, mask = torch.full_like(batch.input_ids, PAD), torch.zeros_like(batch.attention_mask)
    width = ids.shape[1]
    for row, last in enumerate(batch.last):
        n = last + 1
        ids[row, width - n :] = batch.input_ids[row, :n]
        mask[row, width - n :] = 1
    return Batch(ids, mask, [width - 1] * len(batch.last))


LEFT_BATCH = left_padded(BATCH)


def logits(model: nn.Module, batch: Batch = BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.detach().clone()


# ---------------------------------------------------------------------------------------------------- models
def build_base(arch: str, attn_implementation: str = "eager") -> nn.Module:
    config = CASES[arch].make_config()
    assert config.model_type == CASES[arch].model_type
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model.eval()


@functools.cache
def _pristine(arch: str) -> tuple[nn.Module, torch.Tensor]:
    model = build_base(arch)
    return model, logits(model)


def fresh_base(arch: str) -> nn.Module:
    """A deep copy of the module-cached base (identical weights every time)."""
    return copy.deepcopy(_pristine(arch)[0])


def base_logits(arch: str) -> torch.Tensor:
    return _pristine(arch)[1]


def sadi_config(variant: str, positions: str = "all", **kwargs) -> SADIConfig:
    return SADIConfig(variant=variant, top_k=TOP_K[variant], delta=DELTA, positions=positions, **kwargs)


def wrap(arch: str, variant: str, positions: str = "all") -> PeftModel:
    return peft.get_peft_model(fresh_base(arch), sadi_config(variant, positions))


@functools.cache
def calibrated(arch: str, variant: str, positions: str):
    """A wrapped and calibrated (batch_size=4) model, shared by the tests that only read it."""
    model = wrap(arch, variant, positions)
    result = calibrate(model, TOKENIZER, PAIRS, batch_size=4, show_progress=False)
    return model, result


def global_mask(model: PeftModel) -> dict[str, torch.Tensor]:
    inner = model.base_model.model
    return {
        name: module.sadi_mask["default"].detach().cpu().clone()
        for name, module in inner.named_modules()
        if isinstance(module, SADILayer)
    }


def assert_equal_before_last(steered: torch.Tensor, base: torch.Tensor, batch: Batch) -> None:
    """Real tokens before the last one are untouched; the last real token is steered.

    Pad positions are not compared: a left-pad query has every key masked, and eager attention turns that fully
    masked row into a uniform average over *all* keys, the (steered) last token included.
    """
    for row, last in enumerate(batch.last):
        real = batch.attention_mask[row, :last].bool()
        torch.testing.assert_close(steered[row, :last][real], base[row, :last][real], rtol=0, atol=0)
        assert not torch.allclose(steered[row, last], base[row, last]), f"row {row}: last prompt token not steered"


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """These models are tiny: intra-op threads only add contention (20-50x slower on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_table_covers_the_matrix():
    assert set(ARCHITECTURES) == {case.model_type for case in CASES.values()}
    for arch, case in CASES.items():
        spec = get_architecture(case.model_type)
        assert (spec.head, spec.mlp_out, spec.activation) == (case.head, case.mlp_out, case.activation), arch


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_targets(arch, variant):
    model = wrap(arch, variant)
    expected = expected_units(arch, variant)
    config = model.peft_config["default"]
    assert config.unit_counts == expected
    inner = model.base_model.model
    wrapped = {name: m for name, m in inner.named_modules() if isinstance(m, SADILayer)}
    assert set(wrapped) == set(expected)
    case = CASES[arch]
    for name, layer in wrapped.items():
        assert isinstance(layer.get_base_layer(), Conv1D if case.conv1d else nn.Linear), name
        assert layer.num_units("default") == expected[name]
        if variant == "head":
            # one unit = one query head: head_dim contiguous input features (GQA / explicit head_dim included)
            assert layer.sadi_unit_size["default"] * HEADS == layer.in_features
    assert not any(p.requires_grad for n, p in model.named_parameters() if "sadi_" in n)


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_calibration(arch, variant):
    model, result = calibrated(arch, variant, "all")
    expected = expected_units(arch, variant)
    assert set(result.scores) == set(expected)
    for name, scores in result.scores.items():
        assert scores.shape == (expected[name],)
        assert torch.isfinite(scores).all(), name
    assert any(bool(s.abs().max() > 0) for s in result.scores.values())
    mask = global_mask(model)
    assert sum(int(m.sum()) for m in mask.values()) == TOP_K[variant]
    assert len(result.selected) == TOP_K[variant]
    for name in expected:
        assert torch.equal(mask[name], result.mask[name]), name
    # the kept units are the top-K signed scores across all layers
    flat = torch.cat([result.scores[name] for name in expected])
    kept = torch.cat([mask[name] for name in expected])
    assert flat[kept].min() >= flat[~kept].max()
    assert model.peft_config["default"].calibration["num_pairs"] == len(PAIRS)

    # batch size 1 (no padding) and batch size 4 (right padding) give the same scores
    single = wrap(arch, variant)
    result_1 = calibrate(single, TOKENIZER, PAIRS, batch_size=1, show_progress=False)
    for name in expected:
        torch.testing.assert_close(result_1.scores[name], result.scores[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_all_positions_disable_and_merge(arch, variant):
    model, _ = calibrated(arch, variant, "all")
    base = base_logits(arch)
    steered = logits(model)
    assert not torch.allclose(steered, base), "steering had no effect"
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), steered, rtol=0, atol=0)  # re-enabled

    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, SADILayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), steered, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits(model), steered, rtol=0, atol=0)  # the original is untouched


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_last_position_only(arch, variant):
    model, _ = calibrated(arch, variant, "last")
    base = base_logits(arch)
    steered = logits(model)
    assert_equal_before_last(steered, base, BATCH)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    # the transformers model called directly (its own forward pre-hook finds the prompt end, no PeftModel pin)
    torch.testing.assert_close(logits(model.base_model.model), steered, rtol=0, atol=0)
    # left padding: the last position of every row is the steered one
    assert_equal_before_last(logits(model, LEFT_BATCH), logits(_pristine(arch)[0], LEFT_BATCH), LEFT_BATCH)


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("arch", ARCHS)
def test_eager_and_sdpa_agree(arch, positions):
    if CASES[arch].sdpa is not None:
        pytest.skip(CASES[arch].sdpa)
    models = {}
    for impl in ("eager", "sdpa"):
        base = build_base(arch, impl)
        assert base.config._attn_implementation == impl
        models[impl] = peft.get_peft_model(base, sadi_config("head", positions))
        calibrate(models[impl], TOKENIZER, PAIRS, batch_size=4, show_progress=False)
    masks = {impl: global_mask(m) for impl, m in models.items()}
    for name, mask in masks["eager"].items():
        assert torch.equal(mask, masks["sdpa"][name]), name
    base = {}
    steered = {}
    for impl, model in models.items():
        steered[impl] = logits(model)
        with model.disable_adapter():
            base[impl] = logits(model)
        # the steering acts under both backends (the authors' head_out hook did nothing under SDPA)
        assert not torch.allclose(steered[impl], base[impl]), impl
    # Compare real tokens only: a right-padding position whose sliding window (Gemma3, window 8) holds only pads
    # has a fully masked attention row, which eager (uniform softmax) and SDPA resolve differently.
    real = BATCH.attention_mask.bool()
    torch.testing.assert_close(base["sdpa"][real], base["eager"][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(steered["sdpa"][real], steered["eager"][real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,variant", MATRIX)
def test_save_and_reload(arch, variant, tmp_path):
    model, _ = calibrated(arch, variant, "last")
    steered = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_base(arch), tmp_path)
    config = loaded.peft_config["default"]
    assert isinstance(config, SADIConfig)
    assert (config.variant, config.positions, config.top_k) == (variant, "last", TOP_K[variant])
    assert config.unit_counts == expected_units(arch, variant)
    for name, mask in global_mask(model).items():
        assert torch.equal(global_mask(loaded)[name], mask), name
    torch.testing.assert_close(logits(loaded), steered, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- quirks
@pytest.mark.parametrize("arch", [a for a in ARCHS if CASES[a].activation])
def test_activation_modules_are_per_layer(arch):
    """SADI-NEURON ranks on the activation module's output, which needs one module object per layer."""
    model = fresh_base(arch)
    acts = [model.get_submodule(f"{CASES[arch].layer.format(i)}.{CASES[arch].activation}") for i in range(LAYERS)]
    assert len({id(a) for a in acts}) == LAYERS


def test_bloom_hidden_scales_the_mlp_output_not_the_residual():
    """BloomMLP adds the residual inside the module; SADI-HIDDEN must scale only dense_4h_to_h's output."""
    model, _ = calibrated("bloom", "hidden", "all")
    mlp = model.base_model.model.transformer.h[0].mlp
    layer = mlp.dense_4h_to_h
    gain = 1.0 + DELTA * layer.sadi_mask["default"].float()
    torch.manual_seed(1)
    hidden, residual = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        steered = mlp(hidden, residual)
        with model.disable_adapter():
            plain = mlp(hidden, residual)
    torch.testing.assert_close(steered - residual, gain * (plain - residual), rtol=1e-5, atol=1e-5)


def test_bloom_slow_but_exact_is_refused():
    config = CASES["bloom"].make_config()
    config.pretraining_tp, config.slow_but_exact = 2, True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with pytest.raises(ValueError, match="slow_but_exact"):
        peft.get_peft_model(model, sadi_config("hidden"))


# ---------------------------------------------------------------------------------------------- unknown architectures
def build_xglm() -> nn.Module:
    config = transformers.XGLMConfig(
        d_model=HIDDEN, ffn_dim=INTERMEDIATE, num_layers=LAYERS, attention_heads=HEADS, max_position_embeddings=64,
        **_TOKENS,
    )
    assert config.model_type not in ARCHITECTURES
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_unknown_architecture_error_names_the_table_and_target_modules(variant):
    with pytest.raises(ValueError) as info:
        peft.get_peft_model(build_xglm(), sadi_config(variant))
    message = str(info.value)
    assert "xglm" in message
    assert "target_modules" in message
    for model_type in ARCHITECTURES:
        assert re.search(rf"\b{re.escape(model_type)}\b", message), model_type


_XGLM_TARGETS = {"head": "self_attn.out_proj", "neuron": "fc2", "hidden": "fc2"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_unknown_architecture_with_target_modules(variant):
    base = build_xglm()
    reference = logits(base)
    extra = {"num_heads": HEADS} if variant == "head" else {}
    model = peft.get_peft_model(
        base, sadi_config(variant, "all", target_modules=[_XGLM_TARGETS[variant]], **extra)
    )
    count = {"head": HEADS, "neuron": INTERMEDIATE, "hidden": HIDDEN}[variant]
    expected = {f"model.layers.{i}.{_XGLM_TARGETS[variant]}": count for i in range(LAYERS)}
    assert model.peft_config["default"].unit_counts == expected
    result = calibrate(model, TOKENIZER, PAIRS, batch_size=4, show_progress=False)
    assert all(torch.isfinite(s).all() for s in result.scores.values())
    assert sum(int(m.sum()) for m in global_mask(model).values()) == TOP_K[variant]
    steered = logits(model)
    assert not torch.allclose(steered, reference)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)
    torch.testing.assert_close(logits(copy.deepcopy(model).merge_and_unload()), steered, rtol=0, atol=1e-4)


class TinyLM(nn.Module):
    """A config-less custom model whose module names match no table entry: a token mixer and an MLP per block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "mix": nn.Linear(HIDDEN, HIDDEN),
                    "proj": nn.Linear(HIDDEN, HIDDEN),
                    "up": nn.Linear(HIDDEN, INTERMEDIATE),
                    "down": nn.Linear(INTERMEDIATE, HIDDEN),
                }
            )
            for _ in range(LAYERS)
        )
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        for block in self.blocks:
            # causal running mean as a stand-in for attention, then the "output projection"
            mixed = torch.cumsum(block["mix"](h), dim=1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)
            h = h + block["proj"](mixed)
            h = h + block["down"](torch.relu(block["up"](h)))
        return transformers.modeling_outputs.CausalLMOutput(logits=self.head(h))




@pytest.mark.parametrize("variant", VARIANTS)
def test_custom_module_with_target_modules(variant):
    """A config-less nn.Module through PEFT's low-level API (PeftModelForCausalLM itself needs ``model.config``)."""
    base = TinyLM().eval()
    reference = logits(base)
    target = {"head": "proj", "neuron": "down", "hidden": "down"}[variant]
    extra = {"num_heads": HEADS} if variant == "head" else {}
    config = sadi_config(variant, "last", target_modules=[target], **extra)
    model = peft.inject_adapter_in_model(config, base)
    count = {"head": HEADS, "neuron": INTERMEDIATE, "hidden": HIDDEN}[variant]
    assert config.unit_counts == {f"blocks.{i}.{target}": count for i in range(LAYERS)}
    calibrate(model, TOKENIZER, PAIRS, batch_size=4, show_progress=False)
    masks = [m.sadi_mask["default"] for m in model.modules() if isinstance(m, SADILayer)]
    assert len(masks) == LAYERS and sum(int(m.sum()) for m in masks) == TOP_K[variant]
    assert_equal_before_last(logits(model), reference, BATCH)


def test_custom_module_head_without_num_heads_asks_for_it():
    with pytest.raises(ValueError, match="num_heads"):
        peft.inject_adapter_in_model(sadi_config("head", target_modules=["proj"]), TinyLM())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_deepcopy_of_last_position_model(arch):
    model, _ = calibrated(arch, "head", "last")
    steered = logits(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(logits(clone), steered, rtol=0, atol=0)
    torch.testing.assert_close(logits(clone.base_model.model), steered, rtol=0, atol=0)
    # the copy is independent: disabling it leaves the original steered
    with clone.disable_adapter():
        torch.testing.assert_close(logits(clone), base_logits(arch), rtol=0, atol=0)
        torch.testing.assert_close(logits(model), steered, rtol=0, atol=0)


def test_merging_a_deepcopy_leaves_the_original_hooked():
    model, _ = calibrated("llama", "head", "all")
    steered = logits(model)
    clone = copy.deepcopy(model)
    merged = clone.merge_and_unload()
    assert not merged._forward_pre_hooks
    torch.testing.assert_close(logits(merged), steered, rtol=0, atol=1e-4)
    assert model.base_model.model._forward_pre_hooks
    torch.testing.assert_close(logits(model), steered, rtol=0, atol=0)
