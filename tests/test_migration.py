"""Live migration's pieces on the embedded device: queues switched between passthrough and
the shadow while frames flow (nothing lost, duplicated or reordered), and the dirty log
(every guest page the device wrote for the guest, nothing svq wrote for itself)."""

from __future__ import annotations

import threading
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
