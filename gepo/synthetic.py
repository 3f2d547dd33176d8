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
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SPLITS = ("train", "test")
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


def _split_of(expression: str) -> str:
    digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % _TEST_SHARE == 0 else "train"


@dataclass(frozen=True)
class ArithmeticProblem:
    index: int
    expression: str  # e.g. "23 + 45"
    answer: int

    @property
    def question(self) -> str:
        return f"What is {self.expression}?"


@dataclass(frozen=True)
class SyntheticArithmetic:
    """An indexable, deterministic set of `size` arithmetic problems of one difficulty and split."""

    difficulty: int = 2
    seed: int = 0
    split: str = "train"
    size: int = 100_000

    def __post_init__(self) -> None:
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
        rng = random.Random(f"{self.split}:{self.difficulty}:{self.seed}:{index}")
        for _ in range(10_000):
            expression, answer = _problem(rng, self.difficulty)
            if _split_of(expression) == self.split:
                return ArithmeticProblem(index, expression, answer)
        raise RuntimeError("could not draw a problem for this split")  # unreachable with a 1/10 test share
