//! Packet capture on a shadowed queue: the guest's readable bytes when svq forwards its
//! element (what the guest sends), the bytes the device wrote when svq completes it (what
//! the guest receives), each as one frame through the queue's [`Tap`]. svq's own injected
//! elements are not captured.
//!
//! With no tap attached nothing here runs: [`ShadowQueue::fast`] keeps the fast paths
//! (translate and copy), and reaping runs the loop without capture. With one, guest
//! elements take the popped-chain path (their segments are at hand at completion), and
//! the tap hands its batch over once per pass.

use super::inflight::InFlight;
use super::ShadowQueue;
use crate::bounce::BounceBuf;
use crate::capture::Tap;
use crate::mem::GuestMemory;
use crate::ring::Segment;

/// Copies the bytes of `segs` from offset `skip` into `dst`; false when they are shorter
/// or not guest memory (the frame is then not captured: capture never breaks a queue).
pub(super) fn fill_from_guest(mem: &GuestMemory, segs: &[Segment], mut skip: u64, dst: &mut [u8]) -> bool {
    let mut at = 0usize;
    for s in segs {
        if at == dst.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(dst.len() - at);
        if mem.read(s.addr + skip, &mut dst[at..at + n]).is_err() {
            return false;
        }
        at += n;
        skip = 0;
    }
    at == dst.len()
}

/// Copies a bounce buffer's bytes from offset `skip` into `dst`.
pub(super) fn fill_from_bounce(b: &BounceBuf, skip: u64, dst: &mut [u8]) -> bool {
    let s = b.slice();
    let fits = usize::try_from(skip).ok().and_then(|k| k.checked_add(dst.len())).is_some_and(|end| end <= s.len());
    if fits {
        s.read(skip as usize, dst);
    }
    fits
}

impl ShadowQueue {
    /// Attaches a tap (or detaches it with None); the one it replaces hands its last
    /// batch over as it is dropped.
    pub fn set_capture(&mut self, tap: Option<Box<Tap>>) {
        self.capture = tap;
    }

    /// Hands what the tap recorded in this pass over to the writer.
    #[inline]
    pub(super) fn flush_capture(&mut self) {
        if let Some(t) = self.capture.as_deref_mut() {
            t.flush();
        }
    }

    /// Records the `len` bytes the device wrote into guest chain `head`, which was
    /// forwarded without its segments kept (on the fast path, before the tap came): the
    /// chain is walked again, with every check of a pop. The guest must not change a
    /// chain it has in flight; if it did, its own (wrong) bytes are captured.
    #[cold]
    pub(super) fn capture_chain(&mut self, head: u16, len: u32) {
        let Some(tap) = self.capture.as_deref_mut().filter(|_| len > 0) else { return };
        // The queue's reusable chain: no allocation per element.
        let chain = &mut self.chain;
        chain.clear();
        if self.guest.walk_head(&*self.mem, head, chain).is_ok() {
            let mem = &*self.mem;
            tap.record(u64::from(len), |skip, dst| fill_from_guest(mem, &chain.inn, skip, dst));
        }
    }

    /// Records what the device wrote into a completed guest element (`len` bytes): from
    /// its bounce buffer (copy) or its writable segments (translate).
    pub(super) fn capture_written(&mut self, f: &InFlight, len: u32) {
        let Some(tap) = self.capture.as_deref_mut() else { return };
        let mem = &*self.mem;
        match &f.in_buf {
            Some(b) => tap.record(u64::from(len), |skip, dst| fill_from_bounce(b, skip, dst)),
            None => tap.record(u64::from(len), |skip, dst| fill_from_guest(mem, &f.guest_in, skip, dst)),
        }
    }
}
