"""Packet capture: what crosses a shadowed net queue, both directions, in a pcapng file
that tshark (Wireshark's reader, not svq's) opens and finds the right frames in: per-queue
interfaces, counts, bytes, snap length, size cap, and timestamps in order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import svq
from svq import net

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (Debian package tshark)")


def tshark(path: Path) -> list[dict[str, str]]:
    """Every frame of the file as tshark reads it, in file order."""
    fields = ["frame.interface_name", "frame.len", "frame.cap_len", "frame.time_epoch", "eth.type", "data.data"]
    cmd = [TSHARK or "tshark", "-r", str(path), "-T", "fields", *(x for f in fields for x in ("-e", f))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return [dict(zip(fields, line.split("\t"), strict=True)) for line in r.stdout.splitlines()]


def payloads(n: int, size: int = 100) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes((i + k) & 0xFF for k in range(size - 4)) for i in range(n)]


def loop(s: svq.Session, bodies: list[bytes]) -> None:
    s.driver.post_receive(net.RX, len(bodies), 2048)
    s.driver.send(net.TX, [net.frame(net.BROADCAST, b) for b in bodies])
    assert len(s.driver.wait(net.RX, len(bodies))) == len(bodies)
    s.driver.wait(net.TX, len(bodies))


@needs_tshark
@pytest.mark.parametrize("mode", [svq.Mode.TRANSLATE, svq.Mode.COPY], ids=lambda m: m.value)
def test_both_directions_as_tshark_reads_them(tmp_path: Path, mode: svq.Mode) -> None:
    path = tmp_path / "loop.pcapng"
    bodies = payloads(150)
    with svq.Session("sim:net", mode=mode) as s:
        assert s.start_capture(path) == ["rx0", "tx0"]
        for i in range(0, len(bodies), 50):  # several passes of the engine
            loop(s, bodies[i : i + 50])
        report = s.stop_capture()
        # Traffic after the stop is not captured.
        loop(s, payloads(5))
    frames = tshark(path)
    assert report["finished"] and report["error"] is None
    assert report["packets"] == len(frames) == 300 and report["dropped"] == 0
    assert [(i["name"], i["packets"]) for i in report["interfaces"]] == [("rx0", 150), ("tx0", 150)]
    assert report["bytes"] == path.stat().st_size
    for name in ("tx0", "rx0"):
        mine = [f for f in frames if f["frame.interface_name"] == name]
        # The frame without the virtio-net header: Ethernet, our ethertype, our bytes.
        assert [bytes.fromhex(f["data.data"]) for f in mine] == bodies
        assert {f["eth.type"] for f in mine} == {"0x88b5"}
        assert all(f["frame.len"] == f["frame.cap_len"] == str(14 + 100) for f in mine)
        times = [float(f["frame.time_epoch"]) for f in mine]
        assert times == sorted(times), f"{name}: timestamps out of order"
    # Each frame was received after it was sent.
    first_tx = min(float(f["frame.time_epoch"]) for f in frames if f["frame.interface_name"] == "tx0")
    first_rx = min(float(f["frame.time_epoch"]) for f in frames if f["frame.interface_name"] == "rx0")
    assert first_tx <= first_rx


@needs_tshark
def test_snap_length_and_size_cap(tmp_path: Path) -> None:
    snap, capped = tmp_path / "snap.pcapng", tmp_path / "capped.pcapng"
    with svq.Session("sim:net") as s:
        s.start_capture(snap, queues=[net.TX], snaplen=40)
        loop(s, payloads(20, size=1000))
        r = s.stop_capture()
        assert [i["name"] for i in r["interfaces"]] == ["tx0"]
        frames = tshark(snap)
        assert len(frames) == 20
        assert {(f["frame.len"], f["frame.cap_len"]) for f in frames} == {("1014", "40")}

        limit = 8192
        s.start_capture(capped, limit=limit)
        loop(s, payloads(100, size=1000))
        r = s.stop_capture()
    assert capped.stat().st_size <= limit
    assert r["dropped_limit"] > 0 and r["dropped"] == r["dropped_limit"]
    assert r["packets"] + r["dropped"] == 200
    # Capped, yet a whole file: tshark reads every frame written.
    assert len(tshark(capped)) == r["packets"] > 0


@needs_tshark
def test_closing_the_session_completes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "closed.pcapng"
    s = svq.Session("sim:net")
    s.start_capture(path)
    loop(s, payloads(10))
    s.close()
    assert len(tshark(path)) == 20
    report = s.stop_capture()  # after the close: the final counts
    assert report["finished"] and report["packets"] == 20


def test_what_cannot_be_captured_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pcapng"
    with svq.Session("sim:net", mode="passthrough", queue_modes={net.CTRL: "copy"}) as s:
        with pytest.raises(ValueError, match="passthrough"):
            s.start_capture(path)
        with pytest.raises(ValueError, match="passthrough"):
            s.start_capture(path, queues=[net.RX])
    with svq.Session("sim:net", queue_modes={net.CTRL: "copy"}) as s:
        with pytest.raises(ValueError, match="control queue"):
            s.start_capture(path, queues=[net.CTRL])
        with pytest.raises(ValueError, match="not served"):
            s.start_capture(path, queues=[9])
        for bad in (0, 262145):
            with pytest.raises(ValueError, match="snap length"):
                s.start_capture(path, snaplen=bad)
        with pytest.raises(ValueError, match="no capture"):
            s.stop_capture()
        with pytest.raises(FileNotFoundError):
            s.start_capture(tmp_path / "missing" / "x.pcapng")
        s.start_capture(path)
        with pytest.raises(ValueError, match="capture is running"):
            s.start_capture(tmp_path / "y.pcapng")
        s.stop_capture()
    with svq.Session("sim:blk") as b, pytest.raises(ValueError, match="virtio-net"):
        b.start_capture(path)
    assert not (tmp_path / "y.pcapng").exists()


@needs_tshark
def test_svq_demo_capture(tmp_path: Path) -> None:
    path = tmp_path / "demo.pcapng"
    cmd = [sys.executable, "-m", "svq", "demo", "--packets", "500", "--capture", str(path), "--snaplen", "64", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["capture"]
    frames = tshark(path)
    # The queues never wait for the disk: a frame the writer could not take is counted.
    assert report["packets"] + report["dropped_busy"] == 1000 and report["dropped"] == report["dropped_busy"]
    assert report["packets"] == len(frames) > 0
    assert sorted({f["frame.interface_name"] for f in frames}) == ["rx0", "tx0"]
    assert {f["frame.cap_len"] for f in frames} == {"64"}


def test_a_queue_switched_away_and_back_is_captured_again(tmp_path: Path) -> None:
    """While a queue passes through, svq is off its path and captures nothing of it; back
    on the shadow, its frames are captured again on the same interface."""
    path = tmp_path / "switch.pcapng"
    with svq.Session("sim:net", mode="passthrough", queue_modes={net.CTRL: "copy"}) as s:
        s.switch([net.RX, net.TX], "translate")
        assert s.start_capture(path) == ["rx0", "tx0"]
        loop(s, payloads(3))
        s.switch([net.RX, net.TX], "passthrough")
        loop(s, payloads(5))  # not seen by svq
        s.switch([net.RX, net.TX], "translate")
        loop(s, payloads(7))
        report = s.stop_capture()
    assert [(i["name"], i["packets"]) for i in report["interfaces"]] == [("rx0", 10), ("tx0", 10)]
    if TSHARK:
        assert len(tshark(path)) == 20
