"""The run part of scripts/gpu_check.sh: a learner and two samplers (HF and vLLM) on one CUDA machine, a few steps.

    python -m scripts.gpu_check --model models/smollm2-135m-instruct --out runs/gpu-check     # on a GPU
    python -m scripts.gpu_check --dry                                                        # CPU plumbing check

The learner trains with bf16 autocast over fp32 master weights (--dtype bfloat16) and publishes bf16 versions; one
sampler generates with transformers, the other with vLLM, both on the same GPU. The learner is stopped (gracefully,
with a checkpoint) once it has taken --steps steps and groups from every sampler; vLLM's engine takes a minute or
more to start, and a fast sampler alone could otherwise feed every step before the other joins. Printed at the end (and written to
OUT/summary.json): the learner's step time and trained tokens/s, each sampler's accepted tokens/s, and the peak
memory of every process (GPU: nvidia-smi, polled every second; host: the kernel's resident high-water mark).
`--dry` runs the same plumbing on the CPU with the tiny policy and two HF samplers, so it can be checked anywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from node.local import LOOPBACK, Proc, join_args, stop_all
from node.metrics import read_metrics

SYSTEM = "You are a helpful assistant. Give the final answer as a number at the end."


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class GpuMemory:
    """Peak GPU memory per process id, from `nvidia-smi --query-compute-apps` every second (in a thread)."""

    def __init__(self) -> None:
        self.peak_mb: dict[int, float] = {}
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "GpuMemory":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in out.stdout.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    pid, mb = int(parts[0]), float(parts[1])
                    self.peak_mb[pid] = max(mb, self.peak_mb.get(pid, 0.0))

    def of_tree(self, pid: int) -> float | None:
        """The largest peak among `pid` and its descendants (vLLM runs its engine in a child process)."""
        pids = {pid} | _descendants(pid)
        values = [self.peak_mb[p] for p in pids if p in self.peak_mb]
        return max(values) if values else None


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m-instruct", help="model folder for the learner")
    parser.add_argument("--out", default="runs/gpu-check", help="run folder (logs, metrics, summary.json)")
    parser.add_argument("--steps", type=int, default=6, help="learner steps")
    parser.add_argument("--dry", action="store_true", help="CPU plumbing check: tiny policy, two HF samplers")
    parser.add_argument("--timeout", type=float, default=360, help="seconds for the whole run")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    device = "cpu" if args.dry else "cuda"
    learner_cmd = ["-m", "node.learner", "--run-dir", str(out / "learner"), "--run-id", "gpu-check",
                   "--device", device, "--dtype", "bfloat16", "--lr", "1e-6", "--max-steps", "100000",
                   "--group-size", "4", "--groups-per-step", "8", "--max-new-tokens", "16" if args.dry else "64",
                   "--micro-batch-rows", "32", "--eval-every", "0", "--checkpoint-every", "100000",
                   "--reward-workers", "2", "--max-staleness", "4", "--wait-timeout", "300", *LOOPBACK]
    if args.dry:
        learner_cmd += ["--model", "tiny", "--torch-threads", "1"]
    else:
        learner_cmd += ["--model", args.model, "--system-prompt", SYSTEM, "--data-difficulty", "1"]
    backends = ["hf", "hf"] if args.dry else ["hf", "vllm"]
    procs: list[Proc] = []
    summary: dict = {"device": device, "model": "tiny" if args.dry else args.model, "steps": args.steps}
    t0 = time.monotonic()
    with GpuMemory() as gpu:
        try:
            learner = Proc(learner_cmd, out / "learner.log")
            procs.append(learner)
            join = join_args(learner, timeout=180)
            samplers = []
            for i, backend in enumerate(backends):
                cmd = ["-m", "node.sampler", *join, "--state-dir", str(out / f"sampler-{backend}-{i}"),
                       "--backend", backend, "--device", device, "--batch-prompts", "4", "--max-pending", "8",
                       *LOOPBACK]
                if backend == "vllm":
                    cmd += ["--gpu-memory-utilization", "0.25"]
                if args.dry:
                    cmd += ["--torch-threads", "1"]
                samplers.append(Proc(cmd, out / f"sampler-{backend}-{i}.log"))
            procs += samplers
            keys = [p.wait_for(r"joined as ed25519:([0-9a-f]{8})", timeout=300).group(1) for p in samplers]
            metrics_path = out / "learner" / "metrics.jsonl"
            while True:  # until --steps steps are done and every sampler's groups were trained on
                steps = [m for m in read_metrics(metrics_path) if "loss" in m] if metrics_path.is_file() else []
                totals = steps[-1].get("sampler_totals", {}) if steps else {}
                if len(steps) >= args.steps and all(totals.get(k, {}).get("accepted", 0) > 0 for k in keys):
                    break
                if learner.popen.poll() is not None or time.monotonic() - t0 > args.timeout:
                    print(f"FAILED: {len(steps)} steps, groups per sampler {[totals.get(k, {}) for k in keys]}, "
                          f"learner exit {learner.popen.returncode}\n{learner.tail()}", file=sys.stderr)
                    return 1
                time.sleep(1.0)
            wall = time.monotonic() - t0
            rss = {"learner": peak_rss_mb(learner.pid)}
            gpu_mb = {"learner": gpu.of_tree(learner.pid)}
            for i, (backend, p) in enumerate(zip(backends, samplers)):
                rss[f"sampler-{backend}-{i}"] = peak_rss_mb(p.pid)
                gpu_mb[f"sampler-{backend}-{i}"] = gpu.of_tree(p.pid)
            learner.stop(60)  # graceful: finishes its step and writes a checkpoint
        finally:
            stop_all(procs)

    steps = [m for m in read_metrics(out / "learner" / "metrics.jsonl") if "loss" in m]
    step_times = [m["step_time_s"] for m in steps]
    trained = sum(m["num_tokens"] for m in steps)
    totals = steps[-1].get("sampler_totals", {})
    window = steps[-1]["time"] - steps[0]["time"] + steps[0]["step_time_s"]  # first step's start to the last's end
    summary.update(wall_s=wall, training_window_s=window, steps=len(steps), step_time_s_median=statistics.median(step_times),
                   learner_tokens_per_s=trained / sum(step_times), peak_rss_mb=rss, peak_gpu_mb=gpu_mb,
                   losses=[m["loss"] for m in steps], samplers={})
    for i, (backend, key) in enumerate(zip(backends, keys)):
        stats_path = out / f"sampler-{backend}-{i}" / "stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        accepted = totals.get(key, {})
        summary["samplers"][f"{backend}-{i}"] = {"groups_accepted": accepted.get("accepted", 0),
                                                 "tokens_per_s": accepted.get("tokens", 0) / window,
                                                 "sent": stats.get("sent")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print(f"\n== gpu check ({device}, {summary['model']}, {len(steps)} steps in {window:.0f} s, {wall:.0f} s "
          f"with start-up) ==")
    print(f"learner  step {summary['step_time_s_median']:.2f} s (median)  {summary['learner_tokens_per_s']:.0f} "
          f"trained tokens/s  peak GPU {_mb(gpu_mb['learner'])}  peak RSS {_mb(rss['learner'])}")
    for i, backend in enumerate(backends):
        s = summary["samplers"][f"{backend}-{i}"]
        name = f"sampler-{backend}-{i}"
        print(f"{name:<16} {s['tokens_per_s']:.0f} tokens/s trained from it ({s['groups_accepted']} groups)  "
              f"peak GPU {_mb(gpu_mb[name])}  peak RSS {_mb(rss[name])}")
    ok = learner.popen.returncode == 130 and (out / "learner" / "checkpoints" / "LATEST").is_file()
    print("OK" if ok else f"FAILED: the learner's graceful stop gave exit {learner.popen.returncode}")
    return 0 if ok else 1


def _mb(value: float | None) -> str:
    return f"{value:.0f} MB" if value is not None else "n/a"


if __name__ == "__main__":
    sys.exit(main())
