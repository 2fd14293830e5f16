//! The driver-side role over a split ring: a free list of descriptors, an in-flight table
//! keyed by head, publishing with the right barriers, and validated reaping of used
//! entries. svq plays this role on the shadow ring; the in-process guest driver plays it
//! on the guest ring.
//!
//! The free list and chain lengths are kept in host memory of our own: the device can
//! scribble on the descriptor table, so nothing we need later is read back from it.

use super::access::Vring;
use super::barrier;
use super::layout::{
    need_event, Descriptor, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};

/// What a device did wrong in its used ring. Each variant names the broken rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsedError {
    /// `used.idx` moved by more than the queue size (or went backwards).
    #[error("device moved used index from {last} to {idx}: more than the queue size {size}")]
    UsedIdxJump {
        /// Last index reaped.
        last: u16,
        /// Index the device published.
        idx: u16,
        /// Queue size.
        size: u16,
    },
    /// A used id outside the descriptor table.
    #[error("device completed id {id}, outside the queue of {size}")]
    IdOutOfRange {
        /// The id.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used id that is not the head of a chain in flight (never made available, or
    /// completed twice).
    #[error("device completed id {id}, which is not in flight")]
    IdNotInFlight {
        /// The id.
        id: u32,
    },
    /// A written length larger than the chain's device-writable bytes.
    #[error("device reported {len} bytes written to chain {id}, which has only {writable} writable bytes")]
    LenTooLarge {
        /// The id.
        id: u32,
        /// Reported length.
        len: u32,
        /// Writable bytes of the chain.
        writable: u32,
    },
}

/// Not enough free descriptors for a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("chain of {needed} descriptors does not fit: {free} free of {size}")]
pub struct RingFull {
    /// Descriptors the chain needs.
    pub needed: usize,
    /// Descriptors free now.
    pub free: u16,
    /// Queue size (a chain longer than this can never fit).
    pub size: u16,
}

/// One buffer to place on the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    /// Address in the ring's address space.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Driver side of one split ring.
#[derive(Debug)]
pub struct RingWriter {
    ring: Vring,
    /// Our own copy of each descriptor's `next` (the free list and the chains).
    next: Vec<u16>,
    /// Descriptors per in-flight head; 0 when not in flight.
    chain_len: Vec<u16>,
    /// Device-writable bytes per in-flight head.
    writable: Vec<u32>,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    /// avail_idx at the last kick decision.
    kicked_avail: u16,
    last_used: u16,
    event_idx: bool,
}

impl RingWriter {
    /// A writer over a fresh ring (all descriptors free, indices at `base`). The avail and
    /// used rings are zeroed except the indices.
    pub fn new(ring: Vring, base: u16, event_idx: bool) -> Self {
        let size = ring.size();
        let next = (1..=size).map(|i| i % size).collect();
        ring.set_avail_flags(0);
        ring.set_avail_idx(base);
        ring.set_used_event(base);
        ring.set_used_flags(0);
        ring.set_used_idx(base);
        ring.set_avail_event(base);
        RingWriter {
            ring,
            next,
            chain_len: vec![0; size as usize],
            writable: vec![0; size as usize],
            free_head: 0,
            num_free: size,
            avail_idx: base,
            kicked_avail: base,
            last_used: base,
            event_idx,
        }
    }

    /// The ring.
    pub fn ring(&self) -> &Vring {
        &self.ring
    }
    /// Queue size.
    pub fn size(&self) -> u16 {
        self.ring.size()
    }
    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }
    /// Chains in flight.
    pub fn in_flight(&self) -> usize {
        self.chain_len.iter().filter(|&&n| n != 0).count()
    }
    /// The avail index we published last (what the device's vring base should reach).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }
    /// The used index reaped up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }
    /// Heads in flight, in index order.
    pub fn in_flight_heads(&self) -> impl Iterator<Item = u16> + '_ {
        self.chain_len.iter().enumerate().filter(|(_, &n)| n != 0).map(|(i, _)| i as u16)
    }

    /// Writes a chain and its avail entry; it becomes visible at [`RingWriter::publish`].
    #[inline]
    pub fn add(&mut self, bufs: &[Buf]) -> Result<u16, RingFull> {
        let n = bufs.len();
        let Some((last, rest)) = bufs.split_last().filter(|_| n <= self.num_free as usize) else {
            return Err(self.full(n));
        };
        let head = self.free_head;
        let mut idx = head;
        let mut writable = 0u64;
        for b in rest {
            // Free-list entries are always below the queue size (`new`, `free_chain`).
            let next = self.next[idx as usize];
            let flags = VRING_DESC_F_NEXT | if b.write { VRING_DESC_F_WRITE } else { 0 };
            self.ring.set_desc(idx, Descriptor::new(b.addr, b.len, flags, next));
            writable += if b.write { b.len as u64 } else { 0 };
            idx = next;
        }
        let flags = if last.write { VRING_DESC_F_WRITE } else { 0 };
        self.ring.set_desc(idx, Descriptor::new(last.addr, last.len, flags, 0));
        writable += if last.write { last.len as u64 } else { 0 };
        self.free_head = self.next[idx as usize];
        self.num_free -= n as u16;
        self.chain_len[head as usize] = n as u16;
        self.writable[head as usize] = writable.min(u32::MAX as u64) as u32;
        self.ring.set_avail_entry(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(head)
    }

    #[cold]
    fn full(&self, needed: usize) -> RingFull {
        RingFull { needed, free: self.num_free, size: self.size() }
    }

    /// Adds a chain described by an indirect table the caller already wrote at `table`
    /// (`entries` descriptors, `writable` device-writable bytes in all): one descriptor.
    pub fn add_indirect(&mut self, table: u64, entries: u32, writable: u32) -> Result<u16, RingFull> {
        if self.num_free == 0 {
            return Err(RingFull { needed: 1, free: 0, size: self.size() });
        }
        let head = self.free_head;
        self.ring.set_desc(head, Descriptor::new(table, entries * 16, VRING_DESC_F_INDIRECT, 0));
        self.free_head = self.next[head as usize];
        self.num_free -= 1;
        self.chain_len[head as usize] = 1;
        self.writable[head as usize] = writable;
        self.ring.set_avail_entry(self.avail_idx, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(head)
    }

    /// Whether chains were added since the last publish.
    #[inline]
    pub fn has_unpublished(&self) -> bool {
        self.kicked_avail != self.avail_idx
    }

    /// Publishes added chains and says whether the device wants a kick.
    pub fn publish(&mut self) -> bool {
        let old = self.kicked_avail;
        if old == self.avail_idx {
            return false;
        }
        // Descriptors and avail entries before avail.idx (2.7.13 step 3).
        barrier::publish();
        self.ring.set_avail_idx(self.avail_idx);
        // Publish, then read the device's suppression word (2.7.13.4).
        barrier::full();
        self.kicked_avail = self.avail_idx;
        if self.event_idx {
            need_event(self.ring.avail_event(), self.avail_idx, old)
        } else {
            self.ring.used_flags() & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// Whether the device published used entries not reaped yet (a cheap look for polling;
    /// [`RingWriter::pop_used`] validates them).
    #[inline]
    pub fn has_used(&self) -> bool {
        self.ring.used_idx() != self.last_used
    }

    /// Reaps one used entry, validated: `Ok(Some((head, len)))`, `Ok(None)` when none.
    /// After an error the queue must be treated as broken.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, UsedError> {
        let idx = self.ring.used_idx();
        let pending = idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        let size = self.size();
        if pending > size {
            return Err(UsedError::UsedIdxJump { last: self.last_used, idx, size });
        }
        // Entries covered by used.idx are read after it (2.7.13.1 mirrored for used).
        barrier::after_index_read();
        let (id, len) = self.ring.used_entry(self.last_used);
        if id >= size as u32 {
            return Err(UsedError::IdOutOfRange { id, size });
        }
        let head = id as u16;
        let n = self.chain_len[head as usize];
        if n == 0 {
            return Err(UsedError::IdNotInFlight { id });
        }
        let writable = self.writable[head as usize];
        if len > writable {
            return Err(UsedError::LenTooLarge { id, len, writable });
        }
        self.last_used = self.last_used.wrapping_add(1);
        self.free_chain(head);
        Ok(Some((head, len)))
    }

    /// Returns a chain's descriptors to the free list without a used entry (stop/drain).
    pub fn reclaim(&mut self, head: u16) -> bool {
        if head >= self.size() || self.chain_len[head as usize] == 0 {
            return false;
        }
        self.free_chain(head);
        true
    }

    #[inline]
    fn free_chain(&mut self, head: u16) {
        let n = self.chain_len[head as usize];
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[tail as usize];
        }
        self.next[tail as usize] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.chain_len[head as usize] = 0;
        self.writable[head as usize] = 0;
    }

    /// Asks for interrupts again; true when used entries arrived meanwhile (re-arm, full
    /// fence, re-check).
    pub fn enable_cb(&mut self) -> bool {
        if self.event_idx {
            self.ring.set_used_event(self.last_used);
        } else {
            self.ring.set_avail_flags(0);
        }
        barrier::full();
        self.ring.used_idx() != self.last_used
    }

    /// Suppresses interrupts while we are reaping anyway.
    pub fn disable_cb(&mut self) {
        if !self.event_idx {
            self.ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT);
        }
    }
}
