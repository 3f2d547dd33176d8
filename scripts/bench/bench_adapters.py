"""Bytes per policy version with LoRA: a LoRA adapter version (--publish-adapter) vs the full merged bf16 version vs
the full version's lossless delta from the previous one (protocol.delta, the default codec), and the adapter
version's own delta from the previous adapter version.

    flock /tmp/bench.lock nice -n 15 .venv/bin/python -m scripts.bench.bench_adapters --ranks 8 16 --steps 6
    flock /tmp/smollm2.lock nice -n 15 .venv/bin/python -m scripts.bench.bench_adapters \\
        --model models/smollm2-135m-instruct --ranks 8 16 --steps 6 --json adapters.json

Per rank: a fresh peft LoRA policy (all-linear, alpha = 2r, fp32 adapters over the frozen base) takes ``--steps``
real AdamW steps (lr ``--lr``) on the next-token loss of synthetic-arithmetic prompts with their answers: real
gradients, not RL rollouts (the bytes depend on how much every weight moves per step, not on the objective). After
every step the script lays out, exactly as the learner publishes them (node/adapters.py, protocol/manifest.py):

* the full version: the merged policy rounded to bf16, with the model's config and tokenizer files;
* its delta from the previous full version (XOR + byte planes + zstd-1);
* the adapter version: lora_A / lora_B of every target in bf16 (no files: they come with the base);
* its delta from the previous adapter version;

and, after the last step, both kinds' cumulative delta from the first version (a sampler ``--steps - 1`` behind).

Sizes are deterministic for full and adapter versions; deltas are medians over the steps after the first.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from node.adapters import AdapterVersions  # noqa: E402
from node.model_io import policy_files  # noqa: E402
from node.policy_setup import PolicyConfig, build_policy, published_tensors  # noqa: E402
from protocol.delta import encode_delta  # noqa: E402
from protocol.manifest import build_manifest  # noqa: E402

BASE_DIGEST = b"\x00" * 32  # the base's manifest digest: its value does not change any size


def lm_batch(tokenizer, n: int, seed: int) -> dict:
    from gepo.data import DataConfig, load_prompts

    prompts = load_prompts(DataConfig(size=1000, seed=seed))
    texts = [f"{p.question} {p.answer}" for p in list(prompts)[:n]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def measure(model: str | None, rank: int, steps: int, lr: float, batch_rows: int) -> dict:
    torch.manual_seed(rank)
    cfg = PolicyConfig(lora_r=rank, lora_alpha=2 * rank)
    policy, tokenizer = build_policy(cfg, model, None, "cpu", torch.float32)
    files = policy_files(policy.get_base_model(), tokenizer)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    adapters = AdapterVersions(torch.bfloat16)
    adapters.published(0, BASE_DIGEST, policy)
    prev_full = prev_adapter = first_full = first_adapter = None
    rows = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        policy.train()
        loss = policy(**lm_batch(tokenizer, batch_rows, seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_s = time.perf_counter() - t0
        full = build_manifest(published_tensors(policy, torch.bfloat16), run_id="bench", version=step, files=files,
                              created_at=0.0)
        tensors, info = adapters.tensors(policy)
        adapter = build_manifest(tensors, run_id="bench", version=step, adapter=info, created_at=0.0)
        row = {"step": step, "loss": round(loss.item(), 4), "step_s": round(step_s, 2), "full_bytes": full[0].total_size,
               "adapter_bytes": adapter[0].total_size}
        if prev_full is not None:
            row["full_delta_bytes"] = encode_delta(*prev_full, *full)[0].compressed_size
            row["adapter_delta_bytes"] = encode_delta(*prev_adapter, *adapter)[0].compressed_size
        else:
            first_full, first_adapter = full, adapter
        prev_full, prev_adapter = full, adapter
        rows.append(row)
        print(json.dumps(row), flush=True)
    later = rows[1:]
    full_bytes = rows[0]["full_bytes"]
    summary = {
        "rank": rank, "targets": len(info.targets), "lr": lr, "steps": steps,
        "full_bytes": full_bytes, "adapter_bytes": rows[0]["adapter_bytes"],
        "full_delta_bytes_median": statistics.median(r["full_delta_bytes"] for r in later),
        "adapter_delta_bytes_median": statistics.median(r["adapter_delta_bytes"] for r in later),
    }
    # catching up from the first version to the last: the cumulative delta (as from a keyframe) grows with the lag
    summary["full_cumulative_bytes"] = encode_delta(*first_full, *prev_full)[0].compressed_size
    summary["adapter_cumulative_bytes"] = encode_delta(*first_adapter, *prev_adapter)[0].compressed_size
    summary["adapter_vs_full"] = summary["adapter_bytes"] / full_bytes
    summary["full_delta_vs_full"] = summary["full_delta_bytes_median"] / full_bytes
    summary["adapter_delta_vs_adapter"] = summary["adapter_delta_bytes_median"] / summary["adapter_bytes"]
    return {"summary": summary, "steps": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the built-in tiny policy)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the adapters")
    p.add_argument("--batch-rows", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = [measure(args.model, r, args.steps, args.lr, args.batch_rows) for r in args.ranks]
    for res in results:
        s = res["summary"]
        print(f"r={s['rank']:>2} ({s['targets']} modules): full {s['full_bytes'] / 1e6:.2f} MB, its delta "
              f"{s['full_delta_bytes_median'] / 1e6:.3f} MB ({s['full_delta_vs_full']:.2%}); adapter "
              f"{s['adapter_bytes'] / 1e6:.3f} MB ({s['adapter_vs_full']:.2%}), its delta "
              f"{s['adapter_delta_bytes_median'] / 1e6:.3f} MB ({s['adapter_delta_vs_adapter']:.0%} of the adapter); "
              f"{s['steps'] - 1} behind: full {s['full_cumulative_bytes'] / 1e6:.3f} MB, adapter "
              f"{s['adapter_cumulative_bytes'] / 1e6:.3f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model or "tiny", "results": results}, indent=1))


if __name__ == "__main__":
    main()
