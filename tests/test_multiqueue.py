"""Many queues: the embedded device with several virtio-net queue pairs (MQ), every pair
shadowed, frames steered per pair once MQ_VQ_PAIRS_SET put the pairs in use, and the
shadow queues spread over engine threads, a queue pair on one thread."""

from __future__ import annotations

import os

import pytest

import svq
from svq import net

PAIRS = 4
CTRL = 2 * PAIRS


def rx(pair: int) -> int:
    return 2 * pair


def tx(pair: int) -> int:
    return 2 * pair + 1


def tagged(pair: int, i: int) -> bytes:
    return net.frame(net.BROADCAST, b"pair" + bytes([pair, i]) * 20)


def test_every_pair_is_shadowed_and_steered_once_in_use() -> None:
    with svq.Session(f"sim:net,pairs={PAIRS}", queue_modes={CTRL: "copy"}) as s:
        assert s.device.info()["config"]["max_virtqueue_pairs"] == PAIRS
        assert s.features & (1 << 22), "MQ negotiated"
        assert s.modes == {**{q: svq.Mode.TRANSLATE for q in range(CTRL)}, CTRL: svq.Mode.COPY}
        cvq = s.cvq_info()
        assert cvq is not None and cvq["queue"] == CTRL
        d = s.driver
        for p in range(PAIRS):
            d.post_receive(rx(p), 10, 2048)
        # Before MQ_VQ_PAIRS_SET only pair 0 is in use (virtio 5.1.6.5.5).
        d.send(tx(1), [tagged(1, 99)])
        with pytest.raises(TimeoutError):
            d.wait(tx(1), 1, timeout=0.3)
        assert d.request(CTRL, [net.mq_pairs_set(PAIRS)], 1) == (1, bytes([net.ACK_OK]))
        state = s.net_state()
        assert state is not None and state["mq_pairs"] == PAIRS
        for p in range(PAIRS):
            d.send(tx(p), [tagged(p, i) for i in range(5)])
        for p in range(PAIRS):
            want = ([tagged(1, 99)] if p == 1 else []) + [tagged(p, i) for i in range(5)]
            got = [data for _, _, data in d.wait(rx(p), len(want))]
            assert got == want, f"pair {p}"
            assert len(d.wait(tx(p), len(want))) == len(want)
            assert s.stats(tx(p))["completed"] == len(want)
        # A pair count the device does not have is refused, and not tracked.
        assert d.request(CTRL, [net.mq_pairs_set(PAIRS + 1)], 1) == (1, bytes([net.ACK_ERR]))
        state = s.net_state()
        assert state is not None and state["mq_pairs"] == PAIRS


@pytest.mark.parametrize("workers, want", [(1, 1), (2, 2), (3, 3), (16, PAIRS + 1)])
def test_queues_spread_over_the_workers_asked_for(workers: int, want: int) -> None:
    """At most one thread per queue group (a pair, the control queue); traffic on every
    pair flows whatever the spread."""
    before = svq.live_resources()["threads"]
    with svq.Session(f"sim:net,pairs={PAIRS}", workers=workers) as s:
        assert s.workers == want
        assert svq.live_resources()["threads"] == before + 1 + want, "the device's thread and the workers"
        d = s.driver
        assert d.request(CTRL, [net.mq_pairs_set(PAIRS)], 1)[1] == bytes([net.ACK_OK])
        for p in range(PAIRS):
            d.post_receive(rx(p), 64, 2048)
            d.send(tx(p), [tagged(p, i) for i in range(64)])
        for p in range(PAIRS):
            assert [data for _, _, data in d.wait(rx(p), 64)] == [tagged(p, i) for i in range(64)]
    assert s.workers == 0
    assert svq.live_resources()["threads"] == before


def test_the_default_is_one_worker_per_cpu() -> None:
    with svq.Session(f"sim:net,pairs={PAIRS}") as s:
        assert s.workers == min(len(os.sched_getaffinity(0)), PAIRS + 1)


def test_bad_pair_counts_and_worker_counts_are_refused() -> None:
    for bad in ("0", "9", "x"):
        with pytest.raises(ValueError):
            svq.Device(f"sim:net,pairs={bad}")
    with pytest.raises(ValueError, match="workers"):
        svq.Session("sim:net", workers=0)


def test_a_multiqueue_state_moves_to_another_device() -> None:
    """The pairs in use are part of the net state: a resumed session replays them before
    its data queues start, and every pair carries frames on the destination."""
    with svq.Session(f"sim:net,pairs={PAIRS}", queue_modes={CTRL: "copy"}) as a:
        assert a.driver.request(CTRL, [net.mq_pairs_set(3)], 1)[1] == bytes([net.ACK_OK])
        saved = a.save()
    with svq.Session(f"sim:net,pairs={PAIRS}", queue_modes={CTRL: "copy"}, resume=saved) as b:
        state = b.net_state()
        assert state is not None and state["mq_pairs"] == 3
        d = b.driver
        for p in range(3):
            d.post_receive(rx(p), 2, 2048)
            d.send(tx(p), [tagged(p, 0)])
        for p in range(3):
            assert [data for _, _, data in d.wait(rx(p), 1)] == [tagged(p, 0)]
