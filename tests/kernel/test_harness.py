"""Checks that the kernel tier's guest is what the other kernel tests expect."""

import fcntl
import os
import pathlib
import stat
import struct

import pytest

pytestmark = pytest.mark.kernel

# _IOR(VHOST_VIRTIO=0xAF, 0x70, u32)
VHOST_VDPA_GET_DEVICE_ID = (2 << 30) | (4 << 16) | (0xAF << 8) | 0x70


def _check(chardev, name, want_id):
    drv = pathlib.Path("/sys/bus/vdpa/devices", name, "driver").resolve().name
    assert drv == "vhost_vdpa", f"{name} is bound to {drv}"
    path = chardev(name)
    assert stat.S_ISCHR(os.stat(path).st_mode), path
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, VHOST_VDPA_GET_DEVICE_ID, buf, True)
        assert struct.unpack("I", buf)[0] == want_id
    finally:
        os.close(fd)


def test_net_device_is_vhost_vdpa(kernel_net, vdpa_chardev):
    _check(vdpa_chardev, kernel_net, 1)


def test_blk_device_is_vhost_vdpa(kernel_blk, vdpa_chardev):
    _check(vdpa_chardev, kernel_blk, 2)
