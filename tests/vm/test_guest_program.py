"""The guest program (tests/vm/guest/traffic.py) on its own, without a VM: its stream
checks against crafted frames, and both programs end to end on the loopback interface of
a fresh network namespace on the host (``unshare -n``; skipped where that is not allowed).
A few seconds; they make a failure in the VM tests point at the backend, not at the
program."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import vmlib

sys.path.insert(0, str(vmlib.GUEST_PROGRAM.parent))
import traffic

pytestmark = pytest.mark.vm

OWN = bytes.fromhex("525400123456")


@pytest.fixture
def frames() -> list[bytes]:
    return traffic.build_frames(100, "mix", OWN, OWN)


def test_frames_are_well_formed(frames: list[bytes]) -> None:
    assert [len(f) for f in frames[:4]] == [60, 449, 838, 1227]
    assert all(60 <= len(f) <= 1514 for f in frames)
    assert all(f[12:14] == b"\x88\xb5" for f in frames)
    assert len({f[28:] for f in frames}) == len(frames)  # payloads differ


def test_check_counts_each_kind_of_damage(frames: list[bytes]) -> None:
    c = traffic.StreamCheck(frames)
    for f in frames[:10]:
        assert c.arrive(f)
    flipped = bytearray(frames[10])
    flipped[-1] ^= 0x01
    assert c.arrive(bytes(flipped))                      # payload bit flip
    assert c.arrive(frames[11][:-1])                     # one byte short
    assert c.arrive(frames[5])                           # again
    assert c.arrive(frames[13])
    assert c.arrive(frames[12])                          # before 13: late
    assert c.arrive(b"\xff" * 6 + frames[14][6:])        # other destination MAC, intact
    assert not c.arrive(b"\x00" * 60)                    # not ours
    assert c.report() == {"received": 13, "missing": 87, "bad_checksum": 1, "bad_length": 1,
                          "mismatch": 1, "out_of_order": 1, "duplicates": 1, "foreign": 1}


def _in_netns(*args: str) -> dict:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this host")
    p = subprocess.run(["unshare", "-n", sys.executable, "-S", str(vmlib.GUEST_PROGRAM),
                        "--mac", "00:00:00:00:00:00", *args],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0 and "unshare" in p.stderr and "Operation not permitted" in p.stderr:
        pytest.skip(f"cannot make a network namespace here: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_stream_on_loopback() -> None:
    """lo sends every frame back unchanged: the perfect backend."""
    r = _in_netns("stream", "--frames", "3000", "--window", "64")
    assert (r["sent"], r["received"], r["missing"]) == (3000, 3000, 0), r
    assert r["bad_checksum"] == r["bad_length"] == r["out_of_order"] == r["duplicates"] == 0, r
    assert r["mismatch"] == 0 and r["outgoing_seen"] == 0 and r["stopped"] is None, r


def test_ping_on_loopback() -> None:
    r = _in_netns("ping", "--target", "10.0.0.1", "--count", "5", "--interval", "0.01")
    assert r["sent"] == r["received"] == 5, r
    assert r["rtt_ms"]["min"] <= r["rtt_ms"]["avg"] <= r["rtt_ms"]["max"], r
