"""Shared fixtures. Every test is checked for leaks: the eventfds and worker threads svq
holds must be back to where they were once the test's objects are gone."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

import svq


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    gc.collect()
    before = svq.live_resources()
    yield
    gc.collect()
    after = svq.live_resources()
    assert after == before, f"leaked OS resources: before {before}, after {after}"


@pytest.fixture(params=[svq.Mode.TRANSLATE, svq.Mode.PASSTHROUGH], ids=lambda m: m.value)
def mode(request: pytest.FixtureRequest) -> svq.Mode:
    return request.param


@pytest.fixture
def net_session(mode: svq.Mode) -> Iterator[svq.Session]:
    with svq.Device("sim:net") as dev, svq.Session(dev, mode=mode) as s:
        yield s
        s.close()
        assert dev.live_mappings() == 0
