//! Test rings: a split ring in heap memory of its own, for unit tests, fuzz harnesses and
//! benchmarks (behind the `test-utils` feature outside this crate's tests). A ring in
//! guest memory comes from `GuestMemory::packed_vring` (in `mem`) instead.

use std::ptr::NonNull;

use super::{RingLayout, Vring};

/// A zeroed split ring in a 16-byte-aligned heap buffer that lives as long as this value.
#[derive(Debug)]
pub struct HeapRing {
    mem: Vec<u128>,
    ring: Vring,
}

impl HeapRing {
    /// A ring of `size` entries; None unless `size` is a power of two ≤ 32768.
    pub fn new(size: u16) -> Option<Self> {
        let layout = RingLayout::new(size)?;
        let (_, a, u, total) = layout.packed_offsets();
        let mut mem = vec![0u128; (total as usize).div_ceil(16)];
        let base = NonNull::new(mem.as_mut_ptr() as *mut u8)?;
        // SAFETY: `packed_offsets` puts the three parts inside `total` bytes of `mem`, whose
        // heap buffer never moves or shrinks and lives as long as the HeapRing; the ring
        // is handed out only by reference to it. u128 storage is 16-byte aligned and the
        // avail/used offsets are even / multiples of 4.
        let ring = unsafe { Vring::new(base, base.add(a as usize), base.add(u as usize), layout) };
        Some(HeapRing { mem, ring })
    }

    /// The ring. Its pointers are valid while this value lives.
    pub fn ring(&self) -> Vring {
        self.ring
    }

    /// Bytes of the buffer.
    pub fn bytes(&self) -> usize {
        self.mem.len() * 16
    }
}
