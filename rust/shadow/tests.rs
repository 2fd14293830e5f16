//! One shadow queue built from its parts against the embedded device, driven by calling
//! forward / reap / poll / publish directly (no engine thread).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::testkit::{drive, frame, Rig, FILL, GPA, PATIENCE, REGION};
use super::*;
use crate::bounce::Strategy;
use crate::device::sim::{blk, Misbehaviour, SimDevice};
use crate::device::Device;
use crate::fault::FaultKind;
use crate::ring::layout::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use crate::ring::UsedError;

const REQ_IN: u32 = 0;
const REQ_OUT: u32 = 1;
const REQ_FLUSH: u32 = 4;
const REQ_GET_ID: u32 = 8;

/// A virtio-blk request header.
fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// Bytes that differ from one offset to the next.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
}

fn stat(sq: &ShadowQueue, name: &str) -> u64 {
    sq.stats().snapshot().into_iter().find(|(n, _)| *n == name).map(|(_, v)| v).unwrap()
}

/// The buffers (address, length, writable) of the `nth` chain svq placed on its shadow
/// ring: what the device was given.
fn shadow_chain(sq: &ShadowQueue, nth: u16) -> Vec<(u64, u32, bool)> {
    let ring = sq.shadow.ring();
    let mut i = ring.avail_entry(nth);
    let mut bufs = Vec::new();
    loop {
        let d = ring.desc(i);
        bufs.push((d.addr(), d.len(), d.flags() & VRING_DESC_F_WRITE != 0));
        if d.flags() & VRING_DESC_F_NEXT == 0 || bufs.len() > ring.size() as usize {
            return bufs;
        }
        i = d.next();
    }
}

/// Where the device should be given guest buffers: a piece per region a buffer spans,
/// each at that region's IOVA.
fn at_iovas(regions: &[RegionIova], bufs: &[Buf]) -> Vec<(u64, u32, bool)> {
    let mut out = Vec::new();
    for b in bufs {
        let (mut addr, end) = (b.addr, b.addr + b.len as u64);
        while addr < end {
            let r = regions.iter().find(|r| addr >= r.gpa && addr < r.gpa + r.size).expect("guest buffer outside the regions");
            let n = end.min(r.gpa + r.size) - addr;
            out.push((r.iova + (addr - r.gpa), n as u32, b.write));
            addr += n;
        }
    }
    out
}

fn in_guest_regions(regions: &[RegionIova], iova: u64) -> bool {
    regions.iter().any(|r| iova >= r.iova && iova < r.iova + r.size)
}

/// The blk device's queue shadowed with `forwarding` (guest memory mapped for the device
/// only to translate), the device started.
fn blk_queue(forwarding: Forwarding, guest_size: u16, shadow_size: u16) -> (Rig, ShadowQueue) {
    let mut rig = Rig::blk(forwarding == Forwarding::Translate);
    let sq = rig.queue(0, forwarding, guest_size, shadow_size);
    rig.start();
    (rig, sq)
}

#[test]
fn translate_forwards_multi_segment_chains_at_their_iovas() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Translate, 16, 16);
    // Two sectors written from three guest buffers, then read back into buffers of other
    // sizes, one of them across the boundary of the two guest memory regions.
    let data = pattern(1024, 3);
    let write = rig.add(0, &[&blk_header(REQ_OUT, 2), &data[..300], &data[300..800], &data[800..]], &[1]);
    let write_bufs = rig.posted(0, write);
    let mut read_bufs = vec![rig.out_buf(&blk_header(REQ_IN, 2)), rig.in_buf(100)];
    rig.place_next(GPA + REGION - 200);
    read_bufs.extend([rig.in_buf(700), rig.in_buf(224), rig.in_buf(1)]);
    let read = rig.add_bufs(0, &read_bufs);
    rig.publish(0);
    let done = rig.complete(&mut sq, 2);
    assert_eq!(done.iter().map(|d| d.head).collect::<Vec<_>>(), [write, read]);
    assert_eq!((done[0].len, &done[0].data[..]), (1, &[0][..]), "the write's status");
    assert_eq!(done[1].len, 1025, "the data and the status");
    assert_eq!(&done[1].data[..1024], &data[..]);
    assert_eq!(done[1].data[1024], 0);
    // The device was given IOVAs only: each guest buffer at its region's IOVA, the one
    // across the boundary in two pieces.
    assert_eq!(shadow_chain(&sq, 0), at_iovas(&rig.regions, &write_bufs));
    let read_chain = shadow_chain(&sq, 1);
    assert_eq!(read_chain.len(), read_bufs.len() + 1);
    assert_eq!(read_chain, at_iovas(&rig.regions, &read_bufs));
    assert!(rig.sim.faults().is_empty(), "{:?}", rig.sim.faults());
    assert_eq!(rig.sim.stats().blk_requests, 2);
    assert_eq!((stat(&sq, "elements"), stat(&sq, "completed"), stat(&sq, "bytes_in")), (2, 2, 1026));
}

#[test]
fn copy_mode_keeps_guest_memory_from_the_device_and_copies_back_the_used_length() {
    let mut rig = Rig::net(false);
    let mut rx = rig.queue(0, Forwarding::Copy(Strategy::Pool), 16, 16);
    let mut tx = rig.queue(1, Forwarding::Copy(Strategy::Pool), 16, 16);
    rig.start();
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(100 + 300 * i, i as u32)).collect();
    for _ in &frames {
        rig.add(0, &[], &[1000, 1048]);
    }
    rig.publish(0);
    rx.forward();
    for f in &frames {
        rig.add(1, &[&f[..12], &f[12..40], &f[40..]], &[]);
    }
    rig.publish(1);
    assert!(rig.complete(&mut tx, 4).iter().all(|d| d.len == 0));
    let got = rig.complete(&mut rx, 4);
    for (d, f) in got.iter().zip(&frames) {
        assert_eq!(d.len as usize, f.len());
        assert_eq!(&d.data[..f.len()], &f[..]);
        assert!(d.data[f.len()..].iter().all(|&b| b == FILL), "bytes past the used length are not copied back");
    }
    // Guest memory is not in the device's IOTLB, and every buffer the device was given
    // (one per direction) lies in memory of svq's own.
    let maps = rig.dma.mappings();
    assert!(maps.iter().all(|(_, m)| m.guest_addr.is_none()));
    assert_eq!(rig.sim.live_mappings(), Some(maps.len()));
    let guest_host: Vec<(u64, u64)> = rig.mem.regions().iter().map(|r| (r.host_addr(), r.host_addr() + r.size)).collect();
    for (sq, write) in [(&rx, true), (&tx, false)] {
        for (k, f) in frames.iter().enumerate() {
            let chain = shadow_chain(sq, k as u16);
            let want_len = if write { 2048 } else { f.len() as u32 };
            assert_eq!((chain.len(), chain[0].1, chain[0].2), (1, want_len, write));
            let (_, m) = maps.iter().find(|(_, m)| m.contains(chain[0].0)).expect("the device was given an unmapped address");
            assert!(m.contains(chain[0].0 + want_len as u64 - 1));
            assert!(guest_host.iter().all(|&(lo, hi)| m.host_addr + m.size <= lo || m.host_addr >= hi), "a bounce buffer in guest memory");
        }
    }
    assert!(rig.sim.faults().is_empty(), "{:?}", rig.sim.faults());
    assert_eq!(rig.sim.stats().rx_packets, 4);
}

#[test]
fn a_chain_longer_than_the_shadow_ring_breaks_the_queue() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Translate, 16, 4);
    let data = pattern(1024, 1);
    rig.add(0, &[&blk_header(REQ_OUT, 0), &data[..256], &data[256..512], &data[512..768], &data[768..]], &[1]);
    rig.publish(0);
    sq.forward();
    let f = rig.fault(0).expect("the queue broke");
    assert_eq!((f.queue, f.rule(), f.kind()), (0, "too_many_descriptors", FaultKind::TooLarge));
    assert!(matches!(f.fault, Fault::TooManyDescriptors { needed: 6, size: 4, .. }), "{f:?}");
    assert!(sq.is_broken());
    assert!(rig.called(0), "the guest is woken to see the fault");
    // A broken queue forwards nothing more, and nothing reached the device.
    rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1]);
    rig.publish(0);
    sq.forward();
    assert!(!sq.poll());
    assert_eq!((stat(&sq, "elements"), stat(&sq, "errors")), (0, 1));
    assert_eq!(rig.sim.stats().blk_requests, 0);
}

#[test]
fn an_element_beyond_what_svq_copies_breaks_a_copy_queue() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Copy(Strategy::PerElement), 64, 4);
    // A guest reaches more bytes than svq copies by pointing many descriptors at the same
    // memory (here all of it, both regions).
    let all = Buf { addr: GPA, len: (2 * REGION) as u32, write: false };
    let n = (MAX_COPY_BYTES / (2 * REGION)) as usize + 1;
    rig.add_bufs(0, &vec![all; n]);
    rig.publish(0);
    let mapped = rig.dma.live();
    sq.forward();
    let f = rig.fault(0).expect("the queue broke");
    assert_eq!((f.rule(), f.kind()), ("too_many_bytes", FaultKind::TooLarge));
    let want = n as u64 * 2 * REGION;
    assert!(matches!(f.fault, Fault::TooManyBytes { out, inn: 0, max: MAX_COPY_BYTES, .. } if out == want), "{f:?}");
    assert_eq!(rig.dma.live(), mapped, "no bounce buffer was taken");
}

#[test]
fn a_guest_buffer_outside_guest_memory_breaks_the_queue() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Translate, 16, 16);
    rig.add_bufs(0, &[Buf { addr: GPA + 2 * REGION - 8, len: 16, write: false }]);
    rig.publish(0);
    sq.forward();
    let f = rig.fault(0).expect("the queue broke");
    assert_eq!((f.rule(), f.kind()), ("buffer_outside_memory", FaultKind::Guest));
    assert_eq!(stat(&sq, "elements"), 0);
}

#[test]
fn a_used_length_beyond_the_writable_size_breaks_the_queue() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Translate, 16, 16);
    rig.sim.misbehave(0, Some(Misbehaviour::LenTooLarge)).unwrap();
    let head = rig.add(0, &[&blk_header(REQ_IN, 0)], &[512, 1]);
    rig.publish(0);
    drive(&mut sq, || false);
    let f = rig.fault(0).expect("the queue broke");
    assert_eq!((f.rule(), f.kind()), ("used_len_exceeds_writable", FaultKind::DeviceProtocol));
    assert_eq!(f.fault, Fault::Used(UsedError::LenTooLarge { id: 0, len: 0x10_0000, writable: 513 }));
    assert!(rig.called(0));
    assert!(rig.used(0).is_empty(), "the guest never sees the device's length");
    // The chain is still svq's: stopping returns it.
    assert_eq!(sq.stop(StopReason::Closed, false).unwrap(), 1);
    assert_eq!(rig.used(0).iter().map(|d| (d.head, d.len)).collect::<Vec<_>>(), [(head, 0)]);
}

#[test]
fn stop_returns_the_chains_in_flight_with_length_zero_unless_handed_over() {
    for why in [StopReason::Closed, StopReason::Stopped, StopReason::HandedOver] {
        let (mut rig, mut sq) = blk_queue(Forwarding::Translate, 16, 16);
        // A suspended device takes nothing: everything forwarded stays in flight.
        rig.faults.suspend().unwrap();
        let mut heads: Vec<u16> = (0..3).map(|_| rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1])).collect();
        rig.publish(0);
        let slot = Arc::new(InjectSlot::default());
        sq.inject(blk_header(REQ_GET_ID, 0), 21, slot.clone());
        sq.forward();
        assert_eq!(stat(&sq, "elements"), 4);
        let mut in_flight = sq.guest_in_flight();
        in_flight.sort_unstable();
        heads.sort_unstable();
        assert_eq!(in_flight, heads);
        let mapped = rig.dma.live();
        // Reset first: the device provably reaches nothing any more.
        rig.faults.set_status(0).unwrap();
        let returned = sq.stop(why, true).unwrap();
        let mut back: Vec<(u16, u32, Vec<u8>)> = rig.used(0).into_iter().map(|d| (d.head, d.len, d.data)).collect();
        back.sort_unstable();
        if why == StopReason::HandedOver {
            assert_eq!(returned, 1, "{why:?}: only svq's own element");
            assert!(back.is_empty(), "{why:?}: the next owner completes the guest's chains");
            assert_eq!(sq.guest_position(), (3, 0), "{why:?}: they stay in flight on the guest ring");
        } else {
            assert_eq!(returned, 4, "{why:?}");
            assert_eq!(back, heads.iter().map(|&h| (h, 0, vec![FILL])).collect::<Vec<_>>(), "{why:?}");
        }
        let failed = if why == StopReason::Closed { InjectError::Closed } else { InjectError::Stopped { queue: 0 } };
        assert_eq!(slot.wait_until(Instant::now()), Some(Err(failed)), "{why:?}");
        assert_eq!(rig.dma.live(), mapped - 1, "{why:?}: the bounce pool made for the injection is unmapped");
        assert_eq!(stat(&sq, "returned_on_stop"), returned as u64);
    }
}

#[test]
fn a_hand_over_gives_back_the_chains_the_device_did_not_take() {
    // Requests take long: the device holds what it took.
    let sim = SimDevice::blk_on(blk::Disk::new(64), Duration::from_secs(30)).unwrap();
    let mut rig = Rig::new(sim, true);
    let mut sq = rig.queue(0, Forwarding::Translate, 16, 16);
    rig.start();
    let mut taken: Vec<u16> = (0..2).map(|_| rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1])).collect();
    rig.publish(0);
    sq.forward();
    // Nothing signals that the device took a request: look at its position.
    let deadline = Instant::now() + PATIENCE;
    while rig.faults.vring_base(0).unwrap() != 2 {
        assert!(Instant::now() < deadline, "the device did not take the requests");
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.faults.suspend().unwrap();
    for _ in 0..2 {
        rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1]);
    }
    rig.publish(0);
    sq.forward();
    assert_eq!(sq.guest_position(), (4, 0));
    let device_avail = rig.faults.vring_base(0).unwrap();
    assert_eq!(sq.rewind_untaken(device_avail), Rewound { chains: 2, returned: 0 });
    assert_eq!(sq.guest_position(), (2, 0), "the next owner pops the two untaken chains again");
    assert_eq!(sq.guest.pending(), Ok(2));
    let mut in_flight = sq.guest_in_flight();
    in_flight.sort_unstable();
    taken.sort_unstable();
    assert_eq!(in_flight, taken, "what the device took stays in flight");
    rig.faults.set_status(0).unwrap();
    assert_eq!(sq.stop(StopReason::HandedOver, true).unwrap(), 0);
    assert!(rig.used(0).is_empty());
}

#[test]
fn injected_elements_complete_through_their_slots() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Translate, 16, 16);
    // svq's own request beside a guest chain: each completes where it belongs.
    let slot = Arc::new(InjectSlot::default());
    sq.inject(blk_header(REQ_GET_ID, 0), 21, slot.clone());
    let guest = rig.add(0, &[&blk_header(REQ_GET_ID, 0)], &[21]);
    rig.publish(0);
    drive(&mut sq, || slot.is_done());
    let (len, written) = slot.wait_until(Instant::now()).unwrap().unwrap();
    assert_eq!((len as usize, &written[..20], written[20]), (21, &blk::BLK_ID[..], 0));
    let done = rig.complete(&mut sq, 1);
    assert_eq!(done.len(), 1, "the guest gets its own chain only");
    assert_eq!((done[0].head, done[0].len, &done[0].data[..20]), (guest, 21, &blk::BLK_ID[..]));
    // The injected element went first, in bounce buffers; the guest's at its IOVAs.
    let own = shadow_chain(&sq, 0);
    assert_eq!(own.iter().map(|b| (b.1, b.2)).collect::<Vec<_>>(), [(16, false), (21, true)]);
    assert!(own.iter().all(|b| !in_guest_regions(&rig.regions, b.0)));
    assert!(shadow_chain(&sq, 1).iter().all(|b| in_guest_regions(&rig.regions, b.0)));
    assert_eq!(stat(&sq, "injected"), 1);

    let empty = Arc::new(InjectSlot::default());
    sq.inject(Vec::new(), 0, empty.clone());
    assert!(matches!(empty.wait_until(Instant::now()), Some(Err(InjectError::Invalid(_)))));
    // An injector waiting when the queue breaks learns it at once, and so does a later one.
    rig.faults.suspend().unwrap();
    let waiting = Arc::new(InjectSlot::default());
    sq.inject(blk_header(REQ_FLUSH, 0), 1, waiting.clone());
    sq.forward();
    assert!(!waiting.is_done());
    sq.fail(Fault::DeviceNeedsReset);
    let broken = InjectError::Broken(QueueFault { queue: 0, fault: Fault::DeviceNeedsReset });
    assert_eq!(waiting.wait_until(Instant::now()), Some(Err(broken.clone())));
    let late = Arc::new(InjectSlot::default());
    sq.inject(blk_header(REQ_FLUSH, 0), 1, late.clone());
    assert_eq!(late.wait_until(Instant::now()), Some(Err(broken)));
}

/// What a hook saw.
#[derive(Debug, Default)]
struct Seen {
    avail: Vec<(Vec<u8>, u32)>,
    used: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Answers GET_ID itself, refuses FLUSH, forwards the rest, and records what it sees.
struct Policy(Arc<Mutex<Seen>>);

const ANSWER: &[u8] = b"answered by a hook";

impl QueueHook for Policy {
    fn avail(&mut self, out: &[u8], in_len: u32) -> Verdict {
        self.0.lock().unwrap().avail.push((out.to_vec(), in_len));
        match u32::from_le_bytes(out[..4].try_into().unwrap()) {
            REQ_GET_ID => Verdict::Answer(ANSWER.to_vec()),
            REQ_FLUSH => Verdict::Refuse,
            _ => Verdict::Forward,
        }
    }

    fn used(&mut self, out: &[u8], written: &[u8]) {
        self.0.lock().unwrap().used.push((out.to_vec(), written.to_vec()));
    }
}

#[test]
fn hooks_answer_refuse_and_see_the_completions_of_what_they_forward() {
    for forwarding in [Forwarding::Translate, Forwarding::Copy(Strategy::Pool)] {
        let (mut rig, mut sq) = blk_queue(forwarding, 16, 16);
        let seen = Arc::new(Mutex::new(Seen::default()));
        sq.add_hook(Box::new(Policy(seen.clone())));
        let data = pattern(512, 9);
        let write_header = blk_header(REQ_OUT, 1);
        let write = rig.add(0, &[&write_header, &data], &[1]);
        let id = rig.add(0, &[&blk_header(REQ_GET_ID, 0)], &[8, 16]);
        let flush = rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1]);
        let read = rig.add(0, &[&blk_header(REQ_IN, 1)], &[512, 1]);
        rig.publish(0);
        let done = rig.complete(&mut sq, 4);
        let get = |h: u16| done.iter().find(|d| d.head == h).unwrap();
        assert_eq!((get(write).len, &get(write).data[..]), (1, &[0][..]), "{forwarding:?}");
        assert_eq!((get(id).len as usize, &get(id).data[..ANSWER.len()]), (ANSWER.len(), ANSWER), "{forwarding:?}");
        assert!(get(id).data[ANSWER.len()..].iter().all(|&b| b == FILL));
        assert_eq!((get(flush).len, &get(flush).data[..]), (0, &[FILL][..]), "{forwarding:?}");
        assert_eq!((get(read).len, &get(read).data[..512], get(read).data[512]), (513, &data[..], 0), "{forwarding:?}");
        // Only what the hook forwarded reached the device.
        assert_eq!(rig.sim.stats().blk_requests, 2, "{forwarding:?}");
        let counts = (stat(&sq, "elements"), stat(&sq, "answered"), stat(&sq, "refused"), stat(&sq, "completed"));
        assert_eq!(counts, (2, 1, 1, 4), "{forwarding:?}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.avail.iter().map(|a| a.1).collect::<Vec<_>>(), [1, 24, 1, 513]);
        assert_eq!(seen.avail[1].0, blk_header(REQ_GET_ID, 0));
        // A completion shows the element's readable bytes and exactly what the device wrote.
        let write_out = [&write_header[..], &data[..]].concat();
        let read_in = [&data[..], &[0]].concat();
        assert_eq!(seen.used, [(write_out, vec![0]), (blk_header(REQ_IN, 1), read_in)], "{forwarding:?}");
    }
}

#[test]
fn a_full_shadow_ring_holds_the_next_chain_until_completions_make_room() {
    for forwarding in [Forwarding::Translate, Forwarding::Copy(Strategy::Pool)] {
        let (mut rig, mut sq) = blk_queue(forwarding, 16, 4);
        rig.faults.suspend().unwrap();
        let mut heads: Vec<u16> = (0..5).map(|_| rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1])).collect();
        rig.publish(0);
        sq.forward();
        // Two requests of two descriptors fill the ring of four; the third waits.
        assert_eq!((stat(&sq, "elements"), stat(&sq, "held"), sq.shadow.num_free()), (2, 1, 0), "{forwarding:?}");
        rig.faults.resume().unwrap();
        let mut done: Vec<(u16, u32)> = rig.complete(&mut sq, 5).into_iter().map(|d| (d.head, d.len)).collect();
        done.sort_unstable();
        heads.sort_unstable();
        assert_eq!(done, heads.iter().map(|&h| (h, 1)).collect::<Vec<_>>(), "{forwarding:?}");
        assert_eq!(stat(&sq, "elements"), 5);
    }
}

#[test]
fn polling_forwards_at_publish_and_reaps_without_a_call() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Translate, 16, 16);
    assert!(!sq.poll(), "nothing to do");
    let mut heads: Vec<u16> = (0..2).map(|_| rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1])).collect();
    rig.publish(0);
    assert!(sq.poll(), "the guest's chains were taken");
    // Forwarded, but not visible to the device until published.
    assert_eq!((sq.shadow.ring().avail_idx(), stat(&sq, "device_kicks")), (0, 0));
    sq.publish();
    assert_eq!((sq.shadow.ring().avail_idx(), stat(&sq, "device_kicks")), (2, 1));
    let deadline = Instant::now() + PATIENCE;
    let mut done = Vec::new();
    while done.len() < 2 {
        sq.poll();
        done.extend(rig.used(0).into_iter().map(|d| (d.head, d.len)));
        // Before sleeping, calls are re-armed and the ring looked at once more.
        if done.len() < 2 && !sq.rearm() {
            let left = deadline.checked_duration_since(Instant::now()).expect("the device did not complete in time");
            sq.fds.device_call.wait(left);
        }
    }
    done.sort_unstable();
    heads.sort_unstable();
    assert_eq!(done, heads.iter().map(|&h| (h, 1)).collect::<Vec<_>>());
    assert!(!sq.poll(), "nothing left");
}

#[test]
fn a_bounce_buffer_that_cannot_be_mapped_completes_the_chain_unsent() {
    let (mut rig, mut sq) = blk_queue(Forwarding::Copy(Strategy::PerElement), 16, 16);
    let mapped = rig.dma.live();
    // The writable buffer's map fails after the readable one was mapped.
    rig.faults.fail_map_at(2);
    let failed = rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1]);
    let next = rig.add(0, &[&blk_header(REQ_FLUSH, 0)], &[1]);
    rig.publish(0);
    let done = rig.complete(&mut sq, 2);
    let got: Vec<(u16, u32, Vec<u8>)> = done.into_iter().map(|d| (d.head, d.len, d.data)).collect();
    assert_eq!(got, [(failed, 0, vec![FILL]), (next, 1, vec![0])]);
    assert!(!sq.is_broken());
    assert_eq!((stat(&sq, "map_failures"), rig.sim.stats().blk_requests), (1, 1));
    assert_eq!(rig.dma.live(), mapped, "the readable buffer mapped before the failure was given back");
}
