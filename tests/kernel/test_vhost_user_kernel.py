"""The vhost-user front against the kernel: a VMM (tests/vuclient.py, a Python frontend
with memfd guest memory and the stdlib-style ring driver of tests/vmguest.py) talks to
svq's vhost-user backend, which puts the rings on /dev/vhost-vdpa-N (vdpa_sim_net). Run
through tests/kernel/run; no nested qemu needed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.vmguest import VERSION_1, PyGuest
from tests.vuclient import VhostUserClient

import svq
from svq import net

pytestmark = pytest.mark.kernel


@pytest.fixture
def guest() -> Iterator[PyGuest]:
    g = PyGuest()
    g.ring(0)
    g.ring(1)
    yield g
    g.close()


def wait_until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", [svq.Mode.TRANSLATE, svq.Mode.COPY, svq.Mode.PASSTHROUGH], ids=lambda m: m.value)
def test_svq_serve_puts_a_vmm_on_the_kernel_device(kernel_net: str, vdpa_chardev, guest: PyGuest, tmp_path: Path, mode: svq.Mode) -> None:  # type: ignore[no-untyped-def]
    with svq.Device(vdpa_chardev(kernel_net)) as dev, svq.VhostUserServer(dev, tmp_path / "vu.sock", mode=mode) as server:
        server.start()
        vmm = VhostUserClient(str(server.path))
        offer = vmm.handshake(VERSION_1)
        # vdpa_sim_net offers neither EVENT_IDX nor INDIRECT_DESC: passthrough offers none.
        if mode is svq.Mode.PASSTHROUGH:
            assert not offer & ((1 << 28) | (1 << 29))
        vmm.attach(guest, VERSION_1)
        wait_until(lambda: server.report()["running"])
        for lap in range(3):
            frames = [net.frame(net.BROADCAST, bytes([lap, i]) * 50) for i in range(100)]
            assert guest.loopback(frames, timeout=20) == frames
        vmm.set_status(0)
        assert (vmm.get_vring_base(0), vmm.get_vring_base(1)) == (300, 300)
        vmm.close()
        wait_until(lambda: not server.report()["connected"])
    # The kernel device was reset and left with nothing mapped: a session opens it again.
    with svq.Session(vdpa_chardev(kernel_net)) as s:
        assert s.live_mappings() > 0
