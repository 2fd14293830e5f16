//! Policy on a shadowed queue: hooks see each guest element and forward, answer or refuse
//! it, and see each completion.

use super::inflight::Element;
use super::{bump, ShadowQueue, MAX_COPY_BYTES};
use crate::fault::Fault;

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

/// A boxed hook (Debug for the queue's derive).
pub(super) struct HookBox(pub(super) Box<dyn QueueHook>);

impl std::fmt::Debug for HookBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueHook")
    }
}

impl ShadowQueue {
    /// Adds a hook (hooks see elements in the order they were added).
    pub fn add_hook(&mut self, hook: Box<dyn QueueHook>) {
        self.hooks.push(HookBox(hook));
    }

    /// Shows a guest element to the hooks: `Some` when it goes to the device (with its
    /// readable bytes kept for the completion's hooks), `None` when a hook completed it.
    pub(super) fn judge(&mut self, el: Element) -> Result<Option<Element>, Fault> {
        if el.out_len > MAX_COPY_BYTES {
            return Err(Self::too_many_bytes(&el.origin, el.out_len, el.in_len));
        }
        let out = self.gather(&el.chain.out, el.out_len)?;
        let in_len = el.in_len.min(u32::MAX as u64) as u32;
        // Kept as the waiting element while the hooks look: should one panic, stopping the
        // broken queue still returns the guest's chain.
        self.held = Some(el);
        let verdict = self.hooks.iter_mut().map(|h| h.0.avail(&out, in_len)).find(|v| *v != Verdict::Forward).unwrap_or(Verdict::Forward);
        let Some(mut el) = self.held.take() else { return Err(Fault::Internal("the element shown to the hooks is gone".into())) };
        match verdict {
            Verdict::Forward => {
                el.out_bytes = Some(out);
                return Ok(Some(el));
            }
            Verdict::Answer(bytes) => {
                let n = self.scatter(&el.chain.inn, &bytes)?;
                self.log_segments(&el.chain.inn, n as u64);
                self.complete_guest(el.chain.head, n as u32);
                bump(&self.stats.answered, 1);
            }
            Verdict::Refuse => {
                self.complete_guest(el.chain.head, 0);
                bump(&self.stats.refused, 1);
            }
        }
        self.chain = el.chain;
        Ok(None)
    }

    /// Shows a completion to the hooks.
    pub(super) fn show_completion(&mut self, out: &[u8], written: &[u8]) {
        self.hooks.iter_mut().for_each(|h| h.0.used(out, written));
    }
}
