//! What each shadow head in flight stands for: a guest chain (by its head), or an element
//! with more to remember (bounce buffers, private bytes, an injector's slot).

use std::sync::Arc;

use super::inject::InjectSlot;
use crate::bounce::BounceBuf;
use crate::ring::{Chain, Segment};
use crate::virtio::PAGE_SIZE;

/// Where an element came from.
#[derive(Debug)]
pub(super) enum Origin {
    /// A guest chain, by its head.
    Guest(u16),
    /// svq's own element, completed through its slot.
    Injected(Arc<InjectSlot>),
}

impl Origin {
    /// The element, as faults name it.
    pub(super) fn describe(&self) -> String {
        match self {
            Origin::Guest(h) => format!("chain {h}"),
            Origin::Injected(_) => "an injected element".into(),
        }
    }
}

/// An element on its way to the shadow ring.
#[derive(Debug)]
pub(super) struct Element {
    pub(super) origin: Origin,
    /// The guest chain (empty for injected elements).
    pub(super) chain: Chain,
    /// A private copy of the readable bytes, when a hook needs them or svq made them.
    pub(super) out_bytes: Option<Vec<u8>>,
    pub(super) out_len: u64,
    pub(super) in_len: u64,
}

impl Element {
    /// A guest chain as an element.
    pub(super) fn guest(chain: Chain) -> Self {
        Element { origin: Origin::Guest(chain.head), out_len: chain.out_len, in_len: chain.in_len, chain, out_bytes: None }
    }
}

/// An element on the shadow ring with more to remember than its guest head.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) origin: Origin,
    pub(super) out_buf: Option<BounceBuf>,
    pub(super) in_buf: Option<BounceBuf>,
    /// The guest's writable segments (copy-back target, or what hooks read in translate).
    pub(super) guest_in: Vec<Segment>,
    pub(super) out_bytes: Option<Vec<u8>>,
}

/// A slot of the table. A translated guest element with nothing else to remember (the
/// common case) is just the guest's head, with no allocation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Slot {
    #[default]
    Free,
    Guest(u16),
    Rich,
}

/// The guest pages a translated chain's writable buffers cover, noted as the chain is
/// popped while a dirty log is attached: reaping it then marks them without reading the
/// guest's descriptors again (which the guest could have changed meanwhile).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteSpan {
    /// Nothing noted (no writable buffer yet, or popped while no log was attached).
    #[default]
    Unknown,
    /// One writable buffer: what the device wrote is its first used-length bytes.
    One { addr: u64, len: u32 },
    /// Writable buffers whose pages form the one run `first..=last`; what the device
    /// wrote is that run only when it wrote all `total` bytes.
    Run { first: u64, last: u64, total: u64 },
    /// Writable buffers on pages apart: the chain is walked again.
    Scattered,
}

impl WriteSpan {
    /// The pages `first..=last` written when the device reports `len` bytes, if the span
    /// knows them.
    #[inline]
    pub(super) fn written_pages(self, len: u32) -> Option<(u64, u64)> {
        match self {
            WriteSpan::One { addr, len: cap } => {
                let n = u64::from(len.min(cap));
                (n > 0).then(|| (addr / PAGE_SIZE, (addr + n - 1) / PAGE_SIZE))
            }
            WriteSpan::Run { first, last, total } if u64::from(len) == total => Some((first, last)),
            _ => None,
        }
    }
}

/// Builds a chain's [`WriteSpan`] from its writable buffers as the reader validates them
/// (a few plain fields: this runs in the pop).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct SpanNotes {
    /// The first buffer (`len` 0: none yet; the reader refuses empty buffers).
    addr: u64,
    len: u32,
    /// From the second buffer on: the last page of the run so far and the bytes of every
    /// buffer (`total` 0: one buffer only).
    last: u64,
    total: u64,
    /// A buffer did not continue the run.
    apart: bool,
}

impl SpanNotes {
    /// Adds the chain's next writable buffer (validated guest memory: no wrap).
    #[inline]
    pub(super) fn add(&mut self, seg: Segment) {
        if self.len == 0 {
            (self.addr, self.len) = (seg.addr, seg.len);
        } else {
            self.add_more(seg);
        }
    }

    /// A second or later buffer: it continues the run of pages when it starts in the
    /// run's last page or the next one (the buffers of a receive chain follow each other).
    #[inline]
    fn add_more(&mut self, seg: Segment) {
        if self.total == 0 {
            self.last = (self.addr + u64::from(self.len) - 1) / PAGE_SIZE;
            self.total = u64::from(self.len);
        }
        let (first, last) = (seg.addr / PAGE_SIZE, (seg.addr + u64::from(seg.len) - 1) / PAGE_SIZE);
        self.apart |= first.wrapping_sub(self.last) > 1;
        self.last = self.last.max(last);
        self.total += u64::from(seg.len);
    }

    /// What the buffers seen make.
    #[inline]
    pub(super) fn span(&self) -> WriteSpan {
        if self.len == 0 {
            WriteSpan::Unknown
        } else if self.total == 0 {
            WriteSpan::One { addr: self.addr, len: self.len }
        } else if self.apart {
            WriteSpan::Scattered
        } else {
            WriteSpan::Run { first: self.addr / PAGE_SIZE, last: self.last, total: self.total }
        }
    }
}

/// The table of shadow heads in flight, allocated once with the ring.
#[derive(Debug)]
pub(super) struct InFlightTable {
    slots: Vec<Slot>,
    /// The [`InFlight`] of each head whose slot is [`Slot::Rich`].
    rich: Vec<Option<InFlight>>,
    /// Per head, the pages its guest chain may have written (see [`WriteSpan`]): noted
    /// for every chain popped while a dirty log is attached, forgotten when one is
    /// attached.
    spans: Vec<WriteSpan>,
}

impl InFlightTable {
    pub(super) fn new(size: u16) -> Self {
        InFlightTable {
            slots: vec![Slot::Free; size as usize],
            rich: (0..size).map(|_| None).collect(),
            spans: vec![WriteSpan::Unknown; size as usize],
        }
    }

    /// Notes the write span of the guest chain on shadow head `head`.
    #[inline]
    pub(super) fn set_span(&mut self, head: u16, span: WriteSpan) {
        if let Some(s) = self.spans.get_mut(head as usize) {
            *s = span;
        }
    }

    /// The write span noted for shadow head `head`.
    #[inline]
    pub(super) fn span(&self, head: u16) -> WriteSpan {
        self.spans.get(head as usize).copied().unwrap_or_default()
    }

    /// Forgets every noted span: chains popped while no log was attached left theirs
    /// stale.
    pub(super) fn forget_spans(&mut self) {
        self.spans.fill(WriteSpan::Unknown);
    }

    /// Records that shadow head `head` carries guest chain `guest` and nothing else.
    #[inline]
    pub(super) fn set_guest(&mut self, head: u16, guest: u16) {
        // The writer hands out only free heads, all below the ring size.
        if let Some(slot) = self.slots.get_mut(head as usize) {
            *slot = Slot::Guest(guest);
        }
    }

    /// Records what shadow head `head` stands for.
    pub(super) fn track(&mut self, head: u16, f: InFlight) {
        let i = head as usize;
        if i >= self.slots.len() {
            return;
        }
        // Elements tracked whole are logged from what they hold, or by a walk.
        self.spans[i] = WriteSpan::Unknown;
        match f {
            InFlight { origin: Origin::Guest(g), out_buf: None, in_buf: None, out_bytes: None, ref guest_in } if guest_in.is_empty() => {
                self.slots[i] = Slot::Guest(g);
            }
            f => {
                self.slots[i] = Slot::Rich;
                self.rich[i] = Some(f);
            }
        }
    }

    /// Takes back what shadow head `head` stood for: the guest head, or the rich entry.
    #[inline]
    pub(super) fn untrack(&mut self, head: u16) -> Option<Result<u16, InFlight>> {
        let i = head as usize;
        match std::mem::take(self.slots.get_mut(i)?) {
            Slot::Free => None,
            Slot::Guest(g) => Some(Ok(g)),
            Slot::Rich => self.rich[i].take().map(Err),
        }
    }

    /// The guest chains in flight, by shadow head.
    pub(super) fn guest_heads(&self) -> Vec<u16> {
        (0..self.slots.len() as u16).filter_map(|h| self.guest_head_of(h).flatten()).collect()
    }

    /// The guest chain on shadow head `head`: `Some(Some(guest head))` for a guest
    /// element, `Some(None)` for svq's own, None when no element is there.
    pub(super) fn guest_head_of(&self, head: u16) -> Option<Option<u16>> {
        match self.slots.get(head as usize)? {
            Slot::Free => None,
            Slot::Guest(g) => Some(Some(*g)),
            Slot::Rich => match &self.rich[head as usize].as_ref()?.origin {
                Origin::Guest(g) => Some(Some(*g)),
                Origin::Injected(_) => Some(None),
            },
        }
    }

    /// The injectors waiting on elements in flight.
    pub(super) fn injected(&self) -> impl Iterator<Item = &Arc<InjectSlot>> {
        self.rich.iter().flatten().filter_map(|f| match &f.origin {
            Origin::Injected(slot) => Some(slot),
            Origin::Guest(_) => None,
        })
    }
}
