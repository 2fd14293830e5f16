"""Kernel tier: tests that need a real vhost-vdpa device (the kernel's vDPA simulator).

They run inside the qemu guest started by ``tests/kernel/run``, which creates the devices
and exports their vdpa names in ``SVQ_KERNEL_NET`` (vdpasim_net, mac 52:54:00:12:34:56,
mtu 1400) and ``SVQ_KERNEL_BLK`` (vdpasim_blk), and the destinations of migrations in
``SVQ_KERNEL_NET_B`` (vdpasim_net like the first) and ``SVQ_KERNEL_BLK_B`` (vdpasim_blk on
the same RAM disk: vdpa_sim_blk is loaded with shared_backend=1). Elsewhere the fixtures
skip.
"""

import os
import pathlib
from collections.abc import Callable

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: needs the kernel's vDPA simulator (run through tests/kernel/run)"
    )


def _device(var: str) -> str:
    name = os.environ.get(var)
    if not name:
        pytest.skip(f"{var} not set: run through tests/kernel/run")
    return name


def _chardev(name: str) -> str:
    """/dev/vhost-vdpa-N of the vdpa device ``name`` (minors are reused: ask sysfs)."""
    found = sorted(pathlib.Path("/sys/bus/vdpa/devices", name).glob("vhost-vdpa-*"))
    if not found:
        raise FileNotFoundError(f"vdpa device {name} has no vhost-vdpa char device")
    return f"/dev/{found[0].name}"


@pytest.fixture
def kernel_net() -> str:
    """The vdpa name of the simulator's net device (e.g. ``vdpa0``)."""
    return _device("SVQ_KERNEL_NET")


@pytest.fixture
def kernel_blk() -> str:
    """The vdpa name of the simulator's blk device (e.g. ``vdpa1``)."""
    return _device("SVQ_KERNEL_BLK")


@pytest.fixture
def kernel_net_b() -> str:
    """A second simulator net device (e.g. ``vdpa2``), the destination of migrations."""
    return _device("SVQ_KERNEL_NET_B")


@pytest.fixture
def kernel_blk_b() -> str:
    """A second simulator blk device (e.g. ``vdpa3``) on the same RAM disk as
    ``kernel_blk``."""
    name = _device("SVQ_KERNEL_BLK_B")
    shared = pathlib.Path("/sys/module/vdpa_sim_blk/parameters/shared_backend")
    if not shared.exists() or shared.read_text().strip() != "Y":
        pytest.skip("vdpa_sim_blk is not loaded with shared_backend=1: the blk devices do not share a disk")
    return name


@pytest.fixture
def vdpa_chardev() -> Callable[[str], str]:
    """Maps a vdpa device name to its /dev/vhost-vdpa-N path."""
    return _chardev
