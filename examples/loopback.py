"""Frames through a shadow virtqueue on the embedded device, checked one by one.

    python examples/loopback.py
"""

import svq
from svq import net

with svq.Session("sim:net", mode=svq.Mode.TRANSLATE) as s:
    frames = [net.frame(net.BROADCAST, f"frame {i}".encode()) for i in range(256)]
    s.driver.post_receive(net.RX, len(frames), 2048)
    s.driver.send(net.TX, frames)
    received = [data for _, _, data in s.driver.wait(net.RX, len(frames))]
    s.driver.wait(net.TX, len(frames))
    assert received == frames
    stats = s.stats(net.TX)
    print(f"{len(received)} frames back intact; TX: {stats['elements']} elements, {stats['device_kicks']} device kicks")
