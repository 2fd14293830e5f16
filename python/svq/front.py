"""Guests svq does not own: a VM's memory and rings, handed over by the orchestration code
that owns the VM (the *external* front). svq maps the memory files ``MAP_SHARED`` (never
copies them), checks that every ring lies inside them, and shadows the rings onto the
device as they are.

>>> import os, svq
>>> fd = os.memfd_create("guest", os.MFD_ALLOW_SEALING)
>>> os.ftruncate(fd, 1 << 20)
>>> region = svq.MemoryRegion(gpa=0x4000_0000, size=1 << 20, fd=fd)
>>> region.end == 0x4010_0000
True
>>> os.close(fd)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryRegion:
    """``size`` bytes of the file ``fd`` from ``offset``, seen by the guest at ``gpa``.

    The file must not be able to shrink while svq maps it: a memfd sealed with
    ``F_SEAL_SHRINK``, or one created with ``MFD_ALLOW_SEALING`` (svq adds the seal).
    svq keeps its own duplicate of ``fd``; the caller may close its copy."""

    gpa: int
    size: int
    fd: int
    offset: int = 0

    @property
    def end(self) -> int:
        """The first guest address past the region."""
        return self.gpa + self.size


@dataclass(frozen=True)
class GuestQueue:
    """One split ring of the guest: its size, the guest addresses of its three parts,
    the eventfd the guest kicks (``kick_fd``) and the one svq signals (``call_fd``), and
    the avail index the guest publishes next (``base``; 0 for a fresh ring)."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick_fd: int
    call_fd: int
    base: int = 0


@dataclass(frozen=True)
class ExternalGuest:
    """A guest svq does not own: its memory, the queues to serve, and the virtio
    features its driver negotiated (a subset of ``Device.guest_features()``)."""

    memory: Sequence[MemoryRegion]
    queues: Sequence[GuestQueue]
    features: int

    def to_native(
        self,
    ) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int, int, int, int, int]], int]:
        """The form the extension takes."""
        return (
            [(r.gpa, r.size, r.fd, r.offset) for r in self.memory],
            [(q.index, q.size, q.desc, q.avail, q.used, q.kick_fd, q.call_fd, q.base) for q in self.queues],
            self.features,
        )
