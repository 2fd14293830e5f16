"""Sessions: a device negotiated and set up for shadowing or passthrough, with the
in-process guest driver that plays the guest."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import Any

from . import _native
from .device import Device

log = logging.getLogger(__name__)

#: Default guest memory: one 32 MiB region at 1 GiB (in passthrough the device sees guest
#: addresses as IOVAs, so guest memory never starts at 0).
DEFAULT_MEMORY = ((0x4000_0000, 32 << 20),)


class Mode(str, enum.Enum):
    """How the session's queues reach the device."""

    #: svq forwards the guest's chains on a shadow ring, addresses translated to IOVAs.
    TRANSLATE = "translate"
    #: The device reads the guest ring directly: the baseline for overhead figures.
    PASSTHROUGH = "passthrough"


Completion = tuple[int, int, bytes]


class Driver:
    """The in-process guest: posts buffers on its rings in guest memory, kicks, and
    reaps completions. Every method is a batch: one call moves many buffers."""

    def __init__(self, native: _native.Session) -> None:
        self._s = native

    def send(self, queue: int, buffers: Sequence[bytes], segments: int = 1, indirect: bool = False) -> list[int]:
        """Posts one device-readable chain per buffer (split into ``segments``
        descriptors each, in an indirect table with ``indirect``) and kicks once.
        Returns the heads."""
        return self._s.send(queue, list(buffers), segments, indirect)

    def post_receive(self, queue: int, count: int, size: int) -> None:
        """Posts ``count`` device-writable buffers of ``size`` bytes and kicks."""
        self._s.post_receive(queue, count, size)

    def submit(self, queue: int, out: Sequence[bytes], in_sizes: Sequence[int]) -> int:
        """Posts one chain (readable parts, then writable buffers) and kicks."""
        return self._s.submit(queue, list(out), list(in_sizes))

    def wait(self, queue: int, count: int, timeout: float = 10.0, whole: bool = False) -> list[Completion]:
        """Waits for ``count`` completions: ``[(head, length, bytes), ...]`` where bytes
        are the first ``length`` written ones (every writable byte with ``whole``).
        Raises ``TimeoutError``, or a :class:`svq.QueueBrokenError` subclass naming the
        rule a peer broke."""
        return self._s.wait(queue, count, timeout, whole)

    def request(
        self, queue: int, out: Sequence[bytes], in_size: int, timeout: float = 10.0, whole: bool = False
    ) -> tuple[int, bytes]:
        """One request/response chain: returns (used length, bytes read back)."""
        self.submit(queue, out, [in_size])
        [(_, length, data)] = self.wait(queue, 1, timeout, whole)
        return length, data

    def in_flight(self, queue: int) -> int:
        return self._s.in_flight(queue)

    # Raw access, for tests that play a hostile guest.
    def ring(self, queue: int) -> dict[str, int]:
        """Guest addresses of the queue's ring: ``desc``, ``avail``, ``used``, ``size``."""
        return self._s.guest_ring(queue)

    def write_memory(self, addr: int, data: bytes) -> None:
        self._s.write_guest(addr, data)

    def read_memory(self, addr: int, length: int) -> bytes:
        return self._s.read_guest(addr, length)

    def notify(self, queue: int) -> None:
        """Kicks unconditionally (after raw ring writes)."""
        self._s.notify(queue)

    def live_buffers(self) -> int:
        """Guest buffers (rings included) allocated in guest memory."""
        return self._s.live_guest_buffers()


class Session:
    """A device set up with every queue in one :class:`Mode`; a context manager.

    ``device`` is a :class:`Device` or a spec string (then the session owns the device and
    closes it too). ``memory`` lists guest memory regions as (guest address, size)."""

    def __init__(
        self,
        device: Device | str,
        *,
        mode: Mode | str = Mode.TRANSLATE,
        queue_size: int = 256,
        memory: Sequence[tuple[int, int]] = DEFAULT_MEMORY,
        event_idx: bool = True,
        indirect: bool = False,
    ) -> None:
        self._owns_device = isinstance(device, str)
        self.device = Device(device) if isinstance(device, str) else device
        self.mode = Mode(mode)
        try:
            self._s = _native.Session(
                self.device._native,
                mode=self.mode.value,
                queue_size=queue_size,
                memory=list(memory),
                event_idx=event_idx,
                indirect=indirect,
            )
        except BaseException:
            if self._owns_device:
                self.device.close()
            raise
        self.driver = Driver(self._s)
        log.info("session on %s: %s, %d queues", self.device.spec, self.mode.value, self._s.num_queues)

    @property
    def num_queues(self) -> int:
        return self._s.num_queues

    @property
    def features(self) -> int:
        """Negotiated virtio feature bits."""
        return self._s.features

    @property
    def backend_features(self) -> int:
        return self._s.backend_features

    def stats(self, queue: int) -> dict[str, int]:
        """Counters of a queue: elements, completed, bytes, kicks, calls, suppressed
        notifications, held elements, errors. Zero in passthrough."""
        return self._s.stats(queue)

    def queue_fault(self, queue: int) -> tuple[str, str] | None:
        """``(kind, message)`` of the fault that broke a queue, or None."""
        return self._s.queue_fault(queue)

    def live_mappings(self) -> int:
        """Mappings svq holds on the device."""
        return self._s.live_mappings()

    def mappings(self) -> list[dict[str, Any]]:
        """svq's live mappings: ``asid``, ``iova``, ``size``, ``guest_addr`` (None for
        shadow rings), ``perm``."""
        return self._s.mappings()

    def suspend(self) -> None:
        self._s.suspend()

    def resume(self) -> None:
        self._s.resume()

    def vring_base(self, queue: int) -> int:
        """The device's next avail index for ``queue`` (trustworthy after suspend)."""
        return self._s.vring_base(queue)

    @property
    def closed(self) -> bool:
        return self._s.closed

    def close(self) -> None:
        """Stops, resets the device and unmaps everything; idempotent."""
        try:
            self._s.close()
        finally:
            if self._owns_device:
                self.device.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Session({self.device.spec!r}, mode={self.mode.value}, {state})"

    def info(self) -> dict[str, Any]:
        return {"device": self.device.spec, "mode": self.mode.value, "queues": self.num_queues}
