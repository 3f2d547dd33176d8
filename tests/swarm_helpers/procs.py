"""Swarm test nodes as OS processes (``python -m tests.swarm_helpers.node_proc ...``), on top of node/local.py.

A node reads JSON commands on stdin and writes JSON events on stdout (:class:`node.local.JsonProc`); it is stopped
like every process of this project, by its PID (SIGTERM: a graceful shutdown, then SIGKILL of its process group).
:meth:`NodeProc.crash` is the fault the tests inject: SIGKILL of the node's main process only.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional, Tuple

import psutil

from node.local import JsonProc, stop_all  # noqa: F401  (stop_all: re-exported for the tests)

Pid = Tuple[int, float]  # (pid, creation time): names one process even if the PID is reused later

#: learner flags for the tests that bound its upload per version: on a loaded 2-core machine honest samplers can take
#: longer than the default 5 s interval / 2 s hoarding grace to pass a chunk on, and the learner then serves another
#: copy (2.00x and 2.1x seen on loaded CI-like runs).
PATIENT_RATION = ["--ration-interval", "15", "--set", "hoard_grace=6"]


class NodeProc(JsonProc):
    def __init__(self, args: List[str], log_path: Path, netns: Optional[str] = None, env: Optional[dict] = None):
        """``netns``: run inside that network namespace (the emulated WAN of tests/test_wan.py); ``env``: extra
        environment variables (e.g. a test-only pause point, node/fault_points.py)."""
        self.args = list(args)
        launcher = ["-m", "scripts.wan_emu.netns_exec", netns] if netns else ["-m"]
        super().__init__([*launcher, "tests.swarm_helpers.node_proc", *args], log_path,
                         env=None if env is None else {**os.environ, **env})

    def crash(self) -> List[Pid]:
        """SIGKILL only the main process; returns its helpers (the forked DHT process, the libp2p daemon), which
        must then exit by themselves (the DHT process watches its parent and takes the daemon down with it)."""
        helpers = [(p.pid, p.create_time()) for p in psutil.Process(self.pid).children(recursive=True)]
        self.popen.kill()
        self.popen.wait(10)
        return helpers


def alive(proc: Pid) -> bool:
    pid, created = proc
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_helpers_exit(helpers: List[Pid], timeout: float = 10.0) -> None:
    """The helpers :meth:`NodeProc.crash` returned exit by themselves within ``timeout`` s (nothing is left behind that
    would hold the crashed node's port or identity)."""
    assert helpers, "the node had no DHT process / libp2p daemon to check"
    wait_until(lambda: not any(alive(p) for p in helpers), timeout,
               f"the crashed node's DHT process and libp2p daemon ({helpers}) to exit on their own")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something true (returned), or raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def settle(learner: NodeProc, samplers) -> dict:
    """Wait until every sampler's outbox is empty (every group answered) and the learner's inbox is empty (its
    trainer side took everything it accepted); returns the learner's stats. The learner answers ``stats`` only
    after reporting the groups taken so far, so from then on ``learner.history`` holds a ``rollout`` event for every
    group that learner process accepted (or reloaded after a restart)."""
    for s in samplers:
        wait_until(lambda s=s: s.request("stats")["stats"]["outbox"] == 0, 60, f"the outbox of {s.args[2]} to drain")

    def taken():
        st = learner.request("stats")["stats"]
        return st if st["inbox"] == 0 else None

    return wait_until(taken, 30, "the learner's trainer side to take every accepted group")


def rollouts(*learners: NodeProc) -> Counter:
    """How often each (sampler key, seq) reached the trainer side of these learner processes."""
    return Counter((ev["sampler"], ev["seq"]) for lr in learners for ev in lr.history if ev.get("event") == "rollout")
