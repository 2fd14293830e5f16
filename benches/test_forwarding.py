"""Forwarding through the shadow virtqueue (translate mode) against passthrough on the
same embedded device: frames per second through TX→RX loopback, batched; and svq's
forwarding loop in process against the pure-Python shadow virtqueue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pyring
import svq
from svq import _native, bench, net

BATCH = 128
CASES = [(1, 64), (4, 64), (1, 1500), (4, 1500)]


@pytest.fixture(params=[svq.Mode.TRANSLATE, svq.Mode.PASSTHROUGH], ids=lambda m: m.value)
def session(request: pytest.FixtureRequest) -> Iterator[svq.Session]:
    with svq.Session("sim:net", mode=request.param) as s:
        yield s


def round_trip(s: svq.Session, frames: list[bytes], segments: int) -> None:
    s.driver.post_receive(net.RX, len(frames), 2048)
    s.driver.send(net.TX, frames, segments)
    got = s.driver.wait(net.RX, len(frames))
    s.driver.wait(net.TX, len(frames))
    assert len(got) == len(frames)
    assert got[0][2] == frames[0]


@pytest.mark.parametrize("segments,size", CASES, ids=[f"{s}seg-{b}B" for s, b in CASES])
@pytest.mark.benchmark(group="forwarding-e2e")
def test_loopback_batch(benchmark, session: svq.Session, segments: int, size: int) -> None:  # type: ignore[no-untyped-def]
    frames = [net.frame(net.BROADCAST, bytes(size - 26))] * min(BATCH, 256 // segments)
    benchmark.extra_info["frames_per_round"] = len(frames)
    benchmark(round_trip, session, frames, segments)


IN_PROCESS = {"svq": (_native.bench_forward, 3200), "pure-python": (pyring.py_forward, 320)}


@pytest.mark.parametrize("peer", list(IN_PROCESS))
@pytest.mark.parametrize("segments,size", CASES, ids=[f"{s}seg-{b}B" for s, b in CASES])
@pytest.mark.benchmark(group="forwarding-inprocess")
def test_inprocess(benchmark, peer: str, segments: int, size: int) -> None:  # type: ignore[no-untyped-def]
    """svq's shadow virtqueue and the pure-Python one over the same rings: both forward
    the same chains (the same checksum of forwarded addresses and lengths)."""
    forward, elements = IN_PROCESS[peer]
    r = benchmark(forward, segments, size, elements)
    benchmark.extra_info.update(r)
    assert r["checksum"] == bench.expected_forward_checksum(segments, size, r["elements"])
