"""svq as a VMM's vhost-user backend, driven by a VMM written in Python (tests/vuclient.py)
over the real socket: the whole start-stop cycle qemu runs, traffic through the shadow in
every mode, ring positions handed over, reconnects, and hostile VMMs."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import svq
from svq import net
from tests.vmguest import VERSION_1, PyGuest
from tests.vuclient import (
    GET_FEATURES,
    LOG_ALL,
    P_MQ,
    P_REPLY_ACK,
    SET_VRING_CALL,
    SET_VRING_KICK,
    SET_VRING_NUM,
    VA_OFFSET,
    Closed,
    VhostUserClient,
)


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[svq.VhostUserServer]:
    mode = getattr(request, "param", svq.Mode.TRANSLATE)
    with svq.VhostUserServer("sim:net", tmp_path / "vu.sock", mode=mode) as s:
        s.start()
        yield s
    assert not (tmp_path / "vu.sock").exists(), "closing removes the socket"


@pytest.fixture
def guest() -> Iterator[PyGuest]:
    g = PyGuest()
    g.ring(0)
    g.ring(1)
    yield g
    g.close()


def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def loopback(g: PyGuest, n: int, tag: int) -> None:
    frames = [net.frame(net.BROADCAST, bytes([tag, i % 256]) * 40) for i in range(n)]
    assert g.loopback(frames) == frames


@pytest.mark.parametrize("server", [svq.Mode.TRANSLATE, svq.Mode.COPY, svq.Mode.PASSTHROUGH], indirect=True, ids=lambda m: m.value)
@pytest.mark.parametrize("with_status", [True, False], ids=["status", "kick-started"])
def test_a_vmm_runs_traffic_through_the_backend(server: svq.VhostUserServer, guest: PyGuest, with_status: bool) -> None:
    vmm = VhostUserClient(str(server.path))
    protocol = P_REPLY_ACK | P_MQ | (1 << 16 if with_status else 0)
    offer = vmm.handshake(VERSION_1, protocol)
    assert offer & VERSION_1 and not offer & (1 << 33), "ACCESS_PLATFORM is svq's business, not the guest's"
    assert not offer & (1 << 17), "the VMM emulates the control queue"
    vmm.attach(guest, VERSION_1, status=with_status)
    if with_status:
        assert vmm.get_status() == 0xF
    wait_until(lambda: server.report()["running"])
    for tag in range(3):
        loopback(guest, 100, tag)
    r = server.report()
    assert r["connected"] and [q["index"] for q in r["queues"]] == [0, 1]
    if server.mode is not svq.Mode.PASSTHROUGH:
        assert r["queues"][1]["completed"] == 300
    # The VMM stops the device: each ring's position comes back.
    if with_status:
        vmm.set_status(0)
    assert (vmm.get_vring_base(0), vmm.get_vring_base(1)) == (300, 300)
    assert not server.report()["running"]
    vmm.close()
    wait_until(lambda: not server.report()["connected"])


def test_a_new_connection_continues_from_the_handed_over_positions(server: svq.VhostUserServer, guest: PyGuest) -> None:
    vmm = VhostUserClient(str(server.path))
    vmm.handshake(VERSION_1)
    vmm.attach(guest, VERSION_1)
    wait_until(lambda: server.report()["running"])
    loopback(guest, 70, 1)
    # Receive buffers the device never took are given back to the guest ring.
    rx = guest.rings[0]
    for _ in range(30):
        rx.add([], [2048])
    rx.publish()
    time.sleep(0.1)
    vmm.set_status(0)
    bases = (vmm.get_vring_base(0), vmm.get_vring_base(1))
    assert bases == (70, 70)
    vmm.close()
    # The VMM restarts (a reconnect, or a migration's destination): same rings, saved bases.
    for r, base in zip(guest.rings, bases, strict=True):
        r.base = base
    vmm = VhostUserClient(str(server.path))
    vmm.handshake(VERSION_1)
    vmm.attach(guest, VERSION_1)
    wait_until(lambda: server.report()["running"])
    # The 30 buffers given back are popped again: 30 frames land in them, then 10 more.
    frames = [net.frame(net.BROADCAST, bytes([9, i]) * 30) for i in range(40)]
    for _ in range(10):
        rx.add([], [2048])
    rx.publish()
    tx = guest.rings[1]
    for f in frames:
        tx.add([f], [])
    tx.publish()
    assert [d for _, _, d in rx.reap(40)] == frames
    tx.reap(40)
    assert server.report()["sessions_started"] == 2
    vmm.close()


def refused_or_closed(vmm: VhostUserClient, do) -> None:  # type: ignore[no-untyped-def]
    """A hostile request gets an error ack or the connection is closed."""
    try:
        do()
    except (RuntimeError, Closed, BrokenPipeError, ConnectionResetError):
        return
    raise AssertionError("the request was accepted")


HOSTILE = {
    "ring_size_not_power_of_two": lambda vmm, g: vmm.set_vring_num(0, 100),
    "ring_size_too_large": lambda vmm, g: vmm.set_vring_num(0, 65536),
    "queue_index_out_of_range": lambda vmm, g: vmm.set_vring_num(7, 256),
    "ring_addresses_before_the_memory_table": lambda vmm, g: vmm.set_vring_addr(0, g.rings[0].desc + VA_OFFSET,
                                                                                g.rings[0].used + VA_OFFSET, g.rings[0].avail + VA_OFFSET),
    "ring_outside_memory": lambda vmm, g: (vmm.set_mem_table([(g.gpa, g.size, g.gpa + VA_OFFSET, 0, g.fd)]),
                                           vmm.set_vring_addr(0, 0x10, 0x2000, 0x3000)),
    "kick_is_not_an_eventfd": lambda vmm, g: vmm.set_vring_fd(SET_VRING_KICK, 0, g.fd),
    "kick_without_an_fd": lambda vmm, g: vmm.send(SET_VRING_KICK, struct.pack("<Q", 0)) or vmm.u64(GET_FEATURES),
    "extra_fd": lambda vmm, g: vmm.send(SET_VRING_NUM, struct.pack("<II", 0, 256), [g.rings[0].kick]) or vmm.u64(GET_FEATURES),
    "wrong_payload_size": lambda vmm, g: vmm.send(SET_VRING_NUM, struct.pack("<I", 0), flags=0x9) or vmm.recv_reply(SET_VRING_NUM),
    "unknown_request": lambda vmm, g: vmm.send(99, b"x" * 8) or vmm.u64(GET_FEATURES),
    "features_not_offered": lambda vmm, g: vmm.request(2, struct.pack("<Q", 1 << 60)),
    "overlapping_regions": lambda vmm, g: vmm.set_mem_table([(0, 1 << 20, VA_OFFSET, 0, g.fd), (1 << 20, 1 << 20, VA_OFFSET, 0, g.fd)]),
    "zero_size_region": lambda vmm, g: vmm.set_mem_table([(0, 0, VA_OFFSET, 0, g.fd)]),
    "region_past_the_file": lambda vmm, g: vmm.set_mem_table([(0, 1 << 30, VA_OFFSET, 0, g.fd)]),
    "region_fd_missing": lambda vmm, g: vmm.send(5, struct.pack("<IIQQQQ", 1, 0, 0, 4096, VA_OFFSET, 0)) or vmm.u64(GET_FEATURES),
    "get_vring_base_out_of_range": lambda vmm, g: vmm.get_vring_base(9),
    "second_mem_table_while_running": lambda vmm, g: (vmm.attach(g, VERSION_1), wait_until(lambda: g.server.report()["running"]),
                                                      vmm.set_mem_table([(g.gpa, g.size, g.gpa + VA_OFFSET, 0, g.fd)])),
    "call_fd_not_an_eventfd": lambda vmm, g: vmm.set_vring_fd(SET_VRING_CALL, 0, os.open("/dev/null", os.O_RDONLY)),
    "region_file_free_to_shrink": lambda vmm, g: vmm.set_mem_table([(g.gpa, 1 << 20, g.gpa + VA_OFFSET, 0, unsealable(1 << 20))]),
}


def unsealable(size: int) -> int:
    """A memfd that refuses seals: it could shrink under svq (SIGBUS on access)."""
    fd = os.memfd_create("no-seals")
    os.ftruncate(fd, size)
    return fd


@pytest.mark.hostile
@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_vmm_is_refused_and_the_next_one_is_served(server: svq.VhostUserServer, guest: PyGuest, case: str) -> None:
    vmm = VhostUserClient(str(server.path), timeout=2)
    vmm.handshake(VERSION_1)
    guest.server = server  # type: ignore[attr-defined]
    refused_or_closed(vmm, lambda: HOSTILE[case](vmm, guest))
    vmm.close()
    wait_until(lambda: not server.report()["connected"])
    assert any("refused" in e or "closed" in e for e in server.report()["events"])
    # The next VMM is served normally.
    vmm = VhostUserClient(str(server.path))
    vmm.handshake(VERSION_1)
    vmm.attach(guest, VERSION_1)
    wait_until(lambda: server.report()["running"])
    loopback(guest, 10, 7)
    vmm.close()
    wait_until(lambda: not server.report()["running"])


@pytest.mark.hostile
def test_a_vmm_hanging_up_mid_message_leaves_nothing_behind(server: svq.VhostUserServer, guest: PyGuest) -> None:
    vmm = VhostUserClient(str(server.path))
    vmm.handshake(VERSION_1)
    vmm.attach(guest, VERSION_1)
    wait_until(lambda: server.report()["running"])
    vmm.sock.sendall(struct.pack("<III", 8, 1, 8) + b"\x00\x00")  # header, then half a payload
    vmm.close()
    wait_until(lambda: not server.report()["connected"] and not server.report()["running"])
    assert server.device.live_mappings() == 0


@pytest.mark.hostile
def test_a_value_refused_is_not_kept(server: svq.VhostUserServer, guest: PyGuest) -> None:
    vmm = VhostUserClient(str(server.path))
    vmm.handshake(VERSION_1)
    refused_or_closed(vmm, lambda: vmm.set_vring_num(0, 100))
    # The VMM goes on as if nothing happened: the refused size must not be used.
    vmm.attach(guest, VERSION_1)
    wait_until(lambda: server.report()["running"])
    loopback(guest, 20, 3)
    vmm.close()


def test_a_server_stops_cleanly_with_a_vmm_connected(tmp_path: Path, guest: PyGuest) -> None:
    with svq.Device("sim:net") as dev:
        server = svq.VhostUserServer(dev, tmp_path / "s.sock")
        server.start()
        vmm = VhostUserClient(str(server.path))
        vmm.handshake(VERSION_1)
        vmm.attach(guest, VERSION_1)
        wait_until(lambda: server.report()["running"])
        t0 = time.monotonic()
        server.close()
        assert time.monotonic() - t0 < 2
        assert dev.live_mappings() == 0 and dev.status() == 0
        assert not (tmp_path / "s.sock").exists()
        vmm.close()


@pytest.mark.hostile
def test_a_vmm_cannot_shrink_guest_memory_under_svq(server: svq.VhostUserServer, guest: PyGuest) -> None:
    vmm = VhostUserClient(str(server.path))
    vmm.handshake(VERSION_1)
    vmm.attach(guest, VERSION_1)
    wait_until(lambda: server.report()["running"])
    # svq sealed the memfd at SET_MEM_TABLE: a shrink that would turn svq's and the
    # device's accesses into SIGBUS is refused by the kernel.
    with pytest.raises(OSError) as e:
        os.ftruncate(guest.fd, 4096)
    assert e.value.errno == errno.EPERM
    loopback(guest, 20, 5)
    vmm.close()


def log_pages(fd: int, size: int) -> set[int]:
    bitmap = os.pread(fd, size, 0)
    return {i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1}


@pytest.mark.parametrize("cancel", [False, True], ids=["migrate", "cancel"])
def test_a_migrating_vmm_gets_every_written_page_logged(tmp_path: Path, guest: PyGuest, cancel: bool) -> None:
    """The VMM's live-migration sequence on a passthrough source: svq switches the rings
    to the shadow when LOG_ALL comes, logs every page the device writes into the VMM's
    bitmap, and hands the positions over; or, when the migration is cancelled, goes back
    to passthrough and keeps running."""
    with svq.VhostUserServer("sim:net", tmp_path / "src.sock", mode=svq.Mode.PASSTHROUGH) as src:
        src.start()
        vmm = VhostUserClient(str(src.path))
        offer = vmm.handshake(VERSION_1)
        assert offer & LOG_ALL, "svq offers VHOST_F_LOG_ALL"
        vmm.attach(guest, VERSION_1)
        wait_until(lambda: src.report()["running"])
        loopback(guest, 50, 1)
        assert [q["mode"] for q in src.report()["queues"]] == ["passthrough", "passthrough"]
        # Migration starts: the VMM shares its log and asks for every write to be logged.
        log_size = (guest.gpa + guest.size) // 4096 // 8
        log_fd = os.memfd_create("vhost-log", os.MFD_ALLOW_SEALING)
        os.ftruncate(log_fd, log_size)
        vmm.set_log_base(log_fd, log_size)
        vmm.request(2, struct.pack("<Q", VERSION_1 | (1 << 30) | LOG_ALL))
        assert [q["mode"] for q in src.report()["queues"]] == ["translate", "translate"]
        loopback(guest, 50, 2)
        pages = log_pages(log_fd, log_size)
        rx, tx = guest.rings
        assert rx.used // 4096 in pages and tx.used // 4096 in pages, "both used rings are logged"
        assert len(pages) > 2, "and the pages the received frames landed in"
        if cancel:
            vmm.request(2, struct.pack("<Q", VERSION_1 | (1 << 30)))
            assert [q["mode"] for q in src.report()["queues"]] == ["passthrough", "passthrough"]
            loopback(guest, 50, 3)
            vmm.close()
            os.close(log_fd)
            return
        vmm.set_status(0)
        bases = (vmm.get_vring_base(0), vmm.get_vring_base(1))
        assert bases == (100, 100)
        vmm.close()
        os.close(log_fd)
    # The destination: another backend on another device, the rings from where they stand.
    for r, base in zip(guest.rings, bases, strict=True):
        r.base = base
    with svq.VhostUserServer("sim:net", tmp_path / "dst.sock", mode=svq.Mode.PASSTHROUGH) as dst:
        dst.start()
        vmm = VhostUserClient(str(dst.path))
        vmm.handshake(VERSION_1)
        vmm.attach(guest, VERSION_1)
        wait_until(lambda: dst.report()["running"])
        loopback(guest, 50, 4)
        vmm.close()


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (Debian package tshark)")
def test_a_capture_spans_the_vmm_sessions(server: svq.VhostUserServer, guest: PyGuest, tmp_path: Path) -> None:
    """Started before any VMM connects, the capture records each session's frames on the
    same interfaces, and stop_capture completes the file while the VMM is connected."""
    path = tmp_path / "serve.pcapng"
    server.start_capture(path, snaplen=64)
    for tag in range(2):
        vmm = VhostUserClient(str(server.path))
        vmm.handshake(VERSION_1, P_REPLY_ACK | P_MQ | (1 << 16))
        # The second VMM continues from where the first one's rings stood.
        for r in guest.rings:
            r.base = 50 * tag
        vmm.attach(guest, VERSION_1)
        wait_until(lambda: server.report()["running"])
        loopback(guest, 50, tag)
        if tag == 0:
            vmm.set_status(0)
            vmm.close()
            wait_until(lambda: not server.report()["connected"])
    report = server.stop_capture()
    # A second capture on the same running session takes the frames from then on.
    again = tmp_path / "again.pcapng"
    server.start_capture(again)
    loopback(guest, 10, 7)
    second = server.stop_capture()
    vmm.close()
    assert second is not None and [i["packets"] for i in second["interfaces"]] == [10, 10]
    assert report is not None and report["finished"] and report["dropped"] == 0
    assert [(i["name"], i["packets"]) for i in report["interfaces"]] == [("rx0", 100), ("tx0", 100)]
    r = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name", "-e", "frame.cap_len"],
                       capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert len(rows) == 200 and {cap for _, cap in rows} == {"64"}
    assert server.report()["capture"] == second
