"""Live migration of sessions to other devices, the way a hypervisor moves a VM's vDPA
devices: switch the passthrough queues into the shadow, log every guest page the devices
write while dirty rounds run, stop and save every device state, and resume each on its
new device. A failure at any step leaves the guest running: on the source session itself
when it never stopped, or on a new session on the source device when it did.

>>> import svq
>>> from svq.migrate import migrate
>>> with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
...     s = svq.Session(a, mode="passthrough", queue_modes={svq.net.CTRL: "copy"})
...     s.driver.post_receive(svq.net.RX, 1, 2048)
...     [moved], report = migrate([s], [b])
...     _ = moved.driver.send(svq.net.TX, [svq.net.frame(svq.net.BROADCAST, b"on b")])
...     moved.driver.wait(svq.net.RX, 1)[0][2].endswith(b"on b")
...     moved.close()
True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _native, net
from .device import Device
from .session import Mode, SavedState, Session
from .types import DeviceState

log = logging.getLogger(__name__)

#: The steps of a migration, in order (what :attr:`MigrationError.step` names).
STEPS = ("switch", "dirty_log", "dirty_round", "save", "resume")


class MigrationError(_native.SvqError):
    """A migration step failed. ``step`` names it (one of :data:`STEPS`); ``sessions``
    lists where each guest runs now (the source session, or a new session on its source
    device; None for a guest that could not be kept); the cause is ``__cause__``."""

    def __init__(self, step: str, cause: BaseException, sessions: list[Session | None]) -> None:
        super().__init__(f"migration failed at step {step!r}: {cause}")
        self.step = step
        self.sessions = sessions


@dataclass
class SessionReport:
    """What moved for one session."""

    source: str
    target: str
    #: The queues switched from passthrough into the shadow before the dirty rounds.
    switched: list[int]
    #: The state handed over (ring positions, requests in flight, virtio-net state).
    state: DeviceState


@dataclass
class MigrationReport:
    """Figures of one migration (times in milliseconds)."""

    #: Switching every passthrough queue into the shadow (one device suspend each).
    switch_ms: float
    #: Pages logged per dirty round, the final round (written while stopping) last.
    dirty_rounds: list[int]
    #: Distinct guest pages logged over all rounds.
    dirty_pages: int
    #: Stopping and saving every device.
    stop_ms: float
    #: Starting every destination session (state restored, queues enabled).
    resume_ms: float
    sessions: list[SessionReport] = field(default_factory=list)
    #: When the first device stopped (``time.monotonic()``): a guest's downtime is the
    #: longest gap in its completions from then until the destinations run.
    stopped_at: float = 0.0

    @property
    def blackout_ms(self) -> float:
        """How long no device served the guests: stop and resume."""
        return self.stop_ms + self.resume_ms

    def as_dict(self) -> dict[str, Any]:
        return {
            "switch_ms": round(self.switch_ms, 3),
            "dirty_rounds": self.dirty_rounds,
            "dirty_pages": self.dirty_pages,
            "stop_ms": round(self.stop_ms, 3),
            "resume_ms": round(self.resume_ms, 3),
            "blackout_ms": round(self.blackout_ms, 3),
            "sessions": [
                {"source": r.source, "target": r.target, "switched": r.switched, "state": _state_json(r.state)} for r in self.sessions
            ],
        }


def _state_json(state: DeviceState) -> dict[str, Any]:
    out: dict[str, Any] = dict(state)
    if state["net"] is not None:
        out["net"] = net.state_json(state["net"])
    return out


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3


def _start_like(source: Session, device: Device | str, saved: SavedState, modes: Mapping[int, Mode] | None = None) -> Session:
    """A session configured like ``source`` on ``device``, resuming ``saved``. Queues
    with requests in flight start shadowed (svq submits those again)."""
    opts = dict(source._options)
    queue_modes: dict[int, Mode] = dict(opts.pop("queue_modes"))
    if modes is not None:
        queue_modes.update(modes)
    shadow = source.mode if source.mode is not Mode.PASSTHROUGH else Mode.TRANSLATE
    for q in saved.state["queues"]:
        if q["inflight"] and queue_modes.get(q["index"], opts["mode"]) is Mode.PASSTHROUGH:
            queue_modes[q["index"]] = shadow
    return Session(device, queue_modes=queue_modes, resume=saved, **opts)


def _cancel(sessions: Sequence[Session], switched: Sequence[list[int]]) -> None:
    """Undoes the live part of a migration on the sources: the log stops and the
    switched queues go back to passthrough."""
    for s, queues in zip(sessions, switched, strict=True):
        if s.closed:
            continue
        try:
            s.stop_dirty_log()
        except (ValueError, _native.SvqError):
            pass  # never attached
        if queues:
            try:
                s.switch(queues, Mode.PASSTHROUGH)
            except (OSError, _native.SvqError, ValueError) as e:
                # The queues stay shadowed: slower, still served.
                log.warning("cancelled migration: queues %s of %s stay shadowed (%s)", queues, s.device.spec, e)


def migrate(
    sessions: Sequence[Session],
    targets: Sequence[Device | str],
    *,
    shadow: Mode | str = Mode.TRANSLATE,
    rounds: int = 2,
    on_round: Callable[[int, list[int]], None] | None = None,
    target_modes: Mapping[int, Mode | str] | None = None,
) -> tuple[list[Session], MigrationReport]:
    """Migrates each session to the device at the same position in ``targets`` (a
    :class:`Device`, or a spec the new session then owns) and returns the new sessions
    with the figures. All sessions move together, as one VM's devices do: one switch,
    common dirty rounds, every device stopped before any resumes.

    Steps: passthrough queues switch into ``shadow``; the dirty log starts; ``rounds``
    dirty rounds run (``on_round(i, pages)`` sees each, e.g. to copy those pages); every
    session is saved (stopped); the final round is read; every state resumes on its
    target, configured like its source (``target_modes`` overrides queue modes). A
    session that owned its device closes it once the migration succeeded.

    Raises :class:`MigrationError` naming the failed step; the guests then still run
    (see its ``sessions``)."""
    if len(sessions) != len(targets) or not sessions:
        raise ValueError("migrate needs one target per session, and at least one session")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session is listed twice")
    if rounds < 0:
        raise ValueError("rounds must be >= 0")
    shadow = Mode(shadow)
    if shadow is Mode.PASSTHROUGH:
        raise ValueError("shadow must be translate or copy")
    overrides = {q: Mode(m) for q, m in (target_modes or {}).items()}
    if any(s.closed for s in sessions):
        raise ValueError("a closed session cannot migrate")
    # The source devices outlive the sources' sessions until the migration is done: a
    # guest may have to come back to them.
    owned = [s._owns_device for s in sessions]
    for s in sessions:
        s._owns_device = False
    switched: list[list[int]] = [[] for _ in sessions]

    def fail(step: str, e: BaseException, now: list[Session | None]) -> MigrationError:
        for s, own in zip(now, owned, strict=True):
            if s is not None and own:
                s._owns_device = True
        return MigrationError(step, e, now)

    t = time.perf_counter()
    try:
        for i, s in enumerate(sessions):
            queues = [q for q, m in s.modes.items() if m is Mode.PASSTHROUGH]
            if queues:
                s.switch(queues, shadow)
                switched[i] = queues
    except BaseException as e:
        _cancel(sessions, switched)
        raise fail("switch", e, list(sessions)) from e
    switch_ms = _ms(t)
    step = "dirty_log"
    pages_per_round: list[int] = []
    seen: set[int] = set()
    try:
        for s in sessions:
            s.start_dirty_log()
        step = "dirty_round"
        for i in range(rounds):
            pages = sorted({p for s in sessions for p in s.dirty_pages()})
            pages_per_round.append(len(pages))
            seen.update(pages)
            if on_round is not None:
                on_round(i, pages)
    except BaseException as e:
        _cancel(sessions, switched)
        raise fail(step, e, list(sessions)) from e

    stopped_at = time.monotonic()
    t = time.perf_counter()
    saved: list[SavedState] = []
    for i, s in enumerate(sessions):
        try:
            saved.append(s.save())
        except BaseException as e:
            # Sessions not saved yet still run; those saved, and this one when its state
            # was kept, resume on their source devices.
            here: SavedState | None = getattr(e, "saved", None)
            now: list[Session | None] = []
            for j, src in enumerate(sessions):
                state = saved[j] if j < i else here if j == i and src.closed else None
                if not src.closed:
                    now.append(src)
                elif state is None:
                    now.append(None)
                else:
                    now.append(_resume_back(src, state))
            _cancel(sessions, switched)  # the sources still running
            raise fail("save", e, now) from e
    stop_ms = _ms(t)
    final = sorted({p for s in sessions for p in s.dirty_pages()})
    pages_per_round.append(len(final))
    seen.update(final)
    if on_round is not None:
        on_round(rounds, final)

    t = time.perf_counter()
    moved: list[Session] = []
    for i, (s, target) in enumerate(zip(sessions, targets, strict=True)):
        try:
            moved.append(_start_like(s, target, saved[i], overrides))
        except BaseException as e:
            # Every guest goes back to its source device: those already moved are saved
            # again from their new device first.
            now = []
            for j, src in enumerate(sessions):
                state = saved[j]
                if j < i:
                    try:
                        state = moved[j].save()
                    except BaseException as back:  # noqa: BLE001 - reported below, the others still go back
                        log.error("migration rollback: the session on %s could not be saved again: %s", moved[j].device.spec, back)
                        now.append(moved[j] if not moved[j].closed else None)
                        continue
                now.append(_resume_back(src, state))
            raise fail("resume", e, now) from e
    resume_ms = _ms(t)
    for s, own in zip(sessions, owned, strict=True):
        if own:
            s.device.close()
    report = MigrationReport(
        switch_ms=switch_ms,
        dirty_rounds=pages_per_round,
        dirty_pages=len(seen),
        stop_ms=stop_ms,
        resume_ms=resume_ms,
        stopped_at=stopped_at,
        sessions=[
            SessionReport(source=s.device.spec, target=n.device.spec, switched=sw, state=st.state)
            for s, n, sw, st in zip(sessions, moved, switched, saved, strict=True)
        ],
    )
    log.info("migrated %d sessions: %s", len(sessions), report.as_dict())
    return moved, report


def _resume_back(source: Session, saved: SavedState) -> Session | None:
    """The guest of a stopped source, running again on its source device in its
    original modes (None when that fails too: the state stays in ``saved``)."""
    try:
        return _start_like(source, source.device, saved)
    except BaseException as e:  # noqa: BLE001 - the caller reports the original failure
        log.error("the guest of %s could not resume on its source device: %s", source.device.spec, e)
        return None
