"""Typed results of svq's calls: what each dict holds, for type checkers and readers.

>>> import svq
>>> with svq.Session("sim:net") as s:
...     stats: svq.types.QueueStats = s.stats(svq.net.TX)
...     stats["elements"]
0
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

#: How a queue reaches the device.
ModeName = Literal["translate", "copy", "passthrough"]
#: Who broke a queue.
FaultKindName = Literal["guest", "device_protocol", "device_needs_reset", "too_large", "internal"]


class QueueStats(TypedDict):
    """Counters of one queue (``Session.stats``); zero for a passthrough queue.

    >>> import svq
    >>> with svq.Session("sim:net") as s:
    ...     s.driver.send(svq.net.TX, [svq.net.frame(svq.net.BROADCAST, b"x")])
    ...     _ = s.driver.wait(svq.net.TX, 1)
    ...     s.stats(svq.net.TX)["completed"]
    [0]
    1
    """

    elements: int
    completed: int
    bytes_out: int
    bytes_in: int
    guest_kicks: int
    device_kicks: int
    device_kicks_suppressed: int
    device_calls: int
    guest_calls: int
    guest_calls_suppressed: int
    held: int
    injected: int
    answered: int
    refused: int
    map_failures: int
    returned_on_stop: int
    errors: int


class QueueFault(TypedDict):
    """Why a queue broke (``Session.queue_fault``). ``rule`` is a stable identifier of
    the broken rule (one of ``svq.FAULT_RULES``), e.g. ``"used_len_exceeds_writable"``.

    >>> import svq
    >>> with svq.Device("sim:net") as dev, svq.Session(dev) as s:
    ...     dev.misbehave(svq.net.RX, "len_too_large")
    ...     s.driver.post_receive(svq.net.RX, 1, 2048)
    ...     _ = s.driver.send(svq.net.TX, [svq.net.frame(svq.net.BROADCAST, b"x")])
    ...     try:
    ...         _ = s.driver.wait(svq.net.RX, 1)
    ...     except svq.DeviceProtocolError:
    ...         pass
    ...     fault = s.queue_fault(svq.net.RX)
    ...     (fault["kind"], fault["rule"]) if fault else None
    ('device_protocol', 'used_len_exceeds_writable')
    """

    queue: int
    kind: FaultKindName
    rule: str
    message: str


class CvqInfo(TypedDict):
    """Where the virtio-net control queue is (``Session.cvq_info``).

    >>> import svq
    >>> with svq.Session("sim:net", mode="passthrough", queue_modes={2: "copy"}) as s:
    ...     info = s.cvq_info()
    ...     (info["queue"], info["isolated"], info["asid"]) if info else None
    (2, True, 1)
    """

    queue: int
    mode: ModeName
    isolated: bool
    asid: int
    fallback: str | None
    commands: int
    acked: int
    answered_locally: int


class RxModes(TypedDict):
    """virtio-net RX modes (class RX of the control queue)."""

    promisc: bool
    allmulti: bool
    alluni: bool
    nomulti: bool
    nouni: bool
    nobcast: bool


class NetState(TypedDict, total=False):
    """The virtio-net control-plane state tracked from acknowledged commands
    (``Session.net_state``), and what ``restore=`` takes. MACs are 6 bytes each
    (``svq.net.state_json`` gives a JSON-ready copy).

    >>> import svq
    >>> with svq.Session("sim:net", queue_modes={2: "copy"}) as s:
    ...     _ = s.driver.request(2, [svq.net.mac_addr_set(bytes.fromhex("020000000001"))], 1)
    ...     bytes((s.net_state() or {}).get("mac") or b"").hex()
    '020000000001'
    """

    mac: bytes | None
    unicast: list[bytes]
    multicast: list[bytes]
    mq_pairs: int | None
    rss: bytes | None
    hash: bytes | None
    offloads: int | None
    rx: RxModes
    vlans: list[int]


class MappingInfo(TypedDict):
    """One live IOTLB mapping of a session (``Session.mappings``)."""

    asid: int
    iova: int
    size: int
    guest_addr: int | None
    perm: Literal["ReadOnly", "WriteOnly", "ReadWrite"]


class GuestRing(TypedDict):
    """Guest addresses of a queue's ring (``Driver.ring``)."""

    desc: int
    avail: int
    used: int
    size: int


class QueuePosition(TypedDict):
    """Where a guest ring stands after :meth:`svq.Session.stop_saving`: the next avail
    index to pop (what a VMM's GET_VRING_BASE returns) and the used index published
    (equal: nothing is left in flight)."""

    queue: int
    avail: int
    used: int


class SavedQueue(TypedDict):
    """Where one guest ring stood when its session was saved: the next avail index to
    pop, the used index published, and the heads of the chains the device held (a
    device that completes out of order): the next session submits those again."""

    index: int
    size: int
    avail: int
    used: int
    inflight: list[int]


class DeviceState(TypedDict):
    """A saved session's device state (``SavedState.state``).

    >>> import svq
    >>> s = svq.Session("sim:blk")
    >>> saved = s.save()
    >>> [(q["index"], q["avail"], q["inflight"]) for q in saved.state["queues"]]
    [(0, 0, [])]
    """

    version: int
    device_id: int
    features: int
    queues: list[SavedQueue]
    net: NetState | None


#: A device described (``Device.info``, ``svq info``): its class ("net", "blk" or
#: "id N"), feature names and raw bits, queues, groups, address spaces, the IOVA range and
#: the decoded config space (net: ``mac``, ``status``, ``max_virtqueue_pairs``, ``mtu``;
#: blk: ``capacity``, ``size_max``, ``seg_max``, ``blk_size``). (The functional form: one
#: key is ``class``.)
#:
#: >>> import svq
#: >>> with svq.Device("sim:blk") as d:
#: ...     info = d.info()
#: ...     (info["class"], info["num_queues"], info["config"]["capacity"])
#: ('blk', 1, 262144)
DeviceInfo = TypedDict(
    "DeviceInfo",
    {
        "device": str,
        "device_id": int,
        "class": str,
        "features": list[str],
        "features_raw": int,
        "backend_features": list[str],
        "backend_features_raw": int,
        "num_queues": int,
        "max_queue_size": int,
        "groups": int,
        "address_spaces": int,
        "vq_groups": list[int],
        "iova_range": list[int],
        "config": dict[str, Any],
    },
)


class SwitchResult(TypedDict):
    """What a live switch did (``Session.switch``): each queue that changed mode with its
    ring position at the switch, and how long the device was suspended.

    >>> import svq
    >>> with svq.Session("sim:net", mode="passthrough", queue_modes={svq.net.CTRL: "copy"}) as s:
    ...     s.switch([svq.net.RX, svq.net.TX], "translate")["queues"]
    [(0, 0), (1, 0)]
    """

    queues: list[tuple[int, int]]
    suspended_s: float


class ServedQueue(QueueStats):
    """One queue of a vhost-user server's report: its index, mode, counters and fault."""

    index: int
    mode: ModeName
    fault: QueueFault | None


class ServerReport(TypedDict):
    """What a vhost-user server does now (``VhostUserServer.report``, ``svq ctl info``)."""

    connected: bool
    connections: int
    sessions_started: int
    running: bool
    features: int
    protocol_features: int
    status: int
    guest_memory_bytes: int
    queues: list[ServedQueue]
    events: list[str]
    capture: CaptureReport | None


class CaptureInterface(TypedDict):
    """One captured queue: its pcapng interface name (``rx0``, ``tx0``, ...), frames
    written and frames dropped."""

    name: str
    packets: int
    dropped: int


class CaptureReport(TypedDict):
    """What a packet capture did (``Session.stop_capture``, ``VhostUserServer.stop_capture``):
    frames written to ``path`` and dropped (``dropped_limit``: the file reached its size
    cap; ``dropped_busy``: the disk was behind the queue), bytes written, whether the file
    is complete, why writing stopped early if it did, and the same per interface.

    >>> import os, tempfile, svq
    >>> path = os.path.join(tempfile.mkdtemp(), "demo.pcapng")
    >>> with svq.Session("sim:net") as s:
    ...     s.start_capture(path)
    ...     s.driver.post_receive(svq.net.RX, 1, 2048)
    ...     _ = s.driver.send(svq.net.TX, [svq.net.frame(svq.net.BROADCAST, b"hello")])
    ...     _ = s.driver.wait(svq.net.RX, 1)
    ...     report = s.stop_capture()
    ['rx0', 'tx0']
    >>> report["packets"], report["finished"], [i["packets"] for i in report["interfaces"]]
    (2, True, [1, 1])
    """

    path: str
    packets: int
    dropped: int
    dropped_limit: int
    dropped_busy: int
    bytes: int
    finished: bool
    error: str | None
    interfaces: list[CaptureInterface]


class LiveResources(TypedDict):
    """What svq holds in the whole process (``svq.live_resources``): eventfds, worker
    threads, bounce buffers, and bytes kept because a device may still reach them.

    >>> import svq
    >>> before = svq.live_resources()
    >>> with svq.Session("sim:net") as s:
    ...     svq.live_resources()["threads"] > before["threads"]
    True
    >>> svq.live_resources() == before
    True
    """

    eventfds: int
    threads: int
    bounce_buffers: int
    quarantined_bytes: int
