//! `pop_guest_ring`: a hostile guest writes its descriptor table, avail ring and indirect
//! tables; svq's [`RingReader`] pops them. Every outcome is compared with a reference
//! walker written from the virtio spec (2.7.5, 2.7.13), and every popped chain is checked:
//! segments inside memory and non-empty, out before in, lengths summed, at most queue-size
//! segments when no indirect table is involved.
//!
//! Input layout (all decoded by [`Input`], zeros past the end):
//! `size_log2 flags base:u16 ntables {table}* {desc}*size avail_delta {entry}*size
//! used_event:u16 avail_flags {op}*`; `flags` bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bit 2
//! real [`GuestMemory`] (memfd regions) instead of the in-harness fake. See [`desc`] for
//! the compact descriptor encoding and [`run`] for the ops.

use std::collections::HashMap;
use std::sync::OnceLock;

use svq::mem::GuestMemory;
use svq::ring::layout::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use svq::ring::{BufferSpace, Chain, ChainError, Descriptor, RingReader, Segment, Vring};

use crate::Input;
use svq::ring::mock::HeapRing;

/// Guest memory: `(gpa, size, device-writable)`. The first two are adjacent (a buffer
/// may straddle them); the third stands alone and, in the fake, is read-only.
pub const REGIONS: [(u64, u64, bool); 3] = [(0x1_0000, 0x1_0000, true), (0x2_0000, 0x1_0000, true), (0x4_0000, 0x8000, false)];

/// An indirect table the input placed in memory.
#[derive(Debug, Clone, Copy)]
struct Table {
    addr: u64,
    entries: u32,
}

/// Memory as the harness models it: which bytes exist, and the 16-byte slots written.
struct Model {
    /// Enforce read-only regions (the fake does; `GuestMemory` has no permissions).
    read_only: bool,
    /// Descriptors written into memory, by address (16-aligned); other slots read as zero.
    slots: HashMap<u64, Descriptor>,
}

impl Model {
    /// Whether every byte of `[addr, addr+len)` is memory (writable when `write`).
    fn check(&self, addr: u64, len: u64, write: bool) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        // Walk the (sorted) regions, requiring each byte to be covered.
        let mut cur = addr;
        while cur < end {
            let Some(&(gpa, size, w)) = REGIONS.iter().find(|(g, s, _)| cur >= *g && cur < g + s) else {
                return false;
            };
            if write && self.read_only && !w {
                return false;
            }
            cur = (gpa + size).min(end);
        }
        len > 0
    }
    fn desc_at(&self, addr: u64) -> Descriptor {
        self.slots.get(&addr).copied().unwrap_or_default()
    }
}

/// The in-harness fake: a [`BufferSpace`] straight over the model.
struct Fake<'a>(&'a Model);

impl BufferSpace for Fake<'_> {
    const NAME: &'static str = "fake memory";
    fn check(&self, addr: u64, len: u64, write: bool) -> bool {
        self.0.check(addr, len, write)
    }
    fn read_desc(&self, table: u64, i: u32) -> Option<Descriptor> {
        let a = table.checked_add(16 * i as u64)?;
        // Like the real spaces: the 16 bytes must be readable memory.
        self.0.check(a, 16, false).then(|| self.0.desc_at(a))
    }
}

fn guest_memory() -> &'static GuestMemory {
    static GM: OnceLock<GuestMemory> = OnceLock::new();
    GM.get_or_init(|| {
        let layout: Vec<(u64, u64)> = REGIONS.iter().map(|&(g, s, _)| (g, s)).collect();
        GuestMemory::new(&layout).expect("memfd guest memory")
    })
}

fn desc_bytes(d: Descriptor) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.addr().to_le_bytes());
    b[8..12].copy_from_slice(&d.len().to_le_bytes());
    b[12..14].copy_from_slice(&d.flags().to_le_bytes());
    b[14..].copy_from_slice(&d.next().to_le_bytes());
    b
}

/// Decodes one descriptor. `k` selects: bits 0-2 the flags NEXT/WRITE/INDIRECT, bit 3 stray
/// high flag bits from the next byte, bits 4-5 the address mode (0: region + u16 offset,
/// u16 length; 1: an indirect table placed by the input, its exact length unless the
/// selector's top bit asks for a byte-sized one; 2: raw u64 address and u32 length; 3: a
/// few bytes before a region's end), then the `next` byte (0xff: a raw u16 follows).
fn desc(inp: &mut Input, tables: &[Table]) -> Descriptor {
    let k = inp.u8();
    let mut flags = (k & 7) as u16;
    if k & 8 != 0 {
        flags |= (inp.u8() as u16) << 3;
    }
    let (addr, len) = match (k >> 4) & 3 {
        0 => {
            let (gpa, _, _) = REGIONS[inp.u8() as usize % 3];
            (gpa + inp.u16() as u64, inp.u16() as u32)
        }
        1 => {
            let t = inp.u8();
            match tables.get(t as usize % tables.len().max(1)) {
                Some(tb) if t & 0x80 == 0 => (tb.addr, tb.entries * 16),
                Some(tb) => (tb.addr, inp.u8() as u32),
                None => (REGIONS[0].0, 16 * (t as u32 & 0xf)),
            }
        }
        2 => (inp.u64(), inp.u32()),
        _ => {
            let (gpa, size, _) = REGIONS[inp.u8() as usize % 3];
            (gpa + size - inp.u8() as u64, inp.u8() as u32)
        }
    };
    let b = inp.u8();
    let next = if b == 0xff { inp.u16() } else { b as u16 };
    Descriptor::new(addr, len, flags, next)
}

/// The spec's rules, walked independently of svq: `Ok((segments as (addr, len, write),
/// whether an indirect table was used))` or `Err(what)`.
type Walk = Result<(Vec<(u64, u32, bool)>, bool), &'static str>;

fn push_seg(mem: &Model, d: Descriptor, segs: &mut Vec<(u64, u32, bool)>) -> Result<(), &'static str> {
    let write = d.flags() & VRING_DESC_F_WRITE != 0;
    if d.is_empty() {
        return Err("zero length");
    }
    if !mem.check(d.addr(), d.len() as u64, write) {
        return Err("outside memory");
    }
    if !write && segs.iter().any(|s| s.2) {
        return Err("read after write");
    }
    segs.push((d.addr(), d.len(), write));
    Ok(())
}

fn model_walk(ring: &Vring, mem: &Model, indirect_ok: bool, head: u16) -> Walk {
    let size = ring.size();
    if head >= size {
        return Err("head out of range");
    }
    let mut segs = Vec::new();
    let mut seen = vec![false; size as usize];
    let mut i = head;
    loop {
        if std::mem::replace(&mut seen[i as usize], true) {
            return Err("loop");
        }
        let d = ring.desc(i);
        if d.flags() & VRING_DESC_F_INDIRECT != 0 {
            // An indirect table is the whole chain: only the head may refer to one.
            if !indirect_ok || d.flags() & VRING_DESC_F_NEXT != 0 || i != head {
                return Err("indirect not allowed here");
            }
            let (addr, len) = (d.addr(), d.len());
            if len == 0 || len % 16 != 0 || len / 16 > size as u32 || addr % 16 != 0 || !mem.check(addr, len as u64, false) {
                return Err("bad indirect table");
            }
            let n = len / 16;
            let mut seen_t = vec![false; n as usize];
            let mut j = 0u32;
            loop {
                if std::mem::replace(&mut seen_t[j as usize], true) {
                    return Err("loop in table");
                }
                let t = mem.desc_at(addr + 16 * j as u64);
                if t.flags() & VRING_DESC_F_INDIRECT != 0 {
                    return Err("nested indirect");
                }
                push_seg(mem, t, &mut segs)?;
                if t.flags() & VRING_DESC_F_NEXT == 0 {
                    return Ok((segs, true));
                }
                if t.next() as u32 >= n {
                    return Err("next outside table");
                }
                j = t.next() as u32;
            }
        }
        push_seg(mem, d, &mut segs)?;
        if d.flags() & VRING_DESC_F_NEXT == 0 {
            return Ok((segs, false));
        }
        if d.next() >= size {
            return Err("next outside ring");
        }
        i = d.next();
    }
}

/// The checks on one popped chain, against the model's walk.
fn check_chain(mem: &Model, size: u16, chain: &Chain, want: &Walk) {
    let (segs, via_table) = match want {
        Ok(w) => w,
        Err(why) => panic!("svq accepted chain {} that the model refuses ({why}): {chain:?}", chain.head),
    };
    let got: Vec<(u64, u32, bool)> =
        chain.out.iter().map(|s| (s.addr, s.len, false)).chain(chain.inn.iter().map(|s| (s.addr, s.len, true))).collect();
    assert_eq!(&got, segs, "chain {} differs from the model", chain.head);
    let sum = |v: &[Segment]| v.iter().map(|s| s.len as u64).sum::<u64>();
    assert_eq!(chain.out_len, sum(&chain.out));
    assert_eq!(chain.in_len, sum(&chain.inn));
    for (s, write) in chain.out.iter().map(|s| (s, false)).chain(chain.inn.iter().map(|s| (s, true))) {
        assert!(s.len > 0, "zero-length segment {s:?}");
        assert!(mem.check(s.addr, s.len as u64, write), "segment {s:?} outside memory");
    }
    let n = got.len();
    if !via_table {
        assert!(n <= size as usize, "direct chain of {n} segments in a queue of {size}");
    } else {
        // Direct descriptors, then one table of at most `size` entries.
        assert!(n < 2 * size as usize, "chain of {n} segments in a queue of {size}");
    }
}

/// The fuzz target.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let size = 1u16 << (inp.u8() % 9);
    let flags = inp.u8();
    let (event_idx, indirect, real_mem) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let base = inp.u16();

    let mut model = Model { read_only: !real_mem, slots: HashMap::new() };
    let mut tables = Vec::new();
    for _ in 0..inp.u8() % 5 {
        let (gpa, rsize, _) = REGIONS[inp.u8() as usize % 3];
        let addr = gpa + (inp.u16() as u64 * 16) % rsize;
        // A few entries, or around the queue size (the most a table may hold).
        let e = inp.u8();
        let entries = if e & 0x80 != 0 { (size as u32 + (e & 3) as u32).saturating_sub(1) } else { (e % 20) as u32 };
        let snapshot = tables.clone();
        for i in 0..entries {
            let d = desc(&mut inp, &snapshot);
            let a = addr + 16 * i as u64;
            if model.check(a, 16, false) {
                model.slots.insert(a, d);
            }
        }
        tables.push(Table { addr, entries });
    }

    let hr = HeapRing::new(size).expect("power-of-two queue size");
    let ring = hr.ring();
    for i in 0..size {
        ring.set_desc(i, desc(&mut inp, &tables));
    }
    let delta = match inp.u8() {
        0xff => inp.u16(),
        d => d as u16,
    };
    ring.set_avail_idx(base.wrapping_add(delta));
    for i in 0..size {
        let head = match inp.u8() {
            0xff => inp.u16(),
            e => e as u16 & (size - 1),
        };
        ring.set_avail_entry(base.wrapping_add(i), head);
    }
    ring.set_used_event(inp.u16());
    ring.set_avail_flags(inp.u8() as u16);

    let gm = real_mem.then(guest_memory);
    if let Some(gm) = gm {
        for (&a, &d) in &model.slots {
            gm.write(a, &desc_bytes(d)).expect("slot inside guest memory");
        }
    }

    let mut r = RingReader::new(ring, base, event_idx, indirect);
    let mut chain = Chain::default();
    let mut last_ok: Option<u16> = None;
    let max_steps = 4 * size as usize + 64;
    for _ in 0..max_steps {
        let op = if inp.is_empty() { 0 } else { inp.u8() % 8 };
        match op {
            0..=2 => {
                let last = r.last_avail();
                let pending = ring.avail_idx().wrapping_sub(last);
                let got = match gm {
                    Some(gm) => r.pop(gm, &mut chain),
                    None => r.pop(&Fake(&model), &mut chain),
                };
                last_ok = None;
                if pending > size {
                    assert!(matches!(got, Err(ChainError::AvailIdxJump { .. })), "pending {pending} of {size}: {got:?}");
                    assert_eq!(r.last_avail(), last, "an index jump consumed a chain");
                    break;
                }
                if pending == 0 {
                    assert_eq!(got, Ok(false));
                    assert_eq!(r.last_avail(), last);
                    if inp.is_empty() {
                        break;
                    }
                    continue;
                }
                assert_eq!(r.last_avail(), last.wrapping_add(1), "pop did not consume exactly one entry");
                let head = ring.avail_entry(last);
                let want = model_walk(&ring, &model, indirect, head);
                match got {
                    Ok(true) => {
                        trace!("pop: chain {head}: {} out, {} in", chain.out.len(), chain.inn.len());
                        assert_eq!(chain.head, head);
                        check_chain(&model, size, &chain, &want);
                        last_ok = Some(head);
                    }
                    Ok(false) => panic!("pop reported an empty ring with {pending} pending"),
                    Err(e) => {
                        trace!("pop: {e}");
                        assert!(want.is_err(), "svq refused chain {head} ({e}) that the model accepts: {want:?}");
                        assert!(!matches!(e, ChainError::AvailIdxJump { .. }));
                    }
                }
            }
            3 => {
                // Complete something: the last popped head, or any id.
                let pick_last = inp.bool();
                let head = match last_ok {
                    Some(h) if pick_last => h,
                    _ => inp.u16(),
                };
                r.push_used(head, inp.u32());
                let _ = r.publish_used();
            }
            4 => {
                if inp.bool() {
                    let _ = r.enable_notify();
                } else {
                    r.disable_notify();
                }
                let _ = r.pending();
            }
            5 => {
                // The guest moves avail.idx and rewrites an entry while we pop.
                let idx = ring.avail_idx().wrapping_add(inp.u8() as u16 % 4);
                ring.set_avail_entry(idx.wrapping_sub(1), inp.u16());
                ring.set_avail_idx(idx);
            }
            6 => {
                let i = inp.u8() as u16 & (size - 1);
                ring.set_desc(i, desc(&mut inp, &tables));
            }
            _ => {
                if last_ok.take().is_some() {
                    let last = r.last_avail();
                    r.unpop();
                    assert_eq!(r.last_avail(), last.wrapping_sub(1));
                }
            }
        }
    }

    if let Some(gm) = gm {
        for &a in model.slots.keys() {
            gm.write(a, &[0u8; 16]).expect("slot inside guest memory");
        }
    }
}
