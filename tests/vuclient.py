"""A vhost-user frontend (the VMM's side) in plain Python, for tests: it speaks the wire
protocol message by message, so a test can play a well-behaved VMM or a hostile one
(wrong sizes, missing or extra fds, messages out of order, a hang-up mid-message)."""

from __future__ import annotations

import socket
import struct

from tests.vmguest import PyGuest

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE, SET_LOG_BASE = 1, 2, 3, 4, 5, 6
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
SET_STATUS, GET_STATUS = 39, 40

VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
PROTOCOL_FEATURES = 1 << 30
P_MQ, P_LOG_SHMFD, P_REPLY_ACK, P_STATUS = 1 << 0, 1 << 1, 1 << 3, 1 << 16
LOG_ALL = 1 << 26
NO_FD = 0x100
#: Where the fake VMM pretends guest memory sits in its own address space.
VA_OFFSET = 0x7F00_0000_0000


class Closed(Exception):
    """The backend closed the connection."""


class VhostUserClient:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reply_ack = False

    def close(self) -> None:
        self.sock.close()

    # ---- framing ----
    def send(self, code: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (), flags: int = VERSION,
             size: int | None = None) -> None:
        header = struct.pack("<III", code, flags, len(payload) if size is None else size)
        if fds:
            socket.send_fds(self.sock, [header + payload], list(fds))
        else:
            self.sock.sendall(header + payload)

    def recv_reply(self, code: int) -> bytes:
        header = self._recv(12)
        got, flags, size = struct.unpack("<III", header)
        assert got == code and flags & REPLY, (got, flags)
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except (ConnectionResetError, TimeoutError) as e:
                raise Closed(str(e)) from e
            if not chunk:
                raise Closed("the backend closed the connection")
            data += chunk
        return data

    def request(self, code: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (), reply: bool = False) -> bytes | None:
        """Sends a request; with REPLY_ACK on, asks for the ack and raises on a failure ack."""
        want_ack = self.reply_ack and not reply
        self.send(code, payload, fds, VERSION | (NEED_REPLY if want_ack else 0))
        if reply:
            return self.recv_reply(code)
        if want_ack:
            (ack,) = struct.unpack("<Q", self.recv_reply(code))
            if ack:
                raise RuntimeError(f"request {code} refused")
        return None

    def u64(self, code: int) -> int:
        reply = self.request(code, reply=True)
        assert reply is not None
        return int(struct.unpack("<Q", reply)[0])

    # ---- requests ----
    def handshake(self, features: int, protocol: int = P_REPLY_ACK | P_STATUS | P_MQ | P_LOG_SHMFD) -> int:
        offer = self.u64(GET_FEATURES)
        self.request(SET_OWNER)
        if offer & PROTOCOL_FEATURES:
            offered = self.u64(GET_PROTOCOL_FEATURES)
            self.request(SET_PROTOCOL_FEATURES, struct.pack("<Q", protocol & offered))
            self.reply_ack = bool(protocol & offered & P_REPLY_ACK)
        self.request(SET_FEATURES, struct.pack("<Q", features | (offer & PROTOCOL_FEATURES)))
        return offer

    def set_mem_table(self, regions: list[tuple[int, int, int, int, int]]) -> None:
        """regions: (gpa, size, VMM address, file offset, fd)."""
        body = struct.pack("<II", len(regions), 0) + b"".join(struct.pack("<QQQQ", g, s, va, off) for g, s, va, off, _ in regions)
        self.request(SET_MEM_TABLE, body, [r[4] for r in regions])

    def set_vring_num(self, q: int, n: int) -> None:
        self.request(SET_VRING_NUM, struct.pack("<II", q, n))

    def set_vring_addr(self, q: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> None:
        self.request(SET_VRING_ADDR, struct.pack("<IIQQQQ", q, flags, desc, used, avail, log))

    def set_vring_base(self, q: int, base: int) -> None:
        self.request(SET_VRING_BASE, struct.pack("<II", q, base))

    def get_vring_base(self, q: int) -> int:
        reply = self.request(GET_VRING_BASE, struct.pack("<II", q, 0), reply=True)
        assert reply is not None
        return int(struct.unpack("<II", reply)[1])

    def set_vring_fd(self, code: int, q: int, fd: int | None) -> None:
        self.request(code, struct.pack("<Q", q | (NO_FD if fd is None else 0)), [] if fd is None else [fd])

    def set_vring_enable(self, q: int, on: bool) -> None:
        self.request(SET_VRING_ENABLE, struct.pack("<II", q, int(on)))

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """Shares a dirty log (LOG_SHMFD): the backend always answers this one."""
        self.request(SET_LOG_BASE, struct.pack("<QQ", size, offset), [fd], reply=True)

    def set_status(self, status: int) -> None:
        self.request(SET_STATUS, struct.pack("<Q", status))

    def get_status(self) -> int:
        return self.u64(GET_STATUS)

    # ---- a whole VMM ----
    def attach(self, guest: PyGuest, features: int, status: bool = True) -> None:
        """Hands `guest`'s memory and rings over the way qemu does (rings enabled first,
        then configured one by one), then starts the device."""
        for r in guest.rings:
            self.set_vring_enable(r.index, True)
        self.set_mem_table([(guest.gpa, guest.size, guest.gpa + VA_OFFSET, 0, guest.fd)])
        for r in guest.rings:
            self.set_vring_num(r.index, r.size)
            self.set_vring_base(r.index, r.base)
            self.set_vring_addr(r.index, r.desc + VA_OFFSET, r.used + VA_OFFSET, r.avail + VA_OFFSET)
            self.set_vring_fd(SET_VRING_KICK, r.index, r.kick)
            self.set_vring_fd(SET_VRING_CALL, r.index, r.call)
        if status:
            self.set_status(0xF)
