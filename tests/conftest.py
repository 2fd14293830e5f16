"""Shared fixtures. Every test is checked for leaks: the eventfds and worker threads svq
holds must be back to where they were once the test's objects are gone."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

import svq


# The kernel tier needs a /dev/vhost-vdpa-* device: it runs inside the guest that
# tests/kernel/run boots (which sets SVQ_KERNEL_NET), and is not collected elsewhere.
collect_ignore = [] if os.environ.get("SVQ_KERNEL_NET") else ["kernel"]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    gc.collect()
    before = svq.live_resources()
    yield
    gc.collect()
    after = svq.live_resources()
    assert after == before, f"leaked OS resources: before {before}, after {after}"


@pytest.fixture(params=[svq.Mode.TRANSLATE, svq.Mode.PASSTHROUGH], ids=lambda m: m.value)
def mode(request: pytest.FixtureRequest) -> svq.Mode:
    return request.param


@pytest.fixture
def net_session(mode: svq.Mode) -> Iterator[svq.Session]:
    with svq.Device("sim:net") as dev, svq.Session(dev, mode=mode) as s:
        yield s
        s.close()
        assert dev.live_mappings() == 0
