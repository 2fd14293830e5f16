"""The virtio-net control queue shadowed in copy mode: state tracked from acknowledged
commands only, local answers, isolation in its own address space, restore of a saved
state on a new device, injection with timeouts, and policy hooks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import svq
from svq import net

OK, ERR = bytes([net.ACK_OK]), bytes([net.ACK_ERR])
MAC = net.parse_mac("52:54:00:12:34:56")
NEW_MAC = net.parse_mac("02:00:00:00:0a:0b")
UNI = net.parse_mac("02:11:22:33:44:55")
GROUP = net.parse_mac("01:00:5e:00:00:42")


@pytest.fixture
def cvq_session() -> Iterator[svq.Session]:
    """Data queues in passthrough, the control queue in copy mode in its own ASID."""
    with svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        yield s


def cmd(s: svq.Session, command: bytes) -> bytes:
    length, ack = s.driver.request(net.CTRL, [command], 1)
    assert length == 1
    return ack


def test_isolated_in_its_own_address_space(cvq_session: svq.Session) -> None:
    info = cvq_session.cvq_info()
    assert info is not None
    assert (info["queue"], info["mode"], info["isolated"], info["asid"]) == (2, "copy", True, 1)
    assert info["fallback"] is None
    assert cvq_session.modes == {0: svq.Mode.PASSTHROUGH, 1: svq.Mode.PASSTHROUGH, 2: svq.Mode.COPY}
    maps = cvq_session.mappings()
    in_asid1 = [m for m in maps if m["asid"] == 1]
    assert in_asid1, "shadow rings and bounce buffers live in ASID 1"
    assert all(m["guest_addr"] is None for m in in_asid1), "no guest memory in ASID 1"
    assert any(m["guest_addr"] is not None for m in maps if m["asid"] == 0)
    # Commands work there and data queues keep passing traffic in ASID 0.
    assert cmd(cvq_session, net.mac_addr_set(NEW_MAC)) == OK
    cvq_session.driver.post_receive(net.RX, 1, 2048)
    cvq_session.driver.send(net.TX, [net.frame(NEW_MAC, b"data")])
    assert cvq_session.driver.wait(net.RX, 1)[0][2].endswith(b"data")


def test_only_the_control_queue_shadowed_maps_no_guest_memory_at_all() -> None:
    with svq.Session("sim:net", mode=svq.Mode.COPY) as s:
        assert s.cvq_info()["isolated"]
        assert all(m["guest_addr"] is None for m in s.mappings())


def test_not_isolated_falls_back_to_shadowing_every_queue() -> None:
    with svq.Session(
        "sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}, isolate_cvq=False
    ) as s:
        info = s.cvq_info()
        assert not info["isolated"] and info["asid"] == 0
        assert "every queue is shadowed" in info["fallback"]
        assert s.modes == {0: svq.Mode.TRANSLATE, 1: svq.Mode.TRANSLATE, 2: svq.Mode.COPY}
        assert cmd(s, net.mac_addr_set(NEW_MAC)) == OK


def test_blk_has_no_control_queue() -> None:
    with svq.Session("sim:blk", mode=svq.Mode.COPY) as s:
        assert s.cvq_info() is None and s.net_state() is None


def test_every_command_class_is_tracked_when_acked(cvq_session: svq.Session) -> None:
    s = cvq_session
    for c in [
        net.mac_addr_set(NEW_MAC),
        net.mac_table_set([UNI], [GROUP]),
        net.rx_mode("promisc", True),
        net.rx_mode("allmulti", False),
        net.rx_mode("nobcast", True),
        net.vlan_add(10),
        net.vlan_add(20),
        net.vlan_del(10),
        net.mq_pairs_set(1),
        net.guest_offloads_set(0),
    ]:
        assert cmd(s, c) == OK, c
    st = s.net_state()
    assert st["mac"] == NEW_MAC
    assert st["unicast"] == [UNI] and st["multicast"] == [GROUP]
    assert st["rx"] == {"promisc": True, "allmulti": False, "alluni": False, "nomulti": False, "nouni": False, "nobcast": True}
    assert st["vlans"] == [20]
    assert st["mq_pairs"] == 1 and st["offloads"] == 0
    info = s.cvq_info()
    assert info["commands"] == info["acked"] == 10


def test_refused_commands_leave_the_state_unchanged(cvq_session: svq.Session) -> None:
    s = cvq_session
    before = s.net_state()
    assert cmd(s, net.mq_pairs_set(2)) == ERR, "the device has one queue pair"
    assert cmd(s, net.guest_offloads_set(1 << 7)) == ERR
    rss = bytes([net.CLASS_MQ, 1]) + bytes(4) + b"\x00\x00" + bytes(2) + bytes(2) + bytes([1, 0, 0])
    assert cmd(s, rss) == ERR, "RSS is not offered"
    assert s.net_state() == before
    assert s.cvq_info()["acked"] == 0


@pytest.mark.hostile
def test_malformed_commands_get_err_without_reaching_the_device(cvq_session: svq.Session) -> None:
    s = cvq_session
    for bad in [b"\x01", bytes([net.CLASS_MAC, 1]) + b"\x01\x02", bytes([9, 0]), net.rx_mode("promisc", True)[:2] + b"\x07",
                bytes([net.CLASS_VLAN, 0]) + (5000).to_bytes(2, "little")]:
        assert cmd(s, bad) == ERR
    assert s.device.sim_stats()["ctrl_commands"] == 0
    assert s.cvq_info()["answered_locally"] == 5


def test_announce_is_answered_locally(cvq_session: svq.Session) -> None:
    assert cmd(cvq_session, net.announce_ack()) == OK
    assert cvq_session.device.sim_stats()["ctrl_commands"] == 0


def saved_state() -> dict:
    with svq.Session("sim:net", mode=svq.Mode.COPY) as src:
        for c in [net.mac_addr_set(NEW_MAC), net.mac_table_set([UNI], [GROUP]), net.rx_mode("allmulti", False),
                  net.rx_mode("promisc", False), net.vlan_add(7), net.rx_mode("nobcast", True)]:
            assert cmd(src, c) == OK
        st = src.net_state()
        assert st is not None
        return st


def test_restore_reproduces_a_saved_state_on_a_new_device() -> None:
    st = saved_state()
    with svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}, restore=st) as dst:
        assert dst.net_state() == st
        # Minimal: MAC, table, RX allmulti off, nobcast on, one VLAN. Promisc off is the
        # reset default and was not sent.
        assert dst.cvq_info()["commands"] == 5 == dst.device.sim_stats()["ctrl_commands"]
        assert dst.device.info()["config"]["mac"] == net.format_mac(NEW_MAC)
        # The filters prove it: table unicast and multicast pass; other multicast, plain
        # broadcast and untagged... all per the restored state.
        frames = {
            "uni": net.frame(UNI, b"u"),
            "group": net.frame(GROUP, b"g"),
            "other_group": net.frame(net.parse_mac("01:00:5e:00:00:99"), b"o"),
            "broadcast": net.frame(net.BROADCAST, b"b"),
            "vlan7": net.vlan_frame(NEW_MAC, 7, b"v7"),
            "vlan8": net.vlan_frame(NEW_MAC, 8, b"v8"),
        }
        dst.driver.post_receive(net.RX, len(frames), 2048)
        dst.driver.send(net.TX, list(frames.values()))
        dst.driver.wait(net.TX, len(frames))
        got = [d for _, _, d in dst.driver.wait(net.RX, 3)]
        assert got == [frames["uni"], frames["group"], frames["vlan7"]]
        with pytest.raises(TimeoutError):
            dst.driver.wait(net.RX, 1, timeout=0.2)


def test_restore_failure_names_the_command_and_leaves_nothing() -> None:
    st = saved_state()
    st["mq_pairs"] = 2
    with svq.Device("sim:net") as dev:
        with pytest.raises(svq.RestoreError, match=r"command 2 \(MQ_VQ_PAIRS_SET\) was refused"):
            svq.Session(dev, mode=svq.Mode.COPY, restore=st)
        assert dev.live_mappings() == 0


def test_restore_needs_a_shadowed_control_queue() -> None:
    with pytest.raises(ValueError, match="shadowed virtio-net control queue"):
        svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, restore={"mq_pairs": 1})
    with pytest.raises(ValueError, match="unknown net state field"):
        svq.Session("sim:net", mode=svq.Mode.COPY, restore={"bogus": 1})


def test_injected_commands_in_flight_together_and_tracked(cvq_session: svq.Session) -> None:
    s = cvq_session
    res = s.inject_many(net.CTRL, [(net.vlan_add(v), 1) for v in range(1, 9)])
    assert res == [(1, OK)] * 8
    assert s.net_state()["vlans"] == list(range(1, 9))
    assert s.stats(net.CTRL)["injected"] == 8


def test_inject_timeout_then_late_completion_is_accounted(cvq_session: svq.Session) -> None:
    s = cvq_session
    s.suspend()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not complete"):
        s.inject(net.CTRL, net.vlan_add(3), 1, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    s.resume()
    deadline = time.monotonic() + 5
    while s.stats(net.CTRL)["completed"] + s.stats(net.CTRL)["bytes_in"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.stats(net.CTRL)["bytes_in"] == 1, "the late ack arrived"
    assert s.net_state()["vlans"] == [3]
    # The queue is intact.
    assert s.inject(net.CTRL, net.vlan_add(4), 1) == (1, OK)
    assert svq.live_resources()["bounce_buffers"] == 0


def test_inject_while_waiting_does_not_burn_a_cpu(cvq_session: svq.Session) -> None:
    cvq_session.suspend()
    t0, c0 = time.monotonic(), time.process_time()
    with pytest.raises(TimeoutError):
        cvq_session.inject(net.CTRL, net.vlan_add(3), 1, timeout=0.5)
    assert time.process_time() - c0 < 0.25 * (time.monotonic() - t0)
    cvq_session.resume()


def test_inject_errors() -> None:
    with svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        with pytest.raises(ValueError, match="not shadowed"):
            s.inject(net.TX, b"x", 0)
        with pytest.raises(ValueError, match="readable or writable"):
            s.inject(net.CTRL, b"", 0)
        with pytest.raises(ValueError, match="out of range"):
            s.inject(net.CTRL, b"x", -1)
        s.suspend()
        outcome: list[BaseException] = []

        def wait_for_a_suspended_device() -> None:
            try:
                s.inject(net.CTRL, net.vlan_add(1), 1, 5)
            except BaseException as e:  # noqa: BLE001 - the outcome is what the test checks
                outcome.append(e)

        waiter = threading.Thread(target=wait_for_a_suspended_device)
        waiter.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        s.close()
        waiter.join()
        # Closing wakes the waiter at once, with the reason.
        assert time.monotonic() - t0 < 2
        assert len(outcome) == 1 and isinstance(outcome[0], svq.SessionClosedError), outcome


def test_python_hooks_answer_refuse_and_observe() -> None:
    seen: list[tuple[bytes, bytes]] = []

    def avail(out: bytes, in_size: int) -> bytes | bool | None:
        if out == net.vlan_add(99):
            return OK  # answered by policy, never reaches the device
        if out == net.vlan_add(98):
            return False  # refused: used length 0
        return None

    with svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY}, track_net_state=False) as s:
        s.add_hook(net.CTRL, avail=avail, used=lambda out, written: seen.append((out, written)))
        assert s.driver.request(net.CTRL, [net.vlan_add(99)], 1) == (1, OK)
        assert s.driver.request(net.CTRL, [net.vlan_add(98)], 1)[0] == 0
        assert s.driver.request(net.CTRL, [net.vlan_add(5)], 1) == (1, OK)
        assert seen == [(net.vlan_add(5), OK)]
        assert s.device.sim_stats()["ctrl_commands"] == 1
        st = s.stats(net.CTRL)
        assert (st["answered"], st["refused"]) == (1, 1)
        assert s.net_state() is None


def test_tracked_control_queue_in_translate_mode_with_a_large_ack_buffer() -> None:
    """The tracker reads back exactly the used length, however large the guest's
    writable buffer (a 16-byte buffer for a 1-byte ack)."""
    with svq.Session("sim:net") as s:
        s.driver.submit(net.CTRL, [net.mac_addr_set(NEW_MAC)], [16])
        [(_, length, ack)] = s.driver.wait(net.CTRL, 1)
        assert (length, ack) == (1, OK)
        assert s.net_state()["mac"] == NEW_MAC
        assert s.driver.request(net.CTRL, [net.vlan_add(3)], 64)[0] == 1
