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


def test_requests_the_device_cannot_answer(mode: svq.Mode) -> None:
    with svq.Session("sim:blk,sectors=2048", mode=mode) as s:
        # No writable byte for the status: completed with nothing written, queue intact.
        s.driver.submit(0, [blk.header(blk.T_FLUSH)], [])
        [(_, length, _)] = s.driver.wait(0, 1)
        assert length == 0
        # A huge writable area on a FLUSH: only the status byte is written.
        length, reply = s.driver.request(0, [blk.header(blk.T_FLUSH)], 1 << 20, whole=True)
        assert length == 1 and reply[-1] == blk.S_OK and not any(reply[:-1])
        # More than size_max * seg_max in one request: IOERR.
        with pytest.raises(blk.BlockError):
            blk.Blk(s.driver).read(0, 257)
        assert blk.Blk(s.driver).get_id() == b"svq_blk_sim"


def test_a_late_completion_does_not_answer_the_next_request() -> None:
    with svq.Session("sim:blk,sectors=64") as s:
        disk = blk.Blk(s.driver)
        disk.write(0, b"A" * blk.SECTOR)
        disk.write(8, b"B" * blk.SECTOR)
        s.suspend()
        with pytest.raises(TimeoutError):
            disk.timeout = 0.2
            disk.read(0, 1)
        s.resume()
        disk.timeout = 10
        assert disk.read(8, 1) == b"B" * blk.SECTOR
