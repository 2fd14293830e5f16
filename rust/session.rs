//! A session: one device negotiated, guest memory mapped, every queue set up either in
//! passthrough (the device reads the guest ring at the IOVA of guest memory) or shadowed
//! in translate mode, and the engine running. Closing it undoes every step, also after a
//! failure half-way through starting.

use std::os::fd::AsFd;
use std::sync::Arc;

use nix::errno::Errno;

use crate::device::{backend_feature as bf, status, Device, DeviceError, IotlbOp, Perm};
use crate::driver::{Driver, DriverError, GuestQueue};
use crate::engine::Engine;
use crate::eventfd::EventFd;
use crate::iova::{IovaAllocator, IovaError, Mapping, PAGE_SIZE};
use crate::mem::{GuestMemory, MemError};
use crate::ring::layout::{align_up, RingLayout, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::ring::{RingReader, RingWriter, Vring};
use crate::shadow::{QueueStats, RegionIova, ShadowFds, ShadowQueue};

/// How a queue reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The device reads the guest ring directly (guest memory mapped at IOVA = guest
    /// address): the baseline every overhead figure is measured against.
    Passthrough,
    /// svq forwards the guest's chains on a shadow ring, addresses translated to IOVAs.
    Translate,
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Mode of every queue.
    pub mode: Mode,
    /// Queue size (capped at the device's maximum).
    pub queue_size: u16,
    /// Guest memory regions as (guest address, size).
    pub memory: Vec<(u64, u64)>,
    /// Use EVENT_IDX where possible.
    pub event_idx: bool,
    /// Offer INDIRECT_DESC to the guest (in passthrough only if the device offers it).
    pub indirect: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { mode: Mode::Translate, queue_size: 256, memory: vec![(0x4000_0000, 32 << 20)], event_idx: true, indirect: false }
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
    /// No IOVA space for a mapping.
    #[error(transparent)]
    Iova(#[from] IovaError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// The device lacks something svq needs, or refused the features.
    #[error("feature negotiation: {0}")]
    Negotiation(String),
    /// An eventfd or thread could not be created.
    #[error("{op}: {errno}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        errno: Errno,
    },
    /// The session was closed.
    #[error("session is closed")]
    Closed,
}

fn os(op: &'static str) -> impl Fn(Errno) -> SessionError {
    move |errno| SessionError::Os { op, errno }
}

/// Features svq can drive, per device class (virtio spec 5.1.3, 5.2.3).
const NET_FEATURES: u64 = (1 << 3) | (1 << 5) | (1 << 16) | (1 << 17) | (1 << 23) | (1 << 27);
const BLK_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9);
const WANTED_BACKEND: u64 =
    (1 << bf::IOTLB_MSG_V2) | (1 << bf::IOTLB_BATCH) | (1 << bf::IOTLB_ASID) | (1 << bf::SUSPEND) | (1 << bf::RESUME);

/// A device set up for use.
#[derive(Debug)]
pub struct Session {
    device: Arc<dyn Device>,
    mode: Mode,
    features: u64,
    backend_features: u64,
    num_queues: u32,
    driver: Option<Driver>,
    iova: IovaAllocator,
    /// Mappings live on the device, with their address space.
    maps: Vec<(u32, Mapping)>,
    /// Host memory of the shadow rings.
    ring_mem: Vec<GuestMemory>,
    engine: Option<Engine>,
    /// Shadow queues built but not handed to an engine yet (only during start).
    stats: Vec<Arc<QueueStats>>,
    closed: bool,
}

impl Session {
    /// Resets and negotiates `device`, maps guest memory, sets up every queue and starts.
    pub fn start(device: Arc<dyn Device>, cfg: &SessionConfig) -> Result<Self, SessionError> {
        let (first, last) = device.iova_range()?;
        let mut s = Session {
            device,
            mode: cfg.mode,
            features: 0,
            backend_features: 0,
            num_queues: 0,
            driver: None,
            iova: IovaAllocator::new(first, last)?,
            maps: Vec::new(),
            ring_mem: Vec::new(),
            engine: None,
            stats: Vec::new(),
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

    fn setup(&mut self, cfg: &SessionConfig) -> Result<(), SessionError> {
        let dev = self.device.clone();
        dev.set_status(0)?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        let offered = dev.features()?;
        let required = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);
        if offered & required != required {
            return Err(SessionError::Negotiation(format!("device features {offered:#x} lack VERSION_1 or ACCESS_PLATFORM")));
        }
        let class = match dev.device_id()? {
            crate::device::device_id::NET => NET_FEATURES,
            crate::device::device_id::BLOCK => BLK_FEATURES,
            id => return Err(SessionError::Negotiation(format!("device id {id} is not virtio-net or virtio-blk"))),
        };
        let mut wanted = required | class;
        if cfg.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if cfg.mode == Mode::Passthrough && cfg.indirect {
            wanted |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        self.features = offered & wanted;
        self.backend_features = dev.backend_features()? & WANTED_BACKEND;
        dev.set_backend_features(self.backend_features)?;
        dev.set_features(self.features)?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)?;
        if dev.status()? & status::FEATURES_OK == 0 {
            return Err(SessionError::Negotiation(format!("device refused features {:#x}", self.features)));
        }

        // The guest's rings: in passthrough the device reads them, so they may use only
        // what the device negotiated; shadowed, svq serves them and offers both.
        let has = |bit: u32| self.features & (1u64 << bit) != 0;
        let (guest_event_idx, guest_indirect) = match cfg.mode {
            Mode::Passthrough => (has(VIRTIO_RING_F_EVENT_IDX), has(VIRTIO_RING_F_INDIRECT_DESC)),
            Mode::Translate => (cfg.event_idx, cfg.indirect),
        };
        self.num_queues = dev.num_queues()?;
        let size = cfg.queue_size.min(dev.max_queue_size()?);
        let mem = Arc::new(GuestMemory::new(&cfg.memory)?);
        let driver = Driver::new(mem.clone(), &vec![size; self.num_queues as usize], guest_event_idx, guest_indirect)?;
        let guest_queues = driver.guest_queues();
        self.driver = Some(driver);

        // Guest memory for the device: at IOVA = guest address in passthrough, wherever
        // the allocator places it when translating.
        let mut regions = Vec::new();
        let mut ops = Vec::new();
        for r in mem.regions() {
            let m = match cfg.mode {
                Mode::Passthrough => self.iova.insert(r.gpa, r.size, r.host_addr(), Some(r.gpa), Perm::ReadWrite)?,
                Mode::Translate => self.iova.alloc(r.size, r.host_addr(), Some(r.gpa), Perm::ReadWrite)?,
            };
            regions.push(RegionIova { gpa: r.gpa, size: r.size, iova: m.iova });
            ops.push(IotlbOp::Update { iova: m.iova, size: m.size, uaddr: m.host_addr, perm: m.perm });
            self.maps.push((0, m));
        }
        dev.iotlb(0, &ops)?;

        let mut shadows = Vec::new();
        for gq in &guest_queues {
            let stats = Arc::new(QueueStats::default());
            self.stats.push(stats.clone());
            dev.set_vring_num(gq.index, size)?;
            dev.set_vring_base(gq.index, 0)?;
            match cfg.mode {
                Mode::Passthrough => {
                    dev.set_vring_addr(gq.index, gq.desc, gq.avail, gq.used)?;
                    dev.set_vring_kick(gq.index, Some(gq.kick.as_fd()))?;
                    dev.set_vring_call(gq.index, Some(gq.call.as_fd()))?;
                }
                Mode::Translate => shadows.push(self.shadow_queue(gq, &mem, &regions, stats)?),
            }
        }
        let config_call = EventFd::new().map_err(os("eventfd"))?;
        dev.set_config_call(Some(config_call.as_fd()))?;
        for q in 0..self.num_queues {
            dev.set_vring_enable(q, true)?;
        }
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK)?;
        let health = guest_queues.iter().map(|g| (g.health.clone(), g.call.clone())).collect();
        self.engine = Some(Engine::start(shadows, dev, config_call, health).map_err(os("start engine"))?);
        Ok(())
    }

    /// Builds the shadow ring of one queue: host memory mapped for the device (descriptors
    /// and avail read-only, used writable), eventfds bound, and the shadow queue itself.
    fn shadow_queue(
        &mut self,
        gq: &GuestQueue,
        mem: &Arc<GuestMemory>,
        regions: &[RegionIova],
        stats: Arc<QueueStats>,
    ) -> Result<ShadowQueue, SessionError> {
        let dev = self.device.clone();
        let layout = gq.layout;
        let ro_len = align_up(layout.desc_bytes() + layout.avail_bytes(), PAGE_SIZE);
        let rw_len = align_up(layout.used_bytes(), PAGE_SIZE);
        let ring_mem = GuestMemory::new(&[(0, ro_len + rw_len)])?;
        let host = ring_mem.regions()[0].host_addr();
        self.ring_mem.push(ring_mem);
        let ro = self.iova.alloc(ro_len, host, None, Perm::ReadOnly)?;
        self.maps.push((0, ro));
        let rw = self.iova.alloc(rw_len, host + ro_len, None, Perm::ReadWrite)?;
        self.maps.push((0, rw));
        dev.iotlb(0, &[
            IotlbOp::Update { iova: ro.iova, size: ro.size, uaddr: ro.host_addr, perm: ro.perm },
            IotlbOp::Update { iova: rw.iova, size: rw.size, uaddr: rw.host_addr, perm: rw.perm },
        ])?;
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
        Ok(ShadowQueue::new(gq.index, guest, shadow, mem.clone(), regions.to_vec(), fds, stats, gq.health.clone()))
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    /// The queues' mode.
    pub fn mode(&self) -> Mode {
        self.mode
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

    /// The in-process guest driver.
    pub fn driver(&mut self) -> Result<&mut Driver, SessionError> {
        self.driver.as_mut().ok_or(SessionError::Closed)
    }

    /// Counters of queue `q` (zero in passthrough: svq is not on the path).
    pub fn stats(&self, q: u32) -> Option<Vec<(&'static str, u64)>> {
        self.stats.get(q as usize).map(|s| s.snapshot())
    }

    /// Mappings svq has live on the device.
    pub fn live_mappings(&self) -> usize {
        self.maps.len()
    }

    /// The live mappings with their address space, in the order they were made.
    pub fn mappings(&self) -> &[(u32, Mapping)] {
        &self.maps
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

    /// Stops the engine, resets the device, unbinds every eventfd and unmaps everything.
    /// Idempotent; every step runs even when an earlier one fails, and the first error is
    /// returned.
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
        let queues = self.engine.take().map(Engine::stop).unwrap_or_default();
        let dev = self.device.clone();
        // Reset first: the device stops touching memory before it is unmapped.
        keep(dev.set_status(0).map_err(Into::into));
        for q in 0..self.num_queues {
            keep(dev.set_vring_kick(q, None).map_err(Into::into));
            keep(dev.set_vring_call(q, None).map_err(Into::into));
        }
        keep(dev.set_config_call(None).map_err(Into::into));
        let mut by_asid: std::collections::BTreeMap<u32, Vec<IotlbOp>> = Default::default();
        for (asid, m) in self.maps.drain(..) {
            by_asid.entry(asid).or_default().push(IotlbOp::Invalidate { iova: m.iova, size: m.size });
            let _ = self.iova.remove(m.iova);
        }
        for (asid, ops) in by_asid {
            keep(dev.iotlb(asid, &ops).map_err(Into::into));
        }
        drop(queues);
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

/// The layout a shadowed queue of `size` needs (exposed for tests and docs).
pub fn shadow_ring_bytes(size: u16) -> Option<u64> {
    let l = RingLayout::new(size)?;
    Some(align_up(l.desc_bytes() + l.avail_bytes(), PAGE_SIZE) + align_up(l.used_bytes(), PAGE_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::sim::SimDevice;
    use std::time::Duration;

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
        if mode == Mode::Translate {
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
}
