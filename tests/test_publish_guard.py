"""The learner's version markers (node/publish_guard.py) and the test-only pause points (node/fault_points.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from node.local import REPO
from node.publish_guard import PUBLISHED, PUBLISHING, PublishGuard


def test_the_highest_marker_wins_and_a_torn_one_is_ignored(tmp_path):
    guard = PublishGuard(tmp_path)
    assert guard.highest() is None
    guard.before_visible(3)
    assert guard.highest() == 3  # a kill right after this line: 3 may be visible, never reuse it
    guard.after_visible(3)
    guard.before_visible(4)
    assert (tmp_path / PUBLISHED).read_text() == "3" and guard.highest() == 4
    (tmp_path / PUBLISHING).write_text("")  # not something _write leaves, but must not crash a restart
    assert guard.highest() == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_pause_point_pauses_only_where_and_when_asked(tmp_path, monkeypatch):
    from node import fault_points

    monkeypatch.delenv(fault_points.ENV, raising=False)
    fault_points.pause_point("publish:after_visible", 1)  # unset: returns at once
    monkeypatch.setenv(fault_points.ENV, "publish:after_visible@2")
    fault_points.pause_point("publish:after_visible", 1)  # another version
    fault_points.pause_point("publish:before_visible", 2)  # another point
    code = "from node.publish_guard import PublishGuard; import sys; PublishGuard(sys.argv[1]).after_visible(2)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, fault_points.ENV: "publish:after_visible@2"})
    try:
        lines = [proc.stderr.readline().strip() for _ in range(2)]  # the log warning, then the line tests wait for
        assert lines[-1] == "paused at publish:after_visible (version 2)", lines
        assert proc.poll() is None and not (tmp_path / PUBLISHED).exists()
    finally:
        proc.kill()
        proc.wait(10)
