"""The built-in tiny policy: the shipped folder, its tokenizer, its recorded accuracy, and the builder."""

from __future__ import annotations

import json

import pytest
import torch

from gepo.data import format_prompt
from gepo.sampling import evaluate_accuracy
from gepo.synthetic import SyntheticArithmetic
from gepo.tiny_policy import (
    CHAT_TEMPLATE,
    ROLE_TOKENS,
    build_tiny_policy,
    build_tokenizer,
    read_warmstart,
    tiny_policy_path,
)

ACCURACY_TOLERANCE = 0.10  # 200 problems: the binomial standard error near 35% is 0.034

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_policy_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tokenizer


def test_shipped_folder_is_complete_and_small():
    path = tiny_policy_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "warmstart.json"):
        assert (path / name).is_file(), name
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert total < 8 * 1024 * 1024
    record = read_warmstart()
    for key in ("accuracy", "steps", "difficulty", "seed", "target_accuracy", "in_band", "parameters"):
        assert key in record
    assert record["in_band"]
    lo, hi = record["target_accuracy"]
    assert lo <= record["accuracy"] <= hi


def test_shipped_model_loads_offline(shipped):
    model, tokenizer = shipped
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n_params <= 1_500_000
    assert n_params == read_warmstart()["parameters"]
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_shipped_accuracy_is_in_the_recorded_band(shipped):
    model, tokenizer = shipped
    record = read_warmstart()
    lo, hi = record["target_accuracy"]
    # 200 held-out problems the stopping rule never looked at (it used the first eval_size test problems)
    start = record["eval_size"]
    test = SyntheticArithmetic(record["difficulty"], record["seed"], "test", size=start + 200)
    accuracy = evaluate_accuracy(model, tokenizer, [test[i] for i in range(start, start + 200)])
    assert lo - ACCURACY_TOLERANCE <= accuracy <= hi + ACCURACY_TOLERANCE, accuracy
    # and the problems it did look at reproduce the recorded accuracy
    seen = evaluate_accuracy(model, tokenizer, [test[i] for i in range(record["eval_size"])])
    assert abs(seen - record["accuracy"]) <= 0.02


def test_tokenizer_round_trips(shipped):
    _, tokenizer = shipped
    text = "What is (12 * 34) - 56?\n\tAnswer: -1,234 ~{x}|"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text), "one token per character"
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id in tokenizer("é", add_special_tokens=False)["input_ids"]
    prompt = format_prompt(tokenizer, "What is 23 + 45?")
    assert tokenizer.decode(prompt) == "<|user|>What is 23 + 45?<|assistant|>"
    assert len(prompt) == len("What is 23 + 45?") + 2
    assert tokenizer.decode(prompt, skip_special_tokens=True) == "What is 23 + 45?"
    assert tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS)) == [prompt[0] - 1, prompt[0], prompt[-1]]
    system = format_prompt(tokenizer, "Hi", system_prompt="Be brief.")
    assert tokenizer.decode(system) == "<|system|>Be brief.<|user|>Hi<|assistant|>"
    turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}], tokenize=False
    )
    assert turn == "<|user|>What is 1 + 1?<|assistant|>2<eos>"
    assert tokenizer.padding_side == "left"
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_fresh_tokenizer_saves_and_loads(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == CHAT_TEMPLATE
    assert again.get_vocab() == tokenizer.get_vocab()
    assert format_prompt(again, "What is 5 + 6?") == format_prompt(tokenizer, "What is 5 + 6?")


def test_build_tiny_policy_runs_a_few_steps(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(
        difficulty=2,
        seed=7,
        target_accuracy=(0.9, 1.0),  # out of reach in 4 steps: exercises the give-up path
        max_steps=4,
        batch_size=8,
        eval_every=2,
        eval_size=8,
        heldout_size=8,
    )
    out = build_tiny_policy(tmp_path / "a", **kwargs)
    record = json.loads((out / "warmstart.json").read_text())
    assert record["steps"] == 4 and record["in_band"] is False
    assert record["difficulty"] == 2 and record["seed"] == 7
    assert [h[0] for h in record["history"]] == [0, 2, 4]
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    # deterministic under the seed
    again = build_tiny_policy(tmp_path / "b", **kwargs)
    model_b = AutoModelForCausalLM.from_pretrained(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name


def test_build_script_help(capsys):
    from scripts.build_tiny_policy import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--difficulty", "--seed", "--target-accuracy", "--max-steps", "--threads", "--eval-size"):
        assert flag in text


def test_overshooting_the_band_rolls_back(tmp_path, monkeypatch):
    """An evaluation above the band returns to the last state below it, with half the learning rate."""
    import gepo.tiny_policy as tp

    scripted = iter([0.0, 0.1, 0.9, 0.3])  # step 0, 2 (below), 4 (overshoot -> back to 2), 3 (in band)
    monkeypatch.setattr(tp, "evaluate_accuracy", lambda *a, **k: next(scripted))
    out = build_tiny_policy(
        tmp_path, target_accuracy=(0.25, 0.45), max_steps=50, batch_size=4, eval_every=2, eval_size=4,
        heldout_size=0, learning_rate=1e-3,
    )  # fmt: skip
    record = json.loads((out / "warmstart.json").read_text())
    assert record["history"] == [[0, 0.0], [2, 0.1], [4, 0.9], [3, 0.3]]
    assert record["rollbacks"] == 1 and record["in_band"] and record["accuracy"] == 0.3
    assert record["steps"] == 3 and record["updates"] == 5
    assert record["final_learning_rate"] == 5e-4
    assert record["heldout_accuracy"] is None
