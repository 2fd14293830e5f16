"""The virtio-net control queue shadowed in copy mode: a MAC and a VLAN set, the state
svq tracked from what the device acknowledged, and that state restored on a new device
before its data queues start.

    python examples/control_queue.py
"""

import svq
from svq import net

MAC = net.parse_mac("02:00:00:00:0a:0b")

with svq.Session("sim:net", mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY}) as src:
    for command in (net.mac_addr_set(MAC), net.vlan_add(7)):
        _, ack = src.driver.request(net.CTRL, [command], 1)
        assert ack == bytes([net.ACK_OK])
    state = src.net_state()
    assert state is not None
    info = src.cvq_info()
    assert info is not None
    print(f"control queue {info['queue']} in {info['mode']} mode, own address space: {info['isolated']}")

with svq.Session("sim:net", mode=svq.Mode.COPY, restore=state) as dst:
    assert dst.net_state() == state
    print(f"restored on a new device: mac {dst.device.info()['config']['mac']}, vlans {state['vlans']}")
