"""Helpers for hostile-peer tests: guest memory checksums that skip what a device may
legitimately write."""

from __future__ import annotations

import hashlib
import struct

import svq

WRITE = 2


def writable_ranges(s: svq.Session) -> list[tuple[int, int]]:
    """Every device-writable descriptor in every guest descriptor table, and the rings."""
    out = []
    for q in range(s.num_queues):
        ring = s.driver.ring(q)
        size = ring["size"]
        out.append((ring["desc"], 16 * size))
        out.append((ring["avail"], 6 + 2 * size))
        out.append((ring["used"], 6 + 8 * size))
        table = s.driver.read_memory(ring["desc"], 16 * size)
        for i in range(size):
            addr, length, flags, _ = struct.unpack_from("<QIHH", table, 16 * i)
            if flags & WRITE:
                out.append((addr, length))
    return out


def guest_checksum(s: svq.Session, base: int = 0x4000_0000, size: int = 32 << 20) -> str:
    """A digest of guest memory with the rings and writable buffers zeroed out."""
    mem = bytearray(s.driver.read_memory(base, size))
    for addr, length in writable_ranges(s):
        if base <= addr < base + size:
            start = addr - base
            mem[start : start + length] = bytes(min(length, size - start))
    return hashlib.sha256(mem).hexdigest()
