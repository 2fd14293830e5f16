"""Frames through TX→RX loopback on the embedded virtio-net device, in every mode."""

from __future__ import annotations

import pytest

import svq
from svq import net

MAC = net.parse_mac("52:54:00:12:34:56")


def payload(seq: int, n: int) -> bytes:
    return (seq.to_bytes(4, "little") + bytes((seq * 7 + i) & 0xFF for i in range(n)))[:n]


def loop(
    s: svq.Session, frames: list[bytes], batch: int = 64, segments: int = 1, indirect: bool = False, rx_size: int = 2048
) -> list[bytes]:
    out: list[bytes] = []
    for i in range(0, len(frames), batch):
        chunk = frames[i : i + batch]
        s.driver.post_receive(net.RX, len(chunk), rx_size)
        s.driver.send(net.TX, chunk, segments=segments, indirect=indirect)
        out += [data for _, _, data in s.driver.wait(net.RX, len(chunk))]
        tx = s.driver.wait(net.TX, len(chunk))
        assert all(length == 0 for _, length, _ in tx), "the simulator completes TX with length 0"
    return out


@pytest.mark.parametrize("size", [64, 500, 1514])
@pytest.mark.parametrize("segments", [1, 4])
def test_thousands_of_frames_intact_and_in_order(net_session: svq.Session, size: int, segments: int) -> None:
    frames = [net.frame(MAC, payload(i, size - 26)) for i in range(2000)]
    assert loop(net_session, frames, segments=segments) == frames
    if net_session.mode is svq.Mode.TRANSLATE:
        st = net_session.stats(net.TX)
        assert st["elements"] == st["completed"] == 2000
        assert st["bytes_out"] == 2000 * size
        assert net_session.stats(net.RX)["bytes_in"] == 2000 * size
        # Batches of 64 with event idx: far fewer kicks than elements.
        assert st["device_kicks"] < 2000 / 8


def test_indirect_chains_from_the_guest() -> None:
    with svq.Session("sim:net", indirect=True) as s:
        frames = [net.frame(MAC, payload(i, 300)) for i in range(500)]
        assert loop(s, frames, segments=3, indirect=True) == frames


def test_without_event_idx() -> None:
    with svq.Session("sim:net", event_idx=False) as s:
        frames = [net.frame(net.BROADCAST, payload(i, 100)) for i in range(500)]
        assert loop(s, frames) == frames
        assert s.stats(net.TX)["device_kicks"] > 0


def test_filter_drops_foreign_mac_and_passes_broadcast_multicast(net_session: svq.Session) -> None:
    foreign = net.frame(net.parse_mac("52:54:00:12:34:57"), b"foreign")
    bcast = net.frame(net.BROADCAST, b"broadcast")
    mcast = net.frame(net.parse_mac("01:00:5e:00:00:01"), b"multicast")
    net_session.driver.post_receive(net.RX, 4, 2048)
    net_session.driver.send(net.TX, [foreign, bcast, mcast])
    got = [d for _, _, d in net_session.driver.wait(net.RX, 2)]
    assert got == [bcast, mcast]
    assert [length for _, length, _ in net_session.driver.wait(net.TX, 3)] == [0, 0, 0]
    with pytest.raises(TimeoutError):
        net_session.driver.wait(net.RX, 1, timeout=0.2)
    assert net_session.device.sim_stats()["rx_drops"] == 1


def test_rx_buffer_smaller_than_frame_is_truncated(net_session: svq.Session) -> None:
    f = net.frame(net.BROADCAST, bytes(range(200)))
    net_session.driver.post_receive(net.RX, 1, 64)
    net_session.driver.send(net.TX, [f])
    [(_, length, data)] = net_session.driver.wait(net.RX, 1)
    assert length == 64 and data == f[:64]


def test_small_shadow_ring_holds_and_resumes() -> None:
    """Guest chains in indirect tables take 1 guest descriptor but 3 shadow ones: the
    shadow ring fills first, chains wait, and all arrive once slots free."""
    with svq.Session("sim:net", queue_size=8, indirect=True) as s:
        frames = [net.frame(MAC, payload(i, 90)) for i in range(8)]
        s.driver.post_receive(net.RX, 8, 2048)
        s.driver.send(net.TX, frames, segments=3, indirect=True)
        got = [d for _, _, d in s.driver.wait(net.RX, 8)]
        s.driver.wait(net.TX, 8)
        assert got == frames
        assert s.stats(net.TX)["held"] >= 1


def test_control_queue_mac_addr_set_changes_config_and_filter(net_session: svq.Session) -> None:
    new = net.parse_mac("02:00:00:aa:bb:cc")
    length, ack = net_session.driver.request(net.CTRL, [net.mac_addr_set(new)], 1)
    assert (length, ack) == (1, bytes([net.ACK_OK]))
    assert net_session.device.info()["config"]["mac"] == "02:00:00:aa:bb:cc"
    to_new, to_old = net.frame(new, b"new"), net.frame(MAC, b"old")
    net_session.driver.post_receive(net.RX, 2, 2048)
    net_session.driver.send(net.TX, [to_old, to_new])
    assert [d for _, _, d in net_session.driver.wait(net.RX, 1)] == [to_new]
    net_session.driver.wait(net.TX, 2)


def test_unknown_control_command_is_refused(net_session: svq.Session) -> None:
    _length, ack = net_session.driver.request(net.CTRL, [bytes([net.CTRL_MAC, 1]) + b"\x01"], 1)
    assert ack == bytes([net.ACK_ERR])
    assert net_session.device.info()["config"]["mac"] == "52:54:00:12:34:56"


def test_guest_memory_in_two_regions_straddled_by_buffers() -> None:
    """Two adjacent regions backed by separate memfds (the first only 32 pages): two-page
    RX buffers cross the boundary, are split in two on the shadow ring, and the frames
    still arrive intact."""
    mem = [(0x4000_0000, 0x2_0000), (0x4002_0000, 0x10_0000)]
    with svq.Session("sim:net", memory=mem) as s:
        frames = [net.frame(MAC, payload(i, 1400)) for i in range(200)]
        assert loop(s, frames, batch=32, rx_size=8192) == frames
        ios = {m["guest_addr"]: m["iova"] for m in s.mappings() if m["guest_addr"] is not None}
        assert set(ios) == {0x4000_0000, 0x4002_0000}
        # Translate mode places guest memory anywhere: the regions are not at IOVA = GPA.
        assert ios[0x4000_0000] != 0x4000_0000
