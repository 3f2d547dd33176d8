"""scripts/bench/bench_swarm.py's full-versions-vs-deltas rows, at a tiny size: a learner and 2 samplers as OS
processes on 127.0.0.1, versions from a folder laid out as scripts/bench/delta_versions.py writes it (here slowly
changing bf16 buffers, tests/swarm_helpers/node_proc.evolving_weights, instead of real SmolLM2 versions).

Checks what the figures rest on: in the delta row every sampler reached every version by the step delta (so the
time measured is the delta path's), every buffer was bit-exact (the benchmark raises otherwise), the learner
uploaded about one delta per version instead of one full version, and the late sampler caught up by the cumulative
delta from the keyframe it held. No timing is asserted. Every process is stopped by PID (the benchmark's own
``finally``).
"""

from __future__ import annotations

import argparse

import pytest

from tests.swarm_helpers.node_proc import evolving_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIZE = 4 << 20
VERSIONS = 3  # v0 (the keyframe, fetched in full) and two measured versions


def bench_args(folder: str) -> argparse.Namespace:
    return argparse.Namespace(limit=20e6, size=SIZE, chunk_size=1 << 20, weights="smollm2", versions_dir=folder,
                              repeats=VERSIONS - 1, timeout=120.0, late=True)


def test_delta_row_reaches_every_version_by_deltas_bit_exact(tmp_path):
    from scripts.bench import bench_swarm

    folder = tmp_path / "versions"
    folder.mkdir()
    for v in range(VERSIONS):  # evolving_weights: version 1 is random, each later one changes ~1 % of elements
        (folder / f"v{v:04d}.bin").write_bytes(evolving_weights(v + 1, SIZE))
    a = bench_args(str(folder))
    (tmp_path / "run").mkdir()

    delta = bench_swarm.distribution(2, "swarm", a, str(tmp_path / "run"), "delta")
    assert len(delta["times"]) == VERSIONS - 1
    for v, plans in enumerate(delta["plans"], start=1):
        assert all(p is not None and [b for b, _, _ in p] == [v - 1] for p in plans), (v, plans)
    for upload, step in zip(delta["uploads"], delta["step_delta_sizes"]):
        assert step is not None and step < 0.1 * SIZE
        assert upload < 3 * step, "the learner sent far more than the delta"
    late = delta["late"]
    assert late["behind"] == VERSIONS - 1
    assert late["plan"] is not None and [b for b, _, _ in late["plan"]] == [0], late
    assert late["bytes_down"] < 0.2 * SIZE

    full = bench_swarm.distribution(2, "swarm", a, str(tmp_path / "run"), "full")
    assert all(p is None for plans in full["plans"] for p in plans)  # deltas off: no catch-up plans
    assert all(u >= SIZE for u in full["uploads"])
    assert full["late"]["bytes_down"] >= SIZE
