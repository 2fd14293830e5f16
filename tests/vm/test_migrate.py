"""Live migration in the real-client tier: a running guest moves from a source qemu to a
destination qemu while it pings the peer and streams numbered frames through the
vhost-user backend, and neither the backend nor the guest may lose track (miglib.py has
the whole sequence).

Backends:

- ``testpmd``: one dpdk-testpmd with two vhost ports (icmpecho, ``--port-topology=loop``),
  port 0 for the source, port 1 for the destination: the reference.
  Figures: .vm-tier/results/migrate-testpmd.json
- ``svq``: two ``svq serve --vhost-user SOCK --device sim:net,mac=<guest>,echo=10.0.0.2
  --mode passthrough --ctl CTL``, one per side (the source switches its data queues to the
  shadow itself when qemu turns dirty logging on). ``svq ctl CTL info|health|stats --json``
  of both is recorded before and after. Skipped only when ``svq serve --help`` does not
  list ``--vhost-user``. When qemu refuses to migrate (a backend without dirty logging:
  "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature.", or without the LOG_SHMFD
  protocol feature), the tests FAIL with qemu's words: that is the missing work.
  Figures: .vm-tier/results/migrate-svq.json

Knobs: ``SVQ_VM_MIG_PRE_S`` / ``SVQ_VM_MIG_POST_S`` (3 / 3): seconds of traffic before the
migration and after the switch; ``SVQ_VM_MIG_MAX_LOST`` (32, the stream's window): stream
frames a backend may lose, all of them at the switch; ``SVQ_VM_MIG_SVQ_MODE``
(passthrough): the ``--mode`` of both svq servers; ``SVQ_VM_MIG_RAM_KIB``: the guest's RAM
(see miglib.mig_ram_kib).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import miglib
import pytest
import vmlib

pytestmark = pytest.mark.vm

BACKENDS = ["testpmd", "svq"]
PRE_S = float(os.environ.get("SVQ_VM_MIG_PRE_S", "3"))
POST_S = float(os.environ.get("SVQ_VM_MIG_POST_S", "3"))
MAX_LOST_FRAMES = int(os.environ.get("SVQ_VM_MIG_MAX_LOST", str(miglib.GUEST_OPTS["window"])))
# Echo replies a backend may lose at the switch: testpmd may drop the reply to a request
# it dequeued from the source's TX ring after qemu stopped the RX ring (GET_VRING_BASE
# comes for RX first); svq must lose none.
MAX_LOST_PINGS = {"testpmd": 1, "svq": 0}
SVQ_DEVICE = f"sim:net,mac={vmlib.GUEST_MAC},echo={vmlib.PEER_IP}"
# The source switches its passthrough queues to the shadow when qemu wants the log;
# SVQ_VM_MIG_SVQ_MODE=translate (or copy) runs both servers shadowed from the start.
SVQ_MODE = os.environ.get("SVQ_VM_MIG_SVQ_MODE", "passthrough")

WHAT_QEMU_SENDS = """\
What qemu 7.2 then sends (seen with testpmd in this test; details in tests/vm/README.md):
  source, at `migrate`: SET_LOG_BASE (one fd: the shared log memfd, payload {u64 size, u64
  offset}; qemu always waits for a reply), SET_FEATURES with VHOST_F_LOG_ALL (need_reply),
  GET_STATUS, SET_VRING_ADDR for each ring with VHOST_VRING_F_LOG and log_guest_addr = the
  used ring's GPA (need_reply); from then on every write into guest memory must set its
  page's bit in the log; at the switch: SET_STATUS 0, GET_VRING_BASE rx, GET_VRING_BASE tx
  (every taken chain completed, used == avail).
  destination, at the switch: SET_VRING_ENABLE x6, SET_FEATURES (no LOG_ALL), GET_STATUS,
  SET_STATUS 0x08, SET_MEM_TABLE (need_reply), per ring SET_VRING_NUM/BASE (= the source's
  GET_VRING_BASE)/ADDR/KICK/CALL, GET_STATUS, SET_STATUS 0x0f."""


def svq_argv() -> list[str]:
    """The svq command: SVQ_VM_SVQ, else the svq next to this python, else python -m svq."""
    if os.environ.get("SVQ_VM_SVQ"):
        return shlex.split(os.environ["SVQ_VM_SVQ"])
    exe = Path(sys.executable).parent / "svq"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "svq"]


def explain_refusal(desc: str) -> str:
    needs = []
    if "LOG_SHMFD" in desc:
        needs.append("offer the vhost-user protocol feature LOG_SHMFD (bit 1) in GET_PROTOCOL_FEATURES "
                     "(qemu then shares its dirty log as a memfd)")
    if "LOG_SHMFD" in desc or "LOG_ALL" in desc:
        needs.append("offer VHOST_F_LOG_ALL (bit 26) in GET_FEATURES")
    if not needs:
        return ""
    return "svq serve must " + " and ".join(needs) + ".\n" + WHAT_QEMU_SENDS


# ------------------------------------------------------------------ checks
def evaluate(kind: str, rec: dict) -> dict[str, list[str]]:
    """Each check's problems (empty: it passed), from one run's record."""
    checks: dict[str, list[str]] = {}
    mig = rec.get("migration") or {}
    g = (rec.get("guest") or {})
    r = g.get("result") or {}
    view = g.get("console") or {}

    p = checks["migration"] = []
    if mig.get("status") != "completed":
        p.append(f"migration status {mig.get('status')}")
    for key in ("total_time_ms", "downtime_ms"):
        if not isinstance(mig.get(key), int) or mig[key] <= 0:
            p.append(f"qemu reported no {key}: {mig.get(key)}")
    if mig.get("dst_status_after") != "running":
        p.append(f"destination runstate {mig.get('dst_status_after')}")
    if not r:
        p.append("the guest printed no result on the destination")
    elif r.get("stop") != "host":
        p.append(f"the guest stopped on its own ({r.get('stop')}), not when told to")
    if g.get("fail_lines"):
        p.append(f"guest console: {g['fail_lines']}")

    p = checks["ping"] = []
    ping = r.get("ping") or {}
    if not ping:
        p.append("no ping figures")
    else:
        if ping["sent"] != ping["received"] + ping["lost"] or ping["duplicates"] or ping.get("damaged"):
            p.append(f"ping: {ping}")
        if ping["lost"] > MAX_LOST_PINGS[kind]:
            p.append(f"{ping['lost']} of {ping['sent']} pings lost (seqs {ping['lost_seqs']}); "
                     f"{MAX_LOST_PINGS[kind]} allowed for {kind}")
        if not view.get("ping_replies_on_source") or not view.get("ping_replies_on_destination"):
            p.append(f"replies on the source {view.get('ping_replies_on_source')}, "
                     f"on the destination {view.get('ping_replies_on_destination')}")

    p = checks["stream"] = []
    st = r.get("stream") or {}
    if not st:
        p.append("no stream figures")
    else:
        listed = sum(b - a + 1 for a, b in st["lost_seqs"]) if st["lost_ranges"] <= len(st["lost_seqs"]) else None
        if st["sent"] != st["received"] + st["lost"] or (listed is not None and listed != st["lost"]):
            p.append(f"not every frame accounted for: sent {st['sent']}, received {st['received']}, "
                     f"lost {st['lost']} (listed {listed})")
        bad = {k: st[k] for k in ("duplicates", "out_of_order", "bad_length", "bad_checksum", "bad_payload",
                                  "bad_header", "unknown_seq") if st.get(k)}
        if bad:
            p.append(f"stream: {bad}")
        if st["lost"] > MAX_LOST_FRAMES:
            p.append(f"{st['lost']} of {st['sent']} frames lost (seqs {st['lost_seqs'][:8]}...); at most "
                     f"{MAX_LOST_FRAMES} allowed (SVQ_VM_MIG_MAX_LOST)")
        before, after = view.get("stream_last_status_on_source"), view.get("stream_first_status_on_destination")
        if not before or not after or after["stream_received"] <= before["stream_received"]:
            p.append(f"no frames came back on both sides: last status on the source {before}, "
                     f"first on the destination {after}")
        elif st["lost"]:
            # A frame may be lost at the switch only: sent after the source's last report
            # minus one window, and before the destination's first report.
            lo, hi = before["stream_received"] - miglib.GUEST_OPTS["window"], after["stream_sent"]
            stray = [[a, b] for a, b in st["lost_seqs"] if a < lo or b > hi]
            if stray:
                p.append(f"frames lost away from the switch (seqs {stray[:8]}; the switch is within {lo}..{hi})")
        if (r.get("packet_socket") or {}).get("drops"):
            p.append(f"the guest's packet socket dropped {r['packet_socket']['drops']} frames")

    p = checks["dirty_log"] = []
    vu = (rec.get("vhost_user") or {}).get("qemu_src") or {}
    seq = " ".join(vu.get("from_migrate") or [])
    for req in ("SET_LOG_BASE", "SET_FEATURES"):
        if req not in seq:
            p.append(f"qemu sent no {req} to the source backend when the migration started")
    log = rec.get("dirty_log") or {}
    if not log.get("samples_with_bits"):
        p.append(f"no bit set in qemu's vhost dirty log in {log.get('samples', 0)} samples: the backend did not log")
    elif not all((log.get("used_rings_logged") or {}).values()):
        p.append(f"used-ring pages not logged: {log.get('used_rings_logged')}")
    if kind == "testpmd" and True not in ((rec.get("vhost_user") or {}).get("testpmd_log_all") or []):
        p.append("testpmd never logged SET_FEATURES with LOG_ALL on")

    p = checks["rings"] = miglib.ring_checks(rec)
    if kind == "testpmd":
        vb = (rec.get("vhost_user") or {}).get("testpmd_vring_base") or {}
        if not vb.get("src_get") or vb.get("src_get") != vb.get("dst_set"):
            p.append(f"testpmd: GET_VRING_BASE on the source {vb.get('src_get')} != SET_VRING_BASE on the "
                     f"destination {vb.get('dst_set')}")
    return checks


def summary(rec: dict) -> dict:
    mig = rec.get("migration") or {}
    r = ((rec.get("guest") or {}).get("result") or {})
    view = ((rec.get("guest") or {}).get("console") or {})
    ping, st = r.get("ping") or {}, r.get("stream") or {}
    log = rec.get("dirty_log") or {}
    rings = rec.get("rings") or {}
    return {
        "total_time_ms": mig.get("total_time_ms"), "downtime_ms": mig.get("downtime_ms"),
        "setup_time_ms": mig.get("setup_time_ms"), "host_stop_to_resume_ms": mig.get("host_stop_to_resume_ms"),
        "ping_reply_gap_ms": view.get("reply_gap_ms"),
        "ping": {k: ping.get(k) for k in ("sent", "received", "lost", "duplicates")},
        "ping_replies_src_dst": [view.get("ping_replies_on_source"), view.get("ping_replies_on_destination")],
        "stream": {k: st.get(k) for k in ("sent", "received", "lost", "duplicates", "out_of_order", "lost_seqs")},
        "guest_max_reply_gap_ms": {"ping": ping.get("max_reply_gap_ms"), "stream": st.get("max_reply_gap_ms")},
        "dirty_log": {k: log.get(k) for k in ("samples", "samples_with_bits", "distinct_pages", "used_rings_logged")},
        "rings_handed_over": {q: (v.get("last-avail-idx"), v.get("used-idx")) for q, v in (rings.get("src") or {}).items()},
        "rings_final": {q: (v.get("last-avail-idx"), v.get("used-idx")) for q, v in (rings.get("dst") or {}).items()},
        "refused": mig.get("refused"), "error": (rec.get("error") or "").splitlines()[0] if rec.get("error") else None,
    }


# ------------------------------------------------------------------ fixtures
class Migrations:
    """Runs each backend's migration once per session; the tests share the outcome."""

    def __init__(self, tier: vmlib.Tier, initrd: Path) -> None:
        self.tier, self.initrd = tier, initrd
        self._done: dict[str, tuple[miglib.MigOutcome, dict[str, list[str]]]] = {}
        self._skip: dict[str, str] = {}

    def backend(self, kind: str) -> miglib.MigBackend:
        if kind == "testpmd":
            return miglib.testpmd_backend(self.tier)
        svq = svq_argv()
        try:
            p = subprocess.run([*svq, "serve", "--help"], capture_output=True, text=True, timeout=60)
            listed = p.returncode == 0 and "--vhost-user" in p.stdout
            why = f"exited with status {p.returncode}" if p.returncode else "does not list --vhost-user"
        except (OSError, subprocess.TimeoutExpired) as e:
            listed, why = False, str(e)
        if not listed:
            self._skip[kind] = (f"precondition missing: `{shlex.join(svq)} serve --help` {why} "
                                "(no `svq serve --vhost-user` to migrate)")
            pytest.skip(self._skip[kind])
        return miglib.svq_backend(svq, SVQ_DEVICE, mode=SVQ_MODE)

    def get(self, kind: str) -> tuple[miglib.MigOutcome, dict[str, list[str]]]:
        if kind in self._skip:
            pytest.skip(self._skip[kind])
        if kind not in self._done:
            out = miglib.run_migration(self.tier, f"migrate-{kind}", self.backend(kind), self.initrd,
                                       pre_s=PRE_S, post_s=POST_S)
            checks = evaluate(kind, out.record) if out.error is None else {}
            rec = dict(out.record)
            data = {"run_id": self.tier.run_id, "backend": kind, "machine": self.tier.machine,
                    "kernel": self.tier.kver, "summary": summary(rec),
                    "checks": {k: v or "ok" for k, v in checks.items()}, **rec}
            if kind == "svq":
                data["svq"] = shlex.join(svq_argv())
                data["svq_mode"] = SVQ_MODE
                data["svq_ctl"] = {"before": data.pop("backend_before", None),
                                   "after": data.pop("backend_after", None)}
            if out.error is not None and isinstance(out.error, miglib.MigrationRefused):
                data["explanation"] = explain_refusal(rec.get("refused") or "")
            vmlib.write_json(self.tier.results_dir / f"migrate-{kind}.json", data)
            self._done[kind] = (out, checks)
        return self._done[kind]

    def checked(self, kind: str, check: str) -> miglib.MigOutcome:
        """The outcome; fails with the run's error (a refusal explained) or the check's problems."""
        out, checks = self.get(kind)
        if out.error is not None:
            if check != "migration":  # the full story is told once, by test_migration_completes
                pytest.fail(f"{kind}: no migration to check: {str(out.error).splitlines()[0]} "
                            f"(see test_migration_completes[{kind}])", pytrace=False)
            if isinstance(out.error, miglib.MigrationRefused):
                text = str(out.error)
                pytest.fail(f"{kind}: {text}\n{explain_refusal(text)}", pytrace=False)
            raise out.error
        problems = checks.get(check) or []
        if problems:
            raise vmlib.TierError(f"{kind} migration, {check}: " + "; ".join(problems)
                                  + f"\n(figures: {self.tier.results_dir / f'migrate-{kind}.json'}, "
                                    f"logs: {out.run_dir})")
        return out


@pytest.fixture(scope="session")
def mig_initrd() -> Path:
    path = os.environ.get("SVQ_VM_MIG_INITRD")
    if not path or not Path(path).is_file():
        raise vmlib.TierError("SVQ_VM_MIG_INITRD not set: run the tier through tests/vm/run "
                              "(it builds the migration initramfs with guest/build-mig.sh)")
    return Path(path)


@pytest.fixture(scope="session")
def migrations(tier: vmlib.Tier, mig_initrd: Path) -> Migrations:
    return Migrations(tier, mig_initrd)


# ------------------------------------------------------------------ tests
def test_migtraffic_on_loopback(mig_initrd: Path) -> None:
    """The guest program on its own, no VM: on the loopback interface of a fresh network
    namespace the kernel answers both the ping and the stream's echo requests, so every
    one must come back, intact and in order, and "stop" on stdin must end the run."""
    exe = mig_initrd.parent / "migtraffic"
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this host")
    # Loopback addresses arriving from a packet socket are martians unless these are on.
    script = ("ip link set lo up 2>/dev/null || busybox ip link set lo up; "
              "for k in route_localnet accept_local; do echo 1 > /proc/sys/net/ipv4/conf/all/$k; "
              "echo 1 > /proc/sys/net/ipv4/conf/lo/$k; done; "
              f"exec {shlex.quote(str(exe))} --iface lo --peer 127.0.0.1 --peer-mac 00:00:00:00:00:00 "
              "--rate 2000 --window 32 --ping-ms 20 --drain-ms 300 --max-secs 20")
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        try:
            proc.stdin.write("stop\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass  # it ended already (e.g. no namespace allowed): its output says why
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 and "Operation not permitted" in stderr:
        pytest.skip(f"cannot make a network namespace here: {stderr.strip()}")
    assert proc.returncode == 0, stdout + stderr
    line = [x for x in stdout.splitlines() if x.startswith("MIGT RESULT ")]
    assert line, stdout
    r = json.loads(line[-1][len("MIGT RESULT "):])
    assert r["stop"] == "host", r
    for kind in ("ping", "stream"):
        k = r[kind]
        assert k["sent"] > 10 and k["received"] == k["sent"] and k["lost"] == 0, r
        assert k["duplicates"] == k["out_of_order"] == 0 and k["lost_seqs"] == [], r
    st = r["stream"]
    assert st["bad_length"] == st["bad_checksum"] == st["bad_payload"] == st["bad_header"] == 0, r
    assert r["packet_socket"]["drops"] == 0, r


@pytest.mark.parametrize("kind", BACKENDS)
def test_migration_completes(migrations: Migrations, kind: str) -> None:
    """qemu migrates the running guest (memfd RAM share=on on both sides, same machine
    type, -smp 1) and reports total-time, downtime and setup-time once the source is in
    postmigrate; the destination runs and the guest finishes there when told to."""
    migrations.checked(kind, "migration")


@pytest.mark.parametrize("kind", BACKENDS)
def test_ping_across_switch(migrations: Migrations, kind: str) -> None:
    """The guest's ping (every 50 ms) is answered on both sides of the switch: none lost
    with svq, at most one with testpmd; the gap between the last reply on the source's
    console and the first on the destination's is recorded (host clock)."""
    migrations.checked(kind, "ping")


@pytest.mark.parametrize("kind", BACKENDS)
def test_stream_across_switch(migrations: Migrations, kind: str) -> None:
    """Every streamed frame is accounted for: sent = received + lost, each lost one listed
    and at the switch only, none twice, none out of order, none damaged; frames came back
    on both sides."""
    migrations.checked(kind, "stream")


@pytest.mark.parametrize("kind", BACKENDS)
def test_backend_logged_dirty_pages(migrations: Migrations, kind: str) -> None:
    """qemu turned dirty logging on (SET_LOG_BASE, SET_FEATURES with LOG_ALL) and the
    backend set bits in qemu's log while the migration ran, the used rings' pages among
    them (qemu only clears that bitmap: the bits are the backend's)."""
    migrations.checked(kind, "dirty_log")


@pytest.mark.parametrize("kind", BACKENDS)
def test_rings_continue_on_destination(migrations: Migrations, kind: str) -> None:
    """The source handed over quiescent rings (used == avail after GET_VRING_BASE), the
    destination went on from there, and the guest's TX count equals the TX ring's final
    position."""
    migrations.checked(kind, "rings")
