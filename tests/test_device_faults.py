"""The embedded device reaches memory only through its IOTLB: taking a mapping away from
a running device makes it refuse the access, enter NEEDS_RESET, and svq reports it."""

from __future__ import annotations

import pytest

import svq
from svq import net

NEEDS_RESET = 0x40


def test_unmapped_guest_memory_is_refused_and_reported(mode: svq.Mode) -> None:
    with svq.Device("sim:net") as dev, svq.Session(dev, mode=mode) as s:
        s.driver.post_receive(net.RX, 1, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"before")])
        s.driver.wait(net.RX, 1)
        s.driver.wait(net.TX, 1)
        [guest] = [m for m in s.mappings() if m["guest_addr"] is not None]
        dev.unmap(0, guest["iova"], guest["size"])
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"after")])
        with pytest.raises(svq.DeviceNeedsResetError, match="NEEDS_RESET"):
            s.driver.wait(net.TX, 1, timeout=5)
        assert dev.status() & NEEDS_RESET
        [fault] = dev.faults()
        assert "IOTLB" in fault or "not mapped" in fault
    # The device can be set up again after the failure.
    with svq.Device("sim:net") as dev2, svq.Session(dev2, mode=mode) as s2:
        s2.driver.post_receive(net.RX, 1, 2048)
        s2.driver.send(net.TX, [net.frame(net.BROADCAST, b"again")])
        assert s2.driver.wait(net.RX, 1)[0][2].endswith(b"again")


def test_shadow_rings_are_read_only_to_the_device() -> None:
    """The descriptor table and avail ring are mapped read-only, the used ring writable."""
    with svq.Session("sim:net") as s:
        perms = sorted((m["perm"], m["guest_addr"] is None) for m in s.mappings())
        assert perms.count(("ReadOnly", True)) == s.num_queues
        assert perms.count(("ReadWrite", True)) == s.num_queues
        assert perms.count(("ReadWrite", False)) == 1


def test_session_reopens_on_the_same_device_after_close(mode: svq.Mode) -> None:
    with svq.Device("sim:net") as dev:
        for _ in range(3):
            with svq.Session(dev, mode=mode) as s:
                s.driver.post_receive(net.RX, 1, 2048)
                s.driver.send(net.TX, [net.frame(net.BROADCAST, b"x")])
                s.driver.wait(net.RX, 1)
            assert dev.live_mappings() == 0
