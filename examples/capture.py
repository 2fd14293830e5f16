"""Packet capture: what crosses the shadowed net queues, both directions, into a pcapng
file that tcpdump, tshark or Wireshark open (one interface per queue).

    python examples/capture.py [FILE]
"""

import os
import sys
import tempfile

import svq
from svq import net

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "svq.pcapng")
with svq.Session("sim:net") as s:
    interfaces = s.start_capture(path, snaplen=128)
    s.driver.post_receive(net.RX, 16, 2048)
    s.driver.send(net.TX, [net.frame(net.BROADCAST, b"captured" * 20)] * 16)
    s.driver.wait(net.RX, 16)
    s.driver.wait(net.TX, 16)
    report = s.stop_capture()
counts = ", ".join(f"{i['name']} {i['packets']}" for i in report["interfaces"])
print(f"{report['packets']} frames on {interfaces} ({counts}) in {report['path']}")
