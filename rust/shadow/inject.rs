//! svq's own elements on a shadowed queue: queued on the engine thread, sent in bounce
//! buffers (never guest memory), and completed through a slot the injector waits on (or
//! a batch of slots whose eventfd an event loop watches).

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

use nix::errno::Errno;

use super::inflight::{Element, Origin};
use super::{bump, ShadowQueue, MAX_COPY_BYTES};
use crate::eventfd::EventFd;
use crate::fault::QueueFault;
use crate::ring::Chain;

/// Why an injected element did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The queue broke (before or while the element was in flight).
    #[error(transparent)]
    Broken(#[from] QueueFault),
    /// The queue stopped with the element still in flight or waiting.
    #[error("queue {queue} stopped before the element completed")]
    Stopped {
        /// The queue.
        queue: u32,
    },
    /// The session was closed.
    #[error("the session was closed")]
    Closed,
    /// Its bounce buffers could not be made or mapped.
    #[error("queue {queue}: no bounce buffer: {reason}")]
    NoBuffer {
        /// The queue.
        queue: u32,
        /// What failed.
        reason: String,
    },
    /// The element itself is invalid (empty, or too large).
    #[error("{0}")]
    Invalid(String),
}

/// How an injected element ended: (used length, the bytes the device wrote).
pub type InjectResult = Result<(u32, Vec<u8>), InjectError>;

/// The completion slot of one injected element (or of a request to the engine).
#[derive(Debug, Default)]
pub struct InjectSlot {
    state: Mutex<SlotState>,
    done: Condvar,
    /// Signalled after each outcome, while its owner keeps it open: a waiter that watches
    /// it (an event loop) needs no thread per slot. Weak, so a waiter that gave up closes
    /// it even though the element may stay in flight for the rest of the session.
    notify: Option<Weak<EventFd>>,
}

/// What a slot's lock guards.
#[derive(Debug, Default)]
struct SlotState {
    result: Option<InjectResult>,
    /// A thread sleeps (or slept) on the condition variable: only then does completing
    /// wake it, so that the engine completing thousands of elements no one sleeps on
    /// (a restore, an event loop's batch) makes no futex call for each.
    sleeper: bool,
}

impl InjectSlot {
    /// A slot that also signals `notify` when it completes.
    pub fn notifying(notify: &Arc<EventFd>) -> Self {
        InjectSlot { notify: Some(Arc::downgrade(notify)), ..InjectSlot::default() }
    }

    /// Records the outcome and wakes the waiter. The first outcome wins (a completion
    /// racing a stop is reported once).
    pub fn complete(&self, r: InjectResult) {
        let mut g = self.lock();
        if g.result.is_none() {
            g.result = Some(r);
        }
        // A sleeper set the flag under the lock before it slept (the wait releases the
        // lock atomically), so it is seen here.
        let sleeper = g.sleeper;
        drop(g);
        if sleeper {
            self.done.notify_all();
        }
        if let Some(n) = self.notify.as_ref().and_then(Weak::upgrade) {
            n.signal();
        }
    }

    /// Takes the outcome if it is there, without waiting.
    pub fn try_take(&self) -> Option<InjectResult> {
        self.lock().result.take()
    }

    /// Whether an outcome is there.
    pub fn is_done(&self) -> bool {
        self.lock().result.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `deadline` (sleeping, not spinning) and takes the outcome. None when
    /// the deadline passed first.
    pub fn wait_until(&self, deadline: Instant) -> Option<InjectResult> {
        let mut g = self.lock();
        loop {
            if let Some(r) = g.result.take() {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g.sleeper = true;
            g = self.done.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Waits for every slot of `slots` until `deadline` and takes the outcomes, in slot
    /// order (None: none by the deadline). See [`InjectSlot::wait_all_with`].
    pub fn wait_all_until(slots: &[Arc<InjectSlot>], deadline: Instant) -> Vec<Option<InjectResult>> {
        let Ok(outcomes) = Self::wait_all_with(slots, |s| Ok::<_, std::convert::Infallible>(s.wait_until(deadline)));
        outcomes
    }

    /// Takes the outcome of every slot of `slots` with `wait` (which sleeps until the
    /// caller's deadline, and may fail: Ctrl-C), in slot order (None: none by the
    /// deadline). The last is waited for first: elements mostly complete in order, so the
    /// waiter sleeps about once for all of them instead of once for each (a futex
    /// wake-up and two context switches per element).
    pub fn wait_all_with<E>(
        slots: &[Arc<InjectSlot>],
        wait: impl FnMut(&InjectSlot) -> Result<Option<InjectResult>, E>,
    ) -> Result<Vec<Option<InjectResult>>, E> {
        let mut out = slots.iter().rev().map(|s| &**s).map(wait).collect::<Result<Vec<_>, E>>()?;
        out.reverse();
        Ok(out)
    }
}

/// Slots of elements injected together, with one eventfd signalled whenever one of them
/// completes: a waiter sleeps on the eventfd (or watches it in an event loop) and
/// [`InjectBatch::poll`]s, instead of blocking on each slot. Dropping the batch closes the
/// eventfd; elements still in flight complete on the queue as usual.
#[derive(Debug)]
pub struct InjectBatch {
    slots: Vec<Arc<InjectSlot>>,
    results: Vec<Option<InjectResult>>,
    notify: Arc<EventFd>,
}

impl InjectBatch {
    /// `n` slots sharing a new eventfd.
    pub fn new(n: usize) -> Result<Self, Errno> {
        let notify = Arc::new(EventFd::new()?);
        let slots = (0..n).map(|_| Arc::new(InjectSlot::notifying(&notify))).collect();
        Ok(InjectBatch { slots, results: (0..n).map(|_| None).collect(), notify })
    }

    /// The slots, in element order.
    pub fn slots(&self) -> &[Arc<InjectSlot>] {
        &self.slots
    }

    /// The eventfd signalled when a slot completes.
    pub fn notifier(&self) -> &Arc<EventFd> {
        &self.notify
    }

    /// Takes the outcomes that arrived; true once every element ended.
    pub fn poll(&mut self) -> bool {
        for (slot, r) in self.slots.iter().zip(&mut self.results) {
            if r.is_none() {
                *r = slot.try_take();
            }
        }
        self.pending() == 0
    }

    /// Elements without an outcome yet (as of the last [`InjectBatch::poll`]).
    pub fn pending(&self) -> usize {
        self.results.iter().filter(|r| r.is_none()).count()
    }

    /// The outcomes in element order (None: still pending).
    pub fn results(&self) -> &[Option<InjectResult>] {
        &self.results
    }
}

impl ShadowQueue {
    /// Queues an element of svq's own: `out` readable bytes and `in_len` writable bytes,
    /// completed through `slot`. Call [`ShadowQueue::forward`] to send it.
    pub fn inject(&mut self, out: Vec<u8>, in_len: u32, slot: Arc<InjectSlot>) {
        if let Some(f) = self.health.fault() {
            return slot.complete(Err(InjectError::Broken(f)));
        }
        if out.is_empty() && in_len == 0 {
            return slot.complete(Err(InjectError::Invalid("an injected element needs readable or writable bytes".into())));
        }
        if out.len() as u64 > MAX_COPY_BYTES || in_len as u64 > MAX_COPY_BYTES {
            return slot
                .complete(Err(InjectError::Invalid(format!("an injected element may have at most {MAX_COPY_BYTES} bytes per side"))));
        }
        bump(&self.stats.injected, 1);
        let out_len = out.len() as u64;
        self.injected.push_back(Element {
            origin: Origin::Injected(slot),
            chain: Chain::default(),
            out_bytes: Some(out),
            out_len,
            in_len: in_len as u64,
        });
    }
}
