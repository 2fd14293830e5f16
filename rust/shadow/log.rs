//! Dirty logging on a shadowed queue: every guest page written on the device's behalf is
//! marked in the dirty log while one is attached: the guest's used ring, the writable
//! buffers the device filled up to the used length (translate: from the pages noted when
//! the chain was popped, or by walking the chain again when they do not tell), the bytes
//! svq copied back (copy) or a hook answered with. svq's own injected elements are not
//! guest memory and are never logged.

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
        if log.is_some() {
            self.in_flight.forget_spans();
        }
        self.log = log;
    }

    /// Whether a dirty log is attached.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Logs what the device wrote into the guest chain `head` on shadow head `shadow_head`
    /// (`len` bytes): from the pages noted when the chain was popped when they tell
    /// (see [`WriteSpan`](super::inflight::WriteSpan)), otherwise by walking the chain again.
    #[inline]
    pub(super) fn log_chain(&self, shadow_head: u16, head: u16, len: u32) {
        let Some(log) = self.log.as_deref() else { return };
        if len == 0 {
            return;
        }
        match self.in_flight.span(shadow_head).written_pages(len) {
            Some((first, last)) => log.mark_device_pages(first, last),
            None => self.log_walk(log, head, len),
        }
    }

    /// Logs a chain by reading its descriptors again: only to find the writable buffers,
    /// since svq validated the chain when it popped it (the full walk of a pop costs about
    /// as much as forwarding the element again). The guest must not change a chain it has
    /// in flight; if it did, it gets its own (wrong) pages logged, never anything outside
    /// guest memory, and the walk stays bounded.
    #[inline(never)]
    fn log_walk(&self, log: &DirtyLog, head: u16, len: u32) {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::eventfd::EventFd;
    use crate::fault::QueueHealth;
    use crate::ring::{Buf, Chain, Descriptor, RingLayout, RingReader, RingWriter, Vring};
    use crate::shadow::{Forwarding, QueueStats, RegionIova, ShadowFds, ShadowParts};

    const GPA: u64 = 0x10_0000;
    const SIZE: u64 = 1 << 20;
    const IOVA: u64 = 0x1_0000_0000;
    const PAGE: u64 = PAGE_SIZE;
    /// Guest pages the buffers of these tests use (above the ring's).
    const BUFS: u64 = GPA / PAGE + 16;

    /// The device's view: the guest region at its IOVA.
    struct Iotlb;
    impl BufferSpace for Iotlb {
        const NAME: &'static str = "the test device";
        fn check(&self, addr: u64, len: u64, _write: bool) -> bool {
            addr >= IOVA && addr + len <= IOVA + SIZE
        }
        fn read_desc(&self, _table: u64, _i: u32) -> Option<Descriptor> {
            None
        }
    }

    /// A translate-mode queue, the guest's ring and the device's side of the shadow ring.
    struct Rig {
        sq: ShadowQueue,
        guest_ring: Vring,
        guest: RingWriter,
        device: RingReader,
        log: Arc<DirtyLog>,
        _mem: (Arc<GuestMemory>, GuestMemory),
    }

    impl Rig {
        fn new() -> Rig {
            let mem = Arc::new(GuestMemory::new(&[(GPA, SIZE)]).unwrap());
            let layout = RingLayout::new(8).unwrap();
            let guest_ring = mem.packed_vring(GPA, layout).unwrap();
            let shadow_mem = GuestMemory::new(&[(0, 0x1_0000)]).unwrap();
            let shadow_ring = shadow_mem.packed_vring(0, layout).unwrap();
            let efd = || EventFd::new().unwrap();
            let sq = ShadowQueue::new(ShadowParts {
                index: 0,
                forwarding: Forwarding::Translate,
                guest: RingReader::new(guest_ring, 0, true, false),
                shadow: RingWriter::new(shadow_ring, 0, true),
                mem: mem.clone(),
                regions: vec![RegionIova { gpa: GPA, size: SIZE, iova: IOVA }],
                fds: ShadowFds { guest_kick: Arc::new(efd()), guest_call: Arc::new(efd()), device_kick: efd(), device_call: efd() },
                stats: Arc::new(QueueStats::default()),
                health: Arc::new(QueueHealth::default()),
                bounce_space: None,
                bounce: None,
                used_gpa: GPA + layout.packed_offsets().2,
            });
            let log = Arc::new(DirtyLog::new(GPA + SIZE).unwrap());
            Rig {
                sq,
                guest_ring,
                guest: RingWriter::new(guest_ring, 0, false),
                device: RingReader::new(shadow_ring, 0, false, false),
                log,
                _mem: (mem, shadow_mem),
            }
        }

        /// The guest posts a chain of writable buffers `(guest page, offset, len)`; svq
        /// forwards it.
        fn post(&mut self, bufs: &[(u64, u64, u32)]) -> u16 {
            let bufs: Vec<Buf> = bufs.iter().map(|&(page, off, len)| Buf { addr: page * PAGE + off, len, write: true }).collect();
            let head = self.guest.add(&bufs).unwrap();
            self.guest.publish();
            self.sq.forward();
            head
        }

        /// The device completes the oldest chain with `len` bytes; svq reaps it.
        fn complete(&mut self, len: u32) {
            let mut chain = Chain::default();
            assert!(self.device.pop(&Iotlb, &mut chain).unwrap());
            self.device.push_used(chain.head, len);
            self.device.publish_used();
            self.sq.reap();
            assert!(self.guest.pop_used().unwrap().is_some());
        }

        /// The buffer pages logged since the last look (the used ring's left out).
        fn logged(&self) -> BTreeSet<u64> {
            self.log.fetch_and_clear().into_iter().filter(|&p| p >= BUFS).collect()
        }
    }

    fn pages(p: &[u64]) -> BTreeSet<u64> {
        p.iter().copied().collect()
    }

    #[test]
    fn one_buffer_is_logged_up_to_the_used_length() {
        let mut r = Rig::new();
        r.sq.set_dirty_log(Some(r.log.clone()));
        r.post(&[(BUFS, 100, 3 * PAGE as u32)]);
        r.complete(5000);
        assert_eq!(r.logged(), pages(&[BUFS, BUFS + 1]));
        // The used ring is logged with every completion.
        assert!(r.log.fetch_and_clear().is_empty());
        r.post(&[(BUFS, 0, 64)]);
        r.complete(64);
        assert_eq!(r.log.count(), 2, "the buffer's page and the used ring's");
    }

    #[test]
    fn buffers_on_following_pages_are_logged_up_to_the_used_length() {
        let mut r = Rig::new();
        r.sq.set_dirty_log(Some(r.log.clone()));
        let run = [(BUFS, 0, 2048), (BUFS, 2048, 4096), (BUFS + 1, 2048, 4096), (BUFS + 2, 2048, 100)];
        r.post(&run);
        r.complete(2048 + 4096 + 4096 + 100);
        assert_eq!(r.logged(), pages(&[BUFS, BUFS + 1, BUFS + 2]));
        // Written in part: only the pages the first bytes reach.
        r.post(&run);
        r.complete(2048 + 2048 + 100);
        assert_eq!(r.logged(), pages(&[BUFS, BUFS + 1]));
        r.post(&run);
        r.complete(2048 + 100);
        assert_eq!(r.logged(), pages(&[BUFS]));
    }

    #[test]
    fn buffers_pages_apart_are_logged_each() {
        let mut r = Rig::new();
        r.sq.set_dirty_log(Some(r.log.clone()));
        r.post(&[(BUFS + 5, 0, 100), (BUFS, 0, 100), (BUFS + 9, 4000, 200)]);
        r.complete(300);
        assert_eq!(r.logged(), pages(&[BUFS + 5, BUFS, BUFS + 9, BUFS + 10]));
        r.post(&[(BUFS + 5, 0, 100), (BUFS, 0, 100), (BUFS + 9, 4000, 200)]);
        r.complete(150);
        assert_eq!(r.logged(), pages(&[BUFS + 5, BUFS]));
    }

    #[test]
    fn a_chain_forwarded_before_the_log_was_attached_is_logged_where_it_is() {
        let mut r = Rig::new();
        // A chain on a shadow head while logging, then another on the same head without.
        r.sq.set_dirty_log(Some(r.log.clone()));
        r.post(&[(BUFS, 0, 100)]);
        r.complete(100);
        r.sq.set_dirty_log(None);
        r.logged();
        r.post(&[(BUFS + 7, 0, 100)]);
        r.sq.set_dirty_log(Some(r.log.clone()));
        r.complete(100);
        assert_eq!(r.logged(), pages(&[BUFS + 7]));
    }

    #[test]
    fn a_guest_rewriting_a_chain_in_flight_does_not_move_what_is_logged() {
        let mut r = Rig::new();
        r.sq.set_dirty_log(Some(r.log.clone()));
        let head = r.post(&[(BUFS + 3, 0, 100)]);
        let d = r.guest_ring.desc(head);
        r.guest_ring.set_desc(head, Descriptor::new((BUFS + 8) * PAGE, d.len(), d.flags(), d.next()));
        r.complete(100);
        // The device wrote where svq had sent it: that page.
        assert_eq!(r.logged(), pages(&[BUFS + 3]));
    }
}
