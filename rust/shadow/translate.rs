//! Translate forwarding (zero copy): each guest buffer becomes shadow buffers at the IOVAs
//! where that guest memory is mapped for the device.

use super::inflight::{Element, InFlight, Origin, SpanNotes};
use super::{bump, Sent, ShadowQueue};
use crate::fault::Fault;
use crate::ring::{Buf, ChainSink, Segment};

/// Where one guest memory region is mapped for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionIova {
    /// First guest address.
    pub gpa: u64,
    /// Length.
    pub size: u64,
    /// IOVA of `gpa`.
    pub iova: u64,
}

/// Translates guest segments straight into shadow buffers while the reader validates
/// them (no chain is collected). The first untranslatable address is kept and reported
/// once the reader accepted the whole chain, so a chain's reader errors come first, as
/// when translating after the pop. With `log` (a dirty log is attached) it also notes the
/// pages the writable segments cover.
struct Translator<'a> {
    regions: &'a [RegionIova],
    bufs: &'a mut Vec<Buf>,
    out_len: u64,
    unmapped: Option<u64>,
    log: bool,
    span: SpanNotes,
}

impl ChainSink for Translator<'_> {
    #[inline]
    fn segment(&mut self, seg: Segment, write: bool) {
        if !write {
            self.out_len += seg.len as u64;
        } else if self.log {
            self.span.add(seg);
        }
        if self.unmapped.is_none() {
            if let Err(addr) = translate_segment(self.regions, seg, write, self.bufs) {
                self.unmapped = Some(addr);
            }
        }
    }
}

/// Appends the shadow buffers of one guest segment (one per region it spans); the first
/// address no region maps on failure.
#[inline]
fn translate_segment(regions: &[RegionIova], s: Segment, write: bool, bufs: &mut Vec<Buf>) -> Result<(), u64> {
    let mut addr = s.addr;
    let end = s.addr + s.len as u64;
    while addr < end {
        let r = regions.iter().find(|r| addr >= r.gpa && addr - r.gpa < r.size).ok_or(addr)?;
        let n = (r.gpa + r.size).min(end) - addr;
        bufs.push(Buf { addr: r.iova + (addr - r.gpa), len: n as u32, write });
        addr += n;
    }
    Ok(())
}

/// Appends the shadow buffers of every segment.
pub(super) fn translate_all(regions: &[RegionIova], segs: &[Segment], write: bool, bufs: &mut Vec<Buf>) -> Result<(), Fault> {
    for s in segs {
        translate_segment(regions, *s, write, bufs).map_err(|addr| Fault::GuestAddressUnmapped { addr })?;
    }
    Ok(())
}

impl ShadowQueue {
    /// Forwards the guest's chains in translate mode without hooks: each chain is
    /// validated by the reader and translated in the same walk, straight into shadow
    /// buffers; the shadow head remembers only the guest head. Returns whether a chain
    /// had to wait for room (it is then `held`, popped as a whole like any other).
    pub(super) fn forward_translated(&mut self) -> Result<bool, Fault> {
        let log = self.log.is_some();
        let size = self.shadow.size() as usize;
        let (mut elements, mut bytes_out) = (0u64, 0u64);
        let res = loop {
            self.bufs.clear();
            let mut t =
                Translator { regions: &self.regions, bufs: &mut self.bufs, out_len: 0, unmapped: None, log, span: SpanNotes::default() };
            let head = match self.guest.pop_with(&*self.mem, &mut t) {
                Ok(Some(head)) => head,
                Ok(None) => break Ok(false),
                Err(e) => break Err(Fault::Chain(e)),
            };
            let (out_len, unmapped, span) = (t.out_len, t.unmapped, t.span);
            if let Some(addr) = unmapped {
                break Err(Fault::GuestAddressUnmapped { addr });
            }
            if self.bufs.len() > size {
                break Err(self.too_many_descriptors(Origin::Guest(head).describe(), self.bufs.len()));
            }
            match self.shadow.add(&self.bufs) {
                Ok(shead) => {
                    self.in_flight.set_guest(shead, head);
                    if log {
                        self.in_flight.set_span(shead, span.span());
                    }
                    elements += 1;
                    bytes_out += out_len;
                }
                Err(_) => {
                    // No room: take the chain again as a whole element that waits.
                    self.guest.unpop();
                    break self.hold_guest_chain();
                }
            }
        };
        bump(&self.stats.elements, elements);
        bump(&self.stats.bytes_out, bytes_out);
        res
    }

    /// Pops the chain `forward_translated` could not place and keeps it for later.
    #[cold]
    fn hold_guest_chain(&mut self) -> Result<bool, Fault> {
        let mut chain = std::mem::take(&mut self.chain);
        match self.guest.pop(&*self.mem, &mut chain) {
            Ok(true) => {}
            // The chain was just validated; the guest changed it meanwhile.
            Ok(false) => return Ok(false),
            Err(e) => return Err(Fault::Chain(e)),
        }
        self.held = Some(Element::guest(chain));
        bump(&self.stats.held, 1);
        Ok(true)
    }

    /// Sends a popped guest element with its addresses translated.
    pub(super) fn send_translated(&mut self, el: Element) -> Result<Sent, Fault> {
        self.bufs.clear();
        translate_all(&self.regions, &el.chain.out, false, &mut self.bufs)?;
        translate_all(&self.regions, &el.chain.inn, true, &mut self.bufs)?;
        if self.bufs.len() > self.shadow.size() as usize {
            return Err(self.too_many_descriptors(el.origin.describe(), self.bufs.len()));
        }
        let Ok(head) = self.shadow.add(&self.bufs) else { return Ok(Sent::Full(el)) };
        let out_len = el.out_len;
        let Element { origin, mut chain, out_bytes, .. } = el;
        if let Some(tap) = self.capture.as_deref_mut() {
            let mem = &*self.mem;
            tap.record(out_len, |skip, dst| super::capture::fill_from_guest(mem, &chain.out, skip, dst));
        }
        // Hooks (and a capture) read what the device wrote from the guest's writable
        // segments.
        let keep = !self.hooks.is_empty() || (self.capture.is_some() && !chain.inn.is_empty());
        let guest_in = if keep { self.take_inn(&mut chain) } else { Vec::new() };
        self.chain = chain;
        self.in_flight.track(head, InFlight { origin, out_buf: None, in_buf: None, guest_in, out_bytes });
        bump(&self.stats.elements, 1);
        bump(&self.stats.bytes_out, out_len);
        Ok(Sent::Yes)
    }
}
