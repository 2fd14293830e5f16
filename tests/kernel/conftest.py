"""Kernel tier: tests that need a real vhost-vdpa device (the kernel's vDPA simulator).

They run inside the qemu guest started by ``tests/kernel/run``, which creates the devices
and exports their vdpa names in ``SVQ_KERNEL_NET`` (vdpasim_net, mac 52:54:00:12:34:56,
mtu 1400) and ``SVQ_KERNEL_BLK`` (vdpasim_blk). Elsewhere the fixtures skip.
"""

import os
import pathlib

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "kernel: needs the kernel's vDPA simulator (run through tests/kernel/run)"
    )


def _device(var):
    name = os.environ.get(var)
    if not name:
        pytest.skip(f"{var} not set: run through tests/kernel/run")
    return name


def _chardev(name):
    """/dev/vhost-vdpa-N of the vdpa device ``name`` (minors are reused: ask sysfs)."""
    found = sorted(pathlib.Path("/sys/bus/vdpa/devices", name).glob("vhost-vdpa-*"))
    if not found:
        raise FileNotFoundError(f"vdpa device {name} has no vhost-vdpa char device")
    return f"/dev/{found[0].name}"


@pytest.fixture
def kernel_net():
    """The vdpa name of the simulator's net device (e.g. ``vdpa0``)."""
    return _device("SVQ_KERNEL_NET")


@pytest.fixture
def kernel_blk():
    """The vdpa name of the simulator's blk device (e.g. ``vdpa1``)."""
    return _device("SVQ_KERNEL_BLK")


@pytest.fixture
def vdpa_chardev():
    """Maps a vdpa device name to its /dev/vhost-vdpa-N path."""
    return _chardev
