//! Starting a session: the device reset and negotiated, the guest side set up, guest
//! memory mapped, every queue pointed at the guest ring (passthrough) or at a shadow ring
//! of svq's own, the device started, a saved state restored, the data queues enabled.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use super::placement::Plan;
use super::{os, GuestSource, Mode, Session, SessionConfig, SessionError, ShadowRing};
use crate::bounce::{BouncePool, Strategy};
use crate::dma::MapRequest;
use crate::engine::Engine;
use crate::eventfd::EventFd;
use crate::front::driver::Driver;
use crate::front::{Guest, GuestQueue};
use crate::mem::GuestMemory;
use crate::net::NetState;
use crate::ring::layout::align_up;
use crate::ring::{RingLayout, RingReader, RingWriter};
use crate::shadow::cvq::{CvqCounters, CvqTracker};
use crate::shadow::{BounceSpace, Forwarding, QueueStats, RegionIova, ShadowFds, ShadowParts, ShadowQueue};
use crate::virtio::{backend_feature as bf, feature, status, Perm, PAGE_SIZE};

impl Session {
    pub(super) fn setup(&mut self, cfg: &SessionConfig, source: GuestSource) -> Result<(), SessionError> {
        // A guest handed over is checked (and its memory mapped) before the device is touched.
        let external = match source {
            GuestSource::External(g) => Some(g.attach()?),
            GuestSource::Resumed(driver) => {
                let queues = driver.guest_queues();
                // A queue that broke on the old device starts afresh on this one.
                queues.iter().for_each(|q| q.health.clear());
                let features = cfg.resume.as_ref().map_or(0, |s| s.features);
                let memory = driver.memory().clone();
                self.driver = Some(*driver);
                Some(Guest { memory, queues, features })
            }
            GuestSource::InProcess => None,
        };
        let dev = self.device.clone();
        dev.set_status(0)?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER)?;
        self.device_queues = dev.num_queues()?;
        let offered_backend = dev.backend_features()?;
        // Back-end features are acked only as used: ASID when the control queue may get
        // its own address space, ENABLE_AFTER_DRIVER_OK when data queues wait for restore.
        let mut want_backend = (1 << bf::IOTLB_MSG_V2) | (1 << bf::IOTLB_BATCH) | (1 << bf::SUSPEND) | (1 << bf::RESUME);
        if cfg.isolate_cvq {
            want_backend |= 1 << bf::IOTLB_ASID;
        }
        // Queues enabled after DRIVER_OK: the data queues wait for a restore, and a live
        // switch re-enables a queue on its new ring.
        want_backend |= 1 << bf::ENABLE_AFTER_DRIVER_OK;
        let id = self.negotiate(cfg, offered_backend, want_backend, external.as_ref().map(|g| g.features))?;
        let max = dev.max_queue_size()?;
        let served: Vec<u32> = match &external {
            Some(g) => {
                for q in &g.queues {
                    if q.index >= self.device_queues {
                        return Err(SessionError::Invalid(format!(
                            "queue {} does not exist (the device has {})",
                            q.index, self.device_queues
                        )));
                    }
                }
                g.queues.iter().map(|q| q.index).collect()
            }
            // virtio-net drives the pairs its features give, and the control queue after them.
            None if id == crate::virtio::device_id::NET => {
                let ctrl = crate::virtio::has(self.features, crate::virtio::net_feature::CTRL_VQ);
                let count = (2 * u32::from(self.net_pairs()?) + u32::from(ctrl)).min(self.device_queues);
                (0..count).collect()
            }
            None => (0..self.device_queues).collect(),
        };
        let plan = self.plan(cfg, id, &served)?;
        self.modes = plan.modes.clone();
        self.cvq = plan.cvq.clone();
        // With a state to restore, the data queues start only after every ack is OK, which
        // needs a device that takes queue enables after DRIVER_OK.
        if cfg.restore.is_some() && self.backend_features & (1 << bf::ENABLE_AFTER_DRIVER_OK) == 0 {
            return Err(SessionError::Negotiation(
                "restoring a state needs backend feature ENABLE_AFTER_DRIVER_OK (data queues start after the acks)".into(),
            ));
        }
        let mem = match external {
            Some(mut g) => {
                self.guest_features = g.features;
                if let Some(state) = &cfg.resume {
                    state.check(id, crate::session::guest_offer(id, dev.features()?)? | (1 << feature::ACCESS_PLATFORM))?;
                    if state.features != g.features {
                        return Err(crate::migrate::StateError::Mismatch(format!(
                            "saved with guest features {:#x}, resumed with {:#x}",
                            state.features, g.features
                        ))
                        .into());
                    }
                    for q in g.queues.iter_mut() {
                        let Some(saved) = state.queues.iter().find(|s| s.index == q.index) else {
                            return Err(crate::migrate::StateError::Mismatch(format!("queue {} is not in the saved state", q.index)).into());
                        };
                        if saved.size != q.layout.size() {
                            return Err(crate::migrate::StateError::Mismatch(format!(
                                "queue {}: ring of {} saved, {} now",
                                q.index,
                                saved.size,
                                q.layout.size()
                            ))
                            .into());
                        }
                        if !saved.inflight.is_empty() && plan.mode(q.index) == Mode::Passthrough {
                            return Err(SessionError::Invalid(format!(
                                "queue {}: {} requests in flight are submitted again by svq: it cannot start in passthrough",
                                q.index,
                                saved.inflight.len()
                            )));
                        }
                        q.base = saved.avail;
                        q.used_base = saved.used;
                    }
                }
                for q in g.queues.iter().filter(|q| plan.mode(q.index) == Mode::Passthrough) {
                    if q.layout.size() > max {
                        return Err(SessionError::Invalid(format!(
                            "queue {}: size {} is larger than the device's {max}, so it cannot be passed through",
                            q.index,
                            q.layout.size()
                        )));
                    }
                }
                self.guest_queues = g.queues;
                g.memory
            }
            None => {
                // The guest's rings: in passthrough the device reads them, so they may use
                // only what the device negotiated; shadowed, svq serves them and offers both.
                let has = |bit: u32| crate::virtio::has(self.features, bit);
                let any_passthrough = plan.modes.iter().any(|(_, m)| *m == Mode::Passthrough);
                let (guest_event_idx, guest_indirect) = if any_passthrough {
                    (has(feature::RING_EVENT_IDX), has(feature::RING_INDIRECT_DESC))
                } else {
                    (cfg.event_idx, cfg.indirect)
                };
                if cfg.resume.is_some() {
                    return Err(SessionError::Invalid(
                        "a saved state resumes a guest that outlives its session, not the session's own".into(),
                    ));
                }
                self.guest_features = self.features & !(1 << feature::ACCESS_PLATFORM);
                let size = cfg.queue_size.min(max);
                let mem = Arc::new(GuestMemory::new(&cfg.memory)?);
                let driver = Driver::new(mem.clone(), &vec![size; served.len()], guest_event_idx, guest_indirect)?;
                self.guest_queues = driver.guest_queues();
                self.driver = Some(driver);
                mem
            }
        };
        self.guest_mem = Some(mem.clone());
        self.start_queues(cfg, &plan, &mem, max)
    }

    /// Maps guest memory, sets up every queue, starts the device and the engine,
    /// restores a saved state and enables the queues that waited for it.
    fn start_queues(&mut self, cfg: &SessionConfig, plan: &Plan, mem: &Arc<GuestMemory>, max: u16) -> Result<(), SessionError> {
        let dev = self.device.clone();
        if let Some(c) = plan.cvq.as_ref().filter(|c| c.isolated) {
            dev.set_group_asid(plan.cvq_group, c.asid)?;
        }
        let regions = self.map_guest_memory(plan, mem)?;
        let guest_queues = self.guest_queues.clone();
        // With a state to restore, the data queues are enabled only once it is restored.
        let late: Vec<u32> = if cfg.restore.is_some() { plan.data_queues.clone() } else { Vec::new() };
        // The eventfds the device watches for those queues' kicks (see below).
        let mut late_kicks: Vec<EventFd> = Vec::new();
        let mut shadows = Vec::new();
        for gq in &guest_queues {
            let stats = Arc::new(QueueStats::default());
            self.stats.push((gq.index, stats.clone()));
            let forwarding = match plan.mode(gq.index) {
                Mode::Passthrough => {
                    dev.set_vring_num(gq.index, gq.layout.size())?;
                    dev.set_vring_base(gq.index, gq.base)?;
                    dev.set_vring_addr(gq.index, gq.desc, gq.avail, gq.used)?;
                    dev.set_vring_kick(gq.index, Some(gq.kick.as_fd()))?;
                    dev.set_vring_call(gq.index, Some(gq.call.as_fd()))?;
                    if late.contains(&gq.index) {
                        late_kicks.push(EventFd::dup_of(gq.kick.as_fd()).map_err(os("dup kick eventfd"))?);
                    }
                    continue;
                }
                Mode::Translate => Forwarding::Translate,
                Mode::Copy => Forwarding::Copy(cfg.copy_strategy),
            };
            let size = gq.layout.size().min(max);
            let mut sq = self.shadow_queue(gq, size, mem, &regions, stats, forwarding, plan.asid(gq.index), cfg.copy_strategy)?;
            if let Some(saved) = cfg.resume.as_ref().and_then(|s| s.queues.iter().find(|q| q.index == gq.index)) {
                sq.resubmit(&saved.inflight);
            }
            if late.contains(&gq.index) {
                late_kicks.push(EventFd::dup_of(sq.fds.device_kick.as_fd()).map_err(os("dup kick eventfd"))?);
            }
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
        for gq in guest_queues.iter().filter(|g| !late.contains(&g.index)) {
            dev.set_vring_enable(gq.index, true)?;
        }
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK)?;
        let watched = guest_queues.iter().map(|g| (g.index, g.health.clone(), g.call.clone())).collect();
        let places = plan.lanes(cfg.workers);
        self.engine =
            Some(Engine::start_lanes(shadows, places, dev.clone(), config_call, watched, cfg.busy_poll).map_err(os("start engine"))?);
        if let Some(saved) = &cfg.restore {
            self.restore(saved, cfg.restore_timeout)?;
        }
        for &q in &late {
            dev.set_vring_enable(q, true)?;
        }
        // A device drops the kicks a queue gets before it is enabled (the kernel's
        // simulators do), and the engine forwarded what the guest had pending (a resumed
        // guest's frames) as soon as it started: one kick each now, or that work waits
        // for the guest's next one.
        late_kicks.iter().for_each(EventFd::signal);
        Ok(())
    }

    /// Maps guest memory (in ASID 0) when a queue reaches it there: at IOVA = guest
    /// address when any queue is passthrough, anywhere otherwise. Returns where each
    /// region went.
    fn map_guest_memory(&mut self, plan: &Plan, mem: &GuestMemory) -> Result<Vec<RegionIova>, SessionError> {
        let needed = plan.modes.iter().any(|&(q, m)| plan.asid(q) == 0 && matches!(m, Mode::Passthrough | Mode::Translate));
        if !needed {
            return Ok(Vec::new());
        }
        let at_gpa = plan.modes.iter().any(|(_, m)| *m == Mode::Passthrough);
        self.identity = at_gpa;
        let reqs: Vec<MapRequest> = mem
            .regions()
            .iter()
            .map(|r| MapRequest {
                size: r.size,
                host: r.host_addr(),
                guest: Some(r.gpa),
                perm: Perm::ReadWrite,
                at: at_gpa.then_some(r.gpa),
            })
            .collect();
        let maps = self.dma.map(0, &reqs)?;
        self.regions = maps.iter().zip(mem.regions()).map(|(m, r)| RegionIova { gpa: r.gpa, size: r.size, iova: m.iova }).collect();
        Ok(self.regions.clone())
    }

    /// Builds the shadow ring of one queue: host memory mapped for the device (descriptors
    /// and avail read-only, used writable) in the queue's address space, eventfds bound,
    /// bounce buffers for copy mode, and the shadow queue itself.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn shadow_queue(
        &mut self,
        gq: &GuestQueue,
        size: u16,
        mem: &Arc<GuestMemory>,
        regions: &[RegionIova],
        stats: Arc<QueueStats>,
        forwarding: Forwarding,
        asid: u32,
        strategy: Strategy,
    ) -> Result<ShadowQueue, SessionError> {
        let dev = self.device.clone();
        let layout = RingLayout::new(size).ok_or_else(|| SessionError::Invalid(format!("shadow ring size {size}")))?;
        let ro_len = align_up(layout.desc_bytes() + layout.avail_bytes(), PAGE_SIZE);
        let rw_len = align_up(layout.used_bytes(), PAGE_SIZE);
        let ring_mem = GuestMemory::new(&[(0, ro_len + rw_len)])?;
        let shadow_ring = ring_mem.vring(layout, 0, layout.desc_bytes(), ro_len)?;
        let host = ring_mem.regions()[0].host_addr();
        let maps = self.dma.map(
            asid,
            &[
                MapRequest { size: ro_len, host, guest: None, perm: Perm::ReadOnly, at: None },
                MapRequest { size: rw_len, host: host + ro_len, guest: None, perm: Perm::ReadWrite, at: None },
            ],
        )?;
        let (ro, rw) = (maps[0], maps[1]);
        // Kept until the device provably cannot reach it any more.
        self.ring_mem.push(ShadowRing { queue: gq.index, mem: ring_mem, iovas: [ro.iova, rw.iova] });
        let device_event_idx = crate::virtio::has(self.features, feature::RING_EVENT_IDX);
        let shadow = RingWriter::new(shadow_ring, 0, device_event_idx);
        dev.set_vring_num(gq.index, size)?;
        dev.set_vring_base(gq.index, 0)?;
        dev.set_vring_addr(gq.index, ro.iova, ro.iova + layout.desc_bytes(), rw.iova)?;
        let fds = ShadowFds {
            guest_kick: gq.kick.clone(),
            guest_call: gq.call.clone(),
            device_kick: EventFd::new().map_err(os("eventfd"))?,
            device_call: EventFd::new().map_err(os("eventfd"))?,
        };
        dev.set_vring_kick(gq.index, Some(fds.device_kick.as_fd()))?;
        dev.set_vring_call(gq.index, Some(fds.device_call.as_fd()))?;
        let guest = RingReader::resume(mem.vring(gq.layout, gq.desc, gq.avail, gq.used)?, gq.base, gq.used_base, gq.event_idx, gq.indirect);
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
            used_gpa: gq.used,
        }))
    }
}
