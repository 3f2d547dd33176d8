"""Version numbers that stay unique across any crash of the learner.

Before a version becomes visible to the swarm, ``publishing_version`` is written (write-ahead: temporary file, fsync,
rename); after it, ``published_version``. A restarted learner continues above the higher of the two, so a kill at
any instant of ``publish`` (even between making version v visible and recording it) can never give samplers a
second, different set of weights under the number v. A number whose publish was cut short before it became visible
is simply skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from node.fault_points import pause_point

PUBLISHING, PUBLISHED = "publishing_version", "published_version"


def _write(path: Path, version: int) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(str(version))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself must reach the disk before the version is visible
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class PublishGuard:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def before_visible(self, version: int) -> None:
        _write(self.run_dir / PUBLISHING, version)
        pause_point("publish:before_visible", version)

    def after_visible(self, version: int) -> None:
        pause_point("publish:after_visible", version)
        _write(self.run_dir / PUBLISHED, version)

    def highest(self) -> int | None:
        """The highest version number this run may have shown to the swarm (None: none yet)."""
        seen = [v for v in (_read(self.run_dir / PUBLISHING), _read(self.run_dir / PUBLISHED)) if v is not None]
        return max(seen) if seen else None
