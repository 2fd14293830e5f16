//! Dirty logging's cost on the forwarding path: svq's translate-mode `ShadowQueue` driven
//! in process (the same harness as `svq bench`'s in-process forwarding rows, with chains
//! the device writes into, as on a receive queue) with a `DirtyLog` attached against the
//! same queue without it, a dirty round of each in turn: one queue, one memory, one set
//! of buffers, so that the two differ only in the log (two queues in two memories differ
//! in cache placement by more than the log costs).
//!
//! A cargo test binary like `guest_ring_parse.rs` (the library's in-process bench module
//! is built only into the Python extension); it prints one `SVQ_BENCH {json}` line per
//! case, which `svq bench` parses:
//!
//! ```sh
//! cargo test --release --bench dirty_log -- --nocapture
//! ```
//!
//! Per batch of 32: the guest publishes chains of device-writable buffers, svq forwards
//! them (timed), the device completes every chain with its whole writable length, svq
//! reaps (timed): with the log attached that is where every written page and the guest's
//! used ring are marked. The log is fetched and cleared every 64 batches, untimed, like a
//! migration's dirty rounds (far more often than a real one). Each run checks that the log
//! held exactly the pages of the buffers and of the used ring. `SVQ_BENCH_QUICK=1`
//! shortens the run.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use svq::dirty::DirtyLog;
use svq::eventfd::EventFd;
use svq::fault::QueueHealth;
use svq::mem::GuestMemory;
use svq::ring::{Buf, BufferSpace, Chain, Descriptor, RingLayout, RingReader, RingWriter};
use svq::shadow::{Forwarding, QueueStats, RegionIova, ShadowFds, ShadowParts, ShadowQueue};

const GPA: u64 = 0x4000_0000;
const SIZE: u64 = 4 << 20;
const BUF_BASE: u64 = GPA + 0x10_0000;
const STRIDE: u64 = 2048;
const IOVA: u64 = 0x1_0000_0000;
const QUEUE: u16 = 256;
const BATCH: usize = 32;
const PAGE: u64 = 4096;
/// Batches per dirty round.
const ROUND: u64 = 64;

/// The device's view: the guest region at its IOVA.
struct DeviceSpace;
impl BufferSpace for DeviceSpace {
    const NAME: &'static str = "the bench device's IOTLB";
    fn check(&self, addr: u64, len: u64, _write: bool) -> bool {
        addr >= IOVA && addr.checked_add(len).is_some_and(|e| e <= IOVA + SIZE)
    }
    fn read_desc(&self, _table: u64, _i: u32) -> Option<Descriptor> {
        None
    }
}

fn segment_lens(frame: usize, segments: usize) -> Vec<u32> {
    let per = frame.div_ceil(segments).max(1);
    (0..frame).step_by(per).map(|at| per.min(frame - at) as u32).collect()
}

/// One shadowed queue and the bench playing its guest and its device.
struct Harness {
    sq: ShadowQueue,
    guest: RingWriter,
    device: RingReader,
    chains: Vec<Vec<Buf>>,
    chain: Chain,
    log: Arc<DirtyLog>,
    /// The pages a round must have logged: the buffers' and the used ring's.
    want: BTreeSet<u64>,
    _mem: (Arc<GuestMemory>, GuestMemory),
}

impl Harness {
    fn new(segments: usize, frame: usize) -> Result<Self, String> {
        let lens = segment_lens(frame, segments);
        let mem = Arc::new(GuestMemory::new(&[(GPA, SIZE)]).map_err(|e| e.to_string())?);
        let layout = RingLayout::new(QUEUE).ok_or("queue size")?;
        let guest_ring = mem.packed_vring(GPA, layout).map_err(|e| e.to_string())?;
        // The shadow ring in memory of its own, as a session allocates it.
        let shadow_mem = GuestMemory::new(&[(0, 0x10_0000)]).map_err(|e| e.to_string())?;
        let shadow_ring = shadow_mem.packed_vring(0, layout).map_err(|e| e.to_string())?;
        let efd = || EventFd::new().map_err(|e| format!("eventfd: {e}"));
        let fds = ShadowFds { guest_kick: Arc::new(efd()?), guest_call: Arc::new(efd()?), device_kick: efd()?, device_call: efd()? };
        let used_gpa = GPA + layout.packed_offsets().2;
        let sq = ShadowQueue::new(ShadowParts {
            index: 0,
            forwarding: Forwarding::Translate,
            guest: RingReader::new(guest_ring, 0, true, false),
            shadow: RingWriter::new(shadow_ring, 0, true),
            mem: mem.clone(),
            regions: vec![RegionIova { gpa: GPA, size: SIZE, iova: IOVA }],
            fds,
            stats: Arc::new(QueueStats::default()),
            health: Arc::new(QueueHealth::default()),
            bounce_space: None,
            bounce: None,
            used_gpa,
        });
        let log = Arc::new(DirtyLog::new(GPA + SIZE).map_err(|e| e.to_string())?);
        let mut guest = RingWriter::new(guest_ring, 0, true);
        let mut device = RingReader::new(shadow_ring, 0, true, false);
        device.enable_notify();
        guest.enable_cb();
        let addr = |j: usize, s: usize| BUF_BASE + (j * lens.len() + s) as u64 * STRIDE;
        let chains =
            (0..BATCH).map(|j| lens.iter().enumerate().map(|(s, &len)| Buf { addr: addr(j, s), len, write: true }).collect()).collect();
        let mut want: BTreeSet<u64> = (0..BATCH)
            .flat_map(|j| lens.iter().enumerate().flat_map(move |(s, &len)| (addr(j, s) / PAGE)..=((addr(j, s) + len as u64 - 1) / PAGE)))
            .collect();
        want.extend((used_gpa / PAGE)..=((used_gpa + layout.used_bytes() - 1) / PAGE));
        Ok(Harness { sq, guest, device, chains, chain: Chain::default(), log, want, _mem: (mem, shadow_mem) })
    }

    /// One batch, with the log attached or not: the guest publishes, svq forwards (timed),
    /// the device completes every chain with its whole writable length, svq reaps (timed),
    /// the guest reaps. svq's ns.
    fn batch(&mut self, logged: bool) -> Result<f64, String> {
        if logged != self.sq.logging() {
            self.sq.set_dirty_log(logged.then(|| self.log.clone()));
        }
        for c in &self.chains {
            self.guest.add(c).map_err(|e| e.to_string())?;
        }
        self.guest.publish();
        let t = Instant::now();
        self.sq.forward();
        let mut ns = t.elapsed().as_nanos() as f64;
        self.device.disable_notify();
        let mut n = 0;
        while self.device.pop(&DeviceSpace, &mut self.chain).map_err(|e| format!("device: {e}"))? {
            self.device.push_used(self.chain.head, self.chain.in_len as u32);
            n += 1;
        }
        self.device.publish_used();
        self.device.enable_notify();
        let t = Instant::now();
        self.sq.reap();
        ns += t.elapsed().as_nanos() as f64;
        let mut got = 0;
        while self.guest.pop_used().map_err(|e| format!("guest: {e}"))?.is_some() {
            got += 1;
        }
        self.guest.enable_cb();
        if n != BATCH || got != BATCH || self.sq.is_broken() {
            return Err(format!("forwarded {n} and completed {got} of {BATCH} elements"));
        }
        Ok(ns)
    }

    /// One dirty round (untimed): whether the log held exactly the pages the logged
    /// batches wrote (every batch writes the same buffers).
    fn round(&mut self) -> bool {
        self.log.fetch_and_clear().into_iter().collect::<BTreeSet<_>>() == self.want
    }
}

/// What [`measure`] found: svq's ns per element with the log and without, each the median
/// over the dirty rounds (`ROUND` batches each; the median, because a round that an
/// interrupt or another process hit is slower by far more than the log costs), and
/// whether every round logged exactly.
struct Figures {
    logged_ns: f64,
    plain_ns: f64,
    exact: bool,
}

/// A dirty round (`ROUND` batches) with the log and one without in turn, for `rounds`
/// rounds each: whole rounds rather than single batches, so that each finds the caches and
/// branch predictors as a queue that stays logged (or not) for a while does.
fn measure(segments: usize, frame: usize, rounds: u64) -> Result<Figures, String> {
    let mut h = Harness::new(segments, frame)?;
    let (mut logged, mut plain, mut exact) = (Vec::new(), Vec::new(), true);
    for r in 0..rounds {
        // Which goes first alternates, so neither always follows the other.
        for with_log in [r % 2 == 0, r % 2 != 0] {
            let mut t = 0f64;
            for _ in 0..ROUND {
                t += h.batch(with_log)?;
            }
            if with_log {
                exact &= h.round();
            }
            // The first rounds warm up.
            if r > 1 {
                if with_log {
                    logged.push(t)
                } else {
                    plain.push(t)
                }
            }
        }
    }
    let per = |mut t: Vec<f64>| {
        t.sort_by(f64::total_cmp);
        t[t.len() / 2] / (ROUND as usize * BATCH) as f64
    };
    Ok(Figures { logged_ns: per(logged), plain_ns: per(plain), exact })
}

#[test]
fn dirty_log_vs_none() {
    let quick = std::env::var("SVQ_BENCH_QUICK").is_ok_and(|v| v == "1");
    let rounds = if quick { 40 } else { 400 };
    for (segments, frame) in [(1, 64), (1, 1500), (4, 1500)] {
        let f = measure(segments, frame, rounds).unwrap();
        // Printed first: the figures of a run whose log was wrong are still seen.
        println!(
            "SVQ_BENCH {{\"segments\": {segments}, \"frame_size\": {frame}, \"elements\": {}, \"svq_ns\": {:.3}, \"peer_ns\": {:.3}, \"agree\": {}}}",
            rounds * ROUND * BATCH as u64,
            f.logged_ns,
            f.plain_ns,
            f.exact
        );
        assert!(f.exact, "the dirty log missed a written page or marked another");
    }
}
