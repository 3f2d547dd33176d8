"""Shared test set-up: offline hub, a throwaway HF_HOME, and process hygiene.

The environment is set at import time, before any test module imports transformers or datasets, so that no test
can reach for a model hub (these machines have none; a hub lookup would retry with back-off for a minute).
"""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if "GEPO_TEST_KEEP_HF_HOME" not in os.environ:
    _hf_home = tempfile.mkdtemp(prefix="gepo-hf-home-")
    os.environ["HF_HOME"] = _hf_home
else:  # pragma: no cover - debugging aid
    _hf_home = None

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _hf_home:
        shutil.rmtree(_hf_home, ignore_errors=True)


@pytest.fixture
def seed_everything():
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's in-process model runs (restored afterwards): the tiny models are
    fastest on one, and on a shared 2-core machine extra threads spin at OpenMP barriers and crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
