//! Live changes of a running session, for migration: queues switched between passthrough
//! and the shadow without losing, duplicating or reordering an element, and the dirty
//! log attached to every shadowed queue.
//!
//! Passthrough → shadow: the device is suspended, its position in the guest ring is read
//! back (`VHOST_GET_VRING_BASE`), the queue is pointed at a shadow ring whose guest-side
//! reader starts there, and the device resumes. Shadow → passthrough: the chains the
//! device never took are given back to the guest ring, and the device is pointed at the
//! guest ring from where it stands. Guest memory is never remapped: a switch costs the
//! same whatever the guest's size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Mode, Session, SessionError};
use crate::dirty::DirtyLog;
use crate::shadow::{Forwarding, QueueStats, StopReason};
use crate::virtio::{backend_feature as bf, has};

/// What a switch did.
#[derive(Debug, Clone)]
pub struct SwitchReport {
    /// (queue, its ring position when it switched), for each queue that changed mode.
    pub queues: Vec<(u32, u16)>,
    /// How long the device was suspended.
    pub suspended: Duration,
}

impl Session {
    /// Switches `queues` to `mode` while the device runs (one suspend for all of them).
    /// A queue already in `mode` is left alone. The device must offer SUSPEND, RESUME and
    /// queue enables after DRIVER_OK; passthrough needs guest memory at IOVA = guest
    /// address (a session started with a passthrough queue has it).
    pub fn switch(&mut self, queues: &[u32], mode: Mode) -> Result<SwitchReport, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        for &q in queues {
            match self.mode(q) {
                None => return Err(SessionError::Invalid(format!("queue {q} is not served by this session"))),
                Some(_) if self.cvq.as_ref().is_some_and(|c| c.queue == q) => {
                    return Err(SessionError::Invalid(format!("queue {q} is the control queue: its mode is fixed for the session")))
                }
                Some(_) => {}
            }
        }
        let needed = [bf::SUSPEND, bf::RESUME, bf::ENABLE_AFTER_DRIVER_OK];
        if let Some(b) = needed.iter().find(|&&b| !has(self.backend_features, b)) {
            return Err(SessionError::Negotiation(format!(
                "a live switch needs backend feature bit {b} (suspend, resume, enable after DRIVER_OK)"
            )));
        }
        if mode == Mode::Passthrough && !self.identity {
            return Err(SessionError::Invalid(
                "passthrough needs guest memory at IOVA = guest address: start the session with a passthrough queue".into(),
            ));
        }
        if mode == Mode::Passthrough && self.log.is_some() {
            return Err(SessionError::Invalid("a passthrough queue cannot be dirty-logged: detach the dirty log first".into()));
        }
        let todo: Vec<u32> = queues.iter().copied().filter(|&q| self.mode(q) != Some(mode)).collect();
        let dev = self.device.clone();
        let started = Instant::now();
        dev.suspend()?;
        let mut report = SwitchReport { queues: Vec::new(), suspended: Duration::ZERO };
        let outcome = todo.iter().try_for_each(|&q| {
            let base = match mode {
                Mode::Passthrough => self.unshadow_live(q)?,
                shadow => self.shadow_live(q, shadow)?,
            };
            report.queues.push((q, base));
            Ok::<_, SessionError>(())
        });
        // Whatever happened, the device runs again: the queues that switched serve on
        // their new rings, the others as before.
        let resumed = dev.resume();
        report.suspended = started.elapsed();
        outcome?;
        resumed?;
        Ok(report)
    }

    /// Points passthrough queue `q` (device suspended) at a new shadow ring; its position.
    fn shadow_live(&mut self, q: u32, mode: Mode) -> Result<u16, SessionError> {
        let dev = self.device.clone();
        let mut gq = self.guest_queues.iter().find(|g| g.index == q).cloned().ok_or(SessionError::Closed)?;
        let mem = self.guest_mem.clone().ok_or(SessionError::Closed)?;
        let base = dev.vring_base(q)?;
        // Everything the device took from the guest ring it also completed: svq adopts
        // the ring from there.
        let used = mem.vring(gq.layout, gq.desc, gq.avail, gq.used)?.used_idx();
        if used != base {
            return Err(SessionError::Invalid(format!(
                "queue {q}: the device took {base} chains but completed {used}: it cannot be adopted while it holds some"
            )));
        }
        (gq.base, gq.used_base) = (base, base);
        let size = gq.layout.size().min(dev.max_queue_size()?);
        let forwarding = if mode == Mode::Copy { Forwarding::Copy(self.copy_strategy) } else { Forwarding::Translate };
        let stats = self.stats.iter().find(|(i, _)| *i == q).map_or_else(|| Arc::new(QueueStats::default()), |(_, s)| s.clone());
        dev.set_vring_enable(q, false)?;
        let regions = self.regions.clone();
        let adopted = self.shadow_queue(&gq, size, &mem, &regions, stats, forwarding, 0, self.copy_strategy).and_then(|mut sq| {
            sq.set_dirty_log(self.log.clone());
            sq.set_capture(self.tap_again(q));
            dev.set_vring_enable(q, true)?;
            let engine = self.engine.as_mut().ok_or(SessionError::Closed)?;
            engine.adopt(sq).map_err(super::os("engine takes a queue"))
        });
        if let Err(e) = adopted {
            // The queue stays passthrough: back on the guest ring from where it stood.
            let back = self.point_at_guest_ring(&gq, base);
            self.retire_shadow_ring(q);
            return Err(match back {
                Ok(()) => e,
                Err(b) => SessionError::Invalid(format!("{e}; and queue {q} could not go back to its guest ring: {b}")),
            });
        }
        self.set_mode(q, mode);
        Ok(base)
    }

    /// Points the device's queue (suspended) at the guest ring, from avail index `base`.
    fn point_at_guest_ring(&self, gq: &crate::front::GuestQueue, base: u16) -> Result<(), SessionError> {
        let (dev, q) = (&self.device, gq.index);
        dev.set_vring_enable(q, false)?;
        dev.set_vring_num(q, gq.layout.size())?;
        dev.set_vring_base(q, base)?;
        dev.set_vring_addr(q, gq.desc, gq.avail, gq.used)?;
        dev.set_vring_kick(q, Some(std::os::fd::AsFd::as_fd(&*gq.kick)))?;
        dev.set_vring_call(q, Some(std::os::fd::AsFd::as_fd(&*gq.call)))?;
        dev.set_vring_enable(q, true)?;
        Ok(())
    }

    /// Points shadowed queue `q` (device suspended) back at the guest ring; its position.
    fn unshadow_live(&mut self, q: u32) -> Result<u16, SessionError> {
        let dev = self.device.clone();
        let gq = self.guest_queues.iter().find(|g| g.index == q).cloned().ok_or(SessionError::Closed)?;
        if gq.layout.size() > dev.max_queue_size()? {
            return Err(SessionError::Invalid(format!("queue {q}: the guest ring is larger than the device's rings")));
        }
        let engine = self.engine.as_mut().ok_or(SessionError::Closed)?;
        let Some(mut sq) = engine.release(q) else { return Err(SessionError::Closed) };
        sq.drain_used();
        let taken = dev.vring_base(q)?;
        sq.rewind_untaken(taken);
        // The device is suspended and about to read the guest ring: nothing of the shadow
        // ring is in its hands (an in-order device completed all it took).
        let _ = sq.stop(StopReason::Stopped, true);
        let (avail, used) = sq.guest_position();
        drop(sq);
        self.point_at_guest_ring(&gq, avail)?;
        self.retire_shadow_ring(q);
        self.set_mode(q, Mode::Passthrough);
        if avail != used {
            return Err(SessionError::Invalid(format!("queue {q}: {} chains were still in flight", avail.wrapping_sub(used))));
        }
        Ok(avail)
    }

    /// Unmaps a shadow ring the device no longer uses; its memory is freed only when the
    /// unmap succeeded.
    fn retire_shadow_ring(&mut self, q: u32) {
        let Some(at) = self.ring_mem.iter().position(|r| r.queue == q) else { return };
        let ring = self.ring_mem.remove(at);
        if self.dma.unmap(&ring.iovas).is_err() {
            let bytes = ring.mem.total_bytes();
            crate::live::quarantine(ring.mem, bytes);
        }
    }

    fn set_mode(&mut self, q: u32, mode: Mode) {
        if let Some(m) = self.modes.iter_mut().find(|(i, _)| *i == q) {
            m.1 = mode;
        }
    }

    /// Attaches a dirty log to every shadowed queue (None detaches it): from now on every
    /// guest page written on the device's behalf is marked. A passthrough queue cannot be
    /// logged (the device writes guest memory itself): switch it to the shadow first.
    pub fn set_dirty_log(&mut self, log: Option<Arc<DirtyLog>>) -> Result<(), SessionError> {
        if log.is_some() {
            let passthrough = self.passthrough_queues();
            if !passthrough.is_empty() {
                return Err(SessionError::Invalid(format!(
                    "queues {passthrough:?} are passthrough: switch them to the shadow to log them"
                )));
            }
        }
        let engine = self.engine.as_ref().ok_or(SessionError::Closed)?;
        let done = engine.set_log(log.clone());
        for r in Self::wait_all(0, &done, Duration::from_secs(10))? {
            r?;
        }
        self.log = log;
        Ok(())
    }

    /// The dirty log attached, if any.
    pub fn dirty_log(&self) -> Option<&Arc<DirtyLog>> {
        self.log.as_ref()
    }

    /// The end of guest memory (what a dirty log must cover).
    pub fn guest_end(&self) -> u64 {
        self.guest_mem.as_ref().and_then(|m| m.regions().last().map(|r| r.gpa + r.size)).unwrap_or(0)
    }
}
