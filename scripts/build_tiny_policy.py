"""Regenerate the built-in tiny policy (gepo/assets/tiny-policy/ by default).

    .venv/bin/python -m scripts.build_tiny_policy [--out DIR] [--difficulty 2] [--seed 0] [--target-accuracy 0.25 0.45]

Trains the character-level tiny Llama on the synthetic arithmetic task until its greedy held-out accuracy is inside
the target band, then saves the model, tokenizer and warmstart.json. No model hub is needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from gepo.tiny_policy import TinyModelConfig, tiny_policy_path

    shape = TinyModelConfig()
    p = argparse.ArgumentParser(
        prog="python -m scripts.build_tiny_policy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=tiny_policy_path(), help="output folder (overwritten)")
    p.add_argument("--difficulty", type=int, default=2, help="synthetic task difficulty, 1..5 (2 = two-digit addition)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the problem stream")
    p.add_argument(
        "--target-accuracy",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=(0.25, 0.45),
        help="stop once the greedy held-out accuracy is inside [LO, HI]",
    )
    p.add_argument("--max-steps", type=int, default=3000, help="give up (saving the last state) after this many steps")
    p.add_argument("--batch-size", type=int, default=32, help="problems per optimizer step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=20, help="linear learning-rate warm-up steps")
    p.add_argument("--eval-every", type=int, default=20, help="steps between held-out evaluations")
    p.add_argument("--eval-size", type=int, default=200, help="held-out problems the stopping rule evaluates")
    p.add_argument(
        "--heldout-size", type=int, default=1000, help="further held-out problems measured once at the end (0: skip)"
    )
    p.add_argument("--max-rollbacks", type=int, default=6, help="returns to an earlier state after overshooting HI")
    p.add_argument("--hidden-size", type=int, default=shape.hidden_size, help="model width")
    p.add_argument("--layers", type=int, default=shape.num_hidden_layers, help="transformer layers")
    p.add_argument("--heads", type=int, default=shape.num_attention_heads, help="attention heads")
    p.add_argument("--intermediate-size", type=int, default=shape.intermediate_size, help="MLP width")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: torch's choice); results depend on it"
    )
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    from gepo.tiny_policy import TinyModelConfig, build_tiny_policy

    out = build_tiny_policy(
        args.out,
        difficulty=args.difficulty,
        seed=args.seed,
        target_accuracy=tuple(args.target_accuracy),
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        heldout_size=args.heldout_size,
        max_rollbacks=args.max_rollbacks,
        shape=TinyModelConfig(
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=args.intermediate_size,
        ),
        num_threads=args.threads or None,
    )
    record = json.loads((out / "warmstart.json").read_text())
    record.pop("history", None)
    print(json.dumps({"out": str(out), **record}, indent=2))
    return 0 if record["in_band"] else 1


if __name__ == "__main__":
    sys.exit(main())
