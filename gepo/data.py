"""Prompt data: where questions and gold answers come from, and the one prompt format.

Sources (`DataConfig.source`):
  "synthetic"                  the built-in arithmetic task (gepo/synthetic.py); nothing to download, the default.
  a local path                 .jsonl / .json / .parquet / .csv (or a folder of such files), read by `datasets`.
  anything else                a dataset name on the Hugging Face hub (e.g. "openai/gsm8k" with subset "main"),
                               through `datasets.load_dataset`; offline (HF_DATASETS_OFFLINE=1) it fails fast.

Every PromptSet is indexable and deterministic: the same config gives the same examples in the same order (file
order; no shuffling), so a learner and its samplers that share a config agree on prompt i, and
`assign_prompt_index` can pick prompts for samplers that the learner re-checks.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from gepo.synthetic import SyntheticArithmetic

logger = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "DataError",
    "PromptExample",
    "PromptSet",
    "SyntheticPromptSet",
    "TablePromptSet",
    "assign_prompt_index",
    "format_prompt",
    "load_prompts",
]

ANSWER_FORMATS = ("auto", "gsm8k", "raw")
# File extension -> the `datasets` builder that reads it.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def format_prompt(tokenizer: Any, question: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt for `question`: the tokenizer's chat template when it has one, else a plain format.

    This is the only place a prompt is built, so learner, samplers and evaluation always agree on it.
    """
    return format_prompts(tokenizer, [question], system_prompt)[0]


def format_prompts(tokenizer: Any, questions: Sequence[str], system_prompt: str | None = None) -> list[list[int]]:
    """`format_prompt` for many questions at once (one batched tokenizer call: ~3x faster for a whole data set)."""
    if not questions:
        return []
    if getattr(tokenizer, "chat_template", None):
        head = [{"role": "system", "content": system_prompt}] if system_prompt else []
        conversations = [[*head, {"role": "user", "content": q}] for q in questions]
        texts = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    prefix = f"{system_prompt}\n\n" if system_prompt else ""
    return [list(tokenizer(f"{prefix}Question: {q}\nAnswer:")["input_ids"]) for q in questions]


class DataError(ValueError):
    """The prompt data cannot be used: a missing file or field, an empty set, an unreachable hub dataset."""


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from.

    source: "synthetic" (generated arithmetic problems), a local .jsonl/.json/.csv/.parquet file or a folder saved
        with datasets, or a hub dataset name (e.g. openai/gsm8k).
    split: the split to read ("train"/"test" for synthetic; for a local file, the name given to its one split).
    subset: the hub dataset's config name (e.g. "main" for openai/gsm8k); unused otherwise.
    question_field: the column holding the question.
    answer_field: the column holding the gold answer.
    answer_format: "gsm8k" keeps only the final answer after "####" (thousands separators removed: "1,080" -> "1080");
        "raw" keeps the answer as it is; "auto" (default) applies "gsm8k" to answers that contain "####".
    difficulty: synthetic task: 1 (one-digit sums) to 5 (two operations on two-digit numbers); 2 is two-digit sums.
    seed: synthetic task: the seed that generates the problems.
    size: synthetic task: problems in the split.
    phrasing: synthetic task: "expression" ("What is 3 + 5?") or "word" (sums as short word problems; difficulty 1-3).
    max_examples: keep only the first this-many examples (after loading, in order).
    """

    source: str = "synthetic"
    split: str = "train"
    subset: str | None = None
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "auto"
    difficulty: int = 2
    seed: int = 0
    size: int = 100_000
    phrasing: str = "expression"
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise DataError(f"answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
        if self.max_examples is not None and self.max_examples <= 0:
            raise DataError(f"max_examples must be positive, got {self.max_examples}")
        if not self.source:
            raise DataError("source is empty: use 'synthetic', a file path, or a hub dataset name")


@dataclass(frozen=True)
class PromptExample:
    index: int  # position in its PromptSet
    question: str
    answer: str  # the gold answer, as text (what gepo.rewards compares against)
    columns: Mapping[str, Any] = field(default_factory=dict)  # the row's dataset columns as read (reward plug-ins)


class PromptSet(ABC):
    """A fixed, ordered, indexable collection of PromptExamples."""

    name: str  # a one-line description: source and parameters

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _get(self, index: int) -> PromptExample: ...

    def __getitem__(self, index: int) -> PromptExample:
        if isinstance(index, bool):
            raise TypeError("prompt index must be an integer, got bool")
        index = operator.index(index)  # numpy integers too; TypeError for anything else
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} out of range for {len(self)} prompts in {self.name}")
        return self._get(index)

    def __iter__(self) -> Iterator[PromptExample]:
        for i in range(len(self)):
            yield self._get(i)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self)} prompts>"


class SyntheticPromptSet(PromptSet):
    """The built-in arithmetic task; problems are generated on access, so a large `size` costs nothing."""

    def __init__(self, problems: SyntheticArithmetic, max_examples: int | None = None) -> None:
        self._problems = problems
        self._len = min(len(problems), max_examples) if max_examples else len(problems)
        self.name = (
            f"synthetic(difficulty={problems.difficulty}, seed={problems.seed}, split={problems.split}, "
            f"size={self._len}" + (f", phrasing={problems.phrasing})" if problems.phrasing != "expression" else ")")
        )

    def __len__(self) -> int:
        return self._len

    def _get(self, index: int) -> PromptExample:
        problem = self._problems[index]
        return PromptExample(index, problem.question, str(problem.answer))


class TablePromptSet(PromptSet):
    """Questions and gold answers read from a table (file or hub dataset), held in memory in source order."""

    def __init__(self, name: str, questions: list[str], answers: list[str],
                 columns: dict[str, list[Any]] | None = None) -> None:
        if len(questions) != len(answers):
            raise DataError(f"{name}: {len(questions)} questions but {len(answers)} answers")
        if not questions:
            raise DataError(f"{name}: no examples")
        self.name = name
        self._questions = questions
        self._answers = answers
        self._columns = columns or {}

    def __len__(self) -> int:
        return len(self._questions)

    def _get(self, index: int) -> PromptExample:
        columns = {k: v[index] for k, v in self._columns.items()}
        return PromptExample(index, self._questions[index], self._answers[index], columns)


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_prompts(cfg: DataConfig) -> PromptSet:
    """The PromptSet `cfg` describes; raises DataError with a one-line reason when it cannot be built."""
    if cfg.source == "synthetic":
        try:
            problems = SyntheticArithmetic(difficulty=cfg.difficulty, seed=cfg.seed, split=cfg.split, size=cfg.size,
                                           phrasing=cfg.phrasing)
        except ValueError as e:
            raise DataError(f"synthetic prompts: {e}") from None
        prompts: PromptSet = SyntheticPromptSet(problems, cfg.max_examples)
    else:
        prompts = _load_table(cfg)
    logger.info("loaded %d prompts from %s", len(prompts), prompts.name)
    return prompts


def is_local_source(source: str) -> bool:
    # A data-file extension means a path even when the file is missing, so a typo gives "file not found", not a
    # confusing hub lookup.
    return os.path.exists(source) or os.path.splitext(source)[1].lower() in _BUILDERS


def _load_table(cfg: DataConfig) -> TablePromptSet:
    if is_local_source(cfg.source):
        dataset, name = _load_local(cfg), os.path.basename(os.path.normpath(cfg.source))
    else:
        dataset, name = _load_hub(cfg), cfg.source + (f"/{cfg.subset}" if cfg.subset else "")
    name = f"{name} [{cfg.split}]"
    missing = [f for f in (cfg.question_field, cfg.answer_field) if f not in dataset.column_names]
    if missing:
        raise DataError(f"{name}: no field {', '.join(map(repr, missing))}; fields are {dataset.column_names}")
    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset is empty")
    if cfg.max_examples is not None:
        dataset = dataset.select(range(min(cfg.max_examples, len(dataset))))
    questions = _text_column(dataset[cfg.question_field], name, cfg.question_field)
    answers = [
        _gold_answer(a, cfg.answer_format, name, i)
        for i, a in enumerate(_text_column(dataset[cfg.answer_field], name, cfg.answer_field))
    ]
    return TablePromptSet(name, questions, answers, dataset.to_dict())


def _load_local(cfg: DataConfig) -> Any:
    import datasets

    path = cfg.source
    if not os.path.exists(path):
        raise DataError(f"prompt file not found: {path}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    try:
        if os.path.isdir(path):
            return datasets.load_dataset(path, split=cfg.split)
        builder = _BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type; use one of {sorted(_BUILDERS)}")
        # Name the file's one split after cfg.split, so any split name reads it.
        return datasets.load_dataset(builder, data_files={cfg.split: path}, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        if "corresponds to no data" in str(e):  # a CSV with a header and no rows
            raise DataError(f"{path}: the dataset is empty") from e
        raise DataError(f"could not read {path}: {_one_line(e)}") from e


def _load_hub(cfg: DataConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    except Exception as e:  # noqa: BLE001 - network, auth, missing-dataset and offline errors all end here
        offline = " (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set: the hub is off)" if _hub_offline() else ""
        raise DataError(
            f"could not load hub dataset {cfg.source!r}{offline}: {_one_line(e)}. "
            "Use source='synthetic' or a local .jsonl/.json/.parquet/.csv file instead."
        ) from e


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _one_line(error: BaseException) -> str:
    """The error and its root cause on one line: `datasets` wraps e.g. a JSON syntax error in a generic message."""
    root, seen = error, {id(error)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(nxt))
    parts = [" ".join(str(e).split()) or type(e).__name__ for e in (error, root)]
    text = ": ".join(dict.fromkeys(parts))  # once if the root is the error itself
    return (text[:300] + "…") if len(text) > 300 else text


def _text_column(values: list[Any], name: str, field: str) -> list[str]:
    """Strings for every row; numbers (e.g. integer answers) become their text, a missing value is an error."""
    out = []
    for i, value in enumerate(values):
        if value is None:
            raise DataError(f"{name}: row {i} has no {field!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"{name}: row {i} field {field!r} is {type(value).__name__}, expected text")
        text = str(value).strip()
        if not text:
            raise DataError(f"{name}: row {i} has an empty {field!r}")
        out.append(text)
    return out


def _gold_answer(text: str, answer_format: str, name: str, row: int) -> str:
    if answer_format == "raw" or (answer_format == "auto" and "####" not in text):
        return text
    if "####" not in text:
        raise DataError(f"{name}: row {row} answer has no '#### <answer>' line (answer_format='gsm8k')")
    final = text.rsplit("####", 1)[1].strip()
    if not final:
        raise DataError(f"{name}: row {row} answer is empty after '####'")
    return _drop_thousands_separators(final)


def _drop_thousands_separators(text: str) -> str:
    """ "1,080" -> "1080"; anything that is not a digit-grouped number is left alone (e.g. "(1,2)")."""
    body = text[1:] if text.startswith("-") else text
    head, _, frac = body.partition(".")
    groups = head.split(",")
    grouped = (
        len(groups) > 1
        and 1 <= len(groups[0]) <= 3
        and all(g.isdigit() and g.isascii() for g in groups)
        and all(len(g) == 3 for g in groups[1:])
        and (not frac or (frac.isdigit() and frac.isascii()))
    )
    return text.replace(",", "") if grouped else text


# --------------------------------------------------------------------------------------------------------------------
# Prompt assignment


_ASSIGN_PERSON = b"gepo-prompt-v1"  # domain separation: these hashes are used for nothing else


def assign_prompt_index(sampler_public_key: bytes, sequence: int, num_prompts: int) -> int:
    """The dataset index a sampler must use for its `sequence`-th rollout group.

    A hash of (public key, sequence) rather than the sampler's choice, so no sampler can cherry-pick easy prompts,
    and the learner recomputes it to check every group. blake2b-128 modulo num_prompts: uniform up to a bias of
    num_prompts / 2**128.
    """
    if not isinstance(sampler_public_key, (bytes, bytearray)) or not sampler_public_key:
        raise ValueError("sampler_public_key must be non-empty bytes")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < 2**64:
        raise ValueError(f"sequence must be an int in [0, 2**64), got {sequence!r}")
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
    h = hashlib.blake2b(digest_size=16, person=_ASSIGN_PERSON)
    # Length-prefix the key so (key, sequence) pairs can never collide by shifting bytes between the two.
    h.update(len(sampler_public_key).to_bytes(4, "big"))
    h.update(bytes(sampler_public_key))
    h.update(sequence.to_bytes(8, "big"))
    return int.from_bytes(h.digest(), "big") % num_prompts
