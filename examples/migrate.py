"""Live migration of a running guest from one device to another: its data queues switch
from passthrough into the shadow, a dirty round logs what the device wrote, the device
state is saved, and the guest resumes on the second device with its frames in flight.

    python examples/migrate.py
"""

import svq
from svq import net
from svq.migrate import migrate

with svq.Device("sim:net") as a, svq.Device("sim:net") as b:
    s = svq.Session(a, mode=svq.Mode.PASSTHROUGH, queue_modes={net.CTRL: svq.Mode.COPY})
    frames = [net.frame(net.BROADCAST, f"in flight {i}".encode()) for i in range(32)]
    s.driver.post_receive(net.RX, len(frames), 2048)
    s.driver.send(net.TX, frames)  # not waited for: some may still be in the ring
    [moved], report = migrate([s], [b], rounds=1)
    received = [data for _, _, data in moved.driver.wait(net.RX, len(frames))]
    assert received == frames, "every frame once, in order"
    print(f"migrated: switch {report.switch_ms:.2f} ms, devices stopped {report.blackout_ms:.2f} ms, "
          f"{report.dirty_pages} dirty pages; {len(received)} frames received on {moved.device.spec}")
    moved.close()
