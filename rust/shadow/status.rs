//! What a shadow queue reports: its health (the fault that broke it, if any) and its
//! counters, both readable while the engine runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Which party broke a queue, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The guest wrote an invalid chain or index.
    Guest,
    /// The device wrote an invalid used entry.
    DeviceProtocol,
    /// The device entered NEEDS_RESET (e.g. its IOTLB refused an access).
    DeviceNeedsReset,
    /// An element can never fit the shadow ring, or is too large to copy.
    TooLarge,
    /// svq itself failed (a panic on the engine thread, e.g. in a hook).
    Internal,
}

/// Why a queue stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFault {
    /// Who broke it.
    pub kind: FaultKind,
    /// What happened, naming the broken rule.
    pub message: String,
}

/// Health of a queue, shared between the engine and whoever waits on the queue.
#[derive(Debug, Default)]
pub struct QueueHealth {
    fault: Mutex<Option<QueueFault>>,
    /// Set (after `fault`) once the queue broke: the hot path's check, without the lock.
    broken: AtomicBool,
}

impl QueueHealth {
    /// The fault that broke the queue, if any.
    pub fn fault(&self) -> Option<QueueFault> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the queue was broken (a lock-free check; [`QueueHealth::fault`] says why).
    #[inline]
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the queue broken (the first fault wins).
    pub fn set(&self, kind: FaultKind, message: String) {
        let mut f = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(QueueFault { kind, message });
        }
        self.broken.store(true, Ordering::Release);
    }
}

/// Per-queue counters, readable while the engine runs.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Elements forwarded to the device.
    pub elements: AtomicU64,
    /// Elements completed back to the guest.
    pub completed: AtomicU64,
    /// Device-readable bytes forwarded.
    pub bytes_out: AtomicU64,
    /// Bytes the device reported written.
    pub bytes_in: AtomicU64,
    /// Kicks received from the guest.
    pub guest_kicks: AtomicU64,
    /// Kicks sent to the device.
    pub device_kicks: AtomicU64,
    /// Kicks not sent because the device suppressed them.
    pub device_kicks_suppressed: AtomicU64,
    /// Calls received from the device.
    pub device_calls: AtomicU64,
    /// Calls sent to the guest.
    pub guest_calls: AtomicU64,
    /// Calls not sent because the guest suppressed them.
    pub guest_calls_suppressed: AtomicU64,
    /// Times an element waited for shadow ring space.
    pub held: AtomicU64,
    /// Elements injected by svq (not the guest).
    pub injected: AtomicU64,
    /// Guest elements a hook answered without the device.
    pub answered: AtomicU64,
    /// Guest elements a hook refused.
    pub refused: AtomicU64,
    /// Elements completed unsent because a bounce buffer could not be mapped.
    pub map_failures: AtomicU64,
    /// Elements in flight returned (length 0) when the queue stopped.
    pub returned_on_stop: AtomicU64,
    /// Faults that broke the queue.
    pub errors: AtomicU64,
}

impl QueueStats {
    /// The counters as (name, value) pairs.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("elements", l(&self.elements)),
            ("completed", l(&self.completed)),
            ("bytes_out", l(&self.bytes_out)),
            ("bytes_in", l(&self.bytes_in)),
            ("guest_kicks", l(&self.guest_kicks)),
            ("device_kicks", l(&self.device_kicks)),
            ("device_kicks_suppressed", l(&self.device_kicks_suppressed)),
            ("device_calls", l(&self.device_calls)),
            ("guest_calls", l(&self.guest_calls)),
            ("guest_calls_suppressed", l(&self.guest_calls_suppressed)),
            ("held", l(&self.held)),
            ("injected", l(&self.injected)),
            ("answered", l(&self.answered)),
            ("refused", l(&self.refused)),
            ("map_failures", l(&self.map_failures)),
            ("returned_on_stop", l(&self.returned_on_stop)),
            ("errors", l(&self.errors)),
        ]
    }
}
