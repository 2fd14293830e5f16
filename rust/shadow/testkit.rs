//! The surroundings of a shadow queue in tests, built from its parts without a session:
//! the embedded device (behind a fault injector) negotiated and started with its vrings on
//! shadow rings mapped through a [`Dma`], guest memory holding the guest's rings, and the
//! guest's side of each ring (posting chains, kicking, reaping what svq completed).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BounceSpace, Forwarding, QueueStats, RegionIova, ShadowFds, ShadowParts, ShadowQueue};
use crate::bounce::{BouncePool, Strategy};
use crate::device::faulty::FaultInjector;
use crate::device::sim::SimDevice;
use crate::device::Device;
use crate::dma::{Dma, MapRequest};
use crate::eventfd::EventFd;
use crate::fault::{QueueFault, QueueHealth};
use crate::mem::GuestMemory;
use crate::ring::layout::align_up;
use crate::ring::{Buf, RingLayout, RingReader, RingWriter};
use crate::virtio::{backend_feature as bf, feature, status, Perm, PAGE_SIZE};

/// The net device's MAC: frames sent to it loop back to the RX queue.
pub(crate) const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// Guest memory: two regions of [`REGION`] bytes, back to back from here.
pub(crate) const GPA: u64 = 0x4000_0000;
/// Bytes per guest memory region.
pub(crate) const REGION: u64 = 1 << 20;
/// Where the regions are mapped, when they are: far from their guest addresses and apart
/// from each other, so the address the device is given tells which translation it took.
pub(crate) const REGION_IOVAS: [u64; 2] = [0x10_0000, 0x80_0000];
/// What a guest's writable buffer holds until something writes it.
pub(crate) const FILL: u8 = 0xee;
/// How long a wait may take before the test fails (a passing test takes milliseconds).
pub(crate) const PATIENCE: Duration = Duration::from_secs(2);

/// A chain svq completed to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Done {
    pub(crate) head: u16,
    pub(crate) len: u32,
    /// Every writable byte of the chain: what nobody wrote still holds [`FILL`].
    pub(crate) data: Vec<u8>,
}

/// The guest's side of one ring.
struct GuestRing {
    index: u32,
    writer: RingWriter,
    kick: Arc<EventFd>,
    call: Arc<EventFd>,
    health: Arc<QueueHealth>,
    /// The buffers of each chain in flight, by head.
    posted: Vec<Vec<Buf>>,
}

/// The embedded device, its IOVA space and a guest, for shadow queues built from parts.
pub(crate) struct Rig {
    pub(crate) sim: Arc<SimDevice>,
    /// The device every call goes through (failures can be armed on it).
    pub(crate) faults: Arc<FaultInjector>,
    pub(crate) dma: Arc<Dma>,
    pub(crate) mem: Arc<GuestMemory>,
    /// Where guest memory is mapped (empty when it is not).
    pub(crate) regions: Vec<RegionIova>,
    guests: Vec<GuestRing>,
    shadow_rings: Vec<GuestMemory>,
    next_gpa: u64,
}

fn eventfd() -> EventFd {
    EventFd::new().expect("eventfd")
}

impl Rig {
    /// A net device (rx 0, tx 1, control 2); guest memory mapped for it when `map_guest`.
    pub(crate) fn net(map_guest: bool) -> Rig {
        Rig::new(SimDevice::net(MAC, 1500).expect("net device"), map_guest)
    }

    /// A blk device (one queue) over a disk of 64 sectors.
    pub(crate) fn blk(map_guest: bool) -> Rig {
        Rig::new(SimDevice::blk(64).expect("blk device"), map_guest)
    }

    /// `sim` negotiated up to FEATURES_OK; guest memory mapped in ASID 0 when `map_guest`
    /// (translate queues need it, copy queues keep the device away from it).
    pub(crate) fn new(sim: SimDevice, map_guest: bool) -> Rig {
        let sim = Arc::new(sim);
        let faults = Arc::new(FaultInjector::new(sim.clone()));
        let dev: &dyn Device = &*faults;
        dev.set_status(0).unwrap();
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER).unwrap();
        dev.set_backend_features((1 << bf::IOTLB_MSG_V2) | (1 << bf::IOTLB_BATCH) | (1 << bf::IOTLB_ASID)).unwrap();
        dev.set_features((1 << feature::VERSION_1) | (1 << feature::ACCESS_PLATFORM) | (1 << feature::RING_EVENT_IDX)).unwrap();
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK).unwrap();
        let dma = Arc::new(Dma::new(faults.clone()).unwrap());
        let mem = Arc::new(GuestMemory::new(&[(GPA, REGION), (GPA + REGION, REGION)]).unwrap());
        let mut regions = Vec::new();
        if map_guest {
            let reqs: Vec<MapRequest> = (mem.regions().iter().zip(REGION_IOVAS))
                .map(|(r, iova)| MapRequest {
                    size: r.size,
                    host: r.host_addr(),
                    guest: Some(r.gpa),
                    perm: Perm::ReadWrite,
                    at: Some(iova),
                })
                .collect();
            let maps = dma.map(0, &reqs).unwrap();
            regions = maps.iter().map(|m| RegionIova { gpa: m.guest_addr.unwrap(), size: m.size, iova: m.iova }).collect();
        }
        Rig { sim, faults, dma, mem, regions, guests: Vec::new(), shadow_rings: Vec::new(), next_gpa: GPA }
    }

    /// The device, as an engine takes it.
    pub(crate) fn device(&self) -> Arc<dyn Device> {
        self.faults.clone()
    }

    /// Sets DRIVER_OK: the device runs the queues set up so far (and any set up later).
    pub(crate) fn start(&self) {
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.faults.set_status(all).unwrap();
    }

    /// An eventfd bound as the device's config interrupt.
    pub(crate) fn config_call(&self) -> EventFd {
        let e = eventfd();
        self.faults.set_config_call(Some(e.as_fd())).unwrap();
        e
    }

    /// Every guest ring as an engine watches it: index, health, the guest's call.
    pub(crate) fn watched(&self) -> Vec<(u32, Arc<QueueHealth>, Arc<EventFd>)> {
        self.guests.iter().map(|g| (g.index, g.health.clone(), g.call.clone())).collect()
    }

    /// Shadow queue `index`: the guest's ring of `guest_size` entries in guest memory, a
    /// shadow ring of `shadow_size` entries mapped for the device in ASID 0, the device's
    /// vring pointed at it, its eventfds bound and the queue enabled.
    pub(crate) fn queue(&mut self, index: u32, forwarding: Forwarding, guest_size: u16, shadow_size: u16) -> ShadowQueue {
        let layout = RingLayout::new(guest_size).unwrap();
        let (_, _, used_at, total) = layout.packed_offsets();
        let gpa = self.take(total, PAGE_SIZE);
        let ring = self.mem.packed_vring(gpa, layout).unwrap();
        let writer = RingWriter::new(ring, 0, true);
        let shadow = self.shadow_ring(index, shadow_size);
        let fds =
            ShadowFds { guest_kick: Arc::new(eventfd()), guest_call: Arc::new(eventfd()), device_kick: eventfd(), device_call: eventfd() };
        self.faults.set_vring_kick(index, Some(fds.device_kick.as_fd())).unwrap();
        self.faults.set_vring_call(index, Some(fds.device_call.as_fd())).unwrap();
        self.faults.set_vring_enable(index, true).unwrap();
        let health = Arc::new(QueueHealth::default());
        let posted = vec![Vec::new(); guest_size as usize];
        self.guests.push(GuestRing {
            index,
            writer,
            kick: fds.guest_kick.clone(),
            call: fds.guest_call.clone(),
            health: health.clone(),
            posted,
        });
        let bounce = match forwarding {
            Forwarding::Copy(strategy) => Some(BouncePool::new(self.dma.clone(), 0, strategy, 1).unwrap()),
            Forwarding::Translate => None,
        };
        ShadowQueue::new(ShadowParts {
            index,
            forwarding,
            guest: RingReader::new(ring, 0, true, false),
            shadow,
            mem: self.mem.clone(),
            regions: self.regions.clone(),
            fds,
            stats: Arc::new(QueueStats::default()),
            health,
            bounce_space: Some(BounceSpace { dma: self.dma.clone(), asid: 0, strategy: Strategy::Pool }),
            bounce,
            used_gpa: gpa + used_at,
        })
    }

    /// A shadow ring in memory of its own, descriptors and avail ring mapped read-only and
    /// the used ring writable, set as the device's vring `index`.
    fn shadow_ring(&mut self, index: u32, size: u16) -> RingWriter {
        let layout = RingLayout::new(size).unwrap();
        let ro = align_up(layout.desc_bytes() + layout.avail_bytes(), PAGE_SIZE);
        let rw = align_up(layout.used_bytes(), PAGE_SIZE);
        let mem = GuestMemory::new(&[(0, ro + rw)]).unwrap();
        let host = mem.regions()[0].host_addr();
        let req = |host, size, perm| MapRequest { size, host, guest: None, perm, at: None };
        let m = self.dma.map(0, &[req(host, ro, Perm::ReadOnly), req(host + ro, rw, Perm::ReadWrite)]).unwrap();
        self.faults.set_vring_num(index, size).unwrap();
        self.faults.set_vring_base(index, 0).unwrap();
        self.faults.set_vring_addr(index, m[0].iova, m[0].iova + layout.desc_bytes(), m[1].iova).unwrap();
        let ring = mem.vring(layout, 0, layout.desc_bytes(), ro).unwrap();
        self.shadow_rings.push(mem);
        RingWriter::new(ring, 0, true)
    }

    fn guest(&mut self, q: u32) -> &mut GuestRing {
        self.guests.iter_mut().find(|g| g.index == q).expect("no guest ring with that index")
    }

    /// `len` bytes of guest memory aligned to `align`.
    fn take(&mut self, len: u64, align: u64) -> u64 {
        let at = align_up(self.next_gpa, align);
        self.next_gpa = at + len;
        assert!(self.next_gpa <= GPA + 2 * REGION, "the test's guest memory is exhausted");
        at
    }

    /// Makes the next guest buffer start at `gpa` (across the regions' boundary, say).
    pub(crate) fn place_next(&mut self, gpa: u64) {
        self.next_gpa = gpa;
    }

    /// A device-readable guest buffer holding `bytes`.
    pub(crate) fn out_buf(&mut self, bytes: &[u8]) -> Buf {
        let addr = self.take(bytes.len() as u64, 16);
        self.mem.write(addr, bytes).unwrap();
        Buf { addr, len: bytes.len() as u32, write: false }
    }

    /// A device-writable guest buffer of `len` bytes, holding [`FILL`].
    pub(crate) fn in_buf(&mut self, len: u32) -> Buf {
        let addr = self.take(len as u64, 16);
        self.mem.write(addr, &vec![FILL; len as usize]).unwrap();
        Buf { addr, len, write: true }
    }

    /// Posts a chain on guest ring `q`: each `out` part in a buffer of its own, then a
    /// writable buffer of each size in `ins`. Its head.
    pub(crate) fn add(&mut self, q: u32, out: &[&[u8]], ins: &[u32]) -> u16 {
        let mut bufs: Vec<Buf> = out.iter().map(|part| self.out_buf(part)).collect();
        bufs.extend(ins.iter().map(|&len| self.in_buf(len)));
        self.add_bufs(q, &bufs)
    }

    /// Posts a chain of exactly these buffers (any address, any length).
    pub(crate) fn add_bufs(&mut self, q: u32, bufs: &[Buf]) -> u16 {
        let g = self.guest(q);
        let head = g.writer.add(bufs).expect("the guest ring is full");
        g.posted[head as usize] = bufs.to_vec();
        head
    }

    /// Publishes what was posted on `q`, and kicks when svq asks for it.
    pub(crate) fn publish(&mut self, q: u32) {
        let g = self.guest(q);
        if g.writer.publish() {
            g.kick.signal();
        }
    }

    /// The guest buffers of the chain at `head`, while it is in flight.
    pub(crate) fn posted(&mut self, q: u32, head: u16) -> Vec<Buf> {
        self.guest(q).posted[head as usize].clone()
    }

    /// What svq completed on guest ring `q` since the last look.
    pub(crate) fn used(&mut self, q: u32) -> Vec<Done> {
        let mem = self.mem.clone();
        let g = self.guest(q);
        let mut done = Vec::new();
        while let Some((head, len)) = g.writer.pop_used().expect("svq broke the guest's used ring") {
            let mut data = Vec::new();
            for b in std::mem::take(&mut g.posted[head as usize]).iter().filter(|b| b.write) {
                let at = data.len();
                data.resize(at + b.len as usize, 0);
                mem.read(b.addr, &mut data[at..]).unwrap();
            }
            done.push(Done { head, len, data });
        }
        done
    }

    /// Waits on the guest's call until svq completed `n` chains on `q` (an engine serving
    /// it); fails the test if the queue breaks first or nothing comes in time.
    pub(crate) fn wait(&mut self, q: u32, n: usize) -> Vec<Done> {
        let deadline = Instant::now() + PATIENCE;
        let mut got = Vec::new();
        loop {
            got.extend(self.used(q));
            if got.len() >= n {
                return got;
            }
            let g = self.guest(q);
            assert_eq!(g.health.fault(), None, "queue {q} broke");
            // Re-arm, then look again before sleeping: a completion in between is not missed.
            if g.writer.enable_cb() {
                continue;
            }
            let left = deadline.checked_duration_since(Instant::now());
            let left = left.unwrap_or_else(|| panic!("queue {q}: {} of {n} completions in {PATIENCE:?}", got.len()));
            g.call.wait(left);
        }
    }

    /// Waits on the guest's call until queue `q` breaks; its fault.
    pub(crate) fn wait_fault(&mut self, q: u32) -> QueueFault {
        let deadline = Instant::now() + PATIENCE;
        let g = self.guest(q);
        loop {
            if let Some(f) = g.health.fault() {
                return f;
            }
            let left = deadline.checked_duration_since(Instant::now());
            g.call.wait(left.unwrap_or_else(|| panic!("queue {q} did not break in {PATIENCE:?}")));
        }
    }

    /// Why queue `q` broke, if it did.
    pub(crate) fn fault(&mut self, q: u32) -> Option<QueueFault> {
        self.guest(q).health.fault()
    }

    /// Whether svq called the guest on `q` since the last look.
    pub(crate) fn called(&mut self, q: u32) -> bool {
        self.guest(q).call.drain() > 0
    }

    /// Drives shadow queue `sq` with no engine until the guest has `n` completions on it.
    pub(crate) fn complete(&mut self, sq: &mut ShadowQueue, n: usize) -> Vec<Done> {
        let q = sq.index;
        let mut got = Vec::new();
        drive(sq, || {
            got.extend(self.used(q));
            got.len() >= n
        });
        assert!(got.len() >= n, "queue {q}: {} of {n} completions ({:?})", got.len(), self.fault(q));
        got
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Reset first: the device thread (alive while any queue holds the Dma) touches the
        // shadow rings no more once it is reset, and their memory goes with the rig.
        let _ = self.sim.set_status(0);
    }
}

/// Drives `sq` with no engine: forwards, then reaps on each device call until `done` says
/// so or the queue broke; fails the test when nothing comes in time.
pub(crate) fn drive(sq: &mut ShadowQueue, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    sq.forward();
    loop {
        sq.reap();
        if done() || sq.is_broken() {
            return;
        }
        let left = deadline.checked_duration_since(Instant::now());
        sq.fds.device_call.wait(left.unwrap_or_else(|| panic!("queue {}: the device did not complete in {PATIENCE:?}", sq.index)));
    }
}

/// A TX buffer for the net device: a virtio-net header, then a frame of `len` bytes in all
/// to [`MAC`], numbered `seq`.
pub(crate) fn frame(len: usize, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(len, (seq % 251) as u8);
    f
}
