"""Test-only pause points: make a program stop at a named point so that a test can SIGKILL it exactly there.

    GEPO_TEST_PAUSE_AT=publish:after_visible        # pause at every pass through that point
    GEPO_TEST_PAUSE_AT=publish:after_visible@3      # only when it is reached for version 3

The program prints ``paused at <point> (version v)`` on stderr and sleeps until it is killed (or, for a point given
``until``, until that returns True: e.g. a clean stop requested by SIGTERM). Not for production: unset (the
default), every call is one dictionary lookup.

Points: ``publish:before_visible``, ``publish:after_visible`` (v: the version), ``learner:before_train`` (v: the
step about to be trained, its batch taken), ``learner:after_train`` (v: the step just trained and journaled, not
yet checkpointed), ``learner:before_take`` (v: the current step; the trainer stops taking, intake goes on) and
``delta:half_fetched`` (v: the version a sampler is downloading a delta into; reached when half of the delta's
chunks are verified and on disk).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

ENV = "GEPO_TEST_PAUSE_AT"
log = logging.getLogger(__name__)


def pause_point(point: str, version: int | None = None, until: Callable[[], bool] | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, only = spec.partition("@")
    if name != point or (only and version is not None and int(only) != version):
        return
    log.warning("%s: paused at %s (version %s) until killed [test-only]", ENV, point, version)
    print(f"paused at {point} (version {version})", file=sys.stderr, flush=True)
    while until is None or not until():
        time.sleep(3600 if until is None else 0.1)
