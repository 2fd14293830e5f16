"""The real-client tier against DPDK's testpmd (vhost PMD) as the vhost-user backend:
the reference the svq serve tests compare with. Figures: .vm-tier/results/testpmd.json."""

from __future__ import annotations

import pytest
import vmlib

pytestmark = pytest.mark.vm

# What a vhost-user backend sees from qemu during one boot (testpmd's debug log).
REQUIRED_MESSAGES = {"VHOST_USER_GET_FEATURES", "VHOST_USER_SET_FEATURES", "VHOST_USER_SET_OWNER",
                     "VHOST_USER_SET_MEM_TABLE", "VHOST_USER_SET_VRING_NUM",
                     "VHOST_USER_SET_VRING_BASE", "VHOST_USER_SET_VRING_ADDR",
                     "VHOST_USER_SET_VRING_KICK", "VHOST_USER_SET_VRING_CALL"}


def test_ping_icmpecho(testpmd_ping: vmlib.Outcome) -> None:
    """The guest's ping to 10.0.0.2 gets every reply (testpmd answers ARP and ICMP)."""
    r = vmlib.check_ping(testpmd_ping)
    assert r["sent"] == int(vmlib.PING_ARGS[vmlib.PING_ARGS.index("--count") + 1])
    fwd = vmlib.testpmd_forward_stats(testpmd_ping.backend_stdout)
    if not fwd or fwd["rx"] < r["sent"] or fwd["tx"] < r["received"]:
        raise testpmd_ping.fail(f"testpmd's forward statistics do not add up: {fwd}")


def test_stream_io(testpmd_stream: vmlib.Outcome) -> None:
    """10 000 raw frames looped back by testpmd (io, port-topology loop): all back,
    intact, in order, once; testpmd counted at least as many."""
    r = vmlib.check_stream(testpmd_stream)
    fwd = vmlib.testpmd_forward_stats(testpmd_stream.backend_stdout)
    if not fwd or fwd["rx"] < r["sent"] or fwd["tx"] < r["received"]:
        raise testpmd_stream.fail(f"testpmd's forward statistics do not add up: {fwd}")


def test_vhost_user_handshake(testpmd_ping: vmlib.Outcome) -> None:
    """qemu set the device up through the messages a backend must handle, and the
    negotiated features are in testpmd's log (recorded for svq serve)."""
    log = testpmd_ping.backend_stdout + testpmd_ping.backend_stderr
    seen = set(vmlib.vhost_user_messages(log))
    missing = REQUIRED_MESSAGES - seen
    if missing:
        raise testpmd_ping.fail(f"vhost-user messages not seen: {sorted(missing)}")
    feats = vmlib.negotiated_features(log)
    assert "virtio_features" in feats, feats
