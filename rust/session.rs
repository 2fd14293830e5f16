//! A session: one device negotiated, guest memory mapped, each queue set up in passthrough
//! (the device reads the guest ring at the IOVA of guest memory) or shadowed (translate or
//! copy), the virtio-net control queue put in its own address space when the device allows
//! it, a saved control-plane state restored, and the engine running. Closing undoes every
//! step, also after a failure half-way through starting.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;

use crate::bounce::{BouncePool, Strategy};
use crate::device::{backend_feature as bf, device_id, status, Device, DeviceError, Perm};
use crate::dma::{Dma, DmaError, MapRequest};
use crate::driver::{Driver, DriverError, GuestQueue};
use crate::engine::{Engine, Request};
use crate::eventfd::EventFd;
use crate::iova::{Mapping, PAGE_SIZE};
use crate::mem::{GuestMemory, MemError};
use crate::net::{CvqCounters, CvqTracker, NetState, ACK_OK};
use crate::ring::layout::{align_up, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::ring::{RingReader, RingWriter, Vring};
use crate::shadow::{BounceSpace, Forwarding, InjectSlot, QueueHook, QueueStats, RegionIova, ShadowFds, ShadowParts, ShadowQueue};

/// How a queue reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The device reads the guest ring directly (guest memory mapped at IOVA = guest
    /// address): the baseline every overhead figure is measured against.
    Passthrough,
    /// svq forwards the guest's chains on a shadow ring, addresses translated to IOVAs.
    Translate,
    /// svq forwards copies of the guest's chains in bounce buffers.
    Copy,
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Mode of every queue not named in `queue_modes`.
    pub mode: Mode,
    /// Per-queue overrides.
    pub queue_modes: Vec<(u32, Mode)>,
    /// Bounce buffers of copy-mode queues (and of injections).
    pub copy_strategy: Strategy,
    /// Queue size (capped at the device's maximum).
    pub queue_size: u16,
    /// Guest memory regions as (guest address, size).
    pub memory: Vec<(u64, u64)>,
    /// Use EVENT_IDX where possible.
    pub event_idx: bool,
    /// Offer INDIRECT_DESC to the guest (in passthrough only if the device offers it).
    pub indirect: bool,
    /// Put a copy-mode control queue in its own address space when the device allows it.
    pub isolate_cvq: bool,
    /// Track the virtio-net control-plane state on a shadowed control queue.
    pub track_net_state: bool,
    /// A state to restore through the control queue before the data queues start.
    pub restore: Option<NetState>,
    /// How long restore waits for each acknowledgement.
    pub restore_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            mode: Mode::Translate,
            queue_modes: Vec::new(),
            copy_strategy: Strategy::Pool,
            queue_size: 256,
            memory: vec![(0x4000_0000, 32 << 20)],
            event_idx: true,
            indirect: false,
            isolate_cvq: true,
            track_net_state: true,
            restore: None,
            restore_timeout: Duration::from_secs(10),
        }
    }
}

/// A failed session operation.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A device operation failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The guest driver failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// A map or unmap failed.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// Bounce buffers could not be made.
    #[error(transparent)]
    Bounce(#[from] crate::bounce::BounceError),
    /// The device lacks something svq needs, or refused the features.
    #[error("feature negotiation: {0}")]
    Negotiation(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// An eventfd or thread could not be created.
    #[error("{op}: {errno}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        errno: Errno,
    },
    /// An injected element did not complete in time.
    #[error("injected element on queue {queue} did not complete within {timeout:?}")]
    Timeout {
        /// Queue.
        queue: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// An injected element failed.
    #[error("injected element on queue {queue}: {reason}")]
    Injected {
        /// Queue.
        queue: u32,
        /// Why.
        reason: String,
    },
    /// A restore command was refused or failed.
    #[error("restore: command {index} ({name}) {reason}")]
    Restore {
        /// Position in the restore sequence.
        index: usize,
        /// Command name.
        name: &'static str,
        /// What happened.
        reason: String,
    },
    /// The session was closed.
    #[error("session is closed")]
    Closed,
}

fn os(op: &'static str) -> impl Fn(Errno) -> SessionError {
    move |errno| SessionError::Os { op, errno }
}

/// Features svq can drive, per device class (virtio spec 5.1.3, 5.2.3).
const NET_FEATURES: u64 = {
    use crate::net::feature::*;
    (1 << CTRL_GUEST_OFFLOADS)
        | (1 << MTU)
        | (1 << MAC)
        | (1 << STATUS)
        | (1 << CTRL_VQ)
        | (1 << CTRL_RX)
        | (1 << CTRL_VLAN)
        | (1 << CTRL_RX_EXTRA)
        | (1 << GUEST_ANNOUNCE)
        | (1 << MQ)
        | (1 << CTRL_MAC_ADDR)
        | (1 << ANY_LAYOUT)
};
/// virtio-blk: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH.
const BLK_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9);

/// Where the virtio-net control queue ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CvqInfo {
    /// Its queue index.
    pub queue: u32,
    /// Its mode.
    pub mode: Mode,
    /// Whether it runs in an address space of its own.
    pub isolated: bool,
    /// Its address space.
    pub asid: u32,
    /// Why the data queues were shadowed although passthrough was asked for.
    pub fallback: Option<String>,
}

/// A device set up for use.
#[derive(Debug)]
pub struct Session {
    device: Arc<dyn Device>,
    dma: Arc<Dma>,
    features: u64,
    backend_features: u64,
    num_queues: u32,
    modes: Vec<Mode>,
    driver: Option<Driver>,
    /// Host memory of the shadow rings.
    ring_mem: Vec<GuestMemory>,
    engine: Option<Engine>,
    stats: Vec<Arc<QueueStats>>,
    cvq: Option<CvqInfo>,
    net_state: Option<Arc<Mutex<NetState>>>,
    cvq_counters: Option<Arc<CvqCounters>>,
    closed: bool,
}

/// Decisions taken before anything is set up.
struct Plan {
    modes: Vec<Mode>,
    asids: Vec<u32>,
    cvq: Option<CvqInfo>,
    cvq_group: u32,
    data_queues: Vec<u32>,
}

impl Session {
    /// Resets and negotiates `device`, maps guest memory, sets up every queue and starts.
    pub fn start(device: Arc<dyn Device>, cfg: &SessionConfig) -> Result<Self, SessionError> {
        let dma = Arc::new(Dma::new(device.clone())?);
        let mut s = Session {
            device,
            dma,
            features: 0,
            backend_features: 0,
            num_queues: 0,
            modes: Vec::new(),
            driver: None,
            ring_mem: Vec::new(),
            engine: None,
            stats: Vec::new(),
            cvq: None,
            net_state: None,
            cvq_counters: None,
            closed: false,
        };
        match s.setup(cfg) {
            Ok(()) => Ok(s),
            Err(e) => {
                // Undo whatever was done; the setup error is the one worth reporting.
                let _ = s.close();
                Err(e)
            }
        }
    }

    fn negotiate(&mut self, cfg: &SessionConfig, offered_backend: u64, want_backend: u64) -> Result<u32, SessionError> {
        let dev = self.device.clone();
        let offered = dev.features()?;
        let required = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);
        if offered & required != required {
            return Err(SessionError::Negotiation(format!("device features {offered:#x} lack VERSION_1 or ACCESS_PLATFORM")));
        }
        let id = dev.device_id()?;
        let class = match id {
            device_id::NET => NET_FEATURES,
            device_id::BLOCK => BLK_FEATURES,
            id => return Err(SessionError::Negotiation(format!("device id {id} is not virtio-net or virtio-blk"))),
        };
        let mut wanted = required | class;
        if cfg.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let any_passthrough = cfg.mode == Mode::Passthrough || cfg.queue_modes.iter().any(|(_, m)| *m == Mode::Passthrough);
        if any_passthrough && cfg.indirect {
            wanted |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        self.features = offered & wanted;
        self.backend_features = offered_backend & want_backend;
        dev.set_backend_features(self.backend_features)?;
        dev.set_features(self.features)?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)?;
        if dev.status()? & status::FEATURES_OK == 0 {
            return Err(SessionError::Negotiation(format!("device refused features {:#x}", self.features)));
        }
        Ok(id)
    }

    /// Per-queue modes and address spaces, and the control queue's place.
    fn plan(&self, cfg: &SessionConfig, id: u32, offered_backend: u64) -> Result<Plan, SessionError> {
        let dev = &self.device;
        let n = self.num_queues;
        let mut modes: Vec<Mode> = (0..n).map(|q| cfg.queue_modes.iter().find(|(i, _)| *i == q).map_or(cfg.mode, |(_, m)| *m)).collect();
        if let Some((q, _)) = cfg.queue_modes.iter().find(|(q, _)| *q >= n) {
            return Err(SessionError::Invalid(format!("queue {q} does not exist (the device has {n})")));
        }
        let has_cvq = id == device_id::NET && self.features & (1 << crate::net::feature::CTRL_VQ) != 0;
        let mut plan = Plan { asids: vec![0; n as usize], cvq: None, cvq_group: 0, data_queues: (0..n).collect(), modes: Vec::new() };
        if has_cvq {
            let cvq = n - 1;
            plan.data_queues.retain(|&q| q != cvq);
            let group = dev.queue_group(cvq)?;
            let alone = (0..n).filter(|&q| q != cvq).map(|q| dev.queue_group(q)).collect::<Result<Vec<_>, _>>()?.iter().all(|&g| g != group);
            let isolated = cfg.isolate_cvq
                && modes[cvq as usize] == Mode::Copy
                && alone
                && dev.num_address_spaces()? >= 2
                && offered_backend & (1 << bf::IOTLB_ASID) != 0;
            let mut fallback = None;
            if modes[cvq as usize] != Mode::Passthrough && !isolated && plan.data_queues.iter().any(|&q| modes[q as usize] == Mode::Passthrough) {
                // The control queue's buffers would share an address space with guest
                // memory mapped for passthrough: shadow every queue instead.
                for &q in &plan.data_queues {
                    modes[q as usize] = Mode::Translate;
                }
                fallback = Some("the control queue cannot have an address space of its own: every queue is shadowed".into());
            }
            if isolated {
                plan.asids[cvq as usize] = 1;
            }
            plan.cvq_group = group;
            plan.cvq = Some(CvqInfo { queue: cvq, mode: modes[cvq as usize], isolated, asid: plan.asids[cvq as usize], fallback });
        }
        if cfg.restore.is_some() && !plan.cvq.as_ref().is_some_and(|c| c.mode != Mode::Passthrough) {
            return Err(SessionError::Invalid("restoring a state needs a shadowed virtio-net control queue".into()));
        }
        plan.modes = modes;
        Ok(plan)
    }

    fn setup(&mut self, cfg: &SessionConfig) -> Result<(), SessionError> {
        let dev = self.device.clone();
        dev.set_status(0)?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        self.num_queues = dev.num_queues()?;
        let offered_backend = dev.backend_features()?;
        // Back-end features are acked only as used: ASID when the control queue may get
        // its own address space, ENABLE_AFTER_DRIVER_OK when data queues wait for restore.
        let mut want_backend = (1 << bf::IOTLB_MSG_V2) | (1 << bf::IOTLB_BATCH) | (1 << bf::SUSPEND) | (1 << bf::RESUME);
        if cfg.isolate_cvq {
            want_backend |= 1 << bf::IOTLB_ASID;
        }
        if cfg.restore.is_some() {
            want_backend |= 1 << bf::ENABLE_AFTER_DRIVER_OK;
        }
        let id = self.negotiate(cfg, offered_backend, want_backend)?;
        let plan = self.plan(cfg, id, self.backend_features)?;
        self.modes = plan.modes.clone();
        self.cvq = plan.cvq.clone();

        // The guest's rings: in passthrough the device reads them, so they may use only
        // what the device negotiated; shadowed, svq serves them and offers both.
        let has = |bit: u32| self.features & (1u64 << bit) != 0;
        let any_passthrough = plan.modes.contains(&Mode::Passthrough);
        let (guest_event_idx, guest_indirect) =
            if any_passthrough { (has(VIRTIO_RING_F_EVENT_IDX), has(VIRTIO_RING_F_INDIRECT_DESC)) } else { (cfg.event_idx, cfg.indirect) };
        let size = cfg.queue_size.min(dev.max_queue_size()?);
        let mem = Arc::new(GuestMemory::new(&cfg.memory)?);
        let driver = Driver::new(mem.clone(), &vec![size; self.num_queues as usize], guest_event_idx, guest_indirect)?;
        let guest_queues = driver.guest_queues();
        self.driver = Some(driver);

        if let Some(c) = &plan.cvq {
            if c.isolated {
                dev.set_group_asid(plan.cvq_group, c.asid)?;
            }
        }
        // Guest memory is mapped (in ASID 0) only for queues that reach it there: at
        // IOVA = guest address when any queue is passthrough, anywhere otherwise.
        let needs_guest_memory =
            (0..self.num_queues as usize).any(|q| plan.asids[q] == 0 && matches!(plan.modes[q], Mode::Passthrough | Mode::Translate));
        let mut regions = Vec::new();
        if needs_guest_memory {
            let reqs: Vec<MapRequest> = mem
                .regions()
                .iter()
                .map(|r| MapRequest {
                    size: r.size,
                    host: r.host_addr(),
                    guest: Some(r.gpa),
                    perm: Perm::ReadWrite,
                    at: any_passthrough.then_some(r.gpa),
                })
                .collect();
            for (m, r) in self.dma.map(0, &reqs)?.iter().zip(mem.regions()) {
                regions.push(RegionIova { gpa: r.gpa, size: r.size, iova: m.iova });
            }
        }

        let mut shadows = Vec::new();
        for gq in &guest_queues {
            let q = gq.index as usize;
            let stats = Arc::new(QueueStats::default());
            self.stats.push(stats.clone());
            dev.set_vring_num(gq.index, size)?;
            dev.set_vring_base(gq.index, 0)?;
            let forwarding = match plan.modes[q] {
                Mode::Passthrough => {
                    dev.set_vring_addr(gq.index, gq.desc, gq.avail, gq.used)?;
                    dev.set_vring_kick(gq.index, Some(gq.kick.as_fd()))?;
                    dev.set_vring_call(gq.index, Some(gq.call.as_fd()))?;
                    continue;
                }
                Mode::Translate => Forwarding::Translate,
                Mode::Copy => Forwarding::Copy(cfg.copy_strategy),
            };
            let mut sq = self.shadow_queue(gq, &mem, &regions, stats, forwarding, plan.asids[q], cfg.copy_strategy)?;
            if plan.cvq.as_ref().is_some_and(|c| c.queue == gq.index) && (cfg.track_net_state || cfg.restore.is_some()) {
                let state = Arc::new(Mutex::new(NetState::default()));
                let counters = Arc::new(CvqCounters::default());
                sq.add_hook(Box::new(CvqTracker { state: state.clone(), counters: counters.clone() }));
                self.net_state = Some(state);
                self.cvq_counters = Some(counters);
            }
            shadows.push(sq);
        }
        let config_call = EventFd::new().map_err(os("eventfd"))?;
        dev.set_config_call(Some(config_call.as_fd()))?;
        // With a state to restore, the data queues start only after every ack is OK, which
        // needs a device that takes queue enables after DRIVER_OK.
        let late: Vec<u32> = match &cfg.restore {
            Some(_) if self.backend_features & (1 << bf::ENABLE_AFTER_DRIVER_OK) == 0 => {
                return Err(SessionError::Negotiation(
                    "restoring a state needs backend feature ENABLE_AFTER_DRIVER_OK (data queues start after the acks)".into(),
                ))
            }
            Some(_) => plan.data_queues.clone(),
            None => Vec::new(),
        };
        for q in (0..self.num_queues).filter(|q| !late.contains(q)) {
            dev.set_vring_enable(q, true)?;
        }
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK)?;
        let health = guest_queues.iter().map(|g| (g.health.clone(), g.call.clone())).collect();
        self.engine = Some(Engine::start(shadows, dev.clone(), config_call, health).map_err(os("start engine"))?);
        if let Some(saved) = &cfg.restore {
            self.restore(saved, cfg.restore_timeout)?;
        }
        for &q in &late {
            dev.set_vring_enable(q, true)?;
        }
        Ok(())
    }

    /// Sends the commands that bring the device to `saved`, all in flight at once, and
    /// checks every acknowledgement.
    fn restore(&mut self, saved: &NetState, timeout: Duration) -> Result<(), SessionError> {
        let cvq = self.cvq.as_ref().map(|c| c.queue).ok_or_else(|| SessionError::Invalid("no control queue".into()))?;
        let mut mac = [0u8; 6];
        if self.features & (1 << crate::net::feature::MAC) != 0 {
            self.device.config(0, &mut mac)?;
        }
        let cmds = saved.restore_commands(mac);
        let slots = self.inject_many(cvq, cmds.iter().map(|c| (c.encode(), 1)).collect())?;
        for (index, (cmd, slot)) in cmds.iter().zip(slots).enumerate() {
            let fail = |reason: String| SessionError::Restore { index, name: cmd.name(), reason };
            match slot.wait(timeout) {
                None => return Err(fail(format!("got no acknowledgement within {timeout:?}"))),
                Some(Err(e)) => return Err(fail(e)),
                Some(Ok((len, ack))) if len == 1 && ack.first() == Some(&ACK_OK) => {}
                Some(Ok((len, ack))) => return Err(fail(format!("was refused (ack {ack:?}, length {len})"))),
            }
        }
        Ok(())
    }

    /// Builds the shadow ring of one queue: host memory mapped for the device (descriptors
    /// and avail read-only, used writable) in the queue's address space, eventfds bound,
    /// bounce buffers for copy mode, and the shadow queue itself.
    #[allow(clippy::too_many_arguments)]
    fn shadow_queue(
        &mut self,
        gq: &GuestQueue,
        mem: &Arc<GuestMemory>,
        regions: &[RegionIova],
        stats: Arc<QueueStats>,
        forwarding: Forwarding,
        asid: u32,
        strategy: Strategy,
    ) -> Result<ShadowQueue, SessionError> {
        let dev = self.device.clone();
        let layout = gq.layout;
        let ro_len = align_up(layout.desc_bytes() + layout.avail_bytes(), PAGE_SIZE);
        let rw_len = align_up(layout.used_bytes(), PAGE_SIZE);
        let ring_mem = GuestMemory::new(&[(0, ro_len + rw_len)])?;
        let host = ring_mem.regions()[0].host_addr();
        self.ring_mem.push(ring_mem);
        let maps = self.dma.map(
            asid,
            &[
                MapRequest { size: ro_len, host, guest: None, perm: Perm::ReadOnly, at: None },
                MapRequest { size: rw_len, host: host + ro_len, guest: None, perm: Perm::ReadWrite, at: None },
            ],
        )?;
        let (ro, rw) = (maps[0], maps[1]);
        let base = host as *mut u8;
        // SAFETY: ring_mem (kept in self.ring_mem until the engine is stopped) holds
        // ro_len + rw_len bytes at `host`: the descriptor table and avail ring fit in the
        // first ro_len bytes, the used ring in the rest; the mmap is page-aligned.
        let shadow_ring = unsafe {
            Vring::new(
                std::ptr::NonNull::new_unchecked(base),
                std::ptr::NonNull::new_unchecked(base.add(layout.desc_bytes() as usize)),
                std::ptr::NonNull::new_unchecked(base.add(ro_len as usize)),
                layout,
            )
        };
        let device_event_idx = self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let shadow = RingWriter::new(shadow_ring, 0, device_event_idx);
        dev.set_vring_addr(gq.index, ro.iova, ro.iova + layout.desc_bytes(), rw.iova)?;
        let fds = ShadowFds {
            guest_kick: gq.kick.clone(),
            guest_call: gq.call.clone(),
            device_kick: EventFd::new().map_err(os("eventfd"))?,
            device_call: EventFd::new().map_err(os("eventfd"))?,
        };
        dev.set_vring_kick(gq.index, Some(fds.device_kick.as_fd()))?;
        dev.set_vring_call(gq.index, Some(fds.device_call.as_fd()))?;
        let guest = RingReader::new(gq.vring(mem)?, 0, gq.event_idx, gq.indirect);
        let bounce_space = BounceSpace { dma: self.dma.clone(), asid, strategy };
        let bounce = match forwarding {
            Forwarding::Copy(st) => Some(BouncePool::new(self.dma.clone(), asid, st, 1)?),
            Forwarding::Translate => None,
        };
        Ok(ShadowQueue::new(ShadowParts {
            index: gq.index,
            forwarding,
            guest,
            shadow,
            mem: mem.clone(),
            regions: regions.to_vec(),
            fds,
            stats,
            health: gq.health.clone(),
            bounce_space: Some(bounce_space),
            bounce,
        }))
    }

    /// Each queue's mode.
    pub fn modes(&self) -> &[Mode] {
        &self.modes
    }

    /// Negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Acked backend features.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u32 {
        self.num_queues
    }

    /// Where the control queue is (virtio-net with a control queue only).
    pub fn cvq(&self) -> Option<&CvqInfo> {
        self.cvq.as_ref()
    }

    /// The tracked control-plane state (a shadowed control queue only).
    pub fn net_state(&self) -> Option<NetState> {
        self.net_state.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// (commands, acked, answered locally) on the control queue.
    pub fn cvq_counts(&self) -> Option<(u64, u64, u64)> {
        self.cvq_counters
            .as_ref()
            .map(|c| (c.commands.load(Ordering::Relaxed), c.acked.load(Ordering::Relaxed), c.answered_locally.load(Ordering::Relaxed)))
    }

    /// The in-process guest driver.
    pub fn driver(&mut self) -> Result<&mut Driver, SessionError> {
        self.driver.as_mut().ok_or(SessionError::Closed)
    }

    /// Counters of queue `q` (zero for a passthrough queue: svq is not on its path).
    pub fn stats(&self, q: u32) -> Option<Vec<(&'static str, u64)>> {
        self.stats.get(q as usize).map(|s| s.snapshot())
    }

    fn engine_for(&self, q: u32) -> Result<&Engine, SessionError> {
        let e = self.engine.as_ref().ok_or(SessionError::Closed)?;
        if !e.has_queue(q) {
            return Err(SessionError::Invalid(format!("queue {q} is not shadowed")));
        }
        Ok(e)
    }

    /// Injects elements (readable bytes, writable size) on shadowed queue `q`, all in
    /// flight at once; each slot completes with (length, written bytes) or an error.
    pub fn inject_many(&self, q: u32, elements: Vec<(Vec<u8>, u32)>) -> Result<Vec<Arc<InjectSlot>>, SessionError> {
        let engine = self.engine_for(q)?;
        let slots: Vec<Arc<InjectSlot>> = elements.iter().map(|_| Arc::new(InjectSlot::default())).collect();
        let reqs = elements
            .into_iter()
            .zip(&slots)
            .map(|((out, in_len), slot)| Request::Inject { queue: q, out, in_len, slot: slot.clone() })
            .collect();
        engine.submit(reqs);
        Ok(slots)
    }

    /// Waits for an injected element.
    pub fn wait_injected(q: u32, slot: &InjectSlot, timeout: Duration) -> Result<(u32, Vec<u8>), SessionError> {
        match slot.wait(timeout) {
            None => Err(SessionError::Timeout { queue: q, timeout }),
            Some(r) => r.map_err(|reason| SessionError::Injected { queue: q, reason }),
        }
    }

    /// Attaches a hook to shadowed queue `q`. The hook sees every element popped after
    /// the returned slot completes (wait for it with [`Session::wait_injected`], without
    /// holding anything the engine thread or a hook might need).
    pub fn add_hook(&self, q: u32, hook: Box<dyn QueueHook>) -> Result<Arc<InjectSlot>, SessionError> {
        let done = Arc::new(InjectSlot::default());
        self.engine_for(q)?.submit(vec![Request::Hook { queue: q, hook, done: done.clone() }]);
        Ok(done)
    }

    /// The session's live mappings with their address space, by IOVA.
    pub fn mappings(&self) -> Vec<(u32, Mapping)> {
        self.dma.mappings()
    }

    /// Number of live mappings.
    pub fn live_mappings(&self) -> usize {
        self.dma.live()
    }

    /// (maps, unmaps) sent to the device so far.
    pub fn map_counts(&self) -> (u64, u64) {
        self.dma.counts()
    }

    /// `VHOST_VDPA_SUSPEND`.
    pub fn suspend(&self) -> Result<(), SessionError> {
        Ok(self.device.suspend()?)
    }

    /// `VHOST_VDPA_RESUME`.
    pub fn resume(&self) -> Result<(), SessionError> {
        Ok(self.device.resume()?)
    }

    /// `VHOST_GET_VRING_BASE` of queue `q` (trustworthy after suspend).
    pub fn vring_base(&self, q: u32) -> Result<u16, SessionError> {
        Ok(self.device.vring_base(q)?)
    }

    /// Stops the engine, resets the device, returns every element in flight, unbinds
    /// every eventfd and unmaps everything. Idempotent; every step runs even when an
    /// earlier one fails, and the first error is returned.
    pub fn close(&mut self) -> Result<(), SessionError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let mut first: Option<SessionError> = None;
        let mut keep = |r: Result<(), SessionError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        let mut queues = self.engine.take().map(Engine::stop).unwrap_or_default();
        let dev = self.device.clone();
        // Reset first: the device stops touching memory before it is unmapped.
        keep(dev.set_status(0).map_err(Into::into));
        for q in 0..self.num_queues {
            keep(dev.set_vring_kick(q, None).map_err(Into::into));
            keep(dev.set_vring_call(q, None).map_err(Into::into));
        }
        keep(dev.set_config_call(None).map_err(Into::into));
        for q in &mut queues {
            keep(q.stop().map(drop).map_err(Into::into));
        }
        drop(queues);
        keep(self.dma.unmap_all().map_err(Into::into));
        self.ring_mem.clear();
        self.driver = None;
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::SimDevice;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn frame(dst: [u8; 6], n: usize, seq: u32) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&dst);
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&seq.to_le_bytes());
        f.resize(n, (seq % 251) as u8);
        f
    }

    fn loopback(mode: Mode) {
        let dev: Arc<dyn Device> = Arc::new(SimDevice::net(MAC, 1500).unwrap());
        let mut s = Session::start(dev.clone(), &SessionConfig { mode, ..Default::default() }).unwrap();
        let d = s.driver().unwrap();
        let total = 1000u32;
        let mut got = Vec::new();
        let mut sent = 0u32;
        while sent < total {
            let batch = 64.min(total - sent);
            for _ in 0..batch {
                d.add(0, &[], &[2048]).unwrap();
            }
            d.kick(0).unwrap();
            for i in 0..batch {
                let f = frame(MAC, 60 + ((sent + i) as usize * 7) % 1400, sent + i);
                d.add(1, &[&f], &[]).unwrap();
            }
            d.kick(1).unwrap();
            got.extend(d.wait(0, batch as usize, false, Duration::from_secs(5)).unwrap());
            d.wait(1, batch as usize, false, Duration::from_secs(5)).unwrap();
            sent += batch;
        }
        for (i, c) in got.iter().enumerate() {
            assert_eq!(c.data, frame(MAC, 60 + (i * 7) % 1400, i as u32), "frame {i}");
        }
        if mode != Mode::Passthrough {
            let st: std::collections::HashMap<_, _> = s.stats(1).unwrap().into_iter().collect();
            assert_eq!(st["elements"], total as u64);
            assert_eq!(st["completed"], total as u64);
        }
        s.close().unwrap();
        assert_eq!(dev.live_mappings(), Some(0));
    }

    #[test]
    fn translate_loopback() {
        loopback(Mode::Translate);
    }

    #[test]
    fn passthrough_loopback() {
        loopback(Mode::Passthrough);
    }

    #[test]
    fn copy_loopback() {
        loopback(Mode::Copy);
    }

    struct Panics;
    impl QueueHook for Panics {
        fn avail(&mut self, _out: &[u8], _in_len: u32) -> crate::shadow::Verdict {
            panic!("a hook that panics")
        }
        fn used(&mut self, _out: &[u8], _written: &[u8]) {}
    }

    #[test]
    fn a_panic_on_the_engine_thread_breaks_the_queues_and_close_still_cleans_up() {
        let dev: Arc<dyn Device> = Arc::new(SimDevice::net(MAC, 1500).unwrap());
        let mut s = Session::start(dev.clone(), &SessionConfig::default()).unwrap();
        let done = s.add_hook(2, Box::new(Panics)).unwrap();
        Session::wait_injected(2, &done, Duration::from_secs(5)).unwrap();
        let d = s.driver().unwrap();
        d.add(2, &[&[1, 1, 2, 0, 0, 0, 0, 1]], &[1]).unwrap();
        d.kick(2).unwrap();
        match d.wait(2, 1, false, Duration::from_secs(5)) {
            Err(DriverError::Broken(f)) => {
                assert_eq!(f.kind, crate::shadow::FaultKind::Internal);
                assert!(f.message.contains("a hook that panics"), "{}", f.message);
            }
            other => panic!("expected an internal fault, got {other:?}"),
        }
        // Every queue is broken, and closing releases everything.
        assert!(matches!(d.wait(0, 1, false, Duration::from_secs(1)), Err(DriverError::Broken(_))));
        s.close().unwrap();
        assert_eq!(dev.live_mappings(), Some(0));
    }
}
