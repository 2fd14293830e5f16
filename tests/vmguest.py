"""A guest svq does not own, played in pure Python for tests: guest memory in a sealed
memfd, split rings written by a small driver, eventfds for kicks and calls. It is what a
VMM hands over through the external front (or over vhost-user)."""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from dataclasses import dataclass, field

import svq

NEXT, WRITE = 1, 2
VERSION_1, EVENT_IDX = 1 << 32, 1 << 29


@dataclass
class Ring:
    """One split ring in guest memory, driven from Python."""

    guest: PyGuest
    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick: int
    call: int
    base: int = 0
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)
    chains: dict[int, tuple[list[tuple[int, int, bool]], int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.free = list(range(self.size))
        self.avail_idx = self.last_used = self.base
        m = self.guest
        m.write(self.avail, struct.pack("<HH", 0, self.base))
        m.write(self.used, struct.pack("<HH", 0, self.base))

    def add(self, out: list[bytes], in_sizes: list[int]) -> int:
        """Posts one chain: readable buffers then writable ones, each in fresh memory."""
        bufs: list[tuple[int, int, bool]] = []
        for data in out:
            addr = self.guest.alloc(len(data))
            self.guest.write(addr, data)
            bufs.append((addr, len(data), False))
        for n in in_sizes:
            bufs.append((self.guest.alloc(n), n, True))
        ids = [self.free.pop(0) for _ in bufs]
        for i, (addr, length, write) in enumerate(bufs):
            flags = (WRITE if write else 0) | (NEXT if i + 1 < len(bufs) else 0)
            nxt = ids[i + 1] if i + 1 < len(bufs) else 0
            self.guest.write(self.desc + 16 * ids[i], struct.pack("<QIHH", addr, length, flags, nxt))
        head = ids[0]
        self.chains[head] = (bufs, len(ids))
        self.guest.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        self.guest.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)

    def reap(self, want: int, timeout: float = 5.0) -> list[tuple[int, int, bytes]]:
        """Waits for `want` used entries: (head, length, the first `length` written bytes)."""
        got: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < want:
            (idx,) = struct.unpack("<H", self.guest.read(self.used + 2, 2))
            while self.last_used != idx and len(got) < want:
                slot = self.used + 4 + 8 * (self.last_used % self.size)
                head, length = struct.unpack("<II", self.guest.read(slot, 8))
                bufs, n = self.chains.pop(head)
                data = b""
                for addr, blen, write in bufs:
                    if write and len(data) < length:
                        data += self.guest.read(addr, min(blen, length - len(data)))
                got.append((head, length, data))
                self.free += self._ids(head, n)
                self.last_used = (self.last_used + 1) & 0xFFFF
            if len(got) < want:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"queue {self.index}: {len(got)} of {want} completions")
                if select.select([self.call], [], [], left)[0]:
                    os.eventfd_read(self.call)
        return got

    def _ids(self, head: int, n: int) -> list[int]:
        ids, i = [], head
        for _ in range(n):
            ids.append(i)
            (_flags, nxt) = struct.unpack("<HH", self.guest.read(self.desc + 16 * i + 12, 4))
            i = nxt
        return ids


class PyGuest:
    """Guest memory (one sealed memfd region) and rings placed at its start."""

    def __init__(self, gpa: int = 0x4000_0000, size: int = 16 << 20) -> None:
        self.gpa, self.size = gpa, size
        self.fd = os.memfd_create("py-guest", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.next_free = gpa + (1 << 20)  # rings live below, buffers above
        self.rings: list[Ring] = []
        self.ring_space = gpa

    def close(self) -> None:
        for r in self.rings:
            os.close(r.kick)
            os.close(r.call)
        self.map.close()
        os.close(self.fd)

    def write(self, addr: int, data: bytes) -> None:
        off = addr - self.gpa
        self.map[off:off + len(data)] = data

    def read(self, addr: int, n: int) -> bytes:
        off = addr - self.gpa
        return self.map[off:off + n]

    def alloc(self, n: int) -> int:
        addr = self.next_free
        self.next_free += (n + 63) & ~63
        if self.next_free > self.gpa + self.size:
            self.next_free = self.gpa + (1 << 20)
            addr = self.next_free
            self.next_free += (n + 63) & ~63
        return addr

    def ring(self, index: int, size: int = 256, base: int = 0) -> Ring:
        desc = self.ring_space
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        self.ring_space = (used + 6 + 8 * size + 4095) & ~4095
        r = Ring(self, index, size, desc, avail, used, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                 os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), base)
        self.rings.append(r)
        return r

    def loopback(self, frames: list[bytes], timeout: float = 5.0) -> list[bytes]:
        """Posts a receive buffer per frame on ring 0, sends the frames on ring 1 (a
        net queue pair), and returns what came back on ring 0 once both completed."""
        rx, tx = self.rings[0], self.rings[1]
        for _ in frames:
            rx.add([], [2048])
        rx.publish()
        for f in frames:
            tx.add([f], [])
        tx.publish()
        got = [data for _, _, data in rx.reap(len(frames), timeout)]
        tx.reap(len(frames), timeout)
        return got

    def external(self, features: int) -> svq.ExternalGuest:
        return svq.ExternalGuest(
            memory=[svq.MemoryRegion(self.gpa, self.size, self.fd)],
            queues=[svq.GuestQueue(r.index, r.size, r.desc, r.avail, r.used, r.kick, r.call, r.base) for r in self.rings],
            features=features,
        )
