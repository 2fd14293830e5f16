//! IOVA allocator for the device's I/O virtual address space.
//!
//! Places guest memory regions, shadow rings and bounce buffers into the
//! inclusive IOVA range reported by the device, and answers forward
//! (IOVA → mapping) and reverse (host / guest address → IOVA) look-ups.
//!
//! Every operation is `O(log n)` in the number of live mappings: the
//! linear first-fit walk over holes that simpler allocators use costs
//! milliseconds once there are ~100k mappings.
//!
//! * Live mappings: `BTreeMap<iova, Mapping>`.
//! * Free holes: indexed both by start (for coalescing on free) and by
//!   `(len, start)` (for best-fit allocation, ties to the lowest address).
//! * Reverse indexes keyed by `(addr, iova)`, so mappings sharing a host
//!   address stay distinct under removal.
//!
//! All address arithmetic is checked; ranges touching `u64::MAX` work
//! because ends are kept inclusive and hole lengths never reach 2^64
//! (page 0 is always excluded).

use std::collections::{BTreeMap, BTreeSet};

use crate::virtio::Perm;

/// Allocation granularity: sizes are rounded up to it, IOVAs aligned to it.
pub use crate::virtio::PAGE_SIZE;

const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// One live mapping of `size` bytes at `iova`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA of the mapping (page-aligned).
    pub iova: u64,
    /// Length in bytes, rounded up to whole pages (never zero).
    pub size: u64,
    /// Host (process virtual) address backing `iova`.
    pub host_addr: u64,
    /// Guest physical address backing `iova`, for guest memory regions.
    pub guest_addr: Option<u64>,
    /// Device access permission.
    pub perm: Perm,
}

impl Mapping {
    /// Last IOVA covered by the mapping (inclusive).
    pub fn last_iova(&self) -> u64 {
        // Cannot overflow: checked when the mapping was created.
        self.iova + (self.size - 1)
    }

    /// Whether `iova` lies inside the mapping.
    pub fn contains(&self, iova: u64) -> bool {
        self.iova <= iova && iova <= self.last_iova()
    }
}

/// Errors of [`IovaAllocator`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IovaError {
    /// A zero-byte mapping was requested.
    #[error("zero-sized IOVA mapping requested")]
    ZeroSize,
    /// No hole is large enough.
    #[error("no free IOVA range of {size:#x} bytes in [{first:#x}, {last:#x}]")]
    Exhausted {
        /// Requested size (page-rounded when rounding was possible).
        size: u64,
        /// First usable IOVA.
        first: u64,
        /// Last usable IOVA (inclusive).
        last: u64,
    },
    /// A fixed-address insert collides with a live mapping.
    #[error("IOVA range at {iova:#x} of {size:#x} bytes overlaps the mapping at {existing:#x}")]
    Overlap {
        /// Requested IOVA.
        iova: u64,
        /// Requested size (page-rounded).
        size: u64,
        /// Start IOVA of the overlapping live mapping.
        existing: u64,
    },
    /// A fixed-address insert does not fit in the usable range.
    #[error("IOVA range at {iova:#x} of {size:#x} bytes is outside [{first:#x}, {last:#x}]")]
    OutOfRange {
        /// Requested IOVA.
        iova: u64,
        /// Requested size.
        size: u64,
        /// First usable IOVA.
        first: u64,
        /// Last usable IOVA (inclusive).
        last: u64,
    },
    /// A fixed-address insert is not page-aligned.
    #[error("IOVA {iova:#x} is not aligned to {PAGE_SIZE:#x}")]
    Misaligned {
        /// Requested IOVA.
        iova: u64,
    },
    /// No live mapping starts at this IOVA.
    #[error("no mapping starts at IOVA {iova:#x}")]
    NotMapped {
        /// Requested IOVA.
        iova: u64,
    },
    /// The device range holds no usable page once page 0 is excluded.
    #[error("IOVA range [{first:#x}, {last:#x}] contains no usable page")]
    EmptyRange {
        /// First IOVA as given.
        first: u64,
        /// Last IOVA as given (inclusive).
        last: u64,
    },
    /// A host or guest address range wraps past `u64::MAX`.
    #[error("address range at {addr:#x} of {size:#x} bytes overflows the 64-bit address space")]
    Overflow {
        /// Start of the host or guest range.
        addr: u64,
        /// Its (page-rounded) size.
        size: u64,
    },
}

fn round_up_page(v: u64) -> Option<u64> {
    v.checked_add(PAGE_MASK).map(|v| v & !PAGE_MASK)
}

/// Free holes, indexed by start and by `(len, start)`.
///
/// Lengths fit in `u64` because page 0 is never free, so no hole spans 2^64.
#[derive(Debug, Default)]
struct Holes {
    by_start: BTreeMap<u64, u64>,
    by_len: BTreeSet<(u64, u64)>,
}

impl Holes {
    fn add(&mut self, start: u64, len: u64) {
        debug_assert!(len > 0);
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn take(&mut self, start: u64) -> Option<u64> {
        let len = self.by_start.remove(&start)?;
        self.by_len.remove(&(len, start));
        Some(len)
    }

    /// Smallest hole of at least `size` bytes; ties go to the lowest start.
    fn best_fit(&self, size: u64) -> Option<(u64, u64)> {
        self.by_len.range((size, 0)..).next().map(|&(len, start)| (start, len))
    }

    /// The hole containing `addr`, as `(start, len)`.
    fn containing(&self, addr: u64) -> Option<(u64, u64)> {
        let (&start, &len) = self.by_start.range(..=addr).next_back()?;
        (addr - start < len).then_some((start, len))
    }

    /// Returns `[start, start + len)` to the free pool, merging neighbours.
    fn free(&mut self, mut start: u64, mut len: u64) {
        if let Some((&ps, &pl)) = self.by_start.range(..start).next_back() {
            if ps + pl == start {
                self.take(ps);
                start = ps;
                len += pl;
            }
        }
        // `None` when the freed range ends at u64::MAX: nothing follows.
        if let Some(next) = start.checked_add(len) {
            if let Some(nl) = self.take(next) {
                len += nl;
            }
        }
        self.add(start, len);
    }
}

#[derive(Debug, Clone, Copy)]
struct RevEntry {
    /// Last address covered (inclusive).
    last: u64,
    /// Set if the range might overlap another live range (see `RevIndex`).
    flagged: bool,
}

/// Reverse index from host or guest addresses to IOVAs.
///
/// Look-up takes the entry with the greatest start `<= addr`; when the
/// live ranges are pairwise disjoint (how svq uses it) that entry is the
/// only candidate, so the look-up is `O(log n)`. Overlap is tracked
/// conservatively: an entry is flagged if, when inserted, it overlapped a
/// live range or some flagged entry was live. Every overlapping pair then
/// has a flagged member, so `flagged == 0` proves disjointness. Otherwise
/// the look-up falls back to a backward scan bounded by the largest live
/// size, which is correct but may be linear.
#[derive(Debug, Default)]
struct RevIndex {
    by_addr: BTreeMap<(u64, u64), RevEntry>,
    flagged: usize,
    /// Multiset of live sizes, for the fallback scan bound.
    sizes: BTreeMap<u64, usize>,
}

impl RevIndex {
    fn insert(&mut self, addr: u64, size: u64, iova: u64) {
        let last = addr + (size - 1); // checked by the caller
        let flagged = self.flagged > 0 || self.by_addr.range(..=(last, u64::MAX)).next_back().is_some_and(|(_, e)| e.last >= addr);
        self.flagged += usize::from(flagged);
        *self.sizes.entry(size).or_insert(0) += 1;
        self.by_addr.insert((addr, iova), RevEntry { last, flagged });
    }

    fn remove(&mut self, addr: u64, size: u64, iova: u64) {
        let Some(e) = self.by_addr.remove(&(addr, iova)) else {
            debug_assert!(false, "reverse index out of sync");
            return;
        };
        self.flagged -= usize::from(e.flagged);
        if let Some(n) = self.sizes.get_mut(&size) {
            *n -= 1;
            if *n == 0 {
                self.sizes.remove(&size);
            }
        }
    }

    /// IOVA corresponding to `addr`, if some live range contains it.
    fn lookup(&self, addr: u64) -> Option<u64> {
        let mut it = self.by_addr.range(..=(addr, u64::MAX)).rev();
        let (&(start, iova), e) = it.next()?;
        if e.last >= addr {
            return Some(iova + (addr - start));
        }
        if self.flagged == 0 {
            return None;
        }
        let max = *self.sizes.last_key_value()?.0;
        let lowest = addr.saturating_sub(max - 1);
        it.take_while(|((s, _), _)| *s >= lowest).find(|(_, e)| e.last >= addr).map(|(&(s, iova), _)| iova + (addr - s))
    }
}

/// Allocator of page-granular mappings in an inclusive IOVA range.
///
/// Page 0 is never allocated (an IOVA of 0 reads as a null address to many devices), but
/// when the device's range starts at 0 a fixed placement ([`IovaAllocator::insert`]) may
/// take it: a VMM's guest memory starts at guest address 0, and passthrough maps it at
/// IOVA = guest address.
#[derive(Debug)]
pub struct IovaAllocator {
    first: u64,
    last: u64,
    /// Whether page 0 is in the device's range (for fixed placements only; it is never
    /// in `holes`).
    page_zero: bool,
    mappings: BTreeMap<u64, Mapping>,
    holes: Holes,
    host: RevIndex,
    guest: RevIndex,
    /// Bytes mapped: up to the whole 64-bit space (2^64) when the device's range starts at 0.
    mapped: u128,
}

impl IovaAllocator {
    /// Creates an allocator for the inclusive device range `[first, last]`.
    ///
    /// The usable range excludes page 0 and any partial page at either end;
    /// [`IovaError::EmptyRange`] if no whole page remains.
    pub fn new(first: u64, last: u64) -> Result<Self, IovaError> {
        let empty = || IovaError::EmptyRange { first, last };
        if first > last {
            return Err(empty());
        }
        let lo = round_up_page(first.max(PAGE_SIZE)).ok_or_else(empty)?;
        let hi = if last & PAGE_MASK == PAGE_MASK { last } else { (last & !PAGE_MASK).checked_sub(1).ok_or_else(empty)? };
        if lo > hi {
            return Err(empty());
        }
        let mut holes = Holes::default();
        // lo >= PAGE_SIZE, so the length is at most 2^64 - PAGE_SIZE.
        holes.add(lo, hi - lo + 1);
        Ok(Self {
            first: lo,
            last: hi,
            page_zero: first == 0,
            mappings: BTreeMap::new(),
            holes,
            host: RevIndex::default(),
            guest: RevIndex::default(),
            mapped: 0,
        })
    }

    /// Usable inclusive range: page-aligned start (never page 0) and an end
    /// that is the last byte of a whole page.
    pub fn range(&self) -> (u64, u64) {
        (self.first, self.last)
    }

    /// The lowest IOVA a fixed placement may take: 0 when the device's range starts
    /// there, else the start of [`IovaAllocator::range`].
    pub fn lowest_fixed(&self) -> u64 {
        if self.page_zero {
            0
        } else {
            self.first
        }
    }

    /// Places a mapping of `size` bytes (rounded up to pages) at a free
    /// IOVA, choosing the smallest hole that fits (lowest address on ties).
    pub fn alloc(&mut self, size: u64, host_addr: u64, guest_addr: Option<u64>, perm: Perm) -> Result<Mapping, IovaError> {
        if size == 0 {
            return Err(IovaError::ZeroSize);
        }
        let exhausted = |size| IovaError::Exhausted { size, first: self.first, last: self.last };
        // Sizes that overflow on rounding exceed any possible hole.
        let size = round_up_page(size).ok_or_else(|| exhausted(size))?;
        check_addr_range(host_addr, size)?;
        if let Some(g) = guest_addr {
            check_addr_range(g, size)?;
        }
        let (start, len) = self.holes.best_fit(size).ok_or_else(|| exhausted(size))?;
        self.holes.take(start);
        if len > size {
            self.holes.add(start + size, len - size);
        }
        Ok(self.commit(Mapping { iova: start, size, host_addr, guest_addr, perm }))
    }

    /// Places a mapping at the fixed, page-aligned `iova`.
    pub fn insert(&mut self, iova: u64, size: u64, host_addr: u64, guest_addr: Option<u64>, perm: Perm) -> Result<Mapping, IovaError> {
        if size == 0 {
            return Err(IovaError::ZeroSize);
        }
        if iova & PAGE_MASK != 0 {
            return Err(IovaError::Misaligned { iova });
        }
        let out_of_range = IovaError::OutOfRange { iova, size, first: self.lowest_fixed(), last: self.last };
        let Some(size) = round_up_page(size) else {
            return Err(out_of_range);
        };
        let last = match iova.checked_add(size - 1) {
            Some(last) if iova >= self.lowest_fixed() && last <= self.last => last,
            _ => return Err(out_of_range),
        };
        check_addr_range(host_addr, size)?;
        if let Some(g) = guest_addr {
            check_addr_range(g, size)?;
        }
        // Live mappings are disjoint, so only the last one starting at or
        // before `last` can overlap.
        if let Some(m) = self.mappings.range(..=last).next_back() {
            let m = m.1;
            if m.last_iova() >= iova {
                return Err(IovaError::Overlap { iova, size, existing: m.iova });
            }
        }
        // Page 0 is outside the holes: only what lies above it comes out of one.
        let from = iova.max(PAGE_SIZE);
        if from <= last {
            let (hs, hl) = self.holes.containing(from).expect("in-range IOVA not covered by a mapping must be in a hole");
            let hole_last = hs + (hl - 1);
            debug_assert!(hole_last >= last);
            self.holes.take(hs);
            if from > hs {
                self.holes.add(hs, from - hs);
            }
            if hole_last > last {
                self.holes.add(last + 1, hole_last - last);
            }
        }
        Ok(self.commit(Mapping { iova, size, host_addr, guest_addr, perm }))
    }

    fn commit(&mut self, m: Mapping) -> Mapping {
        self.host.insert(m.host_addr, m.size, m.iova);
        if let Some(g) = m.guest_addr {
            self.guest.insert(g, m.size, m.iova);
        }
        self.mapped += u128::from(m.size);
        self.mappings.insert(m.iova, m);
        m
    }

    /// Removes the mapping starting at `iova` and frees its range.
    pub fn remove(&mut self, iova: u64) -> Result<Mapping, IovaError> {
        let m = self.mappings.remove(&iova).ok_or(IovaError::NotMapped { iova })?;
        self.host.remove(m.host_addr, m.size, m.iova);
        if let Some(g) = m.guest_addr {
            self.guest.remove(g, m.size, m.iova);
        }
        // Page 0 never goes back to the holes (it is never allocated).
        let from = m.iova.max(PAGE_SIZE);
        if from <= m.last_iova() {
            self.holes.free(from, m.last_iova() - from + 1);
        }
        self.mapped -= u128::from(m.size);
        Ok(m)
    }

    /// The mapping containing `iova`.
    pub fn find(&self, iova: u64) -> Option<&Mapping> {
        let (_, m) = self.mappings.range(..=iova).next_back()?;
        m.contains(iova).then_some(m)
    }

    /// IOVA of `host_addr`, which may lie anywhere inside a mapping's host
    /// range `[host_addr, host_addr + size)`. If several live mappings
    /// contain it, any one of them is used.
    pub fn iova_of_host(&self, host_addr: u64) -> Option<u64> {
        self.host.lookup(host_addr)
    }

    /// IOVA of `guest_addr`, like [`Self::iova_of_host`] but over the guest
    /// ranges of mappings that have one.
    pub fn iova_of_guest(&self, guest_addr: u64) -> Option<u64> {
        self.guest.lookup(guest_addr)
    }

    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.mappings.len()
    }

    /// Whether there are no live mappings.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// Total bytes of live mappings (page-rounded): up to 2^64 when the device's range
    /// starts at 0 and all of it is mapped, hence 128 bits.
    pub fn mapped_bytes(&self) -> u128 {
        self.mapped
    }

    /// Live mappings in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.values()
    }
}

/// Refuses host/guest ranges `[addr, addr + size)` that wrap past u64::MAX.
fn check_addr_range(addr: u64, size: u64) -> Result<(), IovaError> {
    match addr.checked_add(size - 1) {
        Some(_) => Ok(()),
        None => Err(IovaError::Overflow { addr, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = PAGE_SIZE;
    const RW: Perm = Perm::ReadWrite;

    fn full() -> IovaAllocator {
        IovaAllocator::new(0, u64::MAX).unwrap()
    }

    #[test]
    fn page_zero_never_handed_out() {
        let mut a = IovaAllocator::new(0, 16 * P - 1).unwrap();
        assert_eq!(a.range(), (P, 16 * P - 1));
        let m = a.alloc(1, 0x1000, None, RW).unwrap();
        assert_eq!(m.iova, P);
        assert_eq!(m.size, P);
        assert!(a.find(0).is_none());
        assert!(a.find(P - 1).is_none());
        // A range starting above 0 refuses page 0 even for a fixed placement.
        let mut above = IovaAllocator::new(P, 16 * P - 1).unwrap();
        assert_eq!(above.insert(0, P, 0, None, RW), Err(IovaError::OutOfRange { iova: 0, size: P, first: P, last: 16 * P - 1 }));
        // A range that only holds page 0 is empty.
        assert_eq!(IovaAllocator::new(0, P - 1).err(), Some(IovaError::EmptyRange { first: 0, last: P - 1 }));
    }

    #[test]
    fn a_fixed_placement_may_take_page_zero_when_the_device_range_starts_there() {
        let mut a = IovaAllocator::new(0, 16 * P - 1).unwrap();
        // Guest memory at guest address 0, placed at IOVA = guest address.
        let m = a.insert(0, 3 * P, 0x7000_0000, Some(0), RW).unwrap();
        assert_eq!((a.find(0), a.find(3 * P - 1)), (Some(&m), Some(&m)));
        assert_eq!(a.iova_of_guest(5), Some(5));
        assert!(matches!(a.insert(0, P, 0, None, RW), Err(IovaError::Overlap { existing: 0, .. })));
        assert_eq!(a.alloc(P, 0, None, RW).unwrap().iova, 3 * P, "allocation goes above it");
        assert_eq!(a.remove(0), Ok(m));
        // Page 0 is free again for a fixed placement, never for an allocation.
        assert_eq!(a.alloc(P, 0, None, RW).unwrap().iova, P);
        assert_eq!(a.insert(0, P, 0, None, RW).unwrap().iova, 0);
    }

    #[test]
    fn new_trims_partial_pages() {
        let a = IovaAllocator::new(P + 1, 5 * P + 10).unwrap();
        assert_eq!(a.range(), (2 * P, 5 * P - 1));
        assert!(matches!(IovaAllocator::new(P + 1, 2 * P + 10), Err(IovaError::EmptyRange { .. })));
        assert!(matches!(IovaAllocator::new(10 * P, 5 * P), Err(IovaError::EmptyRange { .. })));
        assert!(matches!(IovaAllocator::new(u64::MAX - 5, u64::MAX), Err(IovaError::EmptyRange { .. })));
        let a = IovaAllocator::new(u64::MAX - P + 1, u64::MAX).unwrap();
        assert_eq!(a.range(), (u64::MAX - P + 1, u64::MAX));
    }

    #[test]
    fn zero_size_refused() {
        let mut a = full();
        assert_eq!(a.alloc(0, 0, None, RW), Err(IovaError::ZeroSize));
        assert_eq!(a.insert(P, 0, 0, None, RW), Err(IovaError::ZeroSize));
    }

    #[test]
    fn inclusive_boundaries() {
        let mut a = IovaAllocator::new(P, 4 * P - 1).unwrap();
        let m = a.insert(3 * P, P, 0x10_0000, None, RW).unwrap();
        assert_eq!(m.last_iova(), 4 * P - 1);
        let m = a.alloc(2 * P, 0x20_0000, None, RW).unwrap();
        assert_eq!((m.iova, m.last_iova()), (P, 3 * P - 1));
        assert_eq!(a.mapped_bytes(), u128::from(3 * P));
        assert!(matches!(a.insert(4 * P, P, 0, None, RW), Err(IovaError::OutOfRange { .. })));
    }

    #[test]
    fn exhaustion() {
        let mut a = IovaAllocator::new(0, 4 * P - 1).unwrap();
        a.alloc(2 * P, 0, None, RW).unwrap();
        assert_eq!(a.alloc(2 * P, 0, None, RW), Err(IovaError::Exhausted { size: 2 * P, first: P, last: 4 * P - 1 }));
        a.alloc(P, 0, None, RW).unwrap();
        assert!(matches!(a.alloc(1, 0, None, RW), Err(IovaError::Exhausted { .. })));
        assert!(matches!(a.alloc(u64::MAX, 0, None, RW), Err(IovaError::Exhausted { size: u64::MAX, .. })));
        let e = a.alloc(P, 0, None, RW).unwrap_err().to_string();
        assert_eq!(e, "no free IOVA range of 0x1000 bytes in [0x1000, 0x3fff]");
    }

    #[test]
    fn insert_validation() {
        let mut a = full();
        let m = a.insert(0x10_0000, 3 * P, 0, None, RW).unwrap();
        for (iova, size) in [(0x10_0000, P), (0x10_0000 - P, 2 * P), (0x10_0000 + 2 * P, 5 * P), (0x10_0000 - 4 * P, 10 * P)] {
            assert_eq!(a.insert(iova, size, 0, None, RW), Err(IovaError::Overlap { iova, size, existing: m.iova }));
        }
        // Neighbours on both sides are fine.
        a.insert(0x10_0000 - P, P, 0, None, RW).unwrap();
        a.insert(0x10_0000 + 3 * P, P, 0, None, RW).unwrap();
        assert_eq!(a.insert(0x10_0001, P, 0, None, RW), Err(IovaError::Misaligned { iova: 0x10_0001 }));
        assert!(matches!(a.insert(u64::MAX - P + 1, 2 * P, 0, None, RW), Err(IovaError::OutOfRange { .. })));
        assert!(matches!(a.insert(P, u64::MAX, 0, None, RW), Err(IovaError::OutOfRange { .. })));
        assert_eq!(a.insert(0x20_0000, 2 * P, u64::MAX - P, None, RW), Err(IovaError::Overflow { addr: u64::MAX - P, size: 2 * P }));
        assert_eq!(a.alloc(P, 0, Some(u64::MAX), RW), Err(IovaError::Overflow { addr: u64::MAX, size: P }));
        // Failed calls leave no trace.
        assert_eq!(a.len(), 3);
        assert_eq!(a.mapped_bytes(), u128::from(5 * P));
    }

    #[test]
    fn remove_unknown() {
        let mut a = full();
        let m = a.alloc(2 * P, 0, None, RW).unwrap();
        assert_eq!(a.remove(0x1234_0000), Err(IovaError::NotMapped { iova: 0x1234_0000 }));
        // Not the start of a mapping.
        assert_eq!(a.remove(m.iova + P), Err(IovaError::NotMapped { iova: m.iova + P }));
        assert_eq!(a.remove(m.iova), Ok(m));
        assert_eq!(a.remove(m.iova), Err(IovaError::NotMapped { iova: m.iova }));
        assert!(a.is_empty());
    }

    #[test]
    fn coalescing() {
        let mut a = IovaAllocator::new(0, 4 * P - 1).unwrap();
        let ma = a.alloc(P, 0, None, RW).unwrap();
        let mb = a.alloc(P, 0, None, RW).unwrap();
        let mc = a.alloc(P, 0, None, RW).unwrap();
        assert!(a.alloc(2 * P, 0, None, RW).is_err());
        a.remove(mb.iova).unwrap();
        a.remove(ma.iova).unwrap();
        assert_eq!(a.holes.by_start.len(), 1);
        let big = a.alloc(2 * P, 0, None, RW).unwrap();
        assert_eq!(big.iova, P);
        a.remove(mc.iova).unwrap();
        a.remove(big.iova).unwrap();
        assert_eq!(a.holes.by_start.into_iter().collect::<Vec<_>>(), vec![(P, 3 * P)]);
    }

    #[test]
    fn best_fit_prefers_smallest_hole() {
        let mut a = IovaAllocator::new(0, 64 * P - 1).unwrap();
        let ms: Vec<_> = (0..8).map(|_| a.alloc(2 * P, 0, None, RW).unwrap()).collect();
        let ms2: Vec<_> = (0..4).map(|_| a.alloc(P, 0, None, RW).unwrap()).collect();
        a.remove(ms[1].iova).unwrap(); // 2-page hole
        a.remove(ms2[2].iova).unwrap(); // 1-page hole
        assert_eq!(a.alloc(P, 0, None, RW).unwrap().iova, ms2[2].iova);
        assert_eq!(a.alloc(P, 0, None, RW).unwrap().iova, ms[1].iova);
    }

    #[test]
    fn lookups_at_edges() {
        let mut a = full();
        let m = a.insert(0x10_0000, 3 * P, 0x7f00_0000, Some(0x4000_0000), Perm::ReadOnly).unwrap();
        let end = m.iova + m.size;
        assert_eq!(a.find(m.iova), Some(&m));
        assert_eq!(a.find(end - 1), Some(&m));
        assert_eq!(a.find(end), None);
        assert_eq!(a.find(m.iova - 1), None);
        assert_eq!(a.iova_of_host(0x7f00_0000), Some(m.iova));
        assert_eq!(a.iova_of_host(0x7f00_0000 + 3 * P - 1), Some(end - 1));
        assert_eq!(a.iova_of_host(0x7f00_0000 + 3 * P), None);
        assert_eq!(a.iova_of_host(0x7f00_0000 - 1), None);
        assert_eq!(a.iova_of_guest(0x4000_0000), Some(m.iova));
        assert_eq!(a.iova_of_guest(0x4000_0000 + 3 * P - 1), Some(end - 1));
        assert_eq!(a.iova_of_guest(0x4000_0000 + 3 * P), None);
        assert_eq!(a.iova_of_guest(0x4000_0000 - 1), None);
        // A mapping without guest address is not in the guest index.
        let n = a.alloc(P, 0x9000_0000, None, RW).unwrap();
        assert_eq!(a.iova_of_host(0x9000_0010), Some(n.iova + 0x10));
        assert_eq!(a.iova_of_guest(0x9000_0010), None);
        a.remove(m.iova).unwrap();
        assert_eq!(a.iova_of_host(0x7f00_0000), None);
        assert_eq!(a.iova_of_guest(0x4000_0000), None);
    }

    #[test]
    fn overlapping_host_ranges() {
        let mut a = full();
        // Same host memory mapped twice, plus a small range nested in a big
        // one: the predecessor-by-start is not always the container.
        let big = a.alloc(16 * P, 0x100_0000, None, RW).unwrap();
        let twin = a.alloc(16 * P, 0x100_0000, None, RW).unwrap();
        let small = a.alloc(P, 0x100_0000 + 2 * P, None, RW).unwrap();
        let q = 0x100_0000 + 8 * P + 5;
        let got = a.iova_of_host(q).unwrap();
        assert!(got == big.iova + 8 * P + 5 || got == twin.iova + 8 * P + 5);
        assert_eq!(a.iova_of_host(0x100_0000 + 2 * P + 1), Some(small.iova + 1));
        a.remove(big.iova).unwrap();
        assert_eq!(a.iova_of_host(q), Some(twin.iova + 8 * P + 5));
        a.remove(twin.iova).unwrap();
        assert_eq!(a.iova_of_host(q), None);
        assert_eq!(a.iova_of_host(0x100_0000 + 2 * P), Some(small.iova));
        a.remove(small.iova).unwrap();
        assert_eq!(a.host.flagged, 0);
        assert_eq!(a.iova_of_host(0x100_0000 + 2 * P), None);
    }

    #[test]
    fn nesting_survives_removal_of_flagged_entry() {
        let mut a = full();
        let h = 0x100_0000;
        let outer = a.alloc(100 * P, h, None, RW).unwrap();
        let inner = a.alloc(2 * P, h + 2 * P, None, RW).unwrap();
        // Overlaps only `outer`, not its predecessor-by-start `inner`: it must
        // still be flagged, or dropping `inner` would hide the nesting.
        let late = a.alloc(10 * P, h + 50 * P, None, RW).unwrap();
        a.remove(inner.iova).unwrap();
        assert_eq!(a.iova_of_host(h + 70 * P), Some(outer.iova + 70 * P));
        let got = a.iova_of_host(h + 55 * P);
        assert!(got == Some(late.iova + 5 * P) || got == Some(outer.iova + 55 * P));
    }

    #[test]
    fn full_64bit_range() {
        let mut a = full();
        assert_eq!(a.range(), (P, u64::MAX));
        let whole = a.alloc(u64::MAX - P + 1, 0, None, RW).unwrap();
        assert_eq!((whole.iova, whole.size), (P, u64::MAX - P + 1));
        assert_eq!(whole.last_iova(), u64::MAX);
        assert_eq!(a.find(u64::MAX), Some(&whole));
        assert_eq!(a.iova_of_host(u64::MAX - P), Some(u64::MAX));
        assert!(matches!(a.alloc(P, 0, None, RW), Err(IovaError::Exhausted { .. })));
        a.remove(P).unwrap();
        let top = a.insert(u64::MAX - P + 1, P, u64::MAX - P + 1, Some(0), RW).unwrap();
        assert_eq!(a.find(u64::MAX), Some(&top));
        assert_eq!(a.iova_of_host(u64::MAX), Some(u64::MAX));
        assert_eq!(a.iova_of_guest(P - 1), Some(u64::MAX));
        let low = a.alloc(P, 0, None, RW).unwrap();
        assert_eq!(low.iova, P);
        a.remove(top.iova).unwrap();
        a.remove(low.iova).unwrap();
        assert_eq!(a.holes.by_start.iter().collect::<Vec<_>>(), vec![(&P, &(u64::MAX - P + 1))]);
        // Rounding a size near u64::MAX must not overflow.
        assert!(matches!(a.alloc(u64::MAX - 10, 0, None, RW), Err(IovaError::Exhausted { .. })));
    }

    #[test]
    fn many_mappings() {
        const N: u64 = 100_000;
        let mut a = full();
        let mut ms = Vec::with_capacity(N as usize);
        for i in 0..N {
            let size = (i % 7 + 1) * P;
            let host = 0x7f00_0000_0000 + i * 8 * P;
            ms.push(a.alloc(size, host, Some(i * 8 * P), RW).unwrap());
        }
        for (i, m) in ms.iter().enumerate() {
            let off = (i as u64 * 13) % m.size;
            assert_eq!(a.find(m.iova + off), Some(m));
            assert_eq!(a.iova_of_host(m.host_addr + off), Some(m.iova + off));
            assert_eq!(a.iova_of_guest(i as u64 * 8 * P + off), Some(m.iova + off));
        }
        for m in ms.iter().step_by(2) {
            a.remove(m.iova).unwrap();
        }
        assert_eq!(a.len(), (N / 2) as usize);
        for m in ms.iter().skip(1).step_by(2) {
            a.remove(m.iova).unwrap();
        }
        assert!(a.is_empty());
        assert_eq!(a.holes.by_start.len(), 1);
    }

    // ---- randomized comparison with a naive model ----

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { pages: u64, host: u64, guest: Option<u64> },
        Insert { page: u64, pages: u64, host: u64, guest: Option<u64> },
        Remove { pick: usize },
        RemoveRandom { iova: u64 },
    }

    fn op_strategy(span_pages: u64) -> impl Strategy<Value = Op> {
        // Small host/guest spaces so ranges sometimes overlap and nest.
        let addr = || 0u64..64 * P;
        let guest = || proptest::option::of(0u64..64 * P);
        prop_oneof![
            4 => (1u64..6, addr(), guest())
                .prop_map(|(pages, host, guest)| Op::Alloc { pages, host, guest }),
            2 => (0..span_pages, 1u64..6, addr(), guest())
                .prop_map(|(page, pages, host, guest)| Op::Insert { page, pages, host, guest }),
            3 => any::<usize>().prop_map(|pick| Op::Remove { pick }),
            1 => (0..span_pages).prop_map(|p| Op::RemoveRandom { iova: p * P }),
        ]
    }

    /// Best fit computed the slow way from the model's live ranges.
    fn model_best_fit(live: &[Mapping], first: u64, last: u64, size: u64) -> Option<u64> {
        let mut sorted: Vec<_> = live.iter().map(|m| (m.iova, m.last_iova())).collect();
        sorted.sort();
        let mut holes = Vec::new();
        let mut cur = first as u128;
        for (s, e) in sorted {
            if (s as u128) > cur {
                holes.push((cur, s as u128 - cur));
            }
            cur = e as u128 + 1;
        }
        if cur <= last as u128 {
            holes.push((cur, last as u128 + 1 - cur));
        }
        holes.into_iter().filter(|&(_, len)| len >= size as u128).min_by_key(|&(s, len)| (len, s)).map(|(s, _)| s as u64)
    }

    fn model_lookup(live: &[Mapping], addr: u64, key: impl Fn(&Mapping) -> Option<u64>) -> Vec<u64> {
        live.iter()
            .filter_map(|m| {
                let base = key(m)?;
                (base <= addr && addr - base < m.size).then(|| m.iova + (addr - base))
            })
            .collect()
    }

    fn check_against_model(a: &IovaAllocator, live: &[Mapping]) {
        let (first, last) = a.range();
        assert_eq!(a.len(), live.len());
        assert_eq!(a.mapped_bytes(), live.iter().map(|m| u128::from(m.size)).sum::<u128>());
        let ms: Vec<_> = a.iter().copied().collect();
        let mut want = live.to_vec();
        want.sort_by_key(|m| m.iova);
        assert_eq!(ms, want);
        for w in ms.windows(2) {
            assert!(w[0].last_iova() < w[1].iova, "overlap {w:?}");
        }
        for m in &ms {
            assert!(m.iova >= a.lowest_fixed() && m.last_iova() <= last);
            assert_eq!(m.iova % P, 0);
        }
        // Probe page edges and interior bytes around and inside the range.
        let mut probe = Some(first - P);
        for _ in 0..80 {
            let Some(p) = probe else { break };
            for q in [p, p + 1, p + (P - 1)] {
                let want = live.iter().find(|m| m.contains(q));
                assert_eq!(a.find(q), want);
            }
            probe = p.checked_add(P);
        }
        // Holes and mappings together tile the usable range exactly (plus page 0 when a
        // fixed placement took it).
        let hole_bytes: u128 = a.holes.by_start.values().map(|&l| l as u128).sum();
        let page_zero = if a.find(0).is_some() { P as u128 } else { 0 };
        assert_eq!(hole_bytes + a.mapped_bytes(), last as u128 - first as u128 + 1 + page_zero);
        assert_eq!(a.holes.by_start.len(), a.holes.by_len.len());
        for q in (0..70 * P).step_by(509) {
            let hosts = model_lookup(live, q, |m| Some(m.host_addr));
            match a.iova_of_host(q) {
                None => assert!(hosts.is_empty(), "host {q:#x} missed"),
                Some(i) => assert!(hosts.contains(&i), "host {q:#x} -> {i:#x}"),
            }
            let guests = model_lookup(live, q, |m| m.guest_addr);
            match a.iova_of_guest(q) {
                None => assert!(guests.is_empty(), "guest {q:#x} missed"),
                Some(i) => assert!(guests.contains(&i), "guest {q:#x} -> {i:#x}"),
            }
        }
    }

    fn run_ops(first: u64, last: u64, ops: Vec<Op>) {
        let mut a = IovaAllocator::new(first, last).unwrap();
        let (uf, ul) = a.range();
        let mut live: Vec<Mapping> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc { pages, host, guest } => {
                    let size = pages * P;
                    let r = a.alloc(size - 7, host, guest, RW);
                    match model_best_fit(&live, uf, ul, size) {
                        Some(iova) => {
                            let m = r.unwrap();
                            assert_eq!((m.iova, m.size), (iova, size));
                            live.push(m);
                        }
                        None => assert!(matches!(r, Err(IovaError::Exhausted { .. }))),
                    }
                }
                Op::Insert { page, pages, host, guest } => {
                    // Starts one page below the range; wraps to a low IOVA at the top.
                    let iova = (uf - P).wrapping_add(page * P);
                    let size = pages * P;
                    let r = a.insert(iova, size, host, guest, Perm::WriteOnly);
                    let end = iova.checked_add(size - 1);
                    // Page 0 is taken by a fixed placement only on a range starting at 0.
                    let low = if first == 0 { 0 } else { uf };
                    let Some(end) = end.filter(|&e| iova >= low && e <= ul) else {
                        assert!(matches!(r, Err(IovaError::OutOfRange { .. })), "{r:?}");
                        continue;
                    };
                    // The overlapping mapping with the greatest start is named.
                    let existing = live.iter().filter(|m| m.iova <= end && iova <= m.last_iova()).map(|m| m.iova).max();
                    match existing {
                        Some(existing) => assert_eq!(r, Err(IovaError::Overlap { iova, size, existing })),
                        None => live.push(r.unwrap()),
                    }
                }
                Op::Remove { pick } => {
                    if !live.is_empty() {
                        let m = live.swap_remove(pick % live.len());
                        assert_eq!(a.remove(m.iova), Ok(m));
                    }
                }
                Op::RemoveRandom { iova } => {
                    let iova = uf.wrapping_add(iova);
                    match live.iter().position(|m| m.iova == iova) {
                        Some(i) => assert_eq!(a.remove(iova), Ok(live.swap_remove(i))),
                        None => assert_eq!(a.remove(iova), Err(IovaError::NotMapped { iova })),
                    }
                }
            }
            check_against_model(&a, &live);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_model_small_range(
            first in 0u64..3 * P,
            span in 1u64..40,
            tail in 0u64..P,
            ops in proptest::collection::vec(op_strategy(48), 1..80),
        ) {
            let first_page = first.max(P).div_ceil(P);
            let last = (first_page + span) * P + tail - 1;
            run_ops(first, last, ops);
        }

        #[test]
        fn matches_model_top_of_space(
            ops in proptest::collection::vec(op_strategy(40), 1..80),
        ) {
            run_ops(u64::MAX - 32 * P + 1, u64::MAX, ops);
        }
    }
}
