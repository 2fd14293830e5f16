"""Session life cycle: negotiation, counters, close, errors for bad input."""

from __future__ import annotations

import os
import threading

import pytest

import svq
from svq import net


def test_negotiated_features(mode: svq.Mode) -> None:
    with svq.Session("sim:net", mode=mode) as s:
        assert s.features >> 32 & 1 and s.features >> 33 & 1, "VERSION_1 and ACCESS_PLATFORM"
        assert s.features >> 29 & 1, "EVENT_IDX offered and wanted"
        assert s.backend_features == 0x7E, "MSG_V2, BATCH, ASID, SUSPEND, RESUME, ENABLE_AFTER_DRIVER_OK acked (not IOTLB_PERSIST)"
        assert s.num_queues == 3


def test_close_releases_everything_and_is_idempotent() -> None:
    before = svq.live_resources()
    dev = svq.Device("sim:net")
    s = svq.Session(dev)
    during = svq.live_resources()
    assert s.workers == min(2, len(os.sched_getaffinity(0))), "one per CPU, at most one per queue group"
    assert during["threads"] == before["threads"] + 1 + s.workers, "the device and the engine's workers"
    assert during["eventfds"] > before["eventfds"]
    assert s.live_mappings() == 1 + 2 * 3, "guest memory and two per shadow ring"
    assert dev.live_mappings() == s.live_mappings()
    s.driver.post_receive(net.RX, 10, 2048)
    s.close()
    s.close()
    assert s.closed
    assert dev.live_mappings() == 0
    with pytest.raises(svq.SessionClosedError):
        s.driver.send(net.TX, [b"x" * 64])
    dev.close()
    assert svq.live_resources() == before


def test_suspend_vring_base_resume(mode: svq.Mode) -> None:
    with svq.Session("sim:net", mode=mode) as s:
        s.driver.post_receive(net.RX, 8, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, bytes(40))] * 5)
        s.driver.wait(net.TX, 5)
        s.suspend()
        assert s.vring_base(net.TX) == 5
        s.driver.send(net.TX, [net.frame(net.BROADCAST, bytes(40))])
        with pytest.raises(TimeoutError):
            s.driver.wait(net.TX, 1, timeout=0.3)
        assert s.vring_base(net.TX) == 5
        s.resume()
        s.driver.wait(net.TX, 1)
        assert s.vring_base(net.TX) == 6


def test_wait_releases_the_interpreter() -> None:
    """A thread blocked in wait() does not stop another thread from running Python."""
    with svq.Session("sim:net") as s:
        ticks = 0
        stop = threading.Event()

        def spin() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1

        t = threading.Thread(target=spin)
        t.start()
        with pytest.raises(TimeoutError):
            s.driver.wait(net.RX, 1, timeout=0.3)
        stop.set()
        t.join()
        assert ticks > 1000


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"mode": "bogus"}, ValueError),
        ({"queue_size": 100}, ValueError),
        ({"memory": [(0x4000_0000, 1000)]}, ValueError),
        ({"memory": [(0x4000_0000, 1 << 20), (0x4008_0000, 1 << 20)]}, ValueError),
        ({"memory": [(0x4000_0000, 4096)]}, svq.GuestMemoryError),
    ],
)
def test_bad_session_arguments(kwargs: dict, exc: type[Exception]) -> None:
    with svq.Device("sim:net") as dev:
        with pytest.raises(exc):
            svq.Session(dev, **kwargs)
        assert dev.live_mappings() == 0


def test_bad_device_specs() -> None:
    with pytest.raises(ValueError, match="unknown embedded device"):
        svq.Device("sim:gpu")
    with pytest.raises(ValueError, match="bad MAC"):
        svq.Device("sim:net,mac=zz")
    with pytest.raises(FileNotFoundError):
        svq.Device("/dev/vhost-vdpa-does-not-exist")
    with pytest.raises(FileNotFoundError):
        svq.Device("no-such-vdpa-device")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("sim:net,pairs=0", "pairs=0 .* must be 1..=8"),
        ("sim:net,pairs=9", "pairs=9 .* must be 1..=8"),
        ("sim:net,mtu=20", "mtu=20 .* must be 68..=65535"),
        ("sim:net,mtu=70000", "must be 68..=65535"),
        ("sim:net,mac=01:00:5e:00:00:01", "multicast"),
        ("sim:net,echo=10.0.0.2,echo_mac=ff:ff:ff:ff:ff:ff", "multicast"),
        ("sim:net,pairs=2,pairs=3", "given twice"),
        ("sim:net,sectors=8", "unknown or invalid option .*options: mac, mtu"),
        ("sim:blk,sectors=0", "sectors=0 .* must be 1..="),
        ("sim:blk,latency_us=99999999999", "must be 0..=10000000"),
        ("sim:blk,disk=", "unknown or invalid option"),
        ("sim:net,", "options are key=value"),
    ],
)
def test_embedded_device_options_out_of_range_are_named(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        svq.Device(spec)


def test_wait_arguments() -> None:
    with svq.Session("sim:net") as s:
        with pytest.raises(ValueError):
            s.driver.wait(net.RX, 1, timeout=-1)
        with pytest.raises(ValueError, match="no queue 7"):
            s.driver.send(7, [b"x"])
        with pytest.raises(ValueError):
            s.driver.send(net.TX, [b"x"], segments=0)


def test_guest_memory_exhaustion_is_an_error_not_a_crash() -> None:
    with svq.Session("sim:net", memory=[(0x4000_0000, 64 << 10)]) as s:
        with pytest.raises(svq.GuestMemoryError):
            s.driver.send(net.TX, [net.frame(net.BROADCAST, bytes(4000))] * 100)
        # What was posted before the failure was published and completes normally.
        posted = s.driver.in_flight(net.TX)
        assert 0 < posted < 100
        assert len(s.driver.wait(net.TX, posted)) == posted
        assert s.driver.in_flight(net.TX) == 0


def test_a_file_that_is_not_vhost_vdpa_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="not a vhost-vdpa device"):
        svq.Device("/dev/null")


def test_a_waiting_thread_does_not_block_the_others() -> None:
    """One thread waits for RX while another sends the frames that satisfy it."""
    with svq.Session("sim:net") as s:
        s.driver.post_receive(net.RX, 4, 2048)
        got: list = []
        waiter = threading.Thread(target=lambda: got.extend(s.driver.wait(net.RX, 4, timeout=10)))
        waiter.start()
        for i in range(4):
            s.driver.send(net.TX, [net.frame(net.BROADCAST, bytes([i]) * 10)])
        waiter.join(timeout=10)
        assert [d[-1] for _, _, d in got] == [0, 1, 2, 3]
        s.driver.wait(net.TX, 4)


def test_a_timeout_keeps_what_did_complete() -> None:
    with svq.Session("sim:net") as s:
        s.driver.post_receive(net.RX, 2, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"only one")])
        with pytest.raises(TimeoutError) as e:
            s.driver.wait(net.RX, 2, timeout=0.3)
        [(_, _, data)] = e.value.completions
        assert data.endswith(b"only one")
        s.driver.wait(net.TX, 1)


def test_devices_open_and_close_quickly_without_hanging() -> None:
    """The embedded device's thread always sees a stop request, however it races with
    the device's own wake-ups."""
    for _ in range(300):
        dev = svq.Device("sim:net")
        dev.status()
        dev.close()
