"""gepo.data: the synthetic source, local files through the real `datasets`, the real GSM8K file, clear errors, the
offline hub failing fast, and deterministic prompt assignment."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from gepo.data import (
    DataConfig,
    DataError,
    PromptExample,
    PromptSet,
    assign_prompt_index,
    format_prompt,
    load_prompts,
)
from gepo.synthetic import SyntheticArithmetic
from tests.paths import GSM8K_TRAIN


ROWS = [
    {"problem": "Tom has 3 apples and buys 4 more. How many?", "solution": "3 + 4 = <<3+4=7>>7\n#### 7", "id": 0},
    {"problem": "A shop sells 1,000 pens a day. How many in 2 days?", "solution": "2 * 1000\n#### 2,000", "id": 1},
    {"problem": "What is half of 1?", "solution": "#### 0.5", "id": 2},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- synthetic


def test_synthetic_default_source():
    prompts = load_prompts(DataConfig())
    problems = SyntheticArithmetic(difficulty=2, seed=0, split="train", size=100_000)
    assert isinstance(prompts, PromptSet)
    assert len(prompts) == 100_000
    assert prompts[5] == PromptExample(5, problems[5].question, str(problems[5].answer))
    assert "synthetic" in prompts.name and "difficulty=2" in prompts.name


def test_synthetic_is_deterministic_and_parameterised():
    cfg = DataConfig(difficulty=4, seed=7, split="test", size=50, max_examples=20)
    a, b = load_prompts(cfg), load_prompts(cfg)
    assert len(a) == 20
    assert list(a) == list(b)
    assert all("*" in ex.question for ex in a)  # difficulty 4 is multiplication
    assert list(load_prompts(DataConfig(seed=8, size=20))) != list(load_prompts(DataConfig(seed=7, size=20)))
    with pytest.raises(IndexError):
        a[20]
    with pytest.raises(DataError, match="difficulty"):
        load_prompts(DataConfig(difficulty=9))


def test_synthetic_word_problems_are_distinct_held_out_and_told_to_samplers_by_parameters():
    from node.run_info import QuestionSet

    cfg = DataConfig(difficulty=1, split="test", size=400, phrasing="word")
    test = load_prompts(cfg)
    train = load_prompts(DataConfig(difficulty=1, split="train", size=4000, phrasing="word"))
    questions = [ex.question for ex in test]
    assert len(set(questions)) >= 396  # hundreds of distinct held-out one-digit sums (only 100 expressions exist)
    assert not set(questions) & {ex.question for ex in train}  # and none of them is trained on
    for ex in list(test)[:50]:  # the answer is the sum of the two numbers the question names
        a, b = (int(t) for t in re.findall(r"\d+", ex.question))
        assert ex.answer == str(a + b) and "How many" in ex.question
    assert "phrasing=word" in test.name and list(load_prompts(cfg)) == list(test)
    told = QuestionSet.from_json(QuestionSet.of(cfg, test).to_json())
    assert told.questions is None and [told[i] for i in range(400)] == questions  # parameters, not texts
    # the expression phrasing is unchanged (recorded runs and samplers of older versions agree on it)
    assert load_prompts(DataConfig(difficulty=1, size=3))[0].question == SyntheticArithmetic(1, 0, "train", 3)[0].question
    with pytest.raises(DataError, match="word problems are sums"):
        load_prompts(DataConfig(difficulty=4, phrasing="word"))
    with pytest.raises(DataError, match="phrasing"):
        load_prompts(DataConfig(phrasing="poem"))


# ---- local files


def test_local_jsonl_with_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", ROWS)
    prompts = load_prompts(DataConfig(source=str(path), question_field="problem", answer_field="solution"))
    assert len(prompts) == 3
    assert [ex.answer for ex in prompts] == ["7", "2000", "0.5"]  # "auto": the final answer after ####
    assert prompts[1].question == ROWS[1]["problem"]
    assert "mine.jsonl" in prompts.name
    raw = load_prompts(
        DataConfig(source=str(path), question_field="problem", answer_field="solution", answer_format="raw")
    )
    assert raw[0].answer == ROWS[0]["solution"]
    first_two = load_prompts(
        DataConfig(source=str(path), question_field="problem", answer_field="solution", max_examples=2)
    )
    assert [ex.index for ex in first_two] == [0, 1]


def test_local_parquet_and_integer_answers(tmp_path):
    import datasets

    path = tmp_path / "set.parquet"
    datasets.Dataset.from_dict({"question": ["1 + 1?", "2 + 2?"], "answer": [2, 4]}).to_parquet(str(path))
    prompts = load_prompts(DataConfig(source=str(path), split="validation"))
    assert [(ex.question, ex.answer) for ex in prompts] == [("1 + 1?", "2"), ("2 + 2?", "4")]
    assert "validation" in prompts.name


def test_local_csv_and_json(tmp_path):
    csv = tmp_path / "set.csv"
    csv.write_text('question,answer\n"What is 2 * 3?",6\n')
    assert load_prompts(DataConfig(source=str(csv)))[0].answer == "6"
    js = tmp_path / "set.json"
    js.write_text(json.dumps([{"question": "q?", "answer": "\\frac{1}{2}"}]))
    assert load_prompts(DataConfig(source=str(js)))[0].answer == "\\frac{1}{2}"


def test_local_folder_of_files(tmp_path):
    folder = tmp_path / "myset"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}])
    prompts = load_prompts(DataConfig(source=str(folder)))
    assert [ex.answer for ex in prompts] == ["1", "2"]
    with pytest.raises(DataError, match="myset"):
        load_prompts(DataConfig(source=str(folder), split="test"))


def test_numpy_indices_work():
    import numpy as np

    prompts = load_prompts(DataConfig(size=10))
    assert prompts[np.int64(3)] == prompts[3]
    with pytest.raises(TypeError):
        prompts["3"]


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason=f"GSM8K training file not found at {GSM8K_TRAIN}")
def test_real_gsm8k_file():
    prompts = load_prompts(DataConfig(source=str(GSM8K_TRAIN), answer_format="gsm8k"))
    assert len(prompts) == 7473
    first = prompts[0]
    assert first.question.startswith("Natalia sold clips to 48 of her friends")
    assert first.answer == "72"
    answers = [ex.answer for ex in prompts]
    assert all(a.lstrip("-").replace(".", "", 1).isdigit() for a in answers), "final answers are plain numbers"
    assert "1080" in answers  # "1,080" lost its thousands separator
    assert list(load_prompts(DataConfig(source=str(GSM8K_TRAIN), max_examples=3))) == list(prompts)[:3]


# ---- errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_prompts(DataConfig(source=str(tmp_path / "nope.jsonl")))


def test_missing_field_names_the_fields(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", ROWS)
    with pytest.raises(DataError, match="no field 'question'.*problem"):
        load_prompts(DataConfig(source=str(path)))


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError):
        load_prompts(DataConfig(source=str(path)))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("question,answer\n")
    with pytest.raises(DataError, match="empty|no examples"):
        load_prompts(DataConfig(source=str(header_only)))


def test_bad_rows(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(DataError, match="row 0.*####"):
        load_prompts(DataConfig(source=str(path), answer_format="gsm8k"))
    path = _write_jsonl(tmp_path / "none.jsonl", [{"question": "q", "answer": "1"}, {"question": None, "answer": "2"}])
    with pytest.raises(DataError, match="row 1"):
        load_prompts(DataConfig(source=str(path)))
    with pytest.raises(DataError, match="answer_format"):
        DataConfig(answer_format="latex")


def test_error_is_one_line(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question": "q", "answer": \n')
    with pytest.raises(DataError) as info:
        load_prompts(DataConfig(source=str(bad)))
    assert "\n" not in str(info.value)


def test_offline_hub_fails_fast_with_a_clear_error():
    start = time.monotonic()
    with pytest.raises(DataError, match="hub.*off.*openai/gsm8k|openai/gsm8k.*off") as info:
        load_prompts(DataConfig(source="openai/gsm8k", subset="main"))
    assert time.monotonic() - start < 10
    assert "\n" not in str(info.value)


# ---- prompt assignment

# blake2b-128(person=b"gepo-prompt-v1", len(key):4 BE || key || sequence:8 BE) mod 7473, for key = bytes(range(32)).
PINNED = [4978, 2993, 937, 1052, 6426]


def test_assignment_is_deterministic_and_pinned():
    key = bytes(range(32))
    assert assign_prompt_index(key, 0, 1000) == assign_prompt_index(key, 0, 1000)
    # Pinned: learners and samplers of different versions must agree, so a change here is a protocol change.
    assert [assign_prompt_index(key, s, 7473) for s in range(5)] == PINNED
    assert assign_prompt_index(key, 0, 1) == 0
    other = bytes(32)
    assert [assign_prompt_index(key, s, 10**6) for s in range(20)] != [
        assign_prompt_index(other, s, 10**6) for s in range(20)
    ]


def test_assignment_is_roughly_uniform():
    bins, draws = 20, 20_000
    counts = Counter(assign_prompt_index(bytes([k % 251, k // 251]) * 16, k, bins) for k in range(draws))
    expected = draws / bins
    chi2 = sum((counts[b] - expected) ** 2 / expected for b in range(bins))
    assert chi2 < 45  # 19 degrees of freedom: p < 0.001 beyond 43.8
    # and over sequence numbers of one key
    counts = Counter(assign_prompt_index(b"sampler-key", s, 7) for s in range(7000))
    assert min(counts.values()) > 850 and max(counts.values()) < 1150


def test_assignment_rejects_bad_input():
    for args in [(b"", 0, 10), (b"k", -1, 10), (b"k", 2**64, 10), (b"k", 0, 0), ("k", 0, 10), (b"k", 1.0, 10)]:
        with pytest.raises(ValueError):
            assign_prompt_index(*args)


# ---- the prompt format (unchanged)


class _CharTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_format_prompt_plain():
    ids = format_prompt(_CharTokenizer(), "What is 1 + 1?", system_prompt="Be brief.")
    assert "".join(map(chr, ids)) == "Be brief.\n\nQuestion: What is 1 + 1?\nAnswer:"
