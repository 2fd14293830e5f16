//! One shadow virtqueue: pops the guest's chains, forwards them on the shadow ring with
//! every guest address translated to the IOVA where that guest memory is mapped, reaps and
//! validates the device's used entries, and completes the guest's chains.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::eventfd::EventFd;
use crate::mem::GuestMemory;
use crate::ring::{Buf, Chain, RingReader, RingWriter};

/// Which party broke a queue, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The guest wrote an invalid chain or index.
    Guest,
    /// The device wrote an invalid used entry.
    DeviceProtocol,
    /// The device entered NEEDS_RESET (e.g. its IOTLB refused an access).
    DeviceNeedsReset,
    /// An element can never fit the shadow ring.
    TooLarge,
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
}

impl QueueHealth {
    /// The fault that broke the queue, if any.
    pub fn fault(&self) -> Option<QueueFault> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks the queue broken (the first fault wins).
    pub fn set(&self, kind: FaultKind, message: String) {
        let mut f = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(QueueFault { kind, message });
        }
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
            ("errors", l(&self.errors)),
        ]
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Where one guest memory region is mapped for the device.
#[derive(Debug, Clone, Copy)]
pub struct RegionIova {
    /// First guest address.
    pub gpa: u64,
    /// Length.
    pub size: u64,
    /// IOVA of `gpa`.
    pub iova: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    guest_head: u16,
}

/// The eventfds of a shadowed queue.
#[derive(Debug)]
pub struct ShadowFds {
    /// The guest kicks this.
    pub guest_kick: Arc<EventFd>,
    /// We call the guest through this.
    pub guest_call: Arc<EventFd>,
    /// We kick the device through this.
    pub device_kick: EventFd,
    /// The device calls us through this.
    pub device_call: EventFd,
}

/// One shadow virtqueue in translate mode.
#[derive(Debug)]
pub struct ShadowQueue {
    /// Queue index on the device.
    pub index: u32,
    guest: RingReader,
    shadow: RingWriter,
    mem: Arc<GuestMemory>,
    regions: Vec<RegionIova>,
    in_flight: Vec<Option<InFlight>>,
    /// A popped chain waiting for shadow ring space.
    pending: Option<Chain>,
    chain: Chain,
    bufs: Vec<Buf>,
    /// The queue's eventfds.
    pub fds: ShadowFds,
    stats: Arc<QueueStats>,
    health: Arc<QueueHealth>,
}

impl ShadowQueue {
    /// A shadow queue between `guest` (reader over the guest ring) and `shadow` (writer
    /// over the shadow ring the device reads).
    pub fn new(
        index: u32,
        guest: RingReader,
        shadow: RingWriter,
        mem: Arc<GuestMemory>,
        regions: Vec<RegionIova>,
        fds: ShadowFds,
        stats: Arc<QueueStats>,
        health: Arc<QueueHealth>,
    ) -> Self {
        let size = shadow.size() as usize;
        ShadowQueue {
            index,
            guest,
            shadow,
            mem,
            regions,
            in_flight: vec![None; size],
            pending: None,
            chain: Chain::default(),
            bufs: Vec::with_capacity(8),
            fds,
            stats,
            health,
        }
    }

    /// The avail index published on the shadow ring (what the device's vring base
    /// reaches once it consumed everything).
    pub fn shadow_avail_idx(&self) -> u16 {
        self.shadow.avail_idx()
    }

    /// Elements forwarded and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.shadow.in_flight()
    }

    /// The queue's counters.
    pub fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Whether the queue was broken.
    pub fn is_broken(&self) -> bool {
        self.health.fault().is_some()
    }

    /// Marks the queue broken and wakes the guest so that a waiter sees it.
    pub fn fail(&mut self, kind: FaultKind, message: String) {
        bump(&self.stats.errors, 1);
        self.health.set(kind, format!("queue {}: {message}", self.index));
        self.fds.guest_call.signal();
    }

    fn translate(&mut self, segs_in: bool) -> Result<(), String> {
        let segs = if segs_in { &self.chain.inn } else { &self.chain.out };
        for s in segs {
            let mut addr = s.addr;
            let end = s.addr + s.len as u64;
            while addr < end {
                let r = self
                    .regions
                    .iter()
                    .find(|r| addr >= r.gpa && addr < r.gpa + r.size)
                    .ok_or_else(|| format!("guest address {addr:#x} is not mapped for the device"))?;
                let n = (r.gpa + r.size).min(end) - addr;
                self.bufs.push(Buf { addr: r.iova + (addr - r.gpa), len: n as u32, write: segs_in });
                addr += n;
            }
        }
        Ok(())
    }

    /// Handles a guest kick: forwards every available chain that fits, then kicks the
    /// device once.
    pub fn forward(&mut self) {
        if self.is_broken() {
            return;
        }
        loop {
            self.guest.disable_notify();
            let mut held = false;
            loop {
                if let Some(p) = self.pending.take() {
                    self.chain = p;
                } else {
                    match self.guest.pop(&*self.mem, &mut self.chain) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => return self.fail(FaultKind::Guest, e.to_string()),
                    }
                }
                self.bufs.clear();
                if let Err(e) = self.translate(false).and_then(|_| self.translate(true)) {
                    return self.fail(FaultKind::Guest, e);
                }
                if self.bufs.len() > self.shadow.size() as usize {
                    let msg = format!(
                        "chain {} needs {} shadow descriptors; the shadow ring has {}",
                        self.chain.head,
                        self.bufs.len(),
                        self.shadow.size()
                    );
                    return self.fail(FaultKind::TooLarge, msg);
                }
                match self.shadow.add(&self.bufs) {
                    Ok(head) => {
                        self.in_flight[head as usize] = Some(InFlight { guest_head: self.chain.head });
                        bump(&self.stats.elements, 1);
                        bump(&self.stats.bytes_out, self.chain.out_len);
                    }
                    Err(_) => {
                        // Full: hold the chain until completions free descriptors.
                        self.pending = Some(std::mem::take(&mut self.chain));
                        bump(&self.stats.held, 1);
                        held = true;
                        break;
                    }
                }
            }
            self.kick_device();
            // While a chain is held, guest kicks are not needed: reaping resumes us.
            if held || !self.guest.enable_notify() {
                return;
            }
        }
    }

    fn kick_device(&mut self) {
        if self.shadow.publish() {
            self.fds.device_kick.signal();
            bump(&self.stats.device_kicks, 1);
        } else {
            bump(&self.stats.device_kicks_suppressed, 1);
        }
    }

    /// Handles a device call: reaps and validates used entries, completes the guest's
    /// chains, then forwards anything that was waiting for space.
    pub fn reap(&mut self) {
        if self.is_broken() {
            return;
        }
        loop {
            self.shadow.disable_cb();
            loop {
                match self.shadow.pop_used() {
                    Ok(Some((head, len))) => {
                        // The writer only returns heads it has in flight.
                        let Some(f) = self.in_flight[head as usize].take() else {
                            return self.fail(FaultKind::DeviceProtocol, format!("used id {head} has no element"));
                        };
                        self.guest.push_used(f.guest_head, len);
                        bump(&self.stats.completed, 1);
                        bump(&self.stats.bytes_in, len as u64);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.call_guest();
                        return self.fail(FaultKind::DeviceProtocol, e.to_string());
                    }
                }
            }
            self.call_guest();
            if !self.shadow.enable_cb() {
                break;
            }
        }
        if self.pending.is_some() {
            self.forward();
        }
    }

    fn call_guest(&mut self) {
        if self.guest.publish_used() {
            self.fds.guest_call.signal();
            bump(&self.stats.guest_calls, 1);
        } else {
            bump(&self.stats.guest_calls_suppressed, 1);
        }
    }
}
