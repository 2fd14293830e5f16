//! Handing a stopped queue over: after the device was suspended, the guest chains svq had
//! forwarded but the device never took are given back to the guest ring (its avail index
//! is rewound), so that whoever serves the ring next (another device, passthrough, a
//! VMM) pops them again. Nothing the device took is lost either: it is completed when the
//! queue stops.

use super::inflight::Origin;
use super::{InjectError, ShadowQueue};

/// What [`ShadowQueue::rewind_untaken`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewound {
    /// Guest chains given back to the guest ring.
    pub chains: u16,
    /// Chains the device did not take that could not be given back (the guest ring no
    /// longer holds them in order): they complete with length 0 when the queue stops.
    pub returned: u16,
}

impl ShadowQueue {
    /// Reaps what the device completed, without forwarding anything new.
    pub fn drain_used(&mut self) {
        if let Err(fault) = self.reap_used() {
            self.fail(fault);
        }
        self.call_guest();
    }

    /// The shadow ring's used index as reaped: what the device completed.
    pub fn shadow_used(&self) -> u16 {
        self.shadow.last_used()
    }

    /// The guest chains the device took and has not completed (after
    /// [`ShadowQueue::rewind_untaken`], what a hand-over leaves in flight), plus those
    /// still waiting to be submitted again.
    pub fn guest_in_flight(&self) -> Vec<u16> {
        let mut heads = self.in_flight.guest_heads();
        heads.extend(self.resubmit.iter().copied());
        heads
    }

    /// Submits these guest chains (popped by an earlier session, never completed) again,
    /// before any new one.
    pub fn resubmit(&mut self, heads: &[u16]) {
        self.resubmit.extend(heads.iter().copied());
    }

    /// The guest ring's position: (next avail index to pop, used index published).
    pub fn guest_position(&self) -> (u16, u16) {
        (self.guest.last_avail(), self.guest.used_idx())
    }

    /// Gives back to the guest ring every chain the device did not take: the shadow ring
    /// entries from `device_avail` (the device's next avail index, read after a suspend)
    /// on, and a chain waiting for room. They must be the last chains svq popped, in
    /// order; then the guest's avail index is rewound over them.
    pub fn rewind_untaken(&mut self, device_avail: u16) -> Rewound {
        let untaken = self.shadow.avail_idx().wrapping_sub(device_avail);
        if untaken > self.shadow.size() {
            // The device reports a position svq never published: nothing can be trusted.
            return Rewound::default();
        }
        let mut heads: Vec<(Option<u16>, u16)> = Vec::with_capacity(untaken as usize + 1);
        for k in 0..untaken {
            let shadow_head = self.shadow.ring().avail_entry(device_avail.wrapping_add(k));
            match self.in_flight.guest_head_of(shadow_head) {
                Some(Some(g)) => heads.push((Some(shadow_head), g)),
                // svq's own elements are not the guest's to take back: they fail now.
                Some(None) => {
                    if let Some(Err(f)) = self.in_flight.untrack(shadow_head) {
                        self.shadow.reclaim(shadow_head);
                        let _ = self.release(f.out_buf, f.in_buf);
                        self.finish(f.origin, 0, Err(InjectError::Stopped { queue: self.index }));
                    }
                }
                None => return Rewound { chains: 0, returned: untaken },
            }
        }
        if let Some(Origin::Guest(g)) = self.held.as_ref().map(|e| &e.origin) {
            heads.push((None, *g));
        }
        let n = heads.len() as u16;
        let last = self.guest.last_avail();
        let in_order =
            heads.iter().enumerate().all(|(k, (_, g))| self.guest.ring().avail_entry(last.wrapping_sub(n).wrapping_add(k as u16)) == *g);
        if !in_order {
            return Rewound { chains: 0, returned: n };
        }
        for (shadow_head, _) in heads {
            match shadow_head {
                Some(h) => {
                    self.shadow.reclaim(h);
                    if let Some(Err(f)) = self.in_flight.untrack(h) {
                        let _ = self.release(f.out_buf, f.in_buf);
                    }
                }
                None => self.held = None,
            }
        }
        self.guest.rewind(n);
        Rewound { chains: n, returned: 0 }
    }
}
