"""The extension's stubs match what it really exports, and the package type-checks
under `mypy --strict`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

mypy = pytest.importorskip("mypy", reason="mypy is not installed (it comes with the test extras)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_stubs_match_the_extension() -> None:
    r = run("mypy.stubtest", "svq._native")
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_type_checks() -> None:
    r = run("mypy", "--strict", "-p", "svq")
    assert r.returncode == 0, r.stdout + r.stderr


def test_examples_type_check() -> None:
    examples = pathlib.Path(__file__).resolve().parent.parent / "examples"
    r = run("mypy", "--strict", *sorted(str(p) for p in examples.glob("*.py")))
    assert r.returncode == 0, r.stdout + r.stderr
