"""The real-client tier against ``svq serve``: the same guest, ping and raw-frame stream as
test_testpmd.py, with svq as the vhost-user backend in front of its embedded device.

    svq serve --vhost-user SOCK --device DEV --mode {translate,copy} --ctl CTLSOCK

- ping: ``--device sim:net,mac=<guest mac>,echo=10.0.0.2`` (the embedded device answers
  ARP and ICMP echo for 10.0.0.2);
- stream: ``--device sim:net,mac=<guest mac>`` (TX->RX loopback). While the guest is
  idle after the stream, ``svq ctl CTLSOCK stats --json`` must report per-queue counters
  equal to the guest's interface counters, and the stream's frames/s must be at least
  ``SVQ_VM_MIN_RATIO`` (0.8) x testpmd's in the same run (best of up to
  ``SVQ_VM_RATE_ATTEMPTS`` (5) pairs of measurements: see test_stream_rate_vs_testpmd).

The svq command is the ``svq`` next to the tier's python (or ``python -m svq``);
``SVQ_VM_SVQ`` overrides it (a command line, e.g. ``target/debug/svq``). Without
``svq serve`` (``svq serve --help`` fails) the tests skip, saying so.
Figures: .vm-tier/results/svq-serve.json.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import vmlib

pytestmark = pytest.mark.vm

MODES = ["translate", "copy"]
MIN_RATIO = float(os.environ.get("SVQ_VM_MIN_RATIO", "0.8"))
RATE_ATTEMPTS = int(os.environ.get("SVQ_VM_RATE_ATTEMPTS", "5"))
RX, TX = 0, 1  # virtio-net queue indexes
CTL_TIMEOUT = 30.0


def svq_argv() -> list[str]:
    if os.environ.get("SVQ_VM_SVQ"):
        return shlex.split(os.environ["SVQ_VM_SVQ"])
    exe = Path(sys.executable).parent / "svq"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "svq"]


@pytest.fixture(scope="session")
def svq() -> list[str]:
    """The svq command line, once ``svq serve --help`` exits 0 (else the test skips)."""
    argv = svq_argv()
    try:
        p = subprocess.run([*argv, "serve", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"`svq serve` is not available: `{shlex.join(argv)} serve --help` failed: {e}")
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        pytest.skip(f"`svq serve` is not available in the installed svq: `{shlex.join(argv)} serve "
                    f"--help` exited with status {p.returncode} ({last})")
    return argv


def ctl_path(sock: Path) -> Path:
    return sock.parent / "ctl.sock"


class SvqRuns:
    """Boots each (program, mode) once per session; later tests reuse the outcome (or the
    error)."""

    def __init__(self, tier: vmlib.Tier, svq: list[str]) -> None:
        self.tier, self.svq = tier, svq
        self._done: dict[tuple[str, str], object] = {}
        self.results = tier.results_dir / "svq-serve.json"

    def serve(self, device: str, mode: str):
        return lambda sock: [*self.svq, "serve", "--vhost-user", str(sock), "--device", device,
                             "--mode", mode, "--ctl", str(ctl_path(sock))]

    def _once(self, key: tuple[str, str], make):
        if key not in self._done:
            try:
                self._done[key] = make()
            except Exception as e:  # noqa: BLE001 - replayed to every test that needs it
                self._done[key] = e
        got = self._done[key]
        if isinstance(got, Exception):
            raise got
        return got

    def ping(self, mode: str) -> vmlib.Outcome:
        def make() -> vmlib.Outcome:
            out = vmlib.run_traffic(
                self.tier, f"svq-{mode}-ping",
                self.serve(f"sim:net,mac={vmlib.GUEST_MAC},echo={vmlib.PEER_IP}", mode),
                vmlib.PING_ARGS)
            self._record(mode, "ping", out, None)
            return out
        return self._once(("ping", mode), make)

    def stream(self, mode: str) -> tuple[vmlib.Outcome, dict]:
        """The stream, and ``svq ctl stats --json`` taken while the guest sat idle after it
        (``{"stats": {...}}`` or ``{"error": "..."}``)."""
        def make() -> tuple[vmlib.Outcome, dict]:
            ctl: dict = {"error": "the guest never got to the point of reading the counters"}

            def hold(backend: vmlib.Backend) -> None:
                argv = [*self.svq, "ctl", str(ctl_path(backend.sock)), "stats", "--json"]
                try:
                    p = subprocess.run(argv, capture_output=True, text=True, timeout=CTL_TIMEOUT)
                except (OSError, subprocess.TimeoutExpired) as e:
                    ctl.update(error=f"`{shlex.join(argv)}` failed: {e}")
                    return
                if p.returncode != 0:
                    ctl.update(error=f"`{shlex.join(argv)}` exited with status {p.returncode}: "
                                     f"{p.stderr.strip()[-2000:]}")
                    return
                try:
                    ctl.clear()
                    ctl["stats"] = json.loads(p.stdout)
                except ValueError as e:
                    ctl.update(error=f"`{shlex.join(argv)}` printed no JSON ({e}): {p.stdout[:2000]!r}")
                    return
                # What the server holds while the guest's 512 MiB are mapped.
                argv = [*self.svq, "ctl", str(ctl_path(backend.sock)), "info", "--json"]
                p = subprocess.run(argv, capture_output=True, text=True, timeout=CTL_TIMEOUT)
                if p.returncode == 0:
                    ctl["info"] = json.loads(p.stdout)

            out = vmlib.run_traffic(self.tier, f"svq-{mode}-stream",
                                    self.serve(f"sim:net,mac={vmlib.GUEST_MAC}", mode),
                                    vmlib.STREAM_ARGS, hold=hold)
            self._record(mode, "stream", out, ctl)
            return out, ctl
        return self._once(("stream", mode), make)

    def _record(self, mode: str, program: str, out: vmlib.Outcome, ctl: dict | None) -> None:
        data = json.loads(self.results.read_text()) if self.results.exists() else {}
        entry = data.setdefault(mode, {})
        entry[program] = {"guest": out.guest.result, "guest_rc": out.guest.rc,
                          "backend_rc": out.backend_rc,
                          "timings_s": {"backend_ready": round(out.backend.ready_s or 0, 3),
                                        "qemu": round(out.guest.elapsed_s, 2),
                                        "wall": round(out.wall_s, 2),
                                        "guest_uptime": out.guest.guest_times()}}
        if ctl is not None:
            entry[program]["svq_ctl"] = ctl
        data.update(run_id=self.tier.run_id, svq=shlex.join(self.svq))
        vmlib.write_json(self.results, data)


@pytest.fixture(scope="session")
def svq_runs(tier: vmlib.Tier, svq: list[str]) -> SvqRuns:
    return SvqRuns(tier, svq)


@pytest.mark.parametrize("mode", MODES)
def test_ping(svq_runs: SvqRuns, mode: str) -> None:
    """The guest's ping to 10.0.0.2 gets every reply from the embedded device's echo
    responder, through svq."""
    vmlib.check_ping(svq_runs.ping(mode))


@pytest.mark.parametrize("mode", MODES)
def test_stream(svq_runs: SvqRuns, mode: str) -> None:
    """10 000 raw frames through svq to the looping embedded device: all back, intact,
    in order, once."""
    out, _ = svq_runs.stream(mode)
    vmlib.check_stream(out)


@pytest.mark.parametrize("mode", MODES)
def test_stream_counters_match_svq(svq_runs: SvqRuns, mode: str) -> None:
    """svq's per-queue counters equal what the guest's interface counted: every frame the
    guest sent is one TX element, forwarded and completed; every frame it received is one
    completed RX element (a frame of at most 1514 bytes fits one mergeable RX buffer)."""
    out, ctl = svq_runs.stream(mode)
    r = out.check()
    if "stats" not in ctl:
        raise out.fail(f"no svq counters: {ctl.get('error')}")
    try:
        queues = {q["index"]: q for q in ctl["stats"]["queues"]}
        tx, rx = queues[TX], queues[RX]
    except (KeyError, TypeError) as e:
        raise out.fail(f"svq ctl stats --json has no queues {RX} and {TX} ({e!r}): {ctl['stats']}") from e
    guest = r["counters_after"]
    problems = []
    if not tx["elements"] == tx["completed"] == guest["tx_packets"]:
        problems.append(f"TX: svq elements {tx['elements']}, completed {tx['completed']}, "
                        f"guest tx_packets {guest['tx_packets']}")
    if rx["completed"] != guest["rx_packets"]:
        problems.append(f"RX: svq completed {rx['completed']}, guest rx_packets {guest['rx_packets']}")
    if problems:
        raise out.fail("; ".join(problems) + f"\nsvq stats: {json.dumps(ctl['stats'])}")


@pytest.mark.parametrize("mode", MODES)
def test_stream_rate_vs_testpmd(svq_runs: SvqRuns, mode: str, tier: vmlib.Tier,
                                request: pytest.FixtureRequest) -> None:
    """The stream through svq is at least SVQ_VM_MIN_RATIO x as fast (frames/s) as through
    testpmd in this run (both recorded in .vm-tier/results/).

    Under TCG on a 2-core host the figure of one stream varies by up to 2x with what
    else runs on the host, and interference only ever slows a stream down. So when the
    first pair misses the target, both are measured again, one after the other, up to
    SVQ_VM_RATE_ATTEMPTS pairs in all (default 5), svq first in every other pair, and the
    best of each is compared. The default bound (0.8) catches a backend that slows the
    guest down; whether svq matches testpmd (1.0) is read from the recorded figures, as
    one run's best of three is within the noise of the other backend's.
    """
    out, _ = svq_runs.stream(mode)
    svq_fps = [vmlib.check_stream(out)["frames_per_s"]]
    base_fps = [vmlib.check_stream(request.getfixturevalue("testpmd_stream"))["frames_per_s"]]
    while max(svq_fps) / max(base_fps) < MIN_RATIO and len(svq_fps) < RATE_ATTEMPTS:
        n = len(svq_fps) + 1

        def testpmd(n: int = n) -> None:
            base = vmlib.run_traffic(tier, f"testpmd-stream-{mode}-{n}",
                                     lambda sock: tier.testpmd_argv(sock, "io"), vmlib.STREAM_ARGS)
            base_fps.append(vmlib.check_stream(base)["frames_per_s"])

        def svq(n: int = n) -> None:
            again = vmlib.run_traffic(tier, f"svq-{mode}-stream-{n}",
                                      svq_runs.serve(f"sim:net,mac={vmlib.GUEST_MAC}", mode),
                                      vmlib.STREAM_ARGS)
            svq_fps.append(vmlib.check_stream(again)["frames_per_s"])

        # The order alternates: a host that slows down over the run favours neither.
        for run in ((svq, testpmd) if n % 2 == 0 else (testpmd, svq)):
            run()
    ratio = max(svq_fps) / max(base_fps)
    vmlib.merge_json(svq_runs.results, f"{mode}_vs_testpmd", {
        "svq_frames_per_s": svq_fps, "testpmd_frames_per_s": base_fps,
        "ratio_of_best": round(ratio, 3), "min_ratio": MIN_RATIO})
    assert ratio >= MIN_RATIO, (
        f"svq ({mode}) best {max(svq_fps)} frames/s of {svq_fps} is {ratio:.2f}x testpmd's "
        f"best {max(base_fps)} of {base_fps} (needs >= {MIN_RATIO}x)")


@pytest.mark.parametrize("mode", MODES)
def test_guest_memory_is_mapped_not_copied(svq_runs: SvqRuns, mode: str) -> None:
    """With the guest's 512 MiB mapped, svq serve's own (private) memory stays under
    64 MiB, as `svq ctl info` reports it."""
    out, ctl = svq_runs.stream(mode)
    out.check()
    info = ctl.get("info")
    if not info:
        raise out.fail(f"no `svq ctl info`: {ctl}")
    assert info["guest_memory_bytes"] == 512 << 20, info
    assert info["private_bytes"] < 64 << 20, info
