"""Live migration in the real-client tier: a running guest moves from a source qemu to a
destination qemu (``-incoming``) on this host while its NIC is ``-netdev vhost-user`` to a
backend, and the guest pings a peer and streams numbered frames through it the whole time.

One run (:func:`run_migration`):

1. the backend listens on two sockets, ``src.sock`` for the source qemu and ``dst.sock``
   for the destination: one ``dpdk-testpmd`` with two vhost ports (icmpecho,
   ``--port-topology=loop``: each port answers on itself), or two ``svq serve``;
2. both qemus start with the same command line (machine type, memfd RAM ``share=on``,
   ``-smp 1``, NIC with ``vectors=0``, the migration initramfs, no 9p) except the vhost
   socket, the QMP socket and ``-incoming unix:mig.sock``;
3. the guest (``guest/mig-init`` running ``guest/migtraffic.c``) reports on its serial
   console; once it says ``MIGT READY`` and has run ``pre_s`` seconds, the source is told
   to ``migrate`` over QMP, and ``query-migrate`` is polled until it completes;
4. qemu's figures are read once the source's runstate is ``postmigrate`` (before that,
   qemu 7.2 may report 0 for total-time and downtime); the source's virtio queue state
   (what ``GET_VRING_BASE`` handed over) is read, and the source quits;
5. the guest keeps running on the destination for ``post_s`` seconds; then the host
   writes ``stop`` on the destination's console, the guest drains and prints
   ``MIGT RESULT {json}``; the destination is stopped (its final queue state read) and
   quits.

The two consoles are captured with a host timestamp per line: together they are one
stream (a line cut at the switch is finished on the destination). qemu traces its own
vhost-user requests and replies (``-trace vhost_user_write/read``) into ``RUN/*-trace.log``
with timestamps, whatever the backend; the backend's output is captured with timestamps
too. While the migration runs, qemu's vhost dirty log (the ``vhost-log`` memfd it hands
the backend in ``SET_LOG_BASE``) is sampled through ``/proc/PID/fd``: qemu only reads and
clears that bitmap, so every bit found set was set by the backend.

Every wait is bounded; every process is one this module started, stopped by its pid.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import vmlib

NIC_PATH = "/machine/peripheral/nic0/virtio-backend"   # the NIC's QOM path (-device id=nic0)
RX, TX = 0, 1
LOG_ALL = 1 << 26            # VHOST_F_LOG_ALL
PROTOCOL_LOG_SHMFD = 1 << 1  # VHOST_USER_PROTOCOL_F_LOG_SHMFD

# What the guest program does (kernel command line, svqmig.NAME=VALUE).
GUEST_OPTS = {"ping_ms": 50, "rate": 1000, "window": 32, "late_ms": 1000, "drain_ms": 1500,
              "max_secs": 150, "report_ms": 1000, "first_within": 20}

# vhost-user request codes (qemu's -trace vhost_user_write/read prints numbers).
VHOST_USER_REQUESTS = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
    6: "SET_LOG_BASE", 7: "SET_LOG_FD", 8: "SET_VRING_NUM", 9: "SET_VRING_ADDR",
    10: "SET_VRING_BASE", 11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL",
    14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES", 16: "SET_PROTOCOL_FEATURES",
    17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE", 19: "SEND_RARP", 20: "NET_SET_MTU",
    21: "SET_BACKEND_REQ_FD", 22: "IOTLB_MSG", 23: "SET_VRING_ENDIAN", 24: "GET_CONFIG",
    25: "SET_CONFIG", 26: "CREATE_CRYPTO_SESSION", 27: "CLOSE_CRYPTO_SESSION",
    28: "POSTCOPY_ADVISE", 29: "POSTCOPY_LISTEN", 30: "POSTCOPY_END", 31: "GET_INFLIGHT_FD",
    32: "SET_INFLIGHT_FD", 33: "GPU_SET_SOCKET", 34: "RESET_DEVICE", 35: "VRING_KICK",
    36: "GET_MAX_MEM_SLOTS", 37: "ADD_MEM_REG", 38: "REM_MEM_REG", 39: "SET_STATUS",
    40: "GET_STATUS"}
NEED_REPLY = 1 << 3


class MigrationRefused(vmlib.TierError):
    """qemu did not start the migration (``migrate`` answered an error, e.g. a blocker)."""


# ------------------------------------------------------------------ processes, lines
class LineReader:
    """Reads a pipe in a thread: the bytes go to ``path`` unchanged, and each line is kept
    with the host time (``time.time()``) at which its end arrived."""

    def __init__(self, stream, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[float, str]] = []
        self.tail = ""               # an unfinished last line (at EOF)
        self.tail_t: float | None = None
        self.eof = False
        self._cond = threading.Condition()
        self._fd = stream.fileno()
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name=f"reader-{path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        with open(self.path, "wb") as raw:
            while True:
                try:
                    data = os.read(self._fd, 65536)
                except OSError:
                    data = b""
                t = time.time()
                if not data:
                    break
                raw.write(data)
                raw.flush()
                buf += data
                *done, buf = buf.split(b"\n")
                with self._cond:
                    for line in done:
                        self.lines.append((t, line.decode("utf-8", "replace").rstrip("\r")))
                    self.tail = buf.decode("utf-8", "replace").rstrip("\r")
                    self.tail_t = t if buf else None
                    self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()
        self._stream.close()

    def snapshot(self) -> list[tuple[float, str]]:
        with self._cond:
            return list(self.lines)

    def wait_for(self, pattern: str, timeout: float, start: int = 0,
                 alive: Callable[[], str | None] | None = None) -> tuple[int, float, re.Match] | None:
        """The first line from index ``start`` on matching ``pattern``: (index, host time,
        match), or None after ``timeout`` s, at EOF, or when ``alive()`` names a problem."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i][1])
                    if m:
                        return i, self.lines[i][0], m
                    i += 1
                if self.eof or time.monotonic() > deadline or (alive is not None and alive()):
                    return None
                self._cond.wait(0.1)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines) + ("\n" + self.tail if self.tail else "")


class Proc:
    """A child in a session of its own; stdout (and stderr) read by a :class:`LineReader`
    into ``logdir/NAME.log``. ``stdin_pipe`` keeps its stdin writable."""

    def __init__(self, argv: Sequence[str], logdir: Path, name: str, *, stdin_pipe: bool = False,
                 stderr_file: bool = False, env: dict[str, str] | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self.err_path = logdir / f"{name}.stderr" if stderr_file else None
        with open(self.err_path or os.devnull, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err if self.err_path else subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        self.out = LineReader(self.proc.stdout, self.log_path)

    def running(self) -> bool:
        return self.proc.poll() is None

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """``sig``, at most ``timeout`` s, then SIGKILL to the process group it leads."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # it, if still there, and what it left behind
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.out.join()
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return vmlib._read(self.err_path) if self.err_path else ""

    def diagnostics(self, lines: int = 30) -> str:
        text = f"--- {self.name}: {shlex.join(self.argv)}\n--- {self.name} output (tail, full: {self.log_path}):\n"
        text += vmlib._tail(self.out.text, lines)
        if self.err_path:
            text += f"\n--- {self.name} stderr (tail, full: {self.err_path}):\n" + vmlib._tail(self.stderr, lines)
        return text


def _is_socket(p: Path) -> bool:
    return vmlib._is_socket(p)


def start_backend(argv: Sequence[str], socks: Sequence[Path], logdir: Path, name: str,
                  ready_timeout: float = 20.0) -> Proc:
    """Starts a vhost-user backend and waits (bounded) until every socket in ``socks``
    listens; stopped with SIGINT (testpmd prints its final statistics on it)."""
    t0 = time.monotonic()
    p = Proc(argv, logdir, name)
    deadline = t0 + ready_timeout
    while not all(_is_socket(s) for s in socks):
        if not p.running():
            p.stop()
            raise vmlib.TierError(f"{name} exited with status {p.proc.returncode} before listening on "
                                  f"{', '.join(map(str, socks))}\n" + p.diagnostics())
        if time.monotonic() > deadline:
            p.stop(signal.SIGKILL)
            raise vmlib.TierError(f"{name} did not listen on {', '.join(map(str, socks))} within "
                                  f"{ready_timeout} s\n" + p.diagnostics())
        time.sleep(0.05)
    p.ready_s = time.monotonic() - t0  # type: ignore[attr-defined]
    return p


# ------------------------------------------------------------------ QMP
class QMPError(RuntimeError):
    def __init__(self, name: str, command: str, error: dict) -> None:
        self.desc = str(error.get("desc", error))
        self.error_class = str(error.get("class", ""))
        super().__init__(f"{name}: {command}: {self.desc}")


class QMP:
    """A QMP client on a unix socket; events are kept in ``events`` with ``host_t``."""

    def __init__(self, path: Path, name: str, timeout: float = 30.0,
                 alive: Callable[[], bool] | None = None) -> None:
        self.name = name
        self.events: list[dict] = []
        self.buf = b""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                break
            except OSError as e:
                s.close()
                if alive is not None and not alive():
                    raise vmlib.TierError(f"{name} qemu exited before its QMP socket answered") from e
                if time.monotonic() > deadline:
                    raise vmlib.TierError(f"{name}: no QMP on {path} within {timeout} s: {e}") from e
                time.sleep(0.05)
        self.sock = s
        self.greeting = self._read(10)
        self.version = self.greeting["QMP"]["version"]
        self.cmd("qmp_capabilities")

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no QMP message within {timeout} s")
            if select.select([self.sock], [], [], left)[0]:
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError(f"{self.name}: QMP socket closed")
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, execute: str, timeout: float = 30.0, **args: object):
        msg: dict = {"execute": execute}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            r = self._read(max(0.05, deadline - time.monotonic()))
            if "event" in r:
                r["host_t"] = time.time()
                self.events.append(r)
                continue
            if "error" in r:
                raise QMPError(self.name, execute, r["error"])
            return r.get("return")

    def pump(self, seconds: float = 0.0) -> None:
        """Collects the events that arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if b"\n" not in self.buf and not select.select([self.sock], [], [], max(0.0, left))[0]:
                return
            try:
                r = self._read(1)
            except (TimeoutError, EOFError, OSError):
                return
            if "event" in r:
                r["host_t"] = time.time()
                self.events.append(r)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def event_time(events: list[dict], name: str, data: dict | None = None) -> float | None:
    """qemu's own timestamp (host wall clock) of the first event ``name``."""
    for e in events:
        if e.get("event") == name and (data is None or e.get("data") == data):
            ts = e.get("timestamp", {})
            return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    return None


# ------------------------------------------------------------------ the dirty log
class DirtyLogWatch:
    """Samples qemu's vhost dirty log (the memfd ``vhost-log`` passed in ``SET_LOG_BASE``)
    through ``/proc/PID/fd`` in a thread. Bit n stands for guest page n (4 KiB). qemu
    only reads and clears this bitmap, so every bit seen set was set by the backend."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.path: str | None = None
        self.samples = self.samples_with_bits = self.max_bits = 0
        self.size: int | None = None
        self.pages: set[int] = set()
        self.first_seen: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dirty-log", daemon=True)
        self._thread.start()

    def _find(self) -> bool:
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                p = f"/proc/{self.pid}/fd/{fd}"
                try:
                    if "vhost-log" in os.readlink(p):
                        self.path = p
                        self.first_seen = self.first_seen or time.time()
                        return True
                except OSError:
                    continue
        except OSError:
            pass
        return False

    def sample(self) -> None:
        if self.path is None and not self._find():
            return
        try:
            with open(self.path, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
        except OSError:
            self.path = None
            return
        self.size = len(data)
        self.samples += 1
        n = int.from_bytes(data, "little")
        if not n:
            return
        self.samples_with_bits += 1
        self.max_bits = max(self.max_bits, n.bit_count())
        while n:
            low = n & -n
            self.pages.add(low.bit_length() - 1)
            n ^= low

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        return self.summary()

    def summary(self) -> dict:
        return {"log_bytes": self.size, "samples": self.samples, "samples_with_bits": self.samples_with_bits,
                "max_bits_in_one_sample": self.max_bits, "distinct_pages": len(self.pages),
                "page_ranges_gpa": page_ranges(self.pages)}


def page_ranges(pages: set[int], limit: int = 60) -> list[str]:
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and p == out[-1][1] + 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return [f"{a << 12:#x}-{((b + 1) << 12) - 1:#x}" for a, b in out[:limit]]


# ------------------------------------------------------------------ qemu
def mig_ram_kib(tier: vmlib.Tier) -> int:
    """The guest's RAM for the migration: the tier's size minus 64 KiB, because qemu 7.2
    loses guest stores under TCG when the RAM block is a multiple of 256 KiB.

    Its dirty-bitmap sync takes a fast path for such blocks that clears the migration
    bits without re-arming the TCG TLB's not-dirty trap, so a vCPU store through a TLB
    entry filled before the sync marks nothing and the page is not sent again: the
    destination runs on stale memory (seen here as oopses in socket wait queues right
    after the switch, 3 of 8 runs). qemu 9.0 fixed it ("system/physmem: Fix migration
    dirty bitmap coherency with TCG memory access"); Debian's 7.2.22 does not have the
    fix. Other sizes take the page-by-page path, which resets the TLB. Override with
    SVQ_VM_MIG_RAM_KIB (e.g. 524288 to see the bug)."""
    if os.environ.get("SVQ_VM_MIG_RAM_KIB"):
        return int(os.environ["SVQ_VM_MIG_RAM_KIB"])
    return tier.mem_mib * 1024 - 64


def qemu_argv(tier: vmlib.Tier, initrd: Path, sock: Path, qmp: Path, trace: Path,
              incoming: Path | None = None) -> list[str]:
    """The command line of either side: identical except ``sock``, ``qmp``, ``trace`` and
    ``-incoming`` (qemu migrates only between matching machines and devices)."""
    mem = f"{mig_ram_kib(tier)}K"
    append = ("console=ttyS0 loglevel=4 panic=-1 mitigations=off no_timer_check tsc=reliable "
              "random.trust_cpu=on rdinit=/mig-init "
              f"svqmig.mac={vmlib.GUEST_MAC} svqmig.addr={vmlib.GUEST_IP}/24 svqmig.peer={vmlib.PEER_IP} "
              + " ".join(f"svqmig.{k}={v}" for k, v in GUEST_OPTS.items()))
    if os.environ.get("SVQ_VM_APPEND"):
        append += " " + os.environ["SVQ_VM_APPEND"]
    argv = [
        tier.qemu, "-machine", f"{tier.machine},memory-backend=mem",
        "-accel", "tcg,thread=multi", "-cpu", "max,-la57", "-smp", "1", "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(tier.kernel), "-initrd", str(initrd), "-append", append,
        "-chardev", f"socket,id=vu0,path={sock}",
        "-netdev", "vhost-user,id=net0,chardev=vu0,queues=1",
        "-device", f"virtio-net-pci,id=nic0,netdev=net0,mac={vmlib.GUEST_MAC},vectors=0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-msg", "timestamp=on", "-D", str(trace),
        "-trace", "vhost_user_write", "-trace", "vhost_user_read",
    ]
    argv += shlex.split(os.environ.get("SVQ_VM_QEMU_ARGS", ""))
    if incoming is not None:
        argv += ["-incoming", f"unix:{incoming}"]
    return argv


_TRACE = re.compile(r"(?:\d+@(\d+\.\d+):)?vhost_user_(write|read) req:(\d+) flags:0x([0-9a-fA-F]+)")


def qemu_vhost_trace(path: Path) -> list[dict]:
    """qemu's vhost-user requests (``write``) and the replies it read (``read``), in order,
    with qemu's timestamps (host wall clock)."""
    out = []
    for m in _TRACE.finditer(vmlib._read(path)):
        req = int(m.group(3))
        flags = int(m.group(4), 16)
        out.append({"t": float(m.group(1)) if m.group(1) else None, "dir": m.group(2),
                    "req": VHOST_USER_REQUESTS.get(req, f"req{req}"),
                    "need_reply": bool(flags & NEED_REPLY) and m.group(2) == "write"})
    return out


def trace_timeline(entries: list[dict], t0: float | None, t1: float | None = None) -> list[str]:
    """The entries at or after ``t0`` (and before ``t1``) as "+S.SSSs REQ" lines: a request
    qemu wrote (with "need_reply" when it asked for an ack) or "<- REQ reply" for a reply
    it read."""
    out = []
    for e in entries:
        if e["t"] is None or t0 is None or e["t"] < t0 or (t1 is not None and e["t"] > t1):
            continue
        what = e["req"] + (" (need_reply)" if e["need_reply"] else "") if e["dir"] == "write" else f"<- {e['req']} reply"
        out.append(f"+{e['t'] - t0:.3f}s {what}")
    return out


def collapse(items: Sequence[str]) -> list[str]:
    out: list[list] = []
    for x in items:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return [x if n == 1 else f"{x} x{n}" for x, n in out]


# ------------------------------------------------------------------ the guest's output
_PING = re.compile(r"MIGT P (\d+) (\d+)( DUP)?")
_STAT = re.compile(r"MIGT S t=(\d+) ping=(\d+)/(\d+) stream=(\d+)/(\d+)")


def joined_console(src: list[tuple[float, str]], src_tail: str, src_tail_t: float | None,
                   dst: list[tuple[float, str]]) -> list[tuple[str, float, str]]:
    """The two consoles as one stream of (side, host time, line). A line the source left
    unfinished is completed by the destination's first line."""
    out = [("src", t, line) for t, line in src]
    rest = list(dst)
    if src_tail:
        if rest:
            t, line = rest.pop(0)
            out.append(("switch", t, src_tail + line))
        else:
            out.append(("src", src_tail_t or 0.0, src_tail))
    out += [("dst", t, line) for t, line in rest]
    return out


def guest_view(lines: list[tuple[str, float, str]]) -> dict:
    """Per-side figures from the console: ping replies on each side, the last on the
    source and the first on the destination, the host-clock gap between them."""
    replies = {"src": [], "dst": [], "switch": []}
    stats = {"src": [], "dst": []}
    for side, t, line in lines:
        m = _PING.search(line)
        if m:
            replies[side].append((t, int(m.group(1)), int(m.group(2)), bool(m.group(3))))
        m = _STAT.search(line)
        if m and side in stats:
            stats[side].append({k: int(v) for k, v in zip(
                ("t_ms", "ping_received", "ping_sent", "stream_received", "stream_sent"), m.groups(), strict=True)})
    out: dict = {"ping_replies_on_source": len(replies["src"]),
                 "ping_replies_on_destination": len(replies["dst"]) + len(replies["switch"])}
    src, dst = replies["src"], replies["switch"] + replies["dst"]
    if src and dst:
        last, first = src[-1], dst[0]
        out.update(last_reply_on_source={"seq": last[1], "rtt_us": last[2], "host_t": round(last[0], 3)},
                   first_reply_on_destination={"seq": first[1], "rtt_us": first[2], "host_t": round(first[0], 3)},
                   reply_gap_ms=round((first[0] - last[0]) * 1000, 1),
                   seqs_between=first[1] - last[1] - 1,
                   rtt_us_around_switch=[(r[1], r[2]) for r in (src[-3:] + dst[:3])])
    if stats["src"]:
        out["stream_last_status_on_source"] = stats["src"][-1]
    if stats["dst"]:
        out["stream_first_status_on_destination"] = stats["dst"][0]
    return out


def guest_result(lines: list[tuple[str, float, str]]) -> dict | None:
    for _side, _t, line in reversed(lines):
        i = line.find("MIGT RESULT ")
        if i >= 0:
            try:
                return json.loads(line[i + len("MIGT RESULT "):])
            except ValueError:
                return None
    return None


# ------------------------------------------------------------------ testpmd's log
_VHOST_LINE = re.compile(r"VHOST_CONFIG: \(([^)]*)\) (.*)$")


def testpmd_vhost_messages(lines: list[tuple[float, str]], sock: Path) -> list[dict]:
    """The vhost-user requests DPDK logged for ``sock`` (``read message VHOST_USER_X``)
    with host times and the detail lines that followed each."""
    out: list[dict] = []
    for t, line in lines:
        m = _VHOST_LINE.search(line)
        if not m or m.group(1) != str(sock):
            continue
        text = m.group(2).strip()
        r = re.match(r"read message VHOST_USER_(\w+)", text)
        if r:
            out.append({"t": t, "req": r.group(1), "detail": []})
        elif out and not text.startswith("processing "):
            out[-1]["detail"].append(text)
    return out


def describe_testpmd(msg: dict) -> str:
    d = " ".join(msg["detail"])
    if msg["req"] == "SET_FEATURES":
        f = re.search(r"negotiated Virtio features: (0x[0-9a-fA-F]+)", d)
        if f:
            return f"SET_FEATURES {f.group(1)} (LOG_ALL {'on' if int(f.group(1), 16) & LOG_ALL else 'off'})"
    if msg["req"] == "SET_STATUS":
        f = re.search(r"new device status\((0x[0-9a-fA-F]+)\)", d)
        if f:
            return f"SET_STATUS {int(f.group(1), 16):#04x}"
    if msg["req"] == "SET_MEM_TABLE":
        return "SET_MEM_TABLE (" + ", ".join(re.findall(r"guest (?:memory region size|physical addr): 0x[0-9a-f]+", d)) + ")"
    if d and msg["req"] in ("SET_LOG_BASE", "SET_VRING_BASE", "GET_VRING_BASE", "SET_VRING_ADDR", "SET_STATUS",
                            "SET_MEM_TABLE", "SEND_RARP", "SET_VRING_ENABLE", "SET_VRING_NUM"):
        return f"{msg['req']} ({' '.join(d.split())[:200]})"
    return msg["req"]


def vring_bases(msgs: list[dict], kind: str) -> dict[int, int]:
    """{queue: index} from GET_VRING_BASE ("vring base idx:Q file:N") or SET_VRING_BASE
    ("vring base idx:Q last_used_idx:U last_avail_idx:A")."""
    out: dict[int, int] = {}
    for m in msgs:
        d = " ".join(m["detail"])
        if m["req"] == kind == "GET_VRING_BASE":
            r = re.search(r"vring base idx:(\d+) file:(\d+)", d)
        elif m["req"] == kind == "SET_VRING_BASE":
            r = re.search(r"vring base idx:(\d+) last_used_idx:\d+ last_avail_idx:(\d+)", d)
        else:
            continue
        if r:
            out.setdefault(int(r.group(1)), int(r.group(2)))
    return out


_FWD_PORT = re.compile(r"Forward statistics for port (\d+).*?RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)"
                       r".*?TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)", re.S)


def testpmd_port_stats(text: str) -> dict[str, dict[str, int]]:
    return {f"port{m.group(1)}": dict(zip(("rx", "rx_dropped", "tx", "tx_dropped"), map(int, m.groups()[1:]), strict=True))
            for m in _FWD_PORT.finditer(text)}


# ------------------------------------------------------------------ one migration
@dataclasses.dataclass
class MigBackend:
    """How to serve the two vhost-user sockets, and what to ask the backend around the
    migration (``query(phase)`` returns whatever it reports, recorded as is)."""

    kind: str
    start: Callable[[Path, Path, Path], list[Proc]]           # (src_sock, dst_sock, run_dir)
    query: Callable[[str, list[Proc]], dict] | None = None     # ("before" | "after", procs)
    trouble: Callable[[list[Proc]], list[str]] | None = None   # what the backend said went wrong


def testpmd_backend(tier: vmlib.Tier) -> MigBackend:
    """One dpdk-testpmd, two vhost ports (port 0 = the source's socket, port 1 = the
    destination's), icmpecho, each port answering on itself (--port-topology=loop)."""
    if tier.testpmd is None:
        raise vmlib.TierError("SVQ_VM_TESTPMD not set: run the tier through tests/vm/run")

    def start(src: Path, dst: Path, run_dir: Path) -> list[Proc]:
        argv = [str(tier.testpmd), "-l", "0-1", "--no-huge", "-m", "256", "--no-shconf", "--no-telemetry",
                "--no-pci", "--file-prefix", vmlib.dpdk_prefix(src),
                "--vdev", f"net_vhost0,iface={src},queues=1", "--vdev", f"net_vhost1,iface={dst},queues=1",
                "--log-level=lib.vhost.config:debug",
                "--", "--forward-mode=icmpecho", "--port-topology=loop", "--nb-cores=1", "--auto-start",
                "--stats-period", "1", "--total-num-mbufs=8192"]
        return [start_backend(argv, [src, dst], run_dir, "testpmd")]
    return MigBackend("testpmd", start)


def svq_backend(svq: Sequence[str], device: str, mode: str = "passthrough",
                ctl_timeout: float = 30.0) -> MigBackend:
    """Two ``svq serve`` processes, one per side, each with its own control socket:
    ``svq serve --vhost-user SOCK --device DEVICE --mode MODE --ctl CTL``. Around the
    migration, ``svq ctl CTL info|health|stats --json`` of both is recorded."""

    def ctl_path(sock: Path) -> Path:
        return sock.with_suffix(".ctl")

    def start(src: Path, dst: Path, run_dir: Path) -> list[Proc]:
        procs: list[Proc] = []
        try:
            for side, sock in (("svq-src", src), ("svq-dst", dst)):
                argv = [*svq, "serve", "--vhost-user", str(sock), "--device", device, "--mode", mode,
                        "--ctl", str(ctl_path(sock))]
                p = start_backend(argv, [sock, ctl_path(sock)], run_dir, side)
                p.ctl = ctl_path(sock)  # type: ignore[attr-defined]
                procs.append(p)
        except BaseException:
            for p in procs:
                p.stop(signal.SIGINT)
            raise
        return procs

    def query(_phase: str, procs: list[Proc]) -> dict:
        out: dict = {}
        for p in procs:
            side = out[p.name] = {}
            for what in ("info", "health", "stats"):
                argv = [*svq, "ctl", str(p.ctl), what, "--json"]  # type: ignore[attr-defined]
                try:
                    r = subprocess.run(argv, capture_output=True, text=True, timeout=ctl_timeout)
                    side[what] = json.loads(r.stdout) if r.returncode == 0 else {
                        "error": f"exit status {r.returncode}: {r.stderr.strip()[-500:]}"}
                except (OSError, ValueError, subprocess.TimeoutExpired) as e:
                    side[what] = {"error": f"`{shlex.join(argv)}`: {e}"}
        return out

    def trouble(procs: list[Proc]) -> list[str]:
        # svq serve prints refusals, faults and connection ends on stderr
        return [f"{p.name}: {line}" for p in procs for _t, line in p.out.snapshot()
                if re.search(r"refused|fault|error|failed|panic|Traceback", line, re.I)][:12]
    return MigBackend("svq", start, query, trouble)


@dataclasses.dataclass
class MigOutcome:
    """Everything one run recorded (``record`` is what goes into the results JSON)."""

    kind: str
    record: dict
    run_dir: Path
    error: BaseException | None = None

    @property
    def result(self) -> dict:
        return self.record.get("guest", {}).get("result") or {}


def run_migration(tier: vmlib.Tier, name: str, backend: MigBackend, initrd: Path, *,
                  pre_s: float = 3.0, post_s: float = 3.0, boot_timeout: float = 120.0,
                  migrate_timeout: float = 90.0) -> MigOutcome:
    """One live migration with ``backend`` (see the module docstring). Never raises for
    what happens in the run: the outcome's ``error`` holds it (a :class:`MigrationRefused`
    when qemu would not migrate), and ``record`` holds everything seen up to there."""
    run_dir = tier.run_dir(name)
    tmp = Path(tempfile.mkdtemp(prefix="svq-vm-mig-"))
    src_sock, dst_sock = tmp / "src.sock", tmp / "dst.sock"
    mig_sock, src_qmp_path, dst_qmp_path = tmp / "mig.sock", tmp / "src-qmp.sock", tmp / "dst-qmp.sock"
    rec: dict = {"backend": backend.kind, "run_dir": str(run_dir), "guest_options": dict(GUEST_OPTS),
                 "pre_s": pre_s, "post_s": post_s, "host_t": {}}
    T = rec["host_t"]
    t_start = time.time()
    procs: list[Proc] = []
    src = dst = None
    src_qmp = dst_qmp = None
    watch: DirtyLogWatch | None = None
    out = MigOutcome(backend.kind, rec, run_dir)

    def problem() -> str | None:
        for p in procs:
            if not p.running():
                return f"{p.name} exited with status {p.proc.returncode}"
        return None

    try:
        procs = backend.start(src_sock, dst_sock, run_dir)
        T["backend_ready"] = time.time()
        src = Proc(qemu_argv(tier, initrd, src_sock, src_qmp_path, run_dir / "src-trace.log"), run_dir,
                   "src-console", stdin_pipe=True, stderr_file=True)
        dst = Proc(qemu_argv(tier, initrd, dst_sock, dst_qmp_path, run_dir / "dst-trace.log", mig_sock), run_dir,
                   "dst-console", stdin_pipe=True, stderr_file=True)
        rec["qemu_argv"] = {"src": src.argv, "dst": dst.argv}
        src_qmp = QMP(src_qmp_path, "source", alive=src.running)
        dst_qmp = QMP(dst_qmp_path, "destination", alive=dst.running)
        rec["qemu"] = src_qmp.version
        for q in (src_qmp, dst_qmp):
            q.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        params = src_qmp.cmd("query-migrate-parameters")
        rec["migrate_parameters"] = {k: params.get(k) for k in ("max-bandwidth", "downtime-limit")}
        rec["src_query_migrate_before"] = src_qmp.cmd("query-migrate")
        if rec["src_query_migrate_before"].get("blocked-reasons"):
            # qemu will refuse: ask now (its answer is what the test reports), then still
            # boot and run the guest on the source to record how the backend served it.
            watch = DirtyLogWatch(src.pid)
            T["migrate_cmd"] = time.time()
            try:
                src_qmp.cmd("migrate", uri=f"unix:{mig_sock}")
                rec["refused"] = None   # blocked, and yet it started: go on as usual
            except QMPError as e:
                rec["refused"] = e.desc

        def guest_problem() -> str | None:
            return problem() or (None if src.running() else f"source qemu exited with status {src.proc.returncode}")

        got = src.out.wait_for(r"MIGT (READY|FAIL)|Kernel panic|Oops:", boot_timeout, alive=guest_problem)
        if got is None or got[2].group(1) != "READY":
            raise vmlib.TierError("before any migration, the guest did not get its traffic going on the source: "
                                  + (got[2].string if got else guest_problem() or f"nothing within {boot_timeout} s"))
        T["guest_ready"] = got[1]
        rec["guest_ready_line"] = got[2].string
        deadline = time.monotonic() + pre_s
        while time.monotonic() < deadline:
            if guest_problem():
                raise vmlib.TierError(f"before the migration: {guest_problem()}")
            time.sleep(0.1)
        if backend.query:
            rec["backend_before"] = backend.query("before", procs)

        # ---- migrate
        if rec.get("refused"):
            raise MigrationRefused(f"qemu refused to migrate: {rec['refused']}")
        if watch is None:
            watch = DirtyLogWatch(src.pid)
            T["migrate_cmd"] = time.time()
            try:
                src_qmp.cmd("migrate", uri=f"unix:{mig_sock}")
            except QMPError as e:
                rec["refused"] = e.desc
                raise MigrationRefused(f"qemu refused to migrate: {e.desc}") from e
        polls = []
        last = None
        deadline = time.monotonic() + migrate_timeout
        while True:
            st = src_qmp.cmd("query-migrate")
            s = st.get("status")
            if s == "active" and "expected-downtime" in st:
                rec["last_expected_downtime_ms"] = st["expected-downtime"]
            if s != last:
                polls.append({"t": round(time.time() - T["migrate_cmd"], 3), "status": s})
                last = s
            if s in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                rec["status_changes"] = polls
                raise vmlib.TierError(f"the migration did not finish within {migrate_timeout} s: {st}")
            if not src.running() or not dst.running():
                raise vmlib.TierError(f"a qemu exited during the migration: {guest_problem() or ''}"
                                      f" (destination running: {dst.running()})")
            time.sleep(0.05)
        T["completed_seen"] = time.time()
        rec["status_changes"] = polls
        if st.get("status") == "completed":
            # qemu 7.2 says "completed" before it has filled in total-time and downtime:
            # they are final once the source's runstate is postmigrate.
            rec["query_migrate_first_completed"] = st
            end = time.monotonic() + 10
            while time.monotonic() < end and src_qmp.cmd("query-status").get("status") != "postmigrate":
                time.sleep(0.05)
            st = src_qmp.cmd("query-migrate")
        rec["query_migrate"] = st
        rec["dirty_log"] = watch.stop()  # after the last sync: qemu has freed the log
        if st.get("status") != "completed":
            raise vmlib.TierError(f"the migration ended with status {st.get('status')}: {st.get('error-desc', '')}")
        # What the source handed over (its vhost device stopped: GET_VRING_BASE answered).
        rec["src_queues"] = {q: src_qmp.cmd("x-query-virtio-queue-status", path=NIC_PATH, queue=q) for q in (RX, TX)}
        rec["src_status_after"] = src_qmp.cmd("query-status").get("status")
        end = time.monotonic() + 30
        while True:
            ds = dst_qmp.cmd("query-status")
            if ds.get("status") == "running" or time.monotonic() > end:
                break
            time.sleep(0.05)
        T["dst_running_seen"] = time.time()
        rec["dst_status_after"] = ds.get("status")
        if ds.get("status") != "running":
            raise vmlib.TierError(f"the destination is not running after the migration: {ds}")
        try:
            rec["dst_query_migrate"] = dst_qmp.cmd("query-migrate")
        except QMPError as e:
            rec["dst_query_migrate"] = {"error": e.desc}
        src_qmp.pump(0.2)
        try:
            src_qmp.cmd("quit")
        except (EOFError, OSError, TimeoutError):
            pass
        T["src_quit"] = time.time()
        try:
            src.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

        # ---- the guest on the destination
        got = dst.out.wait_for(r"MIGT P \d+", 30, alive=lambda: None if dst.running() else "destination exited")
        if got is None:
            raise vmlib.TierError("no ping reply on the destination within 30 s of the switch")
        T["first_reply_on_destination"] = got[1]
        end = time.monotonic() + post_s
        while time.monotonic() < end and dst.running():
            time.sleep(0.1)
        if backend.query:
            rec["backend_after"] = backend.query("after", procs)
        T["stop_sent"] = time.time()
        dst.write(b"stop\n")
        got = dst.out.wait_for(r"MIGT (RESULT|FAIL)", 30, alive=lambda: None if dst.running() else "destination exited")
        if got is None or got[2].group(1) != "RESULT":
            raise vmlib.TierError("the guest reported no result on the destination: "
                                  + (got[2].string if got else "nothing within 30 s"))
        T["result_seen"] = got[1]
        # The destination's final ring positions (its vhost device stops with the VM).
        dst_qmp.cmd("stop")
        rec["dst_queues"] = {q: dst_qmp.cmd("x-query-virtio-queue-status", path=NIC_PATH, queue=q) for q in (RX, TX)}
        dst_qmp.pump(0.1)
        try:
            dst_qmp.cmd("quit")
        except (EOFError, OSError, TimeoutError):
            pass
        try:
            dst.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    except BaseException as e:  # noqa: BLE001 - recorded, returned with what was seen
        out.error = e
        if backend.query and procs and "backend_before" not in rec:
            try:  # what the backend reports when things went wrong before the migration
                rec["backend_before"] = backend.query("before", procs)
            except Exception as qe:  # noqa: BLE001
                rec["backend_before"] = {"error": str(qe)}
        if rec.get("refused") and not isinstance(e, MigrationRefused):
            # The refusal is the news; what went wrong before it comes second.
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            out.error = MigrationRefused(f"qemu refused to migrate: {rec['refused']}\nalso: {first}")
        if isinstance(out.error, MigrationRefused) and src is not None and src.running():
            # Let the guest finish on the source: its traffic shows how the backend served it.
            try:
                if backend.query and "backend_after" not in rec:
                    rec["backend_after"] = backend.query("after", procs)
                src.write(b"stop\n")
                src.out.wait_for(r"MIGT (RESULT|FAIL)", 20)
            except (OSError, vmlib.TierError):
                pass
    finally:
        if watch is not None and "dirty_log" not in rec:
            rec["dirty_log"] = watch.stop()
        for q, key in ((src_qmp, "src_events"), (dst_qmp, "dst_events")):
            if q is not None:
                rec[key] = q.events
                q.close()
        rc = {}
        for p in (src, dst):
            if p is not None:
                rc[p.name] = p.stop(signal.SIGTERM, 5)
        for p in procs:
            rc[p.name] = p.stop(signal.SIGINT, 10)
        rec["exit_status"] = rc
        vmlib.dpdk_cleanup(src_sock)
        shutil.rmtree(tmp, ignore_errors=True)
        T["end"] = time.time()
    _analyse(rec, src, dst, procs, backend, src_sock, dst_sock, run_dir)
    rec["timings_s"] = {k: round(v - t_start, 3) for k, v in T.items()}
    rec["wall_s"] = round(time.time() - t_start, 2)
    if backend.trouble and procs:
        rec["backend_trouble"] = backend.trouble(procs)
    if out.error is not None:
        rec["error"] = f"{type(out.error).__name__}: {out.error}"
        said = "".join(f"\n  {line}" for line in rec.get("backend_trouble") or [])
        said = f"\nthe backend said:{said}" if said else ""
        if isinstance(out.error, MigrationRefused):
            out.error = MigrationRefused(f"{out.error}{said}")
        else:
            out.error = vmlib.TierError(f"{out.error}{said}\n" + "\n".join(
                p.diagnostics() for p in (src, dst, *procs) if p is not None))
    return out


def _queue_state(q: dict) -> dict:
    out = {k: q.get(k) for k in ("last-avail-idx", "shadow-avail-idx", "used-idx", "inuse", "vring-num")}
    out.update({f"{k}-gpa": hex(q[k]) for k in ("vring-desc", "vring-avail", "vring-used") if q.get(k) is not None})
    return out


def _analyse(rec: dict, src: Proc | None, dst: Proc | None, procs: list[Proc], backend: MigBackend,
             src_sock: Path, dst_sock: Path, run_dir: Path) -> None:
    """Turns what was captured into the figures of the results JSON."""
    T = rec["host_t"]
    t0 = T.get("migrate_cmd")
    # qemu's migration figures
    qm = rec.get("query_migrate") or {}
    ram = qm.get("ram", {})
    mig = rec["migration"] = {
        "status": qm.get("status"), "total_time_ms": qm.get("total-time"), "downtime_ms": qm.get("downtime"),
        "setup_time_ms": qm.get("setup-time"), "expected_downtime_ms_last": rec.get("last_expected_downtime_ms"),
        "ram_transferred_bytes": ram.get("transferred"), "ram_total_bytes": ram.get("total"),
        "ram_normal_pages": ram.get("normal"), "ram_duplicate_pages": ram.get("duplicate"),
        "ram_precopy_bytes": ram.get("precopy-bytes"), "ram_downtime_bytes": ram.get("downtime-bytes"),
        "dirty_sync_count": ram.get("dirty-sync-count"), "mbps": ram.get("mbps"),
        "max_bandwidth": (rec.get("migrate_parameters") or {}).get("max-bandwidth"),
        "downtime_limit_ms": (rec.get("migrate_parameters") or {}).get("downtime-limit"),
        "refused": rec.get("refused"),
        "blocked_reasons_before": (rec.get("src_query_migrate_before") or {}).get("blocked-reasons"),
        "src_status_after": rec.get("src_status_after"), "dst_status_after": rec.get("dst_status_after"),
    }
    src_ev, dst_ev = rec.get("src_events") or [], rec.get("dst_events") or []
    mig["passes"] = sum(1 for e in src_ev if e.get("event") == "MIGRATION_PASS")
    stop, resume = event_time(src_ev, "STOP"), event_time(dst_ev, "RESUME")
    if stop and resume:
        mig["host_stop_to_resume_ms"] = round((resume - stop) * 1000, 1)
    done = event_time(src_ev, "MIGRATION", {"status": "completed"})
    if done and t0:
        mig["host_migrate_to_completed_ms"] = round((done - t0) * 1000, 1)

    # the guest: the two consoles as one
    if src is not None:
        src.out.join()
        dst_lines = dst.out.snapshot() if dst is not None else []
        if dst is not None:
            dst.out.join()
            dst_lines = dst.out.snapshot()
        lines = joined_console(src.out.snapshot(), src.out.tail, src.out.tail_t, dst_lines)
        g = rec["guest"] = {"result": guest_result(lines), "console": guest_view(lines)}
        g["fail_lines"] = [line for _s, _t, line in lines if "MIGT FAIL" in line or "Kernel panic" in line
                           or "Oops" in line or "WATCHDOG" in line][:10]
        nic = re.search(r"MIGT NIC iface=\S+ features=([01]+)", "\n".join(line for _s, _t, line in lines))
        if nic:
            g["virtio_features"] = vmlib.feature_names(vmlib.guest_feature_bits(nic.group(1)), vmlib.VIRTIO_NET_FEATURES)
        if stop:
            view = g["console"]
            for key in ("last_reply_on_source", "first_reply_on_destination"):
                if key in view:
                    view[key]["ms_from_src_stop"] = round((view[key]["host_t"] - stop) * 1000, 1)

    # qemu's vhost-user traffic, each side
    vu: dict = rec.setdefault("vhost_user", {})
    for side in ("src", "dst"):
        entries = qemu_vhost_trace(run_dir / f"{side}-trace.log")
        writes = [e["req"] for e in entries if e["dir"] == "write"]
        before = [e["req"] for e in entries if e["dir"] == "write" and (t0 is None or (e["t"] or 0) < t0)]
        vu[f"qemu_{side}"] = {"before_migrate": collapse(before), "from_migrate": trace_timeline(entries, t0),
                              "counts": {r: writes.count(r) for r in sorted(set(writes))}}

    # the backend's own report
    if backend.kind == "testpmd" and procs:
        log = procs[0].out.snapshot()
        a, b = testpmd_vhost_messages(log, src_sock), testpmd_vhost_messages(log, dst_sock)
        vu["testpmd_src"] = [f"{'+%.3fs ' % (m['t'] - t0) if t0 and m['t'] >= t0 else ''}{describe_testpmd(m)}"
                             for m in a if t0 is None or m["t"] >= t0 - 0.001]
        vu["testpmd_dst"] = [f"{'+%.3fs ' % (m['t'] - t0) if t0 and m['t'] >= t0 else ''}{describe_testpmd(m)}"
                             for m in b if t0 is not None and m["t"] >= t0 - 0.001]
        vu["testpmd_vring_base"] = {"src_get": vring_bases(a, "GET_VRING_BASE"),
                                    "dst_set": vring_bases(b, "SET_VRING_BASE")}
        vu["testpmd_log_all"] = [("LOG_ALL on" in describe_testpmd(m)) for m in a if m["req"] == "SET_FEATURES"
                                 and t0 and m["t"] >= t0]
        rec["backend_report"] = {"forward_stats": testpmd_port_stats(procs[0].out.text),
                                 "ports": {"port0": "source (src.sock)", "port1": "destination (dst.sock)"}}
    elif procs:
        rec["backend_report"] = {p.name: {"output_tail": vmlib._tail(p.out.text, 40)} for p in procs}

    # rings: what the source handed over, where the destination ended
    rings = {}
    for side in ("src", "dst"):
        qs = rec.get(f"{side}_queues") or {}
        rings[side] = {("rx" if int(q) == RX else "tx"): _queue_state(v) for q, v in qs.items()}
    rec["rings"] = rings
    if rec.get("dirty_log") and rings.get("src"):
        logged = rec["dirty_log"]
        pages = set()
        for r in logged.get("page_ranges_gpa", []):
            a_, b_ = (int(x, 16) for x in r.split("-"))
            pages.update(range(a_ >> 12, (b_ >> 12) + 1))
        logged["used_rings_logged"] = {name: bool(q.get("vring-used-gpa") and (int(q["vring-used-gpa"], 16) >> 12) in pages)
                                       for name, q in rings["src"].items()}


def ring_checks(rec: dict) -> list[str]:
    """Problems with the ring positions: the source must have handed over a quiescent
    ring (used == last avail: nothing taken and left unfinished), the destination must
    have gone on from there, and the guest's TX count must equal the TX ring's position."""
    problems = []
    src, dst = rec.get("rings", {}).get("src"), rec.get("rings", {}).get("dst")
    if not src or not dst:
        return [f"no queue state from {'the source' if not src else 'the destination'}"]
    result = ((rec.get("guest") or {}).get("result") or {})
    for name in ("rx", "tx"):
        s, d = src.get(name, {}), dst.get(name, {})
        if s.get("last-avail-idx") is None or d.get("last-avail-idx") is None:
            problems.append(f"{name}: no last-avail-idx (source {s}, destination {d})")
            continue
        if s["used-idx"] != s["last-avail-idx"]:
            problems.append(f"{name}: the source handed over avail {s['last-avail-idx']} with used {s['used-idx']} "
                            f"(chains taken and not completed)")
        if d["used-idx"] != d["last-avail-idx"]:
            problems.append(f"{name}: the destination ended at avail {d['last-avail-idx']} with used {d['used-idx']}")
        moved = (d["last-avail-idx"] - s["last-avail-idx"]) % 65536
        if moved == 0:
            problems.append(f"{name}: the destination's ring did not move from {s['last-avail-idx']}")
    nic = result.get("nic") or {}
    tx_final = dst.get("tx", {}).get("last-avail-idx")
    if "tx_packets" in nic and tx_final is not None and nic["tx_packets"] % 65536 != tx_final:
        problems.append(f"tx: the guest sent {nic['tx_packets']} frames but the TX ring stands at "
                            f"{dst['tx']['last-avail-idx']} (mod 65536 it should equal)")
    return problems
