"""Sessions: a device negotiated and set up for shadowing or passthrough, with the
in-process guest driver that plays the guest."""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _aio, _native
from .device import Device
from .front import ExternalGuest
from .types import (
    CaptureReport,
    CvqInfo,
    DeviceState,
    GuestRing,
    MappingInfo,
    NetState,
    QueueFault,
    QueuePosition,
    QueueStats,
    SwitchResult,
)

log = logging.getLogger(__name__)

#: Bytes of each frame a capture keeps by default (tcpdump's and Wireshark's default).
CAPTURE_SNAPLEN = 262144

#: Default guest memory: one 32 MiB region at 1 GiB (in passthrough the device sees guest
#: addresses as IOVAs, so guest memory never starts at 0).
DEFAULT_MEMORY = ((0x4000_0000, 32 << 20),)


class Mode(str, enum.Enum):
    """How the session's queues reach the device."""

    #: svq forwards the guest's chains on a shadow ring, addresses translated to IOVAs.
    TRANSLATE = "translate"
    #: svq forwards copies of the guest's chains in bounce buffers: the device never sees
    #: guest memory and a command cannot change after svq read it.
    COPY = "copy"
    #: The device reads the guest ring directly: the baseline for overhead figures.
    PASSTHROUGH = "passthrough"


class CopyStrategy(str, enum.Enum):
    """Where copy mode's bounce buffers come from."""

    #: Buffers mapped once and reused (zero-filled on return); grows when exhausted.
    POOL = "pool"
    #: Allocate, map, unmap and free per element.
    PER_ELEMENT = "per-element"


Completion = tuple[int, int, bytes]


class Driver:
    """The in-process guest: posts buffers on its rings in guest memory, kicks, and
    reaps completions. Every method is a batch: one call moves many buffers."""

    def __init__(self, native: _native.Driver) -> None:
        self._s = native
        self._turns = _aio.Turns()

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
        Raises ``TimeoutError``, :class:`svq.SessionClosedError`, or a
        :class:`svq.QueueBrokenError` subclass naming the rule a peer broke; whatever it
        raises, its ``completions`` attribute holds what did complete. Other threads may
        use the session while this one waits."""
        return self._s.wait(queue, count, timeout, whole)

    async def wait_async(self, queue: int, count: int, timeout: float = 10.0, whole: bool = False) -> list[Completion]:
        """:meth:`wait` awaited on the running event loop, which watches the queue's call
        eventfd (no thread, no polling): returns and raises what :meth:`wait` does, a
        closed session and a broken queue included (a close wakes it from any thread or
        task; what completed before a close went with the session, so its
        ``completions`` is empty).

        Completions stay with the driver until ``count`` of them are there: a waiter
        cancelled at any point takes none, and the next wait (awaited or blocking) gets
        each of them once. Waits on one queue in one loop take turns, first come first
        served (``timeout`` counts the time spent waiting for the turn).

        >>> import asyncio, svq
        >>> async def main() -> list[bool]:
        ...     async with svq.Session("sim:net") as s:
        ...         s.driver.post_receive(svq.net.RX, 2, 2048)
        ...         s.driver.send(svq.net.TX, [svq.net.frame(svq.net.BROADCAST, b"async")] * 2)
        ...         done = await s.driver.wait_async(svq.net.RX, 2)
        ...         return [data.endswith(b"async") for _, _, data in done]
        >>> asyncio.run(main())
        [True, True]
        """
        return await _aio.wait_completions(self._s, self._turns, queue, count, timeout, whole)

    def request(
        self, queue: int, out: Sequence[bytes], in_size: int, timeout: float = 10.0, whole: bool = False
    ) -> tuple[int, bytes]:
        """One request/response chain: returns (used length, bytes read back). Completions
        of other chains that arrive first (requests abandoned after a timeout) are
        discarded."""
        head = self.submit(queue, out, [in_size])
        deadline = time.monotonic() + timeout
        while True:
            [(done, length, data)] = self.wait(queue, 1, max(deadline - time.monotonic(), 0.0), whole)
            if done == head:
                return length, data
            log.debug("queue %d: discarding the completion of abandoned chain %d", queue, done)

    def in_flight(self, queue: int) -> int:
        return self._s.in_flight(queue)

    # Raw access, for tests that play a hostile guest.
    def ring(self, queue: int) -> GuestRing:
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


class SavedState:
    """A stopped session's device state (:meth:`Session.save`), to resume on another
    device with ``Session(device, resume=state)``. It carries svq's own guest when the
    session played it; :meth:`to_json` gives the state alone (versioned JSON) for an
    external guest's migration between processes.

    >>> import svq
    >>> with svq.Session("sim:net") as s:
    ...     s.driver.post_receive(svq.net.RX, 4, 2048)
    ...     saved = s.save()
    >>> with svq.Session("sim:net", resume=saved) as s2:
    ...     s2.driver.send(svq.net.TX, [svq.net.frame(svq.net.BROADCAST, b"moved")])
    ...     [(_, _, data)] = s2.driver.wait(svq.net.RX, 1)
    ...     data.endswith(b"moved")
    [0]
    True
    """

    def __init__(self, native: _native.SavedState) -> None:
        self._native = native

    @classmethod
    def from_json(cls, data: bytes) -> SavedState:
        """A state written by :meth:`to_json`; raises :class:`svq.StateError` for one that
        is malformed or of another version."""
        return cls(_native.SavedState.from_json(data))

    def to_json(self) -> bytes:
        """The state as versioned JSON (without svq's own guest, whose memory stays in
        this process)."""
        return self._native.to_json()

    @property
    def state(self) -> DeviceState:
        """The state: ``version``, ``device_id``, ``features`` the guest's driver
        negotiated, each queue's ``avail``/``used`` positions and ``inflight`` heads, and
        the ``net`` control-plane state."""
        return self._native.state()

    @property
    def carries_guest(self) -> bool:
        """Whether it holds svq's own guest (until a session resumes it)."""
        return self._native.carries_guest

    def __repr__(self) -> str:
        st = self.state
        queues = ", ".join(f"{q['index']}@{q['avail']}" for q in st["queues"])
        guest = ", with its guest" if self.carries_guest else ""
        return f"SavedState(device_id={st['device_id']}, queues=[{queues}]{guest})"


class Session:
    """A device set up with each queue in a :class:`Mode`; a context manager.

    ``device`` is a :class:`Device` or a spec string (then the session owns the device and
    closes it too). ``mode`` applies to every queue not in ``queue_modes`` (queue index →
    mode). ``memory`` lists guest memory regions as (guest address, size).

    virtio-net control queue: when it is shadowed its state is tracked from the commands
    the device acknowledged (:meth:`net_state`); in copy mode it gets an address space of
    its own when the device allows it (``isolate_cvq``); ``restore`` (a state from
    :meth:`net_state`) is replayed before the data queues start.

    ``busy_poll``: after work, svq's engine keeps looking at the rings for up to this
    many seconds (an adaptive window, notifications off, so neither side pays for a
    notification during a burst) before it re-arms notifications and sleeps; 0 never
    polls. An idle session costs no CPU either way. ``workers``: engine threads the
    shadow queues spread over, each queue on one of them (default: one per CPU this
    process may run on; never more than the queue groups: a queue pair, the control
    queue).

    ``guest``: a guest svq does not own (:class:`svq.ExternalGuest`): only its queues
    are served, in the format its driver negotiated, and ``driver`` is not available
    (``memory``, ``queue_size``, ``indirect`` do not apply).

    ``resume``: a :class:`SavedState` from :meth:`save` to continue from on this device:
    the rings start where they stood, requests the old device held are submitted again
    and the virtio-net state is replayed before the data queues start. A state that
    carries svq's own guest moves that guest here (its driver becomes this session's
    ``driver``); a state of an external guest is resumed with that ``guest``. When the
    session cannot start, the guest stays in the state, ready for another device."""

    def __init__(
        self,
        device: Device | str,
        *,
        mode: Mode | str = Mode.TRANSLATE,
        queue_modes: Mapping[int, Mode | str] | None = None,
        copy_strategy: CopyStrategy | str = CopyStrategy.POOL,
        queue_size: int = 256,
        memory: Sequence[tuple[int, int]] = DEFAULT_MEMORY,
        event_idx: bool = True,
        indirect: bool = False,
        isolate_cvq: bool = True,
        track_net_state: bool = True,
        restore: NetState | Mapping[str, Any] | None = None,
        restore_timeout: float = 10.0,
        busy_poll: float = 200e-6,
        guest: ExternalGuest | None = None,
        resume: SavedState | None = None,
        workers: int | None = None,
    ) -> None:
        # Arguments first: nothing is opened for a call that cannot succeed.
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.mode = Mode(mode)
        self.copy_strategy = CopyStrategy(copy_strategy)
        modes = [(q, Mode(m).value) for q, m in (queue_modes or {}).items()]
        #: The guest svq does not own, when the session serves one.
        self.guest = guest
        # How the session was configured: a migration starts the next one alike.
        self._options: dict[str, Any] = {
            "mode": self.mode,
            "queue_modes": {q: Mode(m) for q, m in (queue_modes or {}).items()},
            "copy_strategy": self.copy_strategy,
            "isolate_cvq": isolate_cvq,
            "track_net_state": track_net_state,
            "restore_timeout": restore_timeout,
            "busy_poll": busy_poll,
            "guest": guest,
            "workers": workers,
        }
        self._owns_device = isinstance(device, str)
        self.device = Device(device) if isinstance(device, str) else device
        try:
            self._s = _native.Session(
                self.device._native,
                mode=self.mode.value,
                queue_size=queue_size,
                memory=list(memory),
                event_idx=event_idx,
                indirect=indirect,
                queue_modes=modes,
                copy_strategy=self.copy_strategy.value,
                isolate_cvq=isolate_cvq,
                track_net_state=track_net_state,
                restore=dict(restore) if restore is not None else None,
                restore_timeout=restore_timeout,
                busy_poll=busy_poll,
                external=guest.to_native() if guest is not None else None,
                resume=resume._native if resume is not None else None,
                workers=workers or 0,
            )
        except BaseException:
            if self._owns_device:
                self.device.close()
            raise
        self._driver = Driver(self._s.driver()) if guest is None else None
        log.info("session on %s: queue modes %s", self.device.spec, self._s.modes())

    @property
    def driver(self) -> Driver:
        """The in-process guest's driver (a session serving an external guest has none)."""
        if self._driver is None:
            raise ValueError("this session serves an external guest: it has no in-process driver")
        return self._driver

    @property
    def num_queues(self) -> int:
        return self._s.num_queues

    @property
    def workers(self) -> int:
        """Engine threads serving the shadow queues (zero once closed)."""
        return self._s.workers

    @property
    def features(self) -> int:
        """Negotiated virtio feature bits."""
        return self._s.features

    @property
    def backend_features(self) -> int:
        return self._s.backend_features

    @property
    def modes(self) -> dict[int, Mode]:
        """The mode of each queue the session serves, by queue index (after any fallback)."""
        return {q: Mode(m) for q, m in self._s.modes()}

    def cvq_info(self) -> CvqInfo | None:
        """The control queue: ``queue``, ``mode``, ``isolated`` (in its own address
        space), ``asid``, ``fallback`` (why data queues were shadowed), ``commands``,
        ``acked``, ``answered_locally``. None without a control queue."""
        return self._s.cvq_info()

    def net_state(self) -> NetState | None:
        """The virtio-net control-plane state tracked from acknowledged commands (None
        when the control queue is not shadowed); pass it as ``restore`` to another
        session."""
        return self._s.net_state()

    def inject(self, queue: int, out: bytes, in_size: int, timeout: float = 10.0) -> tuple[int, bytes]:
        """Sends an element of svq's own on a shadowed queue and waits for it: returns
        (used length, written bytes). Raises ``TimeoutError``, :class:`svq.InjectError`
        (with ``rule`` when the queue broke) or :class:`svq.SessionClosedError`."""
        [(length, data)] = self._s.inject(queue, [(out, in_size)], timeout)
        return length, data

    def inject_many(
        self, queue: int, elements: Sequence[tuple[bytes, int]], timeout: float = 10.0
    ) -> list[tuple[int, bytes]]:
        """Like :meth:`inject` for several elements, all in flight at once; ``timeout``
        is one deadline for all of them."""
        return self._s.inject(queue, list(elements), timeout)

    async def inject_async(self, queue: int, out: bytes, in_size: int, timeout: float = 10.0) -> tuple[int, bytes]:
        """:meth:`inject` awaited on the running event loop (no thread: the loop watches
        an eventfd svq signals as the element completes). An element whose waiter timed
        out or was cancelled stays in flight and is accounted on the queue as usual.

        >>> import asyncio, svq
        >>> async def main() -> tuple[int, bytes]:
        ...     async with svq.Session("sim:net", queue_modes={svq.net.CTRL: "copy"}) as s:
        ...         return await s.inject_async(svq.net.CTRL, svq.net.vlan_add(7), 1)
        >>> asyncio.run(main())
        (1, b'\\x00')
        """
        [(length, data)] = await _aio.inject(self._s, queue, [(out, in_size)], timeout)
        return length, data

    async def inject_many_async(
        self, queue: int, elements: Sequence[tuple[bytes, int]], timeout: float = 10.0
    ) -> list[tuple[int, bytes]]:
        """:meth:`inject_many` awaited on the running event loop: all in flight at once,
        one eventfd for the batch, one deadline for all of them.

        >>> import asyncio, svq
        >>> async def main() -> list[tuple[int, bytes]]:
        ...     async with svq.Session("sim:net", queue_modes={svq.net.CTRL: "copy"}) as s:
        ...         return await s.inject_many_async(svq.net.CTRL, [(svq.net.vlan_add(v), 1) for v in (1, 2)])
        >>> asyncio.run(main())
        [(1, b'\\x00'), (1, b'\\x00')]
        """
        return await _aio.inject(self._s, queue, elements, timeout)

    def start_capture(
        self,
        path: str | os.PathLike[str],
        queues: Sequence[int] | None = None,
        snaplen: int = CAPTURE_SNAPLEN,
        limit: int | None = None,
    ) -> list[str]:
        """Captures the frames crossing the shadowed data queues ``queues`` (default: all
        of them; a virtio-net device) into a new pcapng file at ``path``: one interface
        per queue (``rx0``, ``tx0``, ...), nanosecond timestamps, at most ``snaplen``
        bytes of each frame, the file at most ``limit`` bytes (frames beyond it are
        counted as dropped). Returns the interfaces' names. Frames are written by a
        thread of svq's; the queues never wait for the disk (a frame the writer cannot
        take is dropped and counted). Queues in passthrough cannot be captured: svq is
        not on their path; a captured queue a live switch puts in passthrough leaves the
        capture until a switch shadows it again. With mergeable receive buffers a frame the
        device spread over several buffers is recorded as one frame per buffer.
        :meth:`stop_capture` (or :meth:`close`) completes the file.
        See :class:`svq.types.CaptureReport` for an example."""
        qs = None if queues is None else list(queues)
        return self._s.start_capture(path, qs, snaplen, limit)

    def stop_capture(self) -> CaptureReport:
        """Stops the capture and completes its file; what it wrote and dropped. After
        :meth:`close` (which completed the file) it still gives the final counts."""
        return self._s.stop_capture()

    def add_hook(
        self,
        queue: int,
        avail: Callable[[bytes, int], bytes | bool | None] | None = None,
        used: Callable[[bytes, bytes], None] | None = None,
    ) -> None:
        """Attaches policy to a shadowed low-rate queue (such as the control queue):
        ``avail(out, in_size)`` returns None to forward the guest's element, bytes to
        answer it without the device, or False to refuse it (used length 0);
        ``used(out, written)`` sees each completion. Hooks run on svq's engine thread, so
        a hook must not wait on this session (e.g. call :meth:`inject`): the thread that
        would complete the wait is the one running the hook."""
        self._s.add_hook(queue, avail, used)

    def map_counts(self) -> tuple[int, int]:
        """(maps, unmaps) sent to the device so far."""
        return self._s.map_counts()

    def stats(self, queue: int) -> QueueStats:
        """Counters of a queue: elements, completed, bytes, kicks, calls, suppressed
        notifications, held elements, injected/answered/refused elements, map failures,
        elements returned on stop, errors. Zero for a passthrough queue."""
        return self._s.stats(queue)

    def queue_fault(self, queue: int) -> QueueFault | None:
        """The fault that broke a queue (``queue``, ``kind``, ``rule``, ``message``), or
        None while it is healthy. ``rule`` names the broken rule with a stable identifier
        (one of ``svq.FAULT_RULES``)."""
        return self._s.queue_fault(queue)

    def live_mappings(self) -> int:
        """Mappings svq holds on the device."""
        return self._s.live_mappings()

    def mappings(self) -> list[MappingInfo]:
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

    def switch(self, queues: Sequence[int], mode: Mode | str) -> SwitchResult:
        """Switches running ``queues`` between passthrough and the shadow without losing,
        duplicating or reordering an element (one device suspend for all of them; guest
        memory is not remapped, so the cost does not grow with the guest's size). Returns
        ``queues`` (each queue and its ring position at the switch) and ``suspended_s``.
        Passthrough needs a session started with a passthrough queue (guest memory at
        IOVA = guest address)."""
        return self._s.switch(list(queues), Mode(mode).value)

    def start_dirty_log(self) -> None:
        """From now on, every guest page written on the device's behalf is logged (used
        rings, received data, copied-back bytes; never svq's own injected elements).
        Every queue must be shadowed: :meth:`switch` passthrough queues first."""
        self._s.dirty_log(True)

    def dirty_pages(self) -> list[int]:
        """One dirty round: the guest page numbers (address // 4096) written since the
        last call, cleared. After :meth:`save`, one more call gives the pages written
        while the session stopped (the final round)."""
        return self._s.dirty_pages()

    def stop_dirty_log(self) -> None:
        self._s.dirty_log(False)

    def stop_saving(self) -> list[QueuePosition]:
        """Stops the session to hand its guest rings over to whoever serves them next
        (another device, a VMM, passthrough): suspends the device, gives back to each
        guest ring the chains the device never took (its avail index is rewound over
        them), completes what the device took, and closes the session. Returns where
        each served ring stands; start the next server of the ring at ``avail``."""
        try:
            return self._s.stop_saving()
        finally:
            if self._owns_device:
                self.device.close()

    def save(self) -> SavedState:
        """Stops the session for a migration and returns its device state: the device is
        suspended, chains it never took are given back to the guest rings, requests it
        took and did not complete (a device that completes out of order) are recorded to
        be submitted again, and the tracked virtio-net state is kept. Needs a device that
        can SUSPEND; on a device that completes out of order every queue must be
        shadowed.

        A save that fails before the device stopped for good (a refused suspend, a ring
        position it cannot read) leaves the session running. Once the device stopped the
        session is closed, and a failure's ``saved`` attribute holds the state (with
        svq's own guest) when it could be kept, to resume anywhere."""
        try:
            saved = SavedState(self._s.save())
        except BaseException as e:
            native = getattr(e, "saved", None)
            if isinstance(native, _native.SavedState):
                e.saved = SavedState(native)  # type: ignore[attr-defined]
            if self._owns_device and self.closed:
                self.device.close()
            raise
        if self._owns_device:
            self.device.close()
        return saved

    def close(self) -> None:
        """Stops, resets the device, unmaps everything and wakes every thread waiting on
        the session (with :class:`svq.SessionClosedError`). Idempotent, and safe from any
        thread, including from inside this session's own hook. Memory the device might
        still reach (a reset it did not acknowledge, an unmap it refused) is kept, never
        freed: ``svq.live_resources()["quarantined_bytes"]`` counts it."""
        try:
            self._s.close()
        finally:
            if self._owns_device:
                self.device.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the running event loop (it runs in the loop's
        default executor); waiters of this session wake as with :meth:`close`. A caller
        cancelled meanwhile still waits for the close to finish.

        >>> import asyncio, svq
        >>> async def main() -> bool:
        ...     s = svq.Session("sim:net")
        ...     await s.aclose()
        ...     return s.closed
        >>> asyncio.run(main())
        True
        """
        await _aio.run_blocking(self.close)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Session({self.device.spec!r}, mode={self.mode.value}, {state})"

