//! What policy can do on a shadowed queue: see each guest element and forward, answer or
//! refuse it; see each completion; and inject elements of its own and wait for them.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What to do with a guest element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send it to the device.
    Forward,
    /// Complete it without the device, with these bytes written to its writable buffers.
    Answer(Vec<u8>),
    /// Complete it without the device and without data (used length 0).
    Refuse,
}

/// Policy attached to a shadowed queue. Runs on the engine thread: keep it cheap (it is
/// meant for low-rate queues such as the control queue).
pub trait QueueHook: Send {
    /// A guest element with its device-readable bytes and writable size.
    fn avail(&mut self, out: &[u8], in_len: u32) -> Verdict;
    /// A completed element (guest or injected): its readable bytes and what the device
    /// wrote (exactly the used length).
    fn used(&mut self, out: &[u8], written: &[u8]);
}

/// How an injected element ended.
pub type InjectResult = Result<(u32, Vec<u8>), String>;

/// The completion slot of one injected element.
#[derive(Debug, Default)]
pub struct InjectSlot {
    result: Mutex<Option<InjectResult>>,
    done: Condvar,
}

impl InjectSlot {
    /// Records the outcome and wakes the waiter (a late completion after a timeout is
    /// recorded too; nobody reads it).
    pub fn complete(&self, r: InjectResult) {
        let mut g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.done.notify_all();
    }

    /// Waits up to `timeout` (sleeping, not spinning). None on timeout.
    pub fn wait(&self, timeout: Duration) -> Option<InjectResult> {
        let deadline = Instant::now() + timeout;
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
