"""Paths the tests share, computed from this checkout rather than spelled out for one machine."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The data sets live beside the repository (`<repo root>/../shared/data`), not inside it.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
