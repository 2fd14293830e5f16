//! Volatile and atomic accessors over a split ring in memory a peer can write.
//!
//! No reference is ever formed to ring memory: descriptors and used entries are copied in
//! and out with volatile accesses, the index words are atomics.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use super::layout::{Descriptor, RingLayout, UsedElem};

/// Host pointers to the three parts of one split ring.
#[derive(Debug, Clone, Copy)]
pub struct Vring {
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
    layout: RingLayout,
}

// SAFETY: a Vring is only pointers into shared ring memory; every access through it is
// volatile or atomic, so moving it to another thread is as sound as using it here.
unsafe impl Send for Vring {}
// SAFETY: as above; `&Vring` offers only volatile/atomic accesses.
unsafe impl Sync for Vring {}

impl Vring {
    /// A ring over host memory.
    ///
    /// # Safety
    /// `desc`, `avail` and `used` must be valid for reads and writes of
    /// `layout.desc_bytes()`, `layout.avail_bytes()` and `layout.used_bytes()` bytes for as
    /// long as the `Vring` (or a copy) is used, and aligned to 16, 2 and 4 bytes.
    pub unsafe fn new(desc: NonNull<u8>, avail: NonNull<u8>, used: NonNull<u8>, layout: RingLayout) -> Self {
        debug_assert!((desc.as_ptr() as usize).is_multiple_of(16));
        debug_assert!((avail.as_ptr() as usize).is_multiple_of(2));
        debug_assert!((used.as_ptr() as usize).is_multiple_of(4));
        Vring { desc, avail, used, layout }
    }

    /// The ring's layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Queue size.
    #[inline]
    pub fn size(&self) -> u16 {
        self.layout.size()
    }

    #[inline]
    fn u16_at(&self, base: NonNull<u8>, off: u64) -> &AtomicU16 {
        // SAFETY: callers pass offsets inside the part (`Vring::new` contract), 2-aligned
        // because the part is and every u16 field sits at an even offset; AtomicU16 has
        // the layout of u16 and atomics are the sanctioned way to share it with a peer.
        unsafe { &*(base.as_ptr().add(off as usize) as *const AtomicU16) }
    }

    /// Reads descriptor `i` (taken modulo the queue size, so never outside the table).
    #[inline]
    pub fn desc(&self, i: u16) -> Descriptor {
        let i = i & (self.size() - 1);
        // SAFETY: i < size (masked: the size is a power of two) keeps the two 8-byte reads inside the table (16-aligned entries
        // of 16 bytes); volatile because the peer may write it concurrently. Two word
        // reads rather than one of the struct, which compiles to a copy through the stack.
        let words = unsafe {
            let p = (self.desc.as_ptr() as *const [u64; 2]).add(i as usize) as *const u64;
            [std::ptr::read_volatile(p), std::ptr::read_volatile(p.add(1))]
        };
        // SAFETY: Descriptor is repr(C) plain integers, 16 bytes without padding: any 16
        // bytes are a valid value, and the bytes are kept as they were in memory.
        unsafe { std::mem::transmute::<[u64; 2], Descriptor>(words) }
    }

    /// Writes descriptor `i` (taken modulo the queue size, so never outside the table).
    #[inline]
    pub fn set_desc(&self, i: u16, d: Descriptor) {
        let i = i & (self.size() - 1);
        // SAFETY: Descriptor is repr(C) plain integers, 16 bytes without padding, so its
        // bytes are two initialized words.
        let words = unsafe { std::mem::transmute::<Descriptor, [u64; 2]>(d) };
        // SAFETY: i < size (masked) keeps the two 8-byte writes inside the table (16-aligned
        // entries of 16 bytes); volatile because the peer reads it.
        unsafe {
            let p = (self.desc.as_ptr() as *mut [u64; 2]).add(i as usize) as *mut u64;
            std::ptr::write_volatile(p, words[0]);
            std::ptr::write_volatile(p.add(1), words[1]);
        }
    }

    /// `avail.flags`.
    #[inline]
    pub fn avail_flags(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 0).load(Ordering::Relaxed))
    }
    /// Sets `avail.flags`.
    #[inline]
    pub fn set_avail_flags(&self, v: u16) {
        self.u16_at(self.avail, 0).store(v.to_le(), Ordering::Relaxed)
    }
    /// `avail.idx` (the caller orders it with [`super::barrier`]).
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, 2).load(Ordering::Relaxed))
    }
    /// Stores `avail.idx`.
    #[inline]
    pub fn set_avail_idx(&self, v: u16) {
        self.u16_at(self.avail, 2).store(v.to_le(), Ordering::Relaxed)
    }
    /// `avail.ring[i % size]`.
    #[inline]
    pub fn avail_entry(&self, i: u16) -> u16 {
        u16::from_le(self.u16_at(self.avail, RingLayout::avail_entry(i & (self.size() - 1))).load(Ordering::Relaxed))
    }
    /// Sets `avail.ring[i % size]`.
    #[inline]
    pub fn set_avail_entry(&self, i: u16, head: u16) {
        self.u16_at(self.avail, RingLayout::avail_entry(i & (self.size() - 1))).store(head.to_le(), Ordering::Relaxed)
    }
    /// `used_event` (at the end of the avail ring).
    #[inline]
    pub fn used_event(&self) -> u16 {
        u16::from_le(self.u16_at(self.avail, self.layout.used_event_offset()).load(Ordering::Relaxed))
    }
    /// Sets `used_event`.
    #[inline]
    pub fn set_used_event(&self, v: u16) {
        self.u16_at(self.avail, self.layout.used_event_offset()).store(v.to_le(), Ordering::Relaxed)
    }
    /// `used.flags`.
    #[inline]
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.u16_at(self.used, 0).load(Ordering::Relaxed))
    }
    /// Sets `used.flags`.
    #[inline]
    pub fn set_used_flags(&self, v: u16) {
        self.u16_at(self.used, 0).store(v.to_le(), Ordering::Relaxed)
    }
    /// `used.idx`.
    #[inline]
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.u16_at(self.used, 2).load(Ordering::Relaxed))
    }
    /// Stores `used.idx`.
    #[inline]
    pub fn set_used_idx(&self, v: u16) {
        self.u16_at(self.used, 2).store(v.to_le(), Ordering::Relaxed)
    }
    /// `used.ring[i % size]` as (id, len).
    #[inline]
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let off = RingLayout::used_entry(i & (self.size() - 1)) as usize;
        // SAFETY: the offset is inside the used ring for any i (masked), 4-aligned.
        let e: UsedElem = unsafe { std::ptr::read_volatile(self.used.as_ptr().add(off) as *const UsedElem) };
        (e.id.into(), e.len.into())
    }
    /// Sets `used.ring[i % size]`.
    #[inline]
    pub fn set_used_entry(&self, i: u16, id: u32, len: u32) {
        let off = RingLayout::used_entry(i & (self.size() - 1)) as usize;
        let e = UsedElem { id: id.into(), len: len.into() };
        // SAFETY: as in `used_entry`.
        unsafe { std::ptr::write_volatile(self.used.as_ptr().add(off) as *mut UsedElem, e) }
    }
    /// `avail_event` (at the end of the used ring).
    #[inline]
    pub fn avail_event(&self) -> u16 {
        u16::from_le(self.u16_at(self.used, self.layout.avail_event_offset()).load(Ordering::Relaxed))
    }
    /// Sets `avail_event`.
    #[inline]
    pub fn set_avail_event(&self, v: u16) {
        self.u16_at(self.used, self.layout.avail_event_offset()).store(v.to_le(), Ordering::Relaxed)
    }
}
