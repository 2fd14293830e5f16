"""Notifications per element under sustained load (event idx on vs off), and the Python
boundary: one batch call against one call per element."""

from __future__ import annotations

import pytest

from svq import bench


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.benchmark(group="notify")
def test_sustained_notifications(benchmark, event_idx: bool) -> None:  # type: ignore[no-untyped-def]
    r = benchmark.pedantic(bench._sustained, args=(event_idx, 40), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in r.items() if k != "tx"})
    benchmark.extra_info.update(r["tx"])
    assert r["elements"] == 32 * (40 + 4)
    if event_idx:
        # 10x the target (<= 1 kick per 32 elements): a sanity bound, not the target.
        assert r["kicks_per_elem"] <= 10 / 32, r


@pytest.mark.benchmark(group="boundary")
def test_batch_vs_per_element_calls(benchmark) -> None:  # type: ignore[no-untyped-def]
    plan = bench.plan(quick=True)
    plan.boundary_reps = 2
    [row] = benchmark.pedantic(bench.boundary_rows, args=(plan,), rounds=1, iterations=1)
    benchmark.extra_info.update({"batch_ns": row.svq, "per_call_ns": row.peer})
    assert row.svq and row.peer
