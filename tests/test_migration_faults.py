"""A migration that fails at any step (switch, dirty round, save, resume, restore) names
the step and leaves every guest running, on its source session or back on its source
device, with nothing lost: frames in flight come back once, blk requests complete once,
and neither device keeps a mapping svq no longer needs."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

import svq
from svq import blk, net
from svq.migrate import MigrationError, migrate

pytestmark = pytest.mark.hostile

_disks = itertools.count()


def numbered(seq: int) -> bytes:
    return net.frame(net.BROADCAST, seq.to_bytes(4, "little") * 30)


def source(dev: svq.Device) -> svq.Session:
    """A hypervisor's vDPA NIC: data queues in passthrough, the control queue shadowed,
    a MAC and a VLAN set, frames posted and in flight."""
    s = svq.Session(dev, mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}, restore_timeout=0.5)
    for c in [net.mac_addr_set(net.parse_mac("02:00:00:00:0a:0b")), net.vlan_add(7)]:
        assert s.driver.request(net.CTRL, [c], 1)[1] == bytes([net.ACK_OK])
    s.driver.post_receive(net.RX, 8, 2048)
    s.driver.send(net.TX, [numbered(i) for i in range(8)])
    return s


def still_serves(s: svq.Session | None, first: int = 0) -> None:
    """The guest runs: the frames it had in flight come back, then new ones do."""
    assert s is not None and not s.closed
    got = [d for _, _, d in s.driver.wait(net.RX, 8)]
    s.driver.wait(net.TX, 8)
    assert got == [numbered(i) for i in range(first, first + 8)]
    s.driver.post_receive(net.RX, 1, 2048)
    s.driver.send(net.TX, [numbered(99)])
    assert [d for _, _, d in s.driver.wait(net.RX, 1)] == [numbered(99)]


def test_a_switch_the_device_refuses_leaves_the_source_in_passthrough() -> None:
    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        s = source(a)
        a.fail_at("map", 1)  # the first shadow ring
        with pytest.raises(MigrationError) as failed:
            migrate([s], [b])
        assert failed.value.step == "switch" and failed.value.sessions == [s]
        assert s.modes[net.RX] == s.modes[net.TX] == svq.Mode.PASSTHROUGH
        still_serves(s)
        s.close()
        assert b.live_mappings() == 0 == a.live_mappings()


def test_a_failed_dirty_round_cancels_the_migration() -> None:
    def copy_fails(i: int, pages: list[int]) -> None:
        if i == 1:
            raise OSError(5, "the destination stopped taking pages")

    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        s = source(a)
        with pytest.raises(MigrationError) as failed:
            migrate([s], [b], rounds=3, on_round=copy_fails)
        assert failed.value.step == "dirty_round" and isinstance(failed.value.__cause__, OSError)
        assert s.modes[net.RX] == svq.Mode.PASSTHROUGH, "switched back"
        with pytest.raises(ValueError, match=r"no dirty log|passthrough"):
            s.start_dirty_log()  # the log went away with the shadow
        still_serves(s)
        s.close()


def arm(dev: svq.Device, point: str, n: int) -> Callable[[int, list[int]], None]:
    """A dirty-round hook arming a fault on the source for the stop that follows."""

    def hook(i: int, pages: list[int]) -> None:
        if i == 1:
            dev.fail_at(point, n)

    return hook


def test_a_suspend_the_source_refuses_leaves_it_running() -> None:
    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        s = source(a)
        with pytest.raises(MigrationError) as failed:
            migrate([s], [b], rounds=2, on_round=arm(a, "ioctl", 1))
        assert failed.value.step == "save" and failed.value.sessions == [s]
        assert s.modes[net.RX] == svq.Mode.PASSTHROUGH
        still_serves(s)
        s.close()
        assert b.live_mappings() == 0


@pytest.mark.quarantines
def test_a_source_that_may_still_reach_the_guest_is_reported_not_reused() -> None:
    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        s = source(a)
        with pytest.raises(MigrationError) as failed:
            migrate([s], [b], rounds=2, on_round=arm(a, "unmap", 1))
        assert failed.value.step == "save"
        assert failed.value.sessions == [None], "a guest a device may still write is not handed on"
        assert s.closed and b.live_mappings() == 0


@pytest.mark.parametrize("how", ["map", "restore"])
def test_a_destination_that_fails_sends_the_guest_back_to_its_source(how: str) -> None:
    with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
        s = source(a)
        state = s.net_state()
        if how == "map":
            b.fail_at("map", 1)
        else:
            b.misbehave(net.CTRL, "never_complete")  # the restore's commands get no ack
        with pytest.raises(MigrationError) as failed:
            migrate([s], [b])
        assert failed.value.step == "resume"
        if how == "restore":
            assert isinstance(failed.value.__cause__, svq.RestoreError)
        [back] = failed.value.sessions
        assert back is not None and back is not s and back.device is a
        assert back.modes[net.RX] == svq.Mode.PASSTHROUGH, "in the source's own modes"
        assert back.net_state() == state
        assert b.live_mappings() == 0
        still_serves(back)
        back.close()
        assert a.live_mappings() == 0


def test_two_devices_move_together_or_not_at_all() -> None:
    disk = f"faults-{next(_disks)}"
    spec = f"sim:blk,disk={disk},latency_us=20000"
    with (
        svq.Device("sim:net") as net_a,
        svq.Device("sim:net") as net_b,
        svq.Device(spec) as blk_a,
        svq.Device(spec) as blk_b,
    ):
        nic = source(net_a)
        disk_s = svq.Session(blk_a)
        heads = {disk_s.driver.submit(0, [blk.header(blk.T_OUT, 8 * i), bytes([i]) * 4096], [1]) for i in range(16)}
        blk_b.fail_at("map", 1)  # the second device's destination refuses
        with pytest.raises(MigrationError) as failed:
            migrate([nic, disk_s], [net_b, blk_b])
        assert failed.value.step == "resume"
        back_nic, back_disk = failed.value.sessions
        assert back_nic is not None and back_nic.device is net_a, "the NIC came back from its new device"
        assert back_disk is not None and back_disk.device is blk_a
        still_serves(back_nic)
        done = back_disk.driver.wait(0, 16, whole=True)
        assert sorted(h for h, _, _ in done) == sorted(heads), "each request completes exactly once"
        assert all(data == bytes([blk.S_OK]) for _, _, data in done)
        for s in (back_nic, back_disk):
            s.close()
        assert all(d.live_mappings() == 0 for d in (net_a, net_b, blk_a, blk_b))


def test_a_migration_refuses_what_it_cannot_do() -> None:
    with svq.Device("sim:net") as a:
        s = svq.Session(a)
        for args, match in [
            (([s], []), "one target per session"),
            (([s, s], [a, a]), "listed twice"),
        ]:
            with pytest.raises(ValueError, match=match):
                migrate(*args)
        with pytest.raises(ValueError, match="translate or copy"):
            migrate([s], [a], shadow="passthrough")
        s.close()
        with pytest.raises(ValueError, match="closed"):
            migrate([s], [a])
