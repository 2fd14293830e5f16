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
# The real-client tier boots qemu guests: tests/vm/run sets SVQ_VM_TIER.
collect_ignore += [] if os.environ.get("SVQ_VM_TIER") else ["vm"]


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Nothing svq holds may outlive a test. A test marked ``quarantines`` makes a device
    refuse its reset or unmaps on purpose: the memory it may still reach is kept (and the
    test checks that), everything else must still be released."""
    gc.collect()
    before = dict(svq.live_resources())
    yield
    gc.collect()
    after = dict(svq.live_resources())
    if request.node.get_closest_marker("quarantines"):
        before.pop("quarantined_bytes")
        after.pop("quarantined_bytes")
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
