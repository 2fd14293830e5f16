//! A session: one device negotiated, guest memory mapped, each queue set up in passthrough
//! (the device reads the guest ring at the IOVA of guest memory) or shadowed (translate or
//! copy), the virtio-net control queue put in its own address space when the device allows
//! it, a saved control-plane state restored, and the engine running. Closing undoes every
//! step, also after a failure half-way through starting. Its parts:
//! - [`negotiate`]: the features svq can drive with the device;
//! - [`placement`]: each queue's mode and address space, the control queue's place;
//! - [`setup`]: guest memory mapped, shadow rings built, the device started;
//! - [`restore`]: a saved control-plane state replayed;
//! - [`teardown`]: stop, reset, unmap, and memory freed only when the device cannot reach it;
//! - [`claim`]: one session per device at a time.

mod capture;
mod claim;
mod negotiate;
mod placement;
mod restore;
mod save;
mod setup;
mod switch;
mod teardown;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;

pub use capture::{interface_description, interface_name, net_header_len, wait_attached};
pub use negotiate::guest_offer;
pub use placement::CvqInfo;
pub use save::{ResumeFailed, SaveFailed, Saved};
pub use switch::SwitchReport;

use crate::bounce::Strategy;
use crate::device::{Device, DeviceError};
use crate::dma::{Dma, DmaError};
use crate::engine::{Engine, Request};
use crate::front::driver::{Driver, DriverError};
use crate::front::external::{ExternalGuest, FrontError};
use crate::front::GuestQueue;
use crate::iova::Mapping;
use crate::mem::{GuestMemory, MemError};
use crate::net::NetState;
use crate::shadow::cvq::CvqCounters;
use crate::shadow::{InjectBatch, InjectError, InjectResult, InjectSlot, QueueHook, QueueStats, StopReason};
use claim::DeviceClaim;
use teardown::Teardown;

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

impl Mode {
    /// Its name ("passthrough", "translate", "copy").
    pub fn name(self) -> &'static str {
        match self {
            Mode::Passthrough => "passthrough",
            Mode::Translate => "translate",
            Mode::Copy => "copy",
        }
    }
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
    /// How long restore waits for all acknowledgements.
    pub restore_timeout: Duration,
    /// The engine's adaptive poll: after work it keeps looking at the rings for up to
    /// this long (notifications off) before it re-arms them and sleeps. Zero: never poll.
    pub busy_poll: Duration,
    /// A device state saved by another session (`Session::save`) to continue from: the
    /// rings start where they stood, chains in flight are submitted again, and the
    /// virtio-net state is replayed before the data queues start.
    pub resume: Option<crate::migrate::DeviceState>,
    /// Engine threads the shadow queues spread over (zero: one per CPU the process may
    /// run on); never more than the queues' groups (a virtio-net queue pair, the control
    /// queue, any other queue).
    pub workers: usize,
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
            busy_poll: Duration::from_micros(200),
            resume: None,
            workers: 0,
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
    /// A guest handed over by a front is invalid.
    #[error(transparent)]
    Front(#[from] FrontError),
    /// Bounce buffers could not be made.
    #[error(transparent)]
    Bounce(#[from] crate::bounce::BounceError),
    /// The device lacks something svq needs, or refused the features.
    #[error("feature negotiation: {0}")]
    Negotiation(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// Another session owns the device.
    #[error("device is in use by another session: close that one first")]
    Busy,
    /// An eventfd or thread could not be created.
    #[error("{op}: {errno}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        errno: Errno,
    },
    /// Injected elements did not all complete in time.
    #[error("{pending} injected element(s) on queue {queue} did not complete within {timeout:?}")]
    Timeout {
        /// Queue.
        queue: u32,
        /// Elements still pending.
        pending: usize,
        /// How long we waited.
        timeout: Duration,
    },
    /// An injected element failed.
    #[error(transparent)]
    Injected(#[from] InjectError),
    /// A saved device state does not fit.
    #[error(transparent)]
    State(#[from] crate::migrate::StateError),
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
    /// A packet capture's file could not be written.
    #[error(transparent)]
    Capture(crate::capture::CaptureError),
}

pub(crate) fn os(op: &'static str) -> impl Fn(Errno) -> SessionError {
    move |errno| SessionError::Os { op, errno }
}

/// A device set up for use.
#[derive(Debug)]
pub struct Session {
    device: Arc<dyn Device>,
    dma: Arc<Dma>,
    claim: Option<DeviceClaim>,
    features: u64,
    /// The virtio features the guest's driver works with (what a saved state records).
    guest_features: u64,
    backend_features: u64,
    /// Queues the device has.
    device_queues: u32,
    /// The queues served (by index) and each one's mode.
    modes: Vec<(u32, Mode)>,
    /// The in-process guest driver.
    driver: Option<Driver>,
    /// Guest memory and the guest's queues, as the front handed them over.
    guest_mem: Option<Arc<GuestMemory>>,
    guest_queues: Vec<GuestQueue>,
    /// The shadow rings' memory and mappings.
    ring_mem: Vec<ShadowRing>,
    /// Where guest memory is mapped for the device (translate uses it).
    regions: Vec<crate::shadow::RegionIova>,
    /// Whether guest memory sits at IOVA = guest address (what passthrough needs).
    identity: bool,
    /// The dirty log, while one is attached.
    log: Option<Arc<crate::dirty::DirtyLog>>,
    /// Bounce buffers of queues that become copy mode later.
    copy_strategy: Strategy,
    engine: Option<Engine>,
    stats: Vec<(u32, Arc<QueueStats>)>,
    cvq: Option<CvqInfo>,
    net_state: Option<Arc<Mutex<NetState>>>,
    cvq_counters: Option<Arc<CvqCounters>>,
    /// The packet capture on the data queues, while one is attached.
    capture: Option<capture::Attached>,
    closed: bool,
}

impl Session {
    /// Resets and negotiates `device`, creates guest memory and the in-process guest
    /// driver, sets up every queue and starts. The device must not be in use by another
    /// session.
    pub fn start(device: Arc<dyn Device>, cfg: &SessionConfig) -> Result<Self, SessionError> {
        Self::start_with(device, cfg, GuestSource::InProcess).map_err(|f| f.error)
    }

    /// Like [`Session::start`] for a guest svq does not own: its memory and rings as an
    /// external front hands them over. Only the guest's queues are set up; their format
    /// follows the features the guest negotiated.
    pub fn start_external(device: Arc<dyn Device>, cfg: &SessionConfig, guest: ExternalGuest) -> Result<Self, SessionError> {
        Self::start_with(device, cfg, GuestSource::External(guest)).map_err(|f| f.error)
    }

    fn start_with(device: Arc<dyn Device>, cfg: &SessionConfig, source: GuestSource) -> Result<Self, Box<StartFailed>> {
        // A resumed state's virtio-net state is replayed like an explicit restore.
        let resumed;
        let cfg = match cfg.resume.as_ref().and_then(|s| s.net.clone()) {
            Some(net) if cfg.restore.is_none() && net != NetState::default() => {
                resumed = SessionConfig { restore: Some(net), ..cfg.clone() };
                &resumed
            }
            _ => cfg,
        };
        let parts = DeviceClaim::take(&device).and_then(|claim| Ok((claim, Arc::new(Dma::new(device.clone())?))));
        let (claim, dma) = match parts {
            Ok(p) => p,
            Err(error) => return Err(Box::new(StartFailed { error, driver: source.into_driver(), positions: Vec::new() })),
        };
        let resuming = matches!(source, GuestSource::Resumed(_));
        let mut s = Session {
            device,
            dma,
            claim: Some(claim),
            features: 0,
            guest_features: 0,
            backend_features: 0,
            device_queues: 0,
            modes: Vec::new(),
            driver: None,
            guest_mem: None,
            guest_queues: Vec::new(),
            ring_mem: Vec::new(),
            regions: Vec::new(),
            identity: false,
            log: None,
            copy_strategy: cfg.copy_strategy,
            engine: None,
            stats: Vec::new(),
            cvq: None,
            net_state: None,
            cvq_counters: None,
            capture: None,
            closed: false,
        };
        match s.setup(cfg, source) {
            Ok(()) => Ok(s),
            // A guest moving in goes back as it stood (what it had in flight still in
            // flight), unless the device might still reach its memory.
            Err(error) if resuming => {
                let suspended = s.device.suspend().is_ok();
                let handed = s.hand_over(suspended);
                Err(Box::new(StartFailed { error, driver: handed.driver, positions: handed.positions }))
            }
            Err(error) => {
                // Undo whatever was done; the setup error is the one worth reporting.
                let _ = s.close();
                Err(Box::new(StartFailed { error, driver: None, positions: Vec::new() }))
            }
        }
    }

    /// Whether the session was closed (by `close`, or by a save or hand-over that
    /// stopped it).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The queues served, by index, with their modes.
    pub fn modes(&self) -> &[(u32, Mode)] {
        &self.modes
    }

    /// The mode of queue `q`, when it is served.
    pub fn mode(&self, q: u32) -> Option<Mode> {
        self.modes.iter().find(|(i, _)| *i == q).map(|(_, m)| *m)
    }

    /// The queues served in passthrough (the device reads the guest's rings itself).
    pub(crate) fn passthrough_queues(&self) -> Vec<u32> {
        self.modes.iter().filter(|(_, m)| *m == Mode::Passthrough).map(|(q, _)| *q).collect()
    }

    /// Negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Acked backend features.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Number of queues the device has (not all of them need be served).
    pub fn device_queues(&self) -> u32 {
        self.device_queues
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

    /// The in-process guest driver (a session serving an external guest has none).
    pub fn driver(&mut self) -> Result<&mut Driver, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        self.driver
            .as_mut()
            .ok_or_else(|| SessionError::Invalid("this session serves an external guest: it has no in-process driver".into()))
    }

    /// The guest's queues, as the front described them.
    pub fn guest_queues(&self) -> &[GuestQueue] {
        &self.guest_queues
    }

    /// Counters of queue `q` (zero for a passthrough queue: svq is not on its path).
    pub fn stats(&self, q: u32) -> Option<Vec<(&'static str, u64)>> {
        self.stats.iter().find(|(i, _)| *i == q).map(|(_, s)| s.snapshot())
    }

    /// Number of engine threads running (zero once closed).
    pub fn workers(&self) -> usize {
        self.engine.as_ref().map_or(0, Engine::lanes)
    }

    fn engine_for(&self, q: u32) -> Result<&Engine, SessionError> {
        let e = self.engine.as_ref().ok_or(SessionError::Closed)?;
        if self.mode(q).is_none() {
            return Err(SessionError::Invalid(format!("queue {q} is not served by this session")));
        }
        if !e.has_queue(q) {
            return Err(SessionError::Invalid(format!("queue {q} is not shadowed")));
        }
        Ok(e)
    }

    /// Injects elements (readable bytes, writable size) on shadowed queue `q`, all in
    /// flight at once; each slot completes with (length, written bytes) or an error.
    pub fn inject_many(&self, q: u32, elements: Vec<(Vec<u8>, u32)>) -> Result<Vec<Arc<InjectSlot>>, SessionError> {
        let slots: Vec<Arc<InjectSlot>> = elements.iter().map(|_| Arc::new(InjectSlot::default())).collect();
        self.submit_injected(q, elements, &slots)?;
        Ok(slots)
    }

    /// Like [`Session::inject_many`], completed through one [`InjectBatch`] whose eventfd
    /// is signalled as elements complete (for a waiter that must not block: an event loop).
    pub fn inject_batch(&self, q: u32, elements: Vec<(Vec<u8>, u32)>) -> Result<InjectBatch, SessionError> {
        self.engine_for(q)?;
        let batch = InjectBatch::new(elements.len()).map_err(os("eventfd"))?;
        self.submit_injected(q, elements, batch.slots())?;
        Ok(batch)
    }

    fn submit_injected(&self, q: u32, elements: Vec<(Vec<u8>, u32)>, slots: &[Arc<InjectSlot>]) -> Result<(), SessionError> {
        let engine = self.engine_for(q)?;
        let reqs = elements
            .into_iter()
            .zip(slots)
            .map(|((out, in_len), slot)| Request::Inject { queue: q, out, in_len, slot: slot.clone() })
            .collect();
        engine.submit(reqs);
        Ok(())
    }

    /// Waits for injected elements with one deadline for all of them; what did not
    /// complete by then is a [`SessionError::Timeout`].
    pub fn wait_all(q: u32, slots: &[Arc<InjectSlot>], timeout: Duration) -> Result<Vec<InjectResult>, SessionError> {
        Self::all_done(q, InjectSlot::wait_all_until(slots, Instant::now() + timeout), timeout)
    }

    /// The outcomes of elements waited for on queue `q` with one deadline (`timeout`
    /// from the start): all of them, or a [`SessionError::Timeout`] counting those
    /// without one.
    pub fn all_done(q: u32, outcomes: Vec<Option<InjectResult>>, timeout: Duration) -> Result<Vec<InjectResult>, SessionError> {
        let pending = outcomes.iter().filter(|r| r.is_none()).count();
        if pending > 0 {
            return Err(SessionError::Timeout { queue: q, pending, timeout });
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Attaches a hook to shadowed queue `q`. The hook sees every element popped after
    /// the returned slot completes (wait for it without holding anything the engine
    /// thread or a hook might need).
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

    /// Stops the session to hand its guest rings over to whoever serves them next (another
    /// device, a VMM, passthrough): suspends the device (or resets it where SUSPEND is
    /// not offered), gives back to each guest ring the chains the device did not take
    /// (the guest's avail index is rewound over them), completes with length 0 what the
    /// device took and did not complete, and closes. Returns where each served guest
    /// ring stands: nothing is in flight, so its used index equals its avail index.
    pub fn stop_saving(&mut self) -> Result<Vec<QueuePosition>, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        if self.engine.as_ref().is_some_and(Engine::on_engine_thread) {
            return Err(SessionError::Invalid("a session cannot be stopped for a hand-over from its own hook".into()));
        }
        let dev = self.device.clone();
        let can_suspend = crate::virtio::has(self.backend_features, crate::virtio::backend_feature::SUSPEND);
        let passthrough = self.passthrough_queues();
        if !passthrough.is_empty() && !can_suspend {
            return Err(SessionError::Negotiation("a passthrough ring's position can be saved only on a device that can SUSPEND".into()));
        }
        let suspended = can_suspend && dev.suspend().is_ok();
        if !passthrough.is_empty() && !suspended {
            return Err(SessionError::Negotiation("the device refused to SUSPEND: a passthrough ring's position cannot be saved".into()));
        }
        let mut queues = self.engine.take().map(Engine::stop).unwrap_or_default();
        let mut positions = Vec::new();
        for q in passthrough {
            // The device read the guest ring itself: its position is the guest's.
            let base = match dev.vring_base(q) {
                Ok(b) => b,
                Err(e) => {
                    drop(self.take_teardown().run(queues));
                    return Err(e.into());
                }
            };
            positions.push(QueuePosition { queue: q, avail: base, used: base });
        }
        for sq in &mut queues {
            sq.drain_used();
            // Without a suspend the device is reset: an in-order device took exactly what
            // it completed.
            let taken = if suspended { dev.vring_base(sq.index).ok() } else { None };
            sq.rewind_untaken(taken.unwrap_or_else(|| sq.shadow_used()));
        }
        let stopped = self.take_teardown().stop(queues, StopReason::Closed);
        positions.extend(stopped.positions);
        positions.sort_by_key(|p| p.queue);
        stopped.result.map(|()| positions)
    }

    /// Stops the engine, resets the device, returns every element in flight, unbinds
    /// every eventfd, unmaps everything and wakes every waiter. Memory the device might
    /// still reach (its reset was not acknowledged, or an unmap failed) is kept, never
    /// freed (see [`crate::live::quarantined_bytes`]). Idempotent; every step runs even
    /// when an earlier one fails, and the first error is returned.
    ///
    /// Safe from any thread, the engine's included (a hook closing its own session): the
    /// teardown then finishes on the engine thread once the hook returned, and this call
    /// returns at once.
    pub fn close(&mut self) -> Result<(), SessionError> {
        if self.closed {
            return Ok(());
        }
        let teardown = self.take_teardown();
        match self.engine.take() {
            Some(engine) if engine.on_engine_thread() => {
                engine.stop_from_engine_thread(Box::new(move |queues| drop(teardown.run(queues))));
                Ok(())
            }
            Some(engine) => teardown.run(engine.stop()),
            None => teardown.run(Vec::new()),
        }
    }
}

/// Where a session's guest side comes from.
pub(crate) enum GuestSource {
    /// svq creates guest memory and plays the guest (`SessionConfig::memory`).
    InProcess,
    /// A guest svq does not own.
    External(ExternalGuest),
    /// svq's own guest, moving in from a saved session (`Session::resume_saved`).
    Resumed(Box<Driver>),
}

impl GuestSource {
    fn into_driver(self) -> Option<Driver> {
        match self {
            GuestSource::Resumed(d) => Some(*d),
            _ => None,
        }
    }
}

/// Why a session did not start, and what comes back of a guest that was moving in.
pub(crate) struct StartFailed {
    pub(crate) error: SessionError,
    pub(crate) driver: Option<Driver>,
    /// Where its rings stand, when the session got as far as serving them.
    pub(crate) positions: Vec<(QueuePosition, Vec<u16>)>,
}

impl Session {
    /// Takes out of the session everything a teardown releases (and marks it closed).
    fn take_teardown(&mut self) -> Teardown {
        self.closed = true;
        Teardown {
            device: self.device.clone(),
            dma: self.dma.clone(),
            claim: self.claim.take(),
            queues: self.modes.iter().map(|(q, _)| *q).collect(),
            ring_mem: std::mem::take(&mut self.ring_mem),
            driver: self.driver.take(),
            guest_mem: self.guest_mem.take(),
            guest_queues: std::mem::take(&mut self.guest_queues),
            capture: self.capture.take(),
        }
    }
}

/// A shadow ring: svq's memory the device reads, and the two mappings (read-only
/// descriptors and avail, writable used) through which it does.
#[derive(Debug)]
pub(crate) struct ShadowRing {
    pub(crate) queue: u32,
    pub(crate) mem: GuestMemory,
    pub(crate) iovas: [u64; 2],
}

/// Where a guest ring stands after its session stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePosition {
    /// The queue.
    pub queue: u32,
    /// The next avail index to pop (`VHOST_GET_VRING_BASE`).
    pub avail: u16,
    /// The used index published.
    pub used: u16,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests;
