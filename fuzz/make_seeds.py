#!/usr/bin/env python3
"""Writes the hand-made seed corpora in fuzz/corpus/<target>/ (run it after changing an
input encoding in fuzz/src/; the encodings are documented there). Deterministic: running it
twice gives the same files. Usage: fuzz/make_seeds.py"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent

NEXT, WRITE, INDIRECT = 1, 2, 4


def u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def nxt(n: int) -> bytes:
    return bytes([n]) if n < 0xFF else b"\xff" + u16(n)


# ---- pop_guest_ring: compact descriptors (see `desc` in src/pop_guest_ring.rs) ----


def d_mem(region: int, off: int, length: int, flags: int = 0, next_: int = 0) -> bytes:
    """A buffer at REGIONS[region] + off."""
    return bytes([flags, region]) + u16(off) + u16(length) + nxt(next_)


def d_table(t: int, flags: int = INDIRECT, next_: int = 0, bad_len: int | None = None) -> bytes:
    """A reference to the t-th indirect table (exact length unless bad_len)."""
    if bad_len is None:
        return bytes([flags | 0x10, t & 0x7F]) + nxt(next_)
    return bytes([flags | 0x10, 0x80 | t, bad_len]) + nxt(next_)


def d_raw(addr: int, length: int, flags: int = 0, next_: int = 0) -> bytes:
    return bytes([flags | 0x20]) + u64(addr) + u32(length) + nxt(next_)


def d_edge(region: int, back: int, length: int, flags: int = 0, next_: int = 0) -> bytes:
    """A buffer `back` bytes before the end of REGIONS[region]."""
    return bytes([flags | 0x30, region, back, length]) + nxt(next_)


def ring_seed(
    size_log2: int,
    descs: dict[int, bytes],
    heads: list[int],
    *,
    event_idx: bool = False,
    indirect: bool = False,
    real_mem: bool = False,
    base: int = 0,
    tables: list[tuple[int, int, list[bytes]]] = (),
    delta: int | None = None,
    ops: bytes = b"",
) -> bytes:
    size = 1 << size_log2
    out = bytes([size_log2, event_idx | indirect << 1 | real_mem << 2]) + u16(base)
    out += bytes([len(tables)])
    for region, off16, entries in tables:
        out += bytes([region]) + u16(off16) + bytes([len(entries)]) + b"".join(entries)
    empty = d_mem(0, 0, 0)  # never popped
    out += b"".join(descs.get(i, empty) for i in range(size))
    n = len(heads) if delta is None else delta
    out += b"\xff" + u16(n) if n >= 0xFF else bytes([n])
    for i in range(size):
        h = heads[i] if i < len(heads) else 0
        out += b"\xff" + u16(h) if h >= 0xFF or h >= size else bytes([h])
    out += u16(0) + b"\x00"  # used_event, avail flags
    return out + ops


def pop_guest_ring_seeds() -> dict[str, bytes]:
    s = {}
    s["basic"] = ring_seed(
        3,
        {0: d_mem(0, 0x100, 64, NEXT, 1), 1: d_mem(1, 0, 128, WRITE), 2: d_mem(2, 0x40, 32)},
        [0, 2],
    )
    # Index wrap-around, completions, notification toggles and an unpop.
    pop, push_last, notify_on, notify_off, unpop = b"\x00", b"\x03\x01" + u32(0), b"\x04\x01", b"\x04\x00", b"\x07"
    s["wrap_and_complete"] = ring_seed(
        3,
        {i: d_mem(0, 0x1000 * i, 100 + i, WRITE) for i in range(8)},
        [0, 1, 2, 3, 4, 5],
        base=0xFFFD,
        event_idx=True,
        ops=notify_off + pop + push_last + pop + unpop + pop + push_last + notify_on + pop * 4,
    )
    # A chain straddling the two adjacent regions, and one ending exactly at a region end.
    s["straddle"] = ring_seed(
        4,
        {0: d_edge(0, 16, 64, NEXT, 1), 1: d_edge(1, 32, 32, WRITE), 3: d_edge(2, 8, 8)},
        [0, 3],
    )
    table = [d_mem(0, 0x20, 10, NEXT, 1), d_mem(1, 0x30, 20, NEXT | WRITE, 2), d_mem(1, 0x60, 30, WRITE)]
    for real in (False, True):
        s["indirect" + ("_guestmem" if real else "")] = ring_seed(
            4,
            {0: d_table(0), 1: d_mem(0, 0x4000, 8, NEXT, 2), 2: d_table(0), 5: d_mem(0, 0x5000, 4)},
            [0, 1, 5],
            indirect=True,
            event_idx=True,
            real_mem=real,
            tables=[(0, 0x80, table)],
        )
    # What a hostile guest writes: each head is one broken chain.
    s["hostile"] = ring_seed(
        4,
        {
            0: d_mem(0, 0, 8, NEXT, 1),
            1: d_mem(0, 8, 8, NEXT, 0),  # loop 0 -> 1 -> 0
            2: d_mem(0, 0, 8, NEXT, 0x40),  # next out of range
            3: d_mem(0, 0, 0),  # zero length
            4: d_mem(0, 0, 8, WRITE | NEXT, 5),
            5: d_mem(0, 0, 8),  # read after write
            6: d_mem(2, 0, 8, WRITE),  # write into the read-only region
            7: d_raw(2**64 - 4, 8),  # wraps
            8: d_table(0),  # nested indirect
            9: d_table(0, INDIRECT | NEXT, 1),
            10: d_table(1, bad_len=24),
            11: d_raw(0x1_0008, 32, INDIRECT),  # misaligned table
            12: d_mem(1, 0xFFF0, 64),  # runs off the end of region 1
        },
        [0, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 0x20],
        indirect=True,
        tables=[(0, 0x100, [d_table(0)]), (1, 0x100, [d_mem(0, 0, 8)])],
    )
    # Direct descriptors followed by an indirect one (virtio 2.7.5.3.2: the device MUST
    # handle it); here 1 + 2 segments in a queue of 2.
    s["direct_then_indirect"] = ring_seed(
        1,
        {0: d_mem(0, 0x10, 4, NEXT, 1), 1: d_table(0, INDIRECT | WRITE)},
        [0],
        indirect=True,
        tables=[(1, 0x10, [d_mem(1, 0x400, 8, NEXT, 1), d_mem(1, 0x800, 8, WRITE)])],
    )
    s["idx_jump"] = ring_seed(3, {0: d_mem(0, 0, 8)}, [0], delta=9)
    # The longest direct chain of a 256-entry queue, and a size-1 queue.
    s["long_chain"] = ring_seed(8, {i: d_mem(0, 16 * i, 16, NEXT if i < 255 else 0, i + 1) for i in range(256)}, [0])
    s["size1"] = ring_seed(0, {0: d_mem(1, 0, 1)}, [0], base=0xFFFF)
    return s


# ---- reap_used_ring (see `run` in src/reap_used_ring.rs) ----


def add(*bufs: tuple[int, bool]) -> bytes:
    """Op 0: a chain of (len in 64-byte units, write) buffers."""
    out = bytes([0, len(bufs)])
    for i, (units, write) in enumerate(bufs):
        out += bytes([units | (0x40 if write else 0)]) + u16(0x100 * (i + 1))
    return out


def complete(which: int, how: int, bump: bool = True, at: int = 0, raw_id: int | None = None) -> bytes:
    """Op 5: used entry for the which-th in-flight head; len: 0 exact, 1 one too many, 2 half."""
    sel = (which & 0x3F) | (0x40 if bump else 0) | (0x80 if raw_id is not None else 0)
    out = bytes([5, at, sel]) + (u32(raw_id) if raw_id is not None else b"")
    return out + bytes([how])


PUBLISH, POP = b"\x03\x01", b"\x07"


def reap_seed(size_log2: int, base: int, ops: bytes, event_idx: bool = False) -> bytes:
    return bytes([size_log2]) + u16(base) + bytes([event_idx]) + ops


def reap_used_ring_seeds() -> dict[str, bytes]:
    s = {}
    s["basic"] = reap_seed(3, 0, add((1, False), (2, True)) + add((3, True)) + PUBLISH + complete(0, 0) + POP + complete(0, 2) + POP + POP)
    rounds = b"".join(add((1, False), (1, True)) + PUBLISH + complete(0, 0) + POP for _ in range(6))
    s["wrap"] = reap_seed(2, 0xFFFC, rounds, event_idx=True)
    s["fill_and_drain"] = reap_seed(3, 7, add(*[(1, True)] * 5) + add((1, False),) * 4 + PUBLISH + (complete(0, 2) + POP) * 3)
    s["id_out_of_range"] = reap_seed(3, 0, add((1, True)) + PUBLISH + complete(0, 0, raw_id=8) + POP)
    s["len_too_large"] = reap_seed(3, 0, add((1, True)) + PUBLISH + complete(0, 1) + POP)
    s["idx_jump"] = reap_seed(3, 0, add((1, True)) + PUBLISH + b"\x04\xff" + u16(9) + POP)
    s["twice"] = reap_seed(3, 0, add((1, True)) + add((1, True)) + PUBLISH + complete(0, 0) + POP + b"\x04\x01" + POP)
    indirect = bytes([2]) + u16(0x40) + u16(3) + u32(4096)
    s["indirect"] = reap_seed(4, 100, indirect + PUBLISH + complete(0, 0) + POP)
    scribble = bytes([9, 0, 1]) + u64(0xDEAD) + u32(7) + u16(3) + u16(1)
    s["reclaim_scribble"] = reap_seed(3, 0, add((1, True), (1, True)) + scribble + bytes([9, 1]) + u16(0) + add((2, False), (1, True)) + PUBLISH)
    return s


# ---- iova_ops (see `run` in src/iova_ops.rs) ----

P = 4096


def alloc(size_k: int, host_pages: int, guest_pages: int | None = None, perm: int = 2) -> bytes:
    """Op 0: size_k KiB + 1 byte (size_k < 32) at host page host_pages (low neighbourhood)."""
    assert size_k < 32
    out = bytes([0, (size_k << 3) & 0xF8 | 0, 1]) + bytes([0]) + u16(host_pages * P // 64)
    if guest_pages is None:
        return out + bytes([0, perm])
    return out + bytes([1, perm, 0]) + u16(guest_pages * P // 64)


def insert(page_from_start: int, pages: int, host_pages: int) -> bytes:
    """Op 2: at the range's start + page_from_start pages, `pages` whole pages."""
    return bytes([2, 0, (page_from_start + 2) & 0xFF, 5]) + u16(pages) + bytes([0]) + u16(host_pages * P // 64) + bytes([0, 0])


def remove(which: int) -> bytes:
    return bytes([3, which & 0x7F])


def lookup(which: int, where: int, guest: bool = False) -> bytes:
    return bytes([5, int(guest), (which & 0x1F) << 2 | where])


FIND_FIRST, CHECK_ALL = bytes([4, 0]), bytes([7])


def iova_seed(range_: bytes, ops: bytes) -> bytes:
    return range_ + ops


def small_range(first16: int, span64: int, tail: int) -> bytes:
    return bytes([0]) + u16(first16) + u16(span64) + bytes([tail])


def iova_ops_seeds() -> dict[str, bytes]:
    s = {}
    basic = alloc(4, 1, 1) + alloc(8, 2) + alloc(1, 1, 16) + insert(20, 2, 5) + CHECK_ALL
    basic += lookup(0, 0) + lookup(1, 2) + lookup(2, 3, guest=True) + FIND_FIRST + remove(1) + lookup(0, 1) + CHECK_ALL
    s["basic"] = iova_seed(small_range(0, 8192, 0), basic)
    s["page0_and_tail"] = iova_seed(small_range(1, 2000, 0x7F), alloc(4, 0) + insert(0, 1, 0) + insert(5, 1, 0) + CHECK_ALL)
    s["top_of_space"] = iova_seed(bytes([2]) + u32(64 * P - 1) + bytes([0]), alloc(16, 0) + insert(8, 3, 0) + alloc(28, 0) + remove(0) + CHECK_ALL)
    s["full_range"] = iova_seed(bytes([3]) + u64(0) + u64(2**64 - 1), bytes([0, 7]) + u64(2**64 - P) + bytes([0, 0, 0, 0, 2]) + alloc(1, 0) + CHECK_ALL)
    s["empty_range"] = iova_seed(small_range(0, 0, 0xFF), b"")
    s["overflowing_host"] = iova_seed(small_range(0, 4096, 0), bytes([0, 8 << 3, 0, 4]) + u16(0) + bytes([0, 2]))
    # Nested and twin host ranges, then look-ups after removing the outer ones.
    nest = alloc(24, 0) + alloc(24, 0) + alloc(4, 4) + lookup(2, 0) + lookup(0, 2) + remove(0) + lookup(0, 2) + remove(0) + lookup(0, 0)
    s["nested_host"] = iova_seed(small_range(0, 4096, 0), nest)
    return s


# ---- ctrl_command (see `run` in src/ctrl_command.rs): the command's bytes ----
def ctrl_command_seeds() -> dict[str, bytes]:
    mac_table = bytes([1, 0]) + struct.pack("<I", 1) + bytes([2, 0, 0, 0, 0, 8])
    mac_table += struct.pack("<I", 2) + bytes([1, 0, 0x5E, 0, 0, 1, 1, 0, 0x5E, 0, 0, 2])
    rss = bytes([4, 1]) + struct.pack("<IHH", 7, 3, 0) + bytes(8) + struct.pack("<H", 1) + bytes([4]) + b"\x01\x02\x03\x04"
    return {
        "rx_promisc": bytes([0, 0, 1]),
        "mac_addr": bytes([1, 1, 2, 0, 0, 0, 0, 1]),
        "mac_table": mac_table,
        "vlan_add": bytes([2, 0]) + struct.pack("<H", 100),
        "announce": bytes([3, 0]),
        "mq_pairs": bytes([4, 0]) + struct.pack("<H", 4),
        "rss": rss,
        "offloads": bytes([5, 0]) + struct.pack("<Q", 0x83),
        "truncated_table": bytes([1, 0]) + struct.pack("<I", 5) + bytes(6),
    }


VU_CODES = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 39, 40]
VU_VA = 0x7F00_0000_0000


def vu_msg(code: int, payload: bytes = b"", flags: int = 0, fds: int = 0) -> bytes:
    """One message of the vhost_user_requests input: code pick, flags pick (0 version,
    1 version+need-reply), payload length and bytes, fd pick (0 none, 2 eventfd, 3 memfd)."""
    return bytes([VU_CODES.index(code), flags, len(payload)]) + payload + bytes([fds])


def vhost_user_requests_seeds() -> dict[str, bytes]:
    setup = (
        vu_msg(1)
        + vu_msg(3)
        + vu_msg(15)
        + vu_msg(16, struct.pack("<Q", (1 << 0) | (1 << 3) | (1 << 16)))
        + vu_msg(2, struct.pack("<Q", (1 << 32) | (1 << 30)), 1)
        + vu_msg(18, struct.pack("<II", 0, 1))
        + vu_msg(18, struct.pack("<II", 1, 1))
        + vu_msg(5, struct.pack("<IIQQQQ", 1, 0, 0x10_0000, 1 << 20, VU_VA, 0), 1, 3)
    )
    rings = b""
    for q in (0, 1):
        base = VU_VA + q * 0x4000
        rings += (
            vu_msg(8, struct.pack("<II", q, 256), 1)
            + vu_msg(10, struct.pack("<II", q, 0), 1)
            + vu_msg(9, struct.pack("<IIQQQQ", q, 0, base, base + 0x2000, base + 0x1000, 0), 1)
            + vu_msg(12, struct.pack("<Q", q), 1, 2)
            + vu_msg(13, struct.pack("<Q", q), 1, 2)
        )
    start = vu_msg(39, struct.pack("<Q", 0xF), 1) + vu_msg(40)
    stop = vu_msg(39, struct.pack("<Q", 0), 1) + vu_msg(11, struct.pack("<II", 0, 0)) + vu_msg(11, struct.pack("<II", 1, 0))
    return {
        "boot_and_stop": setup + rings + start + stop,
        "kick_started": setup.replace(vu_msg(16, struct.pack("<Q", (1 << 0) | (1 << 3) | (1 << 16))),
                                      vu_msg(16, struct.pack("<Q", (1 << 0) | (1 << 3)))) + rings,
        "bad_ring_size": setup + vu_msg(8, struct.pack("<II", 0, 100), 1) + rings + start,
        "mem_table_twice": setup + rings + start + vu_msg(5, struct.pack("<IIQQQQ", 1, 0, 0, 1 << 20, VU_VA, 0), 1, 3),
        "short_payload": setup + bytes([VU_CODES.index(8), 1, 4]) + struct.pack("<I", 0) + bytes([0]),
        "handshake_only": setup,
    }


def main() -> None:
    total = 0
    for target, seeds in [
        ("pop_guest_ring", pop_guest_ring_seeds()),
        ("reap_used_ring", reap_used_ring_seeds()),
        ("iova_ops", iova_ops_seeds()),
        ("ctrl_command", ctrl_command_seeds()),
        ("vhost_user_requests", vhost_user_requests_seeds()),
    ]:
        d = HERE / "corpus" / target
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, data in seeds.items():
            (d / name).write_bytes(data)
            total += len(data)
        print(f"{target}: {len(seeds)} seeds")
    print(f"{total} bytes in all")


if __name__ == "__main__":
    main()
