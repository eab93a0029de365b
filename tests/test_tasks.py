"""Tests for the task layer (sadi_peft.tasks): loaders vs the dataset READMEs, split roles, pairs, the generic JSONL
task, and the evaluation protocols (batch-size invariance, steering at the prompt end) on a tiny random Llama with
the SmolLM2 tokenizer."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter

import pytest
import torch

from sadi_peft.tasks import (
    ARC_CHALLENGE_SHIFTED_LINES,
    MMLU_SUBJECTS,
    SPLIT_ROLES,
    Example,
    Task,
    build_pairs,
    evaluate,
    get_task,
    jsonl_task,
    load_arc,
    load_boolq,
    load_copa,
    load_jsonl,
    load_mmlu,
    load_triviaqa,
    load_truthfulqa,
    load_truthfulqa_csv,
    load_winogrande,
    normalize_answer,
    normalize_argmax,
    require_selection_split,
    score_answers,
    seeded_split,
    select_examples,
    split_sizes,
    task_names,
    write_jsonl,
)
from sadi_peft.tasks import data as data_mod
from sadi_peft.tasks import protocols as protocols_mod

ALL_TASKS = [
    "arc_challenge", "arc_easy", "boolq", "copa", "mmlu", "sst2", "triviaqa", "truthfulqa_mc1", "truthfulqa_mc2",
    "winogrande",
]  # fmt: skip

#: Documented split sizes (benchmarks.py docstring table) and a digest of the example ids of every part: pins the
#: exact seeded split across machines and versions.
SPLITS = {
    "arc_challenge": ((234, 234, 704), ("eee8dbe76ac14fa9", "f52ea51faea5c52c", "4b1a99b1b76d08f0")),
    "arc_easy": ((475, 475, 1426), ("597eb96aa8132d85", "6dd643015d1585b7", "93d6a71a3ff63124")),
    "boolq": ((654, 654, 1962), ("ea731d476e7c6a56", "cbe366f2d3cf9880", "41f2a0377011ed9b")),
    "copa": ((400, 100, 500), ("6915fe14577bed3e", "3f19992fe9910062", "02569363a73ef20d")),
    "mmlu": ((285, 2792, 11250), ("4b52773abfd0b571", "c2fea0aff10c34a3", "4b9d2d6492ee2edb")),
    "sst2": ((6920, 872, 1821), ("0e7be7d58c76dfcf", "9aec0e1282121add", "9b81f47c1354254a")),
    "triviaqa": ((600, 600, 1800), ("9f8d914a2793ffdd", "38c78855c30b775b", "81e80a2e9c40f73d")),
    "truthfulqa_mc1": ((163, 163, 491), ("a4d3b52d671fb04a", "2189a829c9506260", "497249e2a913f38d")),
    "truthfulqa_mc2": ((163, 163, 491), ("a4d3b52d671fb04a", "2189a829c9506260", "497249e2a913f38d")),
    "winogrande": ((253, 253, 761), ("b6eb7e20fa73458a", "540819c1b77c2203", "e9fa4627be2552bd")),
}


def _digest(examples) -> str:
    return hashlib.sha256("\n".join(ex.id for ex in examples).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def parts(data_dir):
    """Every task's three parts, loaded once."""
    return {name: get_task(name).load_all(data_dir) for name in ALL_TASKS}


# ----------------------------------------------------------------------------------- loader counts vs READMEs


def test_registry_lists_all_tasks():
    assert set(ALL_TASKS) <= set(task_names())
    assert get_task("COPA ").name == "copa"
    with pytest.raises(KeyError, match="known tasks"):
        get_task("copa2")


def test_copa_counts(data_dir):
    counts = {split: load_copa(split, data_dir) for split in SPLIT_ROLES}
    assert [len(v) for v in counts.values()] == [400, 100, 500]
    assert [sum(1 - ex.label for ex in v) for v in counts.values()] == [195, 55, 250]  # label 0
    assert [sum(ex.meta["question"] == "cause" for ex in v) for v in counts.values()] == [198, 52, 250]
    assert [v[0].meta["copa_id"] for v in counts.values()] == [1, 401, 501]
    first = counts["pairs"][0]
    assert first.prompt == (
        "Question:\nMy body cast a shadow over the grass. Based on the previous passage, choose the most reasonable "
        "cause.\nA:The sun was rising.\nB:The grass was cut.\n\nAnswer:\n"
    )
    assert first.choices == ("A", "B") and first.gold == "A"


def test_boolq_counts_and_fields(data_dir):
    examples = load_boolq(data_dir)
    assert len(examples) == 3270
    assert Counter(ex.label for ex in examples) == {0: 1237, 1: 2033}
    assert all(ex.choices == ("No", "Yes") for ex in examples)
    assert not any(ex.meta["question"].endswith("?") for ex in examples)
    assert sum("\n" in ex.meta["passage"] for ex in examples) == 22
    line_2418 = examples[2417]  # the passage itself contains "\nQuestion: " (README): split on the last one
    assert "\nQuestion: " in line_2418.meta["passage"] and "\n" not in line_2418.meta["question"]
    assert line_2418.prompt.endswith(f"Question: {line_2418.meta['question']}\n\nAnswer:")


def test_arc_counts_and_shifted_golds(data_dir):
    easy, challenge = load_arc("easy", data_dir), load_arc("challenge", data_dir)
    assert len(easy) == 2376 and len(challenge) == 1172
    assert Counter(ex.label for ex in easy) == {0: 565, 1: 592, 2: 634, 3: 585}
    raw = Counter(ex.label + ex.meta["gold_fixed"] for ex in challenge)  # README counts the file's (shifted) golds
    assert raw == {0: 261, 1: 306, 2: 311, 3: 294}
    assert {int(ex.id.rsplit(":", 1)[1]) for ex in challenge if ex.meta["gold_fixed"]} == ARC_CHALLENGE_SHIFTED_LINES
    goldfish = challenge[1113]
    assert "goldfish" in goldfish.meta["question"] and goldfish.meta["answer_text"] == "47" and goldfish.label == 1
    assert all(len(ex.choices) == 4 for ex in easy + challenge)
    # every row with an original-format counterpart agrees with its answer key
    answers: dict[str, set[str]] = {}
    orig = data_dir / "arc" / "original_format" / "ARC-Challenge-Test.jsonl"
    for line in orig.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts = {c["label"]: c["text"] for c in row["question"]["choices"]}
        answers.setdefault(row["question"]["stem"].strip(), set()).add(texts[row["answerKey"]])
    matched = [ex for ex in challenge if ex.meta["question"].strip() in answers]
    assert len(matched) == 1150
    assert all(ex.meta["answer_text"] in answers[ex.meta["question"].strip()] for ex in matched)


def _readme_mmlu_counts(data_dir) -> dict[str, tuple[int, int]]:
    text = (data_dir / "mmlu" / "README.md").read_text(encoding="utf-8")
    return {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^\| ([a-z_]+) \| (\d+) \| (\d+) \|$", text, re.M)}


def test_mmlu_counts(data_dir):
    dev, test = load_mmlu("dev", data_dir), load_mmlu("test", data_dir)
    assert len(dev) == 285 and len(test) == 14042
    assert Counter(ex.label for ex in test) == {0: 3222, 1: 3462, 2: 3582, 3: 3776}
    assert Counter(ex.label for ex in dev) == {0: 67, 1: 69, 2: 71, 3: 78}
    readme = _readme_mmlu_counts(data_dir)
    assert sorted(readme) == sorted(MMLU_SUBJECTS) and len(MMLU_SUBJECTS) == 57
    dev_counts, test_counts = Counter(ex.meta["subject"] for ex in dev), Counter(ex.meta["subject"] for ex in test)
    assert {s: (dev_counts[s], test_counts[s]) for s in MMLU_SUBJECTS} == readme
    assert any("\r\n" in ex.meta["question"] or "\n" in "".join(ex.meta["options"]) for ex in dev)  # multi-line rows
    assert all(isinstance(o, str) for ex in test[:500] for o in ex.meta["options"])
    subset = get_task("mmlu:anatomy,virology")
    assert {ex.meta["subject"] for ex in subset.load("test", data_dir)} == {"anatomy", "virology"}
    with pytest.raises(ValueError, match="Unknown MMLU subject"):
        get_task("mmlu:astrology")


def test_truthfulqa_counts(data_dir):
    rows = load_truthfulqa_csv(data_dir)
    assert len(rows) == 817 and list(rows[0])[0] == "Type"  # BOM not glued to the first header
    assert Counter(r["Type"] for r in rows) == {"Adversarial": 437, "Non-Adversarial": 380}
    assert len({r["Category"] for r in rows}) == 38
    mc1, mc2 = load_truthfulqa("mc1", data_dir), load_truthfulqa("mc2", data_dir)
    assert len(mc1) == len(mc2) == 817
    assert all(ex.label == 0 for ex in mc1) and {len(ex.choices) for ex in mc1} <= set(range(2, 14))
    assert max(len(ex.choices) for ex in mc1) == 13 and min(len(ex.choices) for ex in mc1) == 2
    assert max(len(ex.choices) for ex in mc2) == 24 and min(len(ex.choices) for ex in mc2) == 2
    n_true = [len(ex.true_labels) for ex in mc2]
    assert min(n_true) == 1 and max(n_true) == 14
    interleaved = [ex for ex in mc2 if list(ex.true_labels) != list(range(len(ex.true_labels)))]
    assert len(interleaved) == 2
    assert all("category" in ex.meta for ex in mc1)  # every question joined with the CSV (trailing space stripped)


def test_winogrande_counts_and_recovery(data_dir):
    examples = load_winogrande(data_dir)
    assert len(examples) == 1267
    assert Counter(ex.label for ex in examples) == {0: 628, 1: 639}
    assert all(ex.meta["sentence"].count("_") >= 1 and ex.meta["option1"] and ex.meta["option2"] for ex in examples)
    first = examples[0].meta
    assert (first["option1"], first["option2"]) == ("Sarah", "Maria")
    assert first["sentence"] == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert sum("_." in ex.meta["sentence"] or "_'" in ex.meta["sentence"] for ex in examples) >= 40


def test_triviaqa_counts(data_dir):
    examples = load_triviaqa(data_dir)
    assert len(examples) == 3000 and len({ex.prompt for ex in examples}) == 3000
    sizes = Counter(min(len(ex.answers), 5) for ex in examples)
    assert sizes == {1: 378, 2: 252, 3: 236, 4: 155, 5: 1979}
    assert max(len(ex.answers) for ex in examples) == 182
    assert all(ex.gold in ex.answers and ex.choices == (ex.gold,) for ex in examples)


# -------------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", ALL_TASKS)
def test_split_sizes_disjoint_and_pinned(parts, name):
    task, got = get_task(name), parts[name]
    sizes, digests = SPLITS[name]
    assert tuple(len(got[r]) for r in SPLIT_ROLES) == sizes == tuple(task.split_sizes[r] for r in SPLIT_ROLES)
    assert tuple(_digest(got[r]) for r in SPLIT_ROLES) == digests
    ids = [ex.id for r in SPLIT_ROLES for ex in got[r]]
    assert len(ids) == len(set(ids)), "parts overlap or ids repeat"
    assert task.splits == SPLIT_ROLES


def test_splits_are_deterministic_and_shared(parts, data_dir):
    again = get_task("boolq").load("validation", data_dir)
    assert [ex.id for ex in again] == [ex.id for ex in parts["boolq"]["validation"]]
    # MC1 and MC2 hold the same questions in each part: MC1 pairs never leak into the MC2 test part
    for role in SPLIT_ROLES:
        assert [e.meta["question"] for e in parts["truthfulqa_mc1"][role]] == [
            e.meta["question"] for e in parts["truthfulqa_mc2"][role]
        ]
    # question texts do not cross parts (the hash is on the text, not the position)
    for name in ("boolq", "triviaqa", "truthfulqa_mc1", "arc_easy"):
        texts = [{ex.prompt for ex in parts[name][r]} for r in SPLIT_ROLES]
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    # MMLU: every subject in every part; 20 % (floor) of each subject's test items in validation
    mmlu = parts["mmlu"]
    for subject in ("abstract_algebra", "professional_law"):
        n_val = sum(ex.meta["subject"] == subject for ex in mmlu["validation"])
        n_test = sum(ex.meta["subject"] == subject for ex in mmlu["test"])
        assert n_val == (n_val + n_test) // 5


def test_seeded_split_independent_of_order():
    items = [f"question {i}" for i in range(103)]
    a = seeded_split(items, str)
    b = seeded_split(list(reversed(items)), str)
    assert {r: set(v) for r, v in a.items()} == {r: set(v) for r, v in b.items()}
    assert [len(a[r]) for r in SPLIT_ROLES] == [20, 20, 63] == list(split_sizes(103).values())
    assert a["pairs"] == sorted(a["pairs"], key=items.index)  # file order inside a part
    assert seeded_split(items, str, seed=1)["pairs"] != a["pairs"]


def test_require_selection_split():
    assert require_selection_split("validation") == "validation"
    assert require_selection_split(" Pairs") == "pairs"
    with pytest.raises(ValueError, match="Refusing to select.*'test'"):
        require_selection_split("test")
    with pytest.raises(ValueError, match="Unknown split"):
        require_selection_split("dev")
    with pytest.raises(ValueError, match="Unknown split 'train'"):
        get_task("copa").load("train")


def test_select_examples_balances_example_objects(parts):
    chosen = select_examples(parts["boolq"]["validation"], 40, seed=0)
    assert Counter(ex.label for ex in chosen) == {0: 20, 1: 20}


# --------------------------------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("name", ALL_TASKS)
def test_pairs_well_formed(parts, name):
    task = get_task(name)
    examples = parts[name]["pairs"][:300]
    pairs = task.pairs(examples, seed=0)
    assert pairs == task.pairs(examples, seed=0)
    assert pairs[:5] == task.pairs(examples[:5], seed=0)  # a pair does not depend on the other examples
    assert len(pairs) == len(examples)
    for ex, (prompt, positive, negative) in zip(examples, pairs):
        assert prompt == ex.prompt
        if name == "triviaqa":
            assert positive == ex.gold and negative == ""
            continue
        assert positive.strip() and negative.strip() and positive != negative
        if name == "truthfulqa_mc2":
            trues = {ex.choices[i] for i in ex.true_labels}
            assert positive in trues and negative in set(ex.choices) - trues
        else:
            assert positive == ex.gold and negative in ex.choices
        if len(ex.choices) == 2 and name != "truthfulqa_mc2":
            assert negative == ex.choices[1 - ex.label]
    if name in ("mmlu", "arc_easy", "truthfulqa_mc1"):
        other = task.pairs(examples, seed=1)
        assert other != pairs and [p[1] for p in other] == [p[1] for p in pairs]


def test_build_pairs_rejects_examples_without_contrast():
    with pytest.raises(ValueError, match="no wrong choice"):
        build_pairs([Example("q", ("same", "same"), 0, id="x")])
    with pytest.raises(ValueError, match="Unknown pair mode"):
        build_pairs([], mode="random")


# ------------------------------------------------------------------------------------------ generic JSONL


def test_jsonl_round_trip_with_split_field(tmp_path, parts):
    source = {
        "pairs": parts["truthfulqa_mc2"]["pairs"][:3] + parts["triviaqa"]["pairs"][:2],
        "validation": parts["copa"]["validation"][:4],
        "test": parts["mmlu"]["test"][:3],
    }
    path = tmp_path / "mine.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for role, examples in source.items():
            for ex in examples:
                handle.write(json.dumps({**ex.to_dict(), "split": role}, ensure_ascii=False) + "\n")
    loaded = load_jsonl(path)
    assert loaded == source
    assert [ex.meta for ex in loaded["test"]] == [ex.meta for ex in source["test"]]
    task = get_task(f"jsonl:{path}")
    assert task.load("validation") == source["validation"]
    assert task.pairs(task.load("validation")) == get_task("copa").pairs(source["validation"])
    write_jsonl(source["test"], tmp_path / "again.jsonl", split="test")
    assert load_jsonl(tmp_path / "again.jsonl")["test"] == source["test"]


def test_jsonl_without_split_is_seeded(tmp_path):
    path = tmp_path / "plain.jsonl"
    lines = [{"prompt": f"Is {i} even? Answer:", "choices": ["No", "Yes"], "label": int(i % 2 == 0)} for i in range(50)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    task = jsonl_task(path, name="even")
    got = task.load_all()
    assert [len(got[r]) for r in SPLIT_ROLES] == [10, 10, 30]
    assert got == jsonl_task(path).load_all()
    assert {ex.prompt for r in SPLIT_ROLES for ex in got[r]} == {x["prompt"] for x in lines}
    assert task.pairs(got["pairs"])[0][2] in ("No", "Yes")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"prompt": "p", "choices": ["a", "b"], "label": 2}], r"plain\.jsonl:1: label must be"),
        ([{"prompt": "p", "choices": ["a", "b"]}], "missing required field"),
        ([{"prompt": "p", "choices": ["a", "b"], "label": 0, "split": "test"},
          {"prompt": "q", "choices": ["a", "b"], "label": 0}], "give every line a split or none"),
        ([{"prompt": "p", "choices": ["a", "b"], "label": 0, "split": "train"}], "split 'train' is not one of"),
        ([{"prompt": "p", "choices": "ab", "label": 0}], "choices must be a list"),
        ([{"prompt": "p", "choices": ["a", "b"], "label": 0, "extra": 1}], "unknown field"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "plain.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


# ------------------------------------------------------------------------------------------- Hub fallback


def test_hub_fallback_only_without_local_data(tmp_path, monkeypatch):
    monkeypatch.delenv("SADI_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "_REPO_ROOT", tmp_path / "elsewhere" / "repo")

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config=None, split=None):
            assert (name, config, split) == ("google/boolq", None, "validation")
            return [{"question": "is water wet", "passage": "Water is wet.", "answer": True}] * 5

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    examples = load_boolq()
    assert len(examples) == 5 and examples[0].label == 1 and "Question: is water wet\n\nAnswer:" in examples[0].prompt
    with pytest.raises(FileNotFoundError):  # an explicit directory never falls back
        load_boolq(tmp_path)
    with pytest.raises(FileNotFoundError, match="triviaqa"):  # no Hub copy of the subsample
        load_triviaqa()
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(FileNotFoundError, match="SADI_DATA_DIR"):
        load_boolq()


# ------------------------------------------------------------------------------------------------ protocols


def test_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An Apple a day") == "apple day"
    assert normalize_argmax(" Positive.") == "positive"
    assert normalize_argmax("A)") == "a"


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    from tiny_models import tiny_llama

    return tiny_llama(seed=0, vocab_size=len(smol_tokenizer), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def mixed_examples(parts):
    """Single-token options (COPA, MMLU letters, SST-2 words) and multi-token options (TruthfulQA answers)."""
    return (
        parts["copa"]["validation"][:3]
        + parts["mmlu"]["validation"][:2]
        + parts["sst2"]["validation"][:2]
        + parts["truthfulqa_mc2"]["validation"][:2]
    )


def _reference_logprob(model, tokenizer, prompt, answer):
    """Unpadded, unbatched: sum of log p(answer tokens | prompt.strip() + ' ')."""
    p_ids = tokenizer(prompt.strip())["input_ids"]
    a_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(p_ids) - 1 + j, t]) for j, t in enumerate(a_ids)), len(a_ids)


def test_choice_protocol_batch_invariant_and_exact(tiny, smol_tokenizer, mixed_examples):
    task = Task(name="mixed", description="", loader=lambda role, d: [], metric="accuracy")
    one = evaluate(tiny, smol_tokenizer, task, mixed_examples, "choice", batch_size=1)
    many = evaluate(tiny, smol_tokenizer, task, mixed_examples, "choice", batch_size=7)
    assert one["predictions"] == many["predictions"] and one["n"] == len(mixed_examples)
    for a, b in zip(one["scores"], many["scores"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    # single-token shortcut and multi-token path equal the unbatched reference (length-normalised)
    for ex, scores in zip(mixed_examples[:1] + mixed_examples[-1:], one["scores"][:1] + one["scores"][-1:]):
        for choice, score in zip(ex.choices, scores):
            total, length = _reference_logprob(tiny, smol_tokenizer, ex.prompt, choice)
            assert abs(score - total / length) < 1e-4
    raw = evaluate(tiny, smol_tokenizer, task, mixed_examples[-1:], "choice", length_normalize=False)
    total, _ = _reference_logprob(tiny, smol_tokenizer, mixed_examples[-1].prompt, mixed_examples[-1].choices[1])
    assert abs(raw["scores"][0][1] - total) < 1e-4


def test_mc2_metric(tiny, smol_tokenizer, parts):
    examples = parts["truthfulqa_mc2"]["validation"][:2]
    result = evaluate(tiny, smol_tokenizer, "truthfulqa_mc2", examples, batch_size=16)
    probs = []
    for ex, scores in zip(examples, result["scores"]):
        weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
        probs.append(float(weights[list(ex.true_labels)].sum()))
    assert result["metric"] == "mc2" and abs(result["accuracy"] - sum(probs) / 2) < 1e-9
    assert result["mc2"] == result["accuracy"] and 0.0 <= result["mc1"] <= 1.0
    assert result["per_example"] == pytest.approx(probs, abs=1e-12)  # each question's MC2, for paired comparisons
    with pytest.raises(ValueError, match="supports the protocols"):
        evaluate(tiny, smol_tokenizer, "truthfulqa_mc2", examples, "argmax")


def test_argmax_protocol_batch_invariant(tiny, smol_tokenizer, mixed_examples, parts):
    examples = mixed_examples + parts["triviaqa"]["validation"][:3]
    task = Task(name="mixed", description="", loader=lambda role, d: [])
    one = evaluate(tiny, smol_tokenizer, task, examples, "argmax", batch_size=1)
    many = evaluate(tiny, smol_tokenizer, task, examples, "argmax", batch_size=5)
    assert one["predictions"] == many["predictions"] and one["correct"] == many["correct"]
    ex = examples[-1]
    p_ids = smol_tokenizer(ex.prompt.strip())["input_ids"]
    a_ids = smol_tokenizer(" " + ex.gold, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny(input_ids=torch.tensor([p_ids + a_ids])).logits[0]
    expected = logits[len(p_ids) - 1 : len(p_ids) - 1 + len(a_ids)].argmax(-1).tolist()
    assert one["predictions"][-1] == smol_tokenizer.decode(expected, skip_special_tokens=True)


def test_argmax_protocol_counts_exact_matches(monkeypatch, tiny, smol_tokenizer, parts):
    examples = parts["sst2"]["validation"][:4]

    def fake_run(self, rows, batch_size, progress=False, desc=""):
        # pretend the model predicts " Positive." for every row
        ids = smol_tokenizer(" Positive.", add_special_tokens=False)["input_ids"]
        return [protocols_mod.AnswerScore(torch.zeros(1), torch.tensor(ids), torch.empty(0)) for _ in rows]

    monkeypatch.setattr(protocols_mod._Forward, "run", fake_run)
    result = evaluate(tiny, smol_tokenizer, "sst2", examples, "argmax")
    assert result["correct"] == [ex.label == 1 for ex in examples]


def test_generate_protocol(tiny, smol_tokenizer, parts, monkeypatch):
    examples = parts["triviaqa"]["validation"][:4]
    one = evaluate(tiny, smol_tokenizer, "triviaqa", examples, batch_size=1, max_new_tokens=4)
    many = evaluate(tiny, smol_tokenizer, "triviaqa", examples, batch_size=4, max_new_tokens=4)
    assert one["protocol"] == "generate" and one["predictions"] == many["predictions"]
    assert all("\n" not in p for p in one["predictions"])
    with pytest.raises(ValueError, match="supports the protocols"):
        evaluate(tiny, smol_tokenizer, "triviaqa", examples, "choice")

    answers = [f"the {ex.answers[-1].upper()}." for ex in examples[:3]] + ["nothing"]
    monkeypatch.setattr(protocols_mod, "generate_answers", lambda *a, **k: answers)
    assert evaluate(tiny, smol_tokenizer, "triviaqa", examples)["correct"] == [True, True, True, False]
    assert evaluate(tiny, smol_tokenizer, "triviaqa", examples)["per_example"] == [1.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------- steered model


@pytest.fixture(scope="module")
def steered(tiny, smol_tokenizer, parts):
    import copy

    from peft import get_peft_model

    import sadi_peft

    model = get_peft_model(copy.deepcopy(tiny), sadi_peft.SADIConfig(variant="head", top_k=3, delta=20.0))
    pairs = get_task("copa").pairs(parts["copa"]["pairs"][:8])
    sadi_peft.calibrate(model, smol_tokenizer, pairs, batch_size=4, show_progress=False)
    return model


def test_steered_choice_is_batch_invariant_and_steers_the_prompt_end(steered, smol_tokenizer, mixed_examples):
    task = Task(name="mixed", description="", loader=lambda role, d: [])
    one = evaluate(steered, smol_tokenizer, task, mixed_examples, "choice", batch_size=1)
    many = evaluate(steered, smol_tokenizer, task, mixed_examples, "choice", batch_size=9)
    for a, b in zip(one["scores"], many["scores"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    with steered.disable_adapter():
        base = evaluate(steered, smol_tokenizer, task, mixed_examples, "choice", batch_size=9)
    assert not torch.allclose(torch.tensor(base["scores"][0]), torch.tensor(one["scores"][0]), atol=1e-3)

    # reference: steered prefill of the prompt (gain at its last token), then the answer through the KV cache
    ex = mixed_examples[-1]
    p_ids = torch.tensor([smol_tokenizer(ex.prompt.strip())["input_ids"]])
    for choice, score in zip(ex.choices, one["scores"][-1]):
        a_ids = torch.tensor([smol_tokenizer(" " + choice, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            prefill = steered(input_ids=p_ids, use_cache=True)
            rest = steered(input_ids=a_ids[:, :-1], past_key_values=prefill.past_key_values, use_cache=True)
        logits = torch.cat([prefill.logits[:, -1:], rest.logits], dim=1)[0].float()
        reference = torch.log_softmax(logits, -1).gather(1, a_ids[0][:, None]).mean()
        assert abs(float(reference) - score) < 1e-4


def test_triviaqa_pairs_calibrate_with_empty_negative(tiny, smol_tokenizer, parts):
    import copy

    from peft import get_peft_model

    import sadi_peft

    pairs = get_task("triviaqa").pairs(parts["triviaqa"]["pairs"][:4])
    assert all(neg == "" for _, _, neg in pairs)
    model = get_peft_model(copy.deepcopy(tiny), sadi_peft.SADIConfig(variant="head", top_k=2))
    result = sadi_peft.calibrate(model, smol_tokenizer, pairs, batch_size=2, show_progress=False)
    assert result.num_pairs == 4
    # calibrate reads prompt.strip() + " " + "": the prompt's tokens plus one lone-space token
    prompt = pairs[0][0].strip()
    negative = smol_tokenizer(prompt + " ")["input_ids"]
    assert negative[:-1] == smol_tokenizer(prompt)["input_ids"] and smol_tokenizer.decode(negative[-1:]) == " "


def test_score_answers_restores_training_mode(tiny, smol_tokenizer):
    tiny.train()
    try:
        scores = score_answers(tiny, smol_tokenizer, ["Question: 1+1?\nAnswer:"], ["two"], batch_size=1)
        n_tokens = len(smol_tokenizer(" two", add_special_tokens=False)["input_ids"])
        assert tiny.training and scores[0].token_logprobs.shape == scores[0].argmax_ids.shape == (n_tokens,)
    finally:
        tiny.eval()


@pytest.mark.slow
def test_smollm2_choice_batch_invariant(smollm2_path, smol_tokenizer, parts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    handmade = Example("Q: Where is the Eiffel Tower?\nA:", ("In Paris, France.", "In Rome.", "On the Moon."), 0)
    examples = parts["copa"]["validation"][:2] + [handmade]
    task = Task(name="mixed", description="", loader=lambda role, d: [])
    one = evaluate(model, smol_tokenizer, task, examples, "choice", batch_size=1)
    many = evaluate(model, smol_tokenizer, task, examples, "choice", batch_size=5)
    for a, b in zip(one["scores"], many["scores"]):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
