//! The embedded device: a userspace virtio-net / virtio-blk device that answers the same
//! vhost-vdpa operations as the kernel's `vdpa_sim_net` / `vdpa_sim_blk`, runs in its own
//! thread, is kicked and calls through eventfds, and reaches memory ONLY through its own
//! IOTLB. A refused access is recorded and puts the device into NEEDS_RESET, as a real
//! device fails; it never succeeds silently.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{Device, DeviceError, DeviceResult, IotlbOp};
use crate::eventfd::EventFd;
use crate::live::ThreadToken;
use crate::ring::layout::RingLayout;
use crate::ring::{Chain, RingReader, Vring};
use crate::virtio::feature;
use crate::virtio::{backend_feature as bf, status};

pub mod blk;
pub mod echo;
mod net;
pub mod view;

use super::iotlb::AddressSpace;
use view::DeviceView;

/// Queue size the embedded device offers (as the kernel simulator).
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Backend features offered: MSG_V2, BATCH, ASID, SUSPEND, RESUME, ENABLE_AFTER_DRIVER_OK,
/// IOTLB_PERSIST (0x17e, what the kernel simulator offers).
pub const BACKEND_FEATURES: u64 = (1 << bf::IOTLB_MSG_V2)
    | (1 << bf::IOTLB_BATCH)
    | (1 << bf::IOTLB_ASID)
    | (1 << bf::SUSPEND)
    | (1 << bf::RESUME)
    | (1 << bf::ENABLE_AFTER_DRIVER_OK)
    | (1 << bf::IOTLB_PERSIST);

const COMMON_FEATURES: u64 =
    (1 << feature::VERSION_1) | (1 << feature::ACCESS_PLATFORM) | (1 << feature::RING_EVENT_IDX) | (1 << feature::RING_INDIRECT_DESC);

/// Which device the model is.
#[derive(Debug, Clone)]
pub enum SimKind {
    /// virtio-net with TX→RX loopback (or an echo responder) and a control queue.
    Net {
        /// MAC address in config space.
        mac: [u8; 6],
        /// MTU in config space.
        mtu: u16,
        /// Play a peer host answering ARP and ICMP echo instead of looping TX back.
        echo: Option<echo::Echo>,
        /// Queue pairs (max_virtqueue_pairs): RX k is queue 2k, TX k queue 2k + 1, the
        /// control queue 2 * pairs.
        pairs: u16,
    },
    /// virtio-blk over a RAM disk.
    Blk {
        /// Capacity in 512-byte sectors.
        capacity: u64,
        /// How long a request takes (zero: done as it is taken). Requests then complete
        /// out of order, as real disks do, and a suspended device holds the ones in
        /// flight.
        latency: std::time::Duration,
    },
}

/// Ways the embedded device can break the virtio protocol on purpose, to test that svq
/// survives a buggy or hostile device. Each applies to every completion on its queue
/// until cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Used entries name an id outside the queue.
    UsedIdOutOfRange,
    /// Used entries name the next id instead of the completed one.
    UsedIdNotInFlight,
    /// Every completion is written twice.
    DuplicateCompletion,
    /// The used index jumps by more than the queue size.
    UsedIdxJump,
    /// The used index goes backwards.
    UsedIdxBackwards,
    /// Used lengths larger than any buffer.
    LenTooLarge,
    /// Completions never come (the device keeps the buffers).
    NeverComplete,
    /// The device enters NEEDS_RESET instead of completing.
    NeedsReset,
}

/// Per-queue state, as set through the vring ioctls.
#[derive(Debug, Default)]
struct SimQueue {
    num: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    enabled: bool,
    kick: Option<Arc<EventFd>>,
    call: Option<EventFd>,
    /// Created when the device starts (DRIVER_OK) on an enabled queue.
    reader: Option<RingReader>,
    /// The ring as last translated, valid while the IOTLB generation and the ring's
    /// address space, size and addresses are the ones it was translated with.
    ring_cache: Option<RingCache>,
    /// Deliberate protocol violations (tests).
    misbehaviour: Option<Misbehaviour>,
}

/// A translated ring and what its translation depended on.
#[derive(Debug, Clone, Copy)]
struct RingCache {
    generation: u64,
    asid: u32,
    num: u16,
    addrs: (u64, u64, u64),
    ring: Vring,
}

/// Counters of what the device did (readable for tests and `svq info`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    /// Frames taken from TX.
    pub tx_packets: u64,
    /// Frames delivered to RX.
    pub rx_packets: u64,
    /// Frames dropped by the RX filter.
    pub rx_drops: u64,
    /// Frames dropped for lack of an RX buffer.
    pub rx_overruns: u64,
    /// Control commands processed.
    pub ctrl_commands: u64,
    /// Block requests processed.
    pub blk_requests: u64,
}

/// The device's mutable state.
#[derive(Debug)]
pub(crate) struct SimState {
    kind: SimKind,
    features: u64,
    backend_features: u64,
    status: u8,
    suspended: bool,
    queues: Vec<SimQueue>,
    group_asid: Vec<u32>,
    spaces: Vec<AddressSpace>,
    /// Bumped on every change of any address space: a ring translated under another
    /// generation is translated again before the device touches it.
    iotlb_generation: u64,
    config_call: Option<EventFd>,
    faults: Vec<String>,
    stats: SimStats,
    /// The blk device's disk (None for net).
    disk: Option<blk::Disk>,
    /// Blk requests taken and not completed yet (with a latency).
    pending: Vec<blk::Pending>,
    /// virtio-net control-plane state, as the control queue set it.
    net: crate::net::NetState,
    scratch: Vec<u8>,
    chain: Chain,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<SimState>,
    wake: EventFd,
    stop: AtomicBool,
}

/// The embedded device. Dropping it stops its thread.
#[derive(Debug)]
pub struct SimDevice {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SimDevice {
    /// A virtio-net device (rx 0, tx 1, control 2; the control queue alone in group 1).
    pub fn net(mac: [u8; 6], mtu: u16) -> DeviceResult<Self> {
        Self::start_net(SimKind::Net { mac, mtu, echo: None, pairs: 1 })
    }

    /// A virtio-net device whose far end is a peer host at `echo.ip` answering ARP and
    /// ICMP echo (instead of the TX→RX loopback).
    pub fn net_echo(mac: [u8; 6], mtu: u16, echo: echo::Echo) -> DeviceResult<Self> {
        Self::start_net(SimKind::Net { mac, mtu, echo: Some(echo), pairs: 1 })
    }

    /// A virtio-net device with `pairs` queue pairs (1..=8, offered with MQ): rx0 tx0
    /// rx1 tx1 ... and the control queue last, alone in group 1. A frame sent on TX k
    /// comes back on RX k (or its echo answer does).
    pub fn net_multiqueue(mac: [u8; 6], mtu: u16, echo: Option<echo::Echo>, pairs: u16) -> DeviceResult<Self> {
        if !(1..=net::MAX_PAIRS).contains(&pairs) {
            return Err(einval(format!("{pairs} queue pairs: the embedded device has 1..={}", net::MAX_PAIRS)));
        }
        Self::start_net(SimKind::Net { mac, mtu, echo, pairs })
    }

    /// A virtio-blk device over a RAM disk of `capacity` sectors.
    pub fn blk(capacity: u64) -> DeviceResult<Self> {
        Self::blk_on(blk::Disk::new(capacity), std::time::Duration::ZERO)
    }

    /// A virtio-blk device over `disk` (which other devices may share, as hosts share a
    /// storage network), whose requests take `latency` and complete out of order.
    pub fn blk_on(disk: blk::Disk, latency: std::time::Duration) -> DeviceResult<Self> {
        let capacity = disk.sectors();
        Self::start(SimKind::Blk { capacity, latency }, Some(disk))
    }

    fn start_net(kind: SimKind) -> DeviceResult<Self> {
        Self::start(kind, None)
    }

    fn start(kind: SimKind, disk: Option<blk::Disk>) -> DeviceResult<Self> {
        let (nq, ngroups, nas) = match kind {
            SimKind::Net { pairs, .. } => (2 * usize::from(pairs) + 1, 2, 2),
            SimKind::Blk { .. } => (1, 1, 1),
        };
        let wake = EventFd::new().map_err(|e| DeviceError::os("eventfd", e))?;
        let state = SimState {
            kind,
            features: 0,
            backend_features: 0,
            status: 0,
            suspended: false,
            queues: (0..nq).map(|_| SimQueue::default()).collect(),
            group_asid: vec![0; ngroups],
            spaces: (0..nas).map(|_| AddressSpace::default()).collect(),
            iotlb_generation: 0,
            config_call: None,
            faults: Vec::new(),
            stats: SimStats::default(),
            disk,
            pending: Vec::new(),
            net: crate::net::NetState::default(),
            scratch: Vec::with_capacity(65536),
            chain: Chain::default(),
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), wake, stop: AtomicBool::new(false) });
        let worker = shared.clone();
        let token = ThreadToken::new();
        let thread = std::thread::Builder::new()
            .name("svq-sim-device".into())
            .spawn(move || {
                let _token = token;
                run(&worker)
            })
            .map_err(|e| DeviceError::os("spawn device thread", Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN))))?;
        Ok(SimDevice { shared, thread: Some(thread) })
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        // A panic in the device thread would poison the lock; the state is still
        // consistent enough to report and reset, so take it anyway.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accesses the device refused since the last reset, in order.
    pub fn faults(&self) -> Vec<String> {
        self.state().faults.clone()
    }

    /// What the device has done.
    pub fn stats(&self) -> SimStats {
        self.state().stats
    }

    /// Makes the device break the protocol on `queue` (None: behave again).
    pub fn misbehave(&self, queue: u32, how: Option<Misbehaviour>) -> DeviceResult<()> {
        self.with_queue(queue, |q| q.misbehaviour = how)
    }

    fn with_queue<T>(&self, q: u32, f: impl FnOnce(&mut SimQueue) -> T) -> DeviceResult<T> {
        let mut st = self.state();
        let n = st.queues.len();
        let queue = st.queues.get_mut(q as usize).ok_or_else(|| DeviceError::os(format!("queue {q} of {n}"), Errno::ENOBUFS))?;
        Ok(f(queue))
    }

    fn poke(&self) {
        self.shared.wake.signal();
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SimState {
    fn offered_features(&self) -> u64 {
        COMMON_FEATURES
            | match self.kind {
                SimKind::Net { .. } => net::FEATURES,
                SimKind::Blk { .. } => blk::FEATURES,
            }
    }

    fn config_bytes(&self) -> Vec<u8> {
        match &self.kind {
            SimKind::Net { mac, mtu, pairs, .. } => net::config(mac, *mtu, *pairs),
            SimKind::Blk { capacity, .. } => blk::config(*capacity),
        }
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    /// Records a refused access and enters NEEDS_RESET (with a config interrupt).
    fn fault(&mut self, queue: usize, what: String) {
        self.faults.push(format!("queue {queue}: {what}"));
        self.status |= status::NEEDS_RESET;
        if let Some(c) = &self.config_call {
            c.signal();
        }
    }

    fn reset(&mut self) {
        self.features = 0;
        self.status = 0;
        self.suspended = false;
        for q in &mut self.queues {
            *q = SimQueue { kick: q.kick.take(), call: q.call.take(), misbehaviour: q.misbehaviour, ..SimQueue::default() };
        }
        self.group_asid.iter_mut().for_each(|a| *a = 0);
        if self.backend_features & (1 << bf::IOTLB_PERSIST) == 0 {
            self.spaces.iter_mut().for_each(|s| *s = AddressSpace::default());
        }
        self.iotlb_generation += 1;
        self.faults.clear();
        // Requests the device held are dropped, never applied (a reset device forgets them).
        self.pending.clear();
        // The MAC lives in config space and survives reset (as in vdpa_sim_net).
        self.net = crate::net::NetState::default();
    }

    fn queue_asid(&self, q: usize) -> u32 {
        let group = match self.kind {
            SimKind::Net { pairs, .. } if q == net::ctrl_queue(pairs) => 1,
            _ => 0,
        };
        self.group_asid[group]
    }

    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::NEEDS_RESET == 0 && !self.suspended
    }

    /// Translates queue `q`'s ring and hands the reader to `f`; a ring the IOTLB refuses is
    /// a fault.
    fn with_ring<T>(
        &mut self,
        q: usize,
        f: impl FnOnce(&mut RingReader, DeviceView<'_>, &mut Chain, &mut Vec<u8>, &mut SimStats) -> Result<T, String>,
    ) -> Option<T> {
        if !self.running() {
            // A device in NEEDS_RESET touches nothing more until it is reset.
            return None;
        }
        let asid = self.queue_asid(q);
        let event_idx = self.has(feature::RING_EVENT_IDX);
        let indirect = self.has(feature::RING_INDIRECT_DESC);
        let generation = self.iotlb_generation;
        let SimState { queues, spaces, chain, scratch, stats, .. } = self;
        let queue = &mut queues[q];
        if !queue.enabled || queue.num == 0 {
            return None;
        }
        let view = DeviceView { space: &spaces[asid as usize], asid };
        let layout = RingLayout::new(queue.num)?;
        let addrs = (queue.desc, queue.avail, queue.used);
        // The IOTLB is what it was when the ring was last translated: the translation
        // would give the same host pointers (and the same refusal is impossible, since
        // only successes are kept).
        let cached = queue
            .ring_cache
            .filter(|c| c.generation == generation && c.asid == asid && c.num == queue.num && c.addrs == addrs)
            .map(|c| c.ring);
        let translated = match cached {
            Some(ring) => Ok(ring),
            None => view.ring(layout, addrs.0, addrs.1, addrs.2).inspect(|&ring| {
                queue.ring_cache = Some(RingCache { generation, asid, num: queue.num, addrs, ring });
            }),
        };
        let res = translated.map_err(|e| format!("ring: {e}")).and_then(|ring| {
            let reader = queue.reader.get_or_insert_with(|| RingReader::new(ring, queue.base, event_idx, indirect));
            reader.set_ring(ring);
            f(reader, view, chain, scratch, stats)
        });
        match res {
            Ok(v) => Some(v),
            Err(what) => {
                self.fault(q, what);
                None
            }
        }
    }

    /// Publishes queue `q`'s used entries and calls the driver when it wants it (after
    /// breaking the protocol first, when told to).
    fn complete(&mut self, q: usize) {
        let misbehaviour = self.queues[q].misbehaviour;
        if misbehaviour == Some(Misbehaviour::NeedsReset) {
            if let Some(r) = self.queues[q].reader.as_mut() {
                r.discard_unpublished();
            }
            return self.fault(q, "told to misbehave: NEEDS_RESET".into());
        }
        let queue = &mut self.queues[q];
        let Some(r) = queue.reader.as_mut() else { return };
        let size = r.ring().size();
        let last = r.used_idx().wrapping_sub(1);
        let (id, len) = r.ring().used_entry(last);
        match misbehaviour {
            _ if r.unpublished() == 0 => {}
            Some(Misbehaviour::UsedIdOutOfRange) => r.ring().set_used_entry(last, size as u32 + 7, len),
            Some(Misbehaviour::UsedIdNotInFlight) => r.ring().set_used_entry(last, (id + 1) % size as u32, len),
            Some(Misbehaviour::DuplicateCompletion) => r.push_used(id as u16, len),
            Some(Misbehaviour::LenTooLarge) => r.ring().set_used_entry(last, id, 0x10_0000),
            Some(Misbehaviour::NeverComplete) => r.discard_unpublished(),
            _ => {}
        }
        let notify = r.publish_used();
        match misbehaviour {
            Some(Misbehaviour::UsedIdxJump) => r.ring().set_used_idx(r.used_idx().wrapping_add(size + 1)),
            Some(Misbehaviour::UsedIdxBackwards) => r.ring().set_used_idx(r.used_idx().wrapping_sub(2)),
            _ => {}
        }
        if notify || matches!(misbehaviour, Some(Misbehaviour::UsedIdxJump | Misbehaviour::UsedIdxBackwards)) {
            if let Some(c) = &queue.call {
                c.signal();
            }
        }
    }

    /// When the earliest blk request in flight is due.
    fn next_due(&self) -> Option<std::time::Instant> {
        if !self.running() {
            return None;
        }
        self.pending.iter().map(|p| p.due).min()
    }

    fn progress(&self) -> u64 {
        let s = &self.stats;
        s.tx_packets + s.ctrl_commands + s.blk_requests
    }

    /// Processes every queue until no more work arrives: after each pass the device
    /// re-arms kicks (avail_event / flags) and re-checks, so no kick is lost in between.
    fn process(&mut self) {
        loop {
            if !self.running() {
                return;
            }
            let before = self.progress();
            match self.kind {
                SimKind::Net { .. } => net::process(self),
                SimKind::Blk { .. } => blk::process(self),
            }
            let mut more = false;
            for q in 0..self.queues.len() {
                if self.queues[q].reader.is_some() {
                    // Through a ring translated under the current IOTLB: mappings may have changed.
                    more |= self.with_ring(q, |r, _, _, _, _| Ok(r.enable_notify())).unwrap_or(false);
                }
            }
            // Posted RX buffers always look like pending work; only go round again when
            // the last pass moved something.
            if !more || self.progress() == before {
                return;
            }
        }
    }
}

/// The device thread: wait for a kick (or a poke from an ioctl), process, repeat.
fn run(shared: &Shared) {
    loop {
        let (kicks, due) = {
            let st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            (st.queues.iter().filter_map(|q| q.kick.clone()).collect::<Vec<Arc<EventFd>>>(), st.next_due())
        };
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(kicks.len() + 1);
        fds.push(PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN));
        fds.extend(kicks.iter().map(|k| PollFd::new(k.as_fd(), PollFlags::POLLIN)));
        // A request in flight wakes the device when it is due.
        let timeout = due.map_or(PollTimeout::NONE, |d| {
            let ms = d.saturating_duration_since(std::time::Instant::now()).as_millis().clamp(1, 60_000);
            PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
        });
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
        drop(fds);
        // Drain, then look at `stop`: a stop request stores the flag before it signals, so
        // a signal consumed here is never one whose flag goes unseen.
        shared.wake.drain();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        // Only kicks still attached are drained: one replaced while this thread slept (a
        // live switch hands the guest's kick eventfd to svq's engine) belongs to its new
        // reader, and a kick consumed here would be lost to it.
        for k in &kicks {
            if st.queues.iter().any(|q| q.kick.as_ref().is_some_and(|c| Arc::ptr_eq(c, k))) {
                k.drain();
            }
        }
        st.process();
    }
}

fn einval(op: impl Into<String>) -> DeviceError {
    DeviceError::os(op, Errno::EINVAL)
}

impl Device for SimDevice {
    fn device_id(&self) -> DeviceResult<u32> {
        Ok(match self.state().kind {
            SimKind::Net { .. } => crate::virtio::device_id::NET,
            SimKind::Blk { .. } => crate::virtio::device_id::BLOCK,
        })
    }

    fn features(&self) -> DeviceResult<u64> {
        Ok(self.state().offered_features())
    }

    fn set_features(&self, features: u64) -> DeviceResult<()> {
        let mut st = self.state();
        if st.status & status::FEATURES_OK != 0 {
            return Err(DeviceError::os("VHOST_SET_FEATURES after FEATURES_OK", Errno::EBUSY));
        }
        if features & !st.offered_features() != 0 {
            return Err(einval(format!("VHOST_SET_FEATURES {features:#x}: bits not offered")));
        }
        if features & (1 << feature::ACCESS_PLATFORM) == 0 {
            return Err(einval("VHOST_SET_FEATURES without ACCESS_PLATFORM"));
        }
        st.features = features;
        Ok(())
    }

    fn backend_features(&self) -> DeviceResult<u64> {
        Ok(BACKEND_FEATURES)
    }

    fn set_backend_features(&self, features: u64) -> DeviceResult<()> {
        if features & !BACKEND_FEATURES != 0 {
            return Err(DeviceError::os(format!("VHOST_SET_BACKEND_FEATURES {features:#x}"), Errno::EOPNOTSUPP));
        }
        self.state().backend_features = features;
        Ok(())
    }

    fn config_size(&self) -> DeviceResult<u32> {
        Ok(self.state().config_bytes().len() as u32)
    }

    fn config(&self, offset: u32, buf: &mut [u8]) -> DeviceResult<()> {
        let cfg = self.state().config_bytes();
        let end = (offset as usize).checked_add(buf.len());
        match end {
            Some(end) if !buf.is_empty() && end <= cfg.len() => {
                buf.copy_from_slice(&cfg[offset as usize..end]);
                Ok(())
            }
            _ => Err(einval(format!("VHOST_VDPA_GET_CONFIG off {offset} len {}", buf.len()))),
        }
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> DeviceResult<()> {
        let st = self.state();
        let size = st.config_bytes().len();
        if data.is_empty() || offset as usize + data.len() > size {
            return Err(einval(format!("VHOST_VDPA_SET_CONFIG off {offset} len {}", data.len())));
        }
        // Like the kernel simulator, config space is read-only to the driver except
        // through the control queue; writes are accepted and ignored.
        Ok(())
    }

    fn num_queues(&self) -> DeviceResult<u32> {
        Ok(self.state().queues.len() as u32)
    }

    fn max_queue_size(&self) -> DeviceResult<u16> {
        Ok(MAX_QUEUE_SIZE)
    }

    fn num_groups(&self) -> DeviceResult<u32> {
        Ok(self.state().group_asid.len() as u32)
    }

    fn num_address_spaces(&self) -> DeviceResult<u32> {
        Ok(self.state().spaces.len() as u32)
    }

    fn queue_group(&self, queue: u32) -> DeviceResult<u32> {
        let st = self.state();
        if queue as usize >= st.queues.len() {
            return Err(einval(format!("VHOST_VDPA_GET_VRING_GROUP {queue}")));
        }
        Ok(match st.kind {
            SimKind::Net { pairs, .. } if queue as usize == net::ctrl_queue(pairs) => 1,
            _ => 0,
        })
    }

    fn set_group_asid(&self, group: u32, asid: u32) -> DeviceResult<()> {
        let mut st = self.state();
        if group as usize >= st.group_asid.len() || asid as usize >= st.spaces.len() {
            return Err(einval(format!("VHOST_VDPA_SET_GROUP_ASID group {group} asid {asid}")));
        }
        st.group_asid[group as usize] = asid;
        Ok(())
    }

    fn iova_range(&self) -> DeviceResult<(u64, u64)> {
        Ok((0, u64::MAX))
    }

    fn set_vring_num(&self, queue: u32, num: u16) -> DeviceResult<()> {
        if RingLayout::new(num).is_none() || num > MAX_QUEUE_SIZE {
            return Err(einval(format!("VHOST_SET_VRING_NUM {num}")));
        }
        self.with_queue(queue, |q| q.num = num)
    }

    fn set_vring_addr(&self, queue: u32, desc: u64, avail: u64, used: u64) -> DeviceResult<()> {
        self.with_queue(queue, |q| {
            q.desc = desc;
            q.avail = avail;
            q.used = used;
            q.reader = None;
        })
    }

    fn set_vring_base(&self, queue: u32, base: u16) -> DeviceResult<()> {
        self.with_queue(queue, |q| {
            q.base = base;
            q.reader = None;
        })
    }

    fn vring_base(&self, queue: u32) -> DeviceResult<u16> {
        self.with_queue(queue, |q| q.reader.as_ref().map_or(q.base, |r| r.last_avail()))
    }

    fn set_vring_kick(&self, queue: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()> {
        let efd = fd.map(EventFd::dup_of).transpose().map_err(|e| DeviceError::os("VHOST_SET_VRING_KICK", e))?;
        self.with_queue(queue, |q| q.kick = efd.map(Arc::new))?;
        self.poke();
        Ok(())
    }

    fn set_vring_call(&self, queue: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()> {
        let efd = fd.map(EventFd::dup_of).transpose().map_err(|e| DeviceError::os("VHOST_SET_VRING_CALL", e))?;
        self.with_queue(queue, |q| q.call = efd)
    }

    fn set_config_call(&self, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()> {
        let efd = fd.map(EventFd::dup_of).transpose().map_err(|e| DeviceError::os("VHOST_VDPA_SET_CONFIG_CALL", e))?;
        self.state().config_call = efd;
        Ok(())
    }

    fn set_vring_enable(&self, queue: u32, enable: bool) -> DeviceResult<()> {
        // As the kernel's simulators: enabling a queue does not look at it (a kick does),
        // and a kick the queue got while disabled is gone.
        self.with_queue(queue, |q| q.enabled = enable)?;
        Ok(())
    }

    fn status(&self) -> DeviceResult<u8> {
        Ok(self.state().status)
    }

    fn set_status(&self, new: u8) -> DeviceResult<()> {
        let mut st = self.state();
        if new == 0 {
            st.reset();
            return Ok(());
        }
        if st.status & !new != 0 {
            return Err(einval(format!("VHOST_VDPA_SET_STATUS {new:#x} clears bits of {:#x}", st.status)));
        }
        if new & status::FEATURES_OK != 0 && !st.has(feature::VERSION_1) {
            // A modern-only device refuses FEATURES_OK without VERSION_1: the driver sees
            // FEATURES_OK not set on re-read.
            st.status = new & !status::FEATURES_OK;
            return Ok(());
        }
        st.status = new;
        drop(st);
        self.poke();
        Ok(())
    }

    fn suspend(&self) -> DeviceResult<()> {
        self.state().suspended = true;
        Ok(())
    }

    fn resume(&self) -> DeviceResult<()> {
        self.state().suspended = false;
        self.poke();
        Ok(())
    }

    fn iotlb(&self, asid: u32, ops: &[IotlbOp]) -> DeviceResult<()> {
        let mut st = self.state();
        if asid as usize >= st.spaces.len() || (asid != 0 && st.backend_features & (1 << bf::IOTLB_ASID) == 0) {
            return Err(einval(format!("IOTLB message for ASID {asid}")));
        }
        // Whatever happens below, rings are translated again before their next use.
        st.iotlb_generation += 1;
        for op in ops {
            match *op {
                IotlbOp::Update { iova, size, uaddr, perm } => st.spaces[asid as usize]
                    .update(iova, size, uaddr, perm)
                    .map_err(|e| DeviceError::os(format!("IOTLB update iova={iova:#x} size={size:#x} asid={asid}"), e))?,
                IotlbOp::Invalidate { iova, size } => st.spaces[asid as usize].invalidate(iova, size),
            }
        }
        drop(st);
        self.poke();
        Ok(())
    }

    fn live_mappings(&self) -> Option<usize> {
        Some(self.state().spaces.iter().map(|s| s.len()).sum())
    }
}
