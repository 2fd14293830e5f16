//! What each shadow head in flight stands for: a guest chain (by its head), or an element
//! with more to remember (bounce buffers, private bytes, an injector's slot).

use std::sync::Arc;

use super::inject::InjectSlot;
use crate::bounce::BounceBuf;
use crate::ring::{Chain, Segment};

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

/// The table of shadow heads in flight, allocated once with the ring.
#[derive(Debug)]
pub(super) struct InFlightTable {
    slots: Vec<Slot>,
    /// The [`InFlight`] of each head whose slot is [`Slot::Rich`].
    rich: Vec<Option<InFlight>>,
}

impl InFlightTable {
    pub(super) fn new(size: u16) -> Self {
        InFlightTable { slots: vec![Slot::Free; size as usize], rich: (0..size).map(|_| None).collect() }
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
