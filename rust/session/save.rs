//! The device state a migration moves: [`Session::save`] stops the session and captures
//! where every guest ring stands (chains the device never took given back to the guest
//! ring, chains it took and did not complete kept as in flight), the features the
//! guest's driver negotiated and the tracked virtio-net state; a session started with
//! `SessionConfig::resume` continues from it on another device, and
//! [`Session::resume_saved`] moves svq's own guest there with it.

use std::sync::Arc;

use super::{GuestSource, QueuePosition, Session, SessionConfig, SessionError};
use crate::device::Device;
use crate::engine::Engine;
use crate::front::driver::Driver;
use crate::migrate::{DeviceState, QueueState, STATE_VERSION};
use crate::shadow::StopReason;
use crate::virtio::{backend_feature as bf, device_id, has};

/// What [`Session::save`] leaves: the device state, and the in-process guest itself when
/// the session played it (to resume on another device with
/// [`Session::resume_driver`]).
#[derive(Debug)]
pub struct Saved {
    /// Where every ring stands, what is in flight, the negotiated features and the
    /// virtio-net state.
    pub state: DeviceState,
    /// The session's own guest, for a session that played it.
    pub driver: Option<Driver>,
}

impl Session {
    /// Stops the session and returns its device state (see the module). The device is
    /// suspended first, so nothing it holds is lost: a net device completes in order, so
    /// its rings have nothing in flight; a device that completes out of order (blk) may
    /// hold requests, which the next session submits again. Such a device's queues must
    /// be shadowed (a passthrough ring's requests in the device cannot be known).
    ///
    /// A save that fails before the device stopped for good (a refused suspend, an
    /// unreadable ring position) leaves the session running. Once it stopped, the
    /// session is closed whatever happens, and a failure still carries the state when
    /// the guest could be kept.
    pub fn save(&mut self) -> Result<Saved, Box<SaveFailed>> {
        let fail = |error: SessionError| Box::new(SaveFailed { error, saved: None });
        if self.closed {
            return Err(fail(SessionError::Closed));
        }
        if self.engine.as_ref().is_some_and(Engine::on_engine_thread) {
            return Err(fail(SessionError::Invalid("a session cannot be saved from its own hook".into())));
        }
        if !has(self.backend_features, bf::SUSPEND) {
            return Err(fail(SessionError::Negotiation("saving a device's state needs a device that can SUSPEND".into())));
        }
        let dev = self.device.clone();
        let id = dev.device_id().map_err(|e| fail(e.into()))?;
        let passthrough = self.passthrough_queues();
        if id != device_id::NET && !passthrough.is_empty() {
            return Err(fail(SessionError::Invalid(format!(
                "queues {passthrough:?} are passthrough on a device that completes out of order: switch them to the shadow before saving"
            ))));
        }
        dev.suspend().map_err(|e| fail(e.into()))?;
        // Every ring's position is read before anything stops: a device that cannot say
        // where it stands is resumed and the session goes on.
        let mut bases = Vec::new();
        for &(q, _) in &self.modes {
            match dev.vring_base(q) {
                Ok(base) => bases.push((q, base)),
                Err(e) => {
                    return Err(fail(match dev.resume() {
                        Ok(()) => e.into(),
                        Err(r) => SessionError::Invalid(format!("{e}; and the device did not resume: {r}")),
                    }));
                }
            }
        }
        let mut state =
            DeviceState { version: STATE_VERSION, device_id: id, features: self.guest_features, queues: Vec::new(), net: self.net_state() };
        let sizes: Vec<(u32, u16)> = self.guest_queues.iter().map(|g| (g.index, g.layout.size())).collect();
        let size_of = |q: u32| sizes.iter().find(|(i, _)| *i == q).map_or(0, |(_, n)| *n);
        for (q, base) in bases.into_iter().filter(|(q, _)| passthrough.contains(q)) {
            state.queues.push(QueueState { index: q, size: size_of(q), avail: base, used: base, inflight: Vec::new() });
        }
        let handed = self.hand_over(true);
        for (p, heads) in handed.positions {
            state.queues.push(QueueState { index: p.queue, size: size_of(p.queue), avail: p.avail, used: p.used, inflight: heads });
        }
        state.queues.sort_by_key(|q| q.index);
        let saved = handed.driver.map(|driver| Saved { state: state.clone(), driver: Some(driver) });
        match handed.result {
            Ok(()) => Ok(saved.unwrap_or(Saved { state, driver: None })),
            Err(error) => Err(Box::new(SaveFailed { error, saved })),
        }
    }

    /// Stops the engine and closes, leaving every guest ring as a next session finds it:
    /// chains the device never took given back (the ring reader rewound over them),
    /// chains it took and did not complete left in flight (and listed). `suspended`:
    /// whether the device was suspended, so that it reports what it took; otherwise an
    /// in-order device is taken to have taken what it completed.
    pub(super) fn hand_over(&mut self, suspended: bool) -> HandedOver {
        let dev = self.device.clone();
        let mut queues = self.engine.take().map(Engine::stop).unwrap_or_default();
        let mut inflight = Vec::new();
        for sq in &mut queues {
            sq.drain_used();
            let taken = if suspended { dev.vring_base(sq.index).ok() } else { None };
            sq.rewind_untaken(taken.unwrap_or_else(|| sq.shadow_used()));
            inflight.push((sq.index, sq.guest_in_flight()));
        }
        let stopped = self.take_teardown().stop(queues, StopReason::HandedOver);
        let positions = stopped
            .positions
            .into_iter()
            .map(|p| {
                let heads = inflight.iter().find(|(q, _)| *q == p.queue).map(|(_, h)| h.clone()).unwrap_or_default();
                (p, heads)
            })
            .collect();
        HandedOver { result: stopped.result, positions, driver: stopped.driver }
    }
}

/// A failed [`Session::save`]: why, and, when the session stopped with its guest
/// provably out of the device's reach, the state to resume elsewhere.
#[derive(Debug)]
pub struct SaveFailed {
    /// What failed.
    pub error: SessionError,
    /// The state and svq's own guest, when they could be kept.
    pub saved: Option<Saved>,
}

/// A failed [`Session::resume_saved`]: why, and the guest back as it now stands (`None`
/// when its memory had to be kept from a device that might still reach it).
#[derive(Debug)]
pub struct ResumeFailed {
    /// Why the session did not start.
    pub error: SessionError,
    /// The saved guest, to resume elsewhere.
    pub saved: Option<Saved>,
}

impl Session {
    /// Continues svq's own guest from a saved session on `device`: its rings where they
    /// stood, what it had in flight submitted again, its virtio-net state replayed
    /// (`cfg.resume` is the saved state). A guest that cannot start here comes back in
    /// the error, ready for another device.
    pub fn resume_saved(device: Arc<dyn Device>, cfg: &SessionConfig, saved: Saved) -> Result<Self, Box<ResumeFailed>> {
        let Saved { state, driver } = saved;
        let Some(driver) = driver else {
            let error = SessionError::Invalid("this state was saved from an external guest: start a session on that guest with it".into());
            return Err(Box::new(ResumeFailed { error, saved: Some(Saved { state, driver: None }) }));
        };
        let cfg = SessionConfig { resume: Some(state.clone()), ..cfg.clone() };
        Self::start_with(device, &cfg, GuestSource::Resumed(Box::new(driver))).map_err(|f| {
            let mut state = state;
            for (p, heads) in f.positions {
                if let Some(q) = state.queues.iter_mut().find(|q| q.index == p.queue) {
                    (q.avail, q.used, q.inflight) = (p.avail, p.used, heads);
                }
            }
            Box::new(ResumeFailed { error: f.error, saved: f.driver.map(|driver| Saved { state, driver: Some(driver) }) })
        })
    }
}

/// What [`Session::hand_over`] leaves.
pub(super) struct HandedOver {
    pub(super) result: Result<(), SessionError>,
    /// Each shadowed ring's position, with the heads of its chains still in flight.
    pub(super) positions: Vec<(QueuePosition, Vec<u16>)>,
    pub(super) driver: Option<Driver>,
}
