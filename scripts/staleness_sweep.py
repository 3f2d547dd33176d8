"""Staleness sweep: loss types x maximum latency x seeds on the synthetic task, the tiny policy or a pretrained model.

    .venv/bin/python -m scripts.staleness_sweep                # the full sweep, 2 cells at a time, resumable
    .venv/bin/python -m scripts.staleness_sweep --report-only  # rebuild docs/STALENESS.md and the plot from results

Every cell (one loss type, one maximum latency, one seed) is a `gepo.staleness.run_staleness` run: the learner's real
`train_step` fed with groups sampled from policy versions drawn by the paper's delay model. Each finished cell is
written as one JSON file in --results-dir (named after the cell and a hash of its full config); a re-run skips the
cells whose file exists, so an interrupted sweep resumes where it stopped. At the end (and with --report-only) the
generated part of docs/STALENESS.md (between its BEGIN/END GENERATED markers; the text around them is kept) and
docs/staleness.png are rewritten from the result files of the current configuration.

A pretrained model: --policy-path models/smollm2-135m-instruct with --phrasing word --system-prompt ...
--publish-dtype bfloat16 --eval-scoring reward --eval-batch-size 50 --snapshot-dir DIR (docs/STALENESS.md, the
SmolLM2 section, has the command of its grid).

Splitting the sweep across machines or sessions: run the same command with --shard 1/2 on one and --shard 2/2 on
the other (cells are dealt round-robin), copy the result files into one --results-dir, then --report-only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LOSSES = ("grpo", "bnpo", "dr_grpo", "gspo", "gepo", "delta_l", "tis", "cispo", "m2po")
DEFAULT_LATENCIES = (0, 8, 16, 32, 64, 128, 256)
LOSS_LABELS = {"grpo": "GRPO", "bnpo": "BNPO", "dr_grpo": "Dr.GRPO", "dapo": "DAPO", "gspo": "GSPO", "gepo": "GEPO",
               "delta_l": "∆L", "tis": "TIS", "cispo": "CISPO", "m2po": "M2PO"}  # fmt: skip
# Steps per unit of maximum latency: a run lasts max(--steps, this x latency) steps, so that the truncation of the
# first steps' lags (no group predates version 0) costs about the same share of the mean lag at every latency
# (~10 %: 150 steps at 64, as the first sweep; 300 at 128; 600 at 256).
DEFAULT_STEPS_PER_LATENCY = 150 / 64
# The paper's latency table (Qwen3-8B, eval accuracy vs maximum latency 0/8/16/32/64), for reference in the docs.
PAPER_AVG_LAG = {0: 0.0, 8: 3.0, 16: 6.3, 32: 13.2, 64: 26.5}
BEGIN, END = "<!-- BEGIN GENERATED (scripts/staleness_sweep.py) -->", "<!-- END GENERATED -->"
NOT_IN_GRID = "·"


def section_markers(section: str) -> tuple[str, str]:
    """The markers of a generated block; "" is the page's first block (the markers above)."""
    if not section:
        return BEGIN, END
    return f"<!-- BEGIN GENERATED (scripts/staleness_sweep.py: {section}) -->", f"<!-- END GENERATED ({section}) -->"


# --------------------------------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scripts.staleness_sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("the grid")
    g.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSSES), help="loss types (gepo.config.LOSS_TYPES)")
    g.add_argument("--latencies", nargs="+", type=int, default=list(DEFAULT_LATENCIES),
                   help="maximum latencies (max_lag, in policy versions = optimizer steps)")  # fmt: skip
    g.add_argument("--grid", action="append", default=[], metavar="LOSSES:LATENCIES",
                   help="instead of --losses x --latencies: the union of these products, each as comma lists, e.g. "
                        "--grid tis,m2po:0,64,256 --grid grpo,gepo:128,256 (cells outside it show as ·)")  # fmt: skip
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="run seeds (prompts, lags, sampling)")
    g = p.add_argument_group("each run (gepo.staleness.StalenessConfig)")
    g.add_argument("--steps", type=int, default=150, help="optimizer steps per run (at least; see next)")
    g.add_argument("--steps-per-latency", type=float, default=DEFAULT_STEPS_PER_LATENCY,
                   help="a run at maximum latency M lasts max(--steps, ceil(this x M)) steps, so that lags truncated "
                        "at the start of a run (none can predate version 0) cost a similar share at every M")  # fmt: skip
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    g.add_argument("--groups-per-step", type=int, default=8, help="prompts (groups) per optimizer step")
    g.add_argument("--group-size", type=int, default=8, help="G, completions per prompt")
    g.add_argument("--groups-per-batch", type=int, default=2,
                   help="groups per sampler batch (one lag per batch; 2 = 4 sampler batches per step, as the paper)")  # fmt: skip
    g.add_argument("--delay-kind", default="lognormal", choices=("lognormal", "weibull", "fixed"),
                   help="lag distribution: the paper's delay model in versions, or a fixed lag = max latency")  # fmt: skip
    g.add_argument("--delay-lower-fraction", type=float, default=None,
                   help="delay_lower = this x max latency (default 1/7: matches the paper's mean lags)")  # fmt: skip
    g.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    g.add_argument("--eval-size", type=int, default=400, help="held-out (split test) problems per evaluation")
    g.add_argument("--difficulty", type=int, default=2, help="synthetic task difficulty (the tiny policy's is 2)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling (and log-prob) temperature")
    g.add_argument("--max-new-tokens", type=int, default=8, help="completion length cap (the loss's M)")
    g.add_argument("--phrasing", default="expression", choices=("expression", "word"),
                   help="synthetic task phrasing (word: sums as short word problems, the SmolLM2 task)")  # fmt: skip
    g.add_argument("--policy-path", default=None,
                   help="model folder: a tiny policy or any transformers causal LM, e.g. models/smollm2-135m-instruct "
                        "(default: the shipped gepo/assets/tiny-policy)")  # fmt: skip
    g.add_argument("--system-prompt", default=None, help="system turn of a chat model's prompts")
    g.add_argument("--publish-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype samplers hold versions in (bfloat16: every group sampled from the rounded master)")  # fmt: skip
    g.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="learner forward/backward dtype over fp32 master weights (bf16 is ~6x slower on CPUs)")  # fmt: skip
    g.add_argument("--micro-batch-rows", type=int, default=64, help="completions per forward/backward micro-batch")
    g.add_argument("--eval-scoring", default="first_integer", choices=("first_integer", "reward"),
                   help="judge greedy answers by their first integer (tiny policy) or by the reward's accuracy "
                        "(last number via math-verify: chat models)")  # fmt: skip
    g.add_argument("--eval-batch-size", type=int, default=0, help="problems per greedy evaluation batch (0 = all)")
    g.add_argument("--loss-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra LossConfig field for every run, e.g. sampler_kl_coef=0.005 (value parsed as JSON)")  # fmt: skip
    g = p.add_argument_group("execution and output")
    g.add_argument("--jobs", type=int, default=2, help="cells run in parallel (one process each)")
    g.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: cores // jobs, >= 1)")
    g.add_argument("--results-dir", type=Path, default=REPO / "runs" / "staleness", help="one JSON per finished cell")
    g.add_argument("--docs", type=Path, default=REPO / "docs" / "STALENESS.md", help="markdown report to update")
    g.add_argument("--plot", type=Path, default=REPO / "docs" / "staleness.png", help="PNG plot to write")
    g.add_argument("--section", default="",
                   help="name of the generated block of --docs to write (its own BEGIN/END markers, so several "
                        "sweeps share one page); default: the page's first block")  # fmt: skip
    g.add_argument("--no-resume", action="store_true", help="re-run cells even when their result file exists")
    g.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report from the results")
    g.add_argument("--no-report", action="store_true", help="do not write the markdown report and the plot")
    g.add_argument("--shard", default="1/1", metavar="I/N", help="run only cells i, i+N, ... (1-based) of the grid")
    g.add_argument("--quiet", action="store_true", help="one line per finished cell only")
    g.add_argument("--snapshot-dir", type=Path, default=None,
                   help="keep each cell's policy versions still to be sampled from as files here instead of in RAM "
                        "(a 135M model's bf16 versions are 270 MB each; results are unchanged)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        i, n = (int(x) for x in args.shard.split("/"))
        assert 1 <= i <= n
    except Exception:  # noqa: BLE001
        p.error(f"--shard must look like 1/2, got {args.shard!r}")
    args.shard_index, args.shard_count = i, n
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.steps_per_latency < 0:
        p.error("--steps-per-latency must be >= 0")
    if args.grid:
        pairs: list[tuple[str, int]] = []
        for item in args.grid:
            losses, sep, lats = item.partition(":")
            try:
                assert sep and losses and lats
                block = [(loss, int(lat)) for loss in losses.split(",") for lat in lats.split(",")]
            except (AssertionError, ValueError):
                p.error(f"--grid must look like grpo,gepo:0,64,256; got {item!r}")
            pairs += [x for x in block if x not in pairs]
        args.losses = list(dict.fromkeys(loss for loss, _ in pairs))
        args.latencies = sorted({lat for _, lat in pairs})
        args.pairs = set(pairs)
    else:
        args.pairs = {(loss, lat) for loss in args.losses for lat in args.latencies}
    return args


def steps_for(args: argparse.Namespace, latency: int) -> int:
    """Optimizer steps of a run at this maximum latency (see --steps-per-latency)."""
    return max(args.steps, math.ceil(args.steps_per_latency * latency - 1e-9))


def loss_overrides(args: argparse.Namespace) -> dict:
    out = {}
    for item in args.loss_override:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--loss-override needs KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------------
# cells


@dataclass(frozen=True)
class Cell:
    loss: str
    latency: int
    seed: int
    config: dict  # StalenessConfig.to_dict()
    fingerprint: str  # of the config and the starting policy's weights
    policy_hash: str

    @property
    def name(self) -> str:
        return f"{self.loss}-lag{self.latency}-seed{self.seed}"

    def path(self, results_dir: Path) -> Path:
        return results_dir / f"{self.name}-{self.fingerprint}.json"


def policy_hash(policy_path: str | None) -> str:
    """SHA-256 (12 hex digits) of the policy's weights file: part of every cell's identity, so results made with a
    different starting policy are never mixed in (or resumed from)."""
    import hashlib

    from gepo.tiny_policy import tiny_policy_path

    folder = Path(policy_path) if policy_path else tiny_policy_path()
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]


def make_cells(args: argparse.Namespace) -> list[Cell]:
    import hashlib

    from gepo.staleness import StalenessConfig

    overrides = loss_overrides(args)
    weights = policy_hash(args.policy_path)
    cells = []
    # seed-major order: an interrupted sweep leaves whole grids for the first seeds, not whole rows for some methods
    for seed in args.seeds:
        for latency in args.latencies:
            for loss in args.losses:
                if (loss, latency) not in args.pairs:
                    continue
                lower = None
                if args.delay_lower_fraction is not None and args.delay_kind != "fixed":
                    lower = latency * args.delay_lower_fraction
                cfg = StalenessConfig(
                    loss_type=loss,
                    loss_overrides=overrides,
                    max_lag=latency,
                    delay_kind=args.delay_kind,
                    delay_lower=lower if latency else None,
                    steps=steps_for(args, latency),
                    groups_per_step=args.groups_per_step,
                    group_size=args.group_size,
                    groups_per_batch=args.groups_per_batch,
                    lr=args.lr,
                    temperature=args.temperature,
                    max_new_tokens=args.max_new_tokens,
                    difficulty=args.difficulty,
                    phrasing=args.phrasing,
                    policy_path=args.policy_path,
                    system_prompt=args.system_prompt,
                    publish_dtype=args.publish_dtype,
                    compute_dtype=args.compute_dtype,
                    micro_batch_rows=args.micro_batch_rows,
                    eval_scoring=args.eval_scoring,
                    eval_batch_size=args.eval_batch_size,
                    eval_every=args.eval_every,
                    eval_size=args.eval_size,
                    seed=seed,
                )
                fingerprint = hashlib.sha256(f"{cfg.fingerprint()}:{weights}".encode()).hexdigest()[:10]
                cells.append(Cell(loss, latency, seed, cfg.to_dict(), fingerprint, weights))
    return cells


def _worker_init(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def run_cell(config: dict, path: str, threads: int, expected_policy: str, snapshot_dir: str | None = None) -> dict:
    """Run one cell in this process and write its result file; returns the summary."""
    _worker_init(threads)
    from gepo.staleness import StalenessConfig, run_staleness, save_result

    cfg = StalenessConfig.from_dict(config)
    if policy_hash(cfg.policy_path) != expected_policy:
        raise RuntimeError("the starting policy's weights changed since the sweep started; re-run the command")
    result = run_staleness(cfg, snapshot_dir=snapshot_dir)
    result["torch_threads"] = threads
    result["policy_hash"] = expected_policy
    save_result(result, path)
    return result["summary"]


def run_cells(todo: list[Cell], args: argparse.Namespace, threads: int, total: int, done_before: int) -> None:
    import multiprocessing

    started = time.perf_counter()
    finished = 0
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        pending = {
            pool.submit(run_cell, c.config, str(c.path(args.results_dir)), threads, c.policy_hash,
                        str(args.snapshot_dir / c.name) if args.snapshot_dir else None): c
            for c in todo
        }  # fmt: skip
        try:
            while pending:
                done, _ = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
                elapsed = time.perf_counter() - started
                if not done and not args.quiet:
                    print(f"  ... {finished}/{len(todo)} cells of this session done, {elapsed / 60:.1f} min elapsed",
                          flush=True)  # fmt: skip
                for fut in done:
                    cell = pending.pop(fut)
                    finished += 1
                    eta = elapsed / finished * (len(todo) - finished)
                    try:
                        s = fut.result()
                        line = (f"best {s['best_accuracy']:.3f} last {s['last_accuracy']:.3f} "
                                f"(start {s['initial_accuracy']:.3f}) lag {s['lag_mean']:.1f}/{s['lag_max']} "
                                f"iw_var {s['iw_var_mean']:.3g} gn_p95 {s['grad_norm_p95']:.3g}"
                                f"{' COLLAPSED' if s['collapsed'] else ''} in {s['wall_s']:.0f}s")  # fmt: skip
                    except Exception as e:  # noqa: BLE001 - report the cell, keep the sweep going
                        line = f"FAILED: {type(e).__name__}: {e}"
                    print(f"[{done_before + finished}/{total}] {cell.name}: {line} | "
                          f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)  # fmt: skip
        except KeyboardInterrupt:
            print("interrupted: finished cells are kept; run the same command again to resume", flush=True)
            for fut in pending:
                fut.cancel()
            raise


# --------------------------------------------------------------------------------------------------------------------
# report


def load_results(cells: list[Cell], results_dir: Path) -> dict[tuple[str, int, int], dict]:
    """The finished cells' results, their summaries recomputed from the stored per-step metrics (so a change to
    `gepo.staleness.summarize` needs no re-run)."""
    import numpy as np

    from gepo.staleness import summarize

    out = {}
    for c in cells:
        path = c.path(results_dir)
        if path.exists():
            result = json.loads(path.read_text())
            drawn = np.array([s["drawn_lags"] for s in result["steps"]])
            result["summary"] = {**result["summary"], **summarize(result, drawn=drawn)}
            out[(c.loss, c.latency, c.seed)] = result
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd


def _fmt_ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    m, sd = _mean_sd(values)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _fmt_g(values: list[float]) -> str:
    if not values:
        return "–"
    m, _ = _mean_sd(values)
    return f"{m:.3g}"


def build_report(args: argparse.Namespace, cells: list[Cell], results: dict, command: str) -> str:
    losses, latencies, seeds = args.losses, args.latencies, args.seeds

    begin, end = section_markers(args.section)

    def cell_values(loss: str, latency: int, key: str) -> list[float]:
        return [results[(loss, latency, s)]["summary"][key] for s in seeds if (loss, latency, s) in results]

    def fmt_cell(loss: str, latency: int, key: str) -> str:
        return _fmt_ms(cell_values(loss, latency, key)) if (loss, latency) in args.pairs else NOT_IN_GRID

    def pooled_lag_mean(latency: int) -> list[float]:
        return [v for loss in losses for v in cell_values(loss, latency, "lag_mean")]

    lines = [begin, ""]
    n_done, n_all = len(results), len(cells)
    cfg0 = cells[0].config
    walls = [r["summary"].get("wall_s", 0.0) for r in results.values()]
    lines += [
        f"Cells finished: **{n_done} / {n_all}**"
        + ("" if n_done == n_all else " (the sweep is incomplete: missing cells show as –)") + ".",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"Per run: {_steps_text(args, latencies)} × {cfg0['groups_per_step']} prompts × G = {cfg0['group_size']} "
        f"completions (one lag per sampler batch of {cfg0['groups_per_batch']} prompts), lr {cfg0['lr']:g} (AdamW), temperature {cfg0['temperature']:g}, max {cfg0['max_new_tokens']} "
        f"new tokens, {_task_text(cfg0)}, delay model `{cfg0['delay_kind']}`, held-out greedy "
        f"accuracy on {cfg0['eval_size']} test problems every {cfg0['eval_every']} steps; seeds {', '.join(map(str, seeds))}. "
        f"Cell wall time: mean {sum(walls) / max(len(walls), 1):.0f} s, total {sum(walls) / 60:.1f} CPU-process-minutes.",
        "",
    ]
    header = "| method | " + " | ".join(f"{L}" for L in latencies) + " |"
    sep = "|---|" + "---|" * len(latencies)
    lag_row = "| *mean realised lag* | " + " | ".join(
        f"*{_mean_sd(pooled_lag_mean(L))[0]:.1f}*" if pooled_lag_mean(L) else "–" for L in latencies
    ) + " |"
    paper_row = "| *paper's avg lag* | " + " | ".join(
        f"*{PAPER_AVG_LAG[L]}*" if L in PAPER_AVG_LAG else "–" for L in latencies
    ) + " |"
    for title, key in (("Best held-out accuracy", "best_accuracy"), ("Last held-out accuracy", "last_accuracy")):
        lines += [f"### {title} vs maximum latency (mean ± sd over seeds)", "", header, sep]
        for loss in losses:
            lines.append(f"| {LOSS_LABELS.get(loss, loss)} | "
                         + " | ".join(fmt_cell(loss, L, key) for L in latencies) + " |")  # fmt: skip
        lines += [lag_row, paper_row, ""]
    start = [r["summary"]["initial_accuracy"] for r in results.values()]
    if start:
        lines += [f"Starting accuracy (the starting policy before RL, same eval set): {start[0]:.3f}.", ""]

    lines += [
        "### Per cell",
        "",
        "best/last/gap: held-out accuracy (mean ± sd over seeds); lag: mean realised lag (max); iw var: variance of the "
        "importance weight over its units (tokens, or rows for GSPO/GEPO), mean over steps; gn p95: 95th percentile of "
        "the pre-clip gradient norm over steps; clip: fraction of units clipped (TIS/CISPO: weights truncated); mask: "
        "fraction of tokens masked (IcePop), mean over steps; collapsed: runs whose last accuracy is "
        "below half the starting accuracy or that had a non-finite step; dipped: runs with any evaluation below half "
        "the starting accuracy (most recovered).",
        "",
        "| method | max lat. | best | last | best−last gap | lag mean (max) | iw var | gn p95 | clip | mask | collapsed | dipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in losses:
        for L in latencies:
            if (loss, L) not in args.pairs:
                continue
            rs = [results[(loss, L, s)]["summary"] for s in seeds if (loss, L, s) in results]
            if not rs:
                lines.append(f"| {LOSS_LABELS.get(loss, loss)} | {L} | – | – | – | – | – | – | – | – | – | – |")
                continue
            lines.append(
                f"| {LOSS_LABELS.get(loss, loss)} | {L} | {_fmt_ms([r['best_accuracy'] for r in rs])} | "
                f"{_fmt_ms([r['last_accuracy'] for r in rs])} | {_fmt_ms([r['best_last_gap'] for r in rs])} | "
                f"{_mean_sd([r['lag_mean'] for r in rs])[0]:.1f} ({max(r['lag_max'] for r in rs)}) | "
                f"{_fmt_g([r['iw_var_mean'] for r in rs])} | {_fmt_g([r['grad_norm_p95'] for r in rs])} | "
                f"{_fmt_g([r['clip_frac_mean'] for r in rs])} | {_fmt_g([r.get('mask_frac_mean', 0.0) for r in rs])} | "
                f"{sum(r['collapsed'] for r in rs)}/{len(rs)} | "
                f"{sum(r['dipped'] for r in rs)}/{len(rs)} |"
            )
    lines += [""]

    # averages over latencies > 0, per method: a one-line ranking aid
    stale = [L for L in latencies if L > 0]
    if stale:
        lines += ["### Summary per method (all seeds; stale = every latency > 0)", "",
                  "| method | best @0 | best, stale mean | last @0 | last, stale mean | gap, stale mean | collapsed | dipped |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for loss in losses:
            b0, l0 = cell_values(loss, 0, "best_accuracy"), cell_values(loss, 0, "last_accuracy")
            bs = [v for L in stale for v in cell_values(loss, L, "best_accuracy")]
            ls = [v for L in stale for v in cell_values(loss, L, "last_accuracy")]
            gs = [v for L in stale for v in cell_values(loss, L, "best_last_gap")]
            col = [v for L in latencies for v in cell_values(loss, L, "collapsed")]
            dip = [v for L in latencies for v in cell_values(loss, L, "dipped")]
            lines.append(f"| {LOSS_LABELS.get(loss, loss)} | {_fmt_ms(b0)} | {_fmt_ms(bs)} | {_fmt_ms(l0)} | "
                         f"{_fmt_ms(ls)} | {_fmt_ms(gs)} | {sum(col)}/{len(col)} | {sum(dip)}/{len(dip)} |")  # fmt: skip
        lines += [""]

    # realised vs configured lags (pooled over methods and seeds: the schedule depends on the seed only)
    lines += [
        "### Realised lags vs configured",
        "",
        "Configured: the delay model's draws (rounded, capped at the maximum latency). Realised: the lags the learner "
        "saw, min(drawn, step) — no group can predate version 0, so the first steps of a run are truncated. Pooled "
        "over all methods and seeds of each latency. Histogram: share of groups per lag bin (bins of width max/8).",
        "",
        "| max lat. | configured mean | realised mean | paper's avg lag | configured max | realised max | realised histogram |",
        "|---|---|---|---|---|---|---|",
    ]
    for L in latencies:
        rs = [results[(loss, L, s)] for loss in losses for s in seeds if (loss, L, s) in results]
        if not rs:
            continue
        dh = [sum(x) for x in zip(*[r["summary"]["drawn_lag_hist"] for r in rs])]
        rh = [sum(x) for x in zip(*[r["summary"]["lag_hist"] for r in rs])]
        dmean = sum(i * c for i, c in enumerate(dh)) / max(sum(dh), 1)
        rmean = sum(i * c for i, c in enumerate(rh)) / max(sum(rh), 1)
        dmax = max((i for i, c in enumerate(dh) if c), default=0)
        rmax = max((i for i, c in enumerate(rh) if c), default=0)
        lines.append(f"| {L} | {dmean:.2f} | {rmean:.2f} | {PAPER_AVG_LAG.get(L, '–')} | {dmax} | {rmax} | "
                     f"{_hist_text(rh, L)} |")  # fmt: skip
    lines += ["", f"![staleness sweep]({args.plot.name})", "", end]
    return "\n".join(lines)


def _task_text(cfg: dict) -> str:
    """The policy, task and precision of a cell's config, in words."""
    policy = Path(cfg["policy_path"]).name if cfg.get("policy_path") else "the tiny policy"
    text = f"{policy}, synthetic difficulty {cfg['difficulty']}"
    if cfg.get("phrasing", "expression") != "expression":
        text += f" ({cfg['phrasing']} problems)"
    if cfg.get("publish_dtype", "float32") != "float32" or cfg.get("compute_dtype", "float32") != "float32":
        text += (f", fp32 master weights with {cfg.get('compute_dtype', 'float32')} compute, versions sampled in "
                 f"{cfg.get('publish_dtype', 'float32')}")  # fmt: skip
    if cfg.get("eval_scoring", "first_integer") == "reward":
        text += ", answers judged by the reward (last number, math-verify)"
    return text


def _steps_text(args: argparse.Namespace, latencies: list[int]) -> str:
    by_latency = {L: steps_for(args, L) for L in latencies}
    if len(set(by_latency.values())) == 1:
        return f"{args.steps} optimizer steps"
    longer = ", ".join(f"{n} at {L}" for L, n in by_latency.items() if n > args.steps)
    return (f"{args.steps} optimizer steps (max({args.steps}, ⌈{args.steps_per_latency:g} × max latency⌉): "
            f"{longer})")


def _hist_text(hist: list[int], max_lag: int) -> str:
    """Shares per bin of width max(1, max_lag/8), as 'lo–hi: pct'."""
    total = sum(hist)
    if max_lag == 0 or total == 0:
        return "0: 100%"
    width = max(1, math.ceil((max_lag + 1) / 8))
    parts = []
    for lo in range(0, max_lag + 1, width):
        hi = min(lo + width - 1, max_lag)
        c = sum(hist[lo : hi + 1])
        parts.append(f"{lo}–{hi}: {100 * c / total:.0f}%" if hi > lo else f"{lo}: {100 * c / total:.0f}%")
    return ", ".join(parts)


DOC_TEMPLATE = """# Staleness sweep: accuracy vs maximum latency

{generated}
"""


def write_docs(text: str, path: Path, section: str = "") -> None:
    """Replace the section's generated block of the page (the rest is kept); a missing block is appended."""
    begin, end = section_markers(section)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = path.read_text()
        if begin in old and end in old.split(begin, 1)[1]:
            head, rest = old.split(begin, 1)
            tail = rest.split(end, 1)[1]
            path.write_text(head + text + tail)
            return
        path.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
        return
    path.write_text(DOC_TEMPLATE.format(generated=text))


def write_plot(args: argparse.Namespace, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, latencies, seeds = args.losses, args.latencies, args.seeds
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    markers = "osD^vP*X"
    for ax, key, title in ((axes[0], "best_accuracy", "best held-out accuracy"),
                           (axes[1], "last_accuracy", "last held-out accuracy"),
                           (axes[2], "best_last_gap", "best − last gap")):  # fmt: skip
        for i, loss in enumerate(losses):
            xs, ms, sds = [], [], []
            for L in latencies:
                vals = [results[(loss, L, s)]["summary"][key] for s in seeds if (loss, L, s) in results]
                vals = vals if (loss, L) in args.pairs else []
                if vals:
                    m, sd = _mean_sd(vals)
                    xs.append(L), ms.append(m), sds.append(sd)
            if xs:
                ax.errorbar(xs, ms, yerr=sds, marker=markers[i % len(markers)], capsize=3,
                            label=LOSS_LABELS.get(loss, loss))  # fmt: skip
        ax.set_xscale("symlog", linthresh=8)
        ax.set_xticks(latencies)
        ax.set_xticklabels([str(L) for L in latencies])
        ax.set_xlabel("maximum latency (policy versions)")
        ax.set_title(f"{title} (mean ± sd, {len(seeds)} seeds)")
        ax.grid(alpha=0.3)
    start = [r["summary"]["initial_accuracy"] for r in results.values()]
    if start:
        for ax in axes[:2]:
            ax.axhline(start[0], color="gray", ls="--", lw=1, label="start")
    axes[0].legend(fontsize=8)
    ax = axes[3]
    for L in latencies:
        hist = None
        for r in results.values():
            if r["config"]["max_lag"] == L:
                h = r["summary"]["lag_hist"]
                hist = h if hist is None else [a + b for a, b in zip(hist, h)]
        if hist and L > 0:
            total = sum(hist)
            ax.step(range(len(hist)), [c / total for c in hist], where="mid",
                    label=f"max {L}: mean {sum(i * c for i, c in enumerate(hist)) / total:.1f}")  # fmt: skip
    ax.set_xlabel("realised lag (versions)")
    ax.set_ylabel("share of groups")
    ax.set_title("realised lag distribution")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------


def reproducible_command(argv: list[str]) -> str:
    return ".venv/bin/python -m scripts.staleness_sweep" + ("".join(" " + shlex.quote(a) for a in argv) if argv else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cells = make_cells(args)
    mine = cells[args.shard_index - 1 :: args.shard_count]
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.jobs)
    if not args.report_only:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        todo = [c for c in mine if args.no_resume or not c.path(args.results_dir).exists()]
        done_before = len(mine) - len(todo)
        print(f"staleness sweep: {len(cells)} cells in the grid, {len(mine)} in this shard, {done_before} already "
              f"finished, {len(todo)} to run; {args.jobs} at a time x {threads} torch thread(s); "
              f"results in {args.results_dir}", flush=True)  # fmt: skip
        if todo:
            try:
                run_cells(todo, args, threads, len(mine), done_before)
            except KeyboardInterrupt:
                return 130
    if args.no_report:
        return 0
    results = load_results(cells, args.results_dir)
    if not results:
        print("no results yet: nothing to report", flush=True)
        return 1
    # the command that reproduces this grid (without --report-only / --shard, which do not change results)
    keep, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
            continue
        if a in ("--report-only", "--no-resume", "--quiet"):
            continue
        if a in ("--shard", "--snapshot-dir"):  # where and which part ran, not what
            skip_next = True
            continue
        if a.startswith(("--shard=", "--snapshot-dir=")):
            continue
        keep.append(a)
    text = build_report(args, cells, results, reproducible_command(keep))
    write_docs(text, args.docs, args.section)
    write_plot(args, results, args.plot)
    print(f"wrote {args.docs} and {args.plot} from {len(results)}/{len(cells)} cells", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
