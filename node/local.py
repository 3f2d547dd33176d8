"""Learner and sampler processes on this machine: for `make demo`, the end-to-end tests and the benchmarks.

Every process is started in its own session (so its libp2p daemon and forked DHT process share its process group)
and stopped by its PID: SIGTERM, then SIGKILL of its process group.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--no-nat-port-map", "--no-auto-nat", "--no-use-relay"]


class Proc:
    """A Python process (``python ARGS...`` in the repository root) whose output is collected in the background.

    By default stderr is merged into stdout, and every line goes to ``lines`` and to ``log_path``. With
    ``split_stderr`` stderr goes straight to ``log_path`` and only stdout lines pass through :meth:`on_line` (for
    children that speak a line protocol on stdout, see :class:`JsonProc`). With ``stdin`` the child's stdin is a pipe
    (``popen.stdin``)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, *, stdin: bool = False,
                 split_stderr: bool = False) -> None:
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.log_path = Path(log_path)
        self._log = self.log_path.open("w")
        self.popen = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                                      stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
                                      stderr=self._log if split_stderr else subprocess.STDOUT, text=True,
                                      start_new_session=True)
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.on_line(line)

    def on_line(self, line: str) -> None:
        """Called (in the reader thread) for each line the child writes to stdout."""
        self.lines.append(line)
        self._write_log(line)

    def _write_log(self, line: str) -> None:
        self._log.write(line)
        self._log.flush()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def log_text(self) -> str:
        """Everything in the log file so far (with ``split_stderr``: stderr and stdout)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.output)
            if match:
                return match
            if self.popen.poll() is not None:
                self._reader.join(5)  # let the reader catch the last lines
                match = regex.search(self.output)
                if match:
                    return match
                raise AssertionError(f"process exited ({self.popen.returncode}) before {pattern!r}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {pattern!r}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "".join(self.log_text().splitlines(keepends=True)[-n:])

    def terminate(self) -> None:
        """SIGTERM the process (by its PID) if it is still running; :meth:`stop` waits for it."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, up to ``timeout`` s to exit, then SIGKILL of whatever is left of its process group."""
        self.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        self._reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process group (the process, its libp2p daemon, its DHT process, ...), named by the process's
        PID: also what a crashed or exited process left behind."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


def stop_all(procs: list[Proc], timeout: float = 30.0) -> None:
    """Stop several processes at once: SIGTERM to all, a shared ``timeout`` to exit, then :meth:`Proc.kill` each."""
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.stop(max(0.1, deadline - time.monotonic()))


class JsonProc(Proc):
    """A child that speaks JSON lines: commands written to its stdin (:meth:`send`), events (JSON objects with an
    ``"event"`` field) read from its stdout into ``events`` (a queue, consumed by :meth:`wait_event`) and ``history``
    (all of them, in order). Every line of stdout and stderr also goes to the log."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.history: list[dict[str, Any]] = []
        super().__init__(args, log_path, env, stdin=True, split_stderr=True)

    def on_line(self, line: str) -> None:
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.history.append(event)
                self.events.put(event)
                self._write_log(line)
                return
        super().on_line(line)

    def send(self, **cmd: Any) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(cmd) + "\n")
        self.popen.stdin.flush()

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The next event called ``name`` whose fields equal ``match``; the events before it are consumed (they stay
        in ``history``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name!r} event {match or ''} from pid {self.pid} within {timeout:.0f} s; "
                                   f"log tail:\n{self.tail()}")
            try:
                event = self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.popen.poll() is not None:
                    self._reader.join(5)
                    if self.events.empty():
                        raise RuntimeError(f"pid {self.pid} exited ({self.popen.returncode}) before a {name!r} "
                                           f"event; log tail:\n{self.tail()}") from None
                continue
            if event.get("event") == name and all(event.get(k) == v for k, v in match.items()):
                return event

    def request(self, name: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send command ``name`` and wait for the event of the same name that answers it."""
        self.send(cmd=name, **fields)
        return self.wait_event(name, timeout)


def join_args(learner: Proc, timeout: float = 90.0) -> list[str]:
    """The --run-id/--peers/--learner-key arguments from the join command a learner prints."""
    match = learner.wait_for(r"python -m node\.sampler (.+)", timeout)
    return match.group(1).split()
