"""The sound core: what a caller, a hook or a failing device does must never crash the
interpreter, hang a thread, or make svq answer wrongly. One test per behaviour."""

from __future__ import annotations

import _thread
import gc
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import svq
from svq import net

OK = bytes([net.ACK_OK])


def wait_for_threads(baseline: int, timeout: float = 5.0) -> None:
    """A session closed from its own engine thread finishes on that thread: wait for it."""
    deadline = time.monotonic() + timeout
    while svq.live_resources()["threads"] > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svq.live_resources()["threads"] == baseline


def cvq_session(dev: svq.Device) -> svq.Session:
    return svq.Session(dev, queue_modes={net.CTRL: svq.Mode.COPY}, track_net_state=False)


@pytest.mark.parametrize("how", ["close", "last_reference", "collected_cycle"])
def test_a_session_closed_from_inside_its_own_hook_tears_down_safely(how: str) -> None:
    with svq.Device("sim:net") as dev:
        threads = svq.live_resources()["threads"]  # the device's own thread included
        holder: list[svq.Session] = [cvq_session(dev)]
        go = threading.Event()
        ran = threading.Event()

        def avail(out: bytes, in_size: int) -> bytes | None:
            go.wait(5)
            if how == "close":
                holder[0].close()
            elif how == "last_reference":
                holder.clear()  # the session's last reference goes, on the engine thread
            else:
                gc.collect()  # the unreachable session↔hook cycle is collected here
            ran.set()
            return OK

        s = holder[0]
        if how == "collected_cycle":
            # A hook on another queue refers to the session: a cycle only the garbage
            # collector can free, and it does so on the engine thread, inside the hook.
            s.add_hook(net.TX, used=lambda out, written, s=s: None)
            holder.clear()
        s.add_hook(net.CTRL, avail=avail)
        native = s.driver._s
        native.submit(net.CTRL, [net.mac_addr_set(b"\x02\x00\x00\x00\x00\x09")], [1])
        del s, native
        go.set()
        assert ran.wait(5), "the hook ran"
        wait_for_threads(threads)
        # The device was reset and unmapped; it works for a new session.
        assert dev.live_mappings() == 0
        with svq.Session(dev) as again:
            again.driver.post_receive(net.RX, 1, 2048)
            again.driver.send(net.TX, [net.frame(net.BROADCAST, b"after")])
            assert again.driver.wait(net.RX, 1)[0][2].endswith(b"after")


@pytest.mark.quarantines
def test_memory_a_device_may_still_reach_after_a_failed_close_is_kept() -> None:
    kept = svq.live_resources()["quarantined_bytes"]
    with svq.Device("sim:net") as dev:
        s = svq.Session(dev)
        s.driver.post_receive(net.RX, 8, 2048)
        dev.fail_at("ioctl", 1)  # the reset
        dev.fail_at("unmap", 1)  # and the unmap
        with pytest.raises(OSError):
            s.close()
        assert dev.status() & 4, "the device still runs on the session's rings"
        assert svq.live_resources()["quarantined_bytes"] >= 32 << 20, "guest memory is kept"
        assert svq.live_resources()["quarantined_bytes"] > kept
        # The device keeps working on the kept memory (an IOTLB change makes it re-read the
        # rings); freeing it would make this read freed memory.
        dev.probe_map(0, 0x7000_0000_0000, 4096)
        time.sleep(0.1)
        with svq.Session(dev) as again:  # resets the device
            again.driver.post_receive(net.RX, 1, 2048)
            again.driver.send(net.TX, [net.frame(net.BROADCAST, b"still fine")])
            assert again.driver.wait(net.RX, 1)[0][2].endswith(b"still fine")


def test_a_device_has_one_session_at_a_time() -> None:
    with svq.Device("sim:net") as dev:
        first = svq.Session(dev)
        with pytest.raises(svq.DeviceBusyError, match="in use"):
            svq.Session(dev)
        # The refused session touched nothing: the first one still works.
        first.driver.post_receive(net.RX, 1, 2048)
        first.driver.send(net.TX, [net.frame(net.BROADCAST, b"first")])
        assert first.driver.wait(net.RX, 1)[0][2].endswith(b"first")
        assert first.live_mappings() > 0 and dev.live_mappings() == first.live_mappings()
        first.close()
        with svq.Session(dev) as second:
            assert not second.closed


def blocked(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - the outcome is what the test checks
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    return t, outcome


def test_close_wakes_a_thread_blocked_in_wait() -> None:
    s = svq.Session("sim:net")
    s.driver.post_receive(net.RX, 1, 2048)
    t, outcome = blocked(lambda: s.driver.wait(net.RX, 1, timeout=30))
    t0 = time.monotonic()
    s.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert len(outcome) == 1 and isinstance(outcome[0], svq.SessionClosedError), outcome


def test_inject_many_has_one_deadline_for_the_call() -> None:
    with svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        s.suspend()  # nothing completes
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="8 injected element"):
            s.inject_many(net.CTRL, [(net.vlan_add(i), 1) for i in range(8)], timeout=0.5)
        assert time.monotonic() - t0 < 1.5
        s.resume()


def test_a_control_command_without_an_ack_buffer_never_reaches_the_device() -> None:
    with svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        mac_before = s.device.info()["config"]["mac"]
        head = s.driver.submit(net.CTRL, [net.mac_addr_set(net.parse_mac("02:00:00:00:00:77"))], [])
        [(done, length, _)] = s.driver.wait(net.CTRL, 1)
        assert (done, length) == (head, 0)
        # Tracked state and device agree: neither changed.
        assert s.device.info()["config"]["mac"] == mac_before
        state = s.net_state()
        assert state is not None and state["mac"] is None
        info = s.cvq_info()
        assert info is not None and info["answered_locally"] == 1 and info["acked"] == 0
        # With an ack buffer the same command goes through and is tracked.
        assert s.driver.request(net.CTRL, [net.mac_addr_set(net.parse_mac("02:00:00:00:00:77"))], 1) == (1, OK)
        assert s.device.info()["config"]["mac"] == "02:00:00:00:00:77"


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.driver.send(net.TX, [b""]),
        lambda s: s.driver.send(net.TX, [b"x", b""]),
        lambda s: s.driver.post_receive(net.RX, 1, 0),
        lambda s: s.driver.submit(net.TX, [b""], []),
        lambda s: s.driver.submit(net.RX, [], [0]),
        lambda s: s.driver.submit(net.RX, [], []),
    ],
    ids=["send", "send_second", "post_receive", "submit_out", "submit_in", "submit_nothing"],
)
def test_zero_size_buffers_are_refused_before_the_ring(call: Callable[[svq.Session], object]) -> None:
    with svq.Session("sim:net") as s:
        with pytest.raises(ValueError, match=r"0 bytes|at least one buffer|>= 1"):
            call(s)
        assert s.driver.in_flight(net.TX) == 0 and s.driver.in_flight(net.RX) == 0
        # The queues are not broken.
        assert s.queue_fault(net.TX) is None and s.queue_fault(net.RX) is None
        s.driver.post_receive(net.RX, 1, 2048)
        s.driver.send(net.TX, [net.frame(net.BROADCAST, b"fine")])
        assert s.driver.wait(net.RX, 1)[0][2].endswith(b"fine")


@pytest.mark.parametrize("what", ["wait", "inject"])
def test_ctrl_c_interrupts_a_blocking_call(what: str) -> None:
    assert threading.current_thread() is threading.main_thread()
    with svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        s.driver.post_receive(net.RX, 1, 2048)
        if what == "inject":
            s.suspend()
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            if what == "wait":
                s.driver.wait(net.RX, 1, timeout=30)
            else:
                s.inject(net.CTRL, net.vlan_add(3), 1, timeout=30)
        assert time.monotonic() - t0 < 2
        timer.join()
        if what == "inject":
            s.resume()


@pytest.mark.parametrize(
    "args, words",
    [(["--blk-device", "sim:net"], "--blk-device sim:net is a virtio-net device; expected virtio-blk"),
     (["--device", "sim:blk"], "--device sim:blk is a virtio-blk device; expected virtio-net")],
)
def test_demo_checks_the_device_class_up_front(args: list[str], words: str) -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "svq", "demo", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.stats(-1),
        lambda s: s.queue_fault(2**40),
        lambda s: s.driver.wait(-1, 1),
        lambda s: s.driver.wait(net.RX, -1),
        lambda s: s.driver.post_receive(net.RX, 1, -5),
        lambda s: s.driver.submit(net.RX, [], [2**32]),
        lambda s: s.driver.read_memory(-1, 4),
        lambda s: s.driver.send(net.TX, [b"x"], segments=-1),
        lambda s: s.inject(net.CTRL, b"x", -1),
        lambda s: s.vring_base(-3),
        lambda s: s.device.fail_at("map", -1),
        lambda s: s.device.misbehave(-1, None),
        lambda s: s.device.config(-1, 4),
    ],
)
def test_out_of_range_integers_are_value_errors(call: Callable[[svq.Session], object]) -> None:
    with svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY}) as s, pytest.raises(ValueError, match="out of range"):
        call(s)


@pytest.mark.parametrize("kwargs", [{"queue_size": -1}, {"queue_size": 1 << 16}, {"memory": [(-4096, 4096)]}])
def test_out_of_range_session_arguments_are_value_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        svq.Session("sim:net", **kwargs)  # type: ignore[arg-type]
