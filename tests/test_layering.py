"""The Rust core's imports run downwards: a module uses only modules of its own layer or
below (the layering of docs/ARCHITECTURE.md). A way up is a trait the higher module
implements, never an import."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RUST = Path(__file__).resolve().parents[1] / "rust"

# Bottom up. A module may use any module of a lower or of the same layer.
LAYERS: list[set[str]] = [
    {"virtio"},
    {"ring"},
    {"mem", "iova", "eventfd", "live", "net", "dirty", "capture"},
    {"device"},
    {"fault", "migrate"},
    {"dma"},
    {"bounce"},
    {"shadow"},
    {"engine"},
    {"front"},
    {"session"},
    {"vhost_user"},
    {"bench", "py"},
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}
USE = re.compile(r"\bcrate::(\w+)")


def module_of(path: Path) -> str:
    return path.relative_to(RUST).parts[0].removesuffix(".rs")


def test_every_module_has_a_layer() -> None:
    modules = {module_of(p) for p in RUST.rglob("*.rs")} - {"lib"}
    assert modules <= set(RANK), f"modules without a layer: {modules - set(RANK)}"


@pytest.mark.parametrize("path", sorted(RUST.rglob("*.rs")), ids=lambda p: str(p.relative_to(RUST)))
def test_imports_run_downwards(path: Path) -> None:
    if path.name == "lib.rs":
        return
    me = module_of(path)
    upward = sorted({m for m in USE.findall(path.read_text()) if m in RANK and RANK[m] > RANK[me]})
    assert not upward, f"{me} (layer {RANK[me]}) uses {upward}, which sit above it"
