"""Properties of the data path through the public API, over many random inputs.

* Ring index arithmetic across u16 wrap-around: 70 000 elements through size-8 queues
  (the avail/used indices wrap past 65535), batches of random sizes and segment counts,
  every frame intact and in order, in translate and passthrough modes.
* Random frame sizes, segment counts, RX buffer sizes and batch shapes through the
  loopback, generated and shrunk by hypothesis (skipped when hypothesis is not installed).

The byte-level hostile-peer properties (rings, used entries, IOVA allocator) are fuzzed in
Rust: see fuzz/ (`fuzz/run`, or `cargo test --manifest-path fuzz/Cargo.toml`).
"""

from __future__ import annotations

import random
import time

import pytest

import svq
from svq import net

QUEUE_SIZE = 8
HDR = net.NET_HDR_LEN + 14  # virtio-net header + Ethernet header, as net.frame() builds
MAX_FRAME = net.NET_HDR_LEN + 1514


def numbered_frame(seq: int, size: int) -> bytes:
    """A broadcast frame of exactly `size` bytes whose payload encodes `seq`."""
    n = size - HDR
    body = seq.to_bytes(4, "little") + bytes((seq * 31 + i) & 0xFF for i in range(max(0, n - 4)))
    return net.frame(net.BROADCAST, body[:n])


def transfer(
    s: svq.Session, frames: list[bytes], segments: int = 1, indirect: bool = False, rx_size: int = 2048
) -> list[tuple[int, int, bytes]]:
    """Posts len(frames) RX buffers, sends the frames, returns the RX completions and
    checks the TX ones."""
    k = len(frames)
    s.driver.post_receive(net.RX, k, rx_size)
    heads = s.driver.send(net.TX, frames, segments=segments, indirect=indirect)
    assert len(heads) == k and all(0 <= h < QUEUE_SIZE for h in heads)
    rx = s.driver.wait(net.RX, k)
    tx = s.driver.wait(net.TX, k)
    assert sorted(h for h, _, _ in tx) == sorted(heads), "TX completes exactly the heads sent"
    assert all(length == 0 for _, length, _ in tx)
    assert len({h for h, _, _ in rx}) == k, "RX heads in flight are distinct"
    return rx


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_indices_wrap_around_with_a_tiny_queue(mode: svq.Mode, indirect: bool) -> None:
    """70 000 elements through size-8 queues: both rings' indices wrap past 65535 while
    batches of 1..8 chains of 1..8 descriptors fill the ring to various depths."""
    total = 70_000
    rng = random.Random(0x5EED + indirect)
    start = time.monotonic()
    with svq.Session("sim:net", mode=mode, queue_size=QUEUE_SIZE, indirect=indirect) as s:
        seq = 0
        while seq < total:
            segments = rng.choice([1, 1, 2, 3, 4, 8])
            # Direct chains share the 8 descriptors; an indirect chain takes one.
            most = QUEUE_SIZE if indirect else QUEUE_SIZE // segments
            k = min(rng.randint(1, most), total - seq)
            frames = [numbered_frame(seq + i, rng.choice([64, 65, 128, 777, 1514])) for i in range(k)]
            rx = transfer(s, frames, segments=segments, indirect=indirect)
            got = [data for _, _, data in rx]
            assert got == frames, f"batch at {seq}: frames corrupted or out of order"
            seq += k
        assert s.vring_base(net.TX) == total % 65536
        assert s.vring_base(net.RX) == total % 65536
        if mode is svq.Mode.TRANSLATE:
            st = s.stats(net.TX)
            assert st["elements"] == st["completed"] == total
            assert s.stats(net.RX)["completed"] == total
        assert s.driver.in_flight(net.TX) == s.driver.in_flight(net.RX) == 0
    elapsed = time.monotonic() - start
    assert elapsed < 20, f"{total} elements took {elapsed:.1f} s"


def test_many_sessions_agree_on_vring_base(mode: svq.Mode) -> None:
    """Index accounting does not depend on how the work is cut into batches."""
    rng = random.Random(7)
    for _ in range(5):
        total = rng.randint(1, 300)
        with svq.Session("sim:net", mode=mode, queue_size=QUEUE_SIZE) as s:
            done = 0
            while done < total:
                k = min(rng.randint(1, QUEUE_SIZE), total - done)
                frames = [numbered_frame(done + i, 100) for i in range(k)]
                assert [d for _, _, d in transfer(s, frames)] == frames
                done += k
            assert s.vring_base(net.TX) == s.vring_base(net.RX) == total


# ---- hypothesis ----

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # the tests above still run; these are reported as skipped
    HealthCheck = given = settings = st = None  # type: ignore[assignment,misc]

if st is None:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install hypothesis)")
    def test_hypothesis_properties() -> None:
        pass

else:
    # One batch: (frame sizes, segments per frame, RX buffer size).
    batch = st.tuples(
        st.lists(st.integers(min_value=HDR, max_value=MAX_FRAME), min_size=1, max_size=QUEUE_SIZE),
        st.integers(min_value=1, max_value=QUEUE_SIZE),
        st.one_of(st.just(2048), st.integers(min_value=1, max_value=2048)),
    )

    SETTINGS = settings(
        max_examples=100,
        deadline=None,
        # The autouse leak check wraps the whole test, which is what we want: every example
        # closes its own session.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


    @SETTINGS
    @given(
        batches=st.lists(batch, min_size=1, max_size=12),
        mode=st.sampled_from([svq.Mode.TRANSLATE, svq.Mode.PASSTHROUGH]),
        indirect=st.booleans(),
        event_idx=st.booleans(),
    )
    def test_random_frames_round_trip(
        batches: list[tuple[list[int], int, int]], mode: svq.Mode, indirect: bool, event_idx: bool
    ) -> None:
        """Whatever the frame sizes, segment counts, batch shapes and RX buffer sizes, every
        frame comes back in order, truncated to the RX buffer exactly when it is larger."""
        with svq.Session("sim:net", mode=mode, queue_size=QUEUE_SIZE, indirect=indirect, event_idx=event_idx) as s:
            seq = sent = 0
            for sizes, segments, rx_size in batches:
                # Direct chains must fit the 8 descriptors together.
                fitting = sizes if indirect else sizes[: max(1, QUEUE_SIZE // segments)]
                frames = [numbered_frame(seq + i, n) for i, n in enumerate(fitting)]
                rx = transfer(s, frames, segments=segments, indirect=indirect, rx_size=rx_size)
                for f, (_, length, data) in zip(frames, rx, strict=True):
                    assert length == min(len(f), rx_size)
                    assert data == f[:rx_size]
                seq += len(frames)
                sent += sum(fitting)
            assert s.vring_base(net.TX) == s.vring_base(net.RX) == seq
            if mode is svq.Mode.TRANSLATE:
                assert s.stats(net.TX)["bytes_out"] == sent


    @SETTINGS
    @given(
        chains=st.lists(
            st.tuples(
                st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=3),
                st.lists(st.integers(min_value=1, max_value=512), min_size=1, max_size=3),
            ),
            min_size=1,
            max_size=20,
        ),
        mode=st.sampled_from([svq.Mode.TRANSLATE, svq.Mode.PASSTHROUGH]),
    )
    def test_random_chains_on_the_tx_queue(chains: list[tuple[list[bytes], list[int]]], mode: svq.Mode) -> None:
        """Chains with readable and writable parts of random sizes on TX: the device reads the
        readable bytes (a broadcast frame when it is one) and never reports more written
        bytes than the writable ones; heads come back exactly once."""
        with svq.Session("sim:net", mode=mode, queue_size=QUEUE_SIZE) as s:
            for out, in_sizes in chains:
                # A broadcast header in front, so the loopback delivers it.
                parts = [net.frame(net.BROADCAST, b""), *out]
                s.driver.post_receive(net.RX, 1, 2048)
                head = s.driver.submit(net.TX, parts, in_sizes)
                [(h, length, _)] = s.driver.wait(net.TX, 1)
                assert h == head
                assert 0 <= length <= sum(in_sizes)
                [(_, _, data)] = s.driver.wait(net.RX, 1)
                assert data == b"".join(parts)
            assert s.vring_base(net.TX) == len(chains)
