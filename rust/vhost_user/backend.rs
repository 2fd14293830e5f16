//! The vhost-user backend's requests, one VMM connection at a time: rust-vmm's `vhost`
//! crate reads and answers the wire protocol, this handler keeps what the VMM configured
//! (features, memory table, rings) and runs a [`Session`] with the VMM's guest as an
//! external front whenever the VMM starts the device.
//!
//! Every value is checked before it is kept: a request refused with an error reply
//! leaves the state as it was.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;

use crate::capture::{Capture, CaptureConfig, CaptureReport};
use crate::device::Device;
use crate::dirty::DirtyLog;
use crate::front::external::{ExternalGuest, ExternalMemory, ExternalQueue};
use crate::mem::{FileRegion, GuestMemory};
use crate::session::{
    guest_offer, interface_description, interface_name, wait_attached, Mode, QueuePosition, Session, SessionConfig, SessionError,
};
use crate::virtio::{device_id, feature, has, net_feature, status};

type Result<T> = vhost::vhost_user::Result<T>;

/// A refusal: the crate answers it with an error ack when the VMM asked for one.
fn refuse<T>(why: impl Into<String>) -> Result<T> {
    Err(vhost::vhost_user::Error::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, why.into())))
}

/// virtio-net features a vhost-user net backend leaves to the VMM: the VMM emulates the
/// control queue itself.
const VMM_NET_FEATURES: u64 = (1 << net_feature::CTRL_VQ)
    | (1 << net_feature::CTRL_RX)
    | (1 << net_feature::CTRL_VLAN)
    | (1 << net_feature::CTRL_RX_EXTRA)
    | (1 << net_feature::GUEST_ANNOUNCE)
    | (1 << net_feature::CTRL_MAC_ADDR)
    | (1 << net_feature::CTRL_GUEST_OFFLOADS)
    | (1 << net_feature::MQ);

/// vhost-user protocol features offered: MQ (GET_QUEUE_NUM), REPLY_ACK, STATUS
/// (GET/SET_STATUS, answered by [`super::intercept`]) and LOG_SHMFD (the dirty log in a
/// file the VMM shares, which live migration needs).
pub(super) fn protocol_offer() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// One guest ring as the VMM configured it.
#[derive(Debug, Default)]
struct VuQueue {
    num: Option<u16>,
    /// (desc, avail, used) in the VMM's virtual addresses.
    addr: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    err: Option<OwnedFd>,
    enabled: bool,
}

/// The VMM's memory table: mapped once, and where each region sits in the VMM.
#[derive(Debug)]
struct MemTable {
    memory: Arc<GuestMemory>,
    /// (guest address, size, VMM virtual address) per region.
    regions: Vec<(u64, u64, u64)>,
}

impl MemTable {
    /// The guest address of VMM virtual address `va`.
    fn gpa(&self, va: u64) -> Option<u64> {
        self.regions.iter().find(|(_, size, ua)| va >= *ua && va - ua < *size).map(|(gpa, _, ua)| gpa + (va - ua))
    }
}

/// What one VMM connection configured.
#[derive(Debug, Default)]
struct Connection {
    owner: bool,
    features: u64,
    protocol: u64,
    status: u8,
    mem: Option<MemTable>,
    queues: Vec<VuQueue>,
    /// The VMM's dirty log (SET_LOG_BASE), written while it asks for LOG_ALL.
    log: Option<Arc<DirtyLog>>,
}

/// The backend: the device, what is offered, and the current connection's state.
#[derive(Debug)]
pub(crate) struct VuBackend {
    device: Arc<dyn Device>,
    offer: u64,
    cfg: SessionConfig,
    max_queue_size: u16,
    /// Queues a VMM may configure (the data queues for net).
    queue_count: u32,
    /// What GET_QUEUE_NUM answers (queue pairs for net, queues for blk).
    queue_num: u64,
    conn: Connection,
    session: Option<Session>,
    /// The packet capture every session's data queues record into.
    pub(super) capture: Option<Arc<Capture>>,
    /// Recent refusals and failures, newest last (for `svq ctl health`).
    pub(super) events: Vec<String>,
    pub(super) sessions_started: u64,
}

impl VuBackend {
    pub(super) fn new(device: Arc<dyn Device>, cfg: SessionConfig) -> std::result::Result<Self, crate::session::SessionError> {
        let device_id = device.device_id()?;
        let features = device.features()?;
        // LOG_ALL: svq logs every guest page written on the device's behalf (switching a
        // passthrough device to the shadow while the VMM wants the log).
        let mut offer = guest_offer(device_id, features)? | (1 << feature::VHOST_USER_PROTOCOL_FEATURES) | (1 << feature::VHOST_LOG_ALL);
        if cfg.mode == Mode::Passthrough || cfg.queue_modes.iter().any(|(_, m)| *m == Mode::Passthrough) {
            // The device reads the guest's rings: only the ring formats it knows.
            let ring = (1 << feature::RING_EVENT_IDX) | (1 << feature::RING_INDIRECT_DESC);
            offer &= !ring | features;
        }
        let (queue_count, queue_num) = match device_id {
            device_id::NET => {
                offer &= !VMM_NET_FEATURES;
                (2, 1)
            }
            _ => {
                let n = device.num_queues()?;
                (n, u64::from(n))
            }
        };
        let max_queue_size = device.max_queue_size()?;
        Ok(VuBackend {
            device,
            offer,
            cfg,
            max_queue_size,
            queue_count,
            queue_num,
            conn: Connection::default(),
            session: None,
            capture: None,
            events: Vec::new(),
            sessions_started: 0,
        })
    }

    /// Records an event for `svq ctl health` (the last few are kept).
    pub(super) fn note(&mut self, what: String) {
        if self.events.len() >= 32 {
            self.events.remove(0);
        }
        self.events.push(what);
    }

    /// A new VMM connected: nothing of the last one is kept.
    pub(super) fn connected(&mut self) {
        self.stop_session();
        self.conn = Connection { queues: (0..self.queue_count).map(|_| VuQueue::default()).collect(), ..Connection::default() };
    }

    /// The VMM went away: the device stops, the memory table is dropped.
    pub(super) fn disconnected(&mut self) {
        self.stop_session();
        self.conn = Connection::default();
    }

    /// The running session, for statistics and health.
    pub(super) fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Whether a VMM is connected and owns the backend.
    pub(super) fn owned(&self) -> bool {
        self.conn.owner
    }

    /// The features the VMM acked, and the memory table's size.
    pub(super) fn connection_info(&self) -> (u64, u64, u8, u64) {
        let bytes = self.conn.mem.as_ref().map_or(0, |m| m.memory.total_bytes());
        (self.conn.features, self.conn.protocol, self.conn.status, bytes)
    }

    /// The device's status as the VMM sees it (GET_STATUS).
    pub(super) fn status(&self) -> u8 {
        self.conn.status
    }

    /// SET_STATUS: DRIVER_OK starts the device; 0 stops it, keeping the rings' positions
    /// for GET_VRING_BASE (a VMM resets the status before it asks for them).
    pub(super) fn set_status(&mut self, new: u8) -> std::result::Result<(), String> {
        if new & status::DRIVER_OK == 0 {
            self.stop_session();
        }
        self.conn.status = new;
        if new & status::DRIVER_OK != 0 {
            self.maybe_start()?;
        }
        Ok(())
    }

    fn queue(&mut self, index: u32) -> Result<&mut VuQueue> {
        let n = self.queue_count;
        match self.conn.queues.get_mut(index as usize) {
            Some(q) => Ok(q),
            None => refuse(format!("queue {index} does not exist (the backend has {n})")),
        }
    }

    fn running(&self) -> bool {
        self.session.is_some()
    }

    /// Stops the session, keeping where each guest ring stands.
    fn stop_session(&mut self) {
        let Some(mut s) = self.session.take() else { return };
        match s.stop_saving() {
            Ok(positions) => {
                let at: Vec<String> = positions.iter().map(|p| format!("{}@{}", p.queue, p.avail)).collect();
                self.note(format!("device stopped (rings {})", at.join(" ")));
                for QueuePosition { queue, avail, .. } in positions {
                    if let Some(q) = self.conn.queues.get_mut(queue as usize) {
                        q.base = avail;
                    }
                }
            }
            Err(e) => self.note(format!("stopping the device: {e}")),
        }
    }

    /// The queues a session would serve, once every ring the VMM enabled (or, without
    /// PROTOCOL_FEATURES, gave addresses) is complete: size, addresses and kick.
    fn ready_queues(&self) -> Option<Vec<u32>> {
        let with_enable = has(self.conn.features, feature::VHOST_USER_PROTOCOL_FEATURES);
        let wanted: Vec<(u32, &VuQueue)> = self
            .conn
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| if with_enable { q.enabled } else { q.addr.is_some() })
            .map(|(i, q)| (i as u32, q))
            .collect();
        let complete = |q: &VuQueue| q.num.is_some() && q.addr.is_some() && q.kick.is_some();
        (!wanted.is_empty() && wanted.iter().all(|(_, q)| complete(q))).then(|| wanted.iter().map(|(i, _)| *i).collect())
    }

    /// Starts the session once the VMM said DRIVER_OK (with STATUS), or once every ring it
    /// uses is complete (without).
    fn maybe_start(&mut self) -> std::result::Result<(), String> {
        if self.running() || self.conn.mem.is_none() {
            return Ok(());
        }
        let with_status = self.conn.protocol & VhostUserProtocolFeatures::STATUS.bits() != 0;
        if with_status && self.conn.status & status::DRIVER_OK == 0 {
            return Ok(());
        }
        let Some(ready) = self.ready_queues() else { return Ok(()) };
        let guest = self.guest(&ready)?;
        match Session::start_external(self.device.clone(), &self.cfg, guest) {
            Ok(s) => {
                self.session = Some(s);
                self.sessions_started += 1;
                let at: Vec<String> = ready.iter().map(|&q| format!("{q}@{}", self.conn.queues[q as usize].base)).collect();
                self.note(format!("device started (rings {})", at.join(" ")));
                if let Err(e) = self.attach_capture() {
                    self.note(format!("packet capture: {e}"));
                }
                if self.log_all() {
                    self.apply_logging()?;
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("starting the device: {e}");
                self.note(why.clone());
                Err(why)
            }
        }
    }

    /// The VMM's guest as an external front.
    fn guest(&self, ready: &[u32]) -> std::result::Result<ExternalGuest, String> {
        let mem = self.conn.mem.as_ref().ok_or("no memory table")?;
        let mut queues = Vec::with_capacity(ready.len());
        for &i in ready {
            let q = &self.conn.queues[i as usize];
            let (Some(num), Some((desc, avail, used)), Some(kick)) = (q.num, q.addr, q.kick.as_ref()) else { continue };
            let gpa = |va: u64, part: &str| mem.gpa(va).ok_or_else(|| format!("queue {i}: {part} at {va:#x} is outside the memory table"));
            let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("queue {i}: {e}"));
            // Without a call fd the VMM polls the used ring: svq signals a private eventfd.
            let call = match &q.call {
                Some(c) => dup(c)?,
                None => crate::eventfd::EventFd::new().map_err(|e| format!("eventfd: {e}"))?.into_owned(),
            };
            queues.push(ExternalQueue {
                index: i,
                size: num,
                desc: gpa(desc, "descriptor table")?,
                avail: gpa(avail, "avail ring")?,
                used: gpa(used, "used ring")?,
                kick: dup(kick)?,
                call,
                base: q.base,
            });
        }
        let features = self.conn.features & !((1 << feature::VHOST_USER_PROTOCOL_FEATURES) | (1 << feature::VHOST_LOG_ALL));
        Ok(ExternalGuest { memory: ExternalMemory::Mapped(mem.memory.clone()), queues, features })
    }

    /// A ring changed while the device runs: restart it with the new configuration (the
    /// rings' positions carry over).
    fn reconfigured(&mut self) -> Result<()> {
        if self.running() {
            self.stop_session();
        }
        self.maybe_start().or_else(refuse)
    }

    /// Whether the VMM wants every written page logged.
    fn log_all(&self) -> bool {
        has(self.conn.features, feature::VHOST_LOG_ALL)
    }

    /// Brings the running device in line with LOG_ALL: while the VMM wants the log, every
    /// queue is shadowed (a passthrough queue switches live, as a hypervisor does with a
    /// vDPA NIC it migrates) and logs into the VMM's bitmap; once it stops wanting it
    /// (the migration ended or was cancelled), the log is detached and the queues go
    /// back to the modes they were served in.
    fn apply_logging(&mut self) -> std::result::Result<(), String> {
        let log_all = self.log_all();
        let log = self.conn.log.clone();
        let Some(served) = self.session.as_ref().map(|s| s.modes().to_vec()) else { return Ok(()) };
        let configured: Vec<Mode> = served.iter().map(|(q, _)| self.mode_of(*q)).collect();
        let Some(s) = self.session.as_mut() else { return Ok(()) };
        if log_all {
            let pass: Vec<u32> = served.iter().filter(|(_, m)| *m == Mode::Passthrough).map(|(q, _)| *q).collect();
            if !pass.is_empty() {
                s.switch(&pass, Mode::Translate).map_err(|e| format!("switching to the shadow for LOG_ALL: {e}"))?;
            }
            s.set_dirty_log(log).map_err(|e| format!("attaching the dirty log: {e}"))?;
        } else if s.dirty_log().is_some() {
            s.set_dirty_log(None).map_err(|e| format!("detaching the dirty log: {e}"))?;
            let back: Vec<u32> = served
                .iter()
                .zip(&configured)
                .filter(|((_, now), configured)| *now != Mode::Passthrough && **configured == Mode::Passthrough)
                .map(|((q, _), _)| *q)
                .collect();
            if !back.is_empty() {
                s.switch(&back, Mode::Passthrough).map_err(|e| format!("switching back to passthrough: {e}"))?;
            }
        }
        Ok(())
    }

    /// Captures the shadowed data queues of every session from now on into a new pcapng
    /// file at `path` (one interface per queue, kept across sessions).
    pub(super) fn start_capture(&mut self, path: &Path, cfg: CaptureConfig) -> std::result::Result<(), SessionError> {
        if self.capture.as_ref().is_some_and(|c| !c.report().finished) {
            return Err(SessionError::Invalid("the server captures already".into()));
        }
        if self.device.device_id()? != device_id::NET {
            return Err(SessionError::Invalid("packet capture needs a virtio-net device".into()));
        }
        let queues: Vec<u32> = (0..self.queue_count).filter(|&q| self.mode_of(q) != Mode::Passthrough).collect();
        if queues.is_empty() {
            return Err(SessionError::Invalid(
                "every data queue is in passthrough mode: svq is not on its path, so it cannot capture them (use mode translate or copy)"
                    .into(),
            ));
        }
        let interfaces: Vec<(String, String)> = queues.iter().map(|&q| (interface_name(q), interface_description(q))).collect();
        self.capture = Some(Arc::new(Capture::create(path, &interfaces, cfg)?));
        if let Err(e) = self.attach_capture() {
            // The running session could not take it: no capture at all, and the caller knows.
            if let Some(c) = self.capture.take() {
                c.finish();
            }
            return Err(e);
        }
        Ok(())
    }

    /// Attaches the capture to the running session's data queues, if there are both.
    fn attach_capture(&mut self) -> std::result::Result<(), SessionError> {
        let (Some(c), Some(s)) = (self.capture.clone(), self.session.as_mut()) else { return Ok(()) };
        if c.report().finished {
            return Ok(());
        }
        let (_, slots) = s.attach_capture(&c)?;
        wait_attached(&slots, std::time::Duration::from_secs(10))
    }

    /// Completes the capture file, first detaching it from the running session (so that
    /// a later capture can attach); what it did, or None without a capture.
    pub(super) fn finish_capture(&mut self) -> Option<CaptureReport> {
        if let Some(s) = self.session.as_mut().filter(|s| s.capture().is_some()) {
            let _ = s.stop_capture();
        }
        self.capture.as_ref().map(|c| c.finish())
    }

    fn mode_of(&self, q: u32) -> Mode {
        self.cfg.queue_modes.iter().find(|(i, _)| *i == q).map_or(self.cfg.mode, |(_, m)| *m)
    }
}

impl VhostUserBackendReqHandlerMut for VuBackend {
    fn set_owner(&mut self) -> Result<()> {
        if self.conn.owner {
            return refuse("the backend already has an owner");
        }
        self.conn.owner = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.connected();
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        self.connected();
        self.conn.owner = true;
        Ok(())
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.offer)
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        let extra = features & !self.offer;
        if extra != 0 {
            return refuse(format!("features {extra:#x} were not offered"));
        }
        let log_all = 1u64 << feature::VHOST_LOG_ALL;
        if self.running() && (features ^ self.conn.features) & !log_all != 0 {
            return refuse("only LOG_ALL may change while the device runs");
        }
        if features & log_all != 0 && self.conn.log.is_none() {
            return refuse("LOG_ALL without a dirty log (SET_LOG_BASE first)");
        }
        self.conn.features = features;
        self.apply_logging().or_else(refuse)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if self.running() {
            return refuse("the memory table cannot change while the device runs");
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut table = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            // The message's fields are packed: copied out before use.
            let (gpa, size, user_addr, offset) = (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
            if table.iter().any(|&(_, s, ua): &(u64, u64, u64)| user_addr < ua + s && ua < user_addr.saturating_add(size)) {
                return refuse(format!("region at VMM address {user_addr:#x} overlaps another"));
            }
            table.push((gpa, size, user_addr));
            regions.push(FileRegion { gpa, size, fd: OwnedFd::from(file), offset });
        }
        let memory = match GuestMemory::from_files(regions) {
            Ok(m) => m,
            Err(e) => return refuse(format!("memory table: {e}")),
        };
        self.conn.mem = Some(MemTable { memory: Arc::new(memory), regions: table });
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let passthrough = self.mode_of(index) == Mode::Passthrough;
        let max = self.max_queue_size;
        let size = match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && (!passthrough || n <= max) => n,
            _ if passthrough && num.is_power_of_two() => {
                return refuse(format!("queue {index}: size {num} is larger than the device's {max} (passthrough)"))
            }
            _ => return refuse(format!("queue {index}: size {num} is not a power of two in 1..=32768")),
        };
        self.queue(index)?.num = Some(size);
        self.reconfigured()
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        if flags.bits() & !VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits() != 0 {
            return refuse(format!("queue {index}: unknown address flags {:#x}", flags.bits()));
        }
        // Ring addresses are the VMM's virtual addresses: only the memory table says
        // what they are.
        let Some(mem) = &self.conn.mem else { return refuse(format!("queue {index}: ring addresses before the memory table")) };
        for (va, part) in [(descriptor, "descriptor table"), (available, "avail ring"), (used, "used ring")] {
            if mem.gpa(va).is_none() {
                return refuse(format!("queue {index}: {part} at {va:#x} is outside the memory table"));
            }
        }
        let q = self.queue(index)?;
        if q.addr == Some((descriptor, available, used)) {
            // The same ring (a VMM sets the LOG flag this way when migration starts): the
            // used ring is logged by its guest address already.
            return Ok(());
        }
        q.addr = Some((descriptor, available, used));
        self.reconfigured()
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        let Ok(base) = u16::try_from(base) else { return refuse(format!("queue {index}: base {base} is not a 16-bit index")) };
        self.queue(index)?;
        // A running device stops first (keeping the other rings' positions).
        self.stop_session();
        self.queue(index)?.base = base;
        self.maybe_start().or_else(refuse)
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.queue(index)?;
        // The ring stops: the device is stopped (every ring at once, as VMMs stop them
        // all), and this ring is not served again until the VMM kicks it anew.
        self.stop_session();
        let q = self.queue(index)?;
        q.kick = None;
        let base = q.base;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let fd = checked_eventfd(fd, index, "kick")?;
        self.queue(u32::from(index))?.kick = fd;
        self.reconfigured()
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let fd = checked_eventfd(fd, index, "call")?;
        self.queue(u32::from(index))?.call = fd;
        if self.running() {
            return self.reconfigured();
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        let fd = checked_eventfd(fd, index, "err")?;
        self.queue(u32::from(index))?.err = fd;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(protocol_offer())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        let offered = protocol_offer().bits() | VhostUserProtocolFeatures::REPLY_ACK.bits();
        if features & !offered != 0 {
            return refuse(format!("protocol features {:#x} were not offered", features & !offered));
        }
        self.conn.protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.queue_num)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        let q = self.queue(index)?;
        if q.enabled == enable {
            return Ok(());
        }
        q.enabled = enable;
        // Enables arrive before anything else is configured: only a running device reacts.
        if self.running() {
            return self.reconfigured();
        }
        self.maybe_start().or_else(refuse)
    }

    fn get_config(&mut self, _offset: u32, _size: u32, _flags: VhostUserConfigFlags) -> Result<Vec<u8>> {
        refuse("config space is not offered (CONFIG)")
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        refuse("config space is not offered (CONFIG)")
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        refuse("not a GPU")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        refuse("shared objects are not offered")
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        refuse("INFLIGHT_SHMFD is not offered")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        refuse("INFLIGHT_SHMFD is not offered")
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        refuse("CONFIGURE_MEM_SLOTS is not offered")
    }

    fn add_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion, _fd: File, _postcopy: Option<bool>) -> Result<Option<u64>> {
        refuse("CONFIGURE_MEM_SLOTS is not offered")
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        refuse("CONFIGURE_MEM_SLOTS is not offered")
    }

    fn set_device_state_fd(&mut self, _d: VhostTransferStateDirection, _p: VhostTransferStatePhase, _fd: File) -> Result<Option<File>> {
        refuse("DEVICE_STATE is not offered")
    }

    fn check_device_state(&mut self) -> Result<()> {
        refuse("DEVICE_STATE is not offered")
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        refuse("SHMEM is not offered")
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let log = match DirtyLog::from_file(OwnedFd::from(file), size, offset) {
            Ok(l) => Arc::new(l),
            Err(e) => return refuse(format!("dirty log: {e}")),
        };
        // A new log replaces the old one (a VMM resizes it this way).
        self.conn.log = Some(log);
        self.apply_logging().or_else(refuse)
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}
}

/// An eventfd the VMM passed, or None for "no fd".
fn checked_eventfd(fd: Option<File>, index: u8, what: &str) -> Result<Option<OwnedFd>> {
    let Some(f) = fd else { return Ok(None) };
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap_or_default();
    if link.to_str() != Some("anon_inode:[eventfd]") {
        return refuse(format!("queue {index}: the {what} fd is not an eventfd"));
    }
    Ok(Some(OwnedFd::from(f)))
}
