//! One shadow virtqueue: pops the guest's chains, forwards them on the shadow ring the
//! device reads, reaps and validates the device's used entries, and completes the guest's
//! chains. Its parts, one concern each:
//! - [`translate`]: zero-copy forwarding, guest addresses become IOVAs;
//! - [`copy`]: forwarding through bounce buffers, and the copy back;
//! - [`inflight`]: what each shadow head in flight stands for;
//! - [`inject`]: svq's own elements and their completion slots;
//! - [`hook`]: policy that sees, answers or refuses guest elements;
//! - [`cvq`]: the virtio-net control queue's policy (state tracking);
//! - [`stats`]: the counters.
//!
//! Every fault found breaks the queue with a typed [`Fault`]; nothing on this path panics.

mod capture;
mod copy;
pub mod cvq;
mod handover;
mod hook;
mod inflight;
mod inject;
mod log;
mod stats;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;
mod translate;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use copy::{BounceSpace, Forwarding};
pub use handover::Rewound;
pub use hook::{QueueHook, Verdict};
pub use inject::{InjectBatch, InjectError, InjectResult, InjectSlot};
pub use stats::QueueStats;
pub use translate::RegionIova;

use crate::bounce::{BounceError, BouncePool};
use crate::eventfd::EventFd;
use crate::fault::{Fault, QueueFault, QueueHealth};
use crate::mem::GuestMemory;
use crate::ring::{Buf, Chain, RingReader, RingWriter, Segment};
use hook::HookBox;
use inflight::{Element, InFlight, InFlightTable, Origin};

/// Counts on the engine thread, the counters' only writer: a plain load and store, no
/// locked read-modify-write on the hot path. Readers on other threads see a recent value.
fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// The most bytes svq copies for one side of an element (and one descriptor can carry).
/// A guest reaches more only by pointing many descriptors at the same memory, so a larger
/// element breaks the queue instead of making svq allocate without bound.
pub const MAX_COPY_BYTES: u64 = 64 << 20;

/// The eventfds of a shadowed queue.
#[derive(Debug)]
pub struct ShadowFds {
    /// The guest kicks this.
    pub guest_kick: Arc<EventFd>,
    /// We call the guest through this.
    pub guest_call: Arc<EventFd>,
    /// We kick the device through this.
    pub device_kick: EventFd,
    /// The device calls us through this.
    pub device_call: EventFd,
}

/// What sending an element did.
enum Sent {
    Yes,
    /// No room on the shadow ring: the element waits.
    Full(Element),
    /// Completed without the device (no bounce buffer).
    Completed,
}

/// Why a queue stops: it decides what waiting injectors are told, and what becomes of
/// guest chains the device still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The session is closing: the guest gets its chains back (used length 0).
    Closed,
    /// The queue alone stops (it goes back to passthrough): likewise.
    Stopped,
    /// The guest's ring is handed to another session, which submits the chains the device
    /// held again: they are not completed here.
    HandedOver,
}

/// One shadow virtqueue.
#[derive(Debug)]
pub struct ShadowQueue {
    /// Queue index on the device.
    pub index: u32,
    forwarding: Forwarding,
    guest: RingReader,
    shadow: RingWriter,
    mem: Arc<GuestMemory>,
    regions: Vec<RegionIova>,
    in_flight: InFlightTable,
    held: Option<Element>,
    injected: VecDeque<Element>,
    /// Guest chains to submit again first (a ring handed over with chains in flight).
    resubmit: VecDeque<u16>,
    bounce_space: Option<BounceSpace>,
    bounce: Option<BouncePool>,
    hooks: Vec<HookBox>,
    /// Guest used entries pushed since the last call decision.
    pushed: bool,
    /// The chain the slow path pops into (reused: nothing is allocated per element).
    chain: Chain,
    bufs: Vec<Buf>,
    /// The queue's eventfds.
    pub fds: ShadowFds,
    stats: Arc<QueueStats>,
    health: Arc<QueueHealth>,
    /// The dirty log, while one is attached.
    log: Option<Arc<crate::dirty::DirtyLog>>,
    /// Guest address of the guest's used ring (logged whenever svq writes it).
    used_gpa: u64,
    /// The packet capture's tap, while one is attached.
    capture: Option<Box<crate::capture::Tap>>,
    /// Emptied writable-segment lists of completed elements, for the chains popped next:
    /// an element that keeps its list in flight (copy mode, hooks, a capture) takes one
    /// from here instead of allocating; never more than the ring holds.
    spare_inn: Vec<Vec<Segment>>,
}

/// Everything a shadow queue is built from.
#[derive(Debug)]
pub struct ShadowParts {
    /// Queue index.
    pub index: u32,
    /// Translate or copy.
    pub forwarding: Forwarding,
    /// Reader over the guest ring.
    pub guest: RingReader,
    /// Writer over the shadow ring.
    pub shadow: RingWriter,
    /// Guest memory.
    pub mem: Arc<GuestMemory>,
    /// Where guest memory is mapped (translate).
    pub regions: Vec<RegionIova>,
    /// Eventfds.
    pub fds: ShadowFds,
    /// Counters.
    pub stats: Arc<QueueStats>,
    /// Health, shared with the guest front.
    pub health: Arc<QueueHealth>,
    /// Bounce buffer source (None: the queue cannot copy or inject).
    pub bounce_space: Option<BounceSpace>,
    /// A pool made up front (copy mode), or None to make one on first use.
    pub bounce: Option<BouncePool>,
    /// Guest address of the guest's used ring.
    pub used_gpa: u64,
}

impl ShadowQueue {
    /// A shadow queue from its parts.
    pub fn new(p: ShadowParts) -> Self {
        let size = p.shadow.size();
        ShadowQueue {
            index: p.index,
            forwarding: p.forwarding,
            guest: p.guest,
            shadow: p.shadow,
            mem: p.mem,
            regions: p.regions,
            in_flight: InFlightTable::new(size),
            held: None,
            injected: VecDeque::new(),
            resubmit: VecDeque::new(),
            bounce_space: p.bounce_space,
            bounce: p.bounce,
            hooks: Vec::new(),
            pushed: false,
            chain: Chain::default(),
            bufs: Vec::with_capacity(size as usize),
            fds: p.fds,
            stats: p.stats,
            health: p.health,
            log: None,
            used_gpa: p.used_gpa,
            capture: None,
            spare_inn: Vec::new(),
        }
    }

    /// The queue's counters.
    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Whether the queue was broken.
    pub fn is_broken(&self) -> bool {
        self.health.is_broken()
    }

    /// Marks the queue broken and wakes the guest so that a waiter sees it. Injectors
    /// waiting on the queue learn it now rather than at their timeout; the elements'
    /// buffers stay until the queue stops (the device may still use them).
    pub fn fail(&mut self, fault: Fault) {
        bump(&self.stats.errors, 1);
        let first = self.health.set(QueueFault { queue: self.index, fault });
        let waiting = self.in_flight.injected().chain(self.injected.iter().filter_map(|e| match &e.origin {
            Origin::Injected(slot) => Some(slot),
            Origin::Guest(_) => None,
        }));
        for slot in waiting {
            slot.complete(Err(InjectError::Broken(first.clone())));
        }
        self.fds.guest_call.signal();
    }

    /// Handles a guest kick (or new injected elements): forwards everything that fits,
    /// then kicks the device once.
    pub fn forward(&mut self) {
        if self.is_broken() {
            return;
        }
        loop {
            self.guest.disable_notify();
            let held = match self.forward_all() {
                Ok(held) => held,
                Err(fault) => {
                    self.call_guest();
                    return self.fail(fault);
                }
            };
            self.kick_device();
            self.call_guest();
            if held || !self.guest.enable_notify() {
                return;
            }
        }
    }

    /// Sends everything there is until the ring is full; whether an element waits.
    fn forward_all(&mut self) -> Result<bool, Fault> {
        loop {
            if self.held.is_none() && self.injected.is_empty() && self.resubmit.is_empty() && self.fast() {
                // Only guest elements left, and nothing to do with them but translate or copy.
                match self.forwarding {
                    Forwarding::Translate => return self.forward_translated(),
                    Forwarding::Copy(_) => {
                        if let Some(waits) = self.forward_copied()? {
                            return Ok(waits);
                        }
                    }
                }
            }
            let Some(el) = self.next_element()? else {
                self.flush_capture();
                return Ok(false);
            };
            let copy = matches!(self.forwarding, Forwarding::Copy(_)) || matches!(el.origin, Origin::Injected(_));
            let sent = if copy { self.send_copied(el)? } else { self.send_translated(el)? };
            if let Sent::Full(el) = sent {
                // Wait for completions to free descriptors; reaping resumes us.
                self.held = Some(el);
                bump(&self.stats.held, 1);
                self.flush_capture();
                return Ok(true);
            }
        }
    }

    /// Whether guest elements take a fast path (translate's or copy's): no hook to show
    /// them to and no capture.
    #[inline]
    fn fast(&self) -> bool {
        self.hooks.is_empty() && self.capture.is_none()
    }

    /// The next element to send: one that waited for room, then injected ones, then the
    /// guest's (shown to the hooks).
    fn next_element(&mut self) -> Result<Option<Element>, Fault> {
        if let Some(el) = self.held.take() {
            return Ok(Some(el));
        }
        if let Some(el) = self.injected.pop_front() {
            return Ok(Some(el));
        }
        loop {
            let mut chain = std::mem::take(&mut self.chain);
            let popped = match self.resubmit.pop_front() {
                // A chain the last session's device held: walked again from its head.
                Some(head) => {
                    chain.clear();
                    chain.head = head;
                    self.guest.walk_head(&*self.mem, head, &mut chain).map(|()| true)
                }
                None => self.guest.pop(&*self.mem, &mut chain),
            };
            match popped {
                Ok(true) => {}
                Ok(false) => {
                    self.chain = chain;
                    return Ok(None);
                }
                Err(e) => {
                    self.chain = chain;
                    return Err(Fault::Chain(e));
                }
            }
            let el = Element::guest(chain);
            if self.hooks.is_empty() {
                return Ok(Some(el));
            }
            if let Some(el) = self.judge(el)? {
                return Ok(Some(el));
            }
        }
    }

    /// The first `total` bytes of `segs`, copied out of guest memory.
    fn gather(&self, segs: &[Segment], total: u64) -> Result<Vec<u8>, Fault> {
        let mut out = vec![0u8; total as usize];
        let mut at = 0usize;
        for s in segs {
            let n = (s.len as usize).min(out.len() - at);
            if n == 0 {
                break;
            }
            self.mem.read(s.addr, &mut out[at..at + n]).map_err(|_| Fault::GuestMemory { addr: s.addr, len: n as u64 })?;
            at += n;
        }
        Ok(out)
    }

    /// Writes `data` into the guest's writable segments; returns bytes written.
    fn scatter(&self, segs: &[Segment], data: &[u8]) -> Result<usize, Fault> {
        let mut at = 0usize;
        for s in segs {
            let n = (s.len as usize).min(data.len() - at);
            if n == 0 {
                break;
            }
            self.mem.write(s.addr, &data[at..at + n]).map_err(|_| Fault::GuestMemory { addr: s.addr, len: n as u64 })?;
            at += n;
        }
        Ok(at)
    }

    fn complete_guest(&mut self, head: u16, len: u32) {
        self.guest.push_used(head, len);
        bump(&self.stats.completed, 1);
        self.pushed = true;
    }

    #[cold]
    fn too_many_bytes(origin: &Origin, out: u64, inn: u64) -> Fault {
        Fault::TooManyBytes { what: origin.describe(), out, inn, max: MAX_COPY_BYTES }
    }

    /// The fault when an element is more than svq copies (readable or writable side).
    #[inline]
    fn beyond_copy(origin: &Origin, out: u64, inn: u64) -> Option<Fault> {
        (out > MAX_COPY_BYTES || inn > MAX_COPY_BYTES).then(|| Self::too_many_bytes(origin, out, inn))
    }

    #[cold]
    fn too_many_descriptors(&self, what: String, needed: usize) -> Fault {
        Fault::TooManyDescriptors { what, needed, size: self.shadow.size() }
    }

    fn kick_device(&mut self) {
        if self.shadow.publish() {
            self.fds.device_kick.signal();
            bump(&self.stats.device_kicks, 1);
        } else {
            bump(&self.stats.device_kicks_suppressed, 1);
        }
    }

    /// Handles a device call: reaps and validates used entries, completes the elements,
    /// then forwards anything that was waiting for room.
    pub fn reap(&mut self) {
        if self.is_broken() {
            return;
        }
        loop {
            self.shadow.disable_cb();
            if let Err(fault) = self.reap_used() {
                self.call_guest();
                return self.fail(fault);
            }
            self.call_guest();
            if !self.shadow.enable_cb() {
                break;
            }
        }
        if self.held.is_some() || !self.injected.is_empty() {
            self.forward();
        }
    }

    /// One polling pass: reaps what the device completed and forwards what the guest
    /// published, with notifications from both left off (a polling engine comes back
    /// soon; [`ShadowQueue::rearm`] turns them on before it sleeps). What it forwarded
    /// reaches the device at [`ShadowQueue::publish`]. Whether anything moved.
    pub fn poll(&mut self) -> bool {
        if self.is_broken() {
            return false;
        }
        let mut moved = false;
        if self.shadow.has_used() {
            self.shadow.disable_cb();
            if let Err(fault) = self.reap_used() {
                self.call_guest();
                self.fail(fault);
                return true;
            }
            moved = true;
        }
        let room = self.held.is_none() || self.shadow.num_free() > 0;
        let work = self.guest.has_avail() || self.held.is_some() || !self.injected.is_empty() || !self.resubmit.is_empty();
        if room && work {
            self.guest.disable_notify();
            if let Err(fault) = self.forward_all() {
                self.call_guest();
                self.fail(fault);
                return true;
            }
            moved = true;
        }
        self.call_guest();
        moved
    }

    /// Makes what polling passes forwarded visible to the device, and kicks it if it
    /// wants. A polling engine publishes every queue together after its passes, so that
    /// chains the guest published on several queues reach the device in the order the
    /// guest published them (a receive buffer posted before a frame is sent is on the
    /// device's ring before the frame).
    pub fn publish(&mut self) {
        if !self.is_broken() && self.shadow.has_unpublished() {
            self.kick_device();
        }
    }

    /// Asks the guest for kicks and the device for calls again, then looks once more:
    /// whether work arrived in between (then poll again rather than sleep).
    pub fn rearm(&mut self) -> bool {
        if self.is_broken() {
            return false;
        }
        let guest = self.held.is_none() && self.guest.enable_notify();
        let device = self.shadow.enable_cb();
        guest || device
    }

    /// Reaps every used entry the device published and completes its element.
    fn reap_used(&mut self) -> Result<(), Fault> {
        if self.capture.is_none() {
            return self.reap_each::<false>();
        }
        let r = self.reap_each::<true>();
        self.flush_capture();
        r
    }

    /// The reaping loop; `CAPTURE` records what the device wrote into chains forwarded
    /// on the fast path (compiled out when no tap is attached).
    fn reap_each<const CAPTURE: bool>(&mut self) -> Result<(), Fault> {
        let (mut completed, mut bytes_in) = (0u64, 0u64);
        let res = loop {
            let (head, len) = match self.shadow.pop_used() {
                Ok(Some(used)) => used,
                Ok(None) => break Ok(()),
                Err(e) => break Err(Fault::Used(e)),
            };
            bytes_in += len as u64;
            // The writer validated the id: it is a head in flight, which the table has.
            match self.in_flight.untrack(head) {
                Some(Ok(guest_head)) => {
                    if CAPTURE {
                        self.capture_chain(guest_head, len);
                    }
                    self.log_chain(head, guest_head, len);
                    self.guest.push_used(guest_head, len);
                    completed += 1;
                    self.pushed = true;
                }
                Some(Err(f)) => {
                    if let Err(e) = self.complete(f, len) {
                        break Err(e);
                    }
                }
                None => break Err(Fault::Internal(format!("shadow head {head} was in flight on the ring but not in the table"))),
            }
        };
        bump(&self.stats.bytes_in, bytes_in);
        bump(&self.stats.completed, completed);
        res
    }

    /// Takes a chain's writable-segment list to travel with its element, leaving the
    /// chain a spare list (see `spare_inn`) so that popping the next one allocates nothing.
    #[inline]
    fn take_inn(&mut self, chain: &mut Chain) -> Vec<Segment> {
        if chain.inn.is_empty() {
            // Nothing to travel (a frame sent, an injected element): the chain keeps its list.
            return Vec::new();
        }
        std::mem::replace(&mut chain.inn, self.spare_inn.pop().unwrap_or_default())
    }

    /// Completes one element the device returned with `len` (already checked against the
    /// writable size): copies the written bytes back, runs the hooks, frees the buffers.
    fn complete(&mut self, f: InFlight, len: u32) -> Result<(), Fault> {
        let hooked = f.out_bytes.is_some() && !self.hooks.is_empty();
        let injected = matches!(f.origin, Origin::Injected(_));
        if let Origin::Guest(_) = &f.origin {
            // Copied back by svq, or (translated) written by the device itself: logged.
            if let Some(b) = &f.in_buf {
                self.copy_back(b, &f.guest_in, len)?;
            }
            if self.capture.is_some() {
                self.capture_written(&f, len);
            }
            self.log_segments(&f.guest_in, u64::from(len));
        }
        // A private copy only for whoever reads it: hooks and injectors.
        let written: Vec<u8> = match &f.in_buf {
            Some(b) if hooked || injected => b.to_vec(len as usize),
            None if hooked => self.gather(&f.guest_in, len as u64)?,
            _ => Vec::new(),
        };
        let InFlight { origin, out_buf, in_buf, mut guest_in, out_bytes } = f;
        // A guest chain is completed before the hooks see it (the guest sees it only once
        // the used index is published): should a hook panic, closing still returns it. An
        // injector learns of its element after the hooks (a restore reads their state).
        let origin = match origin {
            Origin::Guest(head) => {
                self.complete_guest(head, len);
                None
            }
            injected => Some(injected),
        };
        // Hooks see the completions of elements they saw (or svq injected): those carry
        // their readable bytes.
        if let Some(out) = out_bytes.as_deref().filter(|_| hooked) {
            self.show_completion(out, &written);
        }
        let _ = self.release(out_buf, in_buf);
        if guest_in.capacity() > 0 && self.spare_inn.len() < usize::from(self.shadow.size()) {
            guest_in.clear();
            self.spare_inn.push(guest_in);
        }
        if let Some(origin) = origin {
            self.finish(origin, len, Ok(written));
        }
        Ok(())
    }

    fn finish(&mut self, origin: Origin, len: u32, result: Result<Vec<u8>, InjectError>) {
        match origin {
            Origin::Guest(head) => self.complete_guest(head, len),
            Origin::Injected(slot) => slot.complete(result.map(|w| (len, w))),
        }
    }

    fn call_guest(&mut self) {
        if !std::mem::take(&mut self.pushed) {
            return;
        }
        let notify = self.guest.publish_used();
        self.log_used_ring();
        if notify {
            self.fds.guest_call.signal();
            bump(&self.stats.guest_calls, 1);
        } else {
            bump(&self.stats.guest_calls_suppressed, 1);
        }
    }

    /// Stops the queue after the device stopped using its ring: every element in flight
    /// or waiting is returned (guest elements completed with length 0, injected ones
    /// failed with `why`), every bounce buffer freed and the pool released. `quiesced`
    /// says the device provably cannot reach the buffers any more; without it their
    /// memory is kept (see [`BouncePool::release`]). Every step runs; the first failure to
    /// unmap is returned after them.
    pub fn stop(&mut self, why: StopReason, quiesced: bool) -> Result<usize, BounceError> {
        let mut first = None;
        let mut returned = 0;
        let queue = self.index;
        let failure = || match why {
            StopReason::Closed => InjectError::Closed,
            StopReason::Stopped | StopReason::HandedOver => InjectError::Stopped { queue },
        };
        let heads: Vec<u16> = self.shadow.in_flight_heads().collect();
        for head in heads {
            self.shadow.reclaim(head);
            match self.in_flight.untrack(head) {
                None => {}
                Some(Ok(_)) if why == StopReason::HandedOver => {}
                Some(Ok(guest_head)) => {
                    self.complete_guest(guest_head, 0);
                    returned += 1;
                }
                Some(Err(f)) => {
                    if quiesced {
                        if let Err(e) = self.release(f.out_buf, f.in_buf) {
                            first.get_or_insert(e);
                        }
                    } else {
                        // The device may still write them: kept with the pool's chunks.
                        let bytes = [&f.out_buf, &f.in_buf].iter().filter_map(|b| b.as_ref()).map(|b| b.own_bytes()).sum();
                        crate::live::quarantine((f.out_buf, f.in_buf), bytes);
                    }
                    // A guest chain handed over is completed by the next session.
                    if !(why == StopReason::HandedOver && matches!(f.origin, Origin::Guest(_))) {
                        self.finish(f.origin, 0, Err(failure()));
                        returned += 1;
                    }
                }
            }
        }
        let waiting: Vec<Element> = self.held.take().into_iter().chain(self.injected.drain(..)).collect();
        for el in waiting {
            self.finish(el.origin, 0, Err(failure()));
            returned += 1;
        }
        bump(&self.stats.returned_on_stop, returned as u64);
        self.call_guest();
        if let Some(Err(e)) = self.bounce.take().map(|mut p| p.release(quiesced)) {
            first.get_or_insert(e);
        }
        first.map_or(Ok(returned), Err)
    }
}
