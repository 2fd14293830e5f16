"""Copy mode: guest buffers linearized into bounce buffers the device reaches, with the
pool and per-element strategies, and every failure path unwound."""

from __future__ import annotations

import struct
import time

import pytest

import svq
from svq import blk, net

MAC = net.parse_mac("52:54:00:12:34:56")


@pytest.fixture(params=["pool", "per-element"])
def strategy(request: pytest.FixtureRequest) -> str:
    return request.param


def loop(s: svq.Session, frames: list[bytes], segments: int = 1, batch: int = 32) -> list[bytes]:
    got: list[bytes] = []
    for i in range(0, len(frames), batch):
        chunk = frames[i : i + batch]
        s.driver.post_receive(net.RX, len(chunk), 2048)
        s.driver.send(net.TX, chunk, segments=segments)
        got += [d for _, _, d in s.driver.wait(net.RX, len(chunk))]
        s.driver.wait(net.TX, len(chunk))
    return got


@pytest.mark.parametrize("segments", [1, 4])
def test_loopback_through_bounce_buffers(strategy: str, segments: int) -> None:
    with svq.Session("sim:net", mode=svq.Mode.COPY, copy_strategy=strategy) as s:
        frames = [net.frame(MAC, bytes([i % 256]) * (20 + i % 1400)) for i in range(300)]
        assert loop(s, frames, segments=segments) == frames
        assert svq.live_resources()["bounce_buffers"] == 0, "every buffer came back"
        # The device never sees guest memory: no mapping of it exists.
        assert all(m["guest_addr"] is None for m in s.mappings())
        maps, unmaps = s.map_counts()
        if strategy == "per-element":
            assert maps >= 2 * 300 and unmaps >= 2 * 300 - 2
        else:
            assert maps <= 2 * s.num_queues + 3, "the pool maps once"


def test_blk_in_copy_mode(strategy: str) -> None:
    with svq.Session("sim:blk,sectors=4096", mode=svq.Mode.COPY, copy_strategy=strategy) as s:
        disk = blk.Blk(s.driver)
        data = bytes(range(256)) * 32
        disk.write(7, data)
        assert disk.read(7, 16) == data
        with pytest.raises(blk.BlockError):
            disk.read(4095, 2)


def test_shadow_slot_accounting_with_injected_commands() -> None:
    with svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY}, queue_size=8) as s:
        s.suspend()
        # Sixteen two-sided commands need 32 shadow descriptors: at most 4 fit at a time.
        cmds = [(net.mac_addr_set(MAC), 1)] * 16
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(s.inject_many, net.CTRL, cmds, 10.0)
            deadline = time.monotonic() + 5
            while s.stats(net.CTRL)["elements"] < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            st = s.stats(net.CTRL)
            assert st["elements"] == 4, "8 slots hold 4 two-descriptor elements"
            assert st["held"] >= 1
            s.resume()
            assert [ack for _, ack in fut.result()] == [bytes([net.ACK_OK])] * 16


def desc_addr(s: svq.Session, queue: int, head: int) -> int:
    ring = s.driver.ring(queue)
    addr, = struct.unpack("<Q", s.driver.read_memory(ring["desc"] + 16 * head, 8))
    return addr


@pytest.mark.parametrize("mode, wins", [(svq.Mode.COPY, "first"), (svq.Mode.TRANSLATE, "second")])
def test_guest_cannot_change_a_command_after_it_was_copied(mode: svq.Mode, wins: str) -> None:
    """TOCTOU: the guest rewrites its command after svq forwarded it but before the device
    read it. In copy mode the device sees what svq copied; in translate mode (zero copy)
    it would see the rewrite, which is why the control queue uses copy mode."""
    first, second = net.parse_mac("02:00:00:00:00:01"), net.parse_mac("02:00:00:00:00:02")
    with svq.Session("sim:net", queue_modes={net.CTRL: mode}) as s:
        s.suspend()
        head = s.driver.submit(net.CTRL, [net.mac_addr_set(first)], [1])
        deadline = time.monotonic() + 5
        while s.stats(net.CTRL)["elements"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert s.stats(net.CTRL)["elements"] == 1
        s.driver.write_memory(desc_addr(s, net.CTRL, head), net.mac_addr_set(second))
        s.resume()
        assert s.driver.wait(net.CTRL, 1)[0][2] == bytes([net.ACK_OK])
        want = first if wins == "first" else second
        assert s.device.info()["config"]["mac"] == net.format_mac(want)


@pytest.mark.parametrize("n", [1, 2])
def test_per_element_map_failure_unwinds(n: int) -> None:
    """Per-element copy maps twice per command (out, then in buffer). Failing the first
    or the second map completes the command unsent (length 0, so the guest sees no OK),
    unmaps and frees what the command had taken, and the queue keeps working."""
    with svq.Device("sim:net") as dev, svq.Session(
        dev, queue_modes={net.CTRL: svq.Mode.COPY}, copy_strategy="per-element"
    ) as s:
        base_maps = s.live_mappings()
        dev.fail_map_at(n)
        length, _ = s.driver.request(net.CTRL, [net.mac_addr_set(MAC)], 1)
        assert length == 0, "completed unsent"
        assert dev.maps_sent() == n, "the failing map was the n-th"
        assert s.stats(net.CTRL)["map_failures"] == 1
        assert svq.live_resources()["bounce_buffers"] == 0
        assert s.live_mappings() == base_maps == dev.live_mappings()
        assert s.device.sim_stats()["ctrl_commands"] == 0, "the device never saw it"
        assert s.driver.request(net.CTRL, [net.mac_addr_set(MAC)], 1) == (1, bytes([net.ACK_OK]))


def test_pool_grows_when_exhausted_and_survives_a_failed_growth() -> None:
    with svq.Device("sim:net") as dev, svq.Session(dev, mode=svq.Mode.COPY) as s:
        before = s.live_mappings()
        # 65 buffers of 2048 B in RX (one page each) overflow the first 64-page chunk.
        s.driver.post_receive(net.RX, 65, 2048)
        deadline = time.monotonic() + 5
        while s.stats(net.RX)["elements"] < 65 and time.monotonic() < deadline:
            time.sleep(0.01)
        grown = s.live_mappings()
        assert grown > before
        dev.fail_map_at(1)
        s.driver.post_receive(net.RX, 100, 2048)
        deadline = time.monotonic() + 5
        while s.stats(net.RX)["map_failures"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.stats(net.RX)["map_failures"] == 1, "one buffer failed; the next growth worked"
        # The failed element came back to the guest unsent (length 0).
        [(_, length, _)] = s.driver.wait(net.RX, 1)
        assert length == 0
        assert s.live_mappings() == dev.live_mappings() == grown + 1


@pytest.mark.parametrize("n", range(1, 12))
def test_start_failures_unwind(n: int) -> None:
    """The n-th map of a session's start fails: start raises the device's error and
    leaves nothing behind, for every n up to the last map of a start."""
    with svq.Device("sim:net") as dev:
        dev.fail_map_at(n)
        try:
            with svq.Session(dev, mode=svq.Mode.COPY):
                started = True
        except OSError as e:
            started = False
            assert "injected failure" in str(e)
        assert dev.live_mappings() == 0
        assert svq.live_resources()["bounce_buffers"] == 0
        # Starts that map fewer than n times succeed; the failure is never swallowed.
        assert started == (dev.maps_sent() < n)


def test_stop_with_elements_in_flight_returns_them_and_leaks_nothing() -> None:
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev, mode=svq.Mode.COPY, copy_strategy="per-element")
        s.suspend()
        s.driver.post_receive(net.RX, 16, 2048)
        s.driver.send(net.TX, [net.frame(MAC, b"x" * 100)] * 8)
        deadline = time.monotonic() + 5
        # The engine takes the two queues in its own order: wait for both.
        while time.monotonic() < deadline and (s.stats(net.RX)["elements"] < 16 or s.stats(net.TX)["elements"] < 8):
            time.sleep(0.01)
        assert svq.live_resources()["bounce_buffers"] == 16 + 8
        s.close()
        assert svq.live_resources()["bounce_buffers"] == 0
        assert dev.live_mappings() == 0
