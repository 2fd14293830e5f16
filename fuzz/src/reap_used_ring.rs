//! `reap_used_ring`: svq's [`RingWriter`] adds chains (svq as the driver of the shadow
//! ring), and a hostile device writes whatever it likes into the used ring (and scribbles
//! on the descriptor table). The harness keeps its own model of what is in flight and
//! predicts every `pop_used` outcome exactly: an accepted `(head, len)` must be a head in
//! flight with `len` ≤ its writable bytes; after an error the queue is broken and the run
//! stops. The writer's free list is checked too: every added chain is laid out as asked,
//! on descriptors no other in-flight chain uses, and the free count always adds up.
//!
//! Input: `size_log2 base:u16 event_idx {op}*`, ops decoded in [`run`].

use std::collections::BTreeMap;

use svq::ring::layout::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use svq::ring::{Buf, Descriptor, RingFull, RingWriter, UsedError, Vring};

use crate::Input;
use svq::ring::mock::HeapRing;

/// One chain in flight, as the harness remembers it.
#[derive(Debug)]
struct Flight {
    /// Device-writable bytes (exact, not capped).
    writable: u64,
    /// Descriptor indices the chain occupies.
    descs: Vec<u16>,
}

struct Model {
    size: u16,
    free: u16,
    last_used: u16,
    flights: BTreeMap<u16, Flight>,
}

impl Model {
    fn owner_of(&self, d: u16) -> Option<u16> {
        self.flights.iter().find(|(_, f)| f.descs.contains(&d)).map(|(h, _)| *h)
    }

    /// What `pop_used` must return given what the device wrote.
    fn predict(&self, ring: &Vring) -> Result<Option<(u16, u32)>, UsedError> {
        let idx = ring.used_idx();
        let pending = idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(UsedError::UsedIdxJump { last: self.last_used, idx, size: self.size });
        }
        let (id, len) = ring.used_entry(self.last_used);
        if id >= self.size as u32 {
            return Err(UsedError::IdOutOfRange { id, size: self.size });
        }
        let Some(f) = self.flights.get(&(id as u16)) else {
            return Err(UsedError::IdNotInFlight { id });
        };
        if len as u64 > f.writable {
            return Err(UsedError::LenTooLarge { id, len, writable: f.writable.min(u32::MAX as u64) as u32 });
        }
        Ok(Some((id as u16, len)))
    }

    fn check(&self, w: &RingWriter) {
        assert_eq!(w.num_free(), self.free, "free descriptor count");
        assert_eq!(w.in_flight(), self.flights.len(), "chains in flight");
        assert!(w.in_flight_heads().eq(self.flights.keys().copied()), "in-flight heads");
        let used: usize = self.flights.values().map(|f| f.descs.len()).sum();
        assert_eq!(used + self.free as usize, self.size as usize);
    }
}

/// Follows a freshly added chain through the ring and checks it is laid out as asked on
/// free descriptors; returns the descriptor indices.
fn check_added(ring: &Vring, model: &Model, head: u16, bufs: &[Buf]) -> Vec<u16> {
    let size = ring.size();
    let mut descs = Vec::with_capacity(bufs.len());
    let mut i = head;
    for (k, b) in bufs.iter().enumerate() {
        assert!(i < size, "chain {head} runs outside the table at {i}");
        assert!(!descs.contains(&i), "chain {head} revisits descriptor {i}");
        if let Some(o) = model.owner_of(i) {
            panic!("chain {head} reuses descriptor {i} of in-flight chain {o}");
        }
        descs.push(i);
        let d = ring.desc(i);
        let last = k + 1 == bufs.len();
        let want = (if b.write { VRING_DESC_F_WRITE } else { 0 }) | (if last { 0 } else { VRING_DESC_F_NEXT });
        assert_eq!((d.addr(), d.len(), d.flags()), (b.addr, b.len, want), "descriptor {i} of chain {head}");
        i = d.next();
    }
    descs
}

fn bufs(inp: &mut Input) -> Vec<Buf> {
    let c = inp.u8();
    let n = if c & 0x80 != 0 { inp.u8() as usize } else { (c % 6) as usize };
    (0..n)
        .map(|_| {
            let m = inp.u8();
            let len = if m & 0x80 != 0 { inp.u32() } else { (m & 0x3f) as u32 * 64 + 1 };
            Buf { addr: inp.u16() as u64 * 16, len, write: m & 0x40 != 0 }
        })
        .collect()
}

/// The fuzz target.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let size = 1u16 << (inp.u8() % 9);
    let base = inp.u16();
    let event_idx = inp.bool();
    let hr = HeapRing::new(size).expect("power-of-two queue size");
    let ring = hr.ring();
    let mut w = RingWriter::new(ring, base, event_idx);
    let mut m = Model { size, free: size, last_used: base, flights: BTreeMap::new() };
    m.check(&w);

    for _ in 0..1024 {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 10 {
            0 | 1 => {
                let b = bufs(&mut inp);
                match w.add(&b) {
                    Ok(head) => {
                        assert!(!b.is_empty() && b.len() <= m.free as usize, "add accepted {} bufs with {} free", b.len(), m.free);
                        assert!(!m.flights.contains_key(&head), "head {head} is already in flight");
                        let descs = check_added(&ring, &m, head, &b);
                        let writable = b.iter().filter(|b| b.write).map(|b| b.len as u64).sum();
                        m.free -= descs.len() as u16;
                        m.flights.insert(head, Flight { writable, descs });
                    }
                    Err(e) => {
                        assert_eq!(e, RingFull { needed: b.len(), free: m.free, size });
                        assert!(b.is_empty() || b.len() > m.free as usize, "add refused {} bufs with {} free", b.len(), m.free);
                    }
                }
            }
            2 => {
                let (table, entries, writable) = (inp.u16() as u64 * 16, inp.u16() as u32 % 4096 + 1, inp.u32());
                match w.add_indirect(table, entries, writable) {
                    Ok(head) => {
                        assert!(m.free > 0);
                        assert!(m.owner_of(head).is_none(), "indirect head {head} is in use");
                        let d = ring.desc(head);
                        assert_eq!((d.addr(), d.len(), d.flags()), (table, entries * 16, VRING_DESC_F_INDIRECT));
                        m.free -= 1;
                        m.flights.insert(head, Flight { writable: writable as u64, descs: vec![head] });
                    }
                    Err(e) => assert_eq!(e, RingFull { needed: 1, free: 0, size }),
                }
            }
            3 => {
                let _ = w.publish();
                assert_eq!(ring.avail_idx(), w.avail_idx());
                if inp.bool() {
                    let _ = w.enable_cb();
                } else {
                    w.disable_cb();
                }
            }
            4 => {
                // The device moves used.idx: mostly a little past what we reaped.
                let idx = match inp.u8() {
                    0xff => inp.u16(),
                    d => m.last_used.wrapping_add(d as u16 % 8),
                };
                ring.set_used_idx(idx);
            }
            5 | 6 => {
                // The device writes a used entry: an in-flight head or any id; a length
                // around the chain's writable bytes, or anything.
                let at = m.last_used.wrapping_add(inp.u8() as u16 % 4);
                let sel = inp.u8();
                let heads: Vec<u16> = m.flights.keys().copied().collect();
                let id = match heads.get(sel as usize % heads.len().max(1)) {
                    Some(&h) if sel & 0x80 == 0 => h as u32,
                    _ => inp.u32() % (2 * size as u32 + 1),
                };
                let wr = m.flights.get(&(id as u16)).map_or(0, |f| f.writable.min(u32::MAX as u64) as u32);
                let len = match inp.u8() % 4 {
                    0 => wr,
                    1 => wr.wrapping_add(1),
                    2 => wr / 2,
                    _ => inp.u32(),
                };
                ring.set_used_entry(at, id, len);
                if sel & 0x40 != 0 {
                    ring.set_used_idx(at.wrapping_add(1));
                }
            }
            7 | 8 => {
                let want = m.predict(&ring);
                let got = w.pop_used();
                trace!("pop_used: {got:?}");
                assert_eq!(got, want, "pop_used disagrees with the model");
                match got {
                    Ok(Some((head, _))) => {
                        let f = m.flights.remove(&head).expect("predicted in flight");
                        m.free += f.descs.len() as u16;
                        m.last_used = m.last_used.wrapping_add(1);
                    }
                    Ok(None) => {}
                    // The queue is broken: nothing more may be reaped.
                    Err(_) => break,
                }
            }
            _ => {
                // Reclaim a chain (stop/drain), or scribble on the descriptor table: the
                // writer must not trust anything it reads back from there.
                if inp.bool() {
                    let sel = inp.u16();
                    let heads: Vec<u16> = m.flights.keys().copied().collect();
                    let head = if sel & 0x8000 == 0 && !heads.is_empty() { heads[sel as usize % heads.len()] } else { sel };
                    let was = m.flights.remove(&head);
                    assert_eq!(w.reclaim(head), was.is_some(), "reclaim({head})");
                    if let Some(f) = was {
                        m.free += f.descs.len() as u16;
                    }
                } else {
                    let i = inp.u8() as u16 & (size - 1);
                    ring.set_desc(i, Descriptor::new(inp.u64(), inp.u32(), inp.u16(), inp.u16()));
                }
            }
        }
        m.check(&w);
    }

    // Whatever happened, draining every in-flight chain gives back the whole table.
    let heads: Vec<u16> = m.flights.keys().copied().collect();
    for h in heads {
        assert!(w.reclaim(h));
    }
    assert_eq!(w.num_free(), size);
    assert_eq!(w.in_flight(), 0);
}
