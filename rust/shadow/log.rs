//! Dirty logging on a shadowed queue: every guest page written on the device's behalf is
//! marked in the dirty log while one is attached: the guest's used ring, the writable
//! buffers the device filled (translate: the chain is walked again, up to the used
//! length), the bytes svq copied back (copy) or a hook answered with. svq's own injected
//! elements are not guest memory and are never logged.

use std::sync::Arc;

use super::ShadowQueue;
use crate::dirty::DirtyLog;
use crate::mem::GuestMemory;
use crate::ring::layout::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use crate::ring::{BufferSpace, ChainSink, Segment};
use crate::virtio::PAGE_SIZE;

/// Marks the writable segments of a chain, up to the used length.
struct Written<'a> {
    log: &'a DirtyLog,
    left: u64,
}

impl ChainSink for Written<'_> {
    fn segment(&mut self, seg: Segment, write: bool) {
        if write && self.left > 0 {
            let n = (seg.len as u64).min(self.left);
            self.log.mark(seg.addr, n);
            self.left -= n;
        }
    }
}

/// Whether `[addr, addr + len)` is guest memory; `at` is the region the last buffer was
/// in (a chain's buffers mostly share one), and becomes this one's.
#[inline]
fn in_guest(mem: &GuestMemory, at: &mut usize, addr: u64, len: u64) -> bool {
    let regions = mem.regions();
    if regions.get(*at).is_some_and(|r| r.contains(addr, len)) {
        return true;
    }
    match regions.iter().position(|r| r.contains(addr, len)) {
        Some(i) => {
            *at = i;
            true
        }
        // Across adjacent regions, or not guest memory.
        None => mem.check(addr, len, true),
    }
}

impl ShadowQueue {
    /// Attaches (or detaches) the dirty log.
    pub fn set_dirty_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.log = log;
    }

    /// Whether a dirty log is attached.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Logs what the device wrote into guest chain `head` (`len` bytes). A translated
    /// chain keeps nothing of its own but the head, so its descriptors are read again:
    /// only to find the writable buffers, since svq validated the chain when it popped it
    /// (the full walk of a pop costs about as much as forwarding the element again, and
    /// this runs for every element the device completes while a migration runs). The
    /// guest must not change a chain it has in flight; if it did, it gets its own (wrong)
    /// pages logged, never anything outside guest memory, and the walk stays bounded.
    #[inline]
    pub(super) fn log_chain(&self, head: u16, len: u32) {
        let Some(log) = self.log.as_deref() else { return };
        if len == 0 {
            return;
        }
        let ring = self.guest.ring();
        let (mut i, mut left, mut at) = (head, u64::from(len), 0);
        // Pages written so far and not marked yet: consecutive buffers of a chain mostly
        // share pages or follow each other, and are marked together.
        let (mut lo, mut hi) = (1, 0);
        for _ in 0..ring.size() {
            let d = ring.desc(i);
            let flags = d.flags();
            if flags & VRING_DESC_F_INDIRECT != 0 {
                if i == head {
                    self.log_indirect(log, head, left);
                }
                break;
            }
            if flags & VRING_DESC_F_WRITE != 0 && !d.is_empty() {
                let (addr, n) = (d.addr(), u64::from(d.len()).min(left));
                if in_guest(&self.mem, &mut at, addr, n) {
                    // Inside guest memory: addr + n does not wrap.
                    let (first, last) = (addr / PAGE_SIZE, (addr + n - 1) / PAGE_SIZE);
                    if lo <= hi && (lo..=hi + 1).contains(&first) {
                        hi = hi.max(last);
                    } else {
                        if lo <= hi {
                            log.mark_device_pages(lo, hi);
                        }
                        (lo, hi) = (first, last);
                    }
                }
                left -= n;
                if left == 0 {
                    break;
                }
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            i = d.next();
        }
        if lo <= hi {
            log.mark_device_pages(lo, hi);
        }
    }

    /// An indirect chain: walked again by the reader, with every check of a pop.
    #[cold]
    fn log_indirect(&self, log: &DirtyLog, head: u16, len: u64) {
        let mut w = Written { log, left: len };
        let _ = self.guest.walk_head(&*self.mem, head, &mut w);
    }

    /// Logs writes into known guest segments, up to `len` bytes.
    pub(super) fn log_segments(&self, segs: &[Segment], len: u64) {
        let Some(log) = self.log.as_deref() else { return };
        let mut w = Written { log, left: len };
        segs.iter().for_each(|s| w.segment(*s, true));
    }

    /// Logs the guest's used ring (svq wrote entries and the index).
    pub(super) fn log_used_ring(&self) {
        if let Some(log) = self.log.as_deref() {
            log.mark(self.used_gpa, self.guest.ring().layout().used_bytes());
        }
    }
}
