//! An in-process guest driver: it owns split rings in guest memory, posts buffers on them,
//! kicks, waits for calls and reaps completions. It plays the guest for the demo, the
//! tests and the benchmarks, through batch operations (never a call per descriptor).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::GuestQueue;
use crate::eventfd::EventFd;
use crate::fault::{QueueFault, QueueHealth};
use crate::iova::IovaAllocator;
use crate::mem::{GuestMemory, MemError};
use crate::ring::layout::{align_up, RingLayout, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use crate::ring::{Buf, RingWriter, UsedError};
use crate::virtio::{Perm, PAGE_SIZE};

/// A failed driver operation.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The queue index does not exist.
    #[error("no queue {0}")]
    NoQueue(u32),
    /// Not enough guest memory for the buffers.
    #[error("guest buffer memory exhausted ({0} bytes wanted)")]
    NoMemory(u64),
    /// Not enough free descriptors.
    #[error(transparent)]
    RingFull(#[from] crate::ring::RingFull),
    /// The device (or svq acting as it) broke the ring protocol.
    #[error("queue {queue}: {source}")]
    Used {
        /// Queue.
        queue: u32,
        /// The broken rule.
        #[source]
        source: UsedError,
    },
    /// The queue was broken by a fault svq detected.
    #[error(transparent)]
    Broken(QueueFault),
    /// Nothing completed in time.
    #[error("queue {queue}: {got} of {want} completions after {waited:?}")]
    Timeout {
        /// Queue.
        queue: u32,
        /// Completions received.
        got: usize,
        /// Completions wanted.
        want: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// A guest memory access failed.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A buffer longer than a descriptor can describe.
    #[error("buffer of {0} bytes is too long for one descriptor")]
    TooLong(usize),
    /// A request the driver refuses before touching the ring (e.g. an empty buffer, which
    /// would be a zero-length descriptor the other side must refuse).
    #[error("{0}")]
    Invalid(String),
}

/// A completed chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Head id.
    pub head: u16,
    /// Bytes the device wrote.
    pub len: u32,
    /// The bytes read back from the chain's writable buffers: the first `len` bytes, or
    /// all of them when asked for (virtio-blk puts its status in the last byte whatever
    /// `len` says).
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Posted {
    /// Guest buffers (address, length, writable), in chain order.
    bufs: Vec<Buf>,
    /// Arena allocations to free: (address, pages).
    allocs: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct DriverQueue {
    spec: GuestQueue,
    writer: RingWriter,
    posted: Vec<Option<Posted>>,
    /// Chains taken off the used ring but not handed to a caller yet, as (head, used
    /// length, buffers): their descriptors may already carry new chains, their buffers
    /// wait here until the next wait reads them (whole or not) before anything newer. An
    /// asynchronous wait keeps what it reaped here, so a waiter abandoned at any point
    /// loses nothing.
    held: VecDeque<(u16, u32, Posted)>,
}

/// The in-process guest driver.
#[derive(Debug)]
pub struct Driver {
    mem: Arc<GuestMemory>,
    queues: Vec<DriverQueue>,
    arena: IovaAllocator,
    /// Freed buffers kept for reuse, by size in pages: posting a buffer costs a pop, not
    /// an allocator walk. Given back to the arena when it runs out.
    spare: HashMap<u64, Vec<u64>>,
    spares: usize,
}

impl Driver {
    /// Places one ring per entry of `sizes` at the start of guest memory and uses the rest
    /// as buffer space.
    pub fn new(mem: Arc<GuestMemory>, sizes: &[u16], event_idx: bool, indirect: bool) -> Result<Self, DriverError> {
        let regions = mem.regions();
        let first = regions.first().ok_or(DriverError::NoMemory(0))?;
        let base = first.gpa;
        let last = regions.last().map(|r| r.gpa + r.size - 1).unwrap_or(base);
        let mut arena = IovaAllocator::new(base, last).map_err(|_| DriverError::NoMemory(0))?;
        // Gaps between regions are not guest memory: reserve them.
        for w in regions.windows(2) {
            let gap = w[1].gpa - (w[0].gpa + w[0].size);
            if gap > 0 {
                arena.insert(w[0].gpa + w[0].size, gap, 0, None, Perm::ReadWrite).map_err(|_| DriverError::NoMemory(gap))?;
            }
        }
        let mut queues = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let layout = RingLayout::new(size).ok_or(DriverError::NoQueue(i as u32))?;
            let (d, a, u, total) = layout.packed_offsets();
            let m = arena.alloc(align_up(total, PAGE_SIZE), 0, None, Perm::ReadWrite).map_err(|_| DriverError::NoMemory(total))?;
            mem.write(m.iova, &vec![0u8; total as usize])?;
            let spec = GuestQueue {
                index: i as u32,
                layout,
                desc: m.iova + d,
                avail: m.iova + a,
                used: m.iova + u,
                base: 0,
                used_base: 0,
                kick: Arc::new(EventFd::new().map_err(|e| MemError::Os { op: "eventfd", errno: e })?),
                call: Arc::new(EventFd::new().map_err(|e| MemError::Os { op: "eventfd", errno: e })?),
                event_idx,
                indirect,
                health: Arc::new(QueueHealth::default()),
            };
            let writer = RingWriter::new(mem.vring(layout, spec.desc, spec.avail, spec.used)?, 0, event_idx);
            queues.push(DriverQueue { spec, writer, posted: (0..size).map(|_| None).collect(), held: VecDeque::new() });
        }
        Ok(Driver { mem, queues, arena, spare: HashMap::new(), spares: 0 })
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The queues' descriptions, for whoever serves them.
    pub fn guest_queues(&self) -> Vec<GuestQueue> {
        self.queues.iter().map(|q| q.spec.clone()).collect()
    }

    fn queue(&mut self, q: u32) -> Result<&mut DriverQueue, DriverError> {
        self.queues.get_mut(q as usize).ok_or(DriverError::NoQueue(q))
    }

    /// A buffer of `len` bytes in guest memory: (address, pages).
    fn alloc(&mut self, len: usize) -> Result<(u64, u64), DriverError> {
        if len > u32::MAX as usize {
            return Err(DriverError::TooLong(len));
        }
        let pages = (len.max(1) as u64).div_ceil(PAGE_SIZE);
        if let Some(addr) = self.spare.get_mut(&pages).and_then(Vec::pop) {
            self.spares -= 1;
            return Ok((addr, pages));
        }
        let mut placed = self.arena.alloc(pages * PAGE_SIZE, 0, None, Perm::ReadWrite);
        if placed.is_err() && self.spares > 0 {
            // Spare buffers of other sizes go back to the arena, and it is asked again.
            for addr in std::mem::take(&mut self.spare).into_values().flatten() {
                let _ = self.arena.remove(addr);
            }
            self.spares = 0;
            placed = self.arena.alloc(pages * PAGE_SIZE, 0, None, Perm::ReadWrite);
        }
        placed.map(|m| (m.iova, pages)).map_err(|_| DriverError::NoMemory(len as u64))
    }

    /// Posts one chain: each `out` part in its own device-readable buffer, then one
    /// device-writable buffer per `in_sizes` entry. Call [`Driver::kick`] to publish.
    pub fn add(&mut self, q: u32, out: &[&[u8]], in_sizes: &[u32]) -> Result<u16, DriverError> {
        let mut posted = Posted::default();
        let res = self.fill(&mut posted, out, in_sizes).and_then(|_| {
            let queue = self.queue(q)?;
            Ok(queue.writer.add(&posted.bufs)?)
        });
        self.settle(q, posted, res)
    }

    /// Like [`Driver::add`], but the chain goes in an indirect table in guest memory and
    /// takes one descriptor of the ring (`RING_INDIRECT_DESC`).
    pub fn add_indirect(&mut self, q: u32, out: &[&[u8]], in_sizes: &[u32]) -> Result<u16, DriverError> {
        let mut posted = Posted::default();
        let res = self.fill(&mut posted, out, in_sizes).and_then(|_| {
            let n = posted.bufs.len();
            let (table, pages) = self.alloc(n * 16)?;
            posted.allocs.push((table, pages));
            let mut bytes = Vec::with_capacity(n * 16);
            for (i, b) in posted.bufs.iter().enumerate() {
                let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT;
                }
                let next = if i + 1 < n { i as u16 + 1 } else { 0 };
                bytes.extend_from_slice(&b.addr.to_le_bytes());
                bytes.extend_from_slice(&b.len.to_le_bytes());
                bytes.extend_from_slice(&flags.to_le_bytes());
                bytes.extend_from_slice(&next.to_le_bytes());
            }
            self.mem.write(table, &bytes)?;
            let writable: u64 = posted.bufs.iter().filter(|b| b.write).map(|b| b.len as u64).sum();
            let queue = self.queue(q)?;
            Ok(queue.writer.add_indirect(table, n as u32, writable.min(u32::MAX as u64) as u32)?)
        });
        self.settle(q, posted, res)
    }

    /// Keeps a posted chain's buffers with its head, or frees them when posting failed.
    fn settle(&mut self, q: u32, posted: Posted, res: Result<u16, DriverError>) -> Result<u16, DriverError> {
        match res {
            Ok(head) => {
                self.queues[q as usize].posted[head as usize] = Some(posted);
                Ok(head)
            }
            Err(e) => {
                self.free(&posted);
                Err(e)
            }
        }
    }

    fn fill(&mut self, posted: &mut Posted, out: &[&[u8]], in_sizes: &[u32]) -> Result<(), DriverError> {
        if out.is_empty() && in_sizes.is_empty() {
            return Err(DriverError::Invalid("a chain needs at least one buffer".into()));
        }
        if out.iter().any(|p| p.is_empty()) || in_sizes.contains(&0) {
            return Err(DriverError::Invalid("a buffer of 0 bytes cannot be posted: virtio forbids zero-length descriptors".into()));
        }
        for part in out {
            let (addr, pages) = self.alloc(part.len())?;
            posted.allocs.push((addr, pages));
            self.mem.write(addr, part)?;
            posted.bufs.push(Buf { addr, len: part.len() as u32, write: false });
        }
        for &n in in_sizes {
            let (addr, pages) = self.alloc(n as usize)?;
            posted.allocs.push((addr, pages));
            posted.bufs.push(Buf { addr, len: n, write: true });
        }
        Ok(())
    }

    fn free(&mut self, posted: &Posted) {
        for &(addr, pages) in &posted.allocs {
            self.spare.entry(pages).or_default().push(addr);
            self.spares += 1;
        }
    }

    /// Publishes posted chains and kicks if the other side wants it. Returns whether it kicked.
    pub fn kick(&mut self, q: u32) -> Result<bool, DriverError> {
        let queue = self.queue(q)?;
        let kick = queue.writer.publish();
        if kick {
            queue.spec.kick.signal();
        }
        Ok(kick)
    }

    /// Reaps what has completed, without waiting: held chains first, then the used ring.
    pub fn poll(&mut self, q: u32, max: usize, whole: bool, out: &mut Vec<Completion>) -> Result<usize, DriverError> {
        let mut n = 0;
        while n < max {
            let queue = self.queue(q)?;
            let used = match queue.held.pop_front() {
                Some(c) => Some(c),
                None => queue.writer.pop_used().map_err(|source| DriverError::Used { queue: q, source })?.map(|(head, len)| {
                    let posted = queue.posted[head as usize].take().unwrap_or_default();
                    (head, len, posted)
                }),
            };
            let Some((head, len, posted)) = used else { break };
            self.deliver(head, len, posted, whole, out)?;
            n += 1;
        }
        Ok(n)
    }

    /// Reads a completed chain's written bytes into `out` and frees its buffers.
    fn deliver(&mut self, head: u16, len: u32, posted: Posted, whole: bool, out: &mut Vec<Completion>) -> Result<(), DriverError> {
        let writable: usize = posted.bufs.iter().filter(|b| b.write).map(|b| b.len as usize).sum();
        let mut data = vec![0u8; if whole { writable } else { len as usize }];
        let mut at = 0usize;
        for b in posted.bufs.iter().filter(|b| b.write) {
            let take = (b.len as usize).min(data.len() - at);
            if take == 0 {
                break;
            }
            self.mem.read(b.addr, &mut data[at..at + take])?;
            at += take;
        }
        self.free(&posted);
        out.push(Completion { head, len, data });
        Ok(())
    }

    /// Takes everything on the used ring into the queue's held chains (their bytes
    /// unread, their descriptors free for new chains); returns how many are held.
    fn collect(&mut self, q: u32) -> Result<usize, DriverError> {
        let queue = self.queue(q)?;
        while let Some((head, len)) = queue.writer.pop_used().map_err(|source| DriverError::Used { queue: q, source })? {
            let posted = queue.posted[head as usize].take().unwrap_or_default();
            queue.held.push_back((head, len, posted));
        }
        Ok(queue.held.len())
    }

    /// Hands held chains to `out` until it has `want`.
    fn deliver_held(&mut self, q: u32, want: usize, whole: bool, out: &mut Vec<Completion>) -> Result<(), DriverError> {
        while out.len() < want {
            let Some((head, len, posted)) = self.queue(q)?.held.pop_front() else { break };
            self.deliver(head, len, posted, whole, out)?;
        }
        Ok(())
    }

    /// One step of a wait that may be abandoned between steps (an asynchronous wait):
    /// unlike [`Driver::wait_step`], what it reaps stays with the driver until `want`
    /// chains completed, and only then goes to `out` (true). Otherwise it re-arms
    /// notifications and returns false: sleep on [`Driver::call`], then step again.
    /// When it fails (the queue broke) `out` holds what completed, up to `want`.
    pub fn try_complete(&mut self, q: u32, want: usize, whole: bool, out: &mut Vec<Completion>) -> Result<bool, DriverError> {
        loop {
            self.queue(q)?.writer.disable_cb();
            let held = match self.collect(q) {
                Ok(n) => n,
                Err(e) => {
                    self.deliver_held(q, want, whole, out)?;
                    return Err(e);
                }
            };
            if held + out.len() >= want {
                self.deliver_held(q, want, whole, out)?;
                return Ok(true);
            }
            let queue = self.queue(q)?;
            if let Some(f) = queue.spec.health.fault() {
                self.deliver_held(q, want, whole, out)?;
                return Err(DriverError::Broken(f));
            }
            // Re-arm, then re-check: a completion that raced the re-arm is taken now.
            if !queue.writer.enable_cb() {
                return Ok(false);
            }
        }
    }

    /// Queue `q`'s call eventfd: signalled when chains complete (once re-armed) and when
    /// the session closes.
    pub fn call(&self, q: u32) -> Result<Arc<EventFd>, DriverError> {
        self.queues.get(q as usize).map(|x| x.spec.call.clone()).ok_or(DriverError::NoQueue(q))
    }

    /// One step of a wait for `want` completions on queue `q`: reaps what is there into
    /// `out`, and when more are needed re-arms notifications and returns the eventfd to
    /// sleep on (None: `out` is complete). Whoever holds the driver behind a lock can
    /// release it while sleeping, so other threads keep using the other queues.
    pub fn wait_step(&mut self, q: u32, want: usize, whole: bool, out: &mut Vec<Completion>) -> Result<Option<Arc<EventFd>>, DriverError> {
        loop {
            self.queue(q)?.writer.disable_cb();
            self.poll(q, want.saturating_sub(out.len()), whole, out)?;
            if out.len() >= want {
                return Ok(None);
            }
            let queue = self.queue(q)?;
            if let Some(f) = queue.spec.health.fault() {
                return Err(DriverError::Broken(f));
            }
            // Re-arm, then re-check: a completion that raced the re-arm is reaped now.
            if !queue.writer.enable_cb() {
                return Ok(Some(queue.spec.call.clone()));
            }
        }
    }

    /// Waits until `want` chains completed (`whole`: read back every writable byte, not
    /// just the used length) or `timeout` passed. Fails early when the queue breaks.
    pub fn wait(&mut self, q: u32, want: usize, whole: bool, timeout: Duration) -> Result<Vec<Completion>, DriverError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(want);
        while let Some(call) = self.wait_step(q, want, whole, &mut out)? {
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout { queue: q, got: out.len(), want, waited: timeout });
            }
            call.wait(deadline - now);
        }
        Ok(out)
    }

    /// Fails with [`DriverError::NoQueue`] unless queue `q` exists.
    pub fn queue_exists(&self, q: u32) -> Result<(), DriverError> {
        self.queues.get(q as usize).map(drop).ok_or(DriverError::NoQueue(q))
    }

    /// Chains in flight on queue `q`.
    pub fn in_flight(&self, q: u32) -> usize {
        self.queues.get(q as usize).map_or(0, |x| x.writer.in_flight())
    }

    /// Live buffer allocations in guest memory (rings included).
    pub fn live_buffers(&self) -> usize {
        self.arena.len() - self.spares
    }
}
