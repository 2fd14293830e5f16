"""virtio-blk helpers: request headers and a small client over a session's driver
(virtio spec 5.2.6)."""

from __future__ import annotations

import struct

from .session import Driver

SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20


class BlockError(IOError):
    """A request the device completed with a status other than OK."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: device status {status} ({ {1: 'IOERR', 2: 'UNSUPP'}.get(status, '?') })")
        self.status = status


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


class Blk:
    """Synchronous block requests on queue 0 of a blk session."""

    def __init__(self, driver: Driver, queue: int = 0, timeout: float = 10.0) -> None:
        self.driver = driver
        self.queue = queue
        self.timeout = timeout

    def _do(self, out: list[bytes], in_size: int, what: str) -> bytes:
        # The status is the last byte of the writable area whatever the used length says
        # (on an error the device writes no data and reports length 1).
        length, reply = self.driver.request(self.queue, out, in_size, self.timeout, whole=True)
        status = reply[-1]
        if status != S_OK:
            raise BlockError(status, what)
        if length != in_size:
            raise BlockError(S_IOERR, f"{what}: device reported {length} of {in_size} bytes")
        return reply[:-1]

    def write(self, sector: int, data: bytes) -> None:
        if not data or len(data) % SECTOR:
            raise ValueError("data must be a non-empty multiple of 512 bytes")
        self._do([header(T_OUT, sector), data], 1, f"write at sector {sector}")

    def read(self, sector: int, count: int) -> bytes:
        if count <= 0:
            raise ValueError("count must be positive")
        return self._do([header(T_IN, sector)], count * SECTOR + 1, f"read at sector {sector}")

    def flush(self) -> None:
        self._do([header(T_FLUSH)], 1, "flush")

    def get_id(self) -> bytes:
        return self._do([header(T_GET_ID)], ID_BYTES + 1, "get id").rstrip(b"\0")
