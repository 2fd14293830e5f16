"""virtio-blk on the embedded device through the shadow virtqueue and in passthrough."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import svq
from svq import blk


@pytest.fixture
def disk(mode: svq.Mode) -> Iterator[blk.Blk]:
    with svq.Session("sim:blk,sectors=2048", mode=mode) as s:
        yield blk.Blk(s.driver)


def test_write_read_back(disk: blk.Blk) -> None:
    data = os.urandom(64 * blk.SECTOR)
    disk.write(100, data)
    disk.flush()
    assert disk.read(100, 64) == data
    assert disk.read(164, 1) == bytes(blk.SECTOR), "untouched sectors read as zeroes"


def test_last_sector_and_out_of_range(disk: blk.Blk) -> None:
    disk.write(2047, b"\xab" * blk.SECTOR)
    assert disk.read(2047, 1) == b"\xab" * blk.SECTOR
    with pytest.raises(blk.BlockError) as e:
        disk.read(2047, 2)
    assert e.value.status == blk.S_IOERR
    with pytest.raises(blk.BlockError):
        disk.write(2048, bytes(blk.SECTOR))
    # The queue stays usable after refused requests.
    assert disk.read(2047, 1) == b"\xab" * blk.SECTOR


def test_get_id(disk: blk.Blk) -> None:
    assert disk.get_id() == b"svq_blk_sim"


def test_unsupported_request_type(disk: blk.Blk) -> None:
    with pytest.raises(blk.BlockError) as e:
        disk._do([blk.header(99)], 1, "type 99")
    assert e.value.status == blk.S_UNSUPP


def test_bad_arguments(disk: blk.Blk) -> None:
    with pytest.raises(ValueError):
        disk.write(0, b"short")
    with pytest.raises(ValueError):
        disk.read(0, 0)
