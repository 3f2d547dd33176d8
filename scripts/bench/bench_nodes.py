"""Benchmark the nodes: sampler generation, learner step, sampler cold start and memory.

    .venv/bin/python -m scripts.bench.bench_nodes                          # everything, tiny policy only
    .venv/bin/python -m scripts.bench.bench_nodes --models tiny,large      # + a random 44M-parameter Llama
    .venv/bin/python -m scripts.bench.bench_nodes --parts startup --startup-repeats 5

Parts (--parts, comma-separated; default all):

gen      Sampler generation throughput (completion tokens/s, EOS included) of `gepo.sampling.generate_groups`
         against a bare `model.generate(do_sample=True, num_return_sequences=G)` on the same model and the same
         left-padded batch (--prompts x --group-size rows), top_k=0, top_p=1, temperature 1 for both (no logits
         warpers on either side; generate returns no log-probs, ours does). Two variants: `stop` (EOS stops a row,
         --max-new-tokens) and `forced` (EOS stopping disabled on both sides by a sentinel id the model cannot
         emit, --forced-tokens per row). Calls alternate ours/bare with the order flipped every repeat; medians of
         --repeats after warm-up; ratio = ours / bare throughput (target >= 0.90).
train    Learner step: `gepo.train_step.train_step` on --groups ScoredGroups x G (default loss: GEPO) against a
         bare step on exactly the same micro-batch tensors (built once with train_step's own planner and collator,
         so padding and micro-batching are identical): forward with the same `logits_to_keep`, masked
         `F.cross_entropy` on the completion tokens, backward, gradient clipping (1.0, as train_step), AdamW step.
         Ratio = ours / bare (target <= 1.15). Then a profiled pass attributes train_step's time to its parts
         (collation, model forward, log-prob extraction, loss, entropy metric, backward, clip, optimizer, rest).
         Tiny policy: completions sampled by the policy itself (max --max-new-tokens); large model: random
         completions of --large-completion-range tokens with the model's own log-probs.
startup  Seconds from `python -m node.sampler` process start to its first accepted group on loopback: a fresh
         learner (`--max-steps 1000 --groups-per-step 1 --group-size 4 --eval-every 0`, loopback flags) per run;
         once it printed the join command, a sampler with `--batch-prompts 1 --max-groups 1` and a fresh
         --state-dir. "Accepted" is the moment the learner appends the group's digest to its ledger
         (<run-dir>/swarm/accepted.log), which it does before answering the sampler. Each repeat runs the plain
         sampler and an instrumented one (this file with --probe-sampler: node.sampler.main with timing hooks on
         SwarmNode.start, SamplerSwarm.start, wait_for_version, Sampler._load_first, HFBackend.generate, submit)
         for the breakdown. Memory: the learner's and the sampler's process trees are polled every 0.1 s from
         /proc: VmHWM (peak RSS) of the main process, per-process VmHWM of its children (hivemind DHT process,
         p2pd, reward workers), and the peak of the tree's summed PSS (shared pages counted once, so this is
         what the node really occupies; the sum of VmHWM double-counts pages a fork shares with its parent).
         Every process is started in its own session and stopped by PID (SIGTERM to the main process, then
         SIGKILL to its process group).

Times are wall clock and process CPU time; on a shared machine CPU time is the steadier of the two. torch runs with
--threads intra-op threads (default 1) in this process; the node processes keep their own defaults.
"""

from __future__ import annotations

# Only the standard library (and node.local, which uses nothing else) at module level: --probe-sampler must start
# like `python -m node.sampler` does.
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from node.local import LOOPBACK, Proc

PROBE_TAG = "BENCH_NODES_EVENT "
PARTS = ("gen", "train", "startup")
MODELS = ("tiny", "large")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ================================================================================================== models


def build_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """{model, pad, eos, prompts, vocab} for 'tiny' (the shipped policy, real prompts) or 'large' (random Llama)."""
    import torch

    if name == "tiny":
        from gepo.data import DataConfig, format_prompt, load_prompts
        from node.model_io import load_policy

        model, tok = load_policy(None)
        prompt_set = load_prompts(DataConfig())
        prompts = [format_prompt(tok, prompt_set[i].question) for i in range(args.prompts)]
        return {"model": model, "pad": tok.pad_token_id, "eos": tok.eos_token_id, "prompts": prompts,
                "vocab": model.config.vocab_size, "tokenizer": tok}
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers = args.large_hidden, args.large_layers
    cfg = LlamaConfig(vocab_size=args.large_vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    lo, hi = args.large_prompt_range
    prompts = [torch.randint(3, cfg.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.prompts)]
    return {"model": model, "pad": 0, "eos": 2, "prompts": prompts, "vocab": cfg.vocab_size, "tokenizer": None}


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ================================================================================================== 1. generation


def bench_generation(name: str, m: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from gepo.sampling import SamplingParams, generate_groups

    model, prompts, pad, G = m["model"], m["prompts"], m["pad"], args.group_size
    model.eval()
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sentinel = m["vocab"]  # an id the model cannot sample: EOS never stops a row
    rows = []
    for variant, max_new, eos in (("stop", args.max_new_tokens, m["eos"]), ("forced", args.forced_tokens, sentinel)):

        def ours(seed: int) -> int:
            params = SamplingParams(n=G, max_new_tokens=max_new, seed=seed)
            groups = generate_groups(model, prompts, params, eos=[eos], pad_token_id=pad)
            return sum(g.num_tokens for g in groups)

        def bare(seed: int) -> int:
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=G,
                                 max_new_tokens=max_new, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=pad,
                                 eos_token_id=eos)
            gen = out[:, width:]
            hit = gen == eos
            first = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, torch.full_like(hit[:, 0], gen.shape[1],
                                                                                      dtype=torch.long))
            return int(first.sum())

        res = _interleave({"ours": ours, "bare": bare}, args.repeats, warmup=2)
        row = {"model": name, "variant": variant, "max_new_tokens": max_new, "rows": len(prompts) * G}
        for k in ("ours", "bare"):
            tps = [n / t for n, t in zip(res[k]["out"], res[k]["wall"])]
            tps_cpu = [n / t for n, t in zip(res[k]["out"], res[k]["cpu"])]
            row[k] = {"tok_s": median(tps), "tok_s_cpu": median(tps_cpu), "ms": 1e3 * median(res[k]["wall"]),
                      "cpu_ms": 1e3 * median(res[k]["cpu"]), "tokens": median(res[k]["out"]),
                      "runs_tok_s": [round(x, 1) for x in tps], "runs_tok_s_cpu": [round(x, 1) for x in tps_cpu]}
        row["ratio"] = row["ours"]["tok_s"] / row["bare"]["tok_s"]
        row["ratio_cpu"] = row["ours"]["tok_s_cpu"] / row["bare"]["tok_s_cpu"]
        row["runs_ratio"] = [round(a / b, 3) for a, b in zip(row["ours"]["runs_tok_s"], row["bare"]["runs_tok_s"])]
        rows.append(row)
        print(f"  gen {name:5s} {variant:6s} ours {row['ours']['tok_s']:9.0f} tok/s ({row['ours']['ms']:.1f} ms) "
              f"bare {row['bare']['tok_s']:9.0f} tok/s ({row['bare']['ms']:.1f} ms)  ratio {row['ratio']:.2f} "
              f"(CPU-time ratio {row['ratio_cpu']:.2f})", flush=True)
    return rows


def _interleave(fns: dict[str, Callable[[int], Any]], repeats: int, warmup: int) -> dict[str, dict[str, list]]:
    """Run each fn once per round, order flipped every round; wall, CPU time and return value per run."""
    names = list(fns)
    out = {k: {"wall": [], "cpu": [], "out": []} for k in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            value = fns[k](1000 + r)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                out[k]["wall"].append(wall)
                out[k]["cpu"].append(cpu)
                out[k]["out"].append(value)
    return out


# ================================================================================================== 2. learner step


def make_groups(name: str, m: dict[str, Any], args: argparse.Namespace) -> list[Any]:
    import random

    from gepo.sampling import SamplingParams, generate_groups
    from gepo.train_step import ScoredGroup, recompute_logprobs

    rng = random.Random(0)
    model, G = m["model"], args.group_size
    prompts = (m["prompts"] * (args.groups // len(m["prompts"]) + 1))[: args.groups]
    groups = []
    if name == "tiny":  # what the policy really writes: its own completions and log-probs
        gens = generate_groups(model, prompts, SamplingParams(n=G, max_new_tokens=args.max_new_tokens, seed=7),
                               eos=[m["eos"]], pad_token_id=m["pad"])
        for gen in gens:
            groups.append(ScoredGroup(gen.prompt_ids, gen.completion_ids, gen.logprobs,
                                      [float(rng.random() < 0.5) for _ in range(G)]))
        return groups
    lo, hi = args.large_completion_range
    for p in prompts:
        comps = [[rng.randrange(3, m["vocab"]) for _ in range(rng.randint(lo, hi))] for _ in range(G)]
        lps = recompute_logprobs(model, p, comps, pad_token_id=m["pad"])
        groups.append(ScoredGroup(p, comps, lps, [float(rng.random() < 0.5) for _ in range(G)]))
    return groups


class _Timers:
    """Accumulates wall and CPU seconds per label; `wrap` returns a timed version of a function."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.depth = 0

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*a, **k):
            if self.depth:  # nested (e.g. backward inside a patched function): counted by the outer label
                return fn(*a, **k)
            self.depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.wall[label] = self.wall.get(label, 0.0) + time.perf_counter() - t0
                self.cpu[label] = self.cpu.get(label, 0.0) + time.process_time() - c0
                self.depth -= 1

        return timed


def bench_train(name: str, m: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import gepo.train_step as ts
    from gepo.config import LossConfig

    model, pad = m["model"], m["pad"]
    groups = make_groups(name, m, args)
    lens = [len(c) for g in groups for c in g.completion_ids]
    max_len = args.max_new_tokens if name == "tiny" else args.large_completion_range[1]
    cfg = ts.TrainStepConfig(loss=LossConfig(loss_type=args.loss, max_completion_length=max_len),
                             micro_batch_rows=args.micro_batch_rows, max_grad_norm=1.0)
    device = next(model.parameters()).device
    # The bare step's tensors: train_step's own plan and collation, built once, outside the timing.
    rows = [ts._Row(g.prompt_ids, c, lp, 0.0, gi) for gi, g in enumerate(groups)
            for c, lp in zip(g.completion_ids, g.sampler_logprobs)]
    batches = [ts._collate(mb, pad, device) for mb in ts._plan_micro_batches(rows, cfg, 0)]
    step_tokens = sum(lens)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_ours = torch.optim.AdamW(params, lr=1e-6)
    opt_bare = torch.optim.AdamW(params, lr=1e-6)

    def ours(i: int) -> None:
        ts.train_step(model, opt_ours, groups, cfg, pad_token_id=pad, current_version=0, step_index=i)

    def bare(i: int, timers: _Timers | None = None) -> None:
        t = timers.wrap if timers else (lambda _l, f: f)
        model.train()
        opt_bare.zero_grad(set_to_none=True)
        for b in batches:
            ids = b["completion_ids"]
            out = t("model forward", model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                             position_ids=b["position_ids"], logits_to_keep=ids.shape[1] + 1,
                                             use_cache=False)
            logits = out.logits[:, :-1, :]

            def ce():
                # flattened: faster on CPU than cross_entropy over the (B, V, L) transpose
                nll = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
                return (nll * b["completion_mask"].flatten()).sum() / step_tokens

            loss = t("log-probs + loss", ce)()
            t("backward", loss.backward)()
        t("clip", torch.nn.utils.clip_grad_norm_)(params, 1.0)
        t("optimizer", opt_bare.step)()
        opt_bare.zero_grad(set_to_none=True)

    res = _interleave({"ours": ours, "bare": bare}, args.repeats, warmup=2)
    out: dict[str, Any] = {
        "model": name, "params": n_params(model), "rows": len(rows), "micro_batches": len(batches),
        "completion_tokens": step_tokens, "completion_len_min": min(lens), "completion_len_max": max(lens),
        "completion_len_mean": step_tokens / len(lens), "prompt_len_max": max(len(g.prompt_ids) for g in groups),
        "loss": args.loss,
    }
    for k in ("ours", "bare"):
        out[k] = {"ms": 1e3 * median(res[k]["wall"]), "cpu_ms": 1e3 * median(res[k]["cpu"]),
                  "runs_ms": [round(1e3 * x, 1) for x in res[k]["wall"]],
                  "runs_cpu_ms": [round(1e3 * x, 1) for x in res[k]["cpu"]]}
    out["ratio"] = out["ours"]["ms"] / out["bare"]["ms"]
    out["ratio_cpu"] = out["ours"]["cpu_ms"] / out["bare"]["cpu_ms"]
    out["runs_ratio_cpu"] = [round(a / b, 3) for a, b in zip(out["ours"]["runs_cpu_ms"], out["bare"]["runs_cpu_ms"])]
    print(f"  train {name:5s} ours {out['ours']['ms']:8.1f} ms (CPU {out['ours']['cpu_ms']:.1f})  bare "
          f"{out['bare']['ms']:8.1f} ms (CPU {out['bare']['cpu_ms']:.1f})  ratio {out['ratio']:.3f} "
          f"(CPU-time ratio {out['ratio_cpu']:.3f})", flush=True)
    out["profile"] = profile_train(model, groups, cfg, pad, opt_ours, bare, args)
    return out


def profile_train(model, groups, cfg, pad, opt, bare, args) -> dict[str, dict[str, float]]:
    """Per-part CPU ms of train_step and of the bare step (median over --repeats profiled steps each)."""
    import torch

    import gepo.train_step as ts

    parts = {"_collate": "collate", "completion_logits": "model forward", "token_logprobs": "log-prob extraction",
             "compute_loss": "loss (compute_loss)", "token_entropy": "entropy metric",
             "group_advantages": "advantages", "_merge_metrics": "metrics merge",
             "_plan_micro_batches": "micro-batch plan"}
    saved = {a: getattr(ts, a) for a in parts}
    saved_backward, saved_clip, saved_step = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_, opt.step
    samples: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
    try:
        for r in range(args.profile_repeats + 1):
            for which in ("ours", "bare"):
                timers = _Timers()
                c0 = time.process_time()
                if which == "ours":
                    for attr, label in parts.items():
                        setattr(ts, attr, timers.wrap(label, saved[attr]))
                    torch.Tensor.backward = timers.wrap("backward", saved_backward)
                    torch.nn.utils.clip_grad_norm_ = timers.wrap("clip", saved_clip)
                    opt.step = timers.wrap("optimizer", saved_step)
                    try:
                        ts.train_step(model, opt, groups, cfg, pad_token_id=pad, current_version=0, step_index=r)
                    finally:
                        for attr in parts:
                            setattr(ts, attr, saved[attr])
                        torch.Tensor.backward = saved_backward
                        torch.nn.utils.clip_grad_norm_ = saved_clip
                        del opt.step
                else:
                    bare(r, timers)
                total = time.process_time() - c0
                if r == 0:
                    continue  # warm-up
                row = {k: 1e3 * v for k, v in timers.cpu.items()}
                row["rest"] = 1e3 * total - sum(row.values())
                row["total"] = 1e3 * total
                samples[which].append(row)
    finally:
        torch.Tensor.backward = saved_backward
        torch.nn.utils.clip_grad_norm_ = saved_clip
    return {which: {k: median([s.get(k, 0.0) for s in rows]) for k in rows[0]} for which, rows in samples.items()}


# ================================================================================================== 3. startup


class Node(Proc):
    """A node process (:class:`node.local.Proc`: own session, output collected, stopped by PID) whose probe events
    (lines tagged ``PROBE_TAG`` by ``--probe-sampler``) are kept apart from its output."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.t_spawn = time.time()
        self.events: dict[str, float] = {}
        self.event_data: dict[str, dict[str, Any]] = {}
        super().__init__(args, log_path, env)

    def on_line(self, line: str) -> None:
        if line.startswith(PROBE_TAG):
            ev = json.loads(line[len(PROBE_TAG):])
            self.events.setdefault(ev["event"], ev["t"])
            self.event_data.setdefault(ev["event"], ev)
            return
        super().on_line(line)


def proc_status_kib(pid: int, field: str = "VmHWM") -> int | None:
    """A memory field of /proc/PID/status in KiB: VmHWM (peak resident set), VmRSS (resident now); None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return None


def _read_pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, cmdline) for every visible process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            table[int(entry)] = (int(fields[1]), int(fields[2]), cmd)
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return table


def _role(cmd: str, main_cmd: str) -> str:
    if "p2pd" in cmd:
        return "p2pd (libp2p daemon)"
    if "forkserver" in cmd:
        return "reward forkserver/workers"
    if "resource_tracker" in cmd:
        return "multiprocessing resource tracker"
    if cmd == main_cmd:
        return "hivemind DHT process (fork)"
    return "other: " + cmd[:60]


class TreeMemory:
    """Polls the process trees of some root PIDs: per-process VmHWM and the peak of the summed PSS."""

    def __init__(self, period: float = 0.1) -> None:
        self.roots: dict[str, int] = {}
        self.hwm: dict[str, dict[int, tuple[int, str]]] = {}
        self.pss_peak: dict[str, int] = {}
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, label: str, pid: int) -> None:
        self.roots[label] = pid
        self.hwm.setdefault(label, {})
        self.pss_peak.setdefault(label, 0)

    def start(self) -> "TreeMemory":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def tree(self, root: int, table: dict[int, tuple[int, int, str]]) -> list[int]:
        members = {root} | {pid for pid, (_, pgid, _) in table.items() if pgid == root}
        grew = True
        while grew:  # descendants that left the process group
            grew = False
            for pid, (ppid, _, _) in table.items():
                if ppid in members and pid not in members:
                    members.add(pid)
                    grew = True
        return [p for p in members if p in table]

    def sample(self) -> None:
        table = _proc_table()
        for label, root in list(self.roots.items()):
            if root not in table:
                continue
            main_cmd = table[root][2]
            pss_sum = 0
            for pid in self.tree(root, table):
                hwm = proc_status_kib(pid)
                if hwm is not None:
                    role = "main process" if pid == root else _role(table[pid][2], main_cmd)
                    prev = self.hwm[label].get(pid, (0, role))[0]
                    self.hwm[label][pid] = (max(prev, hwm), role)
                pss = _read_pss(pid)
                pss_sum += pss or 0
            self.pss_peak[label] = max(self.pss_peak[label], pss_sum)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def report(self, label: str) -> dict[str, Any]:
        procs = self.hwm.get(label, {})
        by_role: dict[str, list[int]] = {}
        for hwm, role in procs.values():
            by_role.setdefault(role, []).append(hwm)
        return {
            "main_vmhwm_mib": by_role.get("main process", [0])[0] / 1024,
            "children_vmhwm_mib": {r: [round(v / 1024, 1) for v in vs] for r, vs in by_role.items()
                                   if r != "main process"},
            "sum_vmhwm_mib": sum(h for h, _ in procs.values()) / 1024,
            "peak_tree_pss_mib": self.pss_peak.get(label, 0) / 1024,
        }


def _node_env() -> dict[str, str]:
    # No model hub on these machines: a hub lookup would stall on retries. The sampler never needs one.
    return dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


PHASES = [  # (label, start event, end event) of the instrumented sampler
    ("interpreter start", "spawn", "python_up"),
    ("imports (torch, transformers, hivemind, node)", "python_up", "imports"),
    ("DHT join: args, identity, p2pd daemon up", "imports", "p2pd_started"),
    ("DHT join: dial the bootstrap peer", "p2pd_started", "bootstrap_dialed"),
    ("DHT join: DHT process forked and ready", "bootstrap_dialed", "dht_joined"),
    ("learner found (heartbeat read)", "dht_joined", "learner_found"),
    ("weights fetched (manifest + chunks)", "learner_found", "weights_fetched"),
    ("model built (run.json, from_pretrained)", "weights_fetched", "model_built"),
    ("first generation (prompt + generate_groups)", "model_built", "first_generation"),
    ("sign + outbox + delivery + ack", "first_generation", "accepted"),
]


def startup_run(i: int, probe: bool, tmp: Path, args: argparse.Namespace, mem: TreeMemory) -> dict[str, Any]:
    env = _node_env()
    run_dir = tmp / f"learner-{i}-{'probe' if probe else 'plain'}"
    learner = Node(["-m", "node.learner", "--run-dir", str(run_dir), "--run-id", f"bench{i}", "--max-steps", "1000",
                    "--groups-per-step", "1", "--group-size", "4", "--eval-every", "0", *LOOPBACK],
                   tmp / f"{run_dir.name}.log", env)
    sampler = None
    tag = f"{i}-{'probe' if probe else 'plain'}"
    try:
        mem.add(f"learner-{tag}", learner.popen.pid)
        join = learner.wait_for(r"python -m node\.sampler (.+)", args.timeout).group(1).split()
        learner.wait_for(r"step 0/", args.timeout)  # its loop is running: the first publish is done
        time.sleep(args.settle)
        ledger = run_dir / "swarm" / "accepted.log"
        module = ["-m", "scripts.bench.bench_nodes", "--probe-sampler"] if probe else ["-m", "node.sampler"]
        sampler = Node([*module, *join, "--state-dir", str(tmp / f"sampler-{tag}"), "--batch-prompts", "1",
                        "--max-groups", "1", *LOOPBACK], tmp / f"sampler-{tag}.log", env)
        mem.add(f"sampler-{tag}", sampler.popen.pid)
        deadline = time.monotonic() + args.timeout
        t_accepted = None
        while time.monotonic() < deadline:
            if ledger.is_file() and ledger.stat().st_size > 0:
                t_accepted = time.time()
                break
            if sampler.popen.poll() is not None and not (ledger.is_file() and ledger.stat().st_size > 0):
                raise RuntimeError(f"sampler exited ({sampler.popen.returncode}) before a group was accepted:\n"
                                   + sampler.output[-3000:])
            time.sleep(0.005)
        if t_accepted is None:
            raise RuntimeError(f"no accepted group within {args.timeout}s:\n" + sampler.output[-3000:])
        cpu_main, cpu_tree = _tree_cpu(sampler.popen.pid, mem)
        # Let the learner train on it and publish the next version, and the sampler drain and exit.
        _wait_step(run_dir, 1, args.timeout)
        try:
            sampler.popen.wait(args.timeout)
        except subprocess.TimeoutExpired:
            pass
        mem.sample()
        events = {"spawn": sampler.t_spawn, **sampler.events, "accepted": t_accepted}
        cpu = {k: v["cpu"] for k, v in sampler.event_data.items()}
        cpu["accepted"] = cpu_main
        return {"total_s": t_accepted - sampler.t_spawn, "probe": probe, "events": events, "cpu_events": cpu,
                "cpu_main_s": cpu_main, "cpu_tree_s": cpu_tree,
                "model_build_import_s": sampler.event_data.get("model_built", {}).get("import_s"),
                "sampler_exit": sampler.popen.returncode, "step1": _first_step(run_dir)}
    finally:
        for node in (sampler, learner):
            if node is not None:
                node.stop()


def _tree_cpu(root: int, mem: TreeMemory) -> tuple[float, float]:
    """(CPU seconds of the main process, of its whole tree incl. reaped children) from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    main = tree = 0.0
    for pid in mem.tree(root, _proc_table()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        utime, stime, cutime, cstime = (int(x) / tick for x in fields[11:15])
        tree += utime + stime + cutime + cstime
        if pid == root:
            main = utime + stime
    return main, tree


def _wait_step(run_dir: Path, step: int, timeout: float) -> None:
    """Until metrics.jsonl has `step` (the status line is throttled to one per 10 s, the metrics file is not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step") == step for r in _metrics(run_dir)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the learner did not finish step {step} within {timeout:.0f}s")


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    except OSError:
        pass
    return out


def _first_step(run_dir: Path) -> dict[str, Any]:
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step") == 1:
                return {"step_time_s": rec.get("step_time_s"), "num_tokens": rec.get("num_tokens")}
    except (OSError, ValueError):
        pass
    return {}


def _leftovers(mem: TreeMemory) -> list[str]:
    """Processes seen in a node's tree that are still alive in that node's process group (should be none)."""
    time.sleep(0.5)
    table = _proc_table()
    roots = set(mem.roots.values())
    return [f"{pid} {table[pid][2][:80]}" for procs in mem.hwm.values() for pid in procs
            if pid in table and table[pid][1] in roots]


def bench_startup(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    mem = TreeMemory().start()
    runs = []
    try:
        for i in range(args.startup_repeats):
            for probe in ((False, True) if i % 2 == 0 else (True, False)):
                r = startup_run(i, probe, tmp, args, mem)
                runs.append(r)
                extra = ""
                if probe:
                    ev = r["events"]
                    extra = " | " + ", ".join(f"{lbl.split(' (')[0]} {ev[b2] - ev[a]:.2f}"
                                              for lbl, a, b2 in PHASES if a in ev and b2 in ev)
                print(f"  startup run {i} {'probe' if probe else 'plain'}: CPU main {r['cpu_main_s']:.2f} s, tree "
                      f"{r['cpu_tree_s']:.2f} s", flush=True)
                print(f"  startup run {i} {'probe' if probe else 'plain'}: {r['total_s']:.2f} s to first accepted "
                      f"group{extra}", flush=True)
    finally:
        mem.stop()
        leftovers = _leftovers(mem)
        if leftovers:
            print(f"  WARNING: processes still alive after stopping: {leftovers}", flush=True)
        if args.keep_logs:
            dest = Path(args.keep_logs)
            dest.mkdir(parents=True, exist_ok=True)
            for p in tmp.glob("*.log"):
                shutil.copy(p, dest / p.name)
        shutil.rmtree(tmp, ignore_errors=True)
    plain = [r["total_s"] for r in runs if not r["probe"]]
    probed = [r for r in runs if r["probe"]]
    phases, phases_cpu = {}, {}
    for label, a, b in PHASES:
        vals = [r["events"][b] - r["events"][a] for r in probed if a in r["events"] and b in r["events"]]
        phases[label] = median(vals)
        cpus = [r["cpu_events"][b] - r["cpu_events"].get(a, 0.0) for r in probed
                if b in r["cpu_events"] and (a in r["cpu_events"] or a == "spawn")]
        phases_cpu[label] = median(cpus)
    memory = {}
    for role in ("learner", "sampler"):
        reps = [mem.report(k) for k in mem.roots if k.startswith(role)]
        memory[role] = {
            "main_vmhwm_mib": median([r["main_vmhwm_mib"] for r in reps]),
            "main_vmhwm_mib_max": max(r["main_vmhwm_mib"] for r in reps),
            "sum_vmhwm_mib": median([r["sum_vmhwm_mib"] for r in reps]),
            "peak_tree_pss_mib": median([r["peak_tree_pss_mib"] for r in reps]),
            "children_vmhwm_mib_first_run": reps[0]["children_vmhwm_mib"],
        }
    return {"leftover_processes": leftovers, "plain_total_s": plain, "plain_median_s": median(plain),
            "probe_total_s": [r["total_s"] for r in probed], "probe_median_s": median([r["total_s"] for r in probed]),
            "phases_median_s": phases, "phases_cpu_median_s": phases_cpu,
            "model_build_import_median_s": median([r["model_build_import_s"] for r in probed
                                                   if r["model_build_import_s"] is not None]),
            "cpu_main_median_s": median([r["cpu_main_s"] for r in runs]),
            "cpu_tree_median_s": median([r["cpu_tree_s"] for r in runs]),
            "memory": memory, "runs": runs,
            "learner_step1_s": [r["step1"].get("step_time_s") for r in runs]}


# ================================================================================================== the probe


def probe_sampler(argv: list[str]) -> int:
    """`python -m node.sampler ARGV` with timing hooks: prints one PROBE_TAG json line per event.

    Each event carries the wall time and this process's CPU time (all its threads; not the DHT child or p2pd).
    `model_built` also carries the seconds spent importing modules (first use of transformers' model code) while
    the model was built, measured on importlib's `_find_and_load` in the main thread.
    """
    import importlib._bootstrap as bootstrap

    def emit(event: str, **extra: Any) -> None:
        rec = {"event": event, "t": time.time(), "cpu": time.process_time(), **extra}
        sys.stdout.write(PROBE_TAG + json.dumps(rec) + "\n")
        sys.stdout.flush()

    emit("python_up")
    import node.sampler as ns
    from node import dht, sampler_swarm

    emit("imports")

    def after(owner: Any, attr: str, event: str) -> None:
        original = getattr(owner, attr)

        def hooked(*a, **k):
            result = original(*a, **k)
            emit(event)
            return result

        setattr(owner, attr, hooked)

    def after_async(owner: Any, attr: str, event: str) -> None:
        original = getattr(owner, attr)

        async def hooked(*a, **k):
            result = await original(*a, **k)
            emit(event)
            return result

        setattr(owner, attr, hooked)

    main_thread = threading.get_ident()
    import_s = [0.0]
    depth = [0]
    find_and_load = bootstrap._find_and_load

    def timed_find_and_load(name, import_):
        if depth[0] or threading.get_ident() != main_thread:
            return find_and_load(name, import_)
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return find_and_load(name, import_)
        finally:
            import_s[0] += time.perf_counter() - t0
            depth[0] -= 1

    load_first = ns.Sampler._load_first

    def hooked_load_first(self, *a, **k):
        bootstrap._find_and_load = timed_find_and_load
        try:
            return load_first(self, *a, **k)
        finally:
            bootstrap._find_and_load = find_and_load
            emit("model_built", import_s=import_s[0])

    ns.Sampler._load_first = hooked_load_first
    after_async(dht.SwarmNode, "_create_p2p", "p2pd_started")
    after_async(dht.SwarmNode, "_check_bootstrap", "bootstrap_dialed")
    after(dht.SwarmNode, "start", "dht_joined")
    after(sampler_swarm.SamplerSwarm, "start", "learner_found")
    after(sampler_swarm.SamplerSwarm, "wait_for_version", "weights_fetched")
    after(ns.HFBackend, "generate", "first_generation")
    after(sampler_swarm.SamplerSwarm, "submit", "submitted")
    return ns.main(argv)


# ================================================================================================== report


def print_summary(result: dict[str, Any]) -> None:
    print("\n=== summary ===")
    for row in result.get("gen", []):
        print(f"gen   {row['model']:5s} {row['variant']:6s} ({row['rows']} rows, <= {row['max_new_tokens']} tok): "
              f"ours {row['ours']['tok_s']:.0f} tok/s, bare generate {row['bare']['tok_s']:.0f} tok/s -> ratio "
              f"{row['ratio']:.2f} (CPU {row['ratio_cpu']:.2f}); target >= 0.90")
        print(f"      runs tok/s ours {row['ours']['runs_tok_s']}, bare {row['bare']['runs_tok_s']}; "
              f"per-round ratios {row['runs_ratio']}")
    for t in result.get("train", []):
        print(f"train {t['model']:5s}: train_step {t['ours']['ms']:.1f} ms, bare {t['bare']['ms']:.1f} ms -> ratio "
              f"{t['ratio']:.3f} (CPU {t['ratio_cpu']:.3f}); target <= 1.15")
        print(f"      runs ms ours {t['ours']['runs_ms']}, bare {t['bare']['runs_ms']}; CPU ms ours "
              f"{t['ours']['runs_cpu_ms']}, bare {t['bare']['runs_cpu_ms']}; per-round CPU ratios {t['runs_ratio_cpu']}")
        prof = t["profile"]
        keys = sorted(set(prof["ours"]) | set(prof["bare"]), key=lambda k: -prof["ours"].get(k, 0.0))
        print("      CPU ms per part:  " + ", ".join(f"{k} {prof['ours'].get(k, 0):.1f}/{prof['bare'].get(k, 0):.1f}"
                                                     for k in keys) + "   (train_step/bare)")
    s = result.get("startup")
    if s:
        print(f"startup: plain sampler {s['plain_median_s']:.2f} s median (runs {[round(x, 2) for x in s['plain_total_s']]}),"
              f" instrumented {s['probe_median_s']:.2f} s; target <= 20 s")
        print(f"      CPU to first accepted group: sampler main process {s['cpu_main_median_s']:.2f} s, whole tree "
              f"(DHT process, p2pd) {s['cpu_tree_median_s']:.2f} s (medians over all runs)")
        print(f"      {'phase (instrumented runs, medians)':56s} {'wall s':>7s} {'CPU s':>7s}")
        for k, v in s["phases_median_s"].items():
            print(f"      {k:56s} {v:7.2f} {s['phases_cpu_median_s'][k]:7.2f}")
        print(f"      of which imports during the model build: {s['model_build_import_median_s']:.2f} s")
        for role, m in s["memory"].items():
            print(f"memory {role}: main VmHWM {m['main_vmhwm_mib']:.0f} MiB, tree peak PSS {m['peak_tree_pss_mib']:.0f} "
                  f"MiB, sum of VmHWM {m['sum_vmhwm_mib']:.0f} MiB; children {m['children_vmhwm_mib_first_run']}")


def machine_note(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": threads, "loadavg": load}


def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe-sampler"]:
        return probe_sampler(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m scripts.bench.bench_nodes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=_csv(PARTS), default=list(PARTS), help="which parts run (default: gen,train,startup)")
    ap.add_argument("--models", type=_csv(MODELS), default=["tiny"],
                    help="models for gen/train: tiny (shipped policy) and/or large (random Llama, see --large-*)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per variant for gen/train (median reported)")
    ap.add_argument("--profile-repeats", type=int, default=3, help="train: profiled steps per side (median)")
    ap.add_argument("--startup-repeats", type=int, default=3, help="startup: runs of each (plain, instrumented) sampler")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads in this process (default 1: steadier on a shared 2-core machine)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="completion cap (gen 'stop' variant, tiny train)")
    ap.add_argument("--forced-tokens", type=int, default=64, help="gen 'forced' variant: tokens per row, EOS ignored")
    ap.add_argument("--groups", type=int, default=8, help="train: ScoredGroups per step")
    ap.add_argument("--micro-batch-rows", type=int, default=16, help="train: rows per micro-batch (learner default)")
    ap.add_argument("--loss", default="gepo", help="train: loss type (gepo.config.LOSS_TYPES)")
    ap.add_argument("--large-hidden", type=int, default=512, help="large model: hidden size (heads of 64)")
    ap.add_argument("--large-layers", type=int, default=8, help="large model: layers")
    ap.add_argument("--large-vocab", type=int, default=32000, help="large model: vocabulary")
    ap.add_argument("--large-prompt-range", type=_pair, default=(24, 64), help="large model: prompt lengths LO,HI")
    ap.add_argument("--large-completion-range", type=_pair, default=(16, 64),
                    help="large model, train: completion lengths LO,HI (uniform)")
    ap.add_argument("--timeout", type=float, default=180.0, help="startup: seconds to wait for each event")
    ap.add_argument("--settle", type=float, default=1.0, help="startup: seconds between learner ready and sampler start")
    ap.add_argument("--keep-logs", default=None, metavar="DIR", help="startup: copy the node logs here")
    ap.add_argument("--json", default=None, metavar="OUT.json", help="also write all results as JSON")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    from node.metrics import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"machine": machine_note(args.threads), "args": {k: v for k, v in vars(args).items()}}
    print(f"machine: {result['machine']}", flush=True)
    if "gen" in args.parts or "train" in args.parts:
        for name in args.models:
            m = build_model(name, args)
            print(f"model {name}: {n_params(m['model']) / 1e6:.2f} M parameters, vocab {m['vocab']}", flush=True)
            if "gen" in args.parts:
                result.setdefault("gen", []).extend(bench_generation(name, m, args))
            if "train" in args.parts:
                result.setdefault("train", []).append(bench_train(name, m, args))
            del m
    if "startup" in args.parts:
        result["startup"] = bench_startup(args)
    result["machine"]["loadavg_end"] = os.getloadavg()
    print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
