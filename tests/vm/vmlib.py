"""Helpers of the real-client tier: a vhost-user backend process, a qemu guest (TCG)
whose virtio-net NIC is ``-netdev vhost-user`` on the backend's socket, and the results
the guest writes into its run folder.

Everything ``tests/vm/run`` prepared comes in through the environment (see
:meth:`Tier.from_env`). Every wait is bounded; on any failure the guest and the backend
are killed and the exception carries the tail of the backend's output and of the serial
console (the full logs stay in the run folder, ``.vm-tier/runs/NAME/``).

Typical use::

    tier = Tier.from_env()
    out = run_traffic(tier, "ping-testpmd", lambda sock: tier.testpmd_argv(sock, "icmpecho"),
                      ["ping", "--count", "20"])
    out.check()                       # guest exit status 0 and a result, else TierError
    print(out.result["rtt_ms"], out.backend_stdout)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_PROGRAM = HERE / "guest" / "traffic.py"
#: The source tree the guest's programs come from (shared with it on its own).
TREE = HERE.parents[1]
GUEST_PYTHON = "/usr/bin/python3"  # the host's, seen by the guest through 9p
GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP = "10.0.0.1"
PEER_IP = "10.0.0.2"
TAIL_LINES = 40

# What every backend gets (testpmd and svq serve alike, so the figures compare).
PING_ARGS = ["ping", "--count", "20", "--interval", "0.1"]
STREAM_FRAMES = 10000
STREAM_ARGS = ["stream", "--frames", str(STREAM_FRAMES), "--window", "64", "--size", "mix"]


class TierError(AssertionError):
    """The harness could not get a result: with the diagnostics in the message."""


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def qemu_pc_machine(qemu: str) -> str:
    """The versioned machine type that ``pc`` is an alias of (e.g. ``pc-i440fx-7.2``)."""
    out = subprocess.run([qemu, "-machine", "help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    m = re.search(r"^pc\s.*\(alias of (\S+)\)", out, re.M)
    return m.group(1) if m else "pc"


@dataclasses.dataclass(frozen=True)
class Tier:
    """What ``tests/vm/run`` built and where the tier keeps its files."""

    kernel: Path
    initrd: Path
    kver: str
    qemu: str
    machine: str
    base: Path                       # .vm-tier/ in the repository
    run_id: str
    testpmd: Path | None = None      # the wrapper made by fetch-testpmd.sh
    cpus: int = 1
    mem_mib: int = 512

    @classmethod
    def from_env(cls) -> Tier:
        env = os.environ
        missing = [v for v in ("SVQ_VM_KERNEL", "SVQ_VM_INITRD", "SVQ_VM_DIR") if not env.get(v)]
        if missing:
            raise TierError(f"{', '.join(missing)} not set: run the tier through tests/vm/run")
        qemu = env.get("SVQ_VM_QEMU") or "qemu-system-x86_64"
        testpmd = env.get("SVQ_VM_TESTPMD")
        return cls(
            kernel=Path(env["SVQ_VM_KERNEL"]), initrd=Path(env["SVQ_VM_INITRD"]),
            kver=env.get("SVQ_VM_KVER", "?"), qemu=qemu,
            machine=env.get("SVQ_VM_MACHINE") or qemu_pc_machine(qemu),
            base=Path(env["SVQ_VM_DIR"]), run_id=env.get("SVQ_VM_RUN_ID", "manual"),
            testpmd=Path(testpmd) if testpmd else None,
            cpus=int(env.get("SVQ_VM_CPUS", "1")), mem_mib=int(env.get("SVQ_VM_MEM", "512")),
        )

    @property
    def results_dir(self) -> Path:
        d = self.base / "results"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run_dir(self, name: str) -> Path:
        """A fresh ``.vm-tier/runs/NAME`` (the guest's read-write 9p share)."""
        d = self.base / "runs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def testpmd_argv(self, sock: Path, fwd_mode: str, *extra: str) -> list[str]:
        """dpdk-testpmd with one vhost port, a server socket at ``sock``, forwarding on
        the same port (``--port-topology=loop``) in ``fwd_mode``. One lcore polls."""
        if self.testpmd is None:
            raise TierError("SVQ_VM_TESTPMD not set: run the tier through tests/vm/run")
        return [str(self.testpmd), "-l", "0-1", "--no-huge", "-m", "256", "--no-shconf",
                "--no-telemetry", "--no-pci", "--file-prefix", dpdk_prefix(sock),
                "--vdev", f"net_vhost0,iface={sock},queues=1",
                "--log-level=lib.vhost.config:debug",
                "--", f"--forward-mode={fwd_mode}", "--port-topology=loop", "--auto-start",
                "--stats-period", "1", "--total-num-mbufs=8192", *extra]


def dpdk_prefix(sock: Path) -> str:
    """The EAL file prefix of the testpmd serving ``sock`` (unique per socket folder)."""
    return "svqvm-" + re.sub(r"[^A-Za-z0-9]", "", sock.parent.name)


def dpdk_cleanup(sock: Path) -> None:
    """The EAL makes /var/run/dpdk/PREFIX even with --no-shconf: remove ours."""
    for root in ("/var/run/dpdk", os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/nonexistent"), "dpdk")):
        shutil.rmtree(os.path.join(root, dpdk_prefix(sock)), ignore_errors=True)


# ------------------------------------------------------------------ processes
def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


class Process:
    """A child process in a session of its own, stdout and stderr in files."""

    def __init__(self, argv: Sequence[str], out: Path, err: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv = [str(a) for a in argv]
        self.out_path, self.err_path = out, err
        with open(out, "wb") as o, open(err, "wb") if err else open(os.devnull, "wb") as e:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=o,
                stderr=e if err else subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Sends ``sig`` (if still running), waits at most ``timeout`` s, then SIGKILLs
        the process group this object started. Returns the exit status."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or self._group_alive():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        return self.proc.returncode

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    @property
    def stdout(self) -> str:
        return _read(self.out_path)

    @property
    def stderr(self) -> str:
        return _read(self.err_path) if self.err_path else ""


class Backend(Process):
    """A vhost-user backend: any argv that ends up listening on the unix socket ``sock``.

    :meth:`start` waits (bounded) until the socket exists. Stopped with SIGINT (testpmd
    prints its final statistics on it), then SIGKILL.
    """

    def __init__(self, argv: Sequence[str], sock: Path, logdir: Path, name: str = "backend",
                 env: dict[str, str] | None = None, ready_timeout: float = 20.0) -> None:
        self.sock = sock
        self.name = name
        self.ready_timeout = ready_timeout
        self.ready_s: float | None = None
        t0 = time.monotonic()
        super().__init__(argv, logdir / f"{name}.stdout", logdir / f"{name}.stderr", env)
        deadline = t0 + ready_timeout
        while not _is_socket(sock):
            if not self.running():
                raise TierError(f"{name} exited with status {self.proc.returncode} before "
                                f"listening on {sock}\n" + self.diagnostics())
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise TierError(f"{name} did not listen on {sock} within {ready_timeout} s\n"
                                + self.diagnostics())
            time.sleep(0.05)
        self.ready_s = time.monotonic() - t0

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        return super().stop(sig, timeout)

    def diagnostics(self) -> str:
        return (f"--- {self.name}: {shlex.join(self.argv)}\n"
                f"--- {self.name} stdout (tail, full: {self.out_path}):\n{_tail(self.stdout)}\n"
                f"--- {self.name} stderr (tail, full: {self.err_path}):\n{_tail(self.stderr)}")


# ------------------------------------------------------------------ the guest
@dataclasses.dataclass
class GuestRun:
    rc: int | None                 # the guest command's exit status (None: none reported)
    result: dict | None            # RUN/result.json as written by the guest program
    qemu_rc: int | None
    elapsed_s: float               # qemu start -> qemu exit
    rc_after_s: float | None       # qemu start -> RUN/rc appeared
    run_dir: Path
    console_path: Path
    qemu_argv: list[str]

    @property
    def console(self) -> str:
        return _read(self.console_path)

    def guest_times(self) -> dict[str, float]:
        """Guest uptimes the init and the program printed (boot progress)."""
        out: dict[str, float] = {}
        for key, pat in (("init_started", r"VM-TIER-INIT: started \(uptime ([\d.]+)"),
                         ("command_started", r"VM-TIER-INIT: running .*\(uptime ([\d.]+)"),
                         ("command_done", r"VM-TIER-INIT: exit status \d+ \(uptime ([\d.]+)")):
            m = re.search(pat, self.console)
            if m:
                out[key] = float(m.group(1))
        return out


def boot_guest(tier: Tier, sock: Path, guest_argv: Sequence[str], run_dir: Path, *,
               timeout: float = 150.0, hold: Callable[[], None] | None = None,
               hold_timeout: int = 60, mac: str = GUEST_MAC,
               backend: Backend | None = None, exit_timeout: float = 30.0) -> GuestRun:
    """Boots the guest with its NIC on ``sock`` and runs ``guest_argv`` (sh words) in it.

    The guest sees the host's / read-only and ``run_dir`` read-write (same paths). It
    writes ``run_dir/rc``; with ``hold``, it then waits until ``hold()`` returned (the
    guest is idle but still connected to the backend), then powers off. Waits at most
    ``timeout`` s for the rc and ``exit_timeout`` s for qemu to exit after it; a dead
    ``backend`` ends the wait early. Raises TierError (qemu killed) when the guest did
    not report an exit status.
    """
    for f in ("cmd", "rc", "release", "result.json"):
        (run_dir / f).unlink(missing_ok=True)
    (run_dir / "cmd").write_text("exec " + shlex.join(str(a) for a in guest_argv) + "\n")
    append = ("console=ttyS0 loglevel=4 panic=-1 mitigations=off no_timer_check tsc=reliable "
              f"random.trust_cpu=on svq.workdir={run_dir} svq.tree={TREE}")
    if hold is not None:
        append += f" svq.hold={hold_timeout}"
    if os.environ.get("SVQ_VM_APPEND"):
        append += " " + os.environ["SVQ_VM_APPEND"]
    if any(c.isspace() for c in str(run_dir)):
        raise TierError(f"the run folder must not contain white space: {run_dir}")
    mem = tier.mem_mib
    argv = [
        tier.qemu, "-machine", f"{tier.machine},memory-backend=mem",
        "-accel", "tcg,thread=multi", "-cpu", "max,-la57", "-smp", str(tier.cpus), "-m", str(mem),
        "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(tier.kernel), "-initrd", str(tier.initrd), "-append", append,
        "-chardev", f"socket,id=vu0,path={sock}",
        "-netdev", "vhost-user,id=net0,chardev=vu0,queues=1",
        # INTx: Debian's qemu 7.2 segfaults under TCG when this NIC uses MSI-X.
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},vectors=0",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={TREE},mount_tag=tree,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={run_dir},mount_tag=work,security_model=none,multidevs=remap",
    ]
    argv += shlex.split(os.environ.get("SVQ_VM_QEMU_ARGS", ""))
    console = run_dir / "console.log"
    t0 = time.monotonic()
    qemu = Process(argv, console)
    rc_at: float | None = None
    problem = None
    try:
        deadline = t0 + timeout
        while rc_at is None:
            if (run_dir / "rc").exists():
                rc_at = time.monotonic() - t0
                break
            if not qemu.running():
                break
            if backend is not None and not backend.running():
                problem = f"{backend.name} exited with status {backend.proc.returncode} while the guest ran"
                break
            if time.monotonic() > deadline:
                problem = f"the guest reported no exit status within {timeout} s"
                break
            time.sleep(0.1)
        if rc_at is not None and hold is not None and qemu.running():
            try:
                hold()
            finally:
                (run_dir / "release").touch()
        if problem is None and rc_at is not None:
            try:
                qemu.proc.wait(exit_timeout)
            except subprocess.TimeoutExpired:
                problem = f"qemu did not exit within {exit_timeout} s after the guest finished"
    finally:
        qemu_rc = qemu.stop(signal.SIGTERM, 5)
    elapsed = time.monotonic() - t0
    run = GuestRun(rc=None, result=None, qemu_rc=qemu_rc, elapsed_s=elapsed, rc_after_s=rc_at,
                   run_dir=run_dir, console_path=console, qemu_argv=argv)
    rc_text = _read(run_dir / "rc").strip()
    if rc_text.lstrip("-").isdigit():
        run.rc = int(rc_text)
    try:
        run.result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        run.result = None
    if problem is None and run.rc is None:
        problem = f"qemu exited with status {qemu_rc} and the guest reported no exit status"
    if problem is not None:
        raise TierError(problem + "\n" + guest_diagnostics(run)
                        + ("\n" + backend.diagnostics() if backend is not None else ""))
    return run


def guest_diagnostics(run: GuestRun) -> str:
    return (f"--- qemu: {shlex.join(run.qemu_argv)}\n"
            f"--- serial console (tail, full: {run.console_path}):\n{_tail(run.console)}")


# ------------------------------------------------------------------ backend + guest
@dataclasses.dataclass
class Outcome:
    """One backend and one guest run, both finished."""

    guest: GuestRun
    backend: Backend
    backend_rc: int
    wall_s: float

    @property
    def result(self) -> dict:
        return self.guest.result or {}

    @property
    def backend_stdout(self) -> str:
        return self.backend.stdout

    @property
    def backend_stderr(self) -> str:
        return self.backend.stderr

    def diagnostics(self) -> str:
        return guest_diagnostics(self.guest) + "\n" + self.backend.diagnostics()

    def check(self) -> dict:
        """The guest program's result; TierError with diagnostics unless it exited 0."""
        if self.guest.rc != 0 or self.guest.result is None:
            raise TierError(f"guest command exited with status {self.guest.rc}"
                            f"{'' if self.guest.result else ' and wrote no result'}\n"
                            + self.diagnostics())
        return self.guest.result

    def fail(self, what: str) -> TierError:
        return TierError(what + "\n" + json.dumps(self.result, indent=1, sort_keys=True)
                         + "\n" + self.diagnostics())


def guest_command(program: str, *args: str, run_dir: Path, mac: str = GUEST_MAC) -> list[str]:
    """The argv of tests/vm/guest/traffic.py PROGRAM ARGS, result into run_dir/result.json."""
    # -S: no site module (nothing outside the standard library is needed; every file
    # python looks at costs a 9p round trip under TCG).
    return [GUEST_PYTHON, "-S", str(GUEST_PROGRAM), "--mac", mac, "--out", str(run_dir / "result.json"),
            program, *args]


def run_traffic(tier: Tier, name: str, backend_argv: Callable[[Path], Sequence[str]],
                guest_args: Sequence[str], *, hold: Callable[[Backend], None] | None = None,
                timeout: float = 150.0, backend_env: dict[str, str] | None = None,
                backend_ready_timeout: float = 20.0, mac: str = GUEST_MAC,
                sockdir: Path | None = None) -> Outcome:
    """Starts the backend ``backend_argv(sock)``, boots the guest on ``sock`` running
    ``traffic.py GUEST_ARGS``, stops the backend (SIGINT) and returns everything.

    ``hold(backend)`` runs while the guest is idle after its program (e.g. to read the
    backend's counters). The socket lives in a short temporary folder (unix socket
    paths are limited to 107 bytes); logs and results in ``.vm-tier/runs/NAME``.
    """
    run_dir = tier.run_dir(name)
    tmp = Path(tempfile.mkdtemp(prefix="svq-vm-", dir=sockdir))
    sock = tmp / "vhost-user.sock"
    t0 = time.monotonic()
    backend: Backend | None = None
    try:
        backend = Backend(backend_argv(sock), sock, run_dir, env=backend_env,
                          ready_timeout=backend_ready_timeout)
        held = (lambda: hold(backend)) if hold is not None else None  # type: ignore[arg-type]
        guest = boot_guest(tier, sock, guest_command(guest_args[0], *guest_args[1:],
                                                      run_dir=run_dir, mac=mac),
                           run_dir, timeout=timeout, hold=held, mac=mac, backend=backend)
        backend_rc = backend.stop()
        return Outcome(guest=guest, backend=backend, backend_rc=backend_rc,
                       wall_s=time.monotonic() - t0)
    finally:
        if backend is not None:
            backend.stop()
        dpdk_cleanup(sock)
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ testpmd's log
_FWD = re.compile(r"Forward statistics for port 0.*?RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+)"
                  r".*?TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)", re.S)


def testpmd_forward_stats(log: str) -> dict[str, int]:
    """The final "Forward statistics for port 0" (printed on SIGINT)."""
    m = _FWD.search(log)
    if not m:
        return {}
    return dict(zip(("rx", "rx_dropped", "tx", "tx_dropped"), map(int, m.groups()), strict=True))


def vhost_user_messages(log: str) -> list[str]:
    """The vhost-user requests in the order DPDK's vhost library logged them
    (``--log-level=lib.vhost.config:debug``: "read message VHOST_USER_...")."""
    return re.findall(r"read message (VHOST_USER_[A-Z_]+)", log)


def negotiated_features(log: str) -> dict[str, str]:
    """Virtio and vhost-user protocol features as DPDK logged them."""
    out = {}
    for key, pat in (("virtio_features", r"negotiated Virtio features: (0x[0-9a-fA-F]+)"),
                     ("protocol_features", r"negotiated Vhost-user protocol features: (0x[0-9a-fA-F]+)")):
        found = re.findall(pat, log)
        if found:
            out[key] = found[-1]
    return out


VIRTIO_NET_FEATURES = {
    0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 7: "GUEST_TSO4",
    8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4", 12: "HOST_TSO6",
    13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS", 17: "CTRL_VQ", 18: "CTRL_RX",
    19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA", 21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR",
    24: "NOTIFY_ON_EMPTY", 26: "LOG_ALL(vhost)", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC",
    29: "RING_EVENT_IDX", 30: "PROTOCOL_FEATURES(vhost-user)", 32: "VERSION_1",
    33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM", 37: "SR_IOV",
    38: "NOTIFICATION_DATA", 62: "RSC_EXT", 63: "STANDBY"}
VHOST_USER_PROTOCOL_FEATURES = {
    0: "MQ", 1: "LOG_SHMFD", 2: "RARP", 3: "REPLY_ACK", 4: "NET_MTU", 5: "BACKEND_REQ",
    6: "CROSS_ENDIAN", 7: "CRYPTO_SESSION", 8: "PAGEFAULT", 9: "CONFIG", 10: "BACKEND_SEND_FD",
    11: "HOST_NOTIFIER", 12: "INFLIGHT_SHMFD", 13: "RESET_DEVICE", 14: "INBAND_NOTIFICATIONS",
    15: "CONFIGURE_MEM_SLOTS", 16: "STATUS", 17: "XEN_MMAP", 18: "SHARED_OBJECT",
    19: "DEVICE_STATE"}


def feature_names(bits: int, names: dict[int, str]) -> list[str]:
    return [names.get(i, f"bit{i}") for i in range(64) if bits >> i & 1]


def guest_feature_bits(sysfs: str) -> int:
    """/sys/class/net/IF/device/features (a string of 0/1, bit 0 first) as an int."""
    return sum(1 << i for i, c in enumerate(sysfs.strip()) if c == "1")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def merge_json(path: Path, key: str, value: object, **top: object) -> dict:
    """Sets ``key`` (and the ``top`` items) in the JSON object at ``path``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.update(top)
    data[key] = value
    write_json(path, data)
    return data


# ------------------------------------------------------------------ checks
def check_stream(out: Outcome, frames: int = STREAM_FRAMES) -> dict:
    """Every frame back, intact, in order, once; the guest's counters agree."""
    r = out.check()
    bad = {k: r[k] for k in ("missing", "bad_checksum", "bad_length", "mismatch", "out_of_order",
                             "duplicates") if r[k]}
    if r["sent"] != frames or r["received"] != frames or bad:
        raise out.fail(f"stream of {frames} frames: sent {r['sent']}, received {r['received']}, "
                       f"problems {bad or 'none'}, stopped: {r['stopped']}")
    c = r["counters"]
    if c["tx_packets"] < frames or c["rx_packets"] < frames:
        raise out.fail(f"interface counters below {frames}: {c}")
    return r


def check_ping(out: Outcome) -> dict:
    r = out.check()
    if not r.get("sent") or r["received"] != r["sent"]:
        raise out.fail(f"ping: sent {r.get('sent')}, received {r.get('received')}: {r.get('error', '')}")
    return r
