"""The ``svq`` command line: ``svq demo`` (the main job), ``svq info DEVICE``, ``svq bench``,
``svq serve`` (a VMM's vhost-user backend), ``svq ctl`` (asks a running server) and
``svq migrate`` (the live-migration job)."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from . import bench, blk, migration_job, net, progress
from ._native import VERSION, SvqError, live_resources
from .device import Device
from .serve import ControlSocket, VhostUserServer, ctl
from .session import CAPTURE_SNAPLEN, CopyStrategy, Mode, Session
from .types import CaptureReport, DeviceInfo

log = logging.getLogger(__name__)

DEMO_MAC_AFTER = "02:5a:51:00:00:01"


def _loopback(s: Session, packets: int, frame_size: int, queue_size: int, show: bool = False) -> tuple[int, int, float]:
    """Sends ``packets`` frames TX→RX and checks every one, with up to a ring's worth in
    flight (four batches) so that the guest never waits for a round trip; returns
    (received, mismatches, seconds). ``show``: a progress bar on stderr."""
    received = mismatches = 0
    payload_len = max(frame_size - net.NET_HDR_LEN - 14, 8)
    pattern = bytes(range(256)) * (payload_len // 256 + 2)
    batch = max(queue_size // 4, 1)
    head = net.frame(net.BROADCAST, b"")  # every frame's headers: built once
    in_flight: collections.deque[list[bytes]] = collections.deque()
    sent = 0
    started = time.perf_counter()
    with progress.bar(packets, "frame", show=show, desc="loopback") as shown:
        while sent < packets or in_flight:
            while sent < packets and len(in_flight) < 4:
                n = min(batch, packets - sent)
                frames = [head + _payload(sent + i, payload_len, pattern) for i in range(n)]
                s.driver.post_receive(net.RX, n, max(frame_size, 2048))
                s.driver.send(net.TX, frames)
                in_flight.append(frames)
                sent += n
            frames = in_flight.popleft()
            got = s.driver.wait(net.RX, len(frames))
            s.driver.wait(net.TX, len(frames))
            for (_, _, data), want in zip(got, frames, strict=True):
                received += 1
                mismatches += data != want
            shown.update(len(frames))
    return received, mismatches, time.perf_counter() - started


def _payload(seq: int, n: int, pattern: bytes) -> bytes:
    """The frame's sequence number, then bytes counting up from it (a slice of
    ``pattern``, so that building a frame costs no loop in Python)."""
    start = seq & 0xFF
    return (seq.to_bytes(4, "little") + pattern[start : start + n])[:n]


def _set_mac(s: Session, mac: str) -> int:
    length, ack = s.driver.request(net.CTRL, [net.mac_addr_set(net.parse_mac(mac))], 1)
    return ack[0] if length == 1 else net.ACK_ERR


def _open_class(spec: str, want: str, option: str) -> Device:
    """Opens ``spec`` and checks it is a virtio-``want`` device (before any work)."""
    dev = Device(spec)
    got = dev.info()["class"]
    if got != want:
        dev.close()
        raise ValueError(f"{option} {spec} is a virtio-{got} device; expected virtio-{want}")
    return dev


def _check_capture_arguments(args: argparse.Namespace) -> None:
    if not args.capture and (args.snaplen != CAPTURE_SNAPLEN or args.capture_limit is not None):
        raise ValueError("--snaplen and --capture-limit need --capture FILE")


def demo(args: argparse.Namespace) -> dict[str, Any]:
    _check_capture_arguments(args)
    t0 = time.perf_counter()
    mode = Mode(args.mode)
    before = live_resources()["bounce_buffers"]
    # Both devices are checked up front: a wrong class fails at once, not after the loopback.
    dev = _open_class(args.device, "net", "--device")
    try:
        blk_dev = _open_class(args.blk_device, "blk", "--blk-device")
    except BaseException:
        dev.close()
        raise
    with dev, blk_dev:
        with Session(
            dev, mode=mode, queue_modes={net.CTRL: Mode.COPY}, copy_strategy=args.cvq_strategy, queue_size=args.queue_size
        ) as s:
            mac_before = s.device.info()["config"]["mac"]
            if args.capture:
                s.start_capture(args.capture, snaplen=args.snaplen, limit=args.capture_limit)
            show = progress.wanted(args.json)
            received, mismatches, seconds = _loopback(s, args.packets, args.frame_size, args.queue_size, show)
            ack = _set_mac(s, DEMO_MAC_AFTER)
            mac_after = s.device.info()["config"]["mac"]
            tx = s.stats(net.TX)
            cvq = s.cvq_info()
            capture = s.stop_capture() if args.capture else None
        leaked = (dev.live_mappings() or 0) + live_resources()["bounce_buffers"] - before
        with Session(blk_dev, mode=mode) as b:
            client = blk.Blk(b.driver)
            pattern = os.urandom(8 * blk.SECTOR)
            client.write(16, pattern)
            client.flush()
            blk_verified = client.read(16, 8) == pattern and bool(client.get_id())
    return {
        "device": args.device,
        "blk_device": args.blk_device,
        "mode": mode.value,
        "packets_sent": args.packets,
        "packets_received": received,
        "payload_mismatches": mismatches,
        "packets_per_s": round(received / seconds) if seconds > 0 else None,
        "frame_size": args.frame_size,
        "mac_before": mac_before,
        "mac_after": mac_after,
        "mac_ack": "OK" if ack == net.ACK_OK else "ERR",
        "blk_verified": blk_verified,
        "tx_stats": tx,
        "cvq": {
            "mode": cvq["mode"] if cvq else None,
            "strategy": args.cvq_strategy,
            "commands": cvq["commands"] if cvq else None,
            "acked": cvq["acked"] if cvq else None,
            "isolated": cvq["isolated"] if cvq else None,
            "leaked": leaked,
        },
        "capture": capture,
        "elapsed_s": round(time.perf_counter() - t0, 4),
    }


def _print_demo(r: dict[str, Any]) -> None:
    ok = r["packets_received"] == r["packets_sent"] and not r["payload_mismatches"]
    print(f"svq demo on {r['device']} + {r['blk_device']} ({r['mode']} mode)")
    bad = "" if ok else f", {r['payload_mismatches']} mismatched"
    rate = f", {r['packets_per_s']:,} frames/s" if r["packets_per_s"] else ""
    print(f"  loopback : {r['packets_received']}/{r['packets_sent']} frames of {r['frame_size']} B back intact{bad}{rate}")
    print(f"  shadow tx: {r['tx_stats']['elements']} elements, {r['tx_stats']['device_kicks']} kicks")
    c = r["cvq"]
    where = "own address space" if c["isolated"] else "shared address space"
    print(f"  MAC      : {r['mac_before']} -> {r['mac_after']} (control queue ack {r['mac_ack']})")
    print(f"  cvq      : {c['mode']} mode, {c['strategy']} buffers, {where}, "
          f"{c['acked']}/{c['commands']} commands acked, {c['leaked']} leaked after close")
    print(f"  blk      : write/flush/read-back/get-id {'verified' if r['blk_verified'] else 'FAILED'}")
    if r["capture"]:
        _print_capture(r["capture"], "  capture  : ")
    print(f"  elapsed  : {r['elapsed_s']:.3f} s")


def _print_capture(c: CaptureReport, prefix: str, file: TextIO = sys.stdout) -> None:
    ifaces = ", ".join(f"{i['name']} {i['packets']}" for i in c["interfaces"])
    dropped = f", {c['dropped']} dropped" if c["dropped"] else ""
    error = f" ({c['error']})" if c["error"] else ""
    print(f"{prefix}{c['packets']} frames ({ifaces}){dropped} in {c['path']}{error}", file=file)


def _demo_ok(r: dict[str, Any]) -> bool:
    return bool(
        r["packets_received"] == r["packets_sent"]
        and r["payload_mismatches"] == 0
        and r["mac_after"] == DEMO_MAC_AFTER
        and r["blk_verified"]
        and r["cvq"]["leaked"] == 0
    )


def info(args: argparse.Namespace) -> DeviceInfo:
    with Device(args.device) as d:
        return d.info()


_TYPES = {"net": "network", "blk": "block"}


def _print_info(i: DeviceInfo) -> None:
    """The layout of iproute2's ``vdpa dev show`` and ``vdpa dev config show``: the device
    line, its config line, then features by name, queue groups and address spaces."""
    first, last = i["iova_range"]
    kind = _TYPES.get(i["class"], i["class"])
    print(f"{i['device']}: type {kind} device_id {i['device_id']} max_vqs {i['num_queues']} "
          f"max_vq_size {i['max_queue_size']} groups {i['groups']} address_spaces {i['address_spaces']}")
    cfg = dict(i["config"])
    if i["class"] == "net":
        link = "up" if cfg.get("status", 1) & 1 else "down"
        line = f"mac {cfg.get('mac')} link {link} max_vq_pairs {cfg.get('max_virtqueue_pairs')} mtu {cfg.get('mtu')}"
    else:
        line = " ".join(f"{k} {v}" for k, v in cfg.items())
    print(f"  {line}")
    print(f"  features {' '.join(i['features'])}")
    print(f"  backend_features {' '.join(i['backend_features'])}")
    print(f"  vq_groups {' '.join(f'vq{q}:{g}' for q, g in enumerate(i['vq_groups']))}")
    print(f"  iova_range {first:#x}-{last:#x}")


def _queue_mode(text: str) -> tuple[int, Mode]:
    """``Q=MODE`` with Q a queue index or one of rx, tx, ctrl."""
    name, sep, mode = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: use QUEUE=MODE, e.g. ctrl=copy or 1=translate")
    named = {"rx": net.RX, "tx": net.TX, "ctrl": net.CTRL}
    try:
        queue = named[name] if name in named else int(name)
        return queue, Mode(mode)
    except (KeyError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e


def serve(args: argparse.Namespace) -> int:
    """Runs a vhost-user backend until SIGINT or SIGTERM; 0 after a clean stop."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with VhostUserServer(args.device, args.vhost_user, mode=args.mode, queue_modes=dict(args.queue_mode or []),
                             copy_strategy=args.copy_strategy, busy_poll=args.busy_poll) as server:
            if args.capture:
                server.start_capture(args.capture, snaplen=args.snaplen, limit=args.capture_limit)
            control = ControlSocket(server, args.ctl) if args.ctl else None
            try:
                server.start()
                print(f"svq serve: {args.device} on {server.path} ({server.mode.value} mode)", file=sys.stderr, flush=True)
                seen = 0
                while not stop.wait(0.1):
                    # Refusals and connection ends are worth a line on stderr.
                    events = server.report()["events"]
                    for e in events[min(seen, len(events)):]:
                        print(f"svq serve: {e}", file=sys.stderr, flush=True)
                    seen = len(events)
                    if server.wait(0):
                        break  # the server failed on its own: wait() raised, or it stopped
            finally:
                if control:
                    control.close()
                captured = server.stop_capture() if args.capture else None
                if captured:
                    _print_capture(captured, "svq serve: capture: ", sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ctl_command(args: argparse.Namespace) -> int:
    answer = ctl(args.socket, args.what)
    if "error" in answer:
        print(f"svq ctl: {answer['error']}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(answer))
    else:
        for key, value in answer.items():
            print(f"{key}: {json.dumps(value)}")
    return 0


def migrate_command(args: argparse.Namespace) -> int:
    if args.frames < 3 or args.blk_writes < 1 or args.rounds < 0:
        print("svq migrate: --frames must be >= 3, --blk-writes >= 1 and --rounds >= 0", file=sys.stderr)
        return 2
    if args.no_blk and (args.blk_from or args.blk_to):
        print("svq migrate: --no-blk excludes --blk-from and --blk-to", file=sys.stderr)
        return 2
    if not args.no_blk and bool(args.blk_from) != bool(args.blk_to):
        print("svq migrate: give both --blk-from and --blk-to, or neither", file=sys.stderr)
        return 2
    shared = migration_job.default_blk_spec()
    with progress.bar(None, "step", show=progress.wanted(args.json), desc="svq migrate") as shown:

        def step(text: str) -> None:
            log.info("svq migrate: %s", text)
            shown.set_description_str(f"svq migrate: {text}")
            shown.update(1)

        r = _migrate(args, shared, step)
    print(json.dumps(r)) if args.json else migration_job.print_report(r)
    return 0 if migration_job.ok(r) else 1


def _migrate(args: argparse.Namespace, shared: str, step: Callable[[str], None]) -> dict[str, Any]:
    return migration_job.run(
        net_from=args.net_from,
        net_to=args.net_to,
        blk_from=None if args.no_blk else args.blk_from or shared,
        blk_to=None if args.no_blk else args.blk_to or shared,
        mode=Mode(args.mode),
        shadow=Mode(args.shadow),
        frames=args.frames,
        blk_writes=args.blk_writes,
        rounds=args.rounds,
        progress=step,
    )


def _capture_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capture", metavar="FILE", help="write the frames on the shadowed data queues to a pcapng file")
    p.add_argument("--snaplen", type=int, default=CAPTURE_SNAPLEN, metavar="BYTES",
                   help=f"bytes kept of each captured frame (default {CAPTURE_SNAPLEN})")
    p.add_argument("--capture-limit", type=int, metavar="BYTES", help="stop capturing once the file would pass this size")


def _queue_size(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 32768 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{text} is not a power of two in 1..32768")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svq", description="Shadow virtqueues for vhost-vdpa devices.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what svq does")
    p.add_argument("--version", action="version", version=f"svq {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="loopback frames, change the MAC, write/read blk sectors")
    d.add_argument("--device", default="sim:net", help="net device (default: the embedded sim:net)")
    d.add_argument("--blk-device", default="sim:blk", help="blk device (default: sim:blk)")
    d.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.TRANSLATE.value)
    d.add_argument("--packets", type=int, default=1000, help="frames to loop back (default 1000)")
    d.add_argument("--frame-size", type=int, default=256, help="bytes per TX buffer incl. headers (default 256)")
    d.add_argument("--queue-size", type=_queue_size, default=256, help="a power of two, 1..32768 (default 256)")
    d.add_argument("--cvq-strategy", choices=[c.value for c in CopyStrategy], default=CopyStrategy.POOL.value,
                   help="bounce buffers of the copy-mode control queue (default pool)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    _capture_arguments(d)

    v = sub.add_parser("serve", help="be a VMM's vhost-user backend on a vDPA device")
    v.add_argument("--vhost-user", required=True, metavar="PATH", help="the unix socket to listen on (a stale one is replaced)")
    v.add_argument("--device", required=True, help="sim:net[,mac=M][,echo=IP], sim:blk, /dev/vhost-vdpa-N or a vdpa name")
    v.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.TRANSLATE.value, help="mode of every queue (default translate)")
    v.add_argument("--queue-mode", type=_queue_mode, action="append", metavar="Q=MODE",
                   help="a queue's own mode, e.g. ctrl=copy or 1=passthrough (repeatable)")
    v.add_argument("--copy-strategy", choices=[c.value for c in CopyStrategy], default=CopyStrategy.POOL.value)
    v.add_argument("--ctl", metavar="PATH", help="a control socket answering stats, health and info (JSON lines)")
    _capture_arguments(v)
    v.add_argument("--busy-poll", type=float, default=200e-6, metavar="SECONDS",
                   help="after work, keep polling the rings this long before sleeping (default 0.0002; 0: never poll)")

    c = sub.add_parser("ctl", help="ask a running svq serve: stats, health or info")
    c.add_argument("socket", help="the control socket (svq serve --ctl)")
    c.add_argument("what", choices=ControlSocket.COMMANDS)
    c.add_argument("--json", action="store_true", help="print one JSON object")

    b = sub.add_parser("bench", help="svq against peers, measured in the same run")
    bench.add_arguments(b)

    m = sub.add_parser(
        "migrate",
        help="live-migrate a frame stream and blk writes from devices A to devices B",
        description="A frame stream (net) and blk writes run on devices A; the sessions switch into the shadow, dirty "
        "rounds run, every device stops and saves, and the guests resume on devices B. Then every frame and written "
        "sector is accounted for and B's filter is shown to hold A's virtio-net state. Blk starts shadowed: a "
        "passthrough blk queue with requests in flight cannot be adopted (its device completes out of order).",
    )
    m.add_argument("--from", dest="net_from", default="sim:net", help="net device A (default sim:net)")
    m.add_argument("--to", dest="net_to", default="sim:net", help="net device B (default: another sim:net)")
    m.add_argument("--blk-from", help="blk device A (default: an embedded blk device on a disk shared with B)")
    m.add_argument("--blk-to", help="blk device B (it must reach A's disk for the read-back)")
    m.add_argument("--no-blk", action="store_true", help="migrate the net device alone")
    m.add_argument("--mode", choices=[x.value for x in Mode], default=Mode.PASSTHROUGH.value,
                   help="the net data queues' mode on A (default passthrough, as a hypervisor runs a vDPA NIC)")
    m.add_argument("--shadow", choices=[Mode.TRANSLATE.value, Mode.COPY.value], default=Mode.TRANSLATE.value,
                   help="the mode passthrough queues switch to for the migration (default translate)")
    m.add_argument("--frames", type=int, default=20000, help="frames in the stream (default 20000)")
    m.add_argument("--blk-writes", type=int, default=2000, help="4 KiB writes (default 2000)")
    m.add_argument("--rounds", type=int, default=3, help="dirty rounds before the stop (default 3)")
    m.add_argument("--json", action="store_true", help="print one JSON object")

    i = sub.add_parser("info", help="describe a device")
    i.add_argument("device", help="sim:net, sim:blk, /dev/vhost-vdpa-N or a vdpa device name")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        if args.command == "demo":
            if args.packets < 0 or not 64 <= args.frame_size <= 4096:
                print("svq demo: --packets must be >= 0 and --frame-size within 64..4096", file=sys.stderr)
                return 2
            r = demo(args)
            print(json.dumps(r)) if args.json else _print_demo(r)
            return 0 if _demo_ok(r) else 1
        if args.command == "bench":
            return bench.run(args)
        if args.command == "serve":
            return serve(args)
        if args.command == "ctl":
            return ctl_command(args)
        if args.command == "migrate":
            return migrate_command(args)
        described = info(args)
        print(json.dumps(described)) if args.json else _print_info(described)
        return 0
    except (OSError, ValueError, SvqError, ConnectionError) as e:
        print(f"svq {args.command}: {e}", file=sys.stderr)
        return 1
