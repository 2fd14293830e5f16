//! A shadow queue's counters, readable while the engine runs.

use std::sync::atomic::{AtomicU64, Ordering};

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
