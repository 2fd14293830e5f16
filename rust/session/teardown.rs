//! Closing a session: stop the engine, reset the device, return what was in flight, unbind
//! the eventfds, unmap everything, wake every waiter. Memory is freed only once the device
//! provably cannot reach it (its reset acknowledged, every mapping gone); otherwise it is
//! kept for the rest of the process, and counted.

use std::sync::Arc;

use super::claim::DeviceClaim;
use super::{QueuePosition, SessionError, ShadowRing};
use crate::device::Device;
use crate::dma::Dma;
use crate::front::driver::Driver;
use crate::front::GuestQueue;
use crate::mem::GuestMemory;
use crate::shadow::{ShadowQueue, StopReason};

/// Everything a closing session still holds, taken out of it so that the teardown can
/// run on another thread (the engine's, when a hook closed its own session).
pub(super) struct Teardown {
    pub(super) device: Arc<dyn Device>,
    pub(super) dma: Arc<Dma>,
    pub(super) claim: Option<DeviceClaim>,
    pub(super) queues: Vec<u32>,
    pub(super) ring_mem: Vec<ShadowRing>,
    pub(super) driver: Option<Driver>,
    pub(super) guest_mem: Option<Arc<GuestMemory>>,
    pub(super) guest_queues: Vec<GuestQueue>,
    pub(super) capture: Option<super::capture::Attached>,
}

/// What a teardown leaves.
pub(super) struct Stopped {
    /// The first error of any step.
    pub(super) result: Result<(), SessionError>,
    /// Where each shadowed guest ring stands once its queue stopped.
    pub(super) positions: Vec<QueuePosition>,
    /// The in-process guest, when its memory is provably out of the device's reach (and
    /// may serve another device); `None` otherwise, its memory then being kept.
    pub(super) driver: Option<Driver>,
}

impl Teardown {
    /// Runs every step, even after a failed one; the first error is returned.
    pub(super) fn run(self, queues: Vec<ShadowQueue>) -> Result<(), SessionError> {
        self.stop(queues, StopReason::Closed).result
    }

    /// Like [`Teardown::run`], stopping the queues for `why`: see [`Stopped`].
    pub(super) fn stop(self, mut queues: Vec<ShadowQueue>, why: StopReason) -> Stopped {
        let mut first: Option<SessionError> = None;
        let mut keep = |r: Result<(), SessionError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        let dev = self.device.clone();
        // Reset first: the device stops touching memory before it is unmapped. Only a
        // reset the device acknowledges (status reads back 0) counts.
        let reset = dev.set_status(0);
        let status = dev.status();
        let quiesced = reset.is_ok() && status.as_ref().is_ok_and(|&s| s == 0);
        keep(reset.map_err(Into::into));
        keep(status.map(drop).map_err(Into::into));
        for &q in &self.queues {
            keep(dev.set_vring_kick(q, None).map_err(Into::into));
            keep(dev.set_vring_call(q, None).map_err(Into::into));
        }
        keep(dev.set_config_call(None).map_err(Into::into));
        let mut unmapped = true;
        let mut positions = Vec::with_capacity(queues.len());
        for q in &mut queues {
            if let Err(e) = q.stop(why, quiesced) {
                unmapped = false;
                keep(Err(e.into()));
            }
            let (avail, used) = q.guest_position();
            positions.push(QueuePosition { queue: q.index, avail, used });
        }
        // The queues' taps handed their last frames over: a capture the session started
        // ends with it.
        drop(queues);
        if let Some(a) = self.capture.filter(|a| a.owned) {
            a.capture.finish();
        }
        if let Err(e) = self.dma.unmap_all() {
            unmapped = false;
            keep(Err(e.into()));
        }
        let notifiers: Vec<_> = self.guest_queues.iter().map(|g| g.call.clone()).collect();
        // The driver's rings and buffers live in guest memory, which it shares (an Arc):
        // it is handed back only with memory the device can no longer reach.
        let mut driver = None;
        if quiesced && unmapped {
            driver = self.driver;
            drop(self.ring_mem);
            drop(self.guest_mem);
        } else {
            drop(self.driver);
            let bytes =
                self.ring_mem.iter().map(|r| r.mem.total_bytes()).sum::<u64>() + self.guest_mem.as_ref().map_or(0, |m| m.total_bytes());
            crate::live::quarantine((self.ring_mem, self.guest_mem), bytes);
        }
        // Whoever waits on a guest queue wakes and finds the session closed.
        notifiers.iter().for_each(|c| c.signal());
        drop(self.claim);
        Stopped { result: first.map_or(Ok(()), Err), positions, driver }
    }
}
