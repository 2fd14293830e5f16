"""asyncio: completions and injected commands awaited on an event loop that watches svq's
eventfds (no thread per waiter, no polling), timeouts and closes like the blocking calls,
cancellation that loses nothing, and ``async with`` for sessions and servers. Every test
also checks that the loop's readers, svq's eventfds and the process's threads are back
where they were."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

import svq
from svq import net
from tests.vuclient import GET_FEATURES, VhostUserClient

T = TypeVar("T")
OK = bytes([net.ACK_OK])


def readers() -> int:
    """File descriptors the running loop watches (its own wake-up pipe included)."""
    loop = asyncio.get_running_loop()
    return len(loop._selector.get_map())  # type: ignore[attr-defined]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, checking that no thread or descriptor outlives the loop."""
    threads, fds = threading.active_count(), open_fds()
    result = asyncio.run(coro)
    assert threading.active_count() == threads, threading.enumerate()
    assert open_fds() == fds
    return result


def frames(tag: bytes, n: int) -> list[bytes]:
    return [net.frame(net.BROADCAST, tag + i.to_bytes(4, "big")) for i in range(n)]


def payload(data: bytes) -> bytes:
    return data[-8:]


def test_many_completions_awaited_concurrently_on_rx_and_tx(mode: svq.Mode) -> None:
    """Several waiters on RX (each more than its share of the ring, so what one reaps
    frees descriptors for the sender) and the sender's waits on TX, from one loop: every
    frame arrives once, and the RX waiters take their turns in order."""
    n, chunk, waiters = 1200, 50, 4
    sent = frames(b"cc", n)

    async def main() -> None:
        base = readers()
        async with svq.Session("sim:net", mode=mode) as s:
            d = s.driver

            async def sender() -> int:
                tx = 0
                for i in range(0, n, chunk):
                    d.post_receive(net.RX, chunk, 2048)
                    d.send(net.TX, sent[i : i + chunk])
                    tx += len(await d.wait_async(net.TX, chunk, timeout=10))
                return tx

            rx = [asyncio.create_task(d.wait_async(net.RX, n // waiters, timeout=20)) for _ in range(waiters)]
            tx = await sender()
            got = [c for t in rx for c in await t]
            assert tx == n
            assert [payload(data) for _, _, data in got] == [payload(f) for f in sent]
            assert readers() == base
            assert d.in_flight(net.RX) == 0 and d.in_flight(net.TX) == 0
        assert readers() == base

    run(main())


def test_a_timeout_carries_the_partial_completions_without_burning_a_cpu() -> None:
    async def main() -> None:
        base = readers()
        async with svq.Session("sim:net") as s:
            d = s.driver
            d.post_receive(net.RX, 4, 2048)
            d.send(net.TX, frames(b"to", 3))
            t0, c0 = time.monotonic(), time.process_time()
            with pytest.raises(TimeoutError, match="3 of 4 completions") as e:
                await d.wait_async(net.RX, 4, timeout=0.4)
            assert 0.35 < time.monotonic() - t0 < 3
            assert time.process_time() - c0 < 0.2, "the waiter slept"
            assert [payload(data) for _, _, data in e.value.completions] == [payload(f) for f in frames(b"to", 3)]
            assert readers() == base
            # They were handed out once: the fourth frame is all the next wait sees.
            d.send(net.TX, frames(b"t4", 1))
            [(_, _, data)] = await d.wait_async(net.RX, 1)
            assert payload(data) == payload(frames(b"t4", 1)[0])
            # A timeout of 0 only looks.
            with pytest.raises(TimeoutError) as e:
                await d.wait_async(net.RX, 1, timeout=0)
            assert e.value.completions == []
            assert len(await d.wait_async(net.TX, 4, timeout=0)) == 4
            with pytest.raises(ValueError, match="timeout"):
                await d.wait_async(net.RX, 1, timeout=-1)
            with pytest.raises(ValueError, match="out of range"):
                await d.wait_async(net.RX, -1)
            assert readers() == base

    run(main())


@pytest.mark.parametrize("closer", ["task", "thread"])
def test_closing_the_session_wakes_the_waiters(closer: str) -> None:
    async def main() -> None:
        base = readers()
        s = svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY})
        s.driver.post_receive(net.RX, 2, 2048)
        s.suspend()  # the injected command waits too
        waits = [asyncio.create_task(s.driver.wait_async(net.RX, 1, timeout=30)) for _ in range(2)]
        inject = asyncio.create_task(s.inject_async(net.CTRL, net.vlan_add(3), 1, timeout=30))
        await asyncio.sleep(0.2)
        assert readers() == base + 2, "one reader for the RX waiter whose turn it is, one for the batch"
        t0 = time.monotonic()
        other = threading.Thread(target=s.close)
        if closer == "task":
            await asyncio.create_task(s.aclose())
        else:
            other.start()
        for w in waits:
            with pytest.raises(svq.SessionClosedError) as e:
                await w
            assert e.value.completions == []
        with pytest.raises(svq.SessionClosedError):
            await inject
        assert time.monotonic() - t0 < 2
        assert readers() == base
        if other.is_alive():
            other.join()
        with pytest.raises(svq.SessionClosedError):
            await s.driver.wait_async(net.RX, 1)
        with pytest.raises(svq.SessionClosedError):
            await s.inject_async(net.CTRL, net.vlan_add(3), 1)
        await s.aclose()  # idempotent

    run(main())


def test_a_broken_queue_raises_its_fault() -> None:
    async def main() -> None:
        base = readers()
        with svq.Device("sim:net") as dev:
            async with svq.Session(dev) as s:
                s.driver.post_receive(net.RX, 1, 2048)
                s.driver.send(net.TX, frames(b"ok", 1))
                assert len(await s.driver.wait_async(net.RX, 1)) == 1
                dev.misbehave(net.RX, "len_too_large")
                s.driver.post_receive(net.RX, 1, 2048)
                waiter = asyncio.create_task(s.driver.wait_async(net.RX, 1, timeout=10))
                await asyncio.sleep(0.1)
                s.driver.send(net.TX, frames(b"no", 1))
                with pytest.raises(svq.DeviceProtocolError) as e:
                    await waiter
                assert e.value.rule == "used_len_exceeds_writable" and e.value.queue == net.RX
                assert e.value.completions == []
            dev.misbehave(net.RX, None)
        assert readers() == base

    run(main())


@pytest.mark.parametrize("then", ["async", "blocking", "whole"])
def test_a_cancelled_wait_loses_no_completion(then: str) -> None:
    """The waiter reaped 20 of 64 when it is cancelled: the next wait (awaited, blocking,
    or reading every writable byte) gets all 64, each once, in order."""
    sent = frames(b"cx", 64)

    async def main() -> None:
        base = readers()
        async with svq.Session("sim:net") as s:
            d = s.driver
            rings = d.live_buffers()
            d.post_receive(net.RX, 64, 2048)
            waiter = asyncio.create_task(d.wait_async(net.RX, 64, timeout=30))
            await asyncio.sleep(0.05)
            d.send(net.TX, sent[:20])
            deadline = time.monotonic() + 5
            while d.in_flight(net.RX) > 44:  # the waiter took them off the ring
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert not waiter.done()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert readers() == base
            d.send(net.TX, sent[20:])
            if then == "async":
                got = await d.wait_async(net.RX, 64)
            elif then == "blocking":
                got = d.wait(net.RX, 64)
            else:
                got = await d.wait_async(net.RX, 64, whole=True)
                assert {len(data) for _, _, data in got} == {2048}
            assert [payload(data[: length]) for _, length, data in got] == [payload(f) for f in sent]
            assert len({head for head, _, _ in got}) == 64
            with pytest.raises(TimeoutError) as e:
                await d.wait_async(net.RX, 1, timeout=0.05)
            assert e.value.completions == []
            assert len(d.wait(net.TX, 64)) == 64
            assert d.live_buffers() == rings, "every buffer went back"
        assert readers() == base

    run(main())


def test_waiters_on_one_queue_take_turns() -> None:
    async def main() -> None:
        async with svq.Session("sim:net") as s:
            d = s.driver
            d.post_receive(net.RX, 3, 2048)
            first = asyncio.create_task(d.wait_async(net.RX, 2, timeout=10))
            await asyncio.sleep(0.05)
            with pytest.raises(TimeoutError, match="another waiter") as e:
                await d.wait_async(net.RX, 1, timeout=0.1)
            assert e.value.completions == []
            second = asyncio.create_task(d.wait_async(net.RX, 1, timeout=10))
            d.send(net.TX, frames(b"tt", 3))
            a, b = await first, await second
            assert [payload(x[2]) for x in a + b] == [payload(f) for f in frames(b"tt", 3)]
            assert len(await d.wait_async(net.TX, 3)) == 3

    run(main())


def test_inject_async_on_the_control_queue() -> None:
    async def main() -> None:
        base = readers()
        eventfds = svq.live_resources()["eventfds"]
        # Data queues in passthrough: only the control queue is shadowed.
        async with svq.Session("sim:net", mode="passthrough", queue_modes={net.CTRL: "copy"}) as s:
            assert await s.inject_async(net.CTRL, net.vlan_add(3), 1) == (1, OK)
            batch = await s.inject_many_async(net.CTRL, [(net.vlan_add(v), 1) for v in range(10, 18)])
            assert batch == [(1, OK)] * 8
            # Many batches and single commands in flight together, from one loop.
            many = await asyncio.gather(*(s.inject_async(net.CTRL, net.vlan_add(100 + v), 1) for v in range(16)),
                                        s.inject_many_async(net.CTRL, [(net.vlan_add(200 + v), 1) for v in range(4)]))
            assert many[:16] == [(1, OK)] * 16 and many[16] == [(1, OK)] * 4
            state = s.net_state()
            assert state is not None
            assert state["vlans"] == sorted([3, *range(10, 18), *range(100, 116), *range(200, 204)])
            assert s.stats(net.CTRL)["injected"] == 1 + 8 + 16 + 4
            assert await s.inject_many_async(net.CTRL, []) == []
            with pytest.raises(ValueError, match="not shadowed"):
                await s.inject_async(net.TX, b"x", 0)
            with pytest.raises(ValueError, match="readable or writable"):
                await s.inject_async(net.CTRL, b"", 0)
            assert readers() == base
        assert svq.live_resources()["eventfds"] == eventfds

    run(main())


def test_inject_many_async_times_out_with_one_deadline() -> None:
    async def main() -> None:
        base = readers()
        with svq.Device("sim:net") as dev:
            async with svq.Session(dev, queue_modes={net.CTRL: svq.Mode.COPY}) as s:
                eventfds = svq.live_resources()["eventfds"]
                dev.misbehave(net.CTRL, "never_complete")
                t0 = time.monotonic()
                with pytest.raises(TimeoutError, match="4 injected element"):
                    await s.inject_many_async(net.CTRL, [(net.vlan_add(v), 1) for v in range(4)], timeout=0.4)
                assert 0.35 < time.monotonic() - t0 < 1.5
                with pytest.raises(TimeoutError, match="1 injected element"):
                    await s.inject_async(net.CTRL, net.vlan_add(9), 1, timeout=0.1)
                # The device holds them; their batches' eventfds are gone already.
                assert svq.live_resources()["eventfds"] == eventfds
                assert readers() == base
                assert s.stats(net.CTRL)["injected"] == 5
            dev.misbehave(net.CTRL, None)
        assert svq.live_resources()["bounce_buffers"] == 0

    run(main())


def test_a_cancelled_inject_still_completes_and_is_accounted() -> None:
    async def main() -> None:
        base = readers()
        async with svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}) as s:
            eventfds = svq.live_resources()["eventfds"]
            s.suspend()
            task = asyncio.create_task(s.inject_async(net.CTRL, net.vlan_add(3), 1, timeout=30))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert readers() == base
            assert svq.live_resources()["eventfds"] == eventfds
            s.resume()
            deadline = time.monotonic() + 5
            while s.stats(net.CTRL)["bytes_in"] == 0:
                assert time.monotonic() < deadline, "the late ack arrived"
                await asyncio.sleep(0.01)
            state = s.net_state()
            assert state is not None and state["vlans"] == [3]
            assert await s.inject_async(net.CTRL, net.vlan_add(4), 1) == (1, OK)
            assert s.stats(net.CTRL)["injected"] == 2
        assert svq.live_resources()["bounce_buffers"] == 0

    run(main())


def test_aclose_runs_off_the_loop_and_finishes_when_cancelled() -> None:
    async def main() -> None:
        s = svq.Session("sim:net")
        closed_on: list[int] = []
        close = s.close

        def recording_close() -> None:
            closed_on.append(threading.get_ident())
            time.sleep(0.2)
            close()

        s.close = recording_close  # type: ignore[method-assign]
        task = asyncio.create_task(s.aclose())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert s.closed, "the close finished before the cancellation reached the caller"
        assert closed_on and closed_on[0] != threading.get_ident()

    run(main())


def test_async_with_a_vhost_user_server(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"

    def ask() -> int:
        client = VhostUserClient(str(path))
        try:
            return client.u64(GET_FEATURES)
        finally:
            client.close()

    async def main() -> None:
        async with svq.VhostUserServer("sim:net", path) as server:
            # It answers a VMM while the loop runs.
            features = await asyncio.get_running_loop().run_in_executor(None, ask)
            assert features != 0
            assert server.report()["connections"] >= 1
            thread = server._thread
        assert thread is not None and not thread.is_alive()
        assert not path.exists()

    run(main())
