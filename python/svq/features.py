"""Names of feature bits and decoding of config space (virtio spec 2.2, 5.1.4, 5.2.4;
backend bits from <linux/vhost_types.h>)."""

from __future__ import annotations

import struct
from typing import Any

NET, BLOCK = 1, 2

COMMON_FEATURES = {
    28: "RING_INDIRECT_DESC",
    29: "RING_EVENT_IDX",
    32: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    35: "IN_ORDER",
    36: "ORDER_PLATFORM",
    37: "SR_IOV",
    38: "NOTIFICATION_DATA",
    40: "RING_RESET",
}

NET_FEATURES = {
    0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC",
    7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
    12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
    17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA",
    21: "GUEST_ANNOUNCE", 22: "MQ", 23: "CTRL_MAC_ADDR", 27: "ANY_LAYOUT",
    61: "RSS", 63: "SPEED_DUPLEX",
}

BLK_FEATURES = {
    1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE", 9: "FLUSH",
    10: "TOPOLOGY", 11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD", 14: "WRITE_ZEROES",
}

BACKEND_FEATURES = {
    1: "IOTLB_MSG_V2", 2: "IOTLB_BATCH", 3: "IOTLB_ASID", 4: "SUSPEND", 5: "RESUME",
    6: "ENABLE_AFTER_DRIVER_OK", 7: "DESC_ASID", 8: "IOTLB_PERSIST",
}


def device_class(device_id: int) -> str:
    return {NET: "net", BLOCK: "blk"}.get(device_id, f"unknown({device_id})")


def _names(bits: int, table: dict[int, str]) -> list[str]:
    return [table.get(b, f"BIT_{b}") for b in range(64) if bits >> b & 1]


def feature_names(bits: int, device_id: int) -> list[str]:
    """Names of the set virtio feature bits, device-class bits first."""
    cls = {NET: NET_FEATURES, BLOCK: BLK_FEATURES}.get(device_id, {})
    return _names(bits, {**cls, **COMMON_FEATURES})


def backend_feature_names(bits: int) -> list[str]:
    return _names(bits, BACKEND_FEATURES)


def format_mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def decode_config(device_id: int, cfg: bytes) -> dict[str, Any]:
    """Decodes net (mac, status, max_virtqueue_pairs, mtu) or blk (capacity, size_max,
    seg_max, blk_size) config space."""
    if device_id == NET and len(cfg) >= 12:
        status, pairs, mtu = struct.unpack_from("<HHH", cfg, 6)
        return {"mac": format_mac(cfg[:6]), "status": status, "max_virtqueue_pairs": pairs, "mtu": mtu}
    if device_id == BLOCK and len(cfg) >= 24:
        capacity, size_max, seg_max = struct.unpack_from("<QII", cfg, 0)
        (blk_size,) = struct.unpack_from("<I", cfg, 20)
        return {"capacity": capacity, "size_max": size_max, "seg_max": seg_max, "blk_size": blk_size}
    return {"raw": cfg.hex()}
