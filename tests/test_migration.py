"""Live migration's pieces on the embedded device: queues switched between passthrough and
the shadow while frames flow (nothing lost, duplicated or reordered), and the dirty log
(every guest page the device wrote for the guest, nothing svq wrote for itself)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import svq
from svq import net


def numbered(seq: int) -> bytes:
    return net.frame(net.BROADCAST, seq.to_bytes(4, "little") * 40)


@pytest.fixture
def pt_session() -> Iterator[svq.Session]:
    with svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        yield s


@pytest.mark.parametrize("shadow", [svq.Mode.TRANSLATE, svq.Mode.COPY], ids=lambda m: m.value)
def test_switching_while_frames_flow_loses_duplicates_and_reorders_nothing(pt_session: svq.Session, shadow: svq.Mode) -> None:
    s = pt_session
    received: list[bytes] = []
    sent = 0
    stop = threading.Event()
    failure: list[BaseException] = []

    def traffic() -> None:
        nonlocal sent
        try:
            while not stop.is_set() or sent < 2000:
                frames = [numbered(sent + i) for i in range(16)]
                s.driver.post_receive(net.RX, 16, 2048)
                s.driver.send(net.TX, frames)
                received.extend(d for _, _, d in s.driver.wait(net.RX, 16))
                s.driver.wait(net.TX, 16)
                sent += 16
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    switches = []
    for i in range(20):
        mode = shadow if i % 2 == 0 else svq.Mode.PASSTHROUGH
        switches.append(s.switch([net.RX, net.TX], mode))
        assert s.modes[net.RX] == s.modes[net.TX] == mode
    stop.set()
    t.join(60)
    assert not failure, failure
    assert received == [numbered(i) for i in range(sent)], "every frame back once, in order"
    assert all(len(r["queues"]) == 2 for r in switches)


def test_the_dirty_log_covers_what_the_device_wrote_and_not_what_svq_injected() -> None:
    with svq.Session("sim:net", mode=svq.Mode.TRANSLATE, queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        s.start_dirty_log()
        assert s.dirty_pages() == []
        # svq's own command on the control queue is not guest memory: nothing logged.
        s.inject(net.CTRL, net.vlan_add(5), 1)
        assert s.dirty_pages() == []
        s.driver.post_receive(net.RX, 4, 2048)
        s.driver.send(net.TX, [numbered(i) for i in range(4)])
        s.driver.wait(net.RX, 4)
        s.driver.wait(net.TX, 4)
        pages = s.dirty_pages()
        rx_used = s.driver.ring(net.RX)["used"] // 4096
        tx_used = s.driver.ring(net.TX)["used"] // 4096
        assert rx_used in pages and tx_used in pages
        # The received frames sit in the other logged pages.
        data = [p for p in pages if p not in (rx_used, tx_used)]
        assert data, pages
        for p in data:
            assert b"\xff\xff\xff\xff\xff\xff" in s.driver.read_memory(p * 4096, 4096)
        assert s.dirty_pages() == [], "fetching clears the round"
        s.stop_dirty_log()


def test_live_changes_refuse_what_cannot_work(pt_session: svq.Session) -> None:
    with pytest.raises(ValueError, match="passthrough"):
        pt_session.start_dirty_log()
    with pytest.raises(ValueError, match="control queue"):
        pt_session.switch([net.CTRL], svq.Mode.TRANSLATE)
    with pytest.raises(ValueError, match="not served"):
        pt_session.switch([7], svq.Mode.TRANSLATE)
    with svq.Session("sim:net", mode=svq.Mode.TRANSLATE) as s, pytest.raises(ValueError, match="guest address"):
        s.switch([net.RX], svq.Mode.PASSTHROUGH)


@pytest.mark.parametrize("queue", [net.RX, net.TX], ids=["rx", "tx"])
def test_one_queue_switched_back_and_forth_loses_no_kick(pt_session: svq.Session, queue: int) -> None:
    """The guest's kick eventfd moves between the device and svq's engine at every
    switch; a kick the device drained after it had moved would leave the guest's buffers
    on a ring nobody reads."""
    s, d = pt_session, pt_session.driver
    frames = [net.frame(net.BROADCAST, bytes(40))] * 4
    for i in range(60):
        shadowed = queue == net.RX and i % 2 == 0
        forwarded = s.stats(net.RX)["elements"] if shadowed else None
        s.switch([queue], "translate" if i % 2 == 0 else "passthrough")
        # Kicked at once: the device thread may not have looked at its kicks since.
        d.post_receive(net.RX, 4, 2048)
        if forwarded is not None:
            # Receive buffers crossing the shadow must be on the device's ring before
            # frames sent straight to the device arrive (it drops what finds no buffer).
            deadline = time.monotonic() + 5
            while s.stats(net.RX)["elements"] < forwarded + 4:
                assert time.monotonic() < deadline, f"switch {i}: the guest's receive kick was lost"
                time.sleep(1e-4)
        d.send(net.TX, frames)
        assert len(d.wait(net.RX, 4, timeout=5)) == 4, f"switch {i}"
        assert len(d.wait(net.TX, 4, timeout=5)) == 4, f"switch {i}"
