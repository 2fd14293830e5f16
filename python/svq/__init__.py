"""svq: shadow virtqueues for vhost-vdpa devices.

A shadow virtqueue sits between a virtio driver's ring (the guest's) and a vDPA device:
it validates and forwards the guest's buffers on a ring of its own, with addresses
translated into the device's IOVA space, and completes them when the device is done.
The hot path is Rust; this package chooses modes and orchestrates devices.

>>> import svq
>>> with svq.Session("sim:net") as s:
...     s.driver.post_receive(svq.net.RX, 1, 2048)
...     s.driver.send(svq.net.TX, [svq.net.frame(svq.net.BROADCAST, b"hi")])
...     [(_, _, data)] = s.driver.wait(svq.net.RX, 1)
...     data.endswith(b"hi")
[0]
True
"""

from . import net, types
from ._native import (
    FAULT_RULES,
    VERSION,
    DeviceBusyError,
    DeviceNeedsResetError,
    DeviceProtocolError,
    ElementTooLargeError,
    GuestMemoryError,
    GuestProtocolError,
    InjectError,
    NegotiationError,
    QueueBrokenError,
    RestoreError,
    SessionClosedError,
    StateError,
    SvqError,
    live_resources,
)
from .device import Device, open_device
from .front import ExternalGuest, GuestQueue, MemoryRegion
from .serve import ControlSocket, VhostUserServer
from .session import CopyStrategy, Driver, Mode, SavedState, Session

#: The version of svq (its Rust core's; the wheel carries the same).
__version__ = VERSION

__all__ = [
    "FAULT_RULES",
    "ControlSocket",
    "CopyStrategy",
    "Device",
    "DeviceBusyError",
    "DeviceNeedsResetError",
    "DeviceProtocolError",
    "Driver",
    "ElementTooLargeError",
    "ExternalGuest",
    "GuestMemoryError",
    "GuestProtocolError",
    "GuestQueue",
    "InjectError",
    "MemoryRegion",
    "Mode",
    "NegotiationError",
    "QueueBrokenError",
    "RestoreError",
    "SavedState",
    "Session",
    "SessionClosedError",
    "StateError",
    "SvqError",
    "VhostUserServer",
    "__version__",
    "live_resources",
    "net",
    "open_device",
    "types",
]
