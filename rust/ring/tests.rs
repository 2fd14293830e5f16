//! The writer and the reader against each other on one ring in host memory.

use super::layout::*;
use super::mock::HeapRing;
use super::*;

struct Flat {
    tables: std::collections::HashMap<u64, Vec<Descriptor>>,
}
impl BufferSpace for Flat {
    const NAME: &'static str = "test memory";
    fn check(&self, addr: u64, len: u64, _write: bool) -> bool {
        addr >= 0x1000 && addr.checked_add(len).is_some_and(|e| e <= 0x10_0000)
    }
    fn read_desc(&self, table: u64, i: u32) -> Option<Descriptor> {
        self.tables.get(&table)?.get(i as usize).copied()
    }
}
fn flat() -> Flat {
    Flat { tables: Default::default() }
}

fn buf(addr: u64, len: u32, write: bool) -> Buf {
    Buf { addr, len, write }
}

#[test]
fn chains_round_trip_across_index_wraparound() {
    for base in [0u16, 65500, 65535] {
        let t = HeapRing::new(8).unwrap();
        let mut w = RingWriter::new(t.ring(), base, false);
        let mut r = RingReader::new(t.ring(), base, false, false);
        let mut chain = Chain::default();
        for round in 0..200u32 {
            let n = (round % 3 + 1) as usize;
            let bufs: Vec<Buf> = (0..n).map(|k| buf(0x1000 * (k as u64 + 1), 100 + k as u32, k + 1 == n)).collect();
            let head = w.add(&bufs).unwrap();
            w.publish();
            assert!(r.pop(&flat(), &mut chain).unwrap());
            assert_eq!(chain.head, head);
            assert_eq!(chain.out.len() + chain.inn.len(), n);
            assert_eq!(chain.in_len, 100 + n as u64 - 1);
            r.push_used(chain.head, 7);
            r.publish_used();
            assert_eq!(w.pop_used().unwrap(), Some((head, 7)));
            assert_eq!(w.num_free(), 8);
        }
        assert_eq!(r.last_avail(), base.wrapping_add(200));
    }
}

#[test]
fn full_ring_refuses_and_recovers() {
    let t = HeapRing::new(4).unwrap();
    let mut w = RingWriter::new(t.ring(), 0, false);
    let mut r = RingReader::new(t.ring(), 0, false, false);
    let two = [buf(0x1000, 1, false), buf(0x2000, 1, true)];
    w.add(&two).unwrap();
    w.add(&two).unwrap();
    assert_eq!(w.add(&[buf(0x1000, 1, false)]).unwrap_err().free, 0);
    let five: Vec<Buf> = (0..5).map(|_| buf(0x1000, 1, false)).collect();
    assert_eq!(w.add(&five).unwrap_err().size, 4);
    w.publish();
    let mut c = Chain::default();
    r.pop(&flat(), &mut c).unwrap();
    r.push_used(c.head, 1);
    r.publish_used();
    w.pop_used().unwrap().unwrap();
    assert_eq!(w.num_free(), 2);
    w.add(&two).unwrap();
}

fn raw(t: &HeapRing, descs: &[(u16, Descriptor)], heads: &[u16]) {
    for (i, d) in descs {
        t.ring().set_desc(*i, *d);
    }
    for (k, h) in heads.iter().enumerate() {
        t.ring().set_avail_entry(k as u16, *h);
    }
    t.ring().set_avail_idx(heads.len() as u16);
}

fn pop_err(t: &HeapRing, indirect: bool, mem: &Flat) -> ChainError {
    let mut r = RingReader::new(t.ring(), 0, false, indirect);
    r.pop(mem, &mut Chain::default()).unwrap_err()
}

#[test]
fn reader_refuses_what_a_hostile_driver_writes() {
    let n = VRING_DESC_F_NEXT;
    let wr = VRING_DESC_F_WRITE;
    let d = Descriptor::new;
    type Case = (Vec<(u16, Descriptor)>, Vec<u16>, fn(&ChainError) -> bool);
    let cases: Vec<Case> = vec![
        (vec![(0, d(0x1000, 8, n, 1)), (1, d(0x1000, 8, n, 0))], vec![0], |e| matches!(e, ChainError::ChainTooLong { .. })),
        (vec![(0, d(0x1000, 8, n, 9))], vec![0], |e| matches!(e, ChainError::NextOutOfRange { next: 9, .. })),
        (vec![], vec![12], |e| matches!(e, ChainError::HeadOutOfRange { head: 12, .. })),
        (vec![(0, d(0x1000, 0, 0, 0))], vec![0], |e| matches!(e, ChainError::ZeroLength { .. })),
        (vec![(0, d(u64::MAX - 3, 8, 0, 0))], vec![0], |e| matches!(e, ChainError::BadAddress { .. })),
        (vec![(0, d(0x20_0000, 8, 0, 0))], vec![0], |e| matches!(e, ChainError::BadAddress { .. })),
        (vec![(0, d(0x1000, 8, wr | n, 1)), (1, d(0x2000, 8, 0, 0))], vec![0], |e| matches!(e, ChainError::ReadAfterWrite { .. })),
        (vec![(0, d(0x8000, 32, VRING_DESC_F_INDIRECT, 0))], vec![0], |e| matches!(e, ChainError::IndirectNotNegotiated { .. })),
    ];
    for (descs, heads, ok) in cases {
        let t = HeapRing::new(8).unwrap();
        raw(&t, &descs, &heads);
        let e = pop_err(&t, false, &flat());
        assert!(ok(&e), "unexpected {e}");
    }
}

#[test]
fn indirect_tables_are_validated() {
    let d = Descriptor::new;
    let n = VRING_DESC_F_NEXT;
    let ind = VRING_DESC_F_INDIRECT;
    let mut mem = flat();
    mem.tables.insert(0x8000, vec![d(0x1000, 8, n, 1), d(0x2000, 16, VRING_DESC_F_WRITE, 0)]);
    mem.tables.insert(0x9000, vec![d(0x1000, 8, ind, 0)]);
    mem.tables.insert(0xa000, vec![d(0x1000, 8, n, 0)]);

    let t = HeapRing::new(8).unwrap();
    raw(&t, &[(0, d(0x8000, 32, ind, 0))], &[0]);
    let mut r = RingReader::new(t.ring(), 0, false, true);
    let mut c = Chain::default();
    assert!(r.pop(&mem, &mut c).unwrap());
    assert_eq!((c.out.len(), c.inn.len(), c.in_len), (1, 1, 16));

    for (desc, want) in [
        (d(0x8000, 24, ind, 0), "IndirectLength"),
        (d(0x8000, 0, ind, 0), "IndirectLength"),
        (d(0x9000, 16, ind, 0), "NestedIndirect"),
        (d(0xa000, 16, ind, 0), "ChainTooLong"),
        (d(0x8000, 32, ind | n, 1), "NestedIndirect"),
        (d(0x20_0000, 32, ind, 0), "BadAddress"),
        (d(0x8008, 32, ind, 0), "IndirectUnreadable"),
    ] {
        let t = HeapRing::new(8).unwrap();
        raw(&t, &[(0, desc)], &[0]);
        let e = pop_err(&t, true, &mem);
        assert!(format!("{e:?}").starts_with(want), "{desc:?}: {e:?}");
    }
}

#[test]
fn an_indirect_table_after_direct_descriptors_is_refused() {
    let d = Descriptor::new;
    let mut mem = flat();
    mem.tables.insert(0x8000, vec![d(0x1000, 8, 0, 0)]);
    let t = HeapRing::new(8).unwrap();
    raw(&t, &[(0, d(0x1000, 8, VRING_DESC_F_NEXT, 1)), (1, d(0x8000, 16, VRING_DESC_F_INDIRECT, 0))], &[0]);
    assert!(matches!(pop_err(&t, true, &mem), ChainError::NestedIndirect { head: 0 }));
}

#[test]
fn avail_index_jump_is_refused_without_consuming() {
    let t = HeapRing::new(8).unwrap();
    t.ring().set_avail_idx(9);
    let mut r = RingReader::new(t.ring(), 0, false, false);
    assert!(matches!(r.pop(&flat(), &mut Chain::default()), Err(ChainError::AvailIdxJump { .. })));
    assert_eq!(r.last_avail(), 0);
}

#[test]
fn hostile_used_entries_are_refused() {
    let t = HeapRing::new(8).unwrap();
    let mut w = RingWriter::new(t.ring(), 0, false);
    let head = w.add(&[buf(0x1000, 4, false), buf(0x2000, 10, true)]).unwrap();
    w.publish();
    let check = |w: &mut RingWriter, id: u32, len: u32, idx: u16| {
        t.ring().set_used_entry(0, id, len);
        t.ring().set_used_idx(idx);
        w.pop_used()
    };
    assert_eq!(check(&mut w, 8, 0, 1), Err(UsedError::IdOutOfRange { id: 8, size: 8 }));
    assert_eq!(check(&mut w, 5, 0, 1), Err(UsedError::IdNotInFlight { id: 5 }));
    assert_eq!(check(&mut w, head as u32, 11, 1), Err(UsedError::LenTooLarge { id: 0, len: 11, writable: 10 }));
    assert!(matches!(check(&mut w, head as u32, 1, 9), Err(UsedError::UsedIdxJump { .. })));
    assert!(matches!(check(&mut w, head as u32, 1, 0xffff), Err(UsedError::UsedIdxJump { .. })));
    assert_eq!(check(&mut w, head as u32, 10, 1), Ok(Some((head, 10))));
    // Completing the same id twice.
    assert_eq!(check(&mut w, head as u32, 0, 2).unwrap_err(), UsedError::IdNotInFlight { id: 0 });
}

#[test]
fn event_idx_suppresses_kicks_and_calls() {
    let t = HeapRing::new(256).unwrap();
    let mut w = RingWriter::new(t.ring(), 65500, true);
    let mut r = RingReader::new(t.ring(), 65500, true, false);
    let mut kicks = 0;
    let mut chain = Chain::default();
    // The device asks to be kicked once, then processes in bursts of 32 without re-arming
    // until the burst is done.
    r.enable_notify();
    for burst in 0..10 {
        for _ in 0..32 {
            w.add(&[buf(0x1000, 64, false)]).unwrap();
            if w.publish() {
                kicks += 1;
            }
        }
        r.disable_notify();
        while r.pop(&flat(), &mut chain).unwrap() {
            r.push_used(chain.head, 0);
        }
        let signal = r.publish_used();
        assert!(!r.enable_notify(), "burst {burst}");
        // Driver had used_event at its initial value: only the first publish crosses it.
        assert_eq!(signal, burst == 0);
        while w.pop_used().unwrap().is_some() {}
    }
    assert_eq!(kicks, 10, "one kick per burst");
}
