//! Guest-ring parsing: svq's validated pop (`RingReader::pop` over `GuestMemory`) against
//! rust-vmm's `virtio-queue` (`Queue::pop_descriptor_chain` over a `vm-memory`
//! `GuestMemoryMmap`), both reading the **same ring in the same memory**.
//!
//! A cargo test binary (benches are auto-discovered, so no `[[bench]]` entry is needed and
//! the library does not depend on virtio-queue); it prints one `SVQ_BENCH {json}` line per
//! case, which `svq bench` parses:
//!
//! ```sh
//! cargo test --release --bench guest_ring_parse -- --nocapture
//! ```
//!
//! Both sides do the same job per chain: walk the descriptors, check every buffer lies in
//! guest memory, refuse zero-length buffers and readable-after-writable ones, and collect
//! the segments into reusable vectors (what a device does before touching the data).
//! `SVQ_BENCH_QUICK=1` shortens the run.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use svq::mem::GuestMemory;
use svq::ring::layout::RingLayout;
use svq::ring::{Buf, Chain, RingReader, RingWriter, Vring};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

const GPA: u64 = 0x4000_0000;
const SIZE: u64 = 4 << 20;
const QUEUE: u16 = 256;
const BUF_BASE: u64 = GPA + 0x10_0000;

struct Setup {
    mem: Arc<GuestMemory>,
    peer_mem: GuestMemoryMmap,
    ring: Vring,
    chains: usize,
}

fn setup(segments: usize) -> Setup {
    let mem = Arc::new(GuestMemory::new(&[(GPA, SIZE)]).expect("guest memory"));
    let layout = RingLayout::new(QUEUE).expect("layout");
    let ring = mem.packed_vring(GPA, layout).expect("ring in guest memory");
    // The guest fills the whole ring once; both parsers re-read it from the start.
    let mut w = RingWriter::new(ring, 0, false);
    let chains = QUEUE as usize / segments;
    for j in 0..chains {
        let bufs: Vec<Buf> =
            (0..segments).map(|s| Buf { addr: BUF_BASE + ((j * segments + s) as u64) * 2048, len: 1500, write: false }).collect();
        w.add(&bufs).expect("room");
    }
    w.publish();
    let host = mem.host_ptr(GPA, SIZE).expect("region").as_ptr();
    // SAFETY: `host..host+SIZE` is svq's MAP_SHARED read/write mapping of the region, alive
    // as long as `mem`, which the Setup keeps alongside the peer's view of it.
    let region =
        unsafe { MmapRegion::build_raw(host, SIZE as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED) }.expect("raw region");
    let peer_mem = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(GPA)).expect("region")]).expect("memory");
    Setup { mem, peer_mem, ring, chains }
}

/// svq: pop every chain of the ring `rounds` times. Returns (seconds, segment checksum).
fn svq_parse(s: &Setup, rounds: usize) -> (f64, u64) {
    let mut chain = Chain::default();
    let mut sum = 0u64;
    let t = Instant::now();
    for _ in 0..rounds {
        let mut r = RingReader::new(s.ring, 0, false, false);
        while r.pop(&*s.mem, &mut chain).expect("valid ring") {
            for seg in &chain.out {
                sum = sum.wrapping_add(seg.addr ^ seg.len as u64);
            }
            black_box(&chain);
        }
    }
    (t.elapsed().as_secs_f64(), sum)
}

/// virtio-queue, with the checks svq does.
fn peer_parse(s: &Setup, rounds: usize) -> (f64, u64) {
    let (d, a, u, _) = RingLayout::new(QUEUE).expect("layout").packed_offsets();
    let mut q = Queue::new(QUEUE).expect("queue");
    q.set_size(QUEUE);
    let lohi = |x: u64| (Some(x as u32), Some((x >> 32) as u32));
    let (l, h) = lohi(GPA + d);
    q.set_desc_table_address(l, h);
    let (l, h) = lohi(GPA + a);
    q.set_avail_ring_address(l, h);
    let (l, h) = lohi(GPA + u);
    q.set_used_ring_address(l, h);
    q.set_ready(true);
    assert!(q.is_valid(&s.peer_mem), "peer queue invalid");
    let mut out: Vec<(u64, u32)> = Vec::with_capacity(8);
    let mut inn: Vec<(u64, u32)> = Vec::with_capacity(8);
    let mut sum = 0u64;
    let t = Instant::now();
    for _ in 0..rounds {
        q.set_next_avail(0);
        while let Some(chain) = q.pop_descriptor_chain(&s.peer_mem) {
            out.clear();
            inn.clear();
            for desc in chain {
                let (addr, len) = (desc.addr().0, desc.len());
                assert!(len != 0, "zero-length descriptor");
                assert!(GuestMemoryBackend::check_range(&s.peer_mem, desc.addr(), len as usize), "buffer outside guest memory");
                if desc.is_write_only() {
                    inn.push((addr, len));
                } else {
                    assert!(inn.is_empty(), "readable after writable");
                    out.push((addr, len));
                }
            }
            for &(addr, len) in &out {
                sum = sum.wrapping_add(addr ^ len as u64);
            }
            black_box((&out, &inn));
        }
    }
    (t.elapsed().as_secs_f64(), sum)
}

#[test]
fn guest_ring_parse_vs_virtio_queue() {
    let quick = std::env::var("SVQ_BENCH_QUICK").is_ok_and(|v| v == "1");
    // Debug builds (plain `cargo test`) only check that both parsers agree.
    let chains_wanted: usize = if cfg!(debug_assertions) {
        2_000
    } else if quick {
        400_000
    } else {
        4_000_000
    };
    for segments in [1usize, 4] {
        let s = setup(segments);
        let rounds = (chains_wanted / s.chains).max(1);
        // Warm up both, then best of five alternating runs (the machine is noisy).
        svq_parse(&s, rounds / 10 + 1);
        peer_parse(&s, rounds / 10 + 1);
        let (mut best_svq, mut best_peer) = (f64::MAX, f64::MAX);
        let (mut sum_svq, mut sum_peer) = (0, 0);
        for _ in 0..5 {
            let (t, x) = svq_parse(&s, rounds);
            best_svq = best_svq.min(t);
            sum_svq = x;
            let (t, x) = peer_parse(&s, rounds);
            best_peer = best_peer.min(t);
            sum_peer = x;
        }
        let n = (rounds * s.chains) as f64;
        let agree = sum_svq == sum_peer;
        println!(
            "SVQ_BENCH {{\"segments\": {segments}, \"chains\": {}, \"svq_ns\": {:.3}, \"peer_ns\": {:.3}, \"agree\": {agree}}}",
            rounds * s.chains,
            best_svq * 1e9 / n,
            best_peer * 1e9 / n,
        );
        assert!(agree, "svq and virtio-queue parsed different chains");
    }
}
