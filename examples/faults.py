"""A device that breaks the virtio protocol: svq refuses what it wrote, breaks the queue
with a typed fault naming the rule, and keeps the process and the other queues alive.

    python examples/faults.py
"""

import svq
from svq import net

with svq.Device("sim:net") as dev, svq.Session(dev) as s:
    dev.misbehave(net.RX, "len_too_large")  # the device claims more bytes than it was given
    s.driver.post_receive(net.RX, 1, 2048)
    s.driver.send(net.TX, [net.frame(net.BROADCAST, b"x")])
    try:
        s.driver.wait(net.RX, 1)
    except svq.DeviceProtocolError as e:
        print(f"queue {e.queue} broken by the {e.kind}: rule {e.rule}")
        assert e.rule in svq.FAULT_RULES
    fault = s.queue_fault(net.RX)
    assert fault is not None and fault["rule"] == "used_len_exceeds_writable"
    assert s.queue_fault(net.TX) is None, "the other queues keep working"
