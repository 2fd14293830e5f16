"""Opening devices and describing them (`svq info`)."""

from __future__ import annotations

import logging

from . import _native
from .features import backend_feature_names, decode_config, device_class, feature_names
from .types import DeviceInfo

log = logging.getLogger(__name__)


class Device:
    """An open vDPA device: the embedded one (``"sim:net"``, ``"sim:blk"``), a
    ``/dev/vhost-vdpa-N`` path, or a vdpa device name (resolved through
    ``/sys/bus/vdpa/devices/<name>``). A context manager; :meth:`close` is idempotent.

    The embedded devices take options after a comma, each at most once:
    ``sim:net,mac=M,mtu=N,pairs=P`` (a unicast MAC, MTU 68..65535, 1..8 queue pairs)
    and, to play a peer host that answers ARP and ping at an address instead of looping
    frames back, ``sim:net,echo=10.0.0.2[,echo_mac=M]``;
    ``sim:blk,sectors=N,disk=NAME,latency_us=U`` (1..2**24 sectors; devices naming the
    same disk share its data; requests complete out of order, each ``U`` µs after it was
    taken, up to 10 s). Anything else is a :class:`ValueError` naming the option."""

    def __init__(self, spec: str) -> None:
        self._native = _native.Device(spec)
        log.debug("opened device %s", spec)

    @property
    def spec(self) -> str:
        return self._native.spec

    @property
    def embedded(self) -> bool:
        """Whether this is the embedded userspace device."""
        return self._native.embedded

    def info(self) -> DeviceInfo:
        """What a vDPA engineer needs about the device, decoded."""
        raw = self._native.probe()
        device_id = raw["device_id"]
        first, last = raw["iova_range"]
        return {
            "device": self.spec,
            "device_id": device_id,
            "class": device_class(device_id),
            "features": feature_names(raw["features"], device_id),
            "features_raw": raw["features"],
            "backend_features": backend_feature_names(raw["backend_features"]),
            "backend_features_raw": raw["backend_features"],
            "num_queues": raw["num_queues"],
            "max_queue_size": raw["max_queue_size"],
            "groups": raw["groups"],
            "address_spaces": raw["address_spaces"],
            "vq_groups": raw["vq_groups"],
            "iova_range": [first, last],
            "config": decode_config(device_id, raw["config"]),
        }

    def config(self, offset: int, length: int) -> bytes:
        """Reads config space."""
        return self._native.config(offset, length)

    def guest_features(self) -> int:
        """The virtio features a guest in front of svq may negotiate with this device:
        its class features svq can drive, VERSION_1 and the ring features (the device's
        ACCESS_PLATFORM is svq's business, not the guest's)."""
        return self._native.guest_features()

    def status(self) -> int:
        """The virtio status byte."""
        return self._native.status()

    def live_mappings(self) -> int | None:
        """IOTLB mappings live on the device (None when the backend cannot count)."""
        return self._native.live_mappings()

    def probe_map(self, asid: int, iova: int, size: int) -> None:
        """Maps fresh memory at ``iova`` and unmaps it: raises the device's error
        (``FileExistsError`` when the range overlaps a live mapping)."""
        self._native.probe_map(asid, iova, size)

    def unmap(self, asid: int, iova: int, size: int) -> None:
        """Unmaps a range behind any session's back (for fault tests)."""
        self._native.unmap(asid, iova, size)

    def fail_at(self, point: str, n: int) -> None:
        """Fault injection on any backend: the ``n``-th call at ``point`` from now fails
        (0 disarms). ``point``: ``"map"`` (IOTLB updates, ENOMEM), ``"unmap"`` (IOTLB
        invalidations, EIO) or ``"ioctl"`` (every other device call, EIO)."""
        self._native.fail_at(point, n)

    def fail_map_at(self, n: int) -> None:
        """The ``n``-th IOTLB map from now fails with ENOMEM (0 disarms)."""
        self.fail_at("map", n)

    def calls_seen(self, point: str) -> int:
        """Calls seen at ``point`` since it was last armed."""
        return self._native.calls_seen(point)

    def maps_sent(self) -> int:
        """IOTLB maps sent since :meth:`fail_map_at` was last called."""
        return self.calls_seen("map")

    def misbehave(self, queue: int, how: str | None) -> None:
        """Makes the embedded device break the virtio protocol on ``queue`` on purpose:
        ``"used_id_out_of_range"``, ``"used_id_not_in_flight"``, ``"duplicate_completion"``,
        ``"used_idx_jump"``, ``"used_idx_backwards"``, ``"len_too_large"``,
        ``"never_complete"``, ``"needs_reset"``; None to behave again."""
        self._native.misbehave(queue, how)

    def faults(self) -> list[str]:
        """Accesses the embedded device refused since its last reset."""
        return self._native.faults()

    def sim_stats(self) -> dict[str, int] | None:
        """The embedded device's counters (None for kernel devices)."""
        return self._native.sim_stats()

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Device({self.spec!r})"


def open_device(spec: str) -> Device:
    """Opens a device by spec (see :class:`Device`)."""
    return Device(spec)
