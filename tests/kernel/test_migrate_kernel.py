"""Live migration on the kernel's vDPA simulator: ``svq migrate`` from vdpa0/vdpa1 to
vdpa2/vdpa3 (vdpa_sim_blk loaded with shared_backend=1, so both blk devices reach one RAM
disk, as a migration's hosts share storage), a blk guest saved with writes in flight and
resumed on the other device, and resumes refused by a device of the wrong class. Run
through tests/kernel/run; the job's figures go to $SVQ_KERNEL_RESULTS_DIR/migrate.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import svq
from svq import blk, net
from svq.session import DEFAULT_MEMORY

pytestmark = pytest.mark.kernel

KERNEL_MAC = "52:54:00:12:34:56"
# What the job sets on the source (svq.migration_job.GUEST_MAC).
JOB_MAC = "02:5a:51:00:00:01"
FRAMES = 20000
# Enough writes that the blk stream still runs when the devices stop (~3x margin under
# TCG), so that blk_downtime_ms is measured.
BLK_WRITES = 8000
ROUNDS = 3
# Far above anything seen under TCG, far below a stall (a frame wait gives up after 2 s).
SANE_MS = 5000.0
GUEST_PAGES = sum(size for _, size in DEFAULT_MEMORY) // 4096
FIGURES = ("switch_ms", "downtime_ms", "blackout_ms", "blk_downtime_ms", "dirty_pages", "dirty_rounds",
           "blk_inflight_at_save", "net_commands_acked", "frames_sent", "blk_writes", "elapsed_s")
# Sectors of the Python-API tests, clear of the job's (8 per write from 0).
API_SECTOR = 200_000


@pytest.fixture
def macs_restored(kernel_net: str, kernel_net_b: str) -> Iterator[None]:
    """The simulator keeps a MAC set through the control queue across resets: put the
    original back on both net devices for the other tests."""
    yield
    for name in (kernel_net, kernel_net_b):
        with svq.Session(name, mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}) as s:
            assert s.inject(net.CTRL, net.mac_addr_set(net.parse_mac(KERNEL_MAC)), 1) == (1, bytes([net.ACK_OK]))
            assert s.device.info()["config"]["mac"] == KERNEL_MAC


@pytest.fixture(scope="module")
def record_figures() -> Iterator[Callable[[str, dict[str, Any], int], None]]:
    """Writes each job's figures to $SVQ_KERNEL_RESULTS_DIR/migrate.json as soon as it ran
    (a failing run is recorded too, with its status)."""
    out = os.environ.get("SVQ_KERNEL_RESULTS_DIR")
    path = Path(out, "migrate.json") if out else None
    if path is not None:
        path.unlink(missing_ok=True)
    report: dict[str, Any] = {
        "kernel": platform.release(),
        "parameters": {"frames": FRAMES, "blk_writes": BLK_WRITES, "rounds": ROUNDS, "shadow": "translate"},
        "modes": {},
    }

    def record(mode: str, r: dict[str, Any], status: int) -> None:
        report["devices"] = {"net": [r["from"], r["to"]], "blk": [r["blk_from"], r["blk_to"]]}
        report["modes"][mode] = {"exit_status": status, "error": r["error"], **{k: r[k] for k in FIGURES}}
        print(json.dumps({mode: report["modes"][mode]}))
        if path is not None:
            path.write_text(json.dumps(report, indent=2) + "\n")

    yield record


def sane_ms(value: Any) -> bool:
    return isinstance(value, float | int) and 0 < value < SANE_MS


@pytest.mark.parametrize("mode", ["passthrough", "translate"])
def test_svq_migrate_between_kernel_devices(
    mode: str,
    kernel_net: str,
    kernel_net_b: str,
    kernel_blk: str,
    kernel_blk_b: str,
    macs_restored: None,
    record_figures: Callable[[str, dict[str, Any], int], None],
) -> None:
    cmd = [sys.executable, "-m", "svq", "migrate", "--from", kernel_net, "--to", kernel_net_b, "--blk-from", kernel_blk,
           "--blk-to", kernel_blk_b, "--frames", str(FRAMES), "--blk-writes", str(BLK_WRITES), "--rounds", str(ROUNDS), "--json"]
    if mode != "passthrough":  # passthrough is the default: run it without --mode
        cmd += ["--mode", mode]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.stdout, f"status {r.returncode}: {r.stderr}"
    out = json.loads(r.stdout)
    record_figures(mode, out, r.returncode)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out["error"] is None
    assert (out["from"], out["to"], out["blk_from"], out["blk_to"]) == (kernel_net, kernel_net_b, kernel_blk, kernel_blk_b)
    assert (out["mode"], out["shadow"]) == (mode, "translate")
    # Every frame back once, in order, across the switch, the stop and the resume (the
    # job may send more than asked, to keep its streams running until the migration ends).
    assert out["frames_sent"] == out["frames_received"] >= FRAMES
    assert out["frames_lost"] == 0 and out["frames_duplicated"] == 0 and out["frames_in_order"] is True
    # Every write completed once; B read back what the writes put on the shared disk.
    assert out["blk_writes"] >= BLK_WRITES and out["blk_verified"] is True
    assert isinstance(out["blk_inflight_at_save"], int) and out["blk_inflight_at_save"] >= 0
    # vdpa_sim_net acknowledges MAC_ADDR_SET alone: the MAC is the whole state to carry,
    # and B's filter passes the guest's MAC and drops a foreign one.
    assert out["net_commands_acked"] == 1
    assert out["net_state_equal"] is True and out["filter_verified"] is True
    assert out["net_state"]["mac"] == JOB_MAC and out["net_state"]["unicast"] == [] and out["net_state"]["vlans"] == []
    # Figures: the switch only in passthrough has queues to move; every gap measured.
    assert out["switch_ms"] >= 0 and out["switch_ms"] < SANE_MS
    if mode == "passthrough":
        assert out["switch_ms"] > 0
    for key in ("downtime_ms", "blackout_ms", "blk_downtime_ms"):
        assert sane_ms(out[key]), (key, out[key])
    assert 0 < out["dirty_pages"] <= GUEST_PAGES
    assert len(out["dirty_rounds"]) == ROUNDS + 1 and max(out["dirty_rounds"]) <= out["dirty_pages"]


def submit_writes(s: svq.Session, first: int, count: int) -> dict[int, tuple[int, bytes]]:
    """Writes of random 4 KiB blocks from API_SECTOR + 8 * first, all in flight at once:
    (block, data) by head."""
    by_head = {}
    for i in range(first, first + count):
        data = os.urandom(4096)
        by_head[s.driver.submit(0, [blk.header(blk.T_OUT, API_SECTOR + 8 * i), data], [1])] = (i, data)
    return by_head


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def complete_once_and_read_back(s: svq.Session, by_head: dict[int, tuple[int, bytes]]) -> None:
    done = s.driver.wait(0, len(by_head), timeout=30)
    assert sorted(h for h, _, _ in done) == sorted(by_head), "each request completes exactly once"
    assert all(length == 1 and data == bytes([blk.S_OK]) for _, length, data in done)
    with pytest.raises(TimeoutError):
        s.driver.wait(0, 1, timeout=0.2)
    disk = blk.Blk(s.driver)
    for i, data in by_head.values():
        assert disk.read(API_SECTOR + 8 * i, 8) == data, f"block {i}"


def test_blk_writes_in_flight_move_to_the_other_device(kernel_blk: str, kernel_blk_b: str) -> None:
    with svq.Device(kernel_blk) as a, svq.Device(kernel_blk_b) as b:
        s = svq.Session(a)
        # Some writes the device runs (completed, not reaped by the guest yet) ...
        by_head = submit_writes(s, 0, 32)
        wait_for(lambda: s.stats(0)["completed"] >= 8, "the device to complete some writes")
        # ... and some it cannot take: suspended, it leaves them in svq's shadow ring.
        s.suspend()
        by_head |= submit_writes(s, 32, 32)
        wait_for(lambda: s.stats(0)["elements"] >= 64, "svq to forward the writes")
        saved = s.save()
        assert s.closed and saved.carries_guest
        [q] = saved.state["queues"]
        assert 8 <= q["avail"] <= 32, "what the device never took is given back to the guest ring"
        assert set(q["inflight"]) <= set(by_head)
        assert a.live_mappings() == 0
        with svq.Session(b, resume=saved) as s2:
            assert not saved.carries_guest
            complete_once_and_read_back(s2, by_head)
        assert b.live_mappings() == 0
        # A saw every write too, those B ran included: one disk.
        with svq.Session(a) as again:
            disk = blk.Blk(again.driver)
            assert all(disk.read(API_SECTOR + 8 * i, 8) == data for i, data in by_head.values())


def test_a_blk_guest_refused_by_a_net_device_resumes_on_a_blk_device(kernel_blk: str, kernel_blk_b: str, kernel_net_b: str) -> None:
    with svq.Device(kernel_blk) as a, svq.Device(kernel_net_b) as wrong, svq.Device(kernel_blk_b) as b:
        s = svq.Session(a)
        by_head = submit_writes(s, 64, 16)
        saved = s.save()
        with pytest.raises(svq.StateError, match="device class 2 onto class 1"):
            svq.Session(wrong, resume=saved)
        assert saved.carries_guest, "the guest is still in the state"
        assert wrong.live_mappings() == 0
        # The refusing device is left as it was: it serves a session of its own.
        with svq.Session(wrong) as other:
            other.driver.post_receive(net.RX, 1, 2048)
            other.driver.send(net.TX, [net.frame(net.BROADCAST, b"still a net device")])
            assert other.driver.wait(net.RX, 1)[0][2].endswith(b"still a net device")
        with svq.Session(b, resume=saved) as s2:
            complete_once_and_read_back(s2, by_head)
            with pytest.raises(ValueError, match="resumed by another session already"):
                svq.Session(a, resume=saved)


def test_a_net_guest_refused_by_a_blk_device_resumes_on_a_net_device(kernel_net: str, kernel_net_b: str, kernel_blk_b: str) -> None:
    with svq.Device(kernel_net) as a, svq.Device(kernel_blk_b) as wrong, svq.Device(kernel_net_b) as b:
        s = svq.Session(a)
        s.driver.post_receive(net.RX, 4, 2048)
        saved = s.save()
        with pytest.raises(svq.StateError, match="device class 1 onto class 2"):
            svq.Session(wrong, resume=saved)
        assert saved.carries_guest and wrong.live_mappings() == 0
        with svq.Session(b, resume=saved) as s2:
            frames = [net.frame(net.BROADCAST, bytes([i]) * 60) for i in range(4)]
            s2.driver.send(net.TX, frames)
            assert [d for _, _, d in s2.driver.wait(net.RX, 4)] == frames, "the receive buffers posted on A"
