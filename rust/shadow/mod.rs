//! One shadow virtqueue: pops the guest's chains, forwards them on the shadow ring the
//! device reads, reaps and validates the device's used entries, and completes the guest's
//! chains.
//!
//! Forwarding is either **translate** (zero copy: each guest address becomes the IOVA
//! where that guest memory is mapped) or **copy** (the readable bytes are linearized into
//! one bounce buffer and the writable side gets one zeroed bounce buffer: one descriptor
//! per direction, the device never sees guest memory, and the guest cannot change a
//! command after it was copied). Injected elements always travel in bounce buffers.

mod hook;
mod status;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use hook::{InjectResult, InjectSlot, QueueHook, Verdict};
pub use status::{FaultKind, QueueFault, QueueHealth, QueueStats};

use crate::bounce::{BounceBuf, BounceError, BouncePool, Strategy};
use crate::dma::Dma;
use crate::eventfd::EventFd;
use crate::mem::GuestMemory;
use crate::ring::{Buf, Chain, ChainSink, RingReader, RingWriter, Segment};

/// Counts on the engine thread, the counters' only writer: a plain load and store, no
/// locked read-modify-write on the hot path. Readers on other threads see a recent value.
fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// The most bytes svq copies for one side of an element (and one descriptor can carry).
/// A guest reaches more only by pointing many descriptors at the same memory, so a larger
/// element breaks the queue instead of making svq allocate without bound.
pub const MAX_COPY_BYTES: u64 = 64 << 20;

/// Where one guest memory region is mapped for the device.
#[derive(Debug, Clone, Copy)]
pub struct RegionIova {
    /// First guest address.
    pub gpa: u64,
    /// Length.
    pub size: u64,
    /// IOVA of `gpa`.
    pub iova: u64,
}

/// How guest elements reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Guest addresses translated to IOVAs.
    Translate,
    /// Bytes copied through bounce buffers.
    Copy(Strategy),
}

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

/// Where bounce buffers of this queue come from: the session's IOVA space and the address
/// space of the queue's group.
#[derive(Debug, Clone)]
pub struct BounceSpace {
    /// The session's IOVA space.
    pub dma: Arc<Dma>,
    /// The queue's address space.
    pub asid: u32,
    /// Strategy for injected elements on translate queues (copy queues have their own).
    pub strategy: Strategy,
}

#[derive(Debug)]
enum Origin {
    Guest(u16),
    Injected(Arc<InjectSlot>),
}

impl Origin {
    /// The element, as errors name it.
    fn describe(&self) -> String {
        match self {
            Origin::Guest(h) => format!("chain {h}"),
            Origin::Injected(_) => "an injected element".into(),
        }
    }
}

/// An element on its way to the shadow ring.
#[derive(Debug)]
struct Element {
    origin: Origin,
    /// The guest chain (empty for injected elements).
    chain: Chain,
    /// A private copy of the readable bytes, when a hook needs them or svq made them.
    out_bytes: Option<Vec<u8>>,
    out_len: u64,
    in_len: u64,
}

#[derive(Debug)]
struct InFlight {
    origin: Origin,
    out_buf: Option<BounceBuf>,
    in_buf: Option<BounceBuf>,
    /// The guest's writable segments (copy-back target, or what hooks read in translate).
    guest_in: Vec<Segment>,
    out_bytes: Option<Vec<u8>>,
}

/// What a shadow head in flight stands for. A translated guest element with nothing else
/// to remember (the common case) is just the guest's head; elements with bounce buffers,
/// private bytes or an injector's slot keep an [`InFlight`] in the queue's side table at
/// the same index, allocated once with the ring.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// No element.
    #[default]
    Free,
    /// A guest element to complete with the device's length.
    Guest(u16),
    /// Everything else: see `ShadowQueue::rich`.
    Rich,
}

/// Translates guest segments straight into shadow buffers while the reader validates
/// them (no chain is collected). The first untranslatable address is kept and reported
/// once the reader accepted the whole chain, so a chain's reader errors come first, as
/// when translating after the pop.
struct Translator<'a> {
    regions: &'a [RegionIova],
    bufs: &'a mut Vec<Buf>,
    out_len: u64,
    unmapped: Option<u64>,
}

impl ChainSink for Translator<'_> {
    #[inline]
    fn segment(&mut self, seg: Segment, write: bool) {
        if !write {
            self.out_len += seg.len as u64;
        }
        if self.unmapped.is_none() {
            if let Err(addr) = translate_segment(self.regions, seg, write, self.bufs) {
                self.unmapped = Some(addr);
            }
        }
    }
}

/// Appends the shadow buffers of one guest segment (one per region it spans); the first
/// address no region maps on failure.
#[inline]
fn translate_segment(regions: &[RegionIova], s: Segment, write: bool, bufs: &mut Vec<Buf>) -> Result<(), u64> {
    let mut addr = s.addr;
    let end = s.addr + s.len as u64;
    while addr < end {
        let r = regions.iter().find(|r| addr >= r.gpa && addr - r.gpa < r.size).ok_or(addr)?;
        let n = (r.gpa + r.size).min(end) - addr;
        bufs.push(Buf { addr: r.iova + (addr - r.gpa), len: n as u32, write });
        addr += n;
    }
    Ok(())
}

fn unmapped_msg(addr: u64) -> (FaultKind, String) {
    (FaultKind::Guest, format!("guest address {addr:#x} is not mapped for the device"))
}

enum Sent {
    Yes,
    /// No room on the shadow ring: the element waits.
    Full(Element),
    /// Completed without the device (map failure).
    Completed,
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
    in_flight: Vec<Slot>,
    /// The [`InFlight`] of each head whose slot is [`Slot::Rich`].
    rich: Vec<Option<InFlight>>,
    held: Option<Element>,
    injected: VecDeque<Element>,
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
}

/// A boxed hook (Debug for the queue's derive).
pub struct HookBox(pub Box<dyn QueueHook>);

impl std::fmt::Debug for HookBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueHook")
    }
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
    /// Health.
    pub health: Arc<QueueHealth>,
    /// Bounce buffer source (None: the queue cannot copy or inject).
    pub bounce_space: Option<BounceSpace>,
    /// A pool made up front (copy mode), or None to make one on first use.
    pub bounce: Option<BouncePool>,
}

impl ShadowQueue {
    /// A shadow queue from its parts.
    pub fn new(p: ShadowParts) -> Self {
        let size = p.shadow.size() as usize;
        ShadowQueue {
            index: p.index,
            forwarding: p.forwarding,
            guest: p.guest,
            shadow: p.shadow,
            mem: p.mem,
            regions: p.regions,
            in_flight: vec![Slot::Free; size],
            rich: (0..size).map(|_| None).collect(),
            held: None,
            injected: VecDeque::new(),
            bounce_space: p.bounce_space,
            bounce: p.bounce,
            hooks: Vec::new(),
            pushed: false,
            chain: Chain::default(),
            bufs: Vec::with_capacity(size),
            fds: p.fds,
            stats: p.stats,
            health: p.health,
        }
    }

    /// Adds a hook (hooks see elements in the order they were added).
    pub fn add_hook(&mut self, hook: Box<dyn QueueHook>) {
        self.hooks.push(HookBox(hook));
    }

    /// The queue's counters.
    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Whether the queue was broken.
    pub fn is_broken(&self) -> bool {
        self.health.is_broken()
    }

    /// Marks the queue broken and wakes the guest so that a waiter sees it.
    pub fn fail(&mut self, kind: FaultKind, message: String) {
        bump(&self.stats.errors, 1);
        self.health.set(kind, format!("queue {}: {message}", self.index));
        // Whoever waits for an injected element learns it now rather than at a timeout;
        // the element's buffers stay until the queue stops (the device may still use them).
        let message = self.health.fault().map_or(message, |f| f.message);
        let in_flight = self.rich.iter().flatten().map(|f| &f.origin);
        let waiting = in_flight.chain(self.injected.iter().map(|e| &e.origin));
        for origin in waiting {
            if let Origin::Injected(slot) = origin {
                slot.complete(Err(message.clone()));
            }
        }
        self.fds.guest_call.signal();
    }

    /// Queues an element of svq's own: `out` readable bytes and `in_len` writable bytes,
    /// completed through `slot`. Call [`ShadowQueue::forward`] to send it.
    pub fn inject(&mut self, out: Vec<u8>, in_len: u32, slot: Arc<InjectSlot>) {
        if let Some(f) = self.health.fault() {
            slot.complete(Err(f.message));
            return;
        }
        if out.is_empty() && in_len == 0 {
            slot.complete(Err("an injected element needs readable or writable bytes".into()));
            return;
        }
        if out.len() as u64 > MAX_COPY_BYTES || in_len as u64 > MAX_COPY_BYTES {
            slot.complete(Err(format!("an injected element may have at most {MAX_COPY_BYTES} bytes per side")));
            return;
        }
        bump(&self.stats.injected, 1);
        let out_len = out.len() as u64;
        self.injected.push_back(Element {
            origin: Origin::Injected(slot),
            chain: Chain::default(),
            out_bytes: Some(out),
            out_len,
            in_len: in_len as u64,
        });
    }

    /// Handles a guest kick (or new injected elements): forwards everything that fits,
    /// then kicks the device once.
    pub fn forward(&mut self) {
        if self.is_broken() {
            return;
        }
        loop {
            self.guest.disable_notify();
            let mut held = false;
            loop {
                if self.held.is_none() && self.injected.is_empty() && self.fast() {
                    // Only guest elements left, and nothing to do with them but translate.
                    match self.forward_translated() {
                        Ok(h) => held = h,
                        Err((kind, msg)) => {
                            self.call_guest();
                            return self.fail(kind, msg);
                        }
                    }
                    break;
                }
                let el = match self.next_element() {
                    Ok(Some(el)) => el,
                    Ok(None) => break,
                    Err((kind, msg)) => {
                        self.call_guest();
                        return self.fail(kind, msg);
                    }
                };
                match self.send(el) {
                    Ok(Sent::Yes | Sent::Completed) => {}
                    Ok(Sent::Full(el)) => {
                        // Wait for completions to free descriptors; reaping resumes us.
                        self.held = Some(el);
                        bump(&self.stats.held, 1);
                        held = true;
                        break;
                    }
                    Err((kind, msg)) => {
                        self.call_guest();
                        return self.fail(kind, msg);
                    }
                }
            }
            self.kick_device();
            self.call_guest();
            if held || !self.guest.enable_notify() {
                return;
            }
        }
    }

    /// Whether guest elements take the translate fast path: translate forwarding and no
    /// hook to show them to.
    #[inline]
    fn fast(&self) -> bool {
        self.forwarding == Forwarding::Translate && self.hooks.is_empty()
    }

    /// Forwards the guest's chains in translate mode without hooks: each chain is
    /// validated by the reader and translated in the same walk, straight into shadow
    /// buffers; the shadow head remembers only the guest head. Returns whether a chain
    /// had to wait for room (it is then `held`, popped as a whole like any other).
    fn forward_translated(&mut self) -> Result<bool, (FaultKind, String)> {
        let size = self.shadow.size() as usize;
        let (mut elements, mut bytes_out) = (0u64, 0u64);
        let res = loop {
            self.bufs.clear();
            let mut t = Translator { regions: &self.regions, bufs: &mut self.bufs, out_len: 0, unmapped: None };
            let head = match self.guest.pop_with(&*self.mem, &mut t) {
                Ok(Some(head)) => head,
                Ok(None) => break Ok(false),
                Err(e) => break Err((FaultKind::Guest, e.to_string())),
            };
            let (out_len, unmapped) = (t.out_len, t.unmapped);
            if let Some(addr) = unmapped {
                break Err(unmapped_msg(addr));
            }
            if self.bufs.len() > size {
                break Err(self.too_large(Origin::Guest(head).describe(), self.bufs.len()));
            }
            match self.shadow.add(&self.bufs) {
                Ok(shead) => {
                    // The writer hands out only free heads, all below the ring size.
                    if let Some(slot) = self.in_flight.get_mut(shead as usize) {
                        *slot = Slot::Guest(head);
                    }
                    elements += 1;
                    bytes_out += out_len;
                }
                Err(_) => {
                    // No room: take the chain again as a whole element that waits.
                    self.guest.unpop();
                    break self.hold_guest_chain();
                }
            }
        };
        bump(&self.stats.elements, elements);
        bump(&self.stats.bytes_out, bytes_out);
        res
    }

    /// Pops the chain `forward_translated` could not place and keeps it for later.
    #[cold]
    fn hold_guest_chain(&mut self) -> Result<bool, (FaultKind, String)> {
        let mut chain = std::mem::take(&mut self.chain);
        match self.guest.pop(&*self.mem, &mut chain) {
            Ok(true) => {}
            // The chain was just validated; the guest changed it meanwhile.
            Ok(false) => return Ok(false),
            Err(e) => return Err((FaultKind::Guest, e.to_string())),
        }
        let el = Element { origin: Origin::Guest(chain.head), out_len: chain.out_len, in_len: chain.in_len, chain, out_bytes: None };
        self.held = Some(el);
        bump(&self.stats.held, 1);
        Ok(true)
    }

    /// The next element to send: one that waited for room, then injected ones, then the
    /// guest's (passed through the hooks).
    fn next_element(&mut self) -> Result<Option<Element>, (FaultKind, String)> {
        if let Some(el) = self.held.take() {
            return Ok(Some(el));
        }
        if let Some(el) = self.injected.pop_front() {
            return Ok(Some(el));
        }
        loop {
            let mut chain = std::mem::take(&mut self.chain);
            match self.guest.pop(&*self.mem, &mut chain) {
                Ok(true) => {}
                Ok(false) => {
                    self.chain = chain;
                    return Ok(None);
                }
                Err(e) => {
                    self.chain = chain;
                    return Err((FaultKind::Guest, e.to_string()));
                }
            }
            let mut el =
                Element { origin: Origin::Guest(chain.head), out_len: chain.out_len, in_len: chain.in_len, chain, out_bytes: None };
            if self.hooks.is_empty() {
                return Ok(Some(el));
            }
            if el.out_len > MAX_COPY_BYTES {
                return Err(self.too_many_bytes(&el));
            }
            let out = self.gather(&el.chain.out, el.out_len)?;
            let verdict = self
                .hooks
                .iter_mut()
                .map(|h| h.0.avail(&out, el.in_len.min(u32::MAX as u64) as u32))
                .find(|v| *v != Verdict::Forward)
                .unwrap_or(Verdict::Forward);
            match verdict {
                Verdict::Forward => {
                    el.out_bytes = Some(out);
                    return Ok(Some(el));
                }
                Verdict::Answer(bytes) => {
                    let n = self.scatter(&el.chain.inn, &bytes)?;
                    self.complete_guest(el.chain.head, n as u32);
                    bump(&self.stats.answered, 1);
                    self.chain = el.chain;
                }
                Verdict::Refuse => {
                    self.complete_guest(el.chain.head, 0);
                    bump(&self.stats.refused, 1);
                    self.chain = el.chain;
                }
            }
        }
    }

    /// The first `total` bytes of `segs` (the used length of a completion may be shorter
    /// than the segments).
    fn gather(&self, segs: &[Segment], total: u64) -> Result<Vec<u8>, (FaultKind, String)> {
        let mut out = vec![0u8; total as usize];
        let mut at = 0usize;
        for s in segs {
            let n = (s.len as usize).min(out.len() - at);
            if n == 0 {
                break;
            }
            self.mem.read(s.addr, &mut out[at..at + n]).map_err(|e| (FaultKind::Guest, e.to_string()))?;
            at += n;
        }
        Ok(out)
    }

    /// Writes `data` into the guest's writable segments; returns bytes written.
    fn scatter(&self, segs: &[Segment], data: &[u8]) -> Result<usize, (FaultKind, String)> {
        let mut at = 0usize;
        for s in segs {
            let n = (s.len as usize).min(data.len() - at);
            if n == 0 {
                break;
            }
            self.mem.write(s.addr, &data[at..at + n]).map_err(|e| (FaultKind::Guest, e.to_string()))?;
            at += n;
        }
        Ok(at)
    }

    fn complete_guest(&mut self, head: u16, len: u32) {
        self.guest.push_used(head, len);
        bump(&self.stats.completed, 1);
        self.pushed = true;
    }

    fn translate(regions: &[RegionIova], segs: &[Segment], write: bool, bufs: &mut Vec<Buf>) -> Result<(), (FaultKind, String)> {
        for s in segs {
            translate_segment(regions, *s, write, bufs).map_err(unmapped_msg)?;
        }
        Ok(())
    }

    fn too_many_bytes(&self, el: &Element) -> (FaultKind, String) {
        let what = el.origin.describe();
        (FaultKind::TooLarge, format!("{what} has {} readable and {} writable bytes; svq copies at most {MAX_COPY_BYTES} per side", el.out_len, el.in_len))
    }

    #[cold]
    fn too_large(&self, what: String, needed: usize) -> (FaultKind, String) {
        (FaultKind::TooLarge, format!("{what} needs {needed} shadow descriptors; the shadow ring has {}", self.shadow.size()))
    }

    fn send(&mut self, el: Element) -> Result<Sent, (FaultKind, String)> {
        let copy = matches!(self.forwarding, Forwarding::Copy(_)) || matches!(el.origin, Origin::Injected(_));
        if !copy {
            self.bufs.clear();
            Self::translate(&self.regions, &el.chain.out, false, &mut self.bufs)?;
            Self::translate(&self.regions, &el.chain.inn, true, &mut self.bufs)?;
            if self.bufs.len() > self.shadow.size() as usize {
                return Err(self.too_large(el.origin.describe(), self.bufs.len()));
            }
            let added = self.shadow.add(&self.bufs);
            let Ok(head) = added else { return Ok(Sent::Full(el)) };
            let out_len = el.out_len;
            let Element { origin, mut chain, out_bytes, .. } = el;
            let guest_in = if self.hooks.is_empty() { Vec::new() } else { std::mem::take(&mut chain.inn) };
            self.chain = chain;
            self.track(head, InFlight { origin, out_buf: None, in_buf: None, guest_in, out_bytes });
            bump(&self.stats.elements, 1);
            bump(&self.stats.bytes_out, out_len);
            return Ok(Sent::Yes);
        }
        // Copy: one descriptor per non-empty direction, counted before anything is taken.
        if el.out_len > MAX_COPY_BYTES || el.in_len > MAX_COPY_BYTES {
            return Err(self.too_many_bytes(&el));
        }
        let needed = (el.out_len > 0) as usize + (el.in_len > 0) as usize;
        if needed > self.shadow.size() as usize {
            return Err(self.too_large(el.origin.describe(), needed));
        }
        if needed > self.shadow.num_free() as usize {
            return Ok(Sent::Full(el));
        }
        let (out_buf, in_buf) = match self.take_buffers(&el) {
            Ok(b) => b,
            Err(msg) => {
                bump(&self.stats.map_failures, 1);
                self.finish(el.origin, 0, Err(msg));
                return Ok(Sent::Completed);
            }
        };
        self.bufs.clear();
        if let Some(b) = &out_buf {
            self.bufs.push(Buf { addr: b.iova, len: el.out_len as u32, write: false });
        }
        if let Some(b) = &in_buf {
            self.bufs.push(Buf { addr: b.iova, len: el.in_len as u32, write: true });
        }
        let added = self.shadow.add(&self.bufs);
        // Room was checked above, so the add cannot fail.
        let Ok(head) = added else { return Err((FaultKind::TooLarge, "shadow ring accounting".into())) };
        let out_len = el.out_len;
        // The chain's readable list goes back to be reused; its writable list travels with
        // the element (the copy-back target) and comes back at completion.
        let Element { origin, mut chain, out_bytes, .. } = el;
        let guest_in = std::mem::take(&mut chain.inn);
        if self.chain.out.capacity() == 0 {
            self.chain = chain;
        }
        self.track(head, InFlight { origin, out_buf, in_buf, guest_in, out_bytes });
        bump(&self.stats.elements, 1);
        bump(&self.stats.bytes_out, out_len);
        Ok(Sent::Yes)
    }

    /// Records what shadow head `head` stands for.
    fn track(&mut self, head: u16, f: InFlight) {
        let i = head as usize;
        match f {
            InFlight { origin: Origin::Guest(g), out_buf: None, in_buf: None, out_bytes: None, ref guest_in } if guest_in.is_empty() => {
                self.in_flight[i] = Slot::Guest(g);
            }
            f => {
                self.in_flight[i] = Slot::Rich;
                self.rich[i] = Some(f);
            }
        }
    }

    /// Takes back what shadow head `head` stood for.
    fn untrack(&mut self, head: u16) -> Option<Result<u16, InFlight>> {
        let i = head as usize;
        match std::mem::take(self.in_flight.get_mut(i)?) {
            Slot::Free => None,
            Slot::Guest(g) => Some(Ok(g)),
            Slot::Rich => self.rich[i].take().map(Err),
        }
    }

    fn pool(&mut self) -> Result<&mut BouncePool, String> {
        pool_of(&mut self.bounce, self.bounce_space.as_ref(), self.forwarding, self.index)
    }

    /// The element's bounce buffers, filled: readable bytes copied now (so a later change
    /// of the guest's buffer changes nothing), writable side zeroed. A failure gives back
    /// whatever was already taken.
    fn take_buffers(&mut self, el: &Element) -> Result<(Option<BounceBuf>, Option<BounceBuf>), String> {
        let mut out_buf = None;
        if el.out_len > 0 {
            // Disjoint fields: the pool is filled straight from guest memory.
            let pool = pool_of(&mut self.bounce, self.bounce_space.as_ref(), self.forwarding, self.index)?;
            let mem = &*self.mem;
            let b = match &el.out_bytes {
                Some(bytes) => pool.alloc_with(bytes).map_err(|e| e.to_string())?,
                None => pool
                    .alloc_filled(el.out_len as usize, |b| fill_from_guest(mem, b, &el.chain.out))
                    .map_err(|e| e.map_or_else(|fill| fill, |pool| pool.to_string()))?,
            };
            out_buf = Some(b);
        }
        let mut in_buf = None;
        if el.in_len > 0 {
            match self.pool()?.alloc(el.in_len as usize) {
                Ok(b) => in_buf = Some(b),
                Err(e) => {
                    if let Some(b) = out_buf {
                        let _ = self.pool()?.free(b);
                    }
                    return Err(e.to_string());
                }
            }
        }
        Ok((out_buf, in_buf))
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
            if let Err((kind, msg)) = self.reap_used() {
                self.call_guest();
                return self.fail(kind, msg);
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

    /// Reaps every used entry the device published and completes its element.
    fn reap_used(&mut self) -> Result<(), (FaultKind, String)> {
        let (mut completed, mut bytes_in) = (0u64, 0u64);
        let res = loop {
            let (head, len) = match self.shadow.pop_used() {
                Ok(Some(used)) => used,
                Ok(None) => break Ok(()),
                Err(e) => break Err((FaultKind::DeviceProtocol, e.to_string())),
            };
            // The writer only returns heads it has in flight (all below the ring size).
            match self.untrack(head) {
                Some(Ok(guest_head)) => {
                    bytes_in += len as u64;
                    self.guest.push_used(guest_head, len);
                    completed += 1;
                    self.pushed = true;
                }
                Some(Err(f)) => {
                    bytes_in += len as u64;
                    if let Err(e) = self.complete(f, len) {
                        break Err(e);
                    }
                }
                None => break Err((FaultKind::DeviceProtocol, format!("used id {head} has no element"))),
            }
        };
        bump(&self.stats.bytes_in, bytes_in);
        bump(&self.stats.completed, completed);
        res
    }

    /// Completes one element the device returned with `len` (already checked against the
    /// writable size): copies the written bytes back, runs the hooks, frees the buffers.
    fn complete(&mut self, f: InFlight, len: u32) -> Result<(), (FaultKind, String)> {
        let hooked = f.out_bytes.is_some() && !self.hooks.is_empty();
        let injected = matches!(f.origin, Origin::Injected(_));
        // Copy back exactly `len` bytes straight from the bounce buffer.
        if let (Some(b), Origin::Guest(_)) = (&f.in_buf, &f.origin) {
            self.scatter(&f.guest_in, b.bytes(len as usize))?;
        }
        // A private copy only for whoever reads it: hooks and injectors.
        let written: Vec<u8> = match &f.in_buf {
            Some(b) if hooked || injected => b.bytes(len as usize).to_vec(),
            None if hooked => self.gather(&f.guest_in, len as u64)?,
            _ => Vec::new(),
        };
        // Hooks see the completions of elements they saw (or svq injected): those carry
        // their readable bytes.
        if let Some(out) = f.out_bytes.as_deref().filter(|_| hooked) {
            self.hooks.iter_mut().for_each(|h| h.0.used(out, &written));
        }
        let InFlight { origin, out_buf, in_buf, mut guest_in, .. } = f;
        let _ = self.release(out_buf, in_buf);
        if self.chain.inn.capacity() == 0 {
            guest_in.clear();
            self.chain.inn = guest_in;
        }
        self.finish(origin, len, Ok(written));
        Ok(())
    }

    /// Gives an element's bounce buffers back; the first failure (an unmap the device
    /// refused) is returned after both were tried.
    fn release(&mut self, out_buf: Option<BounceBuf>, in_buf: Option<BounceBuf>) -> Result<(), BounceError> {
        let mut first = Ok(());
        for b in [out_buf, in_buf].into_iter().flatten() {
            if let Some(Err(e)) = self.bounce.as_mut().map(|p| p.free(b)) {
                first = first.and(Err(e));
            }
        }
        first
    }

    fn finish(&mut self, origin: Origin, len: u32, result: Result<Vec<u8>, String>) {
        match origin {
            Origin::Guest(head) => self.complete_guest(head, len),
            Origin::Injected(slot) => slot.complete(result.map(|w| (len, w))),
        }
    }

    fn call_guest(&mut self) {
        if !std::mem::take(&mut self.pushed) {
            return;
        }
        if self.guest.publish_used() {
            self.fds.guest_call.signal();
            bump(&self.stats.guest_calls, 1);
        } else {
            bump(&self.stats.guest_calls_suppressed, 1);
        }
    }

    /// Stops the queue after the device was reset: every element in flight or waiting is
    /// returned (guest elements completed with length 0, injected ones failed), every
    /// bounce buffer freed and the pool unmapped. Every step runs; the first failure to
    /// unmap is returned after them.
    pub fn stop(&mut self) -> Result<usize, BounceError> {
        let mut first = None;
        let mut returned = 0;
        let heads: Vec<u16> = self.shadow.in_flight_heads().collect();
        for head in heads {
            self.shadow.reclaim(head);
            match self.untrack(head) {
                None => {}
                Some(Ok(guest_head)) => {
                    self.complete_guest(guest_head, 0);
                    returned += 1;
                }
                Some(Err(f)) => {
                    if let Err(e) = self.release(f.out_buf, f.in_buf) {
                        first.get_or_insert(e);
                    }
                    self.finish(f.origin, 0, Err(format!("queue {} stopped", self.index)));
                    returned += 1;
                }
            }
        }
        let waiting: Vec<Element> = self.held.take().into_iter().chain(self.injected.drain(..)).collect();
        for el in waiting {
            self.finish(el.origin, 0, Err(format!("queue {} stopped", self.index)));
            returned += 1;
        }
        bump(&self.stats.returned_on_stop, returned as u64);
        self.call_guest();
        if let Some(Err(e)) = self.bounce.take().map(|mut p| p.release()) {
            first.get_or_insert(e);
        }
        first.map_or(Ok(returned), Err)
    }
}

/// The queue's bounce pool, made on first use (copy queues get theirs up front;
/// translate queues only when something is injected).
fn pool_of<'a>(
    bounce: &'a mut Option<BouncePool>,
    space: Option<&BounceSpace>,
    forwarding: Forwarding,
    index: u32,
) -> Result<&'a mut BouncePool, String> {
    if bounce.is_none() {
        let s = space.ok_or_else(|| format!("queue {index} has no bounce buffer space"))?;
        let strategy = match forwarding {
            Forwarding::Copy(st) => st,
            Forwarding::Translate => s.strategy,
        };
        *bounce = Some(BouncePool::new(s.dma.clone(), s.asid, strategy, 1).map_err(|e| e.to_string())?);
    }
    bounce.as_mut().ok_or_else(|| "no bounce pool".to_string())
}

/// Copies the guest's readable segments into `b` from its start.
fn fill_from_guest(mem: &GuestMemory, b: &mut BounceBuf, segs: &[Segment]) -> Result<(), String> {
    let mut at = 0usize;
    let mut tmp = Vec::new();
    for s in segs {
        match mem.host_ptr(s.addr, s.len as u64) {
            Ok(p) => {
                // SAFETY: host_ptr checked s.len bytes of guest memory at p.
                let src = unsafe { std::slice::from_raw_parts(p.as_ptr(), s.len as usize) };
                b.write(at, src);
            }
            Err(_) => {
                // The segment straddles two regions: copy it piecewise.
                tmp.resize(s.len as usize, 0);
                mem.read(s.addr, &mut tmp).map_err(|e| e.to_string())?;
                b.write(at, &tmp);
            }
        }
        at += s.len as usize;
    }
    Ok(())
}
