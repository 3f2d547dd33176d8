"""Test-only pause points: make a program stop at a named point so that a test can SIGKILL it exactly there.

    GEPO_TEST_PAUSE_AT=publish:after_visible        # pause at every pass through that point
    GEPO_TEST_PAUSE_AT=publish:after_visible@3      # only when it is reached for version 3

The program prints ``paused at <point> (version v)`` on stderr and sleeps until it is killed. Not for production:
unset (the default), every call is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import sys
import time

ENV = "GEPO_TEST_PAUSE_AT"
log = logging.getLogger(__name__)


def pause_point(point: str, version: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, only = spec.partition("@")
    if name != point or (only and version is not None and int(only) != version):
        return
    log.warning("%s: paused at %s (version %s) until killed [test-only]", ENV, point, version)
    print(f"paused at {point} (version {version})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
