"""Real-client tier: a Linux guest (Debian 6.12, virtio_net) in qemu TCG whose NIC is
``-netdev vhost-user`` to a backend process on this host. Run by ``tests/vm/run``, which
sets ``SVQ_VM_TIER=1`` and says where the guest and testpmd are; without it nothing here
is collected.

Session fixtures measure testpmd once per run (ping in icmpecho mode, the raw-frame
stream in io mode) and record the results in ``.vm-tier/results/testpmd.json``, so the
``svq serve`` tests of the same run can compare with them.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import vmlib

collect_ignore_glob = [] if os.environ.get("SVQ_VM_TIER") == "1" else ["test_*.py"]

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots a qemu guest whose NIC is vhost-user (the real-client tier, tests/vm/run)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The guest program's own checks first (seconds, no VM), then testpmd: the svq tests
    # compare with its figures (the fixtures would measure on demand anyway; this only
    # makes the report read in order). The live migrations come last.
    order = {"test_guest_program.py": 0, "test_testpmd.py": 1, "test_migrate.py": 3}
    items.sort(key=lambda item: order.get(item.path.name, 2))


@pytest.fixture(scope="session")
def tier() -> vmlib.Tier:
    return vmlib.Tier.from_env()


def _versions(tier: vmlib.Tier) -> dict:
    try:
        qemu = subprocess.run([tier.qemu, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        qemu = "?"
    dpdk = "?"
    if tier.testpmd is not None:
        try:
            dpdk = (tier.testpmd.parent.parent / "version").read_text().strip()
        except OSError:
            pass
    return {"run_id": tier.run_id, "qemu": qemu, "machine": tier.machine, "kernel": tier.kver,
            "dpdk": dpdk, "guest_cpus": tier.cpus, "guest_mem_mib": tier.mem_mib}


def _record_testpmd(tier: vmlib.Tier, key: str, out: vmlib.Outcome, fwd_mode: str) -> None:
    log = out.backend_stdout + out.backend_stderr
    messages = vmlib.vhost_user_messages(log)
    counts: dict[str, int] = {}
    for m in messages:
        counts[m] = counts.get(m, 0) + 1
    feats = vmlib.negotiated_features(log)
    names = {}
    if "virtio_features" in feats:
        names["backend_virtio"] = vmlib.feature_names(int(feats["virtio_features"], 16),
                                                      vmlib.VIRTIO_NET_FEATURES)
    if "protocol_features" in feats:
        names["protocol"] = vmlib.feature_names(int(feats["protocol_features"], 16),
                                                vmlib.VHOST_USER_PROTOCOL_FEATURES)
    if out.guest.result and out.guest.result.get("virtio_features"):
        names["guest_driver"] = vmlib.feature_names(
            vmlib.guest_feature_bits(out.guest.result["virtio_features"]), vmlib.VIRTIO_NET_FEATURES)
    vmlib.merge_json(tier.results_dir / "testpmd.json", key, {
        "forward_mode": fwd_mode,
        "guest": out.guest.result,
        "guest_rc": out.guest.rc,
        "testpmd_forward_stats": vmlib.testpmd_forward_stats(log),
        "vhost_user": {"features": feats, "feature_names": names, "messages": messages,
                       "message_counts": counts},
        "timings_s": {"backend_ready": round(out.backend.ready_s or 0, 3),
                      "guest_rc_after": round(out.guest.rc_after_s or 0, 2),
                      "qemu": round(out.guest.elapsed_s, 2), "wall": round(out.wall_s, 2),
                      "guest_uptime": out.guest.guest_times()},
    }, **_versions(tier))


@pytest.fixture(scope="session")
def testpmd_ping(tier: vmlib.Tier) -> vmlib.Outcome:
    """The guest pings 10.0.0.2; testpmd --forward-mode=icmpecho answers ARP and ICMP."""
    out = vmlib.run_traffic(tier, "testpmd-ping", lambda sock: tier.testpmd_argv(sock, "icmpecho"),
                            vmlib.PING_ARGS)
    _record_testpmd(tier, "ping", out, "icmpecho")
    return out


@pytest.fixture(scope="session")
def testpmd_stream(tier: vmlib.Tier) -> vmlib.Outcome:
    """The raw-frame stream; testpmd --forward-mode=io --port-topology=loop sends each
    frame back unchanged on the port it came from."""
    out = vmlib.run_traffic(tier, "testpmd-stream", lambda sock: tier.testpmd_argv(sock, "io"),
                            vmlib.STREAM_ARGS)
    _record_testpmd(tier, "stream", out, "io")
    return out
