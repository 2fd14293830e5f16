"""A hostile device: the embedded device breaks the virtio protocol on purpose. svq marks
the queue broken with an exception naming the rule, changes no guest byte outside the
element's writable buffers, accounts for every element on stop, and the device can be
used again by a new session."""

from __future__ import annotations

import time

import pytest

import svq
from svq import net

from .hostile import guest_checksum

pytestmark = pytest.mark.hostile

MODES = [svq.Mode.TRANSLATE, svq.Mode.COPY]

# (misbehaviour, queue it is applied on, exception, the rule svq names)
PROTOCOL = [
    ("used_id_out_of_range", net.TX, svq.DeviceProtocolError, "used_id_out_of_range"),
    ("used_id_not_in_flight", net.TX, svq.DeviceProtocolError, "used_id_not_in_flight"),
    ("duplicate_completion", net.TX, svq.DeviceProtocolError, "used_id_not_in_flight"),
    ("used_idx_jump", net.TX, svq.DeviceProtocolError, "used_idx_jump"),
    ("used_idx_backwards", net.TX, svq.DeviceProtocolError, "used_idx_jump"),
    ("len_too_large", net.RX, svq.DeviceProtocolError, "used_len_exceeds_writable"),
    ("len_too_large", net.TX, svq.DeviceProtocolError, "used_len_exceeds_writable"),  # length on a read-only element
    ("needs_reset", net.TX, svq.DeviceNeedsResetError, "device_needs_reset"),
]


def send_one(s: svq.Session) -> None:
    # Receive buffers span two pages and frames one: the driver reuses freed buffers of
    # the same page count, so a receive page never becomes a send page between the two
    # checksums (which leave out only writable buffers).
    s.driver.post_receive(net.RX, 1, 6000)
    s.driver.send(net.TX, [net.frame(net.BROADCAST, b"hostile" * 20)])


def wait_all(s: svq.Session, queue: int, n: int = 1) -> None:
    """Waits on `queue`; a duplicate completion first completes the element for real."""
    deadline = time.monotonic() + 5
    got = 0
    while got < n and time.monotonic() < deadline:
        got += len(s.driver.wait(queue, 1, timeout=5))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("how, queue, exc, rule", PROTOCOL, ids=lambda v: v if isinstance(v, str) else None)
def test_protocol_violation_breaks_the_queue(mode: svq.Mode, how: str, queue: int, exc: type, rule: str) -> None:
    with svq.Device("sim:net") as dev:
        with svq.Session(dev, mode=mode) as s:
            # One clean round trip first: the queue works before the device turns.
            send_one(s)
            s.driver.wait(net.RX, 1)
            s.driver.wait(net.TX, 1)
            before = guest_checksum(s)
            dev.misbehave(queue, how)
            send_one(s)
            with pytest.raises(exc) as err:
                wait_all(s, queue, 2)
            assert err.value.rule == rule
            fault = s.queue_fault(queue)
            assert fault is not None and fault["rule"] == rule
            assert guest_checksum(s) == before, "no guest byte outside writable buffers changed"
            assert s.stats(queue)["errors"] >= 1
        assert dev.live_mappings() == 0
        assert svq.live_resources()["bounce_buffers"] == 0
        dev.misbehave(queue, None)
        # A new session on the same device works.
        with svq.Session(dev, mode=mode) as again:
            send_one(again)
            assert again.driver.wait(net.RX, 1)[0][2].endswith(b"hostile" * 20)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_completions_that_never_come(mode: svq.Mode) -> None:
    """The device keeps the buffers: the guest's wait times out, an injected command times
    out, and stopping the queue returns every element and frees every buffer."""
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev, mode=mode, queue_modes={net.CTRL: svq.Mode.COPY})
        for q in (net.RX, net.TX, net.CTRL):
            dev.misbehave(q, "never_complete")
        s.driver.post_receive(net.RX, 4, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"x")] * 4)
        with pytest.raises(TimeoutError):
            s.driver.wait(net.TX, 1, timeout=0.3)
        with pytest.raises(TimeoutError):
            s.inject(net.CTRL, net.vlan_add(1), 1, timeout=0.3)
        assert s.driver.in_flight(net.TX) == 4
        s.close()
        assert dev.live_mappings() == 0
        assert svq.live_resources()["bounce_buffers"] == 0
        for q in (net.RX, net.TX, net.CTRL):
            dev.misbehave(q, None)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_completions_after_the_queue_stopped(mode: svq.Mode) -> None:
    """Elements are in flight in a suspended device when the session stops; the device
    is reset under them, and whatever it would still have done reaches nobody: a new
    session starts clean."""
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev, mode=mode)
        s.suspend()
        s.driver.post_receive(net.RX, 8, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"late")] * 8)
        time.sleep(0.05)
        s.close()
        assert dev.live_mappings() == 0
        with svq.Session(dev, mode=mode) as again:
            send_one(again)
            [(_, _, data)] = again.driver.wait(net.RX, 1)
            assert data.endswith(b"hostile" * 20)
            assert again.stats(net.RX)["completed"] == 1


def test_iotlb_refusal_in_the_middle_of_a_chain() -> None:
    """A two-segment chain whose second segment lies in a region the device lost: the
    device refuses the access, enters NEEDS_RESET, and svq reports it."""
    # The first region holds the three rings (two pages each) and two more pages.
    mem = [(0x4000_0000, 0x8000), (0x4000_8000, 0x10_0000)]
    with svq.Device("sim:net") as dev, svq.Session(dev, memory=mem) as s:
        second = next(m for m in s.mappings() if m["guest_addr"] == 0x4000_8000)
        dev.unmap(0, second["iova"], second["size"])
        # Each frame is two one-page segments: the second frame's chain starts in the first
        # region and continues in the second.
        s.driver.send(net.TX, [net.frame(net.BROADCAST, bytes(3000))] * 2, segments=2)
        with pytest.raises(svq.DeviceNeedsResetError):
            s.driver.wait(net.TX, 2, timeout=5)
        assert any("IOTLB" in f for f in dev.faults())


def test_iotlb_refusal_of_a_bounce_buffer() -> None:
    """Copy mode: the device loses the mapping of the pool and refuses to write a reply."""
    with svq.Device("sim:net") as dev, svq.Session(dev, mode=svq.Mode.COPY) as s:
        pools = [m for m in s.mappings() if m["perm"] == "ReadWrite" and m["size"] == 64 * 4096 and m["asid"] == 0]
        for m in pools:
            dev.unmap(0, m["iova"], m["size"])
        s.driver.post_receive(net.RX, 1, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"x")])
        with pytest.raises(svq.DeviceNeedsResetError):
            s.driver.wait(net.TX, 1, timeout=5)
