"""Fault injection: the n-th map, unmap, device call or eventfd creation fails, for every
n a scenario reaches. Every partial step is unwound, the error keeps its cause, and the
counters of live mappings, bounce buffers, eventfds and threads return to where they were
(the autouse leak check runs after each test too)."""

from __future__ import annotations

import errno

import pytest

import svq
from svq import _native, net

pytestmark = pytest.mark.hostile

MODES = {
    "translate": {"mode": svq.Mode.TRANSLATE},
    "copy-cvq-isolated": {"mode": svq.Mode.PASSTHROUGH, "queue_modes": {net.CTRL: svq.Mode.COPY}},
    "copy-per-element": {"mode": svq.Mode.COPY, "copy_strategy": "per-element"},
}


def calls_in_a_start(point: str, kwargs: dict) -> int:
    with svq.Device("sim:net") as dev:
        dev.fail_at(point, 0)
        with svq.Session(dev, **kwargs):
            n = dev.calls_seen(point)
    assert n > 0
    return n


def works(dev: svq.Device, kwargs: dict) -> None:
    with svq.Session(dev, **kwargs) as s:
        s.driver.post_receive(net.RX, 1, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"ok")])
        assert s.driver.wait(net.RX, 1)[0][2].endswith(b"ok")


@pytest.mark.parametrize("setup", list(MODES))
@pytest.mark.parametrize("point, err", [("map", errno.ENOMEM), ("ioctl", errno.EIO)])
def test_every_failing_call_of_a_start_is_unwound(setup: str, point: str, err: int) -> None:
    kwargs = MODES[setup]
    total = calls_in_a_start(point, kwargs)
    for n in range(1, total + 1):
        with svq.Device("sim:net") as dev:
            dev.fail_at(point, n)
            with pytest.raises(OSError) as e:
                svq.Session(dev, **kwargs)
            assert e.value.errno == err and "injected failure" in str(e.value), f"call {n}"
            assert dev.live_mappings() == 0, f"call {n}"
            assert svq.live_resources()["bounce_buffers"] == 0
            works(dev, kwargs)


@pytest.mark.parametrize("setup", list(MODES))
def test_every_failing_eventfd_of_a_start_is_unwound(setup: str) -> None:
    kwargs = MODES[setup]
    before = svq.live_resources()
    n = 1
    while True:
        with svq.Device("sim:net") as dev:
            _native.fail_eventfd_at(n)
            try:
                svq.Session(dev, **kwargs).close()
                _native.fail_eventfd_at(0)
                break  # the start needed fewer than n eventfds
            except OSError as e:
                assert e.errno == errno.EMFILE, n
            assert dev.live_mappings() == 0
        assert svq.live_resources() == before, f"eventfd {n}"
        n += 1
    assert n > 4, "a start creates several eventfds"


@pytest.mark.quarantines
@pytest.mark.parametrize("setup", list(MODES))
def test_failing_unmaps_on_close_keep_the_cause_and_release_the_rest(setup: str) -> None:
    kwargs = MODES[setup]
    kept = svq.live_resources()["quarantined_bytes"]
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev, **kwargs)
        dev.fail_at("unmap", 1)
        with pytest.raises(OSError) as e:
            s.close()
        assert e.value.errno == errno.EIO and "invalidate" in str(e.value)
        s.close()  # idempotent: nothing more to do, no second error
        assert s.closed
        assert svq.live_resources()["bounce_buffers"] == 0
        # What the device still maps is kept, not freed.
        assert svq.live_resources()["quarantined_bytes"] > kept
        # The device kept what it refused to unmap; a new session resets it and works.
        works(dev, kwargs)
        assert dev.live_mappings() == 0


@pytest.mark.quarantines
@pytest.mark.parametrize("n", [1, 2, 3])
def test_failing_device_calls_on_close_still_release_everything(n: int) -> None:
    kept = svq.live_resources()["quarantined_bytes"]
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev, mode=svq.Mode.COPY)
        dev.fail_at("ioctl", n)
        with pytest.raises(OSError, match="injected failure"):
            s.close()
        assert svq.live_resources()["bounce_buffers"] == 0
        # The first two calls are the reset and the read-back that proves it: without
        # both, the device may still run on svq's memory, which is kept.
        assert (svq.live_resources()["quarantined_bytes"] > kept) == (n <= 2)
        works(dev, MODES["translate"])


def test_bad_fault_point() -> None:
    with svq.Device("sim:net") as dev, pytest.raises(ValueError, match="unknown fault point"):
        dev.fail_at("disk", 1)
