//! `iova_ops`: arbitrary sequences of alloc / insert / remove / find / iova_of_host /
//! iova_of_guest on an [`IovaAllocator`] over a range taken from the input, checked
//! against a naive model (a list of live mappings, holes computed in u128): no overlap,
//! never outside the usable range, never page 0, best fit, exact errors, look-ups
//! consistent with the model.
//!
//! Input: `range_mode first last {op}*`, decoded in [`run`]. Addresses come from a few
//! "neighbourhoods" (low pages, near the range's ends, near `u64::MAX`, raw) so that
//! mappings collide, nest and touch the edges of the 64-bit space.

use svq::iova::{IovaAllocator, IovaError, Mapping, PAGE_SIZE as P};
use svq::virtio::Perm;

use crate::Input;

/// Largest number of live mappings the model keeps (its checks are linear).
const MAX_LIVE: usize = 64;

/// The usable range the allocator must derive from `[first, last]`: page 0 and partial
/// pages at either end excluded. `None` when no whole page remains.
fn usable(first: u64, last: u64) -> Option<(u64, u64)> {
    if first > last {
        return None;
    }
    let lo = (first.max(P) as u128).div_ceil(P as u128) * P as u128;
    let hi = ((last as u128 + 1) / P as u128) * P as u128; // exclusive
    (lo < hi).then(|| (lo as u64, (hi - 1) as u64))
}

/// The smallest hole of at least `size` bytes (lowest start on ties).
fn best_fit(live: &[Mapping], first: u64, last: u64, size: u128) -> Option<u64> {
    let mut spans: Vec<(u128, u128)> = live.iter().map(|m| (m.iova as u128, m.iova as u128 + m.size as u128)).collect();
    spans.sort();
    let mut best: Option<(u128, u128)> = None;
    let mut cur = first as u128;
    let mut consider = |start: u128, end: u128| {
        let len = end - start;
        if len >= size && best.is_none_or(|(bl, bs)| (len, start) < (bl, bs)) {
            best = Some((len, start));
        }
    };
    for (s, e) in spans {
        if s > cur {
            consider(cur, s);
        }
        cur = cur.max(e);
    }
    if cur <= last as u128 {
        consider(cur, last as u128 + 1);
    }
    best.map(|(_, s)| s as u64)
}

fn round_pages(size: u64) -> Option<u64> {
    size.checked_add(P - 1).map(|s| s & !(P - 1))
}

/// An address from one of several neighbourhoods.
fn addr(inp: &mut Input, lo: u64, hi: u64) -> u64 {
    let k = inp.u8();
    let small = inp.u16() as u64;
    match k % 6 {
        0 | 1 => small * 64,               // low addresses: host/guest ranges overlap
        2 => lo.wrapping_add(small * 256), // from the range's start up
        3 => hi.wrapping_sub(small * 256), // from the range's end down
        4 => u64::MAX - small * 256,       // the top of the 64-bit space
        _ => inp.u64(),
    }
}

fn size(inp: &mut Input) -> u64 {
    let k = inp.u8();
    match k % 8 {
        0..=4 => (k as u64 >> 3) * 1024 + inp.u8() as u64, // up to ~31 KiB
        5 => inp.u16() as u64 * P,
        6 => u64::MAX - inp.u16() as u64,
        _ => inp.u64(),
    }
}

fn perm(inp: &mut Input) -> Perm {
    match inp.u8() % 3 {
        0 => Perm::ReadOnly,
        1 => Perm::WriteOnly,
        _ => Perm::ReadWrite,
    }
}

/// Live mappings whose `key` range (host or guest) contains `a`, as the IOVA of `a`.
fn reverse(live: &[Mapping], a: u64, key: impl Fn(&Mapping) -> Option<u64>) -> Vec<u64> {
    live.iter()
        .filter_map(|m| {
            let base = key(m)?;
            (a >= base && a - base < m.size).then(|| m.iova + (a - base))
        })
        .collect()
}

fn check_mapping(m: &Mapping, first: u64, last: u64, live: &[Mapping]) {
    // Only a fixed placement on a device range that starts at 0 may take page 0.
    assert!(m.iova >= P || first == 0, "mapping in page 0: {m:?}");
    assert_eq!(m.iova % P, 0, "misaligned {m:?}");
    assert!(m.size > 0 && m.size.is_multiple_of(P), "bad size {m:?}");
    assert!(m.iova >= first && m.iova.checked_add(m.size - 1).is_some_and(|e| e <= last), "{m:?} outside [{first:#x}, {last:#x}]");
    for o in live {
        assert!(m.last_iova() < o.iova || o.last_iova() < m.iova, "{m:?} overlaps {o:?}");
    }
}

/// The fuzz target.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let (first, last) = match inp.u8() % 4 {
        // Small ranges, byte-granular ends.
        0 | 1 => {
            let f = inp.u16() as u64 * 16;
            (f, f.wrapping_add(inp.u16() as u64 * 64 + inp.u8() as u64))
        }
        // The top of the space.
        2 => (u64::MAX - inp.u32() as u64, u64::MAX - inp.u8() as u64),
        _ => (inp.u64(), inp.u64()),
    };
    let want = usable(first, last);
    let mut a = match IovaAllocator::new(first, last) {
        Ok(a) => {
            assert_eq!(Some(a.range()), want, "usable range of [{first:#x}, {last:#x}]");
            a
        }
        Err(e) => {
            assert_eq!(want, None, "refused [{first:#x}, {last:#x}]: {e}");
            assert_eq!(e, IovaError::EmptyRange { first, last });
            return;
        }
    };
    let (uf, ul) = a.range();
    let mut live: Vec<Mapping> = Vec::new();
    // What a mapping maps: size, host address, guest address (sometimes), permission.
    let target = |inp: &mut Input, uf, ul| {
        let (sz, host, guest, p) = (size(inp), addr(inp, uf, ul), inp.bool(), perm(inp));
        (sz, host, guest.then(|| addr(inp, uf, ul)), p)
    };

    for _ in 0..256 {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 8 {
            0 | 1 => {
                let (sz, host, guest, p) = target(&mut inp, uf, ul);
                let r = a.alloc(sz, host, guest, p);
                trace!("alloc({sz:#x}, {host:#x}, {guest:x?}): {r:x?}");
                let rounded = round_pages(sz);
                let wraps = |x: u64, s: u64| x.checked_add(s - 1).is_none();
                match r {
                    Ok(m) => {
                        assert_eq!(Some(m.size), rounded);
                        assert_eq!((m.host_addr, m.guest_addr, m.perm), (host, guest, p));
                        check_mapping(&m, uf, ul, &live);
                        assert_eq!(Some(m.iova), best_fit(&live, uf, ul, m.size as u128), "not the best fit");
                        assert!(!wraps(host, m.size) && !guest.is_some_and(|g| wraps(g, m.size)));
                        live.push(m);
                    }
                    Err(IovaError::ZeroSize) => assert_eq!(sz, 0),
                    Err(IovaError::Overflow { addr, size }) => {
                        assert_eq!(Some(size), rounded);
                        assert!((addr == host || Some(addr) == guest) && wraps(addr, size), "{addr:#x}+{size:#x}");
                    }
                    Err(IovaError::Exhausted { size, .. }) => {
                        let need = rounded.map_or(1u128 << 64, |s| s as u128);
                        assert!(rounded.is_none() || Some(size) == rounded);
                        assert!(rounded.is_none() || !(wraps(host, size) || guest.is_some_and(|g| wraps(g, size))));
                        assert_eq!(best_fit(&live, uf, ul, need), None, "exhausted with a {need:#x} hole free");
                    }
                    Err(e) => panic!("alloc({sz:#x}): unexpected {e:?}"),
                }
            }
            2 => {
                let iova = match inp.u8() % 3 {
                    0 => uf.wrapping_add((inp.u8() as u64).wrapping_sub(2).wrapping_mul(P)),
                    1 => ul.wrapping_sub(inp.u8() as u64 * P).wrapping_add(1),
                    _ => addr(&mut inp, uf, ul),
                };
                let (sz, host, guest, p) = target(&mut inp, uf, ul);
                let lowest = a.lowest_fixed();
                let r = a.insert(iova, sz, host, guest, p);
                trace!("insert({iova:#x}, {sz:#x}, {host:#x}, {guest:x?}): {r:x?}");
                // The rules in the order the API documents them.
                let rounded = round_pages(sz);
                let end = rounded.and_then(|s| iova.checked_add(s.max(1) - 1));
                let expect_err = if sz == 0 {
                    Some("ZeroSize")
                } else if iova % P != 0 {
                    Some("Misaligned")
                } else if rounded.is_none() || end.is_none() || iova < lowest || end.is_some_and(|e| e > ul) {
                    Some("OutOfRange")
                } else if [Some(host), guest].into_iter().flatten().any(|x| x.checked_add(rounded.unwrap_or(0) - 1).is_none()) {
                    Some("Overflow")
                } else if live.iter().any(|m| m.iova <= end.unwrap() && iova <= m.last_iova()) {
                    Some("Overlap")
                } else {
                    None
                };
                match (r, expect_err) {
                    (Ok(m), None) => {
                        assert_eq!((m.iova, Some(m.size)), (iova, rounded));
                        check_mapping(&m, lowest, ul, &live);
                        live.push(m);
                    }
                    (Err(e), Some(want)) => assert!(format!("{e:?}").starts_with(want), "insert({iova:#x}, {sz:#x}): {e:?}, want {want}"),
                    (r, want) => panic!("insert({iova:#x}, {sz:#x}, {host:#x}, {guest:?}) = {r:?}, model says {want:?}"),
                }
            }
            3 => {
                // Remove a live mapping, or try an arbitrary IOVA.
                let sel = inp.u8();
                let iova = match live.get(sel as usize % live.len().max(1)) {
                    Some(m) if sel & 0x80 == 0 => m.iova,
                    _ => addr(&mut inp, uf, ul) & !(if sel & 0x40 != 0 { P - 1 } else { 0 }),
                };
                match live.iter().position(|m| m.iova == iova) {
                    Some(i) => assert_eq!(a.remove(iova), Ok(live.swap_remove(i))),
                    None => assert_eq!(a.remove(iova), Err(IovaError::NotMapped { iova })),
                }
            }
            4 => {
                let q = probe(&mut inp, &live, uf, ul, |m| Some(m.iova));
                assert_eq!(a.find(q), live.iter().find(|m| m.contains(q)), "find({q:#x})");
            }
            5 | 6 => {
                let guest = inp.bool();
                let key = move |m: &Mapping| {
                    if guest {
                        m.guest_addr
                    } else {
                        Some(m.host_addr)
                    }
                };
                let q = probe(&mut inp, &live, uf, ul, key);
                let got = if guest { a.iova_of_guest(q) } else { a.iova_of_host(q) };
                let cands = reverse(&live, q, key);
                match got {
                    None => assert!(cands.is_empty(), "{} {q:#x} missed {cands:x?}", if guest { "guest" } else { "host" }),
                    Some(i) => assert!(cands.contains(&i), "{} {q:#x} -> {i:#x}, model {cands:x?}", if guest { "guest" } else { "host" }),
                }
            }
            _ => {
                assert_eq!(a.len(), live.len());
                assert_eq!(a.is_empty(), live.is_empty());
                assert_eq!(a.mapped_bytes(), live.iter().map(|m| m.size as u128).sum::<u128>());
                let mut want = live.clone();
                want.sort_by_key(|m| m.iova);
                assert!(a.iter().copied().eq(want));
            }
        }
        // Keep the model's linear checks cheap: drop the oldest mappings past MAX_LIVE.
        while live.len() > MAX_LIVE {
            let m = live.remove(0);
            assert_eq!(a.remove(m.iova), Ok(m));
        }
    }
    // Tear down: everything removes, and the range is one free hole again.
    for m in std::mem::take(&mut live) {
        assert_eq!(a.remove(m.iova), Ok(m));
    }
    assert!(a.is_empty());
    assert_eq!(a.mapped_bytes(), 0);
    let whole = a.alloc(ul - uf + 1, 0, None, Perm::ReadWrite).expect("the whole range is free again");
    assert_eq!((whole.iova, whole.last_iova()), (uf, ul));
}

/// An address to look up: at, just before, inside or just past a live mapping's range
/// (under `key`), or from a neighbourhood.
fn probe(inp: &mut Input, live: &[Mapping], uf: u64, ul: u64, key: impl Fn(&Mapping) -> Option<u64>) -> u64 {
    let sel = inp.u8();
    match live.get(sel as usize % live.len().max(1)).and_then(|m| Some((m, key(m)?))) {
        Some((m, base)) if sel & 0x80 == 0 => match sel % 4 {
            0 => base,
            1 => base.wrapping_sub(1),
            2 => base.wrapping_add(m.size - 1),
            _ => base.wrapping_add(m.size),
        },
        _ => addr(inp, uf, ul),
    }
}
