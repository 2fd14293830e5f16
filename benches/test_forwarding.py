"""Forwarding through the shadow virtqueue (translate mode) against passthrough on the
same embedded device: frames per second through TX→RX loopback, batched."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import svq
from svq import net

BATCH = 128
FRAMES = [net.frame(net.BROADCAST, bytes(64 - 26))] * BATCH


@pytest.fixture(params=[svq.Mode.TRANSLATE, svq.Mode.PASSTHROUGH], ids=lambda m: m.value)
def session(request: pytest.FixtureRequest) -> Iterator[svq.Session]:
    with svq.Session("sim:net", mode=request.param) as s:
        yield s


def round_trip(s: svq.Session) -> None:
    s.driver.post_receive(net.RX, BATCH, 2048)
    s.driver.send(net.TX, FRAMES)
    got = s.driver.wait(net.RX, BATCH)
    s.driver.wait(net.TX, BATCH)
    assert len(got) == BATCH


@pytest.mark.benchmark(group="forwarding-64B")
def test_loopback_batch(benchmark, session: svq.Session) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["frames_per_round"] = BATCH
    benchmark(round_trip, session)
