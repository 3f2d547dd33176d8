"""Churn soak: a learner and samplers on this machine, SIGKILLed and restarted at random times, then audited.

    .venv/bin/python -m scripts.soak --minutes 30                      # the figures in docs/BENCHMARKS.md
    .venv/bin/python -m scripts.soak --minutes 1.5 --learner-kills 2 --sampler-kills 4   # tests/test_soak.py

A learner (`python -m node.learner --resume`, the built-in tiny policy on the synthetic task, a fixed port on
127.0.0.1) and ``--samplers`` samplers (`python -m node.sampler`, each with its own ``--state-dir``) run for
``--minutes`` of churn: the learner and the samplers are SIGKILLed at random times (their main process only, as
`kill -9` would; the DHT process and libp2p daemon they leave must exit by themselves) and restarted with the same
run and state directories, some samplers while the learner is down. Then a drain (no more kills: every sampler
delivers what it has and is stopped with SIGTERM once its outbox is empty, the learner takes what it accepted and
is stopped with SIGTERM, which checkpoints), and `python -m node.audit` reconciles the learner's and the samplers'
records. Printed (and written as JSON): kills of each kind, groups sent / acknowledged / trained / lost / trained
twice, unexpected exits, whether versions stayed strictly increasing and unique, restart -> first accepted group for
both roles, RSS per process over time with its slope after each life's first minute, and the load average.

Exit status 0 only when no acknowledged group was lost or trained twice, no node exited by itself (or with a
non-zero status when stopped), and no version number was reused; 1 otherwise; 2 for a bad flag. Every process is
started in its own session and stopped by its PID (and its process group), also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from node.cli import ArgumentParser, add_dataclass_args, dataclass_from_args, option
from node.journal import ANSWERS_FILE, JOURNAL_FILE
from node.local import LOOPBACK, REPO, Proc, join_args
from node.publish_guard import PublishGuard
from scripts.bench.bench_nodes import TreeMemory, _proc_table, _role, proc_status_kib
from scripts.soak_figures import (check_versions, first_after, life_start_version, read_jsonl, report,
                                  rss_summary, timing_summary)

RECIPE = "recipes/tiny-demo.yaml"
RUN_ID = "soak"
TICK_S = 0.2


@dataclass
class SoakConfig:
    minutes: float = option(30.0, "length of the churn phase (kills and restarts) once every node is up; the "
                                  "drain, clean stop and audit come after it")
    seed: int = option(0, "seed of the kill schedule (times, targets, downtimes)")
    samplers: int = option(3, "samplers, each with its own state directory")
    learner_kills: int = option(-1, "SIGKILLs of the learner (-1: one per 5 minutes of --minutes, at least 1)")
    sampler_kills: int = option(-1, "SIGKILLs of samplers in all, those while the learner is down included (-1: "
                                    "0.8 per minute, at least 2)")
    kills_while_learner_down: int = option(-1, "how many of --sampler-kills happen (and restart) while the learner "
                                               "is down (-1: half of --learner-kills, at least 1)")
    learner_down_min: float = option(4.0, "shortest learner downtime after a kill, in seconds")
    learner_down_max: float = option(15.0, "longest learner downtime after a kill, in seconds")
    sampler_down_min: float = option(1.0, "shortest sampler downtime after a kill, in seconds")
    sampler_down_max: float = option(8.0, "longest sampler downtime after a kill, in seconds")
    groups_per_step: int = option(8, "learner: groups per optimizer step")
    group_size: int = option(8, "learner: completions per prompt")
    checkpoint_every: int = option(10, "learner: checkpoint every N steps (steps after it are rolled back by a kill)")
    batch_prompts: int = option(4, "sampler: prompts generated together")
    start_timeout: float = option(600.0, "seconds for the first learner to print its join command and for every "
                                         "node to get a first group accepted (a loaded machine is slow)")
    settle_timeout: float = option(240.0, "a node is killed only once it had a group accepted since its restart; "
                                          "after this many seconds without one it may be killed anyway")
    max_overrun: float = option(600.0, "seconds the churn phase may run past --minutes for kills that had to wait "
                                       "until their target had a group accepted (slow restarts on a loaded machine); "
                                       "kills still not done then are reported")
    drain_timeout: float = option(240.0, "seconds for the drain: samplers delivering their outboxes, the learner "
                                         "taking what it accepted")
    stop_timeout: float = option(90.0, "seconds a node gets to exit after SIGTERM before its process group is "
                                       "SIGKILLed")
    helper_grace: float = option(20.0, "seconds a SIGKILLed node's helpers (DHT process, libp2p daemon) get to exit "
                                       "by themselves before they are SIGKILLed (counted)")
    rss_every: float = option(5.0, "seconds between RSS samples of every process and its children")
    out: str | None = option(None, "directory for the run: learner run dir, sampler state dirs, logs, figures "
                                   "(default: runs/soak-<time>)")
    json: str | None = option(None, "where to write the figures as JSON (default: OUT/soak.json)")
    port: int = option(0, "the learner's TCP port on 127.0.0.1 (0: a free one)")

    def resolved(self) -> "SoakConfig":
        learner = self.learner_kills if self.learner_kills >= 0 else max(1, round(self.minutes / 5))
        sampler = self.sampler_kills if self.sampler_kills >= 0 else max(2, round(self.minutes * 0.8))
        down = self.kills_while_learner_down if self.kills_while_learner_down >= 0 else max(1, learner // 2)
        if learner == 0:
            down = 0
        return dataclasses.replace(self, learner_kills=learner, sampler_kills=sampler,
                                   kills_while_learner_down=min(down, sampler),
                                   out=self.out or f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}")


def check_config(cfg: SoakConfig) -> None:
    if cfg.minutes <= 0 or cfg.samplers < 1:
        raise ValueError("--minutes must be > 0 and --samplers >= 1")
    if not 0 < cfg.learner_down_min <= cfg.learner_down_max or not 0 < cfg.sampler_down_min <= cfg.sampler_down_max:
        raise ValueError("downtimes: 0 < min <= max")
    if cfg.kills_while_learner_down > cfg.sampler_kills:
        raise ValueError("--kills-while-learner-down cannot exceed --sampler-kills")


# ---------------------------------------------------------------------------------------------------------------
# the plan: when to kill what


@dataclass
class Plan:
    learner_kills: list[tuple[float, float, int]]  # (time in the churn phase, downtime, sampler kills while down)
    sampler_kills: list[tuple[float, float]]  # (time, downtime), at any moment


def make_plan(cfg: SoakConfig, rng: random.Random) -> Plan:
    """Learner kills one per equal slot of the churn phase (at a random point of its middle half), so downtimes
    never overlap; the sampler kills during its downtimes spread over the learner kills; the rest uniform."""
    span = cfg.minutes * 60.0
    n = cfg.learner_kills
    down_each = [0] * n
    for i in range(cfg.kills_while_learner_down):
        down_each[i % n] += 1 if n else 0
    rng.shuffle(down_each)
    learner = [(span * (i + rng.uniform(0.25, 0.75)) / n, rng.uniform(cfg.learner_down_min, cfg.learner_down_max),
                down_each[i]) for i in range(n)]
    free = cfg.sampler_kills - (cfg.kills_while_learner_down if n else 0)
    samplers = sorted((rng.uniform(0.02, 0.95) * span, rng.uniform(cfg.sampler_down_min, cfg.sampler_down_max))
                      for _ in range(free))
    return Plan(learner, samplers)


# ---------------------------------------------------------------------------------------------------------------
# nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_members(pgid: int) -> list[int]:
    """PIDs of the processes of process group ``pgid`` that are not zombies."""
    out = []
    for pid, (_, group, _) in _proc_table().items():
        if group != pgid:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            if stat[stat.rindex(")") + 2] != "Z":
                out.append(pid)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return out


@dataclass
class Life:
    """One run of one node's process, from its start to its SIGKILL, clean stop or unexpected exit."""

    node: str
    life: int
    pid: int
    started: float  # seconds since the soak began
    started_wall: float  # time.time() then (the nodes' records carry wall-clock times)
    learner_down_at_start: bool = False  # a sampler started while the learner was down or not yet accepting
    first_accepted_s: float | None = None  # after `started`
    ended: float | None = None
    end: str | None = None  # "killed", "stopped", "exited"
    exit_code: int | None = None
    rss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # component -> (s since start, KiB)
    extra: dict[str, Any] = field(default_factory=dict)


class Node:
    """A learner or sampler program restarted with the same arguments (and state) after each kill.

    ``progress()`` is a counter that grows when the node gets a group accepted: for the learner the lines of its
    accepted-groups ledger, for a sampler the groups that left its outbox (each answered by the learner)."""

    def __init__(self, name: str, args: list[str], log_dir: Path, clock: Callable[[], float],
                 progress: Callable[[], int]) -> None:
        self.name, self.args, self.log_dir, self.clock, self.progress = name, args, log_dir, clock, progress
        self.proc: Proc | None = None
        self.lives: list[Life] = []
        self.reaper: tuple[int, float, float] | None = None  # (pgid, kill time, deadline) of a killed life's helpers
        self._progress_at_start = 0
        self.stopping = False  # SIGTERM sent by the soak: the exit that follows is expected

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    @property
    def life(self) -> Life | None:
        return self.lives[-1] if self.lives else None

    def start(self, learner_down: bool = False) -> None:
        n = len(self.lives) + 1
        self.stopping = False
        self._progress_at_start = self.progress()
        self.proc = Proc(self.args, self.log_dir / f"{self.name}-{n}.log")
        self.lives.append(Life(self.name, n, self.proc.pid, self.clock(), time.time(),
                               learner_down_at_start=learner_down))

    def terminate(self) -> None:
        """SIGTERM, once: a second one would make the program abort at once (node.metrics.GracefulStop)."""
        if self.proc is not None and not self.stopping:
            self.proc.terminate()
        self.stopping = True

    def settled(self, timeout: float) -> bool:
        life = self.life
        return self.up and life is not None and (life.first_accepted_s is not None
                                                 or self.clock() - life.started > timeout)

    def poll_progress(self) -> None:
        life = self.life
        if self.up and life is not None and life.first_accepted_s is None and self.progress() > self._progress_at_start:
            life.first_accepted_s = self.clock() - life.started

    def crash(self, helper_grace: float) -> None:
        """SIGKILL of the main process only; its helpers get ``helper_grace`` s to notice and exit."""
        assert self.proc is not None and self.life is not None
        self.proc.popen.kill()
        try:
            self.proc.popen.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self._ended("killed")
        now = self.clock()
        self.reaper = (self.proc.pid, now, now + helper_grace)

    def reap(self, force: bool = False) -> tuple[float | None, bool] | None:
        """Check a killed life's helpers: (seconds they took to exit, whether they had to be SIGKILLed) once they
        are gone, None while they are still inside their grace."""
        if self.reaper is None:
            return None
        pgid, killed_at, deadline = self.reaper
        if not live_members(pgid):
            self.reaper = None
            return self.clock() - killed_at, False
        if force or self.clock() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)  # the group is still in use, so its id cannot name anything else
            except (ProcessLookupError, PermissionError):
                pass
            self.reaper = None
            return None, True
        return None

    def _ended(self, how: str) -> None:
        life = self.life
        if life is not None and life.ended is None:
            life.ended, life.end = self.clock(), how
            life.exit_code = self.proc.popen.returncode if self.proc is not None else None

    def note_exit(self) -> bool:
        """True (once) when the process exited without the soak killing or stopping it."""
        if (self.proc is not None and self.life is not None and self.life.ended is None and not self.up
                and not self.stopping):
            self._ended("exited")
            self.proc.kill()  # whatever it left in its process group
            return True
        return False

    def sample_rss(self, table: dict[int, tuple[int, int, str]]) -> None:
        if not self.up or self.life is None:
            return
        root = self.proc.pid
        if root not in table:
            return
        main_cmd = table[root][2]
        totals: dict[str, int] = {}
        for pid in TreeMemory().tree(root, table):
            kib = proc_status_kib(pid, "VmRSS")
            if kib:  # 0: a process caught between fork and exec or while exiting (no cmdline either): not a component
                component = "main process" if pid == root else _role(table[pid][2], main_cmd)
                totals[component] = totals.get(component, 0) + kib
        t = self.clock() - self.life.started
        for component, kib in totals.items():
            self.life.rss.setdefault(component, []).append((round(t, 1), kib))


def outbox_answers(outbox: Path) -> Callable[[], int]:
    """A counter of the groups that left a sampler's outbox (the learner answered them) since it was made."""
    state = {"seen": set(), "answered": 0}

    def count() -> int:
        try:
            names = {n for n in os.listdir(outbox) if n.endswith(".grp")}
        except FileNotFoundError:
            names = set()
        state["answered"] += len(state["seen"] - names)
        state["seen"] = names
        return state["answered"]

    return count


def file_size(path: Path) -> Callable[[], int]:
    def size() -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    return size


def count_files(directory: Path, suffix: str = ".grp") -> int:
    try:
        return sum(1 for n in os.listdir(directory) if n.endswith(suffix))
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------------------------------
# the soak


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(cfg.seed)
        self.t0 = time.monotonic()
        self.run_dir = self.out / "learner"
        self.port = cfg.port or free_port()
        self.kills = {"learner": 0, "sampler": 0, "sampler_while_learner_down": 0}
        self.helper_exit_s: list[float] = []
        self.helpers_forced = 0
        self.unexpected: list[str] = []
        self.load: list[float] = []
        self.events: list[tuple[float, str]] = []
        self.churn_s = 0.0
        self.learner = Node("learner", self.learner_args(), self.out, self.clock,
                            file_size(self.run_dir / "swarm" / "accepted.log"))
        self.samplers: list[Node] = []
        self.join: list[str] = []

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def log(self, text: str) -> None:
        self.events.append((round(self.clock(), 1), text))
        print(f"[{self.clock():7.1f}s] {text}", flush=True)

    def learner_args(self) -> list[str]:
        c = self.cfg
        return ["-m", "node.learner", "--config", RECIPE, "--run-dir", str(self.run_dir), "--run-id", RUN_ID,
                "--resume", "--max-steps", "100000000", "--eval-every", "0", "--checkpoint-every",
                str(c.checkpoint_every), "--groups-per-step", str(c.groups_per_step), "--group-size",
                str(c.group_size), "--reward-workers", "1", "--no-tensorboard", "--torch-threads", "1",
                "--seed", str(c.seed), *LOOPBACK, "--host-maddrs", f"/ip4/127.0.0.1/tcp/{self.port}"]

    def sampler_node(self, i: int) -> Node:
        state = self.out / f"sampler-{i + 1}"
        args = ["-m", "node.sampler", *self.join, "--state-dir", str(state), "--batch-prompts",
                str(self.cfg.batch_prompts), "--seed", str(self.cfg.seed * 100 + i), "--torch-threads", "1",
                *LOOPBACK]
        return Node(f"sampler-{i + 1}", args, self.out, self.clock, outbox_answers(state / "outbox"))

    @property
    def nodes(self) -> list[Node]:
        return [self.learner, *self.samplers]

    # -- the loop's chores, every tick --

    def tick(self, rss_due: list[float]) -> None:
        for node in self.nodes:
            node.poll_progress()
            reaped = node.reap()
            if reaped is not None:
                self._count_reaped(node, reaped)
            if node.note_exit():
                life = node.life
                self.unexpected.append(f"{node.name} life {life.life} exited with {life.exit_code}")
                self.log(f"UNEXPECTED: {node.name} exited with {life.exit_code}; log {node.proc.log_path}:\n"
                         f"{node.proc.tail(15)}")
                self._start(node)  # keep the soak going; the exit is reported
        if self.clock() >= rss_due[0]:
            rss_due[0] = self.clock() + self.cfg.rss_every
            table = _proc_table()
            for node in self.nodes:
                node.sample_rss(table)
            self.load.append(os.getloadavg()[0])

    def _count_reaped(self, node: Node, reaped: tuple[float | None, bool]) -> None:
        seconds, forced = reaped
        if forced:
            self.helpers_forced += 1
            self.log(f"{node.name}: helpers of the killed process still alive after the grace; SIGKILLed")
        elif seconds is not None:
            self.helper_exit_s.append(seconds)

    def wait(self, seconds: float, rss_due: list[float], until: Callable[[], bool] | None = None) -> bool:
        deadline = self.clock() + seconds
        while self.clock() < deadline:
            self.tick(rss_due)
            if until is not None and until():
                return True
            time.sleep(TICK_S)
        return until is not None and until()

    def _start(self, node: Node) -> None:
        if node.reaper is not None:  # e.g. the old libp2p daemon still holds the learner's port
            self._count_reaped(node, node.reap(force=True) or (None, False))
        serving = self.learner.up and self.learner.life.first_accepted_s is not None
        node.start(learner_down=node is not self.learner and not serving)
        if node is self.learner:
            self.learner.life.extra["log"] = str(node.proc.log_path)

    def _kill(self, node: Node) -> None:
        if node is self.learner:
            node.crash(self.cfg.helper_grace)
            life = node.life
            life.extra["highest_marker_at_end"] = PublishGuard(self.run_dir).highest()
            self.kills["learner"] += 1
        else:
            down = not self.learner.up
            node.crash(self.cfg.helper_grace)
            node.life.extra["learner_down_at_kill"] = down
            self.kills["sampler"] += 1
            self.kills["sampler_while_learner_down"] += down
        self.log(f"SIGKILL {node.name} (pid {node.life.pid}, up {node.life.ended - node.life.started:.0f} s)")

    # -- phases --

    def start_all(self, rss_due: list[float]) -> None:
        self._start(self.learner)
        self.join = join_args(self.learner.proc, timeout=self.cfg.start_timeout)
        self.log(f"learner up (pid {self.learner.proc.pid}, port {self.port}); samplers join with "
                 f"{' '.join(self.join)}")
        self.samplers = [self.sampler_node(i) for i in range(self.cfg.samplers)]
        for s in self.samplers:
            self._start(s)
        ok = self.wait(self.cfg.start_timeout, rss_due,
                       until=lambda: all(n.life.first_accepted_s is not None for n in self.nodes))
        if not ok:
            raise RuntimeError(f"not every node had a group accepted within {self.cfg.start_timeout:.0f} s: "
                               + ", ".join(f"{n.name}: {n.life.first_accepted_s}" for n in self.nodes))
        self.log("every node had a group accepted; churn begins")

    def churn(self, plan: Plan, rss_due: list[float]) -> dict[str, int]:
        begin = self.clock()
        planned_end = begin + self.cfg.minutes * 60.0
        hard_end = planned_end + self.cfg.max_overrun
        learner_q = [(begin + t, d, k) for t, d, k in plan.learner_kills]
        sampler_q = [(begin + t, d) for t, d in plan.sampler_kills]
        restarts: list[tuple[float, Node]] = []  # (when, node)
        down_kills: list[tuple[float, float]] = []  # (when, restart at) for sampler kills during a learner downtime
        settle = self.cfg.settle_timeout
        while True:
            now = self.clock()
            # past the planned end, kills that still wait for their target keep the churn going, up to hard_end
            waiting = bool(learner_q or sampler_q or down_kills)
            if not restarts and (now >= hard_end or (now >= planned_end and not waiting)):
                break
            for when, node in [r for r in restarts if r[0] <= now]:
                restarts.remove((when, node))
                self._start(node)
                self.log(f"restarted {node.name} (pid {node.proc.pid})"
                         + (" while the learner is down" if node is not self.learner and not self.learner.up else ""))
            if now < hard_end:
                if learner_q and learner_q[0][0] <= now and self.learner.settled(settle):
                    _, downtime, k = learner_q.pop(0)
                    self._kill(self.learner)
                    back = now + downtime
                    restarts.append((back, self.learner))
                    for j in range(k):  # kill and restart inside the downtime, the restart before the learner's
                        at = now + downtime * (0.15 + 0.5 * j / k)
                        down_kills.append((at, at + downtime * 0.25 * self.rng.uniform(0.5, 1.0)))
                for when, back in [d for d in down_kills if d[0] <= now]:
                    victims = [s for s in self.samplers if s.up]
                    if victims and not self.learner.up:
                        down_kills.remove((when, back))
                        victim = self.rng.choice(victims)
                        self._kill(victim)
                        restarts.append((max(back, self.clock() + 0.5), victim))
                    elif self.learner.up:  # the learner came back early (never: restart times are planned)
                        down_kills.remove((when, back))
                if sampler_q and sampler_q[0][0] <= now:
                    victims = [s for s in self.samplers if s.settled(settle)]
                    if victims:
                        _, downtime = sampler_q.pop(0)
                        victim = self.rng.choice(victims)
                        self._kill(victim)
                        restarts.append((self.clock() + downtime, victim))
            self.tick(rss_due)
            time.sleep(TICK_S)
        self.churn_s = self.clock() - begin
        planned_down = sum(k for _, _, k in learner_q)
        return {"learner_not_done": len(learner_q), "sampler_not_done": len(sampler_q) + len(down_kills) + planned_down}

    def drain(self, rss_due: list[float]) -> None:
        """No more kills: each sampler, once it had a group accepted since its last start and its outbox is empty,
        is stopped with SIGTERM; then the learner, once its inbox is empty and a few seconds passed without a new
        step (it trains what it can), is stopped with SIGTERM (which checkpoints)."""
        deadline = self.clock() + self.cfg.drain_timeout
        self.log("drain: no more kills")
        for node in self.nodes:
            if not node.up:
                self._start(node)
        self.wait(max(0.0, deadline - self.clock()), rss_due,
                  until=lambda: all(n.life.first_accepted_s is not None for n in self.nodes))
        stopping = list(self.samplers)
        while stopping and self.clock() < deadline:
            for s in list(stopping):
                if count_files(self.out / s.name / "outbox") == 0 and s.life.first_accepted_s is not None:
                    s.terminate()
                    stopping.remove(s)
                    self.log(f"drain: {s.name}'s outbox is empty; SIGTERM")
            self.tick(rss_due)
            time.sleep(0.05)
        for s in stopping:
            self.log(f"drain: {s.name}'s outbox did not empty in time; SIGTERM anyway")
            s.terminate()
        for s in self.samplers:
            self._stop(s, rss_due)
        # Idle: neither a step (metrics.jsonl) nor any group's fate (journal.jsonl) recorded for 5 s. What it holds
        # then is less than a step: kept (with the journal) for the next life, counted by the audit as pending.
        records = [file_size(self.run_dir / "metrics.jsonl"), file_size(self.run_dir / "swarm" / JOURNAL_FILE)]
        quiet_since, last = self.clock(), [size() for size in records]

        def learner_idle() -> bool:
            nonlocal quiet_since, last
            now = [size() for size in records]
            if now != last:
                quiet_since, last = self.clock(), now
            return self.clock() - quiet_since > 5.0

        self.wait(max(5.0, deadline - self.clock()), rss_due, until=learner_idle)
        self.log(f"drain: the learner is idle ({count_files(self.run_dir / 'swarm' / 'inbox')} groups held in its "
                 f"inbox); SIGTERM")
        self.learner.terminate()
        self._stop(self.learner, rss_due)

    def _stop(self, node: Node, rss_due: list[float]) -> None:
        """SIGTERM (sent already, or now), up to --stop-timeout s, then SIGKILL of its process group."""
        if node.proc is None or node.life.ended is not None:
            return
        node.terminate()
        self.wait(self.cfg.stop_timeout, rss_due, until=lambda: not node.up)
        stuck = node.up
        node.proc.kill()  # what is left of its process group, and the process itself if stuck
        node._ended("stopped")
        node.life.extra["stuck"] = stuck
        self.log(f"{node.name} stopped: exit {node.life.exit_code}" + (" (stuck: SIGKILLed)" if stuck else ""))

    def stop_everything(self) -> None:
        """Last resort (Ctrl-C, an error): every node by its PID and process group, helpers of killed ones too."""
        for node in self.nodes:
            if node.up:
                node.terminate()
        deadline = time.monotonic() + min(30.0, self.cfg.stop_timeout)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                node.proc.kill()
                node._ended("stopped")
            node.reap(force=True)

    # -- figures --

    def audit(self) -> tuple[dict[str, Any] | None, str | None]:
        path = self.out / "audit.json"
        if not (REPO / "node" / "audit.py").is_file():
            return None, "node/audit.py is not in this checkout (the write-ahead journal's audit)"
        cmd = [sys.executable, "-m", "node.audit", str(self.run_dir), *(str(self.out / s.name) for s in self.samplers),
               "--json", str(path)]
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return None, "python -m node.audit did not finish within 600 s"
        (self.out / "audit.txt").write_text(done.stdout + done.stderr)
        print(done.stdout, end="", flush=True)
        if not path.is_file():
            return None, f"python -m node.audit exited {done.returncode} without writing {path}: {done.stderr[-500:]}"
        result = json.loads(path.read_text())
        result["exit_code"] = done.returncode
        return result, None

    def exact_first_accepted(self) -> None:
        """Restart -> first accepted group from the nodes' own records (wall-clock times of the learner's journal
        "accepted" records, of each sampler's "accepted" answers) where they exist; the soak's polling otherwise."""
        sources = [(self.learner, self.run_dir / "swarm" / JOURNAL_FILE, "e")]
        sources += [(s, self.out / s.name / ANSWERS_FILE, "a") for s in self.samplers]
        for node, path, kind in sources:
            times = sorted(r["t"] for r in read_jsonl(path) if r.get(kind) == "accepted" and "t" in r)
            if not times:
                continue
            for life in node.lives:
                end = life.started_wall + (life.ended - life.started) if life.ended is not None else None
                t = first_after(times, life.started_wall, end)
                life.extra["first_accepted_polled_s"] = life.first_accepted_s
                life.first_accepted_s = None if t is None else round(t - life.started_wall, 2)

    def figures(self, not_done: dict[str, int], plan: Plan) -> dict[str, Any]:
        audit, audit_error = self.audit()
        self.exact_first_accepted()
        lives = [dataclasses.asdict(life) for node in self.nodes for life in node.lives]
        learner_lives = []
        metrics = read_jsonl(self.run_dir / "metrics.jsonl")
        wall0 = time.time() - self.clock()
        for life in self.learner.lives:
            rows = [r for r in metrics if "loss" in r and life.started <= r.get("time", 0) - wall0 <=
                    (life.ended if life.ended is not None else float("inf"))]
            text = Path(life.extra["log"]).read_text(errors="replace") if Path(life.extra["log"]).is_file() else ""
            start, source = life_start_version(text)
            learner_lives.append({"life": life.life, "start_version": start, "start_source": source, "end": life.end,
                                  "highest_marker_at_end": life.extra.get("highest_marker_at_end"),
                                  "last_trained_version": max((r["policy_version"] for r in rows), default=None)})
        versions = check_versions(metrics, learner_lives)
        restarted = [life for node in self.nodes for life in node.lives if life.life > 1]
        timing = {
            "learner": [l.first_accepted_s for l in restarted if l.node == "learner" and l.first_accepted_s is not None],
            "sampler": [l.first_accepted_s for l in restarted if l.node != "learner" and not l.learner_down_at_start
                        and l.first_accepted_s is not None],
            "sampler_while_learner_down": [l.first_accepted_s for l in restarted if l.node != "learner"
                                           and l.learner_down_at_start and l.first_accepted_s is not None],
        }
        final = {n.name: n.life.exit_code for n in self.nodes if n.life is not None}
        failures = []
        if audit is None:
            failures.append(f"no audit: {audit_error}")
        else:
            if audit.get("lost", 1):
                failures.append(f"{audit.get('lost')} acknowledged groups lost")
            if audit.get("trained_twice", 1):
                failures.append(f"{audit.get('trained_twice')} groups trained twice")
        if self.unexpected:
            failures.append(f"{len(self.unexpected)} unexpected exits")
        # a sampler stopped by SIGTERM finishes its batch and exits 0; the learner checkpoints and exits 130
        bad_final = {k: v for k, v in final.items() if v not in ((0, 130) if k == "learner" else (0,))}
        if bad_final:
            failures.append(f"exit codes at the clean stop: {bad_final}")
        if not versions["ok"]:
            failures.append("version numbers reused or not increasing")
        load = {"mean": round(statistics.fmean(self.load), 2) if self.load else None,
                "max": round(max(self.load), 2) if self.load else None, "cpus": os.cpu_count()}
        return {
            "config": dataclasses.asdict(self.cfg),
            "command": " ".join(sys.argv),
            "duration_s": round(self.clock(), 1),
            "churn_s": round(self.churn_s, 1),
            "load_average": load,
            "kills": {**self.kills, "planned_learner": len(plan.learner_kills),
                      "planned_sampler": len(plan.sampler_kills) + sum(k for _, _, k in plan.learner_kills),
                      **not_done},
            "helpers": {"exit_s": timing_summary(self.helper_exit_s), "forced": self.helpers_forced},
            "audit": audit,
            "audit_error": audit_error,
            "outbox_left": {s.name: count_files(self.out / s.name / "outbox") for s in self.samplers},
            "restart_to_first_accepted": {k: timing_summary(v) for k, v in timing.items()},
            "exits": {"unexpected": self.unexpected, "final": final},
            "versions": versions,
            "rss": rss_summary(lives),
            "failures": failures,
            "lives": lives,
            "events": self.events,
        }

    def run(self) -> int:
        cfg = self.cfg
        plan = make_plan(cfg, self.rng)
        print(f"soak directory: {self.out}", flush=True)
        rss_due = [0.0]
        not_done: dict[str, int] = {}
        try:
            self.start_all(rss_due)
            not_done = self.churn(plan, rss_due)
            self.drain(rss_due)
        finally:
            self.stop_everything()
        fig = self.figures(not_done, plan)
        path = Path(cfg.json) if cfg.json else self.out / "soak.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fig, indent=1, default=str))
        print(report(fig), flush=True)
        print(f"figures: {path}; logs: {self.out}", flush=True)
        return 1 if fig["failures"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m scripts.soak", description=__doc__.split("\n\n")[0],
                            usage="%(prog)s [options]")
    add_dataclass_args(parser, SoakConfig, "soak")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = dataclass_from_args(SoakConfig, args).resolved()
    try:
        check_config(cfg)
    except ValueError as exc:
        print(f"python -m scripts.soak: error: {exc}", file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return Soak(cfg).run()
    except KeyboardInterrupt:
        print("\ninterrupted: every process this soak started was stopped", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
