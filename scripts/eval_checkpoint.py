"""Held-out evaluation of a learner run's newest checkpoint, exactly as the learner's own `--eval-every` does it.

    python -m scripts.eval_checkpoint --config recipes/smollm2-135m-word-sums.yaml --run-dir runs/x/learner

Takes the learner's flags (recipe, model, data, eval split, --eval-k, ...), loads the checkpoint of --run-dir as
`--resume` would, runs `Learner.evaluate` once and prints the metrics as one JSON line (also written to --out). For
a run stopped between two evaluations. It starts no swarm, trains and publishes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from node.cli import dataclass_from_args, parse_with_recipe, setup_process
from node.errors import EXIT_USAGE, fail


def main(argv: list[str] | None = None) -> int:
    from gepo.config import LossConfig
    from gepo.data import DataConfig
    from node.checkpoint import latest_checkpoint
    from node.intake import IntakeConfig
    from node.learner import Learner, LearnerConfig, build_parser
    from node.metrics import quiet_transformers
    from node.policy_setup import PolicyConfig

    parser = build_parser()
    parser.prog = "python -m scripts.eval_checkpoint"
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics JSON here (default: none)")
    args = parse_with_recipe(parser, argv)
    try:
        # online: the learner samples nothing and starts no swarm until run(), which is never called here
        cfg = dataclasses.replace(dataclass_from_args(LearnerConfig, args), resume=True, online=True,
                                  report_to=["none"], tensorboard=False)
        if cfg.eval_every <= 0:
            raise ValueError("--eval-every 0 turns the held-out evaluation off; nothing to do")
        checkpoint = latest_checkpoint(cfg.run_dir)
        if checkpoint is None:
            raise ValueError(f"{cfg.run_dir}: no checkpoint to evaluate")
        learner = Learner(cfg, dataclass_from_args(LossConfig, args), dataclass_from_args(DataConfig, args,
                                                                                          prefix="data_"),
                          intake=dataclass_from_args(IntakeConfig, args), policy=dataclass_from_args(PolicyConfig, args))
    except ValueError as exc:
        return fail(exc, EXIT_USAGE)
    setup_process(args)
    quiet_transformers()
    try:
        metrics = {"checkpoint": str(checkpoint), "step": learner.state.step, **learner.evaluate()}
    finally:
        learner.close()
    line = json.dumps(metrics)
    print(line, flush=True)
    if args.out is not None:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
