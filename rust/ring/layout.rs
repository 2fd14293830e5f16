//! Split virtqueue wire layout (virtio 1.x, 2.7): little-endian fields, fixed offsets.
//!
//! Ring memory is shared with a peer that may write it at any time, so nothing here is read
//! through a reference: the accessors in [`super::access`] do volatile and atomic accesses
//! at the offsets defined below.

/// Descriptor flag: the chain continues in `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Avail flag: the driver needs no interrupt (ignored with EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used flag: the device needs no kick (ignored with EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// The largest queue size of a split ring.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// A little-endian `u16` as it sits in ring memory.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Le16(u16);
/// A little-endian `u32` as it sits in ring memory.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Le32(u32);
/// A little-endian `u64` as it sits in ring memory.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Le64(u64);

macro_rules! le_type {
    ($t:ident, $n:ty) => {
        impl From<$n> for $t {
            fn from(v: $n) -> Self {
                $t(v.to_le())
            }
        }
        impl From<$t> for $n {
            fn from(v: $t) -> Self {
                <$n>::from_le(v.0)
            }
        }
    };
}
le_type!(Le16, u16);
le_type!(Le32, u32);
le_type!(Le64, u64);

/// One entry of a descriptor table (`struct vring_desc`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    addr: Le64,
    len: Le32,
    flags: Le16,
    next: Le16,
}

impl Descriptor {
    /// A descriptor from host-order fields.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Descriptor { addr: addr.into(), len: len.into(), flags: flags.into(), next: next.into() }
    }
    /// Buffer address.
    pub fn addr(&self) -> u64 {
        self.addr.into()
    }
    /// Buffer length.
    pub fn len(&self) -> u32 {
        self.len.into()
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Flags.
    pub fn flags(&self) -> u16 {
        self.flags.into()
    }
    /// Next index.
    pub fn next(&self) -> u16 {
        self.next.into()
    }
}

/// One entry of the used ring (`struct vring_used_elem`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsedElem {
    /// Head of the completed chain (u32 on the wire).
    pub(super) id: Le32,
    /// Bytes the device wrote.
    pub(super) len: Le32,
}

/// Byte sizes and offsets of the three parts of a split ring of `size` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size (entries): a power of two, checked by [`RingLayout::new`].
    size: u16,
}

impl RingLayout {
    /// Alignment virtio 1.x requires of the descriptor table.
    pub const DESC_ALIGN: u64 = 16;
    /// Alignment of the avail ring.
    pub const AVAIL_ALIGN: u64 = 2;
    /// Alignment of the used ring.
    pub const USED_ALIGN: u64 = 4;

    /// Layout for a queue of `size` entries; `size` must be a power of two ≤ 32768.
    pub fn new(size: u16) -> Option<Self> {
        (size != 0 && size.is_power_of_two() && size <= MAX_QUEUE_SIZE).then_some(RingLayout { size })
    }
    /// Queue size (entries).
    #[inline]
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Bytes of the descriptor table.
    pub fn desc_bytes(&self) -> u64 {
        16 * self.size as u64
    }
    /// Bytes of the avail ring: flags, idx, ring[size], used_event.
    pub fn avail_bytes(&self) -> u64 {
        6 + 2 * self.size as u64
    }
    /// Bytes of the used ring: flags, idx, ring[size], avail_event.
    pub fn used_bytes(&self) -> u64 {
        6 + 8 * self.size as u64
    }
    /// Offset of `avail.ring[i]`.
    pub fn avail_entry(i: u16) -> u64 {
        4 + 2 * i as u64
    }
    /// Offset of `used_event` in the avail ring.
    pub fn used_event_offset(&self) -> u64 {
        4 + 2 * self.size as u64
    }
    /// Offset of `used.ring[i]`.
    pub fn used_entry(i: u16) -> u64 {
        4 + 8 * i as u64
    }
    /// Offset of `avail_event` in the used ring.
    pub fn avail_event_offset(&self) -> u64 {
        4 + 8 * self.size as u64
    }
    /// One contiguous area holding the three parts: (desc, avail, used) offsets and total.
    pub fn packed_offsets(&self) -> (u64, u64, u64, u64) {
        let desc = 0;
        let avail = self.desc_bytes();
        let used = align_up(avail + self.avail_bytes(), 64);
        (desc, avail, used, used + self.used_bytes())
    }
}

/// Rounds `v` up to a multiple of the power of two `align`.
pub fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

/// `vring_need_event` (virtio spec 2.7.10): whether moving an index from `old` to `new`
/// crossed the peer's `event` index, in wrapping u16 arithmetic.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn wire_layout_matches_the_spec() {
        assert_eq!(size_of::<Descriptor>(), 16);
        assert_eq!(offset_of!(Descriptor, addr), 0);
        assert_eq!(offset_of!(Descriptor, len), 8);
        assert_eq!(offset_of!(Descriptor, flags), 12);
        assert_eq!(offset_of!(Descriptor, next), 14);
        assert_eq!(size_of::<UsedElem>(), 8);
        assert_eq!(offset_of!(UsedElem, len), 4);
    }

    #[test]
    fn le_types_store_little_endian() {
        let d = Descriptor::new(0x0102_0304_0506_0708, 0x1122_3344, 0x5566, 0x7788);
        // SAFETY: Descriptor is repr(C) plain data of 16 bytes.
        let bytes: [u8; 16] = unsafe { std::mem::transmute(d) };
        assert_eq!(bytes[0], 0x08);
        assert_eq!(bytes[7], 0x01);
        assert_eq!(&bytes[8..12], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&bytes[12..16], &[0x66, 0x55, 0x88, 0x77]);
        assert_eq!(d.addr(), 0x0102_0304_0506_0708);
        assert_eq!(d.next(), 0x7788);
    }

    #[test]
    fn ring_sizes_and_offsets() {
        let l = RingLayout::new(256).unwrap();
        assert_eq!(l.desc_bytes(), 4096);
        assert_eq!(l.avail_bytes(), 518);
        assert_eq!(l.used_bytes(), 2054);
        assert_eq!(l.used_event_offset(), 516);
        assert_eq!(l.avail_event_offset(), 2052);
        let (d, a, u, total) = l.packed_offsets();
        assert_eq!((d, a), (0, 4096));
        assert_eq!(u % 64, 0);
        assert!(u >= a + l.avail_bytes());
        assert_eq!(total, u + 2054);
        assert!(RingLayout::new(0).is_none());
        assert!(RingLayout::new(100).is_none());
        assert!(RingLayout::new(32768).is_some());
    }

    #[test]
    fn need_event_across_wraparound() {
        // Peer asked to be told when index 5 is passed.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 5, 4));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 5, 0));
        // The same relations shifted across the u16 wrap.
        for base in [0u16, 65530, 65535, 32768] {
            let s = |x: u16| x.wrapping_add(base);
            assert!(need_event(s(5), s(6), s(5)));
            assert!(!need_event(s(5), s(5), s(4)));
            assert!(need_event(s(5), s(10), s(0)));
            assert!(!need_event(s(10), s(5), s(0)));
            // Exactly one notification across a batch that passes the event once.
            let hits = (0..20u16).filter(|i| need_event(s(7), s(i + 1), s(*i))).count();
            assert_eq!(hits, 1);
        }
    }
}
