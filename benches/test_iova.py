"""The IOVA allocator against the linear first-fit peer (both timed in Rust, same run):
ns per operation at several live-mapping counts after fragmentation."""

from __future__ import annotations

import pytest

from svq import _native


@pytest.mark.parametrize("live", [1_000, 100_000], ids=lambda n: f"{n // 1000}k")
@pytest.mark.benchmark(group="iova")
def test_iova_vs_first_fit(benchmark, live: int) -> None:  # type: ignore[no-untyped-def]
    f = benchmark.pedantic(_native.bench_iova, args=(live, 2_000, 20), rounds=1, iterations=1)
    benchmark.extra_info.update(f)
    assert f["agree"], "svq and the first-fit peer placed or looked up differently"
    assert f["live"] == live
    if live >= 100_000:
        # A sanity bound only (10x below the >= 1000x target): the peer is linear.
        pair = (f["peer_alloc_ns"] + f["peer_free_ns"]) / (f["svq_alloc_ns"] + f["svq_free_ns"])
        assert pair > 100, f
