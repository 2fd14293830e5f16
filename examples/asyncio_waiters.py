"""asyncio: awaiting completions and injected control commands on the event loop, which
watches svq's eventfds (no thread per waiter, no polling); a receive waiter and a sender
share one loop.

    python examples/asyncio_waiters.py
"""

import asyncio

import svq
from svq import net


async def main() -> None:
    async with svq.Session("sim:net", queue_modes={net.CTRL: svq.Mode.COPY}) as s:
        d = s.driver
        d.post_receive(net.RX, 64, 2048)
        receiver = asyncio.create_task(d.wait_async(net.RX, 64))
        d.send(net.TX, [net.frame(net.BROADCAST, i.to_bytes(2, "big") * 30) for i in range(64)])
        sent = await d.wait_async(net.TX, 64)
        received = await receiver
        acks = await s.inject_many_async(net.CTRL, [(net.vlan_add(v), 1) for v in (10, 20)])
        print(f"{len(sent)} sent, {len(received)} received, control acks {[a for _, a in acks]}")


asyncio.run(main())
