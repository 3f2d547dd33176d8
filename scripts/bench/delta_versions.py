"""Real policy versions for the delta benchmark: N GEPO learner steps on SmolLM2-135M, each published copy saved.

    flock /tmp/smollm2.lock .venv/bin/python -m scripts.bench.delta_versions --out /tmp/smol-versions --steps 20

The learner keeps fp32 master weights (AdamW, lr 1e-6) and publishes the master rounded to bf16, as a real learner
does. The steps are real: rollouts sampled from the current model, rewards from the learner's reward scorer
(math-verify), GEPO through gepo.train_step.train_step, all driven by gepo.staleness.run_staleness with no
staleness. Version v (the policy before step v) is written as ``v{v:04d}.bin``: the published tensors (tied
tensors once, as node.model_io.policy_tensors lists them) concatenated in order, with ``index.json`` naming
them. Versions are written as they are made, so a run stopped early still leaves a usable prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("delta_versions")


def published_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the learner publishes: the fp32 master weights rounded to bf16 (tied tensors listed once)."""
    from node.model_io import policy_tensors

    return {name: t.to(torch.bfloat16).contiguous() for name, t in policy_tensors(model).items()}


def write_version(out: Path, version: int, tensors: dict[str, torch.Tensor]) -> None:
    index = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]
    if not (out / "index.json").exists():
        (out / "index.json").write_text(json.dumps(index))
    tmp = out / f"v{version:04d}.bin.partial"
    with open(tmp, "wb") as f:
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.rename(out / f"v{version:04d}.bin")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/smol-versions", help="folder for the versions (default: %(default)s)")
    p.add_argument("--model", default="models/smollm2-135m-instruct",
                   help="converted SmolLM2 folder, converted first if missing (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="learner steps (versions 0..steps) (default: %(default)s)")
    p.add_argument("--groups", type=int, default=4, help="groups per step (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=4, help="completions per group (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    from gepo.staleness import StalenessConfig, run_staleness
    from node.model_io import load_policy
    from scripts.convert_smollm2 import convert

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_policy(str(convert(args.model)), dtype=torch.float32)  # fp32 master weights
    cfg = StalenessConfig(loss_type="gepo", max_lag=0, delay_kind="none", steps=args.steps,
                          groups_per_step=args.groups, group_size=args.group_size, lr=args.lr,
                          max_new_tokens=args.max_new_tokens, micro_batch_rows=8, difficulty=1,
                          eval_every=10**6, eval_size=4)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step(t, groups, history):  # the model is version t here, just before step t
        write_version(out, t, published_copy(model))
        now = time.perf_counter()
        if t > 0:
            step_times.append(now - last[0])
        last[0] = now
        log.info("version %d written (%d groups, rewards %s)", t, len(groups),
                 [round(sum(g.rewards) / len(g.rewards), 2) for g in groups])

    result = run_staleness(cfg, model=model, tokenizer=tokenizer, on_step=on_step)
    write_version(out, args.steps, published_copy(model))
    train_s = [s.get("step_time_s") for s in result["steps"]]
    (out / "run.json").write_text(json.dumps({"config": cfg.to_dict(), "steps": result["steps"],
                                              "step_wall_s": step_times, "train_s": train_s}, default=str))
    log.info("done: %d versions in %s", args.steps + 1, out)


if __name__ == "__main__":
    main()
