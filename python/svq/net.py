"""virtio-net helpers: queue indices, frames, and control-queue commands (virtio spec
5.1.6)."""

from __future__ import annotations

import struct

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
