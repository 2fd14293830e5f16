//! In-process measurements for `svq bench`: svq's hot paths and their peers timed in the
//! same run, where the Python boundary would hide the figure.
//!
//! * [`iova`]: svq's [`IovaAllocator`] against [`FirstFitAllocator`], the linear
//!   first-fit design (walk the mappings in address order looking for a hole; reverse
//!   look-ups by scanning every mapping) that QEMU's `iova-tree` and most simple
//!   allocators use, at a given number of live mappings after fragmentation.
//! * [`forward`]: svq's real [`ShadowQueue`] (guest [`RingReader`] → translation →
//!   shadow [`RingWriter`], then used-entry validation and completion) driven in-process
//!   on one thread, with this module playing the guest driver and the device.
//! * [`copy`]: copy mode's linearization into pool buffers against memcpy.
//!
//! Times come from [`Instant`] around loops (never around single operations shorter than
//! the clock's own cost), and every result is fed to [`black_box`] so nothing is optimised
//! away. Figures are nanoseconds per operation; what matters is the ratio to the peer.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::eventfd::EventFd;
use crate::fault::QueueHealth;
use crate::iova::IovaAllocator;
use crate::mem::GuestMemory;
use crate::ring::layout::VRING_DESC_F_NEXT;
use crate::ring::mock::HeapRing;
use crate::ring::reader::BufferSpace;
use crate::ring::{Buf, Chain, Descriptor, RingLayout, RingReader, RingWriter, Vring};
use crate::shadow::{Forwarding, QueueStats, RegionIova, ShadowFds, ShadowParts, ShadowQueue};
use crate::virtio::{Perm, PAGE_SIZE};

// ---------------------------------------------------------------------------------------
// IOVA allocator
// ---------------------------------------------------------------------------------------

/// One mapping of the peer allocator.
#[derive(Debug, Clone, Copy)]
struct PeerMapping {
    size: u64,
    host_addr: u64,
}

/// The peer: a first-fit allocator over one ordered map of live mappings, the common
/// design (QEMU's `iova_tree_alloc_map` / `iova_tree_find_address`). Allocation walks the
/// mappings in address order until the gap before one is large enough; a reverse look-up
/// scans every mapping. Both are linear in the number of live mappings.
#[derive(Debug)]
pub struct FirstFitAllocator {
    first: u64,
    last: u64,
    maps: BTreeMap<u64, PeerMapping>,
}

impl FirstFitAllocator {
    /// An allocator for the page-aligned inclusive range `[first, last]` (`first > 0`).
    pub fn new(first: u64, last: u64) -> Self {
        FirstFitAllocator { first, last, maps: BTreeMap::new() }
    }

    /// First fit: the lowest gap of at least `size` bytes (page-rounded).
    pub fn alloc(&mut self, size: u64, host_addr: u64) -> Option<u64> {
        let size = size.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
        let mut cur = self.first;
        for (&iova, m) in &self.maps {
            if iova - cur >= size {
                break;
            }
            cur = iova + m.size;
        }
        if cur.checked_add(size - 1)? > self.last {
            return None;
        }
        self.maps.insert(cur, PeerMapping { size, host_addr });
        Some(cur)
    }

    /// Places a mapping at a known IOVA (only to build a large starting state quickly;
    /// the caller passes exactly what first fit would choose).
    pub fn insert_at(&mut self, iova: u64, size: u64, host_addr: u64) {
        self.maps.insert(iova, PeerMapping { size, host_addr });
    }

    /// Removes the mapping starting at `iova`.
    pub fn remove(&mut self, iova: u64) -> bool {
        self.maps.remove(&iova).is_some()
    }

    /// IOVA of `host_addr`: a scan of every mapping.
    pub fn iova_of_host(&self, host_addr: u64) -> Option<u64> {
        self.maps
            .iter()
            .find(|(_, m)| m.host_addr <= host_addr && host_addr - m.host_addr < m.size)
            .map(|(&iova, m)| iova + (host_addr - m.host_addr))
    }

    /// Live mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }
}

/// Figures of one [`iova`] run, in nanoseconds per operation.
#[derive(Debug, Clone, Default)]
pub struct IovaFigures {
    /// Live mappings while measuring.
    pub live: usize,
    /// svq: allocations of a 2-page mapping.
    pub svq_alloc_ns: f64,
    /// svq: frees of those mappings.
    pub svq_free_ns: f64,
    /// svq: reverse (host address → IOVA) look-ups.
    pub svq_lookup_ns: f64,
    /// svq operations timed of each kind.
    pub svq_ops: usize,
    /// Peer: allocations.
    pub peer_alloc_ns: f64,
    /// Peer: frees.
    pub peer_free_ns: f64,
    /// Peer: reverse look-ups.
    pub peer_lookup_ns: f64,
    /// Peer operations timed of each kind (capped: the peer is linear).
    pub peer_ops: usize,
    /// Both allocators placed the peer's allocations at the same IOVAs and answered every
    /// sampled look-up the same way.
    pub agree: bool,
    /// Seconds spent building the starting state (both allocators).
    pub setup_s: f64,
}

const HOST_BASE: u64 = 0x7f00_0000_0000;
const BATCH: usize = 64;

/// xorshift64*: a reproducible stream of look-up targets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Host address of the `i`th of the `2 * live` one-page mappings of the starting state.
fn start_host(i: u64) -> u64 {
    HOST_BASE + i * 2 * PAGE_SIZE
}

/// Host address of a live mapping (an odd-numbered one) picked at random, plus an offset.
fn probe_host(rng: &mut Rng, live: usize) -> u64 {
    let k = rng.next() % live as u64;
    start_host(2 * k + 1) + rng.next() % PAGE_SIZE
}

/// Measures svq's allocator and the first-fit peer at `live` live mappings.
///
/// Starting state, identical in both: `2 * live` one-page mappings placed from the
/// bottom of the IOVA space, then every other one freed, leaving `live` mappings and
/// `live` one-page holes. Then, in batches of 64, allocations of 2-page mappings (which
/// no hole fits: first fit walks past every hole) followed by their frees, and random
/// reverse look-ups of addresses inside live mappings. svq does `ops` of each; the peer
/// `peer_ops` (it is linear: at a million mappings each operation takes milliseconds).
pub fn iova(live: usize, ops: usize, peer_ops: usize) -> IovaFigures {
    let live = live.max(1);
    let (first, last) = (PAGE_SIZE, (1u64 << 48) - 1);
    let t0 = Instant::now();
    let mut svq = IovaAllocator::new(first, last).expect("non-empty range");
    let mut peer = FirstFitAllocator::new(first, last);
    let mut starts = Vec::with_capacity(2 * live);
    for i in 0..2 * live as u64 {
        let m = svq.alloc(PAGE_SIZE, start_host(i), None, Perm::ReadWrite).expect("room");
        // First fit into an empty tail places mappings back to back, like svq did.
        debug_assert_eq!(m.iova, first + i * PAGE_SIZE);
        peer.insert_at(m.iova, PAGE_SIZE, start_host(i));
        starts.push(m.iova);
    }
    for &iova in starts.iter().step_by(2) {
        svq.remove(iova).expect("live");
        peer.remove(iova);
    }
    drop(starts);
    let setup_s = t0.elapsed().as_secs_f64();
    let mut agree = svq.len() == live && peer.len() == live;

    let big = 2 * PAGE_SIZE;
    let big_host = |i: usize| HOST_BASE + (1 << 44) + i as u64 * 4 * PAGE_SIZE;
    let mut batch = Vec::with_capacity(BATCH);

    // svq: alloc+free in batches, then look-ups; best of three passes (it is cheap, and
    // the machine is noisy).
    let ops = ops.max(1);
    let (mut t_alloc, mut t_free, mut t_lookup, mut t_rng) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        let (mut ta, mut tf) = (0f64, 0f64);
        let mut done = 0;
        while done < ops {
            let n = BATCH.min(ops - done);
            let t = Instant::now();
            for i in 0..n {
                batch.push(svq.alloc(big, big_host(i), None, Perm::ReadWrite).expect("room").iova);
            }
            ta += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for &iova in &batch {
                black_box(svq.remove(iova).is_ok());
            }
            tf += t.elapsed().as_secs_f64();
            batch.clear();
            done += n;
        }
        t_alloc = t_alloc.min(ta);
        t_free = t_free.min(tf);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut sum = 0u64;
        let t = Instant::now();
        for _ in 0..ops {
            sum = sum.wrapping_add(svq.iova_of_host(probe_host(&mut rng, live)).unwrap_or(1));
        }
        t_lookup = t_lookup.min(t.elapsed().as_secs_f64());
        black_box(sum);
        // The cost of drawing the random addresses, taken out of both sides' look-up figures.
        let t = Instant::now();
        for _ in 0..ops {
            sum = sum.wrapping_add(black_box(probe_host(&mut rng, live)));
        }
        t_rng = t_rng.min(t.elapsed().as_secs_f64());
        black_box(sum);
    }

    // Peer, with the same operations.
    let peer_ops = peer_ops.max(1);
    let (mut p_alloc, mut p_free) = (0f64, 0f64);
    let mut done = 0;
    while done < peer_ops {
        let n = BATCH.min(peer_ops - done);
        let t = Instant::now();
        for i in 0..n {
            batch.push(peer.alloc(big, big_host(i)).expect("room"));
        }
        p_alloc += t.elapsed().as_secs_f64();
        // Cross-check, untimed: svq places the same request at the same IOVA (the lowest
        // address that fits: both end up at the tail).
        if done == 0 {
            let m = svq.alloc(big, big_host(0), None, Perm::ReadWrite).expect("room");
            agree &= m.iova == batch[0];
            svq.remove(m.iova).expect("live");
        }
        let t = Instant::now();
        for &iova in &batch {
            black_box(peer.remove(iova));
        }
        p_free += t.elapsed().as_secs_f64();
        batch.clear();
        done += n;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut results = Vec::with_capacity(peer_ops);
    let t = Instant::now();
    for _ in 0..peer_ops {
        results.push(peer.iova_of_host(probe_host(&mut rng, live)));
    }
    let p_lookup = t.elapsed().as_secs_f64();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for r in &results {
        agree &= svq.iova_of_host(probe_host(&mut rng, live)) == *r && r.is_some();
    }
    black_box(&results);

    let per = |t: f64, n: usize| t * 1e9 / n as f64;
    let rng_ns = per(t_rng, ops);
    IovaFigures {
        live,
        svq_alloc_ns: per(t_alloc, ops),
        svq_free_ns: per(t_free, ops),
        svq_lookup_ns: (per(t_lookup, ops) - rng_ns).max(0.0),
        svq_ops: ops,
        peer_alloc_ns: per(p_alloc, peer_ops),
        peer_free_ns: per(p_free, peer_ops),
        peer_lookup_ns: (per(p_lookup, peer_ops) - rng_ns).max(0.0),
        peer_ops,
        agree,
        setup_s,
    }
}

// ---------------------------------------------------------------------------------------
// Forwarding, in process
// ---------------------------------------------------------------------------------------

/// Guest address of the bench's guest memory (one region).
pub const FWD_GUEST_GPA: u64 = 0x4000_0000;
/// Size of the bench's guest memory.
pub const FWD_GUEST_SIZE: u64 = 4 << 20;
/// Guest address of the first buffer slot (the guest ring sits at `FWD_GUEST_GPA`).
pub const FWD_BUF_BASE: u64 = FWD_GUEST_GPA + 0x10_0000;
/// Bytes between consecutive buffer slots.
pub const FWD_BUF_STRIDE: u64 = 2048;
/// IOVA at which the guest memory is mapped for the device.
pub const FWD_REGION_IOVA: u64 = 0x1_0000_0000;
/// Queue size of the guest and shadow rings.
pub const FWD_QUEUE_SIZE: u16 = 256;

/// Guest address of segment `s` of the element in batch slot `j`.
pub fn fwd_buf_addr(j: usize, s: usize, segments: usize) -> u64 {
    FWD_BUF_BASE + (j * segments + s) as u64 * FWD_BUF_STRIDE
}

/// Segment lengths of a `frame_size`-byte frame split like `Driver.send` splits it.
pub fn fwd_segment_lens(frame_size: usize, segments: usize) -> Vec<u32> {
    let per = frame_size.div_ceil(segments.max(1)).max(1);
    let mut out = Vec::new();
    let mut left = frame_size;
    while left > 0 {
        let n = per.min(left);
        out.push(n as u32);
        left -= n;
    }
    out
}

/// What [`forward`] measured.
#[derive(Debug, Clone, Default)]
pub struct ForwardFigures {
    /// Elements forwarded and completed.
    pub elements: u64,
    /// svq's CPU per element: `ShadowQueue::forward` + `ShadowQueue::reap`, in ns.
    pub svq_ns: f64,
    /// Of which forwarding (pop, validate, translate, write the shadow ring, kick).
    pub forward_ns: f64,
    /// Of which reaping (validate used entries, complete the guest's chains, call).
    pub reap_ns: f64,
    /// Σ (iova · 31 + len) over every segment the device popped from the shadow ring
    /// (wrapping): what the pure-Python peer must reproduce.
    pub checksum: u64,
    /// Device kicks svq sent / suppressed; guest calls sent / suppressed.
    pub device_kicks: u64,
    /// Device kicks suppressed.
    pub device_kicks_suppressed: u64,
    /// Guest calls sent.
    pub guest_calls: u64,
    /// Guest calls suppressed.
    pub guest_calls_suppressed: u64,
}

/// The device's view of memory in the bench: the guest region at its IOVA.
struct DeviceSpace;
impl BufferSpace for DeviceSpace {
    const NAME: &'static str = "the bench device's IOTLB";
    fn check(&self, addr: u64, len: u64, _write: bool) -> bool {
        addr >= FWD_REGION_IOVA && addr.checked_add(len).is_some_and(|e| e <= FWD_REGION_IOVA + FWD_GUEST_SIZE)
    }
    fn read_desc(&self, _table: u64, _i: u32) -> Option<Descriptor> {
        None
    }
}

/// The device's view in the bare forwarder's runs: guest addresses as they are.
struct GuestSpace;
impl BufferSpace for GuestSpace {
    const NAME: &'static str = "the bench device's view of guest memory";
    fn check(&self, addr: u64, len: u64, _write: bool) -> bool {
        addr >= FWD_GUEST_GPA && addr.checked_add(len).is_some_and(|e| e <= FWD_GUEST_GPA + FWD_GUEST_SIZE)
    }
    fn read_desc(&self, _table: u64, _i: u32) -> Option<Descriptor> {
        None
    }
}

/// The ceiling peer of the in-process rows: a split-ring forwarder that only moves
/// descriptors between the same rings, in the same batches, with the same eventfds as
/// svq's shadow queue: no validation, no translation, one kick and one call per batch.
/// What svq's checks and translation cost is measured against it.
struct BareForwarder {
    guest: Vring,
    shadow: Vring,
    last_avail: u16,
    shadow_avail: u16,
    last_used: u16,
    guest_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl BareForwarder {
    fn forward(&mut self) {
        let avail = self.guest.avail_idx();
        fence(Ordering::Acquire);
        let mask = self.guest.size() - 1;
        while self.last_avail != avail {
            let head = self.guest.avail_entry(self.last_avail & mask);
            let mut i = head;
            // Bounded, like any walk of a ring another party writes.
            for _ in 0..self.guest.size() {
                let d = self.guest.desc(i);
                self.shadow.set_desc(i, d);
                if d.flags() & VRING_DESC_F_NEXT == 0 {
                    break;
                }
                i = d.next();
            }
            self.shadow.set_avail_entry(self.shadow_avail & mask, head);
            self.shadow_avail = self.shadow_avail.wrapping_add(1);
            self.last_avail = self.last_avail.wrapping_add(1);
        }
        fence(Ordering::Release);
        self.shadow.set_avail_idx(self.shadow_avail);
        self.kick.signal();
    }

    fn reap(&mut self) {
        let used = self.shadow.used_idx();
        fence(Ordering::Acquire);
        let mask = self.guest.size() - 1;
        while self.last_used != used {
            let (id, len) = self.shadow.used_entry(self.last_used & mask);
            self.guest.set_used_entry(self.guest_used & mask, id, len);
            self.guest_used = self.guest_used.wrapping_add(1);
            self.last_used = self.last_used.wrapping_add(1);
        }
        fence(Ordering::Release);
        self.guest.set_used_idx(self.guest_used);
        self.call.signal();
    }
}

/// One queue of the in-process harness: guest memory with the guest ring, svq's shadow
/// queue over it (or the bare forwarder), and the shadow ring the bench plays the device
/// on.
struct FwdQueue {
    /// The ceiling peer, forwarding instead of svq when set.
    bare: Option<BareForwarder>,
    /// Kept alive for the rings and the shadow queue, which point into it.
    _mem: Arc<GuestMemory>,
    /// The shadow ring's memory.
    _shadow: HeapRing,
    guest: RingWriter,
    device: RingReader,
    sq: ShadowQueue,
    stats: Arc<QueueStats>,
    chains: Vec<Vec<Buf>>,
    chain: Chain,
    checksum: u64,
}

impl FwdQueue {
    fn new(segments: usize, frame_size: usize, batch: usize, event_idx: bool) -> Result<Self, String> {
        Self::build(segments, frame_size, batch, event_idx, false)
    }

    fn build(segments: usize, frame_size: usize, batch: usize, event_idx: bool, bare: bool) -> Result<Self, String> {
        let segments = segments.max(1);
        let lens = fwd_segment_lens(frame_size.max(1), segments);
        if lens.iter().any(|&l| l as u64 > FWD_BUF_STRIDE) {
            return Err(format!("segments of {frame_size}/{segments} bytes exceed the {FWD_BUF_STRIDE}-byte slots"));
        }
        let batch = batch.clamp(1, FWD_QUEUE_SIZE as usize / lens.len());
        let mem = Arc::new(GuestMemory::new(&[(FWD_GUEST_GPA, FWD_GUEST_SIZE)]).map_err(|e| e.to_string())?);
        let layout = RingLayout::new(FWD_QUEUE_SIZE).ok_or("queue size")?;
        let guest_ring = mem.packed_vring(FWD_GUEST_GPA, layout).map_err(|e| e.to_string())?;
        let shadow = HeapRing::new(FWD_QUEUE_SIZE).ok_or("queue size")?;
        let mut guest = RingWriter::new(guest_ring, 0, event_idx);
        let mut device = RingReader::new(shadow.ring(), 0, event_idx, false);
        let efd = || EventFd::new().map_err(|e| format!("eventfd: {e}"));
        let fds = ShadowFds { guest_kick: Arc::new(efd()?), guest_call: Arc::new(efd()?), device_kick: efd()?, device_call: efd()? };
        let stats = Arc::new(QueueStats::default());
        let sq = ShadowQueue::new(ShadowParts {
            index: 1,
            forwarding: Forwarding::Translate,
            guest: RingReader::new(guest_ring, 0, event_idx, false),
            shadow: RingWriter::new(shadow.ring(), 0, event_idx),
            mem: mem.clone(),
            regions: vec![RegionIova { gpa: FWD_GUEST_GPA, size: FWD_GUEST_SIZE, iova: FWD_REGION_IOVA }],
            fds,
            stats: stats.clone(),
            health: Arc::new(QueueHealth::default()),
            bounce_space: None,
            bounce: None,
            used_gpa: FWD_GUEST_GPA + layout.packed_offsets().2,
        });
        // Both peers ask for notifications from the start.
        device.enable_notify();
        guest.enable_cb();
        let chains = (0..batch)
            .map(|j| lens.iter().enumerate().map(|(s, &len)| Buf { addr: fwd_buf_addr(j, s, segments), len, write: false }).collect())
            .collect();
        let bare = match bare {
            true => Some(BareForwarder {
                guest: guest_ring,
                shadow: shadow.ring(),
                last_avail: 0,
                shadow_avail: 0,
                last_used: 0,
                guest_used: 0,
                kick: efd()?,
                call: efd()?,
            }),
            false => None,
        };
        Ok(FwdQueue { bare, _mem: mem, _shadow: shadow, guest, device, sq, stats, chains, chain: Chain::default(), checksum: 0 })
    }

    /// One batch through the queue; svq's seconds forwarding and reaping.
    fn round(&mut self) -> Result<(f64, f64), String> {
        let batch = self.chains.len();
        for c in &self.chains {
            self.guest.add(c).map_err(|e| e.to_string())?;
        }
        self.guest.publish();

        let t = Instant::now();
        match self.bare.as_mut() {
            Some(b) => b.forward(),
            None => self.sq.forward(),
        }
        let fwd = t.elapsed().as_secs_f64();

        self.device.disable_notify();
        let mut n = 0;
        loop {
            let popped = match self.bare {
                Some(_) => self.device.pop(&GuestSpace, &mut self.chain),
                None => self.device.pop(&DeviceSpace, &mut self.chain),
            };
            if !popped.map_err(|e| format!("device: {e}"))? {
                break;
            }
            for s in &self.chain.out {
                self.checksum = self.checksum.wrapping_add(s.addr.wrapping_mul(31).wrapping_add(s.len as u64));
            }
            self.device.push_used(self.chain.head, 0);
            n += 1;
        }
        self.device.publish_used();
        self.device.enable_notify();
        if n != batch {
            return Err(format!("svq forwarded {n} of {batch} elements"));
        }

        let t = Instant::now();
        match self.bare.as_mut() {
            Some(b) => b.reap(),
            None => self.sq.reap(),
        }
        let reap = t.elapsed().as_secs_f64();

        self.guest.disable_cb();
        let mut got = 0;
        while self.guest.pop_used().map_err(|e| format!("guest: {e}"))?.is_some() {
            got += 1;
        }
        self.guest.enable_cb();
        if got != batch {
            return Err(format!("svq completed {got} of {batch} elements"));
        }
        if self.sq.is_broken() {
            return Err("queue broke".into());
        }
        Ok((fwd, reap))
    }
}

/// Runs svq's shadow virtqueue in process for at least `elements` elements of
/// `frame_size` bytes in `segments` device-readable descriptors each, `batch` at a time.
///
/// Per batch: the guest (this function, a [`RingWriter`] on the guest ring) adds `batch`
/// chains and publishes them; svq forwards them (**timed**); the device (a
/// [`RingReader`] on the shadow ring) pops and validates every chain, completes it with
/// length 0 and re-arms kicks; svq reaps (**timed**); the guest reaps and re-arms calls.
/// Notifications are real eventfd writes, so their cost is in svq's figure.
pub fn forward(segments: usize, frame_size: usize, elements: u64, batch: usize, event_idx: bool) -> Result<ForwardFigures, String> {
    forward_with(FwdQueue::new(segments, frame_size, batch, event_idx)?, elements)
}

/// [`forward`] with the bare split-ring forwarder in svq's place (the ceiling peer):
/// the same rings, batches, device and eventfds.
pub fn forward_bare(segments: usize, frame_size: usize, elements: u64, batch: usize) -> Result<ForwardFigures, String> {
    forward_with(FwdQueue::build(segments, frame_size, batch, false, true)?, elements)
}

fn forward_with(mut q: FwdQueue, elements: u64) -> Result<ForwardFigures, String> {
    let batch = q.chains.len() as u64;
    let mut fig = ForwardFigures::default();
    let (mut t_fwd, mut t_reap) = (0f64, 0f64);
    while fig.elements < elements {
        let (f, r) = q.round()?;
        t_fwd += f;
        t_reap += r;
        fig.elements += batch;
    }
    let s: std::collections::HashMap<_, _> = q.stats.snapshot().into_iter().collect();
    fig.checksum = q.checksum;
    fig.device_kicks = s["device_kicks"];
    fig.device_kicks_suppressed = s["device_kicks_suppressed"];
    fig.guest_calls = s["guest_calls"];
    fig.guest_calls_suppressed = s["guest_calls_suppressed"];
    let per = |t: f64| t * 1e9 / fig.elements as f64;
    fig.forward_ns = per(t_fwd);
    fig.reap_ns = per(t_reap);
    fig.svq_ns = per(t_fwd + t_reap);
    Ok(fig)
}

/// What [`forward_queues`] measured.
#[derive(Debug, Clone, Default)]
pub struct QueuesFigures {
    /// Elements forwarded and completed, over every queue and thread.
    pub elements: u64,
    /// svq's CPU per element (forward + reap), in ns, over every queue.
    pub svq_ns: f64,
    /// Elements per second of wall time, every thread together (each thread plays guest
    /// and device for its own queues, as [`forward`] does).
    pub rate: f64,
    /// Wall time of the run, in s.
    pub wall_s: f64,
}

/// `threads` threads, each with `queues` queues of its own (a virtio-net queue pair is
/// two), started together: each forwards at least `elements` elements per queue, a batch
/// on each of its queues in turn. Measures svq's per-element cost as the queues a thread
/// serves grow, and the rate as threads are added.
pub fn forward_queues(threads: usize, queues: usize, segments: usize, frame_size: usize, elements: u64) -> Result<QueuesFigures, String> {
    let (threads, queues) = (threads.max(1), queues.max(1));
    if threads > 256 || queues > 4096 {
        return Err(format!("{threads} threads of {queues} queues: at most 256 threads of 4096 queues"));
    }
    // Everything is built before any clock starts; each thread then waits for the word to
    // go (a dropped sender: a sibling could not start, and it ends at once).
    let mut workers = Vec::with_capacity(threads);
    let mut go = Vec::with_capacity(threads);
    for _ in 0..threads {
        let qs = (0..queues).map(|_| FwdQueue::new(segments, frame_size, 32, true)).collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("svq-bench-queues".into())
            .spawn(move || -> Result<(u64, f64), String> {
                rx.recv().map_err(|_| "not started".to_string())?;
                let mut qs = qs;
                let batch = qs[0].chains.len() as u64;
                let (mut done, mut svq) = (0u64, 0f64);
                while done < elements {
                    for q in &mut qs {
                        let (f, r) = q.round()?;
                        svq += f + r;
                    }
                    done += batch;
                }
                Ok((done * queues as u64, svq))
            })
            .map_err(|e| format!("bench thread: {e}"))?;
        workers.push(worker);
        go.push(tx);
    }
    let t0 = Instant::now();
    for tx in &go {
        let _ = tx.send(());
    }
    let mut fig = QueuesFigures::default();
    let mut svq = 0f64;
    for w in workers {
        let (n, s) = w.join().map_err(|_| "a bench thread panicked".to_string())??;
        fig.elements += n;
        svq += s;
    }
    fig.wall_s = t0.elapsed().as_secs_f64();
    fig.svq_ns = svq * 1e9 / fig.elements as f64;
    fig.rate = fig.elements as f64 / fig.wall_s;
    Ok(fig)
}

// ---------------------------------------------------------------------------------------
// Python bindings
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// Copy mode
// ---------------------------------------------------------------------------------------

/// What [`copy`] measured.
#[derive(Debug, Clone, Default)]
pub struct CopyFigures {
    /// Elements copied and completed.
    pub elements: u64,
    /// svq's CPU per element (forward: linearize into a pool buffer; reap: free it).
    pub svq_ns: f64,
    /// A plain memcpy of the same bytes from the same guest buffers, per element.
    pub memcpy_ns: f64,
}

/// Accepts every address: the bench device completes elements without reading them.
struct AnySpace;
impl BufferSpace for AnySpace {
    const NAME: &'static str = "the bench device";
    fn check(&self, _addr: u64, _len: u64, _write: bool) -> bool {
        true
    }
    fn read_desc(&self, _table: u64, _i: u32) -> Option<Descriptor> {
        None
    }
}

/// Copy mode in process: elements of `bytes` device-readable bytes (one guest buffer each)
/// through a copy-mode [`ShadowQueue`] with the pre-mapped pool, `batch` at a time, the
/// device completing each with length 0; against a memcpy of the same bytes from the same
/// guest buffers into `batch` host buffers.
pub fn copy(bytes: usize, elements: u64, batch: usize) -> Result<CopyFigures, String> {
    use crate::bounce::{BouncePool, Strategy};
    use crate::device::sim::SimDevice;
    use crate::dma::Dma;
    use crate::shadow::BounceSpace;

    let slot = (bytes as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let batch = batch.clamp(1, 64);
    let gpa = FWD_GUEST_GPA;
    let size = (1 << 20) + slot * batch as u64;
    let mem = Arc::new(GuestMemory::new(&[(gpa, size.div_ceil(PAGE_SIZE) * PAGE_SIZE)]).map_err(|e| e.to_string())?);
    mem.write(gpa + (1 << 20), &vec![0x5a; (slot as usize) * batch]).map_err(|e| e.to_string())?;
    let layout = RingLayout::new(FWD_QUEUE_SIZE).ok_or("queue size")?;
    let guest_ring = mem.packed_vring(gpa, layout).map_err(|e| e.to_string())?;
    let shadow = HeapRing::new(FWD_QUEUE_SIZE).ok_or("queue size")?;
    // An idle embedded device is the IOTLB the pool maps into.
    let dev: Arc<dyn crate::device::Device> = Arc::new(SimDevice::net([2, 0, 0, 0, 0, 1], 1500).map_err(|e| e.to_string())?);
    let dma = Arc::new(Dma::new(dev).map_err(|e| e.to_string())?);
    let chunks = (batch * (slot / PAGE_SIZE) as usize).div_ceil(64) + 1;
    let pool = BouncePool::new(dma.clone(), 0, Strategy::Pool, chunks).map_err(|e| e.to_string())?;
    let efd = || EventFd::new().map_err(|e| format!("eventfd: {e}"));
    let fds = ShadowFds { guest_kick: Arc::new(efd()?), guest_call: Arc::new(efd()?), device_kick: efd()?, device_call: efd()? };
    let mut sq = ShadowQueue::new(ShadowParts {
        index: 1,
        forwarding: Forwarding::Copy(Strategy::Pool),
        guest: RingReader::new(guest_ring, 0, true, false),
        shadow: RingWriter::new(shadow.ring(), 0, true),
        mem: mem.clone(),
        regions: Vec::new(),
        fds,
        stats: Arc::new(QueueStats::default()),
        health: Arc::new(QueueHealth::default()),
        bounce_space: Some(BounceSpace { dma, asid: 0, strategy: Strategy::Pool }),
        bounce: Some(pool),
        used_gpa: gpa + layout.packed_offsets().2,
    });
    let mut guest = RingWriter::new(guest_ring, 0, true);
    let mut device = RingReader::new(shadow.ring(), 0, true, false);
    device.enable_notify();
    guest.enable_cb();
    let addr = |j: usize| gpa + (1 << 20) + slot * j as u64;
    let mut chain = Chain::default();
    let mut fig = CopyFigures::default();
    let mut t_svq = 0f64;
    // The first rounds fault the pool's pages in (and the peer's): not timed.
    const WARM_ROUNDS: u64 = 2;
    let mut round = 0u64;
    while fig.elements < elements {
        let timed = round >= WARM_ROUNDS;
        round += 1;
        for j in 0..batch {
            guest.add(&[Buf { addr: addr(j), len: bytes as u32, write: false }]).map_err(|e| e.to_string())?;
        }
        guest.publish();
        let t = Instant::now();
        sq.forward();
        let mut spent = t.elapsed().as_secs_f64();
        let mut n = 0;
        while device.pop(&AnySpace, &mut chain).map_err(|e| format!("device: {e}"))? {
            device.push_used(chain.head, 0);
            n += 1;
        }
        device.publish_used();
        device.enable_notify();
        let t = Instant::now();
        sq.reap();
        spent += t.elapsed().as_secs_f64();
        while guest.pop_used().map_err(|e| format!("guest: {e}"))?.is_some() {}
        guest.enable_cb();
        if n != batch || sq.is_broken() {
            return Err(format!("copy mode forwarded {n} of {batch} elements"));
        }
        if timed {
            t_svq += spent;
            fig.elements += batch as u64;
        }
    }
    // The peer: the same bytes from the same guest buffers, copied by memcpy into as many
    // destination buffers as svq has bounce buffers in flight (the same working set),
    // after as many untimed rounds.
    let mut dst: Vec<Vec<u8>> = (0..batch).map(|_| vec![1u8; bytes]).collect();
    let warm = WARM_ROUNDS * batch as u64;
    let mut t = Instant::now();
    for i in 0..warm + fig.elements {
        if i == warm {
            t = Instant::now();
        }
        let j = i as usize % batch;
        let src = mem.host_ptr(addr(j), bytes as u64).map_err(|e| e.to_string())?;
        // SAFETY: `src` is valid for `bytes` bytes of guest memory (host_ptr checked) and
        // `dst[j]` is a separate buffer of the same length.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst[j].as_mut_ptr(), bytes) };
        black_box(&mut dst[j]);
    }
    fig.memcpy_ns = t.elapsed().as_secs_f64() * 1e9 / fig.elements as f64;
    fig.svq_ns = t_svq * 1e9 / fig.elements as f64;
    drop(sq);
    Ok(fig)
}

#[cfg(feature = "python")]
mod py {
    use pyo3::exceptions::PyRuntimeError;
    use pyo3::prelude::*;
    use pyo3::types::PyDict;

    /// svq's IOVA allocator against the linear first-fit peer at `live` live mappings
    /// (fragmented: every other one freed). Returns ns/op figures; see `svq.bench`.
    #[pyfunction]
    #[pyo3(signature = (live, ops, peer_ops = None))]
    fn bench_iova<'py>(py: Python<'py>, live: usize, ops: usize, peer_ops: Option<usize>) -> PyResult<Bound<'py, PyDict>> {
        let f = py.detach(|| super::iova(live, ops, peer_ops.unwrap_or(ops)));
        let d = PyDict::new(py);
        d.set_item("live", f.live)?;
        d.set_item("svq_alloc_ns", f.svq_alloc_ns)?;
        d.set_item("svq_free_ns", f.svq_free_ns)?;
        d.set_item("svq_lookup_ns", f.svq_lookup_ns)?;
        d.set_item("svq_ops", f.svq_ops)?;
        d.set_item("peer_alloc_ns", f.peer_alloc_ns)?;
        d.set_item("peer_free_ns", f.peer_free_ns)?;
        d.set_item("peer_lookup_ns", f.peer_lookup_ns)?;
        d.set_item("peer_ops", f.peer_ops)?;
        d.set_item("agree", f.agree)?;
        d.set_item("setup_s", f.setup_s)?;
        Ok(d)
    }

    /// svq's shadow virtqueue (pop → translate → shadow ring → reap → complete) run in
    /// process, same thread, no device thread: ns of svq CPU per element.
    #[pyfunction]
    #[pyo3(signature = (segments, frame_size, elements, batch = 32, event_idx = true))]
    fn bench_forward<'py>(
        py: Python<'py>,
        segments: usize,
        frame_size: usize,
        elements: u64,
        batch: usize,
        event_idx: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let f = py.detach(|| super::forward(segments, frame_size, elements, batch, event_idx)).map_err(PyRuntimeError::new_err)?;
        let d = timings(py, &f)?;
        d.set_item("checksum", f.checksum)?;
        d.set_item("device_kicks", f.device_kicks)?;
        d.set_item("device_kicks_suppressed", f.device_kicks_suppressed)?;
        d.set_item("guest_calls", f.guest_calls)?;
        d.set_item("guest_calls_suppressed", f.guest_calls_suppressed)?;
        Ok(d)
    }

    /// The bare split-ring forwarder on the same harness (see [`super::forward_bare`]).
    #[pyfunction]
    #[pyo3(signature = (segments, frame_size, elements, batch = 32))]
    fn bench_forward_bare<'py>(
        py: Python<'py>,
        segments: usize,
        frame_size: usize,
        elements: u64,
        batch: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let f = py.detach(|| super::forward_bare(segments, frame_size, elements, batch)).map_err(PyRuntimeError::new_err)?;
        timings(py, &f)
    }

    /// Elements and per-element times of a forwarding run, in ns.
    fn timings<'py>(py: Python<'py>, f: &super::ForwardFigures) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("elements", f.elements)?;
        d.set_item("svq_ns", f.svq_ns)?;
        d.set_item("forward_ns", f.forward_ns)?;
        d.set_item("reap_ns", f.reap_ns)?;
        Ok(d)
    }

    /// The constants of the in-process forwarding layout, for the pure-Python peer.
    #[pyfunction]
    fn bench_forward_layout<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("guest_gpa", super::FWD_GUEST_GPA)?;
        d.set_item("guest_size", super::FWD_GUEST_SIZE)?;
        d.set_item("buf_base", super::FWD_BUF_BASE)?;
        d.set_item("buf_stride", super::FWD_BUF_STRIDE)?;
        d.set_item("region_iova", super::FWD_REGION_IOVA)?;
        d.set_item("queue_size", super::FWD_QUEUE_SIZE)?;
        Ok(d)
    }

    /// Copy mode's per-element cost against memcpy of the same bytes (see [`super::copy`]).
    #[pyfunction]
    #[pyo3(signature = (bytes, elements, batch = 16))]
    fn bench_copy<'py>(py: Python<'py>, bytes: usize, elements: u64, batch: usize) -> PyResult<Bound<'py, PyDict>> {
        let f = py.detach(|| super::copy(bytes, elements, batch)).map_err(PyRuntimeError::new_err)?;
        let d = PyDict::new(py);
        d.set_item("elements", f.elements)?;
        d.set_item("svq_ns", f.svq_ns)?;
        d.set_item("memcpy_ns", f.memcpy_ns)?;
        Ok(d)
    }

    /// `threads` threads with `queues` queues each, in process (see [`super::forward_queues`]).
    #[pyfunction]
    #[pyo3(signature = (threads, queues, segments, frame_size, elements))]
    fn bench_forward_queues<'py>(
        py: Python<'py>,
        threads: usize,
        queues: usize,
        segments: usize,
        frame_size: usize,
        elements: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let f = py.detach(|| super::forward_queues(threads, queues, segments, frame_size, elements)).map_err(PyRuntimeError::new_err)?;
        let d = PyDict::new(py);
        d.set_item("elements", f.elements)?;
        d.set_item("svq_ns", f.svq_ns)?;
        d.set_item("rate", f.rate)?;
        d.set_item("wall_s", f.wall_s)?;
        Ok(d)
    }

    pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(bench_forward_queues, m)?)?;
        m.add_function(wrap_pyfunction!(bench_forward_bare, m)?)?;
        m.add_function(wrap_pyfunction!(bench_copy, m)?)?;
        m.add_function(wrap_pyfunction!(bench_iova, m)?)?;
        m.add_function(wrap_pyfunction!(bench_forward, m)?)?;
        m.add_function(wrap_pyfunction!(bench_forward_layout, m)?)?;
        Ok(())
    }
}

/// Registers the benchmark functions on the extension module.
#[cfg(feature = "python")]
pub fn register(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py::register(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_peer_and_svq_agree() {
        let f = iova(1000, 200, 200);
        assert!(f.agree, "{f:?}");
        assert_eq!(f.live, 1000);
    }

    #[test]
    fn first_fit_takes_the_lowest_gap() {
        let mut p = FirstFitAllocator::new(PAGE_SIZE, 64 * PAGE_SIZE - 1);
        let a = p.alloc(PAGE_SIZE, 0).unwrap();
        let b = p.alloc(2 * PAGE_SIZE, 0x10_0000).unwrap();
        let c = p.alloc(PAGE_SIZE, 0).unwrap();
        assert_eq!((a, b, c), (PAGE_SIZE, 2 * PAGE_SIZE, 4 * PAGE_SIZE));
        p.remove(b);
        assert_eq!(p.alloc(3 * PAGE_SIZE, 0), Some(5 * PAGE_SIZE));
        assert_eq!(p.alloc(PAGE_SIZE, 0x20_0000), Some(2 * PAGE_SIZE));
        assert_eq!(p.iova_of_host(0x20_0005), Some(2 * PAGE_SIZE + 5));
        assert_eq!(p.iova_of_host(0x30_0000), None);
    }

    #[test]
    fn in_process_forwarding_round_trips() {
        for (segs, size) in [(1, 64), (4, 1500)] {
            let f = forward(segs, size, 256, 32, true).unwrap();
            assert_eq!(f.elements, 256);
            let lens = fwd_segment_lens(size, segs);
            let mut want = 0u64;
            for _ in 0..256 / 32 {
                for j in 0..32 {
                    for (s, &l) in lens.iter().enumerate() {
                        let iova = fwd_buf_addr(j, s, segs) - FWD_GUEST_GPA + FWD_REGION_IOVA;
                        want = want.wrapping_add(iova.wrapping_mul(31).wrapping_add(l as u64));
                    }
                }
            }
            assert_eq!(f.checksum, want);
            // One kick and one call per batch: both peers re-arm after every batch.
            assert_eq!(f.device_kicks, 8);
            assert_eq!(f.guest_calls, 8);
        }
    }
}
