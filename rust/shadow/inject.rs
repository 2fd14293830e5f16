//! svq's own elements on a shadowed queue: queued on the engine thread, sent in bounce
//! buffers (never guest memory), and completed through a slot the injector waits on.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::inflight::{Element, Origin};
use super::{bump, ShadowQueue, MAX_COPY_BYTES};
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
    result: Mutex<Option<InjectResult>>,
    done: Condvar,
}

impl InjectSlot {
    /// Records the outcome and wakes the waiter. The first outcome wins (a completion
    /// racing a stop is reported once).
    pub fn complete(&self, r: InjectResult) {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.done.notify_all();
    }

    /// Whether an outcome is there.
    pub fn is_done(&self) -> bool {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Waits until `deadline` (sleeping, not spinning) and takes the outcome. None when
    /// the deadline passed first.
    pub fn wait_until(&self, deadline: Instant) -> Option<InjectResult> {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.take() {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.done.wait_timeout(g, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
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
