//! The virtio-net control queue's policy on a shadowed control queue: malformed commands
//! and commands without room for the ack get an answer from svq without reaching the
//! device, ANNOUNCE_ACK is answered locally, and the tracked state changes only when the
//! device acknowledged a command with OK. So the tracked state and the device never
//! disagree: the device sees only commands whose outcome svq learns.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::hook::{QueueHook, Verdict};
use crate::net::{Command, NetState, ACK_ERR, ACK_OK};

/// What the control-queue tracker counted.
#[derive(Debug, Default)]
pub struct CvqCounters {
    /// Commands seen (guest and injected).
    pub commands: AtomicU64,
    /// Commands the device acknowledged with OK.
    pub acked: AtomicU64,
    /// Guest commands answered by svq without the device (malformed or without an ack
    /// buffer: ERR or nothing; ANNOUNCE: OK).
    pub answered_locally: AtomicU64,
}

/// The control queue's hook.
#[derive(Debug)]
pub struct CvqTracker {
    /// The tracked state.
    pub state: Arc<Mutex<NetState>>,
    /// Counters.
    pub counters: Arc<CvqCounters>,
}

impl QueueHook for CvqTracker {
    fn avail(&mut self, out: &[u8], in_len: u32) -> Verdict {
        let local = |v: Verdict| {
            self.counters.commands.fetch_add(1, Relaxed);
            self.counters.answered_locally.fetch_add(1, Relaxed);
            v
        };
        if in_len == 0 {
            // The spec requires the ack byte (5.1.6.5): without it svq could not learn
            // whether the device applied the command, so the device never sees it.
            return local(Verdict::Refuse);
        }
        match Command::decode(out) {
            Err(_) => local(Verdict::Answer(vec![ACK_ERR])),
            Ok(Command::AnnounceAck) => local(Verdict::Answer(vec![ACK_OK])),
            Ok(_) => Verdict::Forward,
        }
    }

    fn used(&mut self, out: &[u8], written: &[u8]) {
        self.counters.commands.fetch_add(1, Relaxed);
        if written.first() != Some(&ACK_OK) {
            return;
        }
        if let Ok(cmd) = Command::decode(out) {
            self.counters.acked.fetch_add(1, Relaxed);
            self.state.lock().unwrap_or_else(|p| p.into_inner()).apply(&cmd);
        }
    }
}
