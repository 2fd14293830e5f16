//! A split ring in a heap buffer of our own.

use std::ptr::NonNull;

use svq::ring::{RingLayout, Vring};

/// A ring over a 16-byte-aligned heap buffer that lives as long as this value.
pub struct HeapRing {
    mem: Vec<u128>,
    /// The ring (pointers into `mem`).
    pub ring: Vring,
}

impl HeapRing {
    /// A zeroed ring of `size` entries (a power of two ≤ 32768).
    pub fn new(size: u16) -> Self {
        let layout = RingLayout::new(size).expect("power-of-two queue size");
        let (_, a, u, total) = layout.packed_offsets();
        let mut mem = vec![0u128; (total as usize).div_ceil(16)];
        let base = mem.as_mut_ptr() as *mut u8;
        // SAFETY: the three parts lie inside `mem` (packed_offsets gives offsets and the
        // total), which is never reallocated and outlives `ring`; u128 storage is 16-byte
        // aligned and the avail/used offsets are even / multiples of 64.
        let ring = unsafe {
            Vring::new(
                NonNull::new(base).expect("heap pointer"),
                NonNull::new(base.add(a as usize)).expect("heap pointer"),
                NonNull::new(base.add(u as usize)).expect("heap pointer"),
                layout,
            )
        };
        HeapRing { mem, ring }
    }

    /// Bytes of the whole buffer (for debugging).
    pub fn bytes(&self) -> usize {
        self.mem.len() * 16
    }
}
