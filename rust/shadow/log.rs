//! Dirty logging on a shadowed queue: every guest page written on the device's behalf is
//! marked in the dirty log while one is attached: the guest's used ring, the writable
//! buffers the device filled (translate: the chain is walked again, up to the used
//! length), the bytes svq copied back (copy) or a hook answered with. svq's own injected
//! elements are not guest memory and are never logged.

use std::sync::Arc;

use super::ShadowQueue;
use crate::dirty::DirtyLog;
use crate::ring::{ChainSink, Segment};

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

impl ShadowQueue {
    /// Attaches (or detaches) the dirty log.
    pub fn set_dirty_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.log = log;
    }

    /// Whether a dirty log is attached.
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Logs what the device wrote into guest chain `head` (`len` bytes), walking the chain
    /// again (a translated chain keeps nothing of its own but the head).
    #[inline]
    pub(super) fn log_chain(&self, head: u16, len: u32) {
        let Some(log) = self.log.as_deref() else { return };
        if len == 0 {
            return;
        }
        let mut w = Written { log, left: u64::from(len) };
        // The guest must not change a chain it has in flight; if it did, it gets its own
        // (wrong) pages logged, never anything outside guest memory.
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
