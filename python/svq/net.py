"""virtio-net helpers: queue indices, frames, and control-queue commands (virtio spec
5.1.6)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

RX, TX, CTRL = 0, 1, 2
#: ``struct virtio_net_hdr_v1``: VERSION_1 is always negotiated, so 12 bytes.
NET_HDR_LEN = 12
BROADCAST = b"\xff" * 6
ETH_P_EXPERIMENTAL = 0x88B5

CTRL_MAC = 1
CTRL_MAC_ADDR_SET = 1
ACK_OK, ACK_ERR = 0, 1


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def state_json(state: Mapping[str, Any]) -> dict[str, Any]:
    """A tracked virtio-net state (``Session.net_state``) as JSON-ready values: MACs as
    ``aa:bb:..`` strings, RSS and hash configurations as hex.

    >>> state_json({"mac": b"\\x02\\x00\\x00\\x00\\x00\\x01", "unicast": [], "rss": None})
    {'mac': '02:00:00:00:00:01', 'unicast': [], 'rss': None}
    """
    out: dict[str, Any] = dict(state)
    if out.get("mac") is not None:
        out["mac"] = format_mac(out["mac"])
    for table in ("unicast", "multicast"):
        if table in out:
            out[table] = [format_mac(m) for m in out[table]]
    for key, value in out.items():
        if isinstance(value, bytes):
            out[key] = value.hex()
    return out


def frame(dst: bytes, payload: bytes, src: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    """A virtio-net TX buffer: zeroed header, Ethernet header, payload."""
    if len(dst) != 6 or len(src) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    return bytes(NET_HDR_LEN) + dst + src + struct.pack("!H", ETH_P_EXPERIMENTAL) + payload


def payload_of(buf: bytes) -> bytes:
    """The payload of a received buffer (header and Ethernet header stripped)."""
    return buf[NET_HDR_LEN + 14 :]


def mac_addr_set(mac: bytes) -> bytes:
    """The command bytes of VIRTIO_NET_CTRL_MAC_ADDR_SET."""
    if len(mac) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    return bytes([CTRL_MAC, CTRL_MAC_ADDR_SET]) + mac


# Control commands (virtio spec 5.1.6.5): class, command, data. svq decodes and validates
# them in Rust; these build them for drivers, tests and tools.
CLASS_RX, CLASS_MAC, CLASS_VLAN, CLASS_ANNOUNCE, CLASS_MQ, CLASS_GUEST_OFFLOADS = 0, 1, 2, 3, 4, 5
RX_MODES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")


def rx_mode(mode: str, on: bool) -> bytes:
    """VIRTIO_NET_CTRL_RX_<MODE> with the switch on or off."""
    return bytes([CLASS_RX, RX_MODES.index(mode), int(on)])


def mac_table_set(unicast: list[bytes], multicast: list[bytes]) -> bytes:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET: the unicast then the multicast filter table."""
    out = bytes([CLASS_MAC, 0])
    for table in (unicast, multicast):
        out += struct.pack("<I", len(table)) + b"".join(table)
    return out


def vlan_add(vid: int) -> bytes:
    return bytes([CLASS_VLAN, 0]) + struct.pack("<H", vid)


def vlan_del(vid: int) -> bytes:
    return bytes([CLASS_VLAN, 1]) + struct.pack("<H", vid)


def announce_ack() -> bytes:
    return bytes([CLASS_ANNOUNCE, 0])


def mq_pairs_set(pairs: int) -> bytes:
    return bytes([CLASS_MQ, 0]) + struct.pack("<H", pairs)


def guest_offloads_set(offloads: int) -> bytes:
    return bytes([CLASS_GUEST_OFFLOADS, 0]) + struct.pack("<Q", offloads)


def vlan_frame(dst: bytes, vid: int, payload: bytes, src: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    """A TX buffer whose Ethernet frame carries an 802.1Q tag."""
    return bytes(NET_HDR_LEN) + dst + src + struct.pack("!HH", 0x8100, vid) + struct.pack("!H", ETH_P_EXPERIMENTAL) + payload
