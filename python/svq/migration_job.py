"""``svq migrate``: the whole live-migration job on two pairs of devices. A frame stream
and blk writes run on sessions on devices A (data queues in passthrough, as a hypervisor
runs a vDPA NIC) while the migration switches them into the shadow, runs dirty rounds,
stops, saves, and resumes on devices B; then every frame and every written sector is
accounted for, and B's filter is shown to hold the virtio-net state A had."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import blk, net
from ._native import SessionClosedError
from .device import Device
from .migrate import MigrationError, migrate
from .session import Mode, Session

log = logging.getLogger(__name__)

GUEST_MAC = net.parse_mac("02:5a:51:00:00:01")
TABLE_UNICAST = net.parse_mac("02:5a:51:00:00:02")
TABLE_MULTICAST = net.parse_mac("01:00:5e:00:00:42")
FOREIGN_MAC = net.parse_mac("02:00:00:00:00:99")
VLANS = (5, 7)
#: Commands that give the source device a control-plane state to carry over.
NET_STATE_COMMANDS = [
    net.mac_addr_set(GUEST_MAC),
    net.mac_table_set([TABLE_UNICAST], [TABLE_MULTICAST]),
    net.rx_mode("allmulti", False),
    *(net.vlan_add(v) for v in VLANS),
]
WAIT_S = 2.0
#: How long a dirty round takes (the time a VMM spends copying its pages).
ROUND_S = 0.02


class Carrier:
    """The session a guest runs on: the migration swaps it, the traffic threads follow
    (and go on at least until it did)."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._cv = threading.Condition()
        self._closed = False
        #: Set once the migration is over (whatever its outcome).
        self.settled = threading.Event()

    def current(self) -> Session:
        with self._cv:
            return self._session

    def swap(self, session: Session) -> None:
        with self._cv:
            self._session = session
            self._cv.notify_all()
        self.settled.set()

    def close(self) -> None:
        """No session will come: threads waiting for one stop."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self.settled.set()

    def wait_newer(self, old: Session, timeout: float = 30.0) -> bool:
        """Waits until the guest runs on another session than ``old``; False if none
        comes."""
        with self._cv:
            return self._cv.wait_for(lambda: self._session is not old or self._closed, timeout) and self._session is not old


@dataclass
class Stream:
    """What a traffic thread saw: completion times (monotonic) and its failure."""

    times: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def gap_ms(self, start: float, end: float) -> float | None:
        """The longest gap between consecutive completions that overlaps ``start`` ..
        ``end`` (while the devices were stopped): the guest's downtime. Not just the gap
        around ``start``: the save completes to the guest what the device finished before
        it stopped, so completions can arrive after ``start`` and the longer gap follows
        them. None without completions both before ``start`` and after ``end``."""
        times = sorted(self.times)
        if not times or times[0] >= start or times[-1] <= end:
            return None
        return max(b - a for a, b in itertools.pairwise(times) if b >= start and a <= end) * 1e3


def _completions(e: BaseException) -> list[tuple[int, int, bytes]]:
    got: list[tuple[int, int, bytes]] = getattr(e, "completions", [])
    return got


class NetStream(threading.Thread):
    """Numbered frames to the guest's own MAC, looped back by the device: a batch of
    receive buffers is posted, the batch sent, and both reaped. At least ``frames``, and
    on until the migration is over. Follows the guest from session to session; what a
    wait had reaped when its session stopped is kept."""

    def __init__(self, carrier: Carrier, frames: int, batch: int = 32, payload: int = 200) -> None:
        super().__init__(name="svq-migrate-net", daemon=True)
        self.carrier, self.total, self.batch, self.payload = carrier, frames, batch, payload
        self.sent = 0
        self.received: list[int] = []
        self.stream = Stream()

    def frame(self, seq: int) -> bytes:
        return net.frame(GUEST_MAC, seq.to_bytes(4, "little") * (self.payload // 4))

    def _take(self, got: list[tuple[int, int, bytes]]) -> None:
        now = time.monotonic()
        for _, _, data in got:
            body = net.payload_of(data)
            self.received.append(int.from_bytes(body[:4], "little"))
            self.stream.times.append(now)

    def run(self) -> None:
        phase, n, rx_out, tx_out, tail = "post", 0, 0, 0, False
        try:
            while True:
                s = self.carrier.current()
                try:
                    if phase == "post":
                        if self.sent >= self.total and self.carrier.settled.is_set():
                            if tail:
                                return
                            # One batch more once the guest runs on the destination: its
                            # completions close the downtime window even when nothing
                            # was in flight across the stop.
                            tail = True
                        n = min(self.batch, self.total - self.sent) if self.sent < self.total else self.batch
                        s.driver.post_receive(net.RX, n, 2048)
                        rx_out += n
                        phase = "send"
                    elif phase == "send":
                        s.driver.send(net.TX, [self.frame(self.sent + i) for i in range(n)])
                        self.sent += n
                        tx_out += n
                        phase = "wait"
                    elif rx_out:
                        got = s.driver.wait(net.RX, rx_out, timeout=WAIT_S)
                        rx_out -= len(got)
                        self._take(got)
                    elif tx_out:
                        tx_out -= len(s.driver.wait(net.TX, tx_out, timeout=WAIT_S))
                    else:
                        phase = "post"
                except SessionClosedError as e:
                    rx_out, tx_out = self._account(e, phase, rx_out, tx_out)
                    if not self.carrier.wait_newer(s):
                        return
                except TimeoutError as e:
                    # Frames the device dropped never come back: counted as lost.
                    rx_out, tx_out = self._account(e, phase, rx_out, tx_out)
                    rx_out, tx_out = (0, tx_out) if rx_out else (0, 0)
        except BaseException as e:  # noqa: BLE001 - reported by the job
            self.stream.error = e

    def _account(self, e: BaseException, phase: str, rx_out: int, tx_out: int) -> tuple[int, int]:
        """Keeps what a failed wait had reaped; what is still out afterwards."""
        got = _completions(e)
        if phase != "wait":
            return rx_out, tx_out
        if rx_out:
            self._take(got)
            return rx_out - len(got), tx_out
        return rx_out, tx_out - len(got)


class BlkWriter(threading.Thread):
    """Writes of a distinct pattern per 4 KiB block, ``batch`` in flight at once: at least
    ``writes``, and on until the migration is over (within the disk). Follows the guest
    from session to session."""

    def __init__(self, carrier: Carrier, writes: int, limit: int, batch: int = 8) -> None:
        super().__init__(name="svq-migrate-blk", daemon=True)
        self.carrier, self.total, self.limit, self.batch = carrier, writes, limit, batch
        self.issued = 0
        self.done: set[int] = set()
        self.failed: list[int] = []
        self.inflight: dict[int, int] = {}
        self.stream = Stream()

    @staticmethod
    def pattern(seq: int) -> bytes:
        return seq.to_bytes(4, "little") * 1024

    def _take(self, got: list[tuple[int, int, bytes]]) -> None:
        now = time.monotonic()
        for head, _, data in got:
            seq = self.inflight.pop(head)
            (self.done.add if data[-1:] == bytes([blk.S_OK]) else self.failed.append)(seq)
            self.stream.times.append(now)

    def more(self) -> bool:
        return self.issued < self.limit and (self.issued < self.total or not self.carrier.settled.is_set())

    def run(self) -> None:
        try:
            while self.more() or self.inflight:
                s = self.carrier.current()
                try:
                    while self.more() and len(self.inflight) < self.batch:
                        head = s.driver.submit(0, [blk.header(blk.T_OUT, 8 * self.issued), self.pattern(self.issued)], [1])
                        self.inflight[head] = self.issued
                        self.issued += 1
                    self._take(s.driver.wait(0, len(self.inflight), timeout=WAIT_S, whole=True))
                except SessionClosedError as e:
                    self._take(_completions(e))
                    if not self.carrier.wait_newer(s):
                        return
                except TimeoutError as e:
                    self._take(_completions(e))
        except BaseException as e:  # noqa: BLE001 - reported by the job
            self.stream.error = e


def _read_back(s: Session, writes: int, batch: int = 16) -> bool:
    """Whether every block holds its pattern, read ``batch`` requests at a time."""
    for first in range(0, writes, batch):
        seqs = range(first, min(first + batch, writes))
        by_head = {s.driver.submit(0, [blk.header(blk.T_IN, 8 * i)], [4096 + 1]): i for i in seqs}
        for head, _, data in s.driver.wait(0, len(by_head), whole=True):
            if data[-1] != blk.S_OK or data[:-1] != BlkWriter.pattern(by_head[head]):
                return False
    return True


def _open(spec: str, want: str, option: str) -> Device:
    dev = Device(spec)
    if dev.info()["class"] != want:
        dev.close()
        raise ValueError(f"{option} {spec} is not a virtio-{want} device")
    return dev


def _filter_holds(s: Session, acked_table: bool) -> bool:
    """The destination's RX filter shows the state: its own MAC passes, a foreign
    unicast MAC does not, and a table entry does when the table was taken."""
    wanted = [net.frame(GUEST_MAC, b"own mac")]
    if acked_table:
        wanted.append(net.frame(TABLE_UNICAST, b"table entry"))
    frames = [net.frame(FOREIGN_MAC, b"foreign"), *wanted]
    s.driver.post_receive(net.RX, len(frames), 2048)
    s.driver.send(net.TX, frames)
    s.driver.wait(net.TX, len(frames))
    got = [d for _, _, d in s.driver.wait(net.RX, len(wanted))]
    try:
        extra = s.driver.wait(net.RX, 1, timeout=0.2)
    except TimeoutError:
        extra = []
    return got == wanted and not extra


def run(
    *,
    net_from: str,
    net_to: str,
    blk_from: str | None,
    blk_to: str | None,
    mode: Mode,
    shadow: Mode,
    frames: int,
    blk_writes: int,
    rounds: int,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The job; returns the figures (see ``svq migrate --help``)."""
    t0 = time.perf_counter()
    devices = [_open(net_from, "net", "--from"), _open(net_to, "net", "--to")]
    try:
        if blk_from is not None and blk_to is not None:
            devices += [_open(blk_from, "blk", "--blk-from"), _open(blk_to, "blk", "--blk-to")]
        return _run(devices, mode, shadow, frames, blk_writes, rounds, progress, t0)
    finally:
        for d in devices:
            d.close()


def _run(
    devices: list[Device],
    mode: Mode,
    shadow: Mode,
    frames: int,
    blk_writes: int,
    rounds: int,
    progress: Callable[[str], None],
    t0: float,
) -> dict[str, Any]:
    net_a, net_b = devices[0], devices[1]
    with_blk = len(devices) == 4
    sessions = [Session(net_a, mode=mode, queue_modes={net.CTRL: Mode.COPY})]
    carriers = [Carrier(sessions[0])]
    try:
        acks = [sessions[0].driver.request(net.CTRL, [c], 1)[1] == bytes([net.ACK_OK]) for c in NET_STATE_COMMANDS]
        state_before = sessions[0].net_state()
        if with_blk:
            sessions.append(Session(devices[2], mode=mode if mode is not Mode.PASSTHROUGH else shadow))
            carriers.append(Carrier(sessions[1]))
        stream = NetStream(carriers[0], frames)
        blocks = devices[2].info()["config"]["capacity"] // 8 if with_blk else 0
        writer = BlkWriter(carriers[1], min(blk_writes, blocks), blocks) if with_blk else None
        threads: list[NetStream | BlkWriter] = [stream] + ([writer] if writer else [])
        for t in threads:
            t.start()
        # The migration starts once a third of the stream went through.
        deadline = time.monotonic() + 60
        while len(stream.received) < frames // 3 and stream.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        progress(f"migrating after {len(stream.received)} frames")
        error: str | None = None
        moved: list[Session | None]
        report = None
        resumed_at = 0.0
        try:
            # Each live round takes a while, as copying its pages to the destination would
            # (the guest's memory itself moves with its state, in this process).
            new, report = migrate(
                sessions,
                [net_b] + ([devices[3]] if with_blk else []),
                shadow=shadow,
                rounds=rounds,
                on_round=lambda i, _pages: time.sleep(ROUND_S) if i < rounds else None,
            )
            moved = [*new]
            resumed_at = time.monotonic()
        except MigrationError as e:
            error = f"{e} (the guests run on {[s.device.spec if s else None for s in e.sessions]})"
            moved = e.sessions
        for c, s in zip(carriers, moved, strict=True):
            if s is not None:
                c.swap(s)
            else:
                c.close()  # that guest is gone: its traffic stops
        sessions = [s for s in moved if s is not None]
        progress("migrated" if error is None else f"failed: {error}")
        for t in threads:
            t.join(120)
        for c in carriers:
            c.close()
        dst = moved[0]
        state_after = dst.net_state() if dst is not None else None
        # The devices' own drops, before the filter check drops a frame on purpose.
        stats = [d.sim_stats() for d in (net_a, net_b)]
        drops = None if None in stats else sum(st["rx_drops"] for st in stats if st is not None)
        filter_ok = error is None and dst is not None and _filter_holds(dst, acks[1])
        blk_verified = None
        if writer is not None and error is None:
            blk_verified = not writer.failed and len(writer.done) == writer.issued and _read_back(sessions[1], writer.issued)
        unique = set(stream.received)
        result: dict[str, Any] = {
            "from": net_a.spec,
            "to": net_b.spec,
            "blk_from": devices[2].spec if with_blk else None,
            "blk_to": devices[3].spec if with_blk else None,
            "mode": mode.value,
            "shadow": shadow.value,
            "frames_sent": stream.sent,
            "frames_received": len(stream.received),
            "frames_lost": stream.sent - len(unique),
            "frames_duplicated": len(stream.received) - len(unique),
            "frames_dropped_by_device": drops,
            "frames_in_order": stream.received == sorted(stream.received),
            "blk_writes": len(writer.done) if writer else 0,
            "blk_inflight_at_save": len(report.sessions[1].state["queues"][0]["inflight"]) if report and with_blk else None,
            "blk_verified": blk_verified,
            "net_commands_acked": sum(acks),
            "net_state_equal": state_after == state_before,
            "filter_verified": filter_ok,
            "switch_ms": round(report.switch_ms, 3) if report else None,
            "downtime_ms": _round(stream.stream.gap_ms(report.stopped_at, resumed_at)) if report else None,
            "blk_downtime_ms": _round(writer.stream.gap_ms(report.stopped_at, resumed_at)) if report and writer else None,
            "blackout_ms": round(report.blackout_ms, 3) if report else None,
            "dirty_pages": report.dirty_pages if report else None,
            "dirty_rounds": report.dirty_rounds if report else None,
            "net_state": net.state_json(state_after) if state_after is not None else None,
            "error": error or next((repr(t.stream.error) for t in threads if t.stream.error), None),
            "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        return result
    finally:
        for s in sessions:
            s.close()


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


def ok(r: dict[str, Any]) -> bool:
    """Whether the job did what it promises."""
    return bool(
        r["error"] is None
        and r["frames_lost"] == 0
        and r["frames_duplicated"] == 0
        and r["frames_in_order"]
        and r["net_state_equal"]
        and r["filter_verified"]
        and r["blk_verified"] in (True, None)
    )


def print_report(r: dict[str, Any]) -> None:
    print(f"svq migrate {r['from']} -> {r['to']}" + (f", {r['blk_from']} -> {r['blk_to']}" if r["blk_from"] else ""))
    print(f"  frames   : {r['frames_received']}/{r['frames_sent']} back, {r['frames_lost']} lost, "
          f"{r['frames_duplicated']} duplicated, {'in order' if r['frames_in_order'] else 'REORDERED'}")
    if r["blk_from"]:
        print(f"  blk      : {r['blk_writes']} writes, {r['blk_inflight_at_save']} in flight at the save, "
              f"read back {'verified' if r['blk_verified'] else 'FAILED'}")
    print(f"  net state: {'equal' if r['net_state_equal'] else 'DIFFERENT'} on the destination, "
          f"filter {'verified' if r['filter_verified'] else 'NOT verified'} ({r['net_commands_acked']} commands acked)")
    print(f"  timing   : switch {r['switch_ms']} ms, devices stopped {r['blackout_ms']} ms, downtime (the stream's longest gap "
          f"while they were stopped) {r['downtime_ms']} ms; {r['dirty_pages']} dirty pages over rounds {r['dirty_rounds']}")
    if r["error"]:
        print(f"  error    : {r['error']}")
    print(f"  elapsed  : {r['elapsed_s']} s")


def default_blk_spec() -> str:
    """Two embedded blk devices on one disk of this process (as hosts share storage)."""
    return f"sim:blk,disk=svq-migrate-{os.getpid()},latency_us=2000"
