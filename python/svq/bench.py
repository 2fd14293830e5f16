"""``svq bench``: the standard benchmark suite.

Every figure is svq measured against a peer **in the same run** and reported as a ratio,
because the machines are noisy: absolute times are for orientation only. Rows:

* **iova**: svq's IOVA allocator vs a linear first-fit allocator over an ordered map
  (the common design), at 1k…1M live mappings after fragmentation; timed in Rust
  (``_native.bench_iova``).
* **forward (in-process)**: svq's shadow virtqueue run in process on one thread, batches
  of 32, no device thread (``_native.bench_forward``) vs ``PyShadowVirtqueue`` (``benches/pyring.py``, from
  a source tree), the pure-Python shadow virtqueue a Python user would write, over the
  same ring layout.
* **forward (end-to-end)**: frames/s through guest ring → shadow ring → ``sim:net`` →
  back, translate mode vs passthrough on one session switched live between the two.
* **parse**: svq's validated pop vs rust-vmm ``virtio-queue`` over the same ring
  contents; a cargo test binary (``benches/guest_ring_parse.rs``), so only from a source
  tree with cargo.
* **copy**: copy mode's per-command cost for 64-byte control commands with the pre-mapped
  pool vs per-element map/unmap (on ``sim:net``, 128 in flight), and copy mode's cost per
  4 KiB / 64 KiB element vs memcpy of the same bytes (in process, ``_native.bench_copy``).
* **notify**: kicks and calls per element under sustained load, event idx on vs off.
* **boundary**: one ``send`` of 256 frames vs 256 ``send`` calls of one frame.
* **queues**: many queues in process (``_native.bench_forward_queues``): the rate of 2
  queue pairs on 2 threads vs 1 pair on 1 (each thread playing guest and device for its
  own pair), and svq's per-element cost when one thread serves 8 or 64 pairs vs 1; end
  to end, 2 pairs of ``sim:net,pairs=2`` vs 1 pair.
* **capture**: end-to-end forwarding with a packet capture on vs off.
* **idle**: the CPU an idle session costs (every thread of the process) with the
  engine's adaptive poll on (the default window) vs off.
* **restore**: a fresh session restoring a 4 099-command control-queue state (4 096
  VLANs, MAC, MAC table, RX mode), all in flight together, vs the same commands sent one
  at a time.
* **dirty**: forwarding with the dirty log attached vs without, on one queue (one session
  end to end) in turn: in process (a cargo test binary, ``benches/dirty_log.rs``, chains
  the device writes) and end to end on ``sim:net``.
* **switch**: live switches passthrough → translate → passthrough of one queue and of
  every data queue at once, and of a 16 GiB guest's session vs a 32 MiB guest's.

The ratio column is always "higher is better for svq": peer time / svq time, or svq
throughput / peer throughput, or peer notifications / svq notifications.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import _native, net, progress

if TYPE_CHECKING:
    from .session import Driver, Session
    from .types import NetState

MASK64 = (1 << 64) - 1

# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table. ``ratio`` is higher-is-better for svq; ``met`` is None when
    the row has no target (or was skipped)."""

    name: str
    svq: float | None
    peer: float | None
    unit: str
    ratio: float | None
    target: str
    met: bool | None
    #: The smallest acceptable ratio, when the target is a ratio.
    min_ratio: float | None = None
    #: The largest acceptable svq figure, when the target bounds it (a time or a count).
    svq_max: float | None = None
    #: Whether ``svq_max`` bounds a time (never a reason to fail: machines are noisy).
    svq_max_is_time: bool = True
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: What svq is measured against (the "(vs ...)" of the name).
    peer_name: str = ""
    #: Measurements behind svq's figure.
    repeats: int = 1
    #: The lowest and highest ratio over the repeats, when both sides were repeated.
    spread: tuple[float, float] | None = None
    #: The spread crosses the target: some repeats met it and others did not, so the row
    #: is marked noisy rather than failed.
    noisy: bool = False

    def wildly_off(self) -> bool:
        """10× worse than the target on a ratio (or on a non-time bound)."""
        if self.ratio is not None and self.min_ratio is not None and self.ratio < self.min_ratio / 10:
            return True
        return (
            self.svq is not None
            and self.svq_max is not None
            and not self.svq_max_is_time
            and self.svq > self.svq_max * 10
        )


def _row(
    name: str,
    svq: float | None,
    peer: float | None,
    unit: str,
    *,
    higher_better: bool,
    target: str = "",
    min_ratio: float | None = None,
    svq_max: float | None = None,
    svq_max_is_time: bool = True,
    note: str = "",
    **extra: Any,
) -> Row:
    ratio = None
    if svq is not None and peer is not None and svq > 0 and peer > 0:
        ratio = svq / peer if higher_better else peer / svq
    met: bool | None = None
    if min_ratio is not None or svq_max is not None:
        met = True
        if min_ratio is not None:
            met = ratio is not None and ratio >= min_ratio
        if svq_max is not None:
            met = met and svq is not None and svq <= svq_max
    svq_runs, peer_runs = extra.get("svq_runs"), extra.get("peer_runs")
    repeats = len(svq_runs) if isinstance(svq_runs, list) and svq_runs else 1
    spread = None
    if isinstance(svq_runs, list) and isinstance(peer_runs, list) and len(svq_runs) == len(peer_runs) > 1:
        pairs = [(s, p) for s, p in zip(svq_runs, peer_runs, strict=True) if s > 0 and p > 0]
        ratios = [s / p if higher_better else p / s for s, p in pairs]
        if ratios:
            spread = (min(ratios), max(ratios))
    noisy = bool(met is False and min_ratio is not None and spread and spread[1] >= min_ratio)
    if noisy and spread:
        met = None
        note = f"noisy: the ratio spread {spread[0]:.2f}-{spread[1]:.2f}x over {repeats} repeats crosses the target" + (
            f"; {note}" if note else ""
        )
    peer_name = name.rsplit("(vs ", 1)[1].rstrip(")") if "(vs " in name else ""
    return Row(
        name, svq, peer, unit, ratio, target or "-", met, min_ratio, svq_max, svq_max_is_time, note, dict(extra),
        peer_name, repeats, spread, noisy,
    )


def _skipped(name: str, unit: str, target: str, why: str) -> Row:
    return Row(name, None, None, unit, None, target, None, note=f"skipped: {why}")


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    quick: bool
    iova_sizes: tuple[int, ...]
    iova_ops: int
    fwd_elements: int
    py_elements: int
    e2e_rounds: int
    e2e_reps: int
    notify_rounds: int
    boundary_reps: int
    cargo: bool
    #: Seconds the linear IOVA peer may take per kind of operation and size.
    peer_budget_s: float = 0.3
    #: Live switches each way per row.
    switch_reps: int = 50


def plan(quick: bool, cargo: bool = True) -> Plan:
    if quick:
        return Plan(True, (1_000, 10_000, 100_000), 20_000, 200_000, 6_400, 200, 3, 300, 10, cargo, 0.2, 10)
    return Plan(False, (1_000, 10_000, 100_000, 1_000_000), 200_000, 2_000_000, 64_000, 1000, 5, 2000, 50, cargo, 2.0)


#: The progress bar of the run in progress, if any (drawn only for a person).
_bars: list[progress.Bar] = []


def _progress(msg: str) -> None:
    if _bars:
        _bars[-1].set_description_str(f"svq bench: {msg}")


def iova_rows(p: Plan) -> list[Row]:
    rows = []
    figs = {}
    for live in p.iova_sizes:
        # The peer is linear (~5 ns per live mapping per operation here): cap its
        # operations to a time budget. Its per-op figure is the mean over the ops it did.
        peer_ops = max(10, min(p.iova_ops, int(p.peer_budget_s / (live * 5e-9))))
        _progress(f"iova allocator at {live} live mappings (peer: {peer_ops} ops)")
        f = _native.bench_iova(live, p.iova_ops, peer_ops)
        figs[live] = f
        at_target = live == 100_000
        svq_pair = f["svq_alloc_ns"] + f["svq_free_ns"]
        peer_pair = f["peer_alloc_ns"] + f["peer_free_ns"]
        common = {
            "live": live,
            "svq_ops": f["svq_ops"],
            "peer_ops": f["peer_ops"],
            "agree": f["agree"],
        }
        rows.append(
            _row(
                f"iova alloc+free pair @{_k(live)} live",
                svq_pair,
                peer_pair,
                "ns/pair",
                higher_better=False,
                target="svq <= 1000 ns/op, >= 1000x peer" if at_target else "",
                min_ratio=1000 if at_target else None,
                svq_max=2000 if at_target else None,
                note="" if f["agree"] else "svq and peer DISAGREE",
                svq_alloc_ns=f["svq_alloc_ns"],
                svq_free_ns=f["svq_free_ns"],
                peer_alloc_ns=f["peer_alloc_ns"],
                peer_free_ns=f["peer_free_ns"],
                **common,
            )
        )
        rows.append(
            _row(
                f"iova reverse lookup @{_k(live)} live",
                f["svq_lookup_ns"],
                f["peer_lookup_ns"],
                "ns/op",
                higher_better=False,
                target="svq <= 1000 ns/op, >= 1000x peer" if at_target else "",
                min_ratio=1000 if at_target else None,
                svq_max=1000 if at_target else None,
                **common,
            )
        )
    lo, hi = min(figs), max(figs)
    if hi > lo:
        def pair(f: dict[str, Any]) -> float:
            return float(f["svq_alloc_ns"] + f["svq_free_ns"])

        def peer_pair(f: dict[str, Any]) -> float:
            return float(f["peer_alloc_ns"] + f["peer_free_ns"])

        log_growth = math.log2(hi) / math.log2(lo)
        rows.append(
            _row(
                f"iova growth {_k(lo)}->{_k(hi)} (alloc+free)",
                pair(figs[hi]) / pair(figs[lo]),
                peer_pair(figs[hi]) / peer_pair(figs[lo]),
                "x cost",
                higher_better=False,
                target=f"logarithmic (log2 ratio {log_growth:.1f}x; linear {hi / lo:.0f}x)",
                note="informational",
            )
        )
    return rows


#: Why the pure-Python peer is missing from a row.
NO_PEER = "pure-Python peer: run svq bench from a source tree (benches/pyring.py)"


def _k(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)


FWD_CASES = ((1, 64), (4, 64), (1, 1500), (4, 1500))


def python_peer() -> ModuleType | None:
    """``benches/pyring.py`` of the source tree (the pure-Python peer is not part of the
    package); None from a wheel installed elsewhere."""
    root = source_tree()
    if root is None or not (root / "benches" / "pyring.py").is_file():
        return None
    spec = importlib.util.spec_from_file_location("svq_bench_pyring", root / "benches" / "pyring.py")
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forward_inprocess_rows(p: Plan) -> list[Row]:
    rows = []
    peer = python_peer()
    for segs, size in FWD_CASES:
        _progress(f"in-process forwarding, {segs} segment(s), {size} B")
        # Warm-up, then best of three (the machine is noisy; both sides get the same).
        _native.bench_forward(segs, size, 3200)
        rs = min((_native.bench_forward(segs, size, p.fwd_elements) for _ in range(3)), key=lambda r: r["svq_ns"])
        py: dict[str, Any] = {"svq_ns": None, "forward_ns": None, "reap_ns": None, "elements": None}
        if peer is not None:
            py = min((peer.py_forward(segs, size, p.py_elements) for _ in range(2)), key=lambda r: r["svq_ns"])
        agree = rs["checksum"] == expected_forward_checksum(segs, size, rs["elements"]) and (
            peer is None or py["checksum"] == expected_forward_checksum(segs, size, py["elements"])
        )
        rows.append(
            _row(
                f"forward in-process {segs}seg {size}B (vs pure Python)",
                rs["svq_ns"],
                py["svq_ns"],
                "ns/elem",
                higher_better=False,
                target="svq <= 100 ns/elem, >= 100x pure Python",
                min_ratio=100 if peer is not None else None,
                svq_max=100,
                note="svq and the Python peer DISAGREE" if not agree else "" if peer else NO_PEER,
                agree=agree,
                svq_forward_ns=rs["forward_ns"],
                svq_reap_ns=rs["reap_ns"],
                peer_forward_ns=py["forward_ns"],
                peer_reap_ns=py["reap_ns"],
                elements=rs["elements"],
                peer_elements=py["elements"],
            )
        )
        # The ceiling: a forwarder that only moves descriptors, on the same harness.
        _native.bench_forward_bare(segs, size, 3200)
        bare = min((_native.bench_forward_bare(segs, size, p.fwd_elements) for _ in range(3)), key=lambda r: r["svq_ns"])
        rows.append(
            _row(
                f"forward in-process {segs}seg {size}B (vs bare split-ring forwarder)",
                rs["svq_ns"],
                bare["svq_ns"],
                "ns/elem",
                higher_better=False,
                target="within 2x of the bare forwarder",
                min_ratio=0.5,
                peer_forward_ns=bare["forward_ns"],
                peer_reap_ns=bare["reap_ns"],
            )
        )
    return rows


def expected_forward_checksum(segments: int, frame_size: int, elements: int, batch: int = 32) -> int:
    """The checksum a correct shadow virtqueue produces in ``bench_forward`` /
    :func:`py_forward`: Σ (iova · 31 + len) over every forwarded segment."""
    lay = _native.bench_forward_layout()
    per = max(1, -(-frame_size // segments))
    lens = [min(per, frame_size - k) for k in range(0, frame_size, per)]
    batch = max(1, min(batch, lay["queue_size"] // len(lens)))
    one = 0
    for j in range(batch):
        for k, n in enumerate(lens):
            gpa = lay["buf_base"] + (j * len(lens) + k) * lay["buf_stride"]
            one += (gpa - lay["guest_gpa"] + lay["region_iova"]) * 31 + n
    rounds = -(-elements // batch)
    return (one * rounds) & MASK64


def _exchange(d: Driver, frames: Sequence[bytes], segs: int = 1) -> None:
    """Sends ``frames`` on TX (receive buffers already posted) and waits until all of
    them came back on RX and TX completed; raises if one was lost or corrupted."""
    d.send(net.TX, frames, segs)
    got = d.wait(net.RX, len(frames))
    d.wait(net.TX, len(frames))
    if len(got) != len(frames) or got[0][2] != frames[0]:
        raise RuntimeError("loopback lost or corrupted a frame")


#: The data queues of a one-pair ``sim:net`` session.
NET_DATA_QUEUES = (net.RX, net.TX)


def forward_e2e_rows(p: Plan) -> list[Row]:
    rows = []
    for segs, size in FWD_CASES:
        _progress(f"end-to-end on sim:net, {segs} segment(s), {size} B: translate vs passthrough")
        # One session switched live between the two, block by block (see _loopback_in_turn).
        tr, pt = _loopback_in_turn(
            segs,
            size,
            2 * p.e2e_reps,
            p.e2e_rounds // 4,
            lambda s: s.switch(NET_DATA_QUEUES, "translate"),
            lambda s: s.switch(NET_DATA_QUEUES, "passthrough"),
            mode="passthrough",
        )
        svq_rate, peer_rate = statistics.median(tr), statistics.median(pt)
        rows.append(
            _row(
                f"forward end-to-end {segs}seg {size}B (vs passthrough)",
                svq_rate,
                peer_rate,
                "frames/s",
                higher_better=True,
                target=">= 0.90x passthrough",
                min_ratio=0.9,
                svq_ns_per_frame=1e9 / svq_rate,
                peer_ns_per_frame=1e9 / peer_rate,
                svq_runs=tr,
                peer_runs=pt,
                note="median of blocks in translate and blocks in passthrough, in turn on one session switched live",
            )
        )
    return rows


def queues_rows(p: Plan) -> list[Row]:
    """Many queues, in process: scaling over threads (a pair per thread, as the engine
    puts a pair on one worker) and the per-queue cost as one thread serves more pairs;
    end to end on the embedded device, the scaling from one pair to two (no target)."""
    segs, size = 1, 64
    per_queue = max(3200, p.fwd_elements // 8)
    cpus = len(os.sched_getaffinity(0))
    _progress(f"in-process forwarding: 2 pairs on 2 threads vs 1 pair on 1 ({cpus} CPUs)")
    one, two = [], []
    for _ in range(3):  # alternated, best of each
        one.append(_native.bench_forward_queues(1, 2, segs, size, per_queue)["rate"])
        two.append(_native.bench_forward_queues(2, 2, segs, size, per_queue)["rate"])
    rows = [
        _row(
            "forward in-process 2 pairs on 2 threads (vs 1 pair on 1)",
            max(two),
            max(one),
            "elem/s",
            higher_better=True,
            target=">= 1.7x" if cpus >= 2 else "needs 2 CPUs",
            min_ratio=1.7 if cpus >= 2 else None,
            svq_runs=two,
            peer_runs=one,
            cpus=cpus,
        )
    ]
    base: list[float] = []
    for pairs in (1, 8, 64):
        _progress(f"in-process forwarding: one thread serving {pairs} pair(s)")
        # About the same elements in all whatever the pairs (at least 640 per queue).
        elements = max(640, per_queue // pairs)
        runs = [_native.bench_forward_queues(1, 2 * pairs, segs, size, elements)["svq_ns"] for _ in range(3)]
        if pairs == 1:
            base = runs
            continue
        rows.append(
            _row(
                f"per-queue cost, one thread serving {pairs} pairs (vs 1 pair)",
                min(runs),
                min(base),
                "ns/elem",
                higher_better=False,
                target="flat within 1.2x",
                min_ratio=1 / 1.2,
                svq_runs=runs,
                peer_runs=base,
            )
        )
    _progress("end-to-end on sim:net: 2 pairs vs 1 pair")
    e2e_one, e2e_two = [], []
    for _ in range(p.e2e_reps):  # alternated
        e2e_one.append(_mq_loopback_rate(1, p.e2e_rounds // 2))
        e2e_two.append(_mq_loopback_rate(2, p.e2e_rounds // 2))
    rows.append(
        _row(
            "forward end-to-end 2 pairs (vs 1 pair)",
            statistics.median(e2e_two),
            statistics.median(e2e_one),
            "frames/s",
            higher_better=True,
            target="report the scaling",
            svq_runs=e2e_two,
            peer_runs=e2e_one,
            cpus=cpus,
            note="the Python driver (one thread) and the embedded device (one thread for all queues) "
            "share the CPUs with the engine's workers",
        )
    )
    return rows


def _mq_loopback_rate(pairs: int, rounds: int, batch: int = 64) -> float:
    """Frames/s through TX→RX loopback on every pair of a translate session of
    ``sim:net,pairs=N`` (pairs put in use with MQ_VQ_PAIRS_SET, each pair on its engine
    worker): per round, ``batch`` frames sent on every pair's TX, then all of them waited
    for on every pair's RX."""
    from .session import Session

    ctrl = 2 * pairs
    frames = [net.frame(net.BROADCAST, bytes(64 - net.NET_HDR_LEN - 14))] * batch
    with Session(f"sim:net,pairs={pairs}", mode="translate", queue_modes={ctrl: "copy"}) as s:
        d = s.driver
        if pairs > 1 and d.request(ctrl, [net.mq_pairs_set(pairs)], 1) != (1, bytes([net.ACK_OK])):
            raise RuntimeError(f"the device refused {pairs} queue pairs")

        def round_trip() -> None:
            for q in range(pairs):
                d.post_receive(2 * q, batch, 2048)
                d.send(2 * q + 1, frames)
            for q in range(pairs):
                if len(d.wait(2 * q, batch)) != batch or len(d.wait(2 * q + 1, batch)) != batch:
                    raise RuntimeError(f"pair {q} lost a frame")

        for _ in range(3):
            round_trip()
        t = time.perf_counter()
        for _ in range(rounds):
            round_trip()
        return pairs * batch * rounds / (time.perf_counter() - t)


def _restore_state() -> tuple[NetState, list[bytes]]:
    """The net state of a 4 096-VLAN table, a MAC, a MAC table and an RX mode, as a
    device acknowledged it, and the commands that built it."""
    from .session import Mode, Session

    cmds = [net.vlan_add(v) for v in range(4096)]
    cmds += [
        net.mac_addr_set(net.parse_mac("02:00:00:00:00:07")),
        net.mac_table_set([net.parse_mac("02:00:00:00:00:08")], [net.parse_mac("01:00:5e:00:00:01")]),
        net.rx_mode("promisc", True),
    ]
    with Session("sim:net", mode=Mode.PASSTHROUGH, queue_modes={net.CTRL: Mode.COPY}) as s:
        if any(ack != bytes([net.ACK_OK]) for _, ack in s.inject_many(net.CTRL, [(c, 1) for c in cmds])):
            raise RuntimeError("the device refused a command of the state to restore")
        state = s.net_state()
    if state is None:
        raise RuntimeError("no net state tracked")
    return state, cmds


def restore_rows(p: Plan) -> list[Row]:
    """Control-queue restore on a fresh session (``Session(restore=...)``): the session's
    set-up time less the same set-up without a restore, per command; the peer sends the
    same commands one at a time, each waited for, on a session already set up."""
    from .session import Mode, Session

    state, cmds = _restore_state()
    n = len(cmds)
    kwargs: dict[str, Any] = {"mode": Mode.PASSTHROUGH, "queue_modes": {net.CTRL: Mode.COPY}}
    reps = 3 if p.quick else 7
    _progress(f"control-queue restore of {n} commands, {reps} times, vs one at a time")
    clock = time.perf_counter
    restored, bare = [], []
    for _ in range(reps):
        # Set-up only: closing (a restored session has more pool pages to give back) and
        # reading the state back are not the restore.
        t = clock()
        with Session("sim:net", **kwargs):
            bare.append(clock() - t)
        t = clock()
        with Session("sim:net", restore=state, **kwargs) as s:
            restored.append(clock() - t)
            if s.net_state() != state:
                raise RuntimeError("the restored session tracks another state")
    per_cmd = [max(r - b, 0.0) * 1e6 / n for r, b in zip(restored, bare, strict=True)]
    with Session("sim:net", **kwargs) as s:
        t = clock()
        for c in cmds:
            s.inject(net.CTRL, c, 1)
        one_by_one = (clock() - t) * 1e6 / len(cmds)
    return [
        _row(
            f"control-queue restore, {n} commands in flight together (vs one at a time)",
            statistics.median(per_cmd),
            one_by_one,
            "us/cmd",
            higher_better=False,
            target="<= 1 us per command",
            svq_max=1.0,
            svq_runs=per_cmd,
            commands=n,
        )
    ]


def _idle_cpu_percent(busy_poll: float, seconds: float) -> float:
    """Percent of one CPU the whole process uses while a session that just forwarded a
    burst sits idle (its poll window long over)."""
    from .session import Session

    with Session("sim:net", busy_poll=busy_poll) as s:
        _loopback(s, 64)
        time.sleep(0.05)
        t0, c0 = time.monotonic(), time.process_time()
        time.sleep(seconds)
        return (time.process_time() - c0) * 100 / (time.monotonic() - t0)


def idle_rows(p: Plan) -> list[Row]:
    """An idle polling session must not spin: its CPU (every thread of this process:
    the engine, the embedded device, the interpreter) against a session that never
    polls."""
    seconds = 0.5 if p.quick else 2.0
    _progress(f"idle CPU of a session, {seconds} s with the adaptive poll on and off")
    on = _idle_cpu_percent(200e-6, seconds)
    off = _idle_cpu_percent(0.0, seconds)
    return [
        _row(
            "idle CPU, adaptive poll on (vs never polling)",
            on,
            off,
            "% of a CPU",
            higher_better=False,
            target="no spinning: <= 1% of a CPU",
            svq_max=1.0,
            svq_max_is_time=False,
            note="informational ratio: both are near zero",
        )
    ]


def capture_rows(p: Plan) -> list[Row]:
    """Forwarding with a packet capture on (both directions to a pcapng file) against the
    same loopback with none: the cost of capturing. With none, the hot path pays one
    branch (the translate fast path is kept)."""
    import tempfile

    segs, size = 1, 256
    _progress(f"end-to-end on sim:net, {segs} segment, {size} B: capture on vs off")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcapng"

        def capture_off(s: Any) -> None:
            if not s.stop_capture()["packets"]:
                raise RuntimeError("the capture recorded no frame")

        on, off = _loopback_in_turn(
            segs, size, 2 * p.e2e_reps, p.e2e_rounds // 4, lambda s: s.start_capture(path), capture_off
        )
    svq_rate, peer_rate = statistics.median(on), statistics.median(off)
    return [
        _row(
            f"capture on, end-to-end {segs}seg {size}B (vs capture off)",
            svq_rate,
            peer_rate,
            "frames/s",
            higher_better=True,
            target="report the cost",
            svq_runs=on,
            peer_runs=off,
            note="median of blocks with the capture on and blocks without, in turn on one session",
        )
    ]


#: A unicast address the device's filter drops: TX frames complete (length 0) without
#: touching RX, so TX-only load does not depend on RX buffers being posted in time.
OTHER_MAC = b"\x02\x00\x00\x00\x00\x99"


def _sustained(event_idx: bool, rounds: int, batch: int = 32, depth: int = 4) -> dict[str, Any]:
    """TX load with ``depth`` batches in flight all the time (each completion makes room
    for the next batch); the TX queue's counters per element."""
    from .session import Session

    frames = [net.frame(OTHER_MAC, bytes(64 - net.NET_HDR_LEN - 14))] * batch
    with Session("sim:net", mode="translate", event_idx=event_idx) as s:
        d = s.driver
        for _ in range(depth):
            d.send(net.TX, frames)
        for _ in range(rounds):
            d.wait(net.TX, batch)
            d.send(net.TX, frames)
        d.wait(net.TX, batch * depth)
        tx = s.stats(net.TX)
    return {
        "kicks_per_elem": tx["device_kicks"] / tx["elements"],
        "calls_per_elem": tx["guest_calls"] / tx["completed"],
        "elements": tx["elements"],
        "tx": tx,
    }


def _command_cost(strategy: str, rounds: int, batch: int = 128) -> float:
    """Seconds per 64-byte control command injected on a copy-mode control queue, `batch`
    in flight at a time (best round)."""
    from .session import Mode, Session

    cmds = [(net.vlan_add(1) + bytes(60), 1)] * batch
    with Session(
        "sim:net", mode=Mode.PASSTHROUGH, queue_modes={net.CTRL: Mode.COPY}, copy_strategy=strategy, track_net_state=False
    ) as s:
        s.inject_many(net.CTRL, cmds)  # warm up
        best = math.inf
        for _ in range(rounds):
            t0 = time.perf_counter()
            s.inject_many(net.CTRL, cmds)
            best = min(best, (time.perf_counter() - t0) / batch)
    return best


def copy_rows(p: Plan) -> list[Row]:
    _progress("copy mode: 64 B commands, pool vs per-element")
    rounds = 5 if p.quick else 20
    pool, per_element = _command_cost("pool", rounds), _command_cost("per-element", rounds)
    rows = [
        _row(
            "copy: 64B command, pool (vs per-element)",
            pool * 1e9,
            per_element * 1e9,
            "ns/cmd",
            higher_better=False,
            target=">= 10x cheaper than per-element",
            min_ratio=10,
        )
    ]
    for size, share in ((4096, 0.5), (65536, 0.8)):
        _progress(f"copy mode: {size // 1024} KiB elements vs memcpy")
        n = (20_000 if size == 4096 else 4_000) // (4 if p.quick else 1)
        runs = [_native.bench_copy(size, n) for _ in range(3 if p.quick else 5)]
        svq_runs, peer_runs = [size / r["svq_ns"] for r in runs], [size / r["memcpy_ns"] for r in runs]
        rows.append(
            _row(
                f"copy: {size // 1024} KiB element (vs memcpy)",
                statistics.median(svq_runs),
                statistics.median(peer_runs),
                "GB/s",
                higher_better=True,
                target=f">= {share:.0%} of memcpy",
                min_ratio=share,
                svq_runs=svq_runs,
                peer_runs=peer_runs,
            )
        )
    return rows


def notify_rows(p: Plan) -> list[Row]:
    _progress("notifications under sustained load, event idx on and off")
    on, off = _sustained(True, p.notify_rounds), _sustained(False, p.notify_rounds)
    return [
        _row(
            "notify: device kicks/elem (event idx on vs off)",
            on["kicks_per_elem"],
            off["kicks_per_elem"],
            "kicks/elem",
            higher_better=False,
            target="<= 1 kick per 32 elements with event idx",
            svq_max=1 / 32,
            svq_max_is_time=False,
            elements=on["elements"],
            guest_kicks_on=on["tx"]["guest_kicks"],
            guest_kicks_off=off["tx"]["guest_kicks"],
        ),
        _row(
            "notify: guest calls/elem (event idx on vs off)",
            on["calls_per_elem"],
            off["calls_per_elem"],
            "calls/elem",
            higher_better=False,
            note="informational",
        ),
    ]


def boundary_rows(p: Plan, n: int = 256) -> list[Row]:
    from .session import Session

    _progress(f"Python boundary: one send of {n} frames vs {n} sends of one (TX only)")
    frames = [net.frame(OTHER_MAC, bytes(64 - net.NET_HDR_LEN - 14))] * n
    batch_t, single_t = [], []
    clock = time.perf_counter
    with Session("sim:net", mode="translate") as s:
        d = s.driver

        def settle() -> None:
            d.wait(net.TX, n)

        for rep in range(p.boundary_reps + 1):
            t = clock()
            d.send(net.TX, frames)
            dt = clock() - t
            settle()
            t = clock()
            for f in frames:
                d.send(net.TX, [f])
            ds = clock() - t
            settle()
            if rep:  # the first round warms up
                batch_t.append(dt)
                single_t.append(ds)
    b, s_ = statistics.median(batch_t) * 1e9 / n, statistics.median(single_t) * 1e9 / n
    return [
        _row(
            f"boundary: send x{n} in one call (vs {n} calls)",
            b,
            s_,
            "ns/elem",
            higher_better=False,
            note="informational (no target set)",
        )
    ]


def source_tree() -> Path | None:
    """An svq source tree: the one this package was built from (an editable install), or
    the current directory when it is one (``svq bench`` run from a clone)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "Cargo.toml").is_file() and (root / "benches" / "guest_ring_parse.rs").is_file():
            return root
    return None


def _cargo_bench(p: Plan, bench: str, what: str) -> list[dict[str, Any]] | str:
    """The ``SVQ_BENCH {json}`` lines of ``cargo test --release --bench BENCH``, or why
    there are none."""
    if not p.cargo:
        return "--no-cargo"
    root, cargo = source_tree(), shutil.which("cargo")
    if root is None or cargo is None:
        return "needs a source tree and cargo"
    _progress(f"{what} (cargo test --release --bench {bench})")
    env = dict(os.environ, SVQ_BENCH_QUICK="1" if p.quick else "0")
    cmd = [cargo, "test", "--release", "--quiet", "--bench", bench, "--", "--nocapture", "--test-threads=1"]
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "cargo timed out"
    figs = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("SVQ_BENCH ")]
    if out.returncode != 0 or not figs:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return f"cargo failed: {' / '.join(tail)}"
    return figs


def parse_rows(p: Plan) -> list[Row]:
    target = "within 1.5x of virtio-queue or faster"
    figs = _cargo_bench(p, "guest_ring_parse", "guest-ring parsing vs virtio-queue")
    if isinstance(figs, str):
        return [_skipped(f"parse: validated pop {segs}seg (vs virtio-queue)", "ns/chain", target, figs) for segs in (1, 4)]
    rows = []
    for f in figs:
        rows.append(
            _row(
                f"parse: validated pop {f['segments']}seg (vs virtio-queue)",
                f["svq_ns"],
                f["peer_ns"],
                "ns/chain",
                higher_better=False,
                target=target,
                min_ratio=1 / 1.5,
                chains=f["chains"],
                agree=f["agree"],
                note="" if f["agree"] else "svq and virtio-queue DISAGREE",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------
# Live migration: dirty logging and live switches
# ---------------------------------------------------------------------------------------

DIRTY_TARGET = "<= 10% slower"
#: The in-process cases of ``benches/dirty_log.rs`` (segments, frame size).
DIRTY_INPROCESS_CASES = ((1, 64), (1, 1500), (4, 1500))
DIRTY_E2E_CASES = ((1, 64), (1, 1500))


def dirty_rows(p: Plan) -> list[Row]:
    """Forwarding with the dirty log attached against the same forwarding without it: in
    process (a cargo bench: the device writes every chain, as on a receive queue) and
    end to end (TX→RX loopback on ``sim:net``, received frames and used rings logged)."""
    rows = []
    figs = _cargo_bench(p, "dirty_log", "in-process forwarding with the dirty log vs without")
    if isinstance(figs, str):
        rows += [
            _skipped(f"forward with dirty log in-process {s}seg {n}B (vs without)", "ns/elem", DIRTY_TARGET, figs)
            for s, n in DIRTY_INPROCESS_CASES
        ]
    else:
        for f in figs:
            rows.append(
                _row(
                    f"forward with dirty log in-process {f['segments']}seg {f['frame_size']}B (vs without)",
                    f["svq_ns"],
                    f["peer_ns"],
                    "ns/elem",
                    higher_better=False,
                    target=DIRTY_TARGET,
                    min_ratio=0.9,
                    elements=f["elements"],
                    agree=f["agree"],
                    note="" if f["agree"] else "the dirty log missed a written page or marked another",
                )
            )
    for segs, size in DIRTY_E2E_CASES:
        _progress(f"end-to-end on sim:net, {segs} segment(s), {size} B: dirty log on vs off")

        def log_off(s: Any) -> None:
            if not s.dirty_pages():
                raise RuntimeError("the dirty log saw no page written")
            s.stop_dirty_log()

        on, off = _loopback_in_turn(segs, size, 2 * p.e2e_reps, p.e2e_rounds // 4, lambda s: s.start_dirty_log(), log_off)
        rows.append(
            _row(
                f"forward with dirty log end-to-end {segs}seg {size}B (vs without)",
                statistics.median(on),
                statistics.median(off),
                "frames/s",
                higher_better=True,
                target=DIRTY_TARGET,
                min_ratio=0.9,
                svq_runs=on,
                peer_runs=off,
                note="median of blocks with the log attached and blocks without, in turn on one session",
            )
        )
    return rows


def _loopback_in_turn(
    segs: int,
    size: int,
    blocks: int,
    rounds: int,
    on: Callable[[Any], object],
    off: Callable[[Any], object],
    batch: int = 64,
    mode: str = "translate",
) -> tuple[list[float], list[float]]:
    """Frames/s through TX→RX loopback on one session of ``sim:net`` in ``mode``: ``blocks``
    blocks of ``rounds`` rounds after ``on(session)`` and as many after ``off(session)``,
    in turn (which goes first alternates; ``on`` and ``off`` are called when the state
    changes, the session starting off). One session, so that the two differ only in what
    ``on`` and ``off`` change: two sessions differ by more, their device and engine threads
    landing wherever the scheduler puts them. The rates of each, block by block."""
    from .session import Session

    frames = [net.frame(net.BROADCAST, bytes(size - net.NET_HDR_LEN - 14))] * batch
    rates: dict[bool, list[float]] = {True: [], False: []}
    with Session("sim:net", mode=mode) as s:
        d = s.driver

        def round_trip() -> None:
            d.post_receive(net.RX, batch, 2048)
            _exchange(d, frames, segs)

        for _ in range(3):
            round_trip()
        now = False
        for b in range(blocks):
            for state in (b % 2 == 0, b % 2 != 0):
                if state != now:
                    (on if state else off)(s)
                    now = state
                t = time.perf_counter()
                for _ in range(rounds):
                    round_trip()
                rates[state].append(batch * rounds / (time.perf_counter() - t))
        if now:
            off(s)
    return rates[True], rates[False]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _loopback(s: Session, n: int = 8) -> None:
    """A few frames through TX→RX loopback: the rings move between switches, and each mode
    is shown to carry traffic."""
    from .session import Mode

    frames = [net.frame(net.BROADCAST, bytes(64 - net.NET_HDR_LEN - 14))] * n
    shadowed_rx = s.modes[net.RX] is not Mode.PASSTHROUGH
    forwarded = s.stats(net.RX)["elements"] if shadowed_rx else 0
    s.driver.post_receive(net.RX, n, 2048)
    if shadowed_rx:
        # The device drops frames that find no receive buffer, as a NIC does. With RX
        # shadowed and TX not, the frames would reach the device straight from the guest
        # while the buffers still cross the shadow: wait until they are on its ring.
        deadline = time.monotonic() + 10
        while s.stats(net.RX)["elements"] < forwarded + n:
            if time.monotonic() > deadline:
                raise RuntimeError("the shadow did not forward the receive buffers")
            time.sleep(50e-6)
    _exchange(s.driver, frames)


def _switch_pair(s: Session, queues: Sequence[int]) -> tuple[float, float]:
    """Seconds of one switch of ``queues`` from passthrough to translate and one back, as
    the caller sees them, with traffic before each."""
    clock = time.perf_counter
    _loopback(s)
    t = clock()
    s.switch(queues, "translate")
    there = clock() - t
    _loopback(s)
    t = clock()
    s.switch(queues, "passthrough")
    return there, clock() - t


def _session_for_switch(memory: tuple[int, int]) -> Session:
    from .session import Mode, Session

    # Started in passthrough (guest memory mapped at IOVA = guest address, which a switch
    # back to passthrough needs); the control queue's mode is fixed for the session.
    return Session("sim:net", mode=Mode.PASSTHROUGH, queue_modes={net.CTRL: Mode.COPY}, memory=[memory])


SWITCH_TARGET = "<= 10 ms"
SWITCH_MAX_US = 10_000.0
GUEST_LARGE = (1 << 30, 16 << 30)
GUEST_SMALL = (1 << 30, 32 << 20)


def _switch_way_rows(
    name: str, svq: Sequence[tuple[float, float]], peer: Sequence[tuple[float, float]], **kw: Any
) -> list[Row]:
    """A row for each way of a switch (passthrough->translate, then back) from seconds
    measured as (there, back) pairs: medians in µs, svq's worst as ``svq_max_us``."""
    med, us = statistics.median, 1e6
    kw.setdefault("target", SWITCH_TARGET)
    return [
        _row(name.format(way=way), med(x[k] for x in svq) * us, med(x[k] for x in peer) * us, "us",
             higher_better=False, svq_max=SWITCH_MAX_US, svq_max_us=max(x[k] for x in svq) * us, **kw)
        for k, way in enumerate(("passthrough->translate", "translate->passthrough"))
    ]


def switch_rows(p: Plan) -> list[Row]:
    """Live switches passthrough → translate → passthrough on ``sim:net`` with frames
    flowing between them: one queue, every data queue of the session at once, and the
    session of a 16 GiB guest against the same switch on a 32 MiB guest. Median of the
    repetitions, in µs as the caller of ``Session.switch`` sees them."""
    reps = p.switch_reps
    rows: list[Row] = []
    data = [net.RX, net.TX]
    _progress(f"live switch of one queue and of the session, {reps} times each way")
    with _session_for_switch(GUEST_SMALL) as s:
        one: list[tuple[float, float]] = []
        both: list[tuple[float, float]] = []
        pause: list[float] = []
        apart: list[tuple[float, float]] = []
        for _ in range(reps):
            one.append(_switch_pair(s, [net.RX]))
            both.append(_switch_pair(s, data))
            # Peers: the device's bare suspend + resume (every switch has one), and the
            # data queues switched one call at a time.
            t = time.perf_counter()
            s.suspend()
            s.resume()
            pause.append(time.perf_counter() - t)
            per_queue = [_switch_pair(s, [q]) for q in data]
            apart.append((sum(x[0] for x in per_queue), sum(x[1] for x in per_queue)))
    pauses = [(t, t) for t in pause]  # one suspend+resume is the peer of either way
    rows += _switch_way_rows("switch 1 queue {way} (vs device suspend+resume)", one, pauses,
                             note="informational ratio: the device's pause alone")
    rows += _switch_way_rows("switch session (2 data queues) {way} (vs one queue at a time)", both, apart)

    _progress(f"live switch of a 16 GiB guest's session vs a 32 MiB guest's, {reps} times each way")
    rss0 = _rss_bytes()
    with _session_for_switch(GUEST_LARGE) as big, _session_for_switch(GUEST_SMALL) as small:
        large_t: list[tuple[float, float]] = []
        small_t: list[tuple[float, float]] = []
        for i in range(reps):
            # Alternated (and which goes first too) so both see the same machine.
            if i % 2:
                large_t.append(_switch_pair(big, data))
                small_t.append(_switch_pair(small, data))
            else:
                small_t.append(_switch_pair(small, data))
                large_t.append(_switch_pair(big, data))
        rss_growth = max(0, _rss_bytes() - rss0)
    # The guest's memory is a sparse memfd: svq maps its regions and never touches their
    # pages, so the 16 GiB cost neither time nor resident memory.
    note = "" if rss_growth < 256 << 20 else f"resident memory grew by {rss_growth >> 20} MiB"
    rows += _switch_way_rows("switch 16 GiB guest session {way} (vs 32 MiB guest)", large_t, small_t,
                             target=f"{SWITCH_TARGET}, ~1.0x the 32 MiB guest (>= 0.5x)", min_ratio=0.5,
                             note=note, rss_growth_bytes=rss_growth)
    return rows


SECTIONS: dict[str, Callable[[Plan], list[Row]]] = {
    "iova": iova_rows,
    "forward": forward_inprocess_rows,
    "e2e": forward_e2e_rows,
    "capture": capture_rows,
    "queues": queues_rows,
    "restore": restore_rows,
    "idle": idle_rows,
    "parse": parse_rows,
    "copy": copy_rows,
    "notify": notify_rows,
    "boundary": boundary_rows,
    "dirty": dirty_rows,
    "switch": switch_rows,
}


def suite(p: Plan, only: Iterable[str] | None = None, show: bool = False) -> list[Row]:
    """The rows of every section (or those in ``only``); ``show`` draws progress on
    stderr, one step per section, the step's measurement as its description."""
    sections = [(name, f) for name, f in SECTIONS.items() if not only or name in only]
    rows: list[Row] = []
    with progress.bar(len(sections), "section", show=show, desc="svq bench") as b:
        _bars.append(b)
        try:
            for _, f in sections:
                rows.extend(f(p))
                b.update(1)
        finally:
            _bars.pop()
    return rows


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v:,.0f}".replace(",", " ")
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.4f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}x".replace(",", " ") if v >= 100 else f"{v:.2f}x"


def _met(r: Row) -> str:
    return "noisy" if r.noisy else "-" if r.met is None else "yes" if r.met else "NO"


def table(rows: Sequence[Row], markdown: bool = False) -> str:
    head = ("name", "svq", "peer", "unit", "ratio", "target", "met")
    body = [(r.name, _fmt(r.svq), _fmt(r.peer), r.unit, _ratio(r.ratio), r.target, _met(r)) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    w = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    right = {1, 2, 4}
    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w[i]) if i in right else c.ljust(w[i]) for i, c in enumerate(cells))

    notes = [f"  {r.name}: {r.note}" for r in rows if r.note]
    return "\n".join([fmt(head), *(fmt(b) for b in body), *(["notes:", *notes] if notes else [])])


def to_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = asdict(r)
        extra = d.pop("extra")
        d.update({k: v for k, v in extra.items() if k not in d})
        d["wildly_off"] = r.wildly_off()
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller runs (CI: the whole suite in under a minute)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--no-cargo", action="store_true", help="skip rows that need cargo (guest-ring parsing vs virtio-queue)"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SECTIONS),
        help="run only this section (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    """Runs the suite and prints it; non-zero only when a row is wildly off (a ratio 10×
    worse than its target, or a count such as kicks per element or an idle session's
    CPU 10× over its bound), never because of an absolute time."""
    p = plan(args.quick, cargo=not getattr(args, "no_cargo", False))
    t0 = time.perf_counter()
    show = progress.wanted(args.json)
    rows = suite(p, getattr(args, "only", None), show=show)
    if show:
        print(f"svq bench: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(to_json(rows)))
    else:
        print(table(rows, markdown=getattr(args, "markdown", False)))
    bad = [r for r in rows if r.wildly_off()]
    for r in bad:
        print(f"svq bench: {r.name}: {_fmt(r.svq)} {r.unit} (ratio {_ratio(r.ratio)}) is wildly off its target "
              f"({r.target})", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m svq.bench``: the same as ``svq bench`` until the CLI is wired."""
    parser = argparse.ArgumentParser(prog="svq bench", description="svq against peers, measured in the same run.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
