//! The device-side role over a split ring: pop available chains (validating everything the
//! driver controls) and push used entries. svq plays this role towards the guest, and the
//! embedded device plays it towards the shadow ring.

use super::access::Vring;
use super::barrier;
use super::layout::{need_event, Descriptor, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};

/// One buffer of a chain, in the address space of the ring (guest addresses or IOVAs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub addr: u64,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A popped chain: device-readable segments, then device-writable ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index (the id to complete it with).
    pub head: u16,
    /// Device-readable segments, in order.
    pub out: Vec<Segment>,
    /// Device-writable segments, in order.
    pub inn: Vec<Segment>,
    /// Sum of `out` lengths.
    pub out_len: u64,
    /// Sum of `inn` lengths: the most the device may report written.
    pub in_len: u64,
}

impl Chain {
    /// Empties the chain (its lists keep their capacity).
    pub fn clear(&mut self) {
        self.out.clear();
        self.inn.clear();
        self.out_len = 0;
        self.in_len = 0;
    }
}

/// Receives the segments of a chain as [`RingReader::pop_with`] validates them, in chain
/// order (every device-readable segment before the first device-writable one). A segment
/// reaches the sink only after every check of its descriptor passed; a later descriptor
/// of the same chain may still fail, in which case the pop returns that error.
pub trait ChainSink {
    /// One validated segment (`write`: device-writable).
    fn segment(&mut self, seg: Segment, write: bool);
}

impl ChainSink for Chain {
    #[inline]
    fn segment(&mut self, seg: Segment, write: bool) {
        if write {
            self.inn.push(seg);
            self.in_len += seg.len as u64;
        } else {
            self.out.push(seg);
            self.out_len += seg.len as u64;
        }
    }
}

/// What a driver did wrong in its ring. Each variant names the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// `avail.idx` moved by more than the queue size since the last pop.
    #[error("avail index jumped from {last} to {idx}: more than the queue size {size}")]
    AvailIdxJump {
        /// Last index popped.
        last: u16,
        /// Index the driver published.
        idx: u16,
        /// Queue size.
        size: u16,
    },
    /// An avail ring entry names a descriptor outside the table.
    #[error("avail entry names head {head}, outside the queue of {size}")]
    HeadOutOfRange {
        /// The head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A `next` field points outside its table.
    #[error("descriptor {index} of chain {head} has next {next}, outside the table of {size}")]
    NextOutOfRange {
        /// Chain head.
        head: u16,
        /// Descriptor whose `next` is bad.
        index: u16,
        /// The bad `next`.
        next: u16,
        /// Table size.
        size: u32,
    },
    /// The chain visits more descriptors than its table holds (a loop, or too long).
    #[error("chain {head} is longer than its table of {budget} descriptors (a loop?)")]
    ChainTooLong {
        /// Chain head.
        head: u16,
        /// Descriptors allowed.
        budget: u32,
    },
    /// A descriptor of length 0.
    #[error("chain {head} has a zero-length descriptor at {addr:#x}")]
    ZeroLength {
        /// Chain head.
        head: u16,
        /// Its address.
        addr: u64,
    },
    /// A buffer outside the memory the ring may point at (or `addr + len` wraps).
    #[error("chain {head} points at {addr:#x}+{len:#x}, outside {space}")]
    BadAddress {
        /// Chain head.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u64,
        /// Which memory: "guest memory" or "the device's IOTLB".
        space: &'static str,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("chain {head} has a device-readable descriptor after a device-writable one")]
    ReadAfterWrite {
        /// Chain head.
        head: u16,
    },
    /// INDIRECT used without `RING_INDIRECT_DESC` negotiated.
    #[error("chain {head} uses an indirect table but INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated {
        /// Chain head.
        head: u16,
    },
    /// An indirect table inside an indirect table, or INDIRECT combined with NEXT.
    #[error("chain {head} nests indirect tables or chains past one")]
    NestedIndirect {
        /// Chain head.
        head: u16,
    },
    /// An indirect table whose length is not a non-zero multiple of 16 within bounds.
    #[error("chain {head} has an indirect table of {len} bytes (must be a non-zero multiple of 16, at most {max} entries)")]
    IndirectLength {
        /// Chain head.
        head: u16,
        /// Table length.
        len: u32,
        /// Most entries allowed.
        max: u32,
    },
    /// An indirect table not aligned to 16 bytes... or unreadable as one piece.
    #[error("chain {head} has an indirect table at {addr:#x} that cannot be read")]
    IndirectUnreadable {
        /// Chain head.
        head: u16,
        /// Table address.
        addr: u64,
    },
}

/// The memory a ring's buffers live in, as the device side sees it.
pub trait BufferSpace {
    /// Name used in errors ("guest memory", "the device's IOTLB").
    const NAME: &'static str;
    /// Whether `[addr, addr+len)` may be accessed (written when `write`).
    fn check(&self, addr: u64, len: u64, write: bool) -> bool;
    /// Reads descriptor `i` of an indirect table at `table` (already checked readable).
    fn read_desc(&self, table: u64, i: u32) -> Option<Descriptor>;
}

/// Device side of one split ring.
#[derive(Debug)]
pub struct RingReader {
    ring: Vring,
    last_avail: u16,
    used_idx: u16,
    /// `used_idx` when the driver was last signalled (for EVENT_IDX).
    signalled_used: u16,
    event_idx: bool,
    indirect: bool,
}

impl RingReader {
    /// A reader starting at avail index `base`, with the negotiated ring features.
    pub fn new(ring: Vring, base: u16, event_idx: bool, indirect: bool) -> Self {
        Self::resume(ring, base, base, event_idx, indirect)
    }

    /// A reader over a ring that ran before: the next chain to pop is `avail`, and the
    /// used index the driver saw last is `used` (below `avail` by the chains still in
    /// flight).
    pub fn resume(ring: Vring, avail: u16, used: u16, event_idx: bool, indirect: bool) -> Self {
        RingReader { ring, last_avail: avail, used_idx: used, signalled_used: used, event_idx, indirect }
    }

    /// The ring.
    pub fn ring(&self) -> &Vring {
        &self.ring
    }

    /// Points the reader at the same ring through new host pointers (a device re-translates
    /// ring IOVAs on each pass, since mappings may change between passes).
    pub fn set_ring(&mut self, ring: Vring) {
        self.ring = ring;
    }

    /// Next avail index to pop (what VHOST_GET_VRING_BASE reports).
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// Whether the driver published chains not popped yet (a cheap look for polling; a
    /// bad index is found by the pop).
    #[inline]
    pub fn has_avail(&self) -> bool {
        self.ring.avail_idx() != self.last_avail
    }

    /// Chains the driver published and we have not popped yet.
    pub fn pending(&self) -> Result<u16, ChainError> {
        let idx = self.ring.avail_idx();
        let n = idx.wrapping_sub(self.last_avail);
        if n > self.ring.size() {
            return Err(ChainError::AvailIdxJump { last: self.last_avail, idx, size: self.ring.size() });
        }
        Ok(n)
    }

    /// Pops the next chain into `chain`. `Ok(false)` when the ring is empty.
    /// On error the chain is consumed (the avail index moves past it) so that a
    /// policy may complete it with an error; `AvailIdxJump` consumes nothing.
    pub fn pop<M: BufferSpace>(&mut self, mem: &M, chain: &mut Chain) -> Result<bool, ChainError> {
        let Some(head) = self.next_head()? else { return Ok(false) };
        chain.clear();
        chain.head = head;
        self.walk(mem, head, chain)?;
        Ok(true)
    }

    /// Pops the next chain, handing each validated segment to `sink` instead of
    /// collecting them: the head, or `Ok(None)` when the ring is empty. The same checks
    /// and the same consumption on error as [`RingReader::pop`].
    #[inline]
    pub fn pop_with<M: BufferSpace, S: ChainSink>(&mut self, mem: &M, sink: &mut S) -> Result<Option<u16>, ChainError> {
        let Some(head) = self.next_head()? else { return Ok(None) };
        self.walk(mem, head, sink)?;
        Ok(Some(head))
    }

    /// Walks the chain at `head` again (one svq popped before and has in flight), handing
    /// its segments to `sink` with every check of a pop; the avail ring is not touched.
    pub fn walk_head<M: BufferSpace, S: ChainSink>(&self, mem: &M, head: u16, sink: &mut S) -> Result<(), ChainError> {
        self.walk(mem, head, sink)
    }

    /// Takes the next avail entry (moving past it), or None when the ring is empty.
    #[inline]
    fn next_head(&mut self) -> Result<Option<u16>, ChainError> {
        if self.pending()? == 0 {
            return Ok(None);
        }
        // The entries covered by avail.idx are read only after the index (2.7.13.1).
        barrier::after_index_read();
        let head = self.ring.avail_entry(self.last_avail);
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Rewinds the last pop (used when a popped chain must wait for shadow ring space).
    pub fn unpop(&mut self) {
        self.last_avail = self.last_avail.wrapping_sub(1);
    }

    /// Rewinds the last `n` pops: those chains will be popped again by whoever serves the
    /// ring next (they were never used).
    pub fn rewind(&mut self, n: u16) {
        self.last_avail = self.last_avail.wrapping_sub(n);
    }

    #[inline]
    fn walk<M: BufferSpace, S: ChainSink>(&self, mem: &M, head: u16, chain: &mut S) -> Result<(), ChainError> {
        let size = self.ring.size();
        if head >= size {
            return Err(ChainError::HeadOutOfRange { head, size });
        }
        let mut seen_write = false;
        let mut idx = head;
        // A walk visits each descriptor at most once: the budget is the table size.
        let mut budget = size as u32;
        loop {
            if budget == 0 {
                return Err(ChainError::ChainTooLong { head, budget: size as u32 });
            }
            budget -= 1;
            let d = self.ring.desc(idx);
            let flags = d.flags();
            if flags & VRING_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(ChainError::IndirectNotNegotiated { head });
                }
                // The table is the whole chain (a driver never chains past one, and a
                // table after direct descriptors would let a chain exceed the queue size).
                if flags & VRING_DESC_F_NEXT != 0 || idx != head {
                    return Err(ChainError::NestedIndirect { head });
                }
                return self.walk_indirect(mem, head, d, chain);
            }
            add_segment::<M, S>(mem, head, d, chain, &mut seen_write)?;
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            let next = d.next();
            if next >= size {
                return Err(ChainError::NextOutOfRange { head, index: idx, next, size: size as u32 });
            }
            idx = next;
        }
    }

    #[cold]
    fn walk_indirect<M: BufferSpace, S: ChainSink>(&self, mem: &M, head: u16, table: Descriptor, chain: &mut S) -> Result<(), ChainError> {
        let len = table.len();
        let max = self.ring.size() as u32;
        if len == 0 || !len.is_multiple_of(16) || len / 16 > max {
            return Err(ChainError::IndirectLength { head, len, max });
        }
        let addr = table.addr();
        if !addr.is_multiple_of(16) {
            return Err(ChainError::IndirectUnreadable { head, addr });
        }
        if !mem.check(addr, len as u64, false) {
            return Err(ChainError::BadAddress { head, addr, len: len as u64, space: M::NAME });
        }
        let n = len / 16;
        let mut seen_write = false;
        let mut i = 0u32;
        let mut budget = n;
        loop {
            if budget == 0 {
                return Err(ChainError::ChainTooLong { head, budget: n });
            }
            budget -= 1;
            let d = mem.read_desc(addr, i).ok_or(ChainError::IndirectUnreadable { head, addr })?;
            if d.flags() & VRING_DESC_F_INDIRECT != 0 {
                return Err(ChainError::NestedIndirect { head });
            }
            add_segment::<M, S>(mem, head, d, chain, &mut seen_write)?;
            if d.flags() & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            let next = d.next() as u32;
            if next >= n {
                return Err(ChainError::NextOutOfRange { head, index: i as u16, next: next as u16, size: n });
            }
            i = next;
        }
    }

    /// Writes a used entry; it becomes visible at the next [`RingReader::publish_used`].
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        self.ring.set_used_entry(self.used_idx, head as u32, len);
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// The used index after the entries pushed so far (published or not).
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    /// Entries pushed and not yet published.
    pub fn unpublished(&self) -> u16 {
        self.used_idx.wrapping_sub(self.signalled_used)
    }

    /// Forgets entries pushed and not yet published (a device that never completes them).
    pub fn discard_unpublished(&mut self) {
        self.used_idx = self.signalled_used;
    }

    /// Makes pushed entries visible and says whether the driver wants a notification.
    pub fn publish_used(&mut self) -> bool {
        let old = self.signalled_used;
        if old == self.used_idx {
            return false;
        }
        // Used entries before used.idx (2.7.8).
        barrier::publish();
        self.ring.set_used_idx(self.used_idx);
        // Publish, then read the driver's suppression word (2.7.7.2).
        barrier::full();
        self.signalled_used = self.used_idx;
        if self.event_idx {
            need_event(self.ring.used_event(), self.used_idx, old)
        } else {
            self.ring.avail_flags() & super::layout::VRING_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver for kicks again and reports whether work arrived meanwhile
    /// (re-arm, full fence, re-check: no kick is lost in between).
    pub fn enable_notify(&mut self) -> bool {
        if self.event_idx {
            self.ring.set_avail_event(self.last_avail);
        } else {
            self.ring.set_used_flags(0);
        }
        barrier::full();
        self.ring.avail_idx() != self.last_avail
    }

    /// Tells the driver that kicks are not needed while we are popping.
    pub fn disable_notify(&mut self) {
        if !self.event_idx {
            self.ring.set_used_flags(VRING_USED_F_NO_NOTIFY);
        }
        // With EVENT_IDX, avail_event simply stays behind: the driver kicks only when it
        // passes it, which the re-arm in `enable_notify` moves forward.
    }
}

#[inline]
fn add_segment<M: BufferSpace, S: ChainSink>(
    mem: &M,
    head: u16,
    d: Descriptor,
    chain: &mut S,
    seen_write: &mut bool,
) -> Result<(), ChainError> {
    let addr = d.addr();
    let len = d.len();
    if len == 0 {
        return Err(ChainError::ZeroLength { head, addr });
    }
    let write = d.flags() & VRING_DESC_F_WRITE != 0;
    if addr.checked_add(len as u64).is_none() || !mem.check(addr, len as u64, write) {
        return Err(ChainError::BadAddress { head, addr, len: len as u64, space: M::NAME });
    }
    if write {
        *seen_write = true;
    } else if *seen_write {
        return Err(ChainError::ReadAfterWrite { head });
    }
    chain.segment(Segment { addr, len }, write);
    Ok(())
}
