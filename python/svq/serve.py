"""svq as a VMM's vhost-user backend (``svq serve``), and the control socket through which
orchestration code asks a running server for its counters, health and memory
(``svq ctl SOCKET stats|health|info``, one JSON object per line).

>>> import os, tempfile, svq
>>> path = os.path.join(tempfile.mkdtemp(), "vu.sock")
>>> with svq.VhostUserServer("sim:net", path) as server:
...     server.start()
...     server.report()["connected"]
False
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import _aio, _native
from .device import Device
from .session import CAPTURE_SNAPLEN, CopyStrategy, Mode
from .types import CaptureReport, QueueFault, ServerReport

log = logging.getLogger(__name__)


def memory_usage() -> dict[str, int]:
    """This process's resident memory from ``/proc/self/status``: ``rss_bytes``,
    ``shared_bytes`` (file and shared-memory pages, e.g. a VM's memory svq maps) and
    ``private_bytes`` (anonymous pages: what svq itself uses)."""
    fields: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return {
        "rss_bytes": fields.get("VmRSS", 0),
        "shared_bytes": fields.get("RssFile", 0) + fields.get("RssShmem", 0),
        "private_bytes": fields.get("RssAnon", 0),
    }


class VhostUserServer:
    """A vhost-user backend on the unix socket ``path`` that puts a VMM's device on
    ``device`` (a :class:`Device` or a spec string) through svq, with ``mode`` for every
    queue not in ``queue_modes``. It serves one VMM connection at a time, then the next;
    :meth:`close` stops it (the device is reset, nothing stays mapped) and removes the
    socket. A context manager; ``async with`` serves while the event loop runs and stops
    the server on exit without blocking the loop.

    >>> import asyncio, os, tempfile, svq
    >>> async def main() -> bool:
    ...     path = os.path.join(tempfile.mkdtemp(), "vu.sock")
    ...     async with svq.VhostUserServer("sim:net", path) as server:
    ...         await asyncio.sleep(0)
    ...         return server.report()["connected"] is False and os.path.exists(path)
    >>> asyncio.run(main())
    True
    """

    def __init__(
        self,
        device: Device | str,
        path: str | os.PathLike[str],
        *,
        mode: Mode | str = Mode.TRANSLATE,
        queue_modes: Mapping[int, Mode | str] | None = None,
        copy_strategy: CopyStrategy | str = CopyStrategy.POOL,
        event_idx: bool = True,
        busy_poll: float = 200e-6,
    ) -> None:
        self.mode = Mode(mode)
        modes = [(q, Mode(m).value) for q, m in (queue_modes or {}).items()]
        strategy = CopyStrategy(copy_strategy).value
        self._owns_device = isinstance(device, str)
        self.device = Device(device) if isinstance(device, str) else device
        try:
            self._s = _native.VhostUserServer(
                self.device._native, Path(path), mode=self.mode.value, queue_modes=modes, copy_strategy=strategy, event_idx=event_idx,
                busy_poll=busy_poll,
            )
        except BaseException:
            if self._owns_device:
                self.device.close()
            raise
        self.path = Path(path)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._final_capture: CaptureReport | None = None

    def _serve(self) -> None:
        try:
            self._s.serve()
        except BaseException as e:  # noqa: BLE001 - kept and re-raised by wait()
            self._error = e
            log.error("vhost-user server on %s failed: %s", self.path, e)

    def start(self) -> None:
        """Serves in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="svq-vhost-user", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the server to stop; True once it did. Raises what stopped it, if it
        failed."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        if self._error is not None:
            raise self._error
        return True

    def stop(self) -> None:
        """Stops serving (safe from any thread, or a signal handler)."""
        self._s.stop()

    def start_capture(self, path: str | os.PathLike[str], snaplen: int = CAPTURE_SNAPLEN, limit: int | None = None) -> None:
        """Captures the frames on the shadowed data queues of every VMM session from now
        on into a new pcapng file at ``path`` (as :meth:`svq.Session.start_capture`; the
        interfaces stay the same across sessions). :meth:`stop_capture` or :meth:`close`
        completes the file."""
        self._native_server().start_capture(path, snaplen, limit)

    def stop_capture(self) -> CaptureReport | None:
        """Completes the capture file; what it wrote and dropped (None: no capture). After
        :meth:`close` (which completed the file) the final counts."""
        if self._closed:
            return self._final_capture
        return self._s.finish_capture()

    def _native_server(self) -> _native.VhostUserServer:
        if self._closed:
            raise ValueError(f"the vhost-user server on {self.path} is closed")
        return self._s

    def report(self) -> ServerReport:
        """What the server does now: ``connected``, ``connections``, ``sessions_started``,
        ``running``, ``features``, ``protocol_features``, ``status``,
        ``guest_memory_bytes``, ``queues`` (index, mode, counters, fault) and ``events``
        (recent refusals, newest last)."""
        return self._native_server().report()

    def close(self) -> None:
        """Stops, waits for the serving thread, removes the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._thread is not None:
            self._thread.join()
        self._final_capture = self._s.finish_capture()
        del self._s  # drops the listener: the socket file goes
        if self._owns_device:
            self.device.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the running event loop (it runs in the loop's
        default executor)."""
        await _aio.run_blocking(self.close)

    def __enter__(self) -> VhostUserServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> VhostUserServer:
        """Starts serving in the background; leaving the block stops it (:meth:`aclose`)."""
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ControlSocket:
    """Answers ``stats``, ``health`` and ``info`` on a unix socket, one JSON object per
    line, for a running :class:`VhostUserServer`."""

    COMMANDS = ("stats", "health", "info")

    def __init__(self, server: VhostUserServer, path: str | os.PathLike[str]) -> None:
        self.server = server
        self.path = Path(path)
        if self.path.is_socket():
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="svq-ctl", daemon=True)
        self._thread.start()

    def answer(self, command: str) -> dict[str, Any]:
        """The reply to one command."""
        r = self.server.report()
        queues = r["queues"]
        if command == "stats":
            return {"queues": [{k: v for k, v in q.items() if k != "fault"} for q in queues], "running": r["running"]}
        if command == "health":
            faults: list[QueueFault] = [q["fault"] for q in queues if q["fault"]]
            return {
                "healthy": r["running"] and not faults,
                "running": r["running"],
                "connected": r["connected"],
                "queues": [{"index": q["index"], "mode": q["mode"], "fault": q["fault"]} for q in queues],
                "events": r["events"],
            }
        if command == "info":
            return {
                "socket": str(self.server.path),
                "device": self.server.device.spec,
                "mode": self.server.mode.value,
                "pid": os.getpid(),
                **{k: r[k] for k in ("connected", "connections", "sessions_started", "running", "features", "protocol_features",
                                     "status", "guest_memory_bytes")},
                **memory_usage(),
            }
        return {"error": f"unknown command {command!r}: use one of {', '.join(self.COMMANDS)}"}

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    for line in conn.makefile("r", encoding="utf-8"):
                        command = line.strip()
                        if command.startswith("{"):
                            command = str(json.loads(command).get("cmd", ""))
                        conn.sendall((json.dumps(self.answer(command)) + "\n").encode())
                except (OSError, ValueError) as e:
                    log.debug("control connection: %s", e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        if self.path.is_socket():
            self.path.unlink()


def ctl(path: str | os.PathLike[str], command: str, timeout: float = 5.0) -> dict[str, Any]:
    """Asks a running ``svq serve`` one control command."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        reply = s.makefile("r", encoding="utf-8").readline()
    if not reply:
        raise ConnectionError(f"{path}: no reply to {command!r}")
    answer: dict[str, Any] = json.loads(reply)
    return answer
