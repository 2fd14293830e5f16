"""The hostile-peer scenarios the kernel simulator can exercise: an invalid guest ring
(svq refuses it before the device sees anything), map failures part-way, and stopping
with elements in flight."""

from __future__ import annotations

import errno

import pytest
from tests.test_guest_validation import CASES, RawGuest

import svq
from svq import net

pytestmark = [pytest.mark.kernel, pytest.mark.hostile]


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_guest_ring_on_the_kernel(kernel_net: str, case: str) -> None:
    with svq.Device(kernel_net) as dev:
        with svq.Session(dev, queue_size=16, indirect=True) as s:
            build, rule = CASES[case]
            build(RawGuest(s))
            with pytest.raises(svq.GuestProtocolError) as err:
                s.driver.wait(net.TX, 1, timeout=5)
            assert err.value.rule == rule
            # The device never saw the element: nothing reached TX.
            assert s.vring_base(net.TX) == 0
        assert dev.live_mappings() == 0


@pytest.mark.parametrize("mode", [svq.Mode.TRANSLATE, svq.Mode.COPY], ids=lambda m: m.value)
def test_every_failing_map_of_a_start_on_the_kernel(kernel_net: str, mode: svq.Mode) -> None:
    with svq.Device(kernel_net) as dev:
        dev.fail_at("map", 0)
        with svq.Session(dev, mode=mode):
            total = dev.calls_seen("map")
        for n in range(1, total + 1):
            dev.fail_at("map", n)
            with pytest.raises(OSError) as e:
                svq.Session(dev, mode=mode)
            assert e.value.errno == errno.ENOMEM
            assert dev.live_mappings() == 0
        # The kernel agrees nothing was left mapped: a full session maps everything again.
        with svq.Session(dev, mode=mode) as s:
            s.driver.post_receive(net.RX, 1, 2048)
            s.driver.send(net.TX, [net.frame(net.BROADCAST, b"after")])
            assert s.driver.wait(net.RX, 1)[0][2].endswith(b"after")
