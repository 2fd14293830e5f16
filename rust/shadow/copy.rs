//! Copy forwarding: the readable bytes are linearized into one bounce buffer when the
//! element is popped, the writable side gets one zeroed bounce buffer, and ONE descriptor
//! per direction goes on the shadow ring. The device never sees guest memory, and the
//! guest cannot change a command after it was copied. At completion exactly the used
//! length is copied back.

use super::inflight::{Element, InFlight, Origin};
use super::{bump, Sent, ShadowQueue};
use crate::bounce::{BounceBuf, BounceError, BouncePool, Strategy};
use crate::fault::Fault;
use crate::mem::{GuestMemory, MemError};
use crate::ring::{Buf, Segment};

/// How guest elements reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Guest addresses translated to IOVAs.
    Translate,
    /// Bytes copied through bounce buffers.
    Copy(Strategy),
}

/// Where bounce buffers of a queue come from: the session's IOVA space and the address
/// space of the queue's group.
#[derive(Debug, Clone)]
pub struct BounceSpace {
    /// The session's IOVA space.
    pub dma: std::sync::Arc<crate::dma::Dma>,
    /// The queue's address space.
    pub asid: u32,
    /// Strategy for injected elements on translate queues (copy queues have their own).
    pub strategy: Strategy,
}

impl ShadowQueue {
    /// Sends an element in bounce buffers (copy mode, or an injected element): slots are
    /// counted before anything is taken, so a full ring takes nothing.
    pub(super) fn send_copied(&mut self, el: Element) -> Result<Sent, Fault> {
        if let Some(f) = Self::beyond_copy(&el.origin, el.out_len, el.in_len) {
            return Err(f);
        }
        let needed = (el.out_len > 0) as usize + (el.in_len > 0) as usize;
        if needed > self.shadow.size() as usize {
            return Err(self.too_many_descriptors(el.origin.describe(), needed));
        }
        if needed > self.shadow.num_free() as usize {
            return Ok(Sent::Full(el));
        }
        let out = match &el.out_bytes {
            Some(bytes) => Readable::Bytes(bytes),
            None => Readable::Guest(&el.chain.out),
        };
        let (head, out_buf, in_buf) = match self.place_copied(out, el.out_len, el.in_len)? {
            Ok(placed) => placed,
            Err(reason) => {
                self.complete_unsent(el.origin, reason);
                return Ok(Sent::Completed);
            }
        };
        let out_len = el.out_len;
        if let (Some(tap), Some(b), Origin::Guest(_)) = (self.capture.as_deref_mut(), &out_buf, &el.origin) {
            tap.record(out_len, |skip, dst| super::capture::fill_from_bounce(b, skip, dst));
        }
        // The chain's readable list goes back to be reused; its writable list travels with
        // the element (the copy-back target) and comes back at completion.
        let Element { origin, mut chain, out_bytes, .. } = el;
        let guest_in = self.take_inn(&mut chain);
        if self.chain.out.capacity() == 0 {
            self.chain = chain;
        }
        self.in_flight.track(head, InFlight { origin, out_buf, in_buf, guest_in, out_bytes });
        bump(&self.stats.elements, 1);
        bump(&self.stats.bytes_out, out_len);
        Ok(Sent::Yes)
    }

    /// Forwards the guest's chains in copy mode while nothing else waits and no hook or
    /// capture looks at them: each chain is popped into the queue's reusable chain and
    /// linearized from there, with no element built around it. `None` once fewer than two
    /// descriptors are free (an element needs at most two): the general path goes on,
    /// and holds a chain that does not fit; otherwise whether the ring was emptied.
    pub(super) fn forward_copied(&mut self) -> Result<Option<bool>, Fault> {
        let (mut elements, mut bytes_out) = (0u64, 0u64);
        let res = loop {
            if self.shadow.num_free() < 2 {
                break Ok(None);
            }
            let mut chain = std::mem::take(&mut self.chain);
            let popped = self.guest.pop(&*self.mem, &mut chain);
            let (guest_head, out_len, in_len) = (chain.head, chain.out_len, chain.in_len);
            let placed = match popped {
                Ok(true) => match Self::beyond_copy(&Origin::Guest(guest_head), out_len, in_len) {
                    Some(f) => Err(f),
                    None => self.place_copied(Readable::Guest(&chain.out), out_len, in_len),
                },
                Ok(false) => {
                    self.chain = chain;
                    break Ok(Some(false));
                }
                Err(e) => Err(Fault::Chain(e)),
            };
            let (head, out_buf, in_buf) = match placed {
                Ok(Ok(placed)) => placed,
                Ok(Err(reason)) => {
                    self.chain = chain;
                    self.complete_unsent(Origin::Guest(guest_head), reason);
                    continue;
                }
                Err(f) => {
                    self.chain = chain;
                    break Err(f);
                }
            };
            let guest_in = self.take_inn(&mut chain);
            self.chain = chain;
            self.in_flight.track(head, InFlight { origin: Origin::Guest(guest_head), out_buf, in_buf, guest_in, out_bytes: None });
            elements += 1;
            bytes_out += out_len;
        };
        bump(&self.stats.elements, elements);
        bump(&self.stats.bytes_out, bytes_out);
        res
    }

    /// Takes an element's bounce buffers and puts its descriptors on the shadow ring (the
    /// caller counted the room): the shadow head and the buffers; `Ok(Err(reason))` when
    /// no bounce buffer could be had (counted as a map failure; the element completes
    /// unsent).
    fn place_copied(&mut self, out: Readable<'_>, out_len: u64, in_len: u64) -> Result<Result<Placed, String>, Fault> {
        let (out_buf, in_buf) = match self.take_buffers(out, out_len, in_len) {
            Ok(b) => b,
            Err(TakeError::Guest(e)) => return Err(e),
            Err(TakeError::Buffer(reason)) => {
                bump(&self.stats.map_failures, 1);
                return Ok(Err(reason));
            }
        };
        self.bufs.clear();
        if let Some(b) = &out_buf {
            self.bufs.push(Buf { addr: b.iova, len: out_len as u32, write: false });
        }
        if let Some(b) = &in_buf {
            self.bufs.push(Buf { addr: b.iova, len: in_len as u32, write: true });
        }
        // Room was counted, so the add cannot fail; if it did, nothing leaks.
        match self.shadow.add(&self.bufs) {
            Ok(head) => Ok(Ok((head, out_buf, in_buf))),
            Err(_) => {
                let _ = self.release(out_buf, in_buf);
                Err(Fault::Internal("shadow ring accounting: counted room was missing".into()))
            }
        }
    }

    /// Completes an element no bounce buffer could be had for, unsent: the guest gets
    /// length 0, an injector the reason.
    fn complete_unsent(&mut self, origin: Origin, reason: String) {
        let queue = self.index;
        self.finish(origin, 0, Err(super::InjectError::NoBuffer { queue, reason }));
    }

    /// The element's bounce buffers, filled: readable bytes copied now (so a later change
    /// of the guest's buffer changes nothing), writable side zeroed. A failure gives back
    /// whatever was already taken.
    fn take_buffers(&mut self, out: Readable<'_>, out_len: u64, in_len: u64) -> Result<(Option<BounceBuf>, Option<BounceBuf>), TakeError> {
        let mut out_buf = None;
        if out_len > 0 {
            let pool = pool_of(&mut self.bounce, self.bounce_space.as_ref(), self.forwarding, self.index).map_err(TakeError::Buffer)?;
            let b = match out {
                Readable::Bytes(bytes) => pool.alloc_with(bytes).map_err(|e| TakeError::Buffer(e.to_string()))?,
                Readable::Guest(segs) => {
                    let mem = &*self.mem;
                    pool.alloc_filled(out_len as usize, |b| fill_from_guest(mem, b, segs)).map_err(|e| match e {
                        Ok(pool) => TakeError::Buffer(pool.to_string()),
                        Err(MemError::OutOfBounds { addr, len }) => TakeError::Guest(Fault::GuestMemory { addr, len }),
                        Err(other) => TakeError::Buffer(other.to_string()),
                    })?
                }
            };
            out_buf = Some(b);
        }
        let mut in_buf = None;
        if in_len > 0 {
            let taken = pool_of(&mut self.bounce, self.bounce_space.as_ref(), self.forwarding, self.index)
                .and_then(|pool| pool.alloc(in_len as usize).map_err(|e| e.to_string()));
            match taken {
                Ok(b) => in_buf = Some(b),
                Err(reason) => {
                    let _ = self.release(out_buf, None);
                    return Err(TakeError::Buffer(reason));
                }
            }
        }
        Ok((out_buf, in_buf))
    }

    /// Gives an element's bounce buffers back; the first failure (an unmap the device
    /// refused) is returned after both were tried.
    pub(super) fn release(&mut self, out_buf: Option<BounceBuf>, in_buf: Option<BounceBuf>) -> Result<(), BounceError> {
        let mut first = Ok(());
        for b in [out_buf, in_buf].into_iter().flatten() {
            if let Some(Err(e)) = self.bounce.as_mut().map(|p| p.free(b)) {
                first = first.and(Err(e));
            }
        }
        first
    }

    /// Copies exactly `len` written bytes from the element's writable bounce buffer back
    /// into the guest's writable segments.
    pub(super) fn copy_back(&self, in_buf: &BounceBuf, guest_in: &[Segment], len: u32) -> Result<(), Fault> {
        let src = in_buf.slice();
        let mut at = 0usize;
        let len = (len as usize).min(src.len());
        for s in guest_in {
            let n = (s.len as usize).min(len - at);
            if n == 0 {
                break;
            }
            let mut piece_at = at;
            self.mem
                .for_each_piece(s.addr, n as u64, |dst| {
                    dst.copy_from(0, &src, piece_at, dst.len());
                    piece_at += dst.len();
                })
                .map_err(|_| Fault::GuestMemory { addr: s.addr, len: n as u64 })?;
            at += n;
        }
        Ok(())
    }
}

/// An element's shadow head and bounce buffers (readable, writable), once placed.
type Placed = (u16, Option<BounceBuf>, Option<BounceBuf>);

/// Where an element's readable bytes come from.
#[derive(Clone, Copy)]
enum Readable<'a> {
    /// The guest's readable segments.
    Guest(&'a [Segment]),
    /// A private copy (an injected element, or one a hook rewrote).
    Bytes(&'a [u8]),
}

enum TakeError {
    /// The guest's buffer is not guest memory (the queue breaks).
    Guest(Fault),
    /// No bounce buffer (the element completes unsent).
    Buffer(String),
}

/// The queue's bounce pool, made on first use (copy queues get theirs up front;
/// translate queues only when something is injected).
fn pool_of<'a>(
    bounce: &'a mut Option<BouncePool>,
    space: Option<&BounceSpace>,
    forwarding: Forwarding,
    index: u32,
) -> Result<&'a mut BouncePool, String> {
    if bounce.is_none() {
        let s = space.ok_or_else(|| format!("queue {index} has no bounce buffer space"))?;
        let strategy = match forwarding {
            Forwarding::Copy(st) => st,
            Forwarding::Translate => s.strategy,
        };
        *bounce = Some(BouncePool::new(s.dma.clone(), s.asid, strategy, 1).map_err(|e| e.to_string())?);
    }
    bounce.as_mut().ok_or_else(|| "no bounce pool".to_string())
}

/// Copies the guest's readable segments into `b` from its start, region piece by region
/// piece, guest memory to bounce buffer directly.
fn fill_from_guest(mem: &GuestMemory, b: &mut BounceBuf, segs: &[Segment]) -> Result<(), MemError> {
    let mut at = 0usize;
    for s in segs {
        mem.for_each_piece(s.addr, s.len as u64, |piece| {
            b.write_shared(at, &piece);
            at += piece.len();
        })?;
    }
    Ok(())
}
