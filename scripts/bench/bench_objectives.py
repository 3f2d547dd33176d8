"""Benchmark the objectives: loss+backward time per loss type, and peak memory of log-prob extraction.

    .venv/bin/python -m scripts.bench.bench_objectives [--repeats 20] [--skip-memory]

1. compute_loss + backward on (B, T) = (64, 1024) float32 log-probs (validation and metrics included), median of
   --repeats runs after warm-up, and the ratio to grpo measured in the same run.
2. Peak extra memory of token_logprobs forward + backward on (8, 1024, 32000) logits, against the logits' own size,
   and the naive log_softmax(logits / T).gather baseline. Each variant runs in a fresh subprocess; the peak is the
   process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs just before the measured work),
   minus its resident size just before; this sees every allocation torch makes on CPU, which tracemalloc does not.
   Reported twice: under glibc's default malloc (what a CPU process really holds, freed buffers it keeps included)
   and with MALLOC_MMAP_THRESHOLD_ pinned to 1 MiB (live tensors only). Time is from the default-malloc run.
Times are reported as wall clock and as process CPU time (all threads); on a shared machine the CPU time is the
steadier of the two, since it does not count waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from gepo.config import LOSS_TYPES, LossConfig
from gepo.logprobs import token_logprobs
from gepo.objectives import compute_loss

MIB = 2**20


# ---------------------------------------------------------------------------------------------- loss timing


def bench_losses(B: int, T: int, repeats: int, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    q = -torch.rand(B, T, generator=g) * 3
    logp0 = q + 0.1 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 8, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(B, generator=g)
    gids = torch.arange(B) // 8
    cfgs = {t: LossConfig(loss_type=t, max_completion_length=T) for t in LOSS_TYPES}
    wall: dict[str, list[float]] = {t: [] for t in LOSS_TYPES}
    cpu: dict[str, list[float]] = {t: [] for t in LOSS_TYPES}
    # Round-robin over the types, so machine noise (other jobs, frequency changes) hits all of them alike.
    for i in range(repeats + 2):  # two warm-up rounds
        for loss_type, cfg in cfgs.items():
            logp = logp0.clone().requires_grad_()
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = compute_loss(logp, q, mask, adv, gids, cfg)
            loss.backward()
            if i >= 2:
                wall[loss_type].append(time.perf_counter() - t0)
                cpu[loss_type].append(time.process_time() - c0)
    return {t: (statistics.median(wall[t]), statistics.median(cpu[t])) for t in LOSS_TYPES}


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_child(variant: str, dtype_name: str, B: int, T: int, V: int, chunk: int, temperature: float, repeats: int):
    """Runs in a fresh process; prints one JSON line."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    logits = torch.empty(B, T, V, dtype=dtype).normal_(0, 3).requires_grad_()  # no float32 temporary for bf16
    tokens = torch.randint(0, V, (B, T))
    logits_bytes = logits.numel() * logits.element_size()

    def step():
        if variant == "chunked":
            out = token_logprobs(logits, tokens, temperature, chunk)
        else:
            x = logits.float() / temperature
            out = torch.log_softmax(x, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            del x
        out.sum().backward()

    # The peak is taken on the first run in this fresh process: later runs start with the allocator already holding
    # freed memory, so "RSS before" is inflated and their differences understate the peak.
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    times, cpu = [time.perf_counter() - t0], [time.process_time() - c0]
    peak_extra = (_status_kib("VmHWM") - rss_before) * 1024
    for _ in range(repeats - 1):
        logits.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"peak_extra": peak_extra, "logits_bytes": logits_bytes, "time": statistics.median(times),
                      "cpu": statistics.median(cpu), "hwm_reset": reset}))  # fmt: skip


# glibc's dynamic mmap threshold lets it keep up to a few hundred MB of freed chunk buffers resident after the first
# free, which RSS counts. Pinning the threshold at 1 MiB returns every large buffer to the OS when torch frees it, so
# the high-water mark is that of live tensors: the algorithm's own peak (and what a caching GPU allocator would hold).
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(MIB)}


def bench_memory(B, T, V, chunk, temperature, repeats) -> list[dict]:
    rows = []
    for dtype_name in ("fp32", "bf16"):
        for variant in ("chunked", "naive"):
            cmd = [sys.executable, "-m", "scripts.bench.bench_objectives", "--memory-child", variant, dtype_name,
                   "--B", str(B), "--T", str(T), "--V", str(V), "--chunk", str(chunk),
                   "--temperature", str(temperature), "--mem-repeats", str(repeats),
                   "--threads", str(torch.get_num_threads())]  # fmt: skip
            row = {"variant": variant, "dtype": dtype_name}
            for key, env in (("default", None), ("pinned", {**os.environ, **PINNED_MALLOC})):
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                row[key] = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per loss type (median reported)")
    ap.add_argument("--loss-B", type=int, default=64)
    ap.add_argument("--loss-T", type=int, default=1024)
    ap.add_argument("--B", type=int, default=8, help="log-prob memory benchmark: batch rows")
    ap.add_argument("--T", type=int, default=1024, help="log-prob memory benchmark: positions")
    ap.add_argument("--V", type=int, default=32000, help="log-prob memory benchmark: vocabulary")
    ap.add_argument("--chunk", type=int, default=LossConfig().logprob_chunk_rows)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--mem-repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine, OpenMP barriers of small ops "
                         "wait for descheduled threads and wall times swing 100x)")  # fmt: skip
    ap.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.B, args.T, args.V, args.chunk, args.temperature, args.mem_repeats)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, load average "
          f"{os.getloadavg()[0]:.1f} before the run")
    times = bench_losses(args.loss_B, args.loss_T, args.repeats)
    print(f"\nloss + backward, B={args.loss_B}, T={args.loss_T}, float32, median of {args.repeats}")
    print("| loss type | wall ms | vs grpo | CPU ms | vs grpo |\n|---|---:|---:|---:|---:|")
    gw, gc = times["grpo"]
    for name, (w, c) in times.items():
        print(f"| {name} | {w * 1e3:.2f} | {w / gw:.2f}x | {c * 1e3:.2f} | {c / gc:.2f}x |")

    if args.skip_memory:
        return
    rows = bench_memory(args.B, args.T, args.V, args.chunk, args.temperature, args.mem_repeats)
    print(f"\nlog-prob extraction forward + backward, B={args.B}, T={args.T}, V={args.V}, temperature "
          f"{args.temperature}, chunk {args.chunk}; peak extra RSS over the logits already held")  # fmt: skip
    print("| method | logits dtype | logits MiB | peak extra MiB (default malloc) | extra / logits | "
          "peak extra MiB (live tensors) | extra / logits | fwd+bwd wall s | CPU s |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "token_logprobs (chunked)" if r["variant"] == "chunked" else "naive log_softmax + gather"
        d, p = r["default"], r["pinned"]
        size = d["logits_bytes"]
        print(f"| {name} | {r['dtype']} | {size / MIB:.0f} | {d['peak_extra'] / MIB:.0f} | "
              f"{d['peak_extra'] / size:.2f}x | {p['peak_extra'] / MIB:.0f} | {p['peak_extra'] / size:.2f}x | "
              f"{d['time']:.2f} | {d['cpu']:.2f} |")
    if not all(r[k]["hwm_reset"] for r in rows for k in ("default", "pinned")):
        print("(VmHWM could not be reset: peaks include anything earlier in the child process)")


if __name__ == "__main__":
    main()
