"""Learner and sampler processes on this machine: for `make demo`, the end-to-end tests and the benchmarks.

Every process is started in its own session and stopped by its PID (SIGTERM, then SIGKILL of its process group),
so no hivemind daemon outlives the run that started it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--no-nat-port-map", "--no-auto-nat", "--no-use-relay"]


class Proc:
    """A node process whose combined output is collected in the background."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = log_path.open("w")
        self.popen = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            self._log.write(line)
            self._log.flush()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            match = regex.search(self.output)
            if match:
                return match
            if self.popen.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                match = regex.search(self.output)
                if match:
                    return match
                raise AssertionError(f"process exited ({self.popen.returncode}) before {pattern!r}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {pattern!r}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.popen.poll() is None:
            self.kill()
        self._reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)


def join_args(learner: Proc, timeout: float = 90.0) -> list[str]:
    """The --run-id/--peers/--learner-key arguments from the join command a learner prints."""
    match = learner.wait_for(r"python -m node\.sampler (.+)", timeout)
    return match.group(1).split()
