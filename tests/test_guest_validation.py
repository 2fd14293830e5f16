"""A hostile guest: each invalid ring the guest can write is refused with an error that
names the rule, the device never sees the element, and the session closes cleanly."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest

import svq
from svq import net

pytestmark = pytest.mark.hostile

NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr: int, length: int, flags: int = 0, nxt: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


class RawGuest:
    """Writes a guest ring by hand (the session's own driver stays out of the way)."""

    def __init__(self, s: svq.Session, queue: int = net.TX) -> None:
        self.s, self.q = s, queue
        self.ring = s.driver.ring(queue)
        # A scratch area well inside guest memory, past the rings.
        self.scratch = 0x4000_0000 + (16 << 20)

    def put_desc(self, index: int, d: bytes) -> None:
        self.s.driver.write_memory(self.ring["desc"] + 16 * index, d)

    def publish(self, heads: list[int], idx: int | None = None) -> None:
        for i, h in enumerate(heads):
            self.s.driver.write_memory(self.ring["avail"] + 4 + 2 * i, struct.pack("<H", h))
        self.s.driver.write_memory(self.ring["avail"] + 2, struct.pack("<H", len(heads) if idx is None else idx))
        self.s.driver.notify(self.q)


@pytest.fixture
def guest() -> Iterator[RawGuest]:
    with svq.Session("sim:net", queue_size=16, indirect=True) as s:
        yield RawGuest(s)
        assert s.device.faults() == [], "the device must never see an invalid element"
        assert s.device.sim_stats()["tx_packets"] == 0


def scratch(g: RawGuest, off: int = 0) -> int:
    return g.scratch + off


# case: (how the guest breaks its ring, the rule svq names)
CASES: dict[str, tuple[Callable[[RawGuest], None], str]] = {
    "loop": (
        lambda g: (
            g.put_desc(0, desc(scratch(g), 64, NEXT, 1)),
            g.put_desc(1, desc(scratch(g), 64, NEXT, 0)),
            g.publish([0]),
        ),
        "chain_too_long",
    ),
    "next_out_of_range": (lambda g: (g.put_desc(0, desc(scratch(g), 64, NEXT, 16)), g.publish([0])), "next_out_of_range"),
    "head_out_of_range": (lambda g: g.publish([16]), "head_out_of_range"),
    "zero_length": (lambda g: (g.put_desc(0, desc(scratch(g), 0)), g.publish([0])), "zero_length_descriptor"),
    "outside_memory": (lambda g: (g.put_desc(0, desc(0x1000, 64)), g.publish([0])), "buffer_outside_memory"),
    "past_end_of_memory": (lambda g: (g.put_desc(0, desc(0x4000_0000 + (32 << 20) - 8, 64)), g.publish([0])), "buffer_outside_memory"),
    "address_wraps": (lambda g: (g.put_desc(0, desc(2**64 - 16, 64)), g.publish([0])), "buffer_outside_memory"),
    "write_before_read": (
        lambda g: (
            g.put_desc(0, desc(scratch(g), 64, WRITE | NEXT, 1)),
            g.put_desc(1, desc(scratch(g, 64), 64)),
            g.publish([0]),
        ),
        "readable_after_writable",
    ),
    "avail_idx_jump": (lambda g: g.publish([], idx=17), "avail_idx_jump"),
    "indirect_misaligned_length": (lambda g: (g.put_desc(0, desc(scratch(g), 24, INDIRECT)), g.publish([0])), "indirect_length"),
    "indirect_nested": (
        lambda g: (
            g.s.driver.write_memory(scratch(g), desc(scratch(g, 4096), 16, INDIRECT)),
            g.put_desc(0, desc(scratch(g), 16, INDIRECT)),
            g.publish([0]),
        ),
        "nested_indirect",
    ),
    "indirect_with_next": (lambda g: (g.put_desc(0, desc(scratch(g), 16, INDIRECT | NEXT, 1)), g.publish([0])), "nested_indirect"),
    "indirect_outside_memory": (lambda g: (g.put_desc(0, desc(0x2000, 32, INDIRECT)), g.publish([0])), "buffer_outside_memory"),
    "indirect_too_long": (lambda g: (g.put_desc(0, desc(scratch(g), 16 * 17, INDIRECT)), g.publish([0])), "indirect_length"),
    "indirect_loop": (
        lambda g: (
            g.s.driver.write_memory(scratch(g), desc(scratch(g, 4096), 8, NEXT, 0)),
            g.put_desc(0, desc(scratch(g), 16, INDIRECT)),
            g.publish([0]),
        ),
        "chain_too_long",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_guest_ring_breaks_the_queue_with_a_clear_error(guest: RawGuest, case: str) -> None:
    build, rule = CASES[case]
    build(guest)
    with pytest.raises(svq.GuestProtocolError) as err:
        guest.s.driver.wait(net.TX, 1, timeout=5)
    assert (err.value.rule, err.value.kind, err.value.queue) == (rule, "guest", net.TX)
    fault = guest.s.queue_fault(net.TX)
    assert fault is not None
    assert (fault["rule"], fault["kind"]) == (rule, "guest")
    assert rule in svq.FAULT_RULES
    assert guest.s.stats(net.TX)["errors"] == 1
    # The other queues are untouched and keep working.
    assert guest.s.queue_fault(net.RX) is None


def test_straddling_a_gap_between_regions_is_refused() -> None:
    mem = [(0x4000_0000, 0x10_0000), (0x4020_0000, 0x10_0000)]
    with svq.Session("sim:net", memory=mem) as s:
        g = RawGuest(s)
        g.put_desc(0, desc(0x4010_0000 - 32, 64))
        g.publish([0])
        with pytest.raises(svq.GuestProtocolError, match="outside guest memory"):
            s.driver.wait(net.TX, 1, timeout=5)


def test_chain_too_large_for_the_shadow_ring() -> None:
    """An indirect table with as many entries as the queue, each entry crossing the
    boundary between two regions, needs twice the shadow ring's descriptors: the queue
    breaks with a clear error instead of waiting forever."""
    mem = [(0x4000_0000, 0x10_0000), (0x4010_0000, 0x10_0000)]
    with svq.Session("sim:net", memory=mem, queue_size=8, indirect=True) as s:
        g = RawGuest(s)
        table = 0x4000_8000
        boundary = 0x4010_0000
        entries = b"".join(desc(boundary - 8, 16, NEXT if i < 7 else 0, i + 1 if i < 7 else 0) for i in range(8))
        s.driver.write_memory(table, entries)
        g.put_desc(0, desc(table, 16 * 8, INDIRECT))
        g.publish([0])
        with pytest.raises(svq.ElementTooLargeError, match="needs 16 shadow descriptors"):
            s.driver.wait(net.TX, 1, timeout=5)


def test_an_element_too_large_to_copy_breaks_the_queue() -> None:
    """Every descriptor of a chain points at the same 1 MiB: 128 MiB of readable bytes
    from 1 MiB of guest memory. In copy mode svq refuses it rather than allocate it."""
    with svq.Session("sim:net", mode=svq.Mode.COPY) as s:
        g = RawGuest(s)
        buf = 0x4000_0000 + (8 << 20)
        for i in range(128):
            g.put_desc(i, desc(buf, 1 << 20, NEXT if i < 127 else 0, i + 1 if i < 127 else 0))
        g.publish([0])
        with pytest.raises(svq.ElementTooLargeError, match="svq copies at most"):
            s.driver.wait(net.TX, 1, timeout=5)
        assert svq.live_resources()["bounce_buffers"] == 0
