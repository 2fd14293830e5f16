"""`svq bench` itself: the output format of a --quick run, and that the pure-Python peer
forwards chains the way svq does (a peer that is fast because it is wrong is no peer)."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest

import pyring
from svq import _native, bench

FIELDS = {"name", "svq", "peer", "unit", "ratio", "target", "met"}




def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    rc = bench.run(parser.parse_args(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_quick_json_rows_have_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    # The whole quick suite minus cargo (the parse rows are checked below, on request).
    rc, out, err = run_cli(["--quick", "--json", "--no-cargo"], capsys)
    rows = json.loads(out)
    assert rc == 0, [r for r in rows if r["wildly_off"]]
    assert err == ""  # no progress for --json (nor when stderr is not a terminal)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    for prefix in ("iova alloc+free", "iova reverse lookup", "forward in-process", "forward end-to-end",
                   "parse:", "notify:", "boundary:", "capture on", "forward with dirty log end-to-end",
                   "switch 1 queue", "switch session", "switch 16 GiB guest",
                   "forward in-process 2 pairs", "per-queue cost", "control-queue restore", "idle CPU"):
        assert any(n.startswith(prefix) for n in names), prefix
    for r in rows:
        assert r.keys() >= FIELDS, r
        assert isinstance(r["name"], str) and isinstance(r["unit"], str) and isinstance(r["target"], str)
        assert r["met"] in (True, False, None)
        if r["note"].startswith("skipped"):
            assert r["svq"] is None and r["met"] is None
            continue
        assert r["svq"] > 0 and r["peer"] > 0, r
        assert r["ratio"] == pytest.approx(r["svq"] / r["peer"]) or r["ratio"] == pytest.approx(r["peer"] / r["svq"])
        assert r.get("agree", True), r


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_cli(["--quick", "--only", "forward", "--only", "notify"], capsys)
    lines = out.splitlines()
    assert lines[0].split() == ["name", "svq", "peer", "unit", "ratio", "target", "met"]
    assert sum(line.startswith("forward in-process") for line in lines) == 8  # vs pure Python and vs the bare forwarder
    _rc, out, _ = run_cli(["--quick", "--markdown", "--only", "notify"], capsys)
    assert out.startswith("| name | svq | peer | unit | ratio | target | met |")


def test_wildly_off_is_the_only_failure() -> None:
    ok = bench._row("x", 1.0, 200.0, "ns", higher_better=False, min_ratio=1000, svq_max=0.5)
    assert ok.met is False and not ok.wildly_off()  # misses the target and a time bound: reported, not fatal
    bad = bench._row("y", 2000.0, 100.0, "ns", higher_better=False, min_ratio=1.0)
    assert bad.ratio == pytest.approx(0.05) and bad.wildly_off()
    kicks = bench._row("k", 1.0, 1.0, "kicks/elem", higher_better=False, svq_max=1 / 32, svq_max_is_time=False)
    assert kicks.wildly_off()


@pytest.mark.skipif(
    os.environ.get("SVQ_BENCH_CARGO") != "1" or bench.source_tree() is None or shutil.which("cargo") is None,
    reason="builds a cargo test binary; set SVQ_BENCH_CARGO=1 in a source tree",
)
def test_parse_rows_from_cargo() -> None:
    rows = bench.parse_rows(bench.plan(quick=True))
    assert len(rows) == 2
    for r in rows:
        assert r.svq and r.peer and r.extra["agree"], r


# ---- the pure-Python shadow virtqueue is a correct one ----

GPA, SIZE = 0x4000_0000, 0x10_0000
REGIONS = [(GPA, 0x8_0000, 0x1_0000_0000), (GPA + 0x8_0000, 0x8_0000, 0x2_0000_0000)]


def py_setup(event_idx: bool = True):  # type: ignore[no-untyped-def]
    _, _, _, total = pyring.ring_offsets(8)
    g, s = pyring.PyRing(bytearray(total), 0, 8), pyring.PyRing(bytearray(total), 0, 8)
    sq = pyring.PyShadowVirtqueue(g, GPA, GPA + SIZE, s, REGIONS, event_idx)
    guest = pyring.PyRingWriter(g, event_idx)
    device = pyring.PyRingReader(s, event_idx, 0x1_0000_0000, 0x2_0008_0000)
    return sq, guest, device


def to_iova(addr: int) -> int:
    for gpa, size, iova in REGIONS:
        if gpa <= addr < gpa + size:
            return iova + addr - gpa
    raise AssertionError(addr)


@pytest.mark.parametrize("event_idx", [True, False])
def test_pure_python_svq_forwards_and_completes(event_idx: bool) -> None:
    sq, guest, device = py_setup(event_idx)
    chains = [
        [(GPA + 0x1000, 64, False)],
        [(GPA + 0x2000, 16, False), (GPA + 0x3000, 100, False), (GPA + 0x4000, 2048, True)],
        # Straddles the two regions: split into two shadow descriptors.
        [(GPA + 0x8_0000 - 10, 30, True)],
    ]
    for rnd in range(5):  # wraps the 8-entry rings' free lists and indices
        heads = [guest.add(c) for c in chains]
        guest.publish()
        sq.forward()
        popped = []
        while (c := device.pop()) is not None:
            popped.append(c)
        assert [segs for _, segs in popped] == [
            [(to_iova(a), n, w) for a, n, w in chains[0]],
            [(to_iova(a), n, w) for a, n, w in chains[1]],
            [(0x1_0000_0000 + 0x8_0000 - 10, 10, True), (0x2_0000_0000, 20, True)],
        ]
        for (h, _), n in zip(popped, (0, 7, 30), strict=False):
            device.push_used(h, n)
        device.publish_used()
        sq.reap()
        done = []
        while (u := guest.pop_used()) is not None:
            done.append(u)
        assert done == list(zip(heads, (0, 7, 30), strict=False)), rnd
    assert sq.stats["elements"] == sq.stats["completed"] == 15


@pytest.mark.parametrize(
    "desc,why",
    [
        ((GPA + SIZE - 8, 16, 0, 0), "outside guest memory"),
        ((GPA + 0x1000, 0, 0, 0), "zero-length"),
        ((GPA + 0x1000, 8, pyring.F_NEXT, 0), "loop"),
        ((GPA + 0x1000, 8, pyring.F_NEXT, 9), "outside the table"),
        ((GPA + 0x1000, 16, pyring.F_INDIRECT, 0), "INDIRECT_DESC"),
    ],
)
def test_pure_python_svq_refuses_hostile_chains(desc: tuple[int, int, int, int], why: str) -> None:
    sq, guest, _ = py_setup()
    r = guest.r
    pyring.DESC.pack_into(r.buf, r.desc, *desc)
    pyring.U16.pack_into(r.buf, r.avail + 4, 0)
    pyring.U16.pack_into(r.buf, r.avail + 2, 1)
    with pytest.raises(pyring.PyRingError, match=why):
        sq.forward()


def test_read_after_write_and_index_jump_are_refused() -> None:
    sq, guest, _ = py_setup()
    guest.add([(GPA + 0x1000, 8, True), (GPA + 0x2000, 8, False)])
    guest.publish()
    with pytest.raises(pyring.PyRingError, match="readable descriptor after a device-writable"):
        sq.forward()
    sq, guest, _ = py_setup()
    pyring.U16.pack_into(guest.r.buf, guest.r.avail + 2, 9)
    with pytest.raises(pyring.PyRingError, match="jumped"):
        sq.forward()


@pytest.mark.parametrize("segments,size", [(1, 64), (4, 1500)])
def test_python_peer_and_svq_forward_the_same_chains(segments: int, size: int) -> None:
    rs = _native.bench_forward(segments, size, 640)
    py = pyring.py_forward(segments, size, 640)
    assert rs["elements"] == py["elements"] == 640
    assert rs["checksum"] == py["checksum"] == bench.expected_forward_checksum(segments, size, 640)
    # Same notification behaviour too: one kick and one call per batch of 32.
    for k in ("device_kicks", "guest_calls"):
        assert rs[k] == py[k] == 20, k


def test_the_python_peer_lives_outside_the_package() -> None:
    """`import svq` never brings the pure-Python peer in; svq bench finds it in the
    source tree it runs from."""
    import pkgutil

    import svq

    assert "pyring" not in {m.name for m in pkgutil.iter_modules(svq.__path__)}
    assert not hasattr(bench, "PyShadowVirtqueue")
    peer = bench.python_peer()
    assert peer is not None and peer.PyShadowVirtqueue.__module__ == "svq_bench_pyring"


def test_a_row_whose_spread_crosses_its_target_is_noisy_not_failed() -> None:
    # Best against best misses 1.7x, one repeat met it: noisy.
    r = bench._row("x (vs y)", 10.0, 6.5, "elem/s", higher_better=True, min_ratio=1.7,
                   svq_runs=[10.0, 9.0], peer_runs=[6.5, 5.0])
    assert r.ratio == pytest.approx(10 / 6.5) and r.noisy and r.met is None
    assert r.spread == (pytest.approx(10 / 6.5), pytest.approx(9 / 5)) and r.repeats == 2
    assert r.note.startswith("noisy") and r.peer_name == "y"
    # Every repeat misses: a miss, not noise.
    miss = bench._row("z (vs y)", 10.0, 8.0, "elem/s", higher_better=True, min_ratio=1.7,
                      svq_runs=[10.0, 9.0], peer_runs=[8.0, 7.0])
    assert miss.met is False and not miss.noisy
    d = bench.to_json([r, miss])
    assert all(x.keys() >= {"peer_name", "unit", "repeats", "spread", "noisy"} for x in d)
    assert "noisy" in bench.table([r])
