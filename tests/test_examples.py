"""Every example in examples/ runs and shows what it says."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SHOWS = {
    "loopback.py": "256 frames back intact",
    "control_queue.py": "restored on a new device: mac 02:00:00:00:0a:0b, vlans [7]",
    "migrate.py": "32 frames received on sim:net",
    "faults.py": "rule used_len_exceeds_writable",
    "serve.py": "connected=False",
    "asyncio_waiters.py": "64 sent, 64 received, control acks [b'\\x00', b'\\x00']",
    "capture.py": "32 frames on ['rx0', 'tx0'] (rx0 16, tx0 16)",
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SHOWS)


@pytest.mark.parametrize("name", sorted(SHOWS))
def test_example_runs(name: str) -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120, cwd=EXAMPLES)
    assert r.returncode == 0, r.stderr
    assert SHOWS[name] in r.stdout, r.stdout
