#!/usr/bin/python3
"""Guest side of the real-client tier (stdlib only; run by the host's /usr/bin/python3
inside the guest, through the 9p chroot that tests/vm/guest/init sets up).

    traffic.py ping   [--count 20] [--interval 0.1] [--target 10.0.0.2] ...
    traffic.py stream [--frames 10000] [--window 64] [--size mix|BYTES] ...

Both find the NIC by its MAC address (``--mac``), switch IPv6 off on it (so the kernel
sends nothing of its own), give it 10.0.0.1/24, bring it up and wait for the carrier.
Each prints one JSON object and writes it to ``--out``.

ping
    Raw ICMP echo requests to ``--target``. It first retries (every ``--first-every`` s,
    for at most ``--first-within`` s) until one reply arrives, which also resolves ARP,
    then sends ``--count`` requests ``--interval`` s apart, waiting at most
    ``--reply-timeout`` s for each reply. Reports sent/received and rtt min/avg/max (ms).

stream
    ``--frames`` raw frames over AF_PACKET, EtherType 0x88B5 (IEEE local experimental,
    so the kernel's protocol stack ignores them), to ``--dst`` (``self``: the NIC's own
    MAC, or ``broadcast``), for a backend that sends each frame back unchanged. Payload:
    ``b"SVQ1"``, sequence number (u32), payload length (u16), CRC32 (u32) of the
    sequence number, the length and the payload, then the payload (pseudo-random bytes).
    At most ``--window`` frames are in flight, so the guest's RX ring (256 buffers) is
    never overrun. A frame is checked against its checksum and against the exact bytes
    that were sent. When nothing arrives for ``--idle-timeout`` s, the frames in flight
    are written off (they count as missing unless they turn up later) and the stream
    goes on; after ``--max-stalls`` such stalls, or ``--max-seconds``, it stops.
    The socket ignores the guest's own outgoing frames (PACKET_IGNORE_OUTGOING, and
    sll_pkttype == PACKET_OUTGOING is filtered too).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import socket
import struct
import sys
import time
import zlib

ETH_P_SVQ = 0x88B5
MAGIC = b"SVQ1"
HDR = struct.Struct("!4sIHI")  # magic, seq, payload length, crc32
ETH_HLEN = 14
PACKET_OUTGOING = 4
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK = 0x8916, 0x891C
IFF_UP = 0x1
COUNTERS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped", "tx_dropped",
            "rx_errors", "tx_errors")


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


# ------------------------------------------------------------------ the interface
def find_iface(mac: str) -> str:
    mac = mac.lower()
    for name in sorted(os.listdir("/sys/class/net")):
        try:
            with open(f"/sys/class/net/{name}/address") as f:
                if f.read().strip().lower() == mac:
                    return name
        except OSError:
            continue
    raise SystemExit(f"no interface with MAC {mac}: {os.listdir('/sys/class/net')}")


def counters(iface: str) -> dict[str, int]:
    out = {}
    for c in COUNTERS:
        with open(f"/sys/class/net/{iface}/statistics/{c}") as f:
            out[c] = int(f.read())
    return out


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))


def bring_up(iface: str, ip: str, prefix: int, carrier_timeout: float) -> float:
    """IPv6 off, address, IFF_UP; waits for the carrier. Returns the seconds it took."""
    t0 = time.monotonic()
    for path in (f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6",
                 "/proc/sys/net/ipv6/conf/default/disable_ipv6"):
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError:
            pass  # no IPv6 in this kernel: nothing to switch off
    name = iface.encode()
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFADDR, struct.pack("16s16s8x", name, _sockaddr_in(ip)))
        fcntl.ioctl(s, SIOCSIFNETMASK, struct.pack("16s16s8x", name, _sockaddr_in(mask)))
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", name, 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | IFF_UP))
    deadline = t0 + carrier_timeout
    while True:
        try:
            with open(f"/sys/class/net/{iface}/carrier") as f:
                if f.read().strip() == "1":
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{iface}: no carrier after {carrier_timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def iface_info(iface: str) -> dict:
    info: dict = {"iface": iface}
    try:
        info["driver"] = os.path.basename(os.readlink(f"/sys/class/net/{iface}/device/driver"))
        with open(f"/sys/class/net/{iface}/device/features") as f:
            info["virtio_features"] = f.read().strip()
    except OSError:
        pass
    return info


# ------------------------------------------------------------------ ping
def _checksum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _echo_request(ident: int, seq: int, size: int) -> bytes:
    payload = bytes((seq + i) & 0xFF for i in range(size))
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _checksum(hdr + payload), ident, seq) + payload


def _wait_reply(s: socket.socket, ident: int, seq: int, deadline: float) -> bool:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        s.settimeout(left)
        try:
            data = s.recv(65535)
        except TimeoutError:
            return False
        ihl = (data[0] & 0x0F) * 4
        if len(data) < ihl + 8:
            continue
        typ, _code, _ck, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if typ == 0 and rid == ident and rseq == seq:
            return True


def cmd_ping(a: argparse.Namespace, iface: str) -> dict:
    ident = os.getpid() & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    dst = (a.target, 0)
    # First reply: retried, bounded. seq numbers of these attempts start at 60000.
    t0 = time.monotonic()
    attempts = 0
    first = None
    while time.monotonic() - t0 < a.first_within:
        seq = 60000 + attempts
        attempts += 1
        sent_at = time.monotonic()
        s.sendto(_echo_request(ident, seq, a.size), dst)
        if _wait_reply(s, ident, seq, sent_at + a.first_every):
            first = time.monotonic() - t0
            break
    out: dict = {"target": a.target, "first_reply_after_s": first, "first_attempts": attempts}
    if first is None:
        out.update(sent=0, received=0, error=f"no reply from {a.target} within {a.first_within} s")
        return out
    rtts = []
    sent = 0
    for seq in range(a.count):
        start = time.monotonic()
        s.sendto(_echo_request(ident, seq, a.size), dst)
        sent += 1
        if _wait_reply(s, ident, seq, start + a.reply_timeout):
            rtts.append((time.monotonic() - start) * 1000.0)
        rest = a.interval - (time.monotonic() - start)
        if rest > 0 and seq + 1 < a.count:
            time.sleep(rest)
    out.update(sent=sent, received=len(rtts), lost=sent - len(rtts), interval_s=a.interval,
               payload_bytes=a.size)
    if rtts:
        out["rtt_ms"] = {"min": round(min(rtts), 3), "avg": round(sum(rtts) / len(rtts), 3),
                         "max": round(max(rtts), 3)}
    return out


# ------------------------------------------------------------------ stream
def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def build_frames(n: int, size: str, dst: bytes, src: bytes) -> list[bytes]:
    # Pseudo-random bytes without the random module (it loads OpenSSL through hashlib:
    # ~0.5 s more at startup under TCG, over 9p).
    pool = b"".join(zlib.crc32(i.to_bytes(4, "little"), 0x5EED).to_bytes(4, "little")
                    for i in range(2048))
    eth = dst + src + struct.pack("!H", ETH_P_SVQ)
    frames = []
    for seq in range(n):
        total = 60 + (seq * 389) % 1455 if size == "mix" else int(size)  # 60..1514
        plen = total - ETH_HLEN - HDR.size
        off = (seq * 7919) % (len(pool) - 1514)
        payload = pool[off:off + plen]
        head = struct.pack("!IH", seq, plen)
        crc = zlib.crc32(payload, zlib.crc32(head))
        frames.append(eth + HDR.pack(MAGIC, seq, plen, crc) + payload)
    return frames


class StreamCheck:
    """Classifies what arrives against the frames that were sent."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.seen = bytearray(len(frames))
        self.arrivals = 0  # our frames (by magic), whatever their state
        self.received = self.bad_checksum = self.bad_length = self.mismatch = 0
        self.out_of_order = self.duplicates = self.foreign = 0
        self.highest = -1

    def arrive(self, data: bytes) -> bool:
        """Accounts for one received frame; False when it is not one of ours."""
        if len(data) < ETH_HLEN + HDR.size or data[ETH_HLEN:ETH_HLEN + 4] != MAGIC:
            self.foreign += 1
            return False
        self.arrivals += 1
        _magic, seq, plen, crc = HDR.unpack_from(data, ETH_HLEN)
        body = data[ETH_HLEN + HDR.size:]
        if len(body) != plen:
            self.bad_length += 1
            return True
        if zlib.crc32(body, zlib.crc32(data[ETH_HLEN + 4:ETH_HLEN + 10])) != crc or seq >= len(self.frames):
            self.bad_checksum += 1
            return True
        if data != self.frames[seq]:
            self.mismatch += 1  # intact payload, other header bytes (e.g. the MACs) changed
        if self.seen[seq]:
            self.duplicates += 1
            return True
        self.seen[seq] = 1
        self.received += 1
        if seq < self.highest:
            self.out_of_order += 1
        else:
            self.highest = seq
        return True

    def report(self) -> dict:
        return {"received": self.received, "missing": len(self.frames) - self.received,
                "bad_checksum": self.bad_checksum, "bad_length": self.bad_length,
                "mismatch": self.mismatch, "out_of_order": self.out_of_order,
                "duplicates": self.duplicates, "foreign": self.foreign}


def cmd_stream(a: argparse.Namespace, iface: str) -> dict:
    if a.size != "mix" and not 60 <= int(a.size) <= 1514:
        raise SystemExit("--size must be mix or 60..1514")
    own = _mac_bytes(a.mac)
    dst = own if a.dst == "self" else b"\xff" * 6 if a.dst == "broadcast" else _mac_bytes(a.dst)
    frames = build_frames(a.frames, a.size, dst, own)
    n = len(frames)

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_SVQ))
    s.bind((iface, ETH_P_SVQ))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        ignore_outgoing = True
    except OSError:
        ignore_outgoing = False
    s.settimeout(a.idle_timeout)

    check = StreamCheck(frames)
    arrive = check.arrive
    before = counters(iface)
    next_seq = written_off = outgoing = enobufs = stalls = 0
    stopped = None
    start = time.monotonic()
    last_arrival = start
    hard_deadline = start + a.max_seconds
    send, recvfrom = s.send, s.recvfrom
    while True:
        while next_seq < n and next_seq - check.arrivals - written_off < a.window:
            try:
                send(frames[next_seq])
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                enobufs += 1
                break  # the qdisc is full: receive first
            next_seq += 1
        in_flight = next_seq - check.arrivals - written_off
        if next_seq == n and in_flight <= 0:
            break
        if time.monotonic() > hard_deadline:
            stopped = f"--max-seconds {a.max_seconds} reached"
            break
        try:
            data, addr = recvfrom(2048)
        except TimeoutError:
            stalls += 1
            if next_seq == n or stalls > a.max_stalls:
                stopped = f"nothing arrived for {a.idle_timeout} s with {in_flight} frames in flight"
                break
            written_off += max(in_flight, 0)
            continue
        if addr[2] == PACKET_OUTGOING:
            outgoing += 1
            continue
        if arrive(data):
            last_arrival = time.monotonic()
    elapsed = max(last_arrival - start, 1e-9)
    after = counters(iface)
    sent_bytes = sum(len(frames[i]) for i in range(next_seq))
    out = {"frames": n, "window": a.window, "size": a.size, "dst": a.dst, "sent": next_seq}
    out.update(check.report())
    out.update({
        "outgoing_seen": outgoing, "ignore_outgoing": ignore_outgoing,
        "stalls": stalls, "written_off": written_off, "enobufs": enobufs, "stopped": stopped,
        "elapsed_s": round(elapsed, 4), "frames_per_s": round(check.received / elapsed, 1),
        "mbit_per_s": round(sent_bytes * 8 / elapsed / 1e6, 2),
        "counters_before": before, "counters_after": after,
        "counters": {k: after[k] - before[k] for k in after},
    })
    return out


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mac", default="52:54:00:12:34:56", help="MAC address of the NIC to use")
    p.add_argument("--ip", default="10.0.0.1")
    p.add_argument("--prefix", type=int, default=24)
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--carrier-timeout", type=float, default=15.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("ping")
    pi.add_argument("--target", default="10.0.0.2")
    pi.add_argument("--count", type=int, default=20)
    pi.add_argument("--interval", type=float, default=0.1)
    pi.add_argument("--size", type=int, default=56, help="ICMP payload bytes")
    pi.add_argument("--reply-timeout", type=float, default=1.0)
    pi.add_argument("--first-within", type=float, default=30.0)
    pi.add_argument("--first-every", type=float, default=0.5)
    st = sub.add_parser("stream")
    st.add_argument("--frames", type=int, default=10000)
    st.add_argument("--window", type=int, default=64)
    st.add_argument("--size", default="mix", help="mix (60..1514 bytes) or a frame length")
    st.add_argument("--dst", default="self", help="self, broadcast or a MAC address")
    st.add_argument("--idle-timeout", type=float, default=2.0)
    st.add_argument("--max-stalls", type=int, default=5)
    st.add_argument("--max-seconds", type=float, default=90.0)
    a = p.parse_args(argv)

    t_start = uptime()
    iface = find_iface(a.mac)
    up_s = bring_up(iface, a.ip, a.prefix, a.carrier_timeout)
    result = cmd_ping(a, iface) if a.cmd == "ping" else cmd_stream(a, iface)
    if a.cmd == "ping":
        result["counters"] = counters(iface)
    result.update(iface_info(iface))
    result.update(program=a.cmd, guest_uptime_start_s=t_start, link_up_s=round(up_s, 3),
                  guest_uptime_end_s=uptime(), kernel=os.uname().release)
    text = json.dumps(result, sort_keys=True)
    print(text, flush=True)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
