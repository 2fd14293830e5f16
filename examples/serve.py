"""svq as a VMM's vhost-user backend, from Python: a server on a unix socket in front of
the embedded device, and what it reports (a VMM such as qemu connects with
-chardev socket,path=...,-netdev vhost-user).

    python examples/serve.py
"""

import os
import tempfile

import svq

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "vm.sock")
    with svq.VhostUserServer("sim:net", path, mode=svq.Mode.TRANSLATE) as server:
        server.start()
        report = server.report()
        print(f"serving {path}: connected={report['connected']}, sessions started={report['sessions_started']}")
    assert not os.path.exists(path), "the socket goes with the server"
