"""A session's device state moved to another device: ring positions, requests a device
that completes out of order still held (submitted again, each completing once), the
virtio-net state; svq's own guest riding along, or an external guest's state as JSON; and
every failure leaving the guest where it was, ready for another device."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest

import svq
from svq import blk, net
from tests.vmguest import VERSION_1, PyGuest

NEW_MAC = net.parse_mac("02:00:00:00:0a:0b")
VIRTIO_NET_F_MAC = 1 << 5
_disks = itertools.count()


def numbered(seq: int) -> bytes:
    return net.frame(net.BROADCAST, seq.to_bytes(4, "little") * 30)


@pytest.fixture
def disk() -> str:
    """A disk name of this test's own (devices naming it share its data)."""
    return f"save-restore-{next(_disks)}"


@pytest.mark.parametrize("data_mode", [svq.Mode.TRANSLATE, svq.Mode.COPY, svq.Mode.PASSTHROUGH], ids=lambda m: m.value)
def test_a_net_guest_moves_between_devices_mid_traffic_losing_nothing(data_mode: svq.Mode) -> None:
    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        s = svq.Session(a, mode=data_mode, queue_modes={net.CTRL: svq.Mode.COPY})
        for c in [net.mac_addr_set(NEW_MAC), net.vlan_add(7), net.rx_mode("allmulti", False)]:
            assert s.driver.request(net.CTRL, [c], 1)[1] == bytes([net.ACK_OK])
        tracked = s.net_state()
        received: list[bytes] = []
        sent = 0
        for round_ in range(12):
            frames = [numbered(sent + i) for i in range(16)]
            s.driver.post_receive(net.RX, 16, 2048)
            s.driver.send(net.TX, frames)
            sent += 16
            # Saved at once: some frames are still in the guest's ring, some looped back.
            saved = s.save()
            assert s.closed and saved.carries_guest
            assert saved.state["net"] == tracked
            s = svq.Session(b if round_ % 2 == 0 else a, mode=data_mode, queue_modes={net.CTRL: svq.Mode.COPY}, resume=saved)
            assert not saved.carries_guest, "the guest moved into the new session"
            assert s.net_state() == tracked
            received.extend(d for _, _, d in s.driver.wait(net.RX, 16))
            s.driver.wait(net.TX, 16)
        assert received == [numbered(i) for i in range(sent)], "every frame once, in order"
        # The new device filters by the replayed state: a frame to another MAC is dropped.
        assert b.sim_stats()["ctrl_commands"] >= 3
        s.driver.post_receive(net.RX, 2, 2048)
        s.driver.send(net.TX, [net.frame(net.parse_mac("02:00:00:00:00:99"), b"not mine"), net.vlan_frame(NEW_MAC, 7, b"v7")])
        assert [d for _, _, d in s.driver.wait(net.RX, 1)] == [net.vlan_frame(NEW_MAC, 7, b"v7")]
        s.close()
        assert a.live_mappings() == b.live_mappings() == 0


def submit_writes(s: svq.Session, count: int) -> dict[int, bytes]:
    """One write of a distinct 4 KiB pattern per request; the data by head. Returns once
    svq forwarded them all and the device had a moment to take them."""
    by_head = {}
    for i in range(count):
        data = bytes([i]) * 4096
        by_head[s.driver.submit(0, [blk.header(blk.T_OUT, 8 * i), data], [1])] = data
    deadline = time.monotonic() + 5
    while s.stats(0)["elements"] < count and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.005)
    return by_head


def test_blk_requests_the_device_held_complete_once_on_the_next_device(disk: str) -> None:
    spec = f"sim:blk,disk={disk},latency_us=40000"
    with svq.Device(spec) as a, svq.Device(spec) as b:
        s = svq.Session(a)
        by_head = submit_writes(s, 48)
        saved = s.save()
        [q] = saved.state["queues"]
        assert q["inflight"], "the device held requests when it was suspended"
        assert sorted(q["inflight"]) == sorted(set(q["inflight"]))
        assert set(q["inflight"]) <= set(by_head)
        with svq.Session(b, resume=saved) as s2:
            done = s2.driver.wait(0, len(by_head))
            assert sorted(h for h, _, _ in done) == sorted(by_head), "each request completes exactly once"
            assert all(length == 1 and data == bytes([blk.S_OK]) for _, length, data in done)
            with pytest.raises(TimeoutError):
                s2.driver.wait(0, 1, timeout=0.1)
        # The data is on the shared disk, as a third device (without a latency) reads it.
        with svq.Session(f"sim:blk,disk={disk}") as reader:
            disk_view = blk.Blk(reader.driver)
            for i in range(48):
                assert disk_view.read(8 * i, 8) == bytes([i]) * 4096


def test_an_external_guests_state_travels_as_json(disk: str) -> None:
    g = PyGuest()
    spec = f"sim:blk,disk={disk},latency_us=40000"
    try:
        ring = g.ring(0)
        with svq.Device(spec) as a, svq.Device(spec) as b:
            s = svq.Session(a, guest=g.external(VERSION_1))
            heads = {ring.add([blk.header(blk.T_OUT, 8 * i), bytes([i + 1]) * 4096], [1]) for i in range(32)}
            ring.publish()
            time.sleep(0.005)
            saved = s.save()
            assert not saved.carries_guest
            wire = saved.to_json()
            again = svq.SavedState.from_json(wire)
            assert again.state == saved.state
            with svq.Session(b, guest=g.external(VERSION_1), resume=again):
                done = ring.reap(32)
                assert {h for h, _, _ in done} == heads
            assert b.live_mappings() == 0
    finally:
        g.close()


def test_a_state_that_does_not_fit_is_refused_and_the_guest_stays(disk: str) -> None:
    spec = f"sim:blk,disk={disk},latency_us=40000"
    with svq.Device(spec) as a, svq.Device("sim:net") as wrong, svq.Device(spec) as b:
        s = svq.Session(a)
        by_head = submit_writes(s, 16)
        saved = s.save()
        with pytest.raises(svq.StateError, match="device class 2 onto class 1"):
            svq.Session(wrong, resume=saved)
        assert saved.carries_guest, "the guest is still in the state"
        assert wrong.live_mappings() == 0
        # A map the next device refuses: the session does not start, the guest stays.
        b.fail_at("map", 1)
        with pytest.raises((OSError, svq.SvqError)):
            svq.Session(b, resume=saved)
        assert saved.carries_guest and b.live_mappings() == 0
        with svq.Session(b, resume=saved) as s2:
            assert sorted(h for h, _, _ in s2.driver.wait(0, 16)) == sorted(by_head)
            with pytest.raises(ValueError, match="resumed by another session already"):
                svq.Session(a, resume=saved)


def test_a_save_refused_before_the_stop_leaves_the_session_running() -> None:
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev)
        s.driver.post_receive(net.RX, 8, 2048)
        dev.fail_at("ioctl", 1)  # the suspend
        with pytest.raises(OSError):
            s.save()
        assert not s.closed
        s.driver.send(net.TX, [numbered(1)])
        assert [d for _, _, d in s.driver.wait(net.RX, 1)] == [numbered(1)]
        s.close()
        assert dev.live_mappings() == 0


def ioctls_of_a_save(spec: str) -> int:
    with svq.Device(spec) as dev:
        s = svq.Session(dev)
        dev.fail_at("ioctl", 1 << 40)  # counts without failing
        s.save()
        return dev.calls_seen("ioctl")


def test_a_save_failing_after_the_stop_still_hands_the_guest_over() -> None:
    last = ioctls_of_a_save("sim:net")
    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        s = svq.Session(a)
        s.driver.post_receive(net.RX, 4, 2048)
        a.fail_at("ioctl", last)  # unbinding the config notifier, once the device is reset and unmapped
        with pytest.raises(OSError) as failed:
            s.save()
        assert s.closed and a.live_mappings() == 0
        saved = failed.value.saved  # type: ignore[attr-defined]
        assert isinstance(saved, svq.SavedState) and saved.carries_guest
        with svq.Session(b, resume=saved) as s2:
            s2.driver.send(net.TX, [numbered(2)])
            assert [d for _, _, d in s2.driver.wait(net.RX, 1)] == [numbered(2)]


@pytest.mark.quarantines
def test_a_save_whose_device_may_still_reach_the_guest_keeps_its_memory() -> None:
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev)
        dev.fail_at("unmap", 1)
        with pytest.raises(OSError) as failed:
            s.save()
        assert s.closed
        assert getattr(failed.value, "saved", None) is None, "a guest the device may still write is not handed on"
        assert svq.live_resources()["quarantined_bytes"] >= 32 << 20


def test_save_refuses_what_it_cannot_capture() -> None:
    with svq.Session("sim:blk", mode=svq.Mode.PASSTHROUGH) as s, pytest.raises(ValueError, match="completes out of order"):
        s.save()
    for bad, match in [
        (b"not json", "not a device state"),
        (b'{"version": 99}', "version 99"),
        (b'{"version": 1}', "not a device state"),
    ]:
        with pytest.raises(svq.StateError, match=match):
            svq.SavedState.from_json(bad)
    # Well-formed but impossible: positions that disagree with what is in flight.
    st = b'{"version":1,"device_id":2,"features":4294967296,"queues":[{"index":0,"size":256,"avail":5,"used":0,"inflight":[1]}],"net":null}'
    g = PyGuest()
    try:
        g.ring(0)
        with pytest.raises(svq.StateError, match="in flight"):
            svq.Session("sim:blk", guest=g.external(VERSION_1), resume=svq.SavedState.from_json(st))
        with pytest.raises(ValueError, match="no guest of svq's own"):
            svq.Session("sim:blk", resume=svq.SavedState.from_json(st))
    finally:
        g.close()


@pytest.fixture
def net_pair() -> Iterator[tuple[svq.Device, svq.Device]]:
    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        yield a, b


def test_an_external_guest_must_resume_with_the_features_it_saved(net_pair: tuple[svq.Device, svq.Device]) -> None:
    a, b = net_pair
    g = PyGuest()
    try:
        g.ring(0)
        g.ring(1)
        saved = svq.Session(a, guest=g.external(VERSION_1)).save()
        with pytest.raises(svq.StateError, match="saved with guest features"):
            svq.Session(b, guest=g.external(VERSION_1 | VIRTIO_NET_F_MAC), resume=saved)
        assert b.live_mappings() == 0
    finally:
        g.close()
