"""The external front: a guest svq does not own (memory in a memfd, rings written by a
Python driver, eventfds of its own) handed over by orchestration code and shadowed onto
the embedded device in every mode."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

import svq
from svq import net
from tests.vmguest import VERSION_1, PyGuest

CTRL_VQ, CTRL_MAC_ADDR = 1 << 17, 1 << 23
DATA_MODES = [svq.Mode.TRANSLATE, svq.Mode.COPY, svq.Mode.PASSTHROUGH]


@pytest.fixture
def guest() -> Iterator[PyGuest]:
    g = PyGuest()
    yield g
    g.close()


@pytest.mark.parametrize("mode", DATA_MODES, ids=lambda m: m.value)
def test_an_external_guest_loops_frames_back_intact(guest: PyGuest, mode: svq.Mode) -> None:
    guest.ring(0)
    guest.ring(1)
    with svq.Device("sim:net") as dev:
        assert VERSION_1 & dev.guest_features()
        with svq.Session(dev, mode=mode, guest=guest.external(VERSION_1)) as s:
            assert s.modes == {0: mode, 1: mode}, "only the guest's queues are served"
            for round_ in range(8):  # several laps of the 256-entry rings
                frames = [net.frame(net.BROADCAST, bytes([round_, i]) * (20 + i)) for i in range(64)]
                assert guest.loopback(frames) == frames
            if mode is not svq.Mode.PASSTHROUGH:
                assert s.stats(net.TX)["completed"] == 8 * 64
            with pytest.raises(ValueError, match="external guest"):
                s.driver.send(net.TX, [b"x"])
        assert dev.live_mappings() == 0


@pytest.mark.parametrize("mode", DATA_MODES, ids=lambda m: m.value)
def test_guest_memory_at_address_zero_is_served(mode: svq.Mode) -> None:
    # A VMM's guest memory starts at guest address 0 (its rings may sit anywhere in it);
    # passthrough then maps it at IOVA 0, which svq's own allocations never take.
    g = PyGuest(gpa=0)
    try:
        g.ring(0)
        g.ring(1)
        with svq.Session("sim:net", mode=mode, guest=g.external(VERSION_1)) as s:
            frames = [net.frame(net.BROADCAST, bytes([i]) * 60) for i in range(32)]
            assert g.loopback(frames) == frames
            at_zero = [m for m in s.mappings() if m["iova"] == 0]
            if mode is svq.Mode.PASSTHROUGH:
                assert [m["guest_addr"] for m in at_zero] == [0]
            else:
                assert at_zero == [], "nothing svq places itself lands on IOVA 0"
    finally:
        g.close()


def test_a_ring_that_ran_before_continues_from_its_base(guest: PyGuest) -> None:
    guest.ring(0, base=65530)  # the indices wrap past 65535 within the first batch
    guest.ring(1, base=65500)
    with svq.Session("sim:net", guest=guest.external(VERSION_1)) as s:
        frames = [net.frame(net.BROADCAST, bytes([i]) * 30) for i in range(100)]
        assert guest.loopback(frames) == frames
        # The guest's indices wrapped; the shadow ring the device reads starts at 0.
        assert guest.rings[0].last_used == (65530 + 100) & 0xFFFF
        assert guest.rings[1].last_used == (65500 + 100) & 0xFFFF
        assert s.vring_base(net.RX) == 100


def test_the_control_queue_of_an_external_guest_is_tracked(guest: PyGuest) -> None:
    for q in range(3):
        guest.ring(q)
    with svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY},
                     guest=guest.external(VERSION_1 | CTRL_VQ | CTRL_MAC_ADDR)) as s:
        cvq = guest.rings[2]
        cvq.add([net.mac_addr_set(net.parse_mac("02:00:00:00:00:42"))], [1])
        cvq.publish()
        [(_, length, ack)] = cvq.reap(1)
        assert (length, ack) == (1, bytes([net.ACK_OK]))
        assert s.device.info()["config"]["mac"] == "02:00:00:00:00:42"
        state = s.net_state()
        assert state is not None and bytes(state["mac"] or b"") == bytes.fromhex("020000000042")
        info = s.cvq_info()
        assert info is not None and info["isolated"]


def test_memory_must_not_be_able_to_shrink(guest: PyGuest) -> None:
    guest.ring(0)
    guest.ring(1)
    with svq.Session("sim:net", guest=guest.external(VERSION_1)):
        # svq sealed the memfd: the VMM (or anyone) can no longer shrink it under svq.
        with pytest.raises(OSError) as e:
            os.ftruncate(guest.fd, 4096)
        assert e.value.errno == errno.EPERM


def bad_guest(g: PyGuest, how: str) -> svq.ExternalGuest:
    g.ring(0)
    g.ring(1)
    ext = g.external(VERSION_1)
    q0, q1 = ext.queues
    region = ext.memory[0]
    if how == "ring_outside_memory":
        q1 = svq.GuestQueue(1, 256, 0x1000, 0x2000, 0x3000, q1.kick_fd, q1.call_fd)
    elif how == "size_not_power_of_two":
        q1 = svq.GuestQueue(1, 100, q1.desc, q1.avail, q1.used, q1.kick_fd, q1.call_fd)
    elif how == "same_index_twice":
        q1 = svq.GuestQueue(0, 256, q1.desc, q1.avail, q1.used, q1.kick_fd, q1.call_fd)
    elif how == "kick_not_an_eventfd":
        q1 = svq.GuestQueue(1, 256, q1.desc, q1.avail, q1.used, region.fd, q1.call_fd)
    elif how == "closed_fd":
        q1 = svq.GuestQueue(1, 256, q1.desc, q1.avail, q1.used, 9999, q1.call_fd)
    elif how == "misaligned_ring":
        q1 = svq.GuestQueue(1, 256, q1.desc + 8, q1.avail, q1.used, q1.kick_fd, q1.call_fd)
    elif how == "queue_the_device_lacks":
        q1 = svq.GuestQueue(7, 256, q1.desc, q1.avail, q1.used, q1.kick_fd, q1.call_fd)
    elif how == "file_shorter_than_region":
        region = svq.MemoryRegion(region.gpa, region.size, region.fd, offset=4096)
    elif how == "region_not_page_aligned":
        region = svq.MemoryRegion(region.gpa + 100, region.size - 4096, region.fd)
    elif how == "unsealable_file":
        fd = os.memfd_create("no-seals")
        os.ftruncate(fd, region.size)
        g.extra_fds = [fd]  # type: ignore[attr-defined]
        region = svq.MemoryRegion(region.gpa, region.size, fd)
    return svq.ExternalGuest([region], [q0, q1], ext.features)


@pytest.mark.hostile
@pytest.mark.parametrize(
    "how, words",
    [
        ("ring_outside_memory", "queue 1: ring"),
        ("size_not_power_of_two", "not a power of two"),
        ("same_index_twice", "given twice"),
        ("kick_not_an_eventfd", "not an eventfd"),
        ("closed_fd", "not an open file descriptor"),
        ("misaligned_ring", "not aligned"),
        ("queue_the_device_lacks", "does not exist"),
        ("file_shorter_than_region", "fewer than offset"),
        ("region_not_page_aligned", "page-aligned"),
        ("unsealable_file", "F_SEAL_SHRINK"),
    ],
)
def test_an_invalid_guest_is_refused_before_the_device_is_touched(guest: PyGuest, how: str, words: str) -> None:
    ext = bad_guest(guest, how)
    with svq.Device("sim:net") as dev:
        with pytest.raises(ValueError, match=words):
            svq.Session(dev, guest=ext)
        assert dev.live_mappings() == 0 and dev.status() == 0
        # The device is free for the next session.
        with svq.Session(dev):
            pass
    for fd in getattr(guest, "extra_fds", []):
        os.close(fd)


@pytest.mark.hostile
def test_features_the_device_cannot_honour_are_refused(guest: PyGuest) -> None:
    guest.ring(0)
    guest.ring(1)
    with svq.Device("sim:net") as dev:
        offer = dev.guest_features()
        missing = next(1 << b for b in range(64) if not offer >> b & 1 and b not in (26, 30, 33))
        with pytest.raises(svq.NegotiationError, match="cannot honour"):
            svq.Session(dev, guest=guest.external(VERSION_1 | missing))
        with pytest.raises(ValueError, match="control queue 2 is not served"):
            svq.Session(dev, guest=guest.external(VERSION_1 | CTRL_VQ))


@pytest.mark.parametrize("first, second", [(svq.Mode.PASSTHROUGH, svq.Mode.TRANSLATE), (svq.Mode.TRANSLATE, svq.Mode.COPY),
                                           (svq.Mode.COPY, svq.Mode.PASSTHROUGH)], ids=lambda m: m.value)
def test_rings_hand_over_from_one_device_to_another(guest: PyGuest, first: svq.Mode, second: svq.Mode) -> None:
    guest.ring(0)
    guest.ring(1)
    rx = guest.rings[0]
    with svq.Session("sim:net", mode=first, guest=guest.external(VERSION_1)) as a:
        frames = [net.frame(net.BROADCAST, bytes([1, i]) * 30) for i in range(50)]
        assert guest.loopback(frames) == frames
        # 40 more receive buffers the device has not taken when the session stops.
        for _ in range(40):
            rx.add([], [2048])
        rx.publish()
        positions = a.stop_saving()
    assert [(p["queue"], p["avail"], p["used"]) for p in positions] == [(0, 50, 50), (1, 50, 50)]
    # The next device serves the same rings from where they stand: the 40 buffers given
    # back are popped again and filled first.
    for r, p in zip(guest.rings, positions, strict=True):
        r.base = p["avail"]
    with svq.Session("sim:net", mode=second, guest=guest.external(VERSION_1)) as b:
        frames = [net.frame(net.BROADCAST, bytes([2, i]) * 30) for i in range(40)]
        tx = guest.rings[1]
        for f in frames:
            tx.add([f], [])
        tx.publish()
        assert [d for _, _, d in rx.reap(40)] == frames
        tx.reap(40)
        assert b.stats(0)["completed"] == (0 if second is svq.Mode.PASSTHROUGH else 40)
