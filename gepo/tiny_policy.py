"""The built-in tiny policy: a character-level tokenizer and a ~0.9M-parameter Llama, warm-started on arithmetic.

Demos, tests and the staleness experiments run on it on 2 CPU cores, with no model hub. The shipped copy lives in
`gepo/assets/tiny-policy/`, package data installed with the wheel (see `tiny_policy_path()`); `python -m scripts.build_tiny_policy` regenerates it.

Tokenizer: one token per printable ASCII character (plus newline and tab), and the special tokens <pad>, <bos>,
<eos>, <unk> and the chat role markers <|system|>, <|user|>, <|assistant|>. Its chat template renders a question as

    <|user|>What is 23 + 45?<|assistant|>

(no BOS: the role marker opens the sequence) and an assistant turn as its text followed by <eos>.

Warm start: supervised next-token training on `SyntheticArithmetic(difficulty, seed, "train")` with targets
`<answer><eos>` (loss on those tokens only), evaluated greedily on held-out problems (split "test") every few steps,
and stopped as soon as the accuracy is inside a target band, so that RL starts from a policy that is right often
enough to get a reward signal but has room to improve. When an evaluation overshoots the band the run returns to
the last evaluated state below it and goes on with half the learning rate and twice as many evaluations.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from gepo.data import format_prompt
from gepo.sampling import evaluate_accuracy
from gepo.synthetic import SyntheticArithmetic

logger = logging.getLogger(__name__)

__all__ = [
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "UNK_TOKEN",
    "ROLE_TOKENS",
    "CHAT_TEMPLATE",
    "TinyModelConfig",
    "build_tokenizer",
    "save_tokenizer",
    "build_model",
    "build_tiny_policy",
    "tiny_policy_path",
    "load_tiny_policy",
    "read_warmstart",
]

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WARMSTART_FILE = "warmstart.json"
_ASSETS = Path(__file__).resolve().parent / "assets"  # package data: ships inside the wheel


# --------------------------------------------------------------------------------------------------------------
# tokenizer and model


def build_tokenizer(model_max_length: int = 256) -> Any:
    """The character-level tokenizer, as a `transformers.PreTrainedTokenizerFast` (left padding, chat template).

    Token ids: the special tokens first (<pad>=0, <bos>=1, <eos>=2, <unk>=3, then the role markers), then one id per
    character. A character outside the vocabulary encodes as <unk>.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # A BPE model without merges splits text into single characters; Fuse joins them back when decoding.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=model_max_length,
    )


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Llama. The defaults give 0.87M parameters (embeddings tied)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256


def build_model(tokenizer: Any, shape: TinyModelConfig | None = None, seed: int = 0) -> Any:
    """A freshly initialised `LlamaForCausalLM` for `tokenizer`, deterministic under `seed`."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    shape = shape or TinyModelConfig()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=16,
    )
    return model


# --------------------------------------------------------------------------------------------------------------
# warm start


@dataclass
class WarmStartRecord:
    """What `warmstart.json` records about how the policy was made."""

    difficulty: int
    seed: int
    steps: int  # optimizer steps behind the saved weights
    updates: int  # optimizer steps taken in all, rolled-back ones included
    seconds: float
    accuracy: float  # greedy accuracy on the eval_size problems the stopping rule looked at
    eval_size: int
    heldout_accuracy: float | None  # greedy accuracy on heldout_size further test problems (not used to stop)
    heldout_size: int
    target_accuracy: tuple[float, float]
    in_band: bool
    batch_size: int
    learning_rate: float
    final_learning_rate: float
    rollbacks: int
    parameters: int
    model: dict
    torch_threads: int
    history: list  # [step, accuracy] at every evaluation


def _training_batch(
    tokenizer: Any, problems: Sequence[Any], prompt_cache: dict[str, list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) with the loss on `<answer><eos>` only."""
    rows, labels = [], []
    for p in problems:
        prompt = prompt_cache.get(p.question)
        if prompt is None:
            prompt = prompt_cache[p.question] = format_prompt(tokenizer, p.question)
        target = tokenizer(str(p.answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.as_tensor(r)
        lab[i, : len(lb)] = torch.as_tensor(lb)
        mask[i, : len(r)] = 1
    return ids, mask, lab


def build_tiny_policy(
    out_dir: str | Path,
    *,
    difficulty: int = 2,
    seed: int = 0,
    target_accuracy: tuple[float, float] = (0.25, 0.45),
    max_steps: int = 3000,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    warmup_steps: int = 20,
    eval_every: int = 20,
    eval_size: int = 200,
    heldout_size: int = 1000,
    max_rollbacks: int = 6,
    shape: TinyModelConfig | None = None,
    num_threads: int | None = 1,
) -> Path:
    """Train the tiny policy until its greedy held-out accuracy is inside `target_accuracy`, and save it.

    Writes config.json, generation_config.json, model.safetensors, the tokenizer files and warmstart.json into
    `out_dir` and returns it. Deterministic under `seed` for a given machine and thread count. When max_steps runs
    out before the band is reached, the last state is saved with `in_band: false` (and a warning is logged).

    num_threads: torch CPU threads while building (restored afterwards); None leaves torch's setting. One thread is
    the default: this model's matrices are too small to gain from more, and on a busy machine extra threads spin
    (measured: 0.12 s/step on one thread against 0.3-1.2 s/step on two, with other jobs running).
    """
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _build(
            out_dir,
            difficulty=difficulty,
            seed=seed,
            target_accuracy=target_accuracy,
            max_steps=max_steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            eval_every=eval_every,
            eval_size=eval_size,
            heldout_size=heldout_size,
            max_rollbacks=max_rollbacks,
            shape=shape,
        )
    finally:
        torch.set_num_threads(before)


def _build(
    out_dir: str | Path,
    *,
    difficulty: int,
    seed: int,
    target_accuracy: tuple[float, float],
    max_steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    eval_every: int,
    eval_size: int,
    heldout_size: int,
    max_rollbacks: int,
    shape: TinyModelConfig | None,
) -> Path:
    lo, hi = target_accuracy
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"target_accuracy must be (lo, hi) with 0 <= lo <= hi <= 1, got {target_accuracy}")
    if max_steps < 0 or batch_size < 1 or eval_every < 1 or eval_size < 1:
        raise ValueError("max_steps >= 0, batch_size >= 1, eval_every >= 1 and eval_size >= 1 are required")
    out = Path(out_dir)
    shape = shape or TinyModelConfig()
    started = time.perf_counter()

    tokenizer = build_tokenizer(model_max_length=shape.max_position_embeddings)
    model = build_model(tokenizer, shape, seed=seed)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("tiny policy: %d parameters, %s", n_params, asdict(shape))

    train = SyntheticArithmetic(difficulty=difficulty, seed=seed, split="train", size=2**40)
    test = SyntheticArithmetic(difficulty=difficulty, seed=seed, split="test", size=eval_size + max(heldout_size, 0))
    eval_problems = [test[i] for i in range(eval_size)]
    heldout_problems = [test[i] for i in range(eval_size, eval_size + max(heldout_size, 0))]

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    lr = learning_rate
    prompt_cache: dict[str, list[int]] = {}

    def evaluate() -> float:
        return evaluate_accuracy(model, tokenizer, eval_problems, batch_size=eval_size)

    history: list[list[float]] = []
    accuracy = evaluate()
    history.append([0, accuracy])
    snapshot = (0, accuracy, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    step, rollbacks, data_pos, updates = 0, 0, 0, 0
    in_band = lo <= accuracy <= hi
    model.train()
    while not in_band and step < max_steps:
        scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        batch = [train[data_pos + i] for i in range(batch_size)]
        data_pos += batch_size  # never rewinds, so a rolled-back run sees fresh problems
        ids, mask, labels = _training_batch(tokenizer, batch, prompt_cache)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        updates += 1
        if step % eval_every and step != max_steps:
            continue
        accuracy = evaluate()
        history.append([step, accuracy])
        model.train()
        logger.info("step %d  loss %.4f  held-out accuracy %.3f  lr %.2g", step, loss.item(), accuracy, lr)
        if accuracy > hi and rollbacks < max_rollbacks:
            back_to, back_accuracy, model_state, opt_state = snapshot
            model.load_state_dict(model_state)
            optimizer.load_state_dict(opt_state)
            lr *= 0.5
            eval_every = max(1, eval_every // 2)
            rollbacks += 1
            logger.info("overshot the band (%.3f > %.2f): back to step %d, lr %.2g", accuracy, hi, back_to, lr)
            step, accuracy = back_to, back_accuracy
            continue
        in_band = lo <= accuracy <= hi
        if accuracy > hi:
            break  # no rollbacks left: more training only moves further from the band
        if accuracy < lo:
            snapshot = (step, accuracy, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))

    model.eval()
    heldout = evaluate_accuracy(model, tokenizer, heldout_problems, batch_size=250) if heldout_problems else None
    seconds = time.perf_counter() - started
    if not in_band:
        logger.warning("warm start ended outside the target band: accuracy %.3f after %d steps", accuracy, step)
    logger.info("warm start done: %d steps, %.1f s, accuracy %.3f, held-out %s", step, seconds, accuracy, heldout)

    record = WarmStartRecord(
        difficulty=difficulty,
        seed=seed,
        steps=step,
        updates=updates,
        seconds=round(seconds, 1),
        accuracy=accuracy,
        eval_size=eval_size,
        heldout_accuracy=heldout,
        heldout_size=len(heldout_problems),
        target_accuracy=(lo, hi),
        in_band=in_band,
        batch_size=batch_size,
        learning_rate=learning_rate,
        final_learning_rate=lr,
        rollbacks=rollbacks,
        parameters=n_params,
        model=asdict(shape),
        torch_threads=torch.get_num_threads(),
        history=history,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    (out / WARMSTART_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")
    return out


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """`save_pretrained`, with tokenizer_config.json naming the class and role tokens the portable way.

    transformers 5 writes `"tokenizer_class": "TokenizersBackend"` and `extra_special_tokens`, names older releases
    do not know; `PreTrainedTokenizerFast` and `additional_special_tokens` load identically in 5 and also in 4.x.
    """
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # where a loaded tokenizer happened to come from
        config.pop(key, None)
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------------------
# the shipped copy


def tiny_policy_path() -> Path:
    """The shipped tiny policy folder, `gepo/assets/tiny-policy/` (inside the installed package too)."""
    return _ASSETS / "tiny-policy"


def read_warmstart(path: str | Path | None = None) -> dict:
    """The warm-start record (warmstart.json) of a tiny policy folder; default the shipped one."""
    folder = Path(path) if path is not None else tiny_policy_path()
    return json.loads((folder / WARMSTART_FILE).read_text())


def load_tiny_policy(path: str | Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a tiny policy folder (default the shipped one), model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path) if path is not None else tiny_policy_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model, tokenizer
