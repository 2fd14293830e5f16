"""The command line: `svq demo`, `svq info`, `svq migrate`, `svq --version`."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import subprocess
import sys

import pytest

import svq
from svq.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "svq", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode, strategy", [("translate", "pool"), ("passthrough", "per-element")])
def test_demo_json(mode: str, strategy: str) -> None:
    r = run("demo", "--json", "--mode", mode, "--packets", "300", "--frame-size", "1000", "--cvq-strategy", strategy)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"] == "sim:net" and out["mode"] == mode
    assert out["packets_sent"] == out["packets_received"] == 300
    assert out["payload_mismatches"] == 0
    assert out["mac_before"] == "52:54:00:12:34:56" and out["mac_after"] == "02:5a:51:00:00:01"
    assert out["blk_verified"] is True
    assert out["elapsed_s"] > 0
    if mode == "translate":
        assert out["tx_stats"]["elements"] == 300
    cvq = out["cvq"]
    assert cvq["mode"] == "copy" and cvq["strategy"] == strategy
    assert cvq["isolated"] is True, "the embedded device puts the control queue in its own group"
    assert cvq["commands"] == cvq["acked"] == 1
    assert cvq["leaked"] == 0


def test_demo_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--packets", "50"]) == 0
    text = capsys.readouterr().out
    assert "50/50 frames" in text and "verified" in text


def test_demo_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--frame-size", "10"]) == 2
    assert "frame-size" in capsys.readouterr().err


@pytest.mark.parametrize("dev, cls", [("sim:net", "net"), ("sim:blk", "blk")])
def test_info_json(dev: str, cls: str) -> None:
    r = run("info", dev, "--json")
    assert r.returncode == 0, r.stderr
    i = json.loads(r.stdout)
    for key in ("device_id", "features", "backend_features", "num_queues", "max_queue_size", "groups",
                "address_spaces", "vq_groups", "iova_range", "config"):
        assert key in i
    assert i["class"] == cls
    assert "VERSION_1" in i["features"] and "ACCESS_PLATFORM" in i["features"]
    if cls == "net":
        assert i["vq_groups"] == [0, 0, 1] and i["address_spaces"] == 2
        assert i["config"]["mac"] == "52:54:00:12:34:56"
    else:
        assert i["config"]["capacity"] == 262144 and i["config"]["seg_max"] == 32


@pytest.mark.parametrize("dev, first, config", [
    ("sim:net", "sim:net: type network device_id 1 max_vqs 3 max_vq_size 256 groups 2 address_spaces 2",
     "  mac 52:54:00:12:34:56 link up max_vq_pairs 1 mtu 1500"),
    ("sim:blk", "sim:blk: type block device_id 2 max_vqs 1 max_vq_size 256 groups 1 address_spaces 1",
     "  capacity 262144 size_max 4096 seg_max 32 blk_size 512"),
])
def test_info_reads_like_vdpa_dev_show(dev: str, first: str, config: str) -> None:
    r = run("info", dev)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == [first, config]
    assert lines[2].startswith("  features ") and "VERSION_1" in lines[2].split()
    assert lines[3].startswith("  backend_features ") and "SUSPEND" in lines[3].split()
    assert lines[4].startswith("  vq_groups vq0:0")
    assert lines[5] == "  iova_range 0x0-0xffffffffffffffff"


def test_info_missing_device() -> None:
    r = run("info", "/dev/vhost-vdpa-99")
    assert r.returncode == 1 and "No such file" in r.stderr


def test_demo_with_a_small_queue_and_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--packets", "40", "--queue-size", "16"]) == 0
    assert "40/40 frames" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--queue-size", "100"])
    assert "not a power of two" in capsys.readouterr().err


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert svq.__version__ == importlib.metadata.version("svq")
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"svq {svq.__version__}"


def test_migrate_json() -> None:
    r = run("migrate", "--frames", "3000", "--blk-writes", "200", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ["frames_sent", "frames_received", "frames_lost", "frames_duplicated", "blk_verified", "net_state_equal",
                "switch_ms", "downtime_ms", "dirty_pages"]:
        assert key in out, key
    assert out["frames_sent"] == out["frames_received"] >= 3000, "at least the frames asked, on until the migration is over"
    assert out["frames_lost"] == out["frames_duplicated"] == 0
    assert out["blk_verified"] is True and out["net_state_equal"] is True and out["filter_verified"] is True
    assert out["net_state"]["mac"] == "02:5a:51:00:00:01" and out["net_state"]["vlans"] == [5, 7]
    assert out["switch_ms"] > 0 and out["downtime_ms"] > 0 and out["dirty_pages"] > 0


def test_migrate_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--frames", "1"]) == 2
    assert main(["migrate", "--no-blk", "--blk-from", "sim:blk"]) == 2
    assert main(["migrate", "--blk-from", "sim:blk"]) == 2
    assert main(["migrate", "--to", "sim:blk", "--no-blk"]) == 1
    assert "not a virtio-net device" in capsys.readouterr().err


def test_progress_is_drawn_for_a_terminal_and_not_for_a_pipe_or_json() -> None:
    def stderr_of(*args: str, tty: bool) -> str:
        if not tty:
            return run(*args).stderr
        leader, follower = pty.openpty()
        # Read while the command runs: a pty's buffered output goes with its last writer.
        child = subprocess.Popen([sys.executable, "-m", "svq", *args], stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        try:
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the command closed its end
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(leader)
            assert child.wait(120) == 0
        return b"".join(chunks).decode(errors="replace")

    drawn = stderr_of("demo", "--packets", "20000", tty=True)
    assert "loopback:" in drawn and "/20.0k" in drawn and "frame/s" in drawn, drawn[-300:]
    assert stderr_of("demo", "--packets", "20000", "--json", tty=True) == ""
    assert stderr_of("demo", "--packets", "20000", tty=False) == ""
    bench = stderr_of("bench", "--quick", "--only", "iova", "--only", "capture", tty=True)
    assert "svq bench" in bench and "/2" in bench and "done in" in bench, bench[-300:]
    assert stderr_of("bench", "--quick", "--only", "iova", tty=False) == ""
