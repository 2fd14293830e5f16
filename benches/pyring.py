"""The pure-Python shadow virtqueue: the peer of ``svq bench``'s in-process forwarding
row, the shadow virtqueue a Python user would write (struct over bytearrays), over the
same ring layout as ``_native.bench_forward``. It lives beside the benchmarks, not in the
``svq`` package: ``svq bench`` loads it from a source tree (see README.md)."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from typing import Any

from svq import _native

MASK64 = (1 << 64) - 1

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = USED_F_NO_NOTIFY = 1


class PyRingError(Exception):
    """A peer broke the ring protocol (the pure-Python shadow virtqueue's errors)."""


def ring_offsets(size: int) -> tuple[int, int, int, int]:
    """(desc, avail, used, total) of a packed split ring, as svq lays it out."""
    avail = 16 * size
    used = (avail + 6 + 2 * size + 63) // 64 * 64
    return 0, avail, used, used + 6 + 8 * size


def need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class PyRing:
    """Offsets of one split ring inside a buffer."""

    def __init__(self, buf: bytearray, base: int, size: int) -> None:
        d, a, u, _ = ring_offsets(size)
        self.buf, self.size, self.mask = buf, size, size - 1
        self.desc, self.avail, self.used = base + d, base + a, base + u
        self.used_event = self.avail + 4 + 2 * size
        self.avail_event = self.used + 4 + 8 * size


class PyRingWriter:
    """Driver side of a split ring (free list, in-flight table, validated reaping)."""

    def __init__(self, ring: PyRing, event_idx: bool) -> None:
        self.r, self.event_idx = ring, event_idx
        n = ring.size
        self.next = [(i + 1) % n for i in range(n)]
        self.chain_len = [0] * n
        self.writable = [0] * n
        self.free_head, self.num_free = 0, n
        self.avail_idx = self.kicked = self.last_used = 0

    def add(self, bufs: Sequence[tuple[int, int, bool]]) -> int | None:
        """Writes a chain; None when the ring has no room for it."""
        n = len(bufs)
        if n == 0 or n > self.num_free:
            return None
        r, buf, nxt = self.r, self.r.buf, self.next
        head = idx = self.free_head
        writable = 0
        for k, (addr, length, write) in enumerate(bufs):
            last = k + 1 == n
            flags = (F_WRITE if write else 0) | (0 if last else F_NEXT)
            DESC.pack_into(buf, r.desc + 16 * idx, addr, length, flags, 0 if last else nxt[idx])
            if write:
                writable += length
            if not last:
                idx = nxt[idx]
        self.free_head = nxt[idx]
        self.num_free -= n
        self.chain_len[head] = n
        self.writable[head] = writable
        U16.pack_into(buf, r.avail + 4 + 2 * (self.avail_idx & r.mask), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> bool:
        """Publishes added chains; True when the other side wants a notification."""
        old = self.kicked
        if old == self.avail_idx:
            return False
        r = self.r
        U16.pack_into(r.buf, r.avail + 2, self.avail_idx)
        self.kicked = self.avail_idx
        if self.event_idx:
            return need_event(U16.unpack_from(r.buf, r.avail_event)[0], self.avail_idx, old)
        return not U16.unpack_from(r.buf, r.used)[0] & USED_F_NO_NOTIFY

    def pop_used(self) -> tuple[int, int] | None:
        """One validated used entry as (head, len), or None."""
        r = self.r
        idx = U16.unpack_from(r.buf, r.used + 2)[0]
        pending = (idx - self.last_used) & 0xFFFF
        if pending == 0:
            return None
        if pending > r.size:
            raise PyRingError(f"used index jumped from {self.last_used} to {idx}")
        ident, length = USED.unpack_from(r.buf, r.used + 4 + 8 * (self.last_used & r.mask))
        if ident >= r.size:
            raise PyRingError(f"used id {ident} outside the queue")
        n = self.chain_len[ident]
        if n == 0:
            raise PyRingError(f"used id {ident} not in flight")
        if length > self.writable[ident]:
            raise PyRingError(f"used length {length} > writable {self.writable[ident]}")
        self.last_used = (self.last_used + 1) & 0xFFFF
        tail = ident
        for _ in range(n - 1):
            tail = self.next[tail]
        self.next[tail] = self.free_head
        self.free_head = ident
        self.num_free += n
        self.chain_len[ident] = 0
        self.writable[ident] = 0
        return ident, length

    def enable_cb(self) -> bool:
        r = self.r
        if self.event_idx:
            U16.pack_into(r.buf, r.used_event, self.last_used)
        else:
            U16.pack_into(r.buf, r.avail, 0)
        return bool(U16.unpack_from(r.buf, r.used + 2)[0] != self.last_used)

    def disable_cb(self) -> None:
        if not self.event_idx:
            U16.pack_into(self.r.buf, self.r.avail, AVAIL_F_NO_INTERRUPT)


class PyRingReader:
    """Device side of a split ring: validated pops of chains, used entries."""

    def __init__(self, ring: PyRing, event_idx: bool, lo: int, hi: int) -> None:
        #: Buffers must lie in [lo, hi).
        self.r, self.event_idx, self.lo, self.hi = ring, event_idx, lo, hi
        self.last_avail = self.used_idx = self.signalled = 0

    def pop(self) -> tuple[int, list[tuple[int, int, bool]]] | None:
        """The next chain as (head, [(addr, len, writable), ...]), validated; or None."""
        r, buf = self.r, self.r.buf
        idx = U16.unpack_from(buf, r.avail + 2)[0]
        pending = (idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > r.size:
            raise PyRingError(f"avail index jumped from {self.last_avail} to {idx}")
        head = U16.unpack_from(buf, r.avail + 4 + 2 * (self.last_avail & r.mask))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= r.size:
            raise PyRingError(f"avail entry names head {head}, outside the queue")
        segs: list[tuple[int, int, bool]] = []
        i, budget, seen_write, lo, hi = head, r.size, False, self.lo, self.hi
        while True:
            if budget == 0:
                raise PyRingError(f"chain {head} is longer than its table (a loop?)")
            budget -= 1
            addr, length, flags, nxt = DESC.unpack_from(buf, r.desc + 16 * i)
            if flags & F_INDIRECT:
                raise PyRingError(f"chain {head} uses an indirect table but INDIRECT_DESC was not negotiated")
            if length == 0:
                raise PyRingError(f"chain {head} has a zero-length descriptor")
            if addr < lo or addr + length > hi:
                raise PyRingError(f"chain {head} points at {addr:#x}+{length:#x}, outside guest memory")
            write = bool(flags & F_WRITE)
            if write:
                seen_write = True
            elif seen_write:
                raise PyRingError(f"chain {head} has a device-readable descriptor after a device-writable one")
            segs.append((addr, length, write))
            if not flags & F_NEXT:
                return head, segs
            if nxt >= r.size:
                raise PyRingError(f"descriptor {i} of chain {head} has next {nxt}, outside the table")
            i = nxt

    def push_used(self, head: int, length: int) -> None:
        r = self.r
        USED.pack_into(r.buf, r.used + 4 + 8 * (self.used_idx & r.mask), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish_used(self) -> bool:
        old = self.signalled
        if old == self.used_idx:
            return False
        r = self.r
        U16.pack_into(r.buf, r.used + 2, self.used_idx)
        self.signalled = self.used_idx
        if self.event_idx:
            return need_event(U16.unpack_from(r.buf, r.used_event)[0], self.used_idx, old)
        return not U16.unpack_from(r.buf, r.avail)[0] & AVAIL_F_NO_INTERRUPT

    def enable_notify(self) -> bool:
        r = self.r
        if self.event_idx:
            U16.pack_into(r.buf, r.avail_event, self.last_avail)
        else:
            U16.pack_into(r.buf, r.used, 0)
        return bool(U16.unpack_from(r.buf, r.avail + 2)[0] != self.last_avail)

    def disable_notify(self) -> None:
        if not self.event_idx:
            U16.pack_into(self.r.buf, self.r.used, USED_F_NO_NOTIFY)


class PyShadowVirtqueue:
    """A shadow virtqueue in pure Python (struct over bytearrays): pops and validates the
    guest's chains, translates every guest address through ``regions`` ((gpa, size, iova)
    triples), writes them on the shadow ring, kicks the device through an eventfd when it
    wants it; reaps and validates the device's used entries and completes the guest's
    chains, calling the guest when it wants it. The same algorithm as svq's Rust
    ``ShadowQueue``, written the way a Python user would."""

    def __init__(
        self,
        guest: PyRing,
        guest_lo: int,
        guest_hi: int,
        shadow: PyRing,
        regions: Sequence[tuple[int, int, int]],
        event_idx: bool = True,
        kick_fd: int | None = None,
        call_fd: int | None = None,
    ) -> None:
        self.guest = PyRingReader(guest, event_idx, guest_lo, guest_hi)
        self.shadow = PyRingWriter(shadow, event_idx)
        self.regions = list(regions)
        self.in_flight: list[int | None] = [None] * shadow.size
        self.pending: tuple[int, list[tuple[int, int, bool]]] | None = None
        self.kick_fd, self.call_fd = kick_fd, call_fd
        self.stats = dict.fromkeys(
            ("elements", "completed", "device_kicks", "device_kicks_suppressed", "guest_calls", "guest_calls_suppressed"),
            0,
        )

    def _translate(self, head: int, segs: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
        out = []
        for start, length, write in segs:
            addr, end = start, start + length
            while addr < end:
                for gpa, size, iova in self.regions:
                    if gpa <= addr < gpa + size:
                        n = min(gpa + size, end) - addr
                        out.append((iova + addr - gpa, n, write))
                        addr += n
                        break
                else:
                    raise PyRingError(f"guest address {addr:#x} is not mapped for the device")
        return out

    def forward(self) -> None:
        """Forwards every available chain that fits, then kicks the device once."""
        while True:
            self.guest.disable_notify()
            held = False
            while True:
                if self.pending is not None:
                    head, bufs = self.pending
                    self.pending = None
                else:
                    popped = self.guest.pop()
                    if popped is None:
                        break
                    head, bufs = popped[0], self._translate(*popped)
                shead = self.shadow.add(bufs)
                if shead is None:
                    if len(bufs) > self.shadow.r.size:
                        raise PyRingError(f"chain {head} can never fit the shadow ring")
                    self.pending = (head, bufs)
                    held = True
                    break
                self.in_flight[shead] = head
                self.stats["elements"] += 1
            if self.shadow.publish():
                if self.kick_fd is not None:
                    os.eventfd_write(self.kick_fd, 1)
                self.stats["device_kicks"] += 1
            else:
                self.stats["device_kicks_suppressed"] += 1
            if held or not self.guest.enable_notify():
                return

    def reap(self) -> None:
        """Completes what the device used, then forwards what waited for room."""
        while True:
            self.shadow.disable_cb()
            while (used := self.shadow.pop_used()) is not None:
                shead, length = used
                head = self.in_flight[shead]
                self.in_flight[shead] = None
                if head is None:
                    raise PyRingError(f"used id {shead} has no element")
                self.guest.push_used(head, length)
                self.stats["completed"] += 1
            if self.guest.publish_used():
                if self.call_fd is not None:
                    os.eventfd_write(self.call_fd, 1)
                self.stats["guest_calls"] += 1
            else:
                self.stats["guest_calls_suppressed"] += 1
            if not self.shadow.enable_cb():
                break
        if self.pending is not None:
            self.forward()


def py_forward(segments: int, frame_size: int, elements: int, batch: int = 32, event_idx: bool = True) -> dict[str, Any]:
    """The pure-Python peer of ``_native.bench_forward``: same layout (guest ring and
    buffer slots at the same guest addresses, the same IOVA of guest memory), same
    per-batch protocol, same checksum; only forward() and reap() are timed."""
    lay = _native.bench_forward_layout()
    size = lay["queue_size"]
    gpa, gsize = lay["guest_gpa"], lay["guest_size"]
    # Only the ring is touched (translate mode copies no payload): the guest memory
    # buffer need not hold the buffers' bytes.
    _, _, _, total = ring_offsets(size)
    gmem, smem = bytearray(total), bytearray(total)

    g = PyRing(gmem, 0, size)
    s = PyRing(smem, 0, size)
    per = max(1, -(-frame_size // segments))
    lens = [min(per, frame_size - k) for k in range(0, frame_size, per)]
    batch = max(1, min(batch, size // len(lens)))
    # Guest-side view uses offsets relative to gmem; addresses in descriptors are gpas.
    guest = PyRingWriter(g, event_idx)
    device = PyRingReader(s, event_idx, lay["region_iova"], lay["region_iova"] + gsize)
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        sq = PyShadowVirtqueue(g, gpa, gpa + gsize, s, [(gpa, gsize, lay["region_iova"])], event_idx, kick, call)
        device.enable_notify()
        guest.enable_cb()
        chains = [
            [(lay["buf_base"] + (j * len(lens) + k) * lay["buf_stride"], n, False) for k, n in enumerate(lens)]
            for j in range(batch)
        ]
        checksum = done = 0
        t_fwd = t_reap = 0.0
        clock = time.perf_counter
        while done < elements:
            for c in chains:
                guest.add(c)
            guest.publish()
            t = clock()
            sq.forward()
            t_fwd += clock() - t
            device.disable_notify()
            n = 0
            while (chain := device.pop()) is not None:
                for addr, length, _ in chain[1]:
                    checksum = (checksum + addr * 31 + length) & MASK64
                device.push_used(chain[0], 0)
                n += 1
            device.publish_used()
            device.enable_notify()
            if n != batch:
                raise PyRingError(f"forwarded {n} of {batch}")
            t = clock()
            sq.reap()
            t_reap += clock() - t
            guest.disable_cb()
            got = 0
            while guest.pop_used() is not None:
                got += 1
            guest.enable_cb()
            if got != batch:
                raise PyRingError(f"completed {got} of {batch}")
            done += batch
    finally:
        os.close(kick)
        os.close(call)
    return {
        "elements": done,
        "svq_ns": (t_fwd + t_reap) * 1e9 / done,
        "forward_ns": t_fwd * 1e9 / done,
        "reap_ns": t_reap * 1e9 / done,
        "checksum": checksum,
        **{k: v for k, v in sq.stats.items() if k.startswith(("device_", "guest_"))},
    }
