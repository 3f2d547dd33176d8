"""The built-in synthetic arithmetic task: the default prompt source, nothing to download.

Every problem is a pure function of (split, difficulty, seed, index), so a learner and a sampler that agree on those
four agree on the prompt without exchanging it, and a run is reproducible. The train and test splits are disjoint by
construction: each distinct problem is assigned to one split by a hash of its text (about 1 in 10 goes to test), and
each split draws by rejection until it finds one of its own.

Difficulty levels (the answer is always an integer):
    1  a + b                 a, b in [0, 9]
    2  a + b                 a, b in [10, 99]
    3  a + b or a - b        a, b in [100, 999]
    4  a * b                 a in [10, 99], b in [2, 9]
    5  (a op b) op c         a, b, c in [2, 99], op in {+, -, *}

Phrasings: "expression" asks "What is 3 + 5?"; "word" asks a sum (difficulties 1 to 3, additions only) as a short
word problem ("Lena has 3 shells and Omar has 5 shells. How many shells do they have together?") drawn from
templates, names and objects: millions of distinct questions even for one-digit sums, so a held-out split of
hundreds of distinct problems exists at the easiest difficulty (one-digit sums have only 100 expressions). With
"word" the split is assigned by a hash of the whole question, so test questions never occur in training, while
their (a, b) pairs do, in other words.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SPLITS = ("train", "test")
PHRASINGS = ("expression", "word")
MAX_DIFFICULTY = 5
_TEST_SHARE = 10  # one distinct problem in this many belongs to the test split


def _problem(rng: random.Random, difficulty: int) -> tuple[str, int]:
    """One expression and its value at the given difficulty."""
    if difficulty == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b}", a + b
    if difficulty == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a} + {b}", a + b
    if difficulty == 3:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if rng.random() < 0.5:
            return f"{a} + {b}", a + b
        return f"{a} - {b}", a - b
    if difficulty == 4:
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        return f"{a} * {b}", a * b
    if difficulty == 5:
        a, b, c = (rng.randint(2, 99) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expr = f"({a} {op1} {b}) {op2} {c}"
        return expr, int(eval(expr, {"__builtins__": {}}))  # noqa: S307 - digits and operators we generated
    raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {difficulty}")


_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jada", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tomas", "Uma", "Vik", "Wen", "Yusuf", "Zoe")
_OBJECTS = ("apples", "marbles", "stickers", "pencils", "books", "shells", "coins", "cookies", "stamps", "balloons",
            "cards", "eggs", "flowers", "rocks", "buttons", "candles")
_TEMPLATES = (  # {n}, {m}: two different names; {o}: a plural object; {a} + {b} is the answer
    "{n} has {a} {o} and {m} has {b} {o}. How many {o} do they have together?",
    "{n} has {a} {o}. {m} gives {n} {b} more {o}. How many {o} does {n} have now?",
    "There are {a} {o} in a box. {n} puts {b} more {o} in the box. How many {o} are in the box now?",
    "{n} bought {a} {o} on Monday and {b} {o} on Tuesday. How many {o} did {n} buy in all?",
    "{n} found {a} {o} in the morning and {b} {o} in the afternoon. How many {o} did {n} find?",
    "A shelf holds {a} {o}. {n} adds {b} {o} to it. How many {o} are on the shelf now?",
    "{n} collected {a} {o}, then {m} gave {n} {b} {o}. How many {o} does {n} have?",
    "{n} had {a} {o} and won {b} more {o} in a game. How many {o} does {n} have now?",
)


def _word_problem(rng: random.Random, difficulty: int) -> tuple[str, str, int]:
    """An addition of the given difficulty (1-3, checked by SyntheticArithmetic) told as a word problem:
    (question, expression, answer)."""
    lo, hi = {1: (0, 9), 2: (10, 99), 3: (100, 999)}[difficulty]
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    n, m = rng.sample(_NAMES, 2)
    question = rng.choice(_TEMPLATES).format(n=n, m=m, o=rng.choice(_OBJECTS), a=a, b=b)
    return question, f"{a} + {b}", a + b


def _split_of(expression: str) -> str:
    digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % _TEST_SHARE == 0 else "train"


@dataclass(frozen=True)
class ArithmeticProblem:
    index: int
    expression: str  # e.g. "23 + 45"
    answer: int
    text: str | None = None  # the word problem, for phrasing "word"

    @property
    def question(self) -> str:
        return self.text if self.text is not None else f"What is {self.expression}?"


@dataclass(frozen=True)
class SyntheticArithmetic:
    """An indexable, deterministic set of `size` arithmetic problems of one difficulty and split."""

    difficulty: int = 2
    seed: int = 0
    split: str = "train"
    size: int = 100_000
    phrasing: str = "expression"

    def __post_init__(self) -> None:
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {self.phrasing!r}")
        if self.phrasing == "word" and self.difficulty not in (1, 2, 3):
            raise ValueError(f"word problems are sums: difficulty must be 1, 2 or 3, got {self.difficulty}")
        if not 1 <= self.difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"difficulty must be in 1..{MAX_DIFFICULTY}, got {self.difficulty}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> ArithmeticProblem:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} problems")
        # str seeds are hashed with SHA-512 by random.Random: stable across processes and Python versions.
        rng = random.Random(f"{self.split}:{self.difficulty}:{self.seed}:{index}"
                            + (":word" if self.phrasing == "word" else ""))
        for _ in range(10_000):
            if self.phrasing == "word":
                text, expression, answer = _word_problem(rng, self.difficulty)
            else:
                text, (expression, answer) = None, _problem(rng, self.difficulty)
            if _split_of(text or expression) == self.split:  # a word problem's split: the whole question's
                return ArithmeticProblem(index, expression, answer, text)
        raise RuntimeError("could not draw a problem for this split")  # unreachable with a 1/10 test share
