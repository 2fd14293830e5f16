//! Copy-mode bounce buffers: page-aligned host memory the device reaches at an IOVA, so
//! that it never sees guest memory.
//!
//! Two strategies, so both can be measured:
//! - [`Strategy::Pool`] (the default) maps chunks of buffers once, hands out page runs
//!   from them, and grows by another mapped chunk when exhausted. It remembers how much
//!   of each page may be non-zero, and zeroes exactly that much when a page is reused:
//!   a device-writable buffer is handed out all zero, a device-readable one holds the
//!   copied bytes and zeroes after them to its page-rounded end. So the device never sees
//!   host memory or a previous buffer's tail, and a buffer overwritten whole costs no
//!   extra pass. A device-writable buffer counts as written up to the length the device
//!   was given (a one-byte control-queue ack dirties one byte, not a page); a device
//!   that writes past its buffer can only ever find its own bytes there again, which it
//!   could write at any time anyway (the chunks stay mapped).
//! - [`Strategy::PerElement`] creates, maps, unmaps and frees memory for every buffer.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use crate::dma::{Dma, DmaError, MapRequest};
use crate::mem::{GuestMemory, MemError, SharedSlice};
use crate::virtio::{Perm, PAGE_SIZE};

static LIVE: AtomicI64 = AtomicI64::new(0);

/// Bounce buffers handed out and not yet freed, over all pools.
pub fn live_buffers() -> i64 {
    LIVE.load(Ordering::SeqCst)
}

/// How bounce buffers are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Pre-mapped chunks, reused.
    Pool,
    /// Allocate and map per buffer, unmap and free after use.
    PerElement,
}

/// A failed buffer allocation.
#[derive(Debug, thiserror::Error)]
pub enum BounceError {
    /// Mapping failed.
    #[error("bounce buffer map: {0}")]
    Dma(#[from] DmaError),
    /// Host memory could not be created.
    #[error("bounce buffer memory: {0}")]
    Mem(#[from] MemError),
}

/// Pages per pool chunk (256 KiB): a control queue's worth of small commands.
const CHUNK_PAGES: usize = 64;

#[derive(Debug)]
struct Chunk {
    mem: GuestMemory,
    iova: u64,
    used: PageMap,
    /// Per page: how many leading bytes may be non-zero.
    dirty: Vec<u16>,
}

/// Which pages of a chunk are taken, one bit per page: a chunk of 64 pages is one word,
/// in which the lowest free run of any length is found with a few shifts.
#[derive(Debug)]
struct PageMap {
    words: Vec<u64>,
    pages: usize,
    free: usize,
}

impl PageMap {
    fn new(pages: usize) -> Self {
        PageMap { words: vec![0; pages.div_ceil(64)], pages, free: pages }
    }

    fn is_taken(&self, p: usize) -> bool {
        self.words[p / 64] & (1 << (p % 64)) != 0
    }

    /// Marks pages `first..first + n` taken or free (they are the other).
    fn set(&mut self, first: usize, n: usize, taken: bool) {
        let (mut p, end) = (first, first + n);
        while p < end {
            let (w, bit) = (p / 64, p % 64);
            let span = (64 - bit).min(end - p);
            let mask = if span == 64 { u64::MAX } else { ((1u64 << span) - 1) << bit };
            if taken {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            p += span;
        }
        if taken {
            self.free -= n;
        } else {
            self.free += n;
        }
    }

    /// The first page of the lowest run of `n` (>= 1) free pages.
    fn find(&self, n: usize) -> Option<usize> {
        if n > self.free {
            return None;
        }
        if let [word] = self.words[..] {
            // Bit p of `starts`: a run of `len` free pages starts at page p; each step
            // doubles `len` (at most up to n).
            let mut starts = !word & if self.pages == 64 { u64::MAX } else { (1u64 << self.pages) - 1 };
            let mut len = 1;
            while len < n && starts != 0 {
                let step = len.min(n - len);
                starts &= starts >> step;
                len += step;
            }
            return (starts != 0).then(|| starts.trailing_zeros() as usize);
        }
        // A chunk grown for one large run: page by page, skipping taken words.
        let (mut run, mut p) = (0, 0);
        while p < self.pages {
            if run == 0 && p % 64 == 0 && self.words[p / 64] == u64::MAX {
                p += 64;
                continue;
            }
            run = if self.is_taken(p) { 0 } else { run + 1 };
            p += 1;
            if run == n {
                return Some(p - n);
            }
        }
        None
    }
}

#[derive(Debug)]
enum Home {
    Pool { chunk: usize, first: usize, pages: usize },
    Own { mem: GuestMemory },
}

/// One buffer the device can reach at `iova`.
#[derive(Debug)]
pub struct BounceBuf {
    /// IOVA of the first byte.
    pub iova: u64,
    host: NonNull<u8>,
    /// Page-rounded capacity.
    pub cap: usize,
    /// Bytes written from the start (what may be non-zero once the device had it).
    written: usize,
    home: Home,
}

// SAFETY: the buffer points into memory owned by its pool (or by itself) that outlives it;
// it is only accessed by the thread that holds it.
unsafe impl Send for BounceBuf {}

impl BounceBuf {
    /// The buffer's bytes, shared with the device while it is in flight.
    pub fn slice(&self) -> SharedSlice {
        // SAFETY: the buffer's memory (its pool chunk or its own mapping) holds `cap`
        // bytes at `host` for as long as the buffer or its pool lives.
        unsafe { SharedSlice::new(self.host, self.cap) }
    }

    /// Copies `data` to offset `at` of the buffer.
    pub fn write(&mut self, at: usize, data: &[u8]) {
        self.slice().write(at, data);
        self.written = self.written.max(at + data.len());
    }

    /// Copies `len` bytes of `src` to offset `at` of the buffer.
    pub fn write_shared(&mut self, at: usize, src: &SharedSlice) {
        self.slice().copy_from(at, src, 0, src.len());
        self.written = self.written.max(at + src.len());
    }

    /// Bytes of memory the buffer owns itself (per-element strategy; a pool buffer's
    /// memory belongs to its pool).
    pub fn own_bytes(&self) -> u64 {
        match self.home {
            Home::Own { .. } => self.cap as u64,
            Home::Pool { .. } => 0,
        }
    }

    /// The first `len` bytes (at most the capacity), copied out.
    pub fn to_vec(&self, len: usize) -> Vec<u8> {
        self.slice().to_vec(len.min(self.cap))
    }
}

/// The bounce buffers of one queue, in one address space.
#[derive(Debug)]
pub struct BouncePool {
    dma: Arc<Dma>,
    asid: u32,
    strategy: Strategy,
    chunks: Vec<Chunk>,
    live: usize,
}

fn pages_for(len: usize) -> usize {
    len.max(1).div_ceil(PAGE_SIZE as usize)
}

impl BouncePool {
    /// A pool for address space `asid`; with [`Strategy::Pool`] the first `chunks` chunks
    /// are mapped now, in one IOTLB batch.
    pub fn new(dma: Arc<Dma>, asid: u32, strategy: Strategy, chunks: usize) -> Result<Self, BounceError> {
        let mut p = BouncePool { dma, asid, strategy, chunks: Vec::new(), live: 0 };
        if strategy == Strategy::Pool && chunks > 0 {
            p.grow(&vec![CHUNK_PAGES; chunks], false)?;
        }
        Ok(p)
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Buffers handed out and not freed.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Mapped pool chunks.
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Maps new chunks of `sizes` pages. With `populate` (a pool growing under load, which
    /// is about to use them) their pages are faulted in by one call rather than one fault
    /// per first write; the chunks a pool starts with fill in as they are used.
    fn grow(&mut self, sizes: &[usize], populate: bool) -> Result<(), BounceError> {
        let mems: Vec<GuestMemory> =
            sizes.iter().map(|&pages| GuestMemory::new(&[(0, (pages as u64) * PAGE_SIZE)])).collect::<Result<_, _>>()?;
        if populate {
            for m in &mems {
                let r = &m.regions()[0];
                // SAFETY: the range is exactly the chunk's own fresh mapping; populating
                // only faults its pages in (no content changes). A kernel without
                // MADV_POPULATE_WRITE (before 5.14) refuses it, and the pages then fault
                // in as they are first written.
                unsafe { libc::madvise(r.host_addr() as *mut libc::c_void, r.size as usize, libc::MADV_POPULATE_WRITE) };
            }
        }
        let reqs: Vec<MapRequest> = mems
            .iter()
            .map(|m| {
                let r = &m.regions()[0];
                MapRequest { size: r.size, host: r.host_addr(), guest: None, perm: Perm::ReadWrite, at: None }
            })
            .collect();
        let maps = self.dma.map(self.asid, &reqs)?;
        for ((mem, m), &pages) in mems.into_iter().zip(maps).zip(sizes) {
            self.chunks.push(Chunk { mem, iova: m.iova, used: PageMap::new(pages), dirty: vec![0; pages] });
        }
        Ok(())
    }

    /// A zero-filled buffer of at least `len` bytes, for the device to write its first
    /// `len` bytes.
    pub fn alloc(&mut self, len: usize) -> Result<BounceBuf, BounceError> {
        self.take(len, 0, true)
    }

    /// A buffer holding `data` followed by zeroes to its page-rounded end, for the device
    /// to read.
    pub fn alloc_with(&mut self, data: &[u8]) -> Result<BounceBuf, BounceError> {
        let mut b = self.take(data.len(), data.len(), false)?;
        b.write(0, data);
        Ok(b)
    }

    /// A buffer of `len` bytes that `fill` writes entirely (bytes `0..len`), followed by
    /// zeroes to its page-rounded end, for the device to read. If `fill` fails the
    /// buffer is given back.
    pub fn alloc_filled<E>(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut BounceBuf) -> Result<(), E>,
    ) -> Result<BounceBuf, Result<BounceError, E>> {
        let mut b = self.take(len, len, false).map_err(Ok)?;
        if let Err(e) = fill(&mut b) {
            // The fill may have left part of the run written: free() counts it dirty.
            b.written = b.cap;
            let _ = self.free(b);
            return Err(Err(e));
        }
        Ok(b)
    }

    /// A buffer of `len` bytes whose bytes from `keep` on are zero (`0..keep` will be
    /// overwritten by the caller).
    fn take(&mut self, len: usize, keep: usize, device_writable: bool) -> Result<BounceBuf, BounceError> {
        let pages = pages_for(len);
        let buf = match self.strategy {
            Strategy::PerElement => {
                let mem = GuestMemory::new(&[(0, pages as u64 * PAGE_SIZE)])?;
                let r = &mem.regions()[0];
                let req = MapRequest { size: r.size, host: r.host_addr(), guest: None, perm: Perm::ReadWrite, at: None };
                let m = self.dma.map_one(self.asid, req)?;
                let host = r.slice().ptr();
                BounceBuf { iova: m.iova, host, cap: pages * PAGE_SIZE as usize, written: 0, home: Home::Own { mem } }
            }
            Strategy::Pool => {
                let (chunk, first) = match self.find(pages) {
                    Some(at) => at,
                    None => {
                        self.grow(&[pages.max(CHUNK_PAGES)], true)?;
                        (self.chunks.len() - 1, 0)
                    }
                };
                let c = &mut self.chunks[chunk];
                let whole = c.mem.regions()[0].slice();
                let page = PAGE_SIZE as usize;
                c.used.set(first, pages, true);
                for p in first..first + pages {
                    // Zero what may be non-zero and is not about to be overwritten.
                    let from = keep.saturating_sub((p - first) * page).min(page);
                    let to = c.dirty[p] as usize;
                    if to > from {
                        whole.zero(p * page + from, to - from);
                    }
                    c.dirty[p] = 0;
                }
                // SAFETY: first + pages <= chunk pages, so the offset is inside the chunk.
                let host = unsafe { whole.ptr().add(first * page) };
                BounceBuf {
                    iova: c.iova + (first as u64) * PAGE_SIZE,
                    host,
                    cap: pages * page,
                    // What the device may write counts as written.
                    written: if device_writable { len } else { 0 },
                    home: Home::Pool { chunk, first, pages },
                }
            }
        };
        self.live += 1;
        LIVE.fetch_add(1, Ordering::SeqCst);
        Ok(buf)
    }

    /// The lowest run of `pages` free pages: (chunk, first page).
    fn find(&self, pages: usize) -> Option<(usize, usize)> {
        self.chunks.iter().enumerate().find_map(|(ci, c)| c.used.find(pages).map(|first| (ci, first)))
    }

    /// Returns a buffer: back into the pool (remembering what may be non-zero in it), or
    /// unmapped and freed.
    pub fn free(&mut self, buf: BounceBuf) -> Result<(), BounceError> {
        self.live -= 1;
        LIVE.fetch_sub(1, Ordering::SeqCst);
        match buf.home {
            Home::Pool { chunk, first, pages } => {
                let c = &mut self.chunks[chunk];
                let extent = buf.written;
                let page = PAGE_SIZE as usize;
                for p in first..first + pages {
                    let bytes = extent.saturating_sub((p - first) * page).min(page) as u16;
                    c.dirty[p] = c.dirty[p].max(bytes);
                }
                c.used.set(first, pages, false);
                Ok(())
            }
            Home::Own { mem } => {
                let r = self.dma.unmap(&[buf.iova]);
                if r.is_err() {
                    // Still mapped: the device may write it.
                    let bytes = mem.total_bytes();
                    crate::live::quarantine(mem, bytes);
                }
                Ok(r?)
            }
        }
    }

    /// Unmaps every chunk. `quiesced` says the device was reset and acknowledged it: the
    /// chunks' memory is freed only then and only when the unmap succeeded, otherwise it
    /// is quarantined (the device may still reach it). Buffers still out are forgotten by
    /// the count; their memory goes with the chunks.
    pub fn release(&mut self, quiesced: bool) -> Result<(), BounceError> {
        let iovas: Vec<u64> = self.chunks.iter().map(|c| c.iova).collect();
        LIVE.fetch_sub(self.live as i64, Ordering::SeqCst);
        self.live = 0;
        let r = self.dma.unmap(&iovas);
        let chunks = std::mem::take(&mut self.chunks);
        if r.is_err() || !quiesced {
            let bytes = chunks.iter().map(|c| c.mem.total_bytes()).sum();
            crate::live::quarantine(chunks, bytes);
        }
        Ok(r?)
    }
}

impl Drop for BouncePool {
    fn drop(&mut self) {
        if !self.chunks.is_empty() || self.live > 0 {
            // A pool is dropped without a stop only while a session is being set up, before
            // the device ran with it: the unmap alone decides whether its memory is free.
            let _ = self.release(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::faulty::FaultInjector;
    use crate::device::sim::SimDevice;
    use crate::device::Device;

    fn dma() -> (Arc<Dma>, Arc<FaultInjector>) {
        let sim: Arc<dyn Device> = Arc::new(SimDevice::net([2, 0, 0, 0, 0, 1], 1500).unwrap());
        let f = Arc::new(FaultInjector::new(sim));
        (Arc::new(Dma::new(f.clone()).unwrap()), f)
    }

    #[test]
    fn pool_buffers_come_back_zeroed_to_the_page_end() {
        let (dma, _) = dma();
        let mut p = BouncePool::new(dma.clone(), 0, Strategy::Pool, 1).unwrap();
        assert_eq!(dma.live(), 1, "one chunk mapped up front");
        let mut b = p.alloc(100).unwrap();
        assert_eq!(b.cap, 4096);
        b.write(0, &[0xaa; 4096]);
        let first = b.iova;
        p.free(b).unwrap();
        let b = p.alloc(100).unwrap();
        assert_eq!(b.iova, first, "the run is reused");
        assert!(b.to_vec(4096).iter().all(|&x| x == 0), "a writable buffer comes all zero");
        p.free(b).unwrap();
        // A readable buffer: its bytes, then zeroes to the page end, whatever was there.
        let mut b = p.alloc_with(&[0xbb; 5000]).unwrap();
        b.write(5000, &[0xcc; 3000]);
        p.free(b).unwrap();
        let b = p.alloc_with(&[0xdd; 10]).unwrap();
        assert_eq!(b.cap, 4096);
        assert!(b.to_vec(10).iter().all(|&x| x == 0xdd));
        assert!(b.to_vec(4096)[10..].iter().all(|&x| x == 0), "the old tail was zeroed");
        p.free(b).unwrap();
        let b = p.alloc(8192).unwrap();
        assert!(b.to_vec(8192).iter().all(|&x| x == 0), "both pages zero again");
        p.free(b).unwrap();
        // What the device wrote into a writable buffer (not through svq) is zeroed too.
        let b = p.alloc(100).unwrap();
        b.slice().write(0, &[0xee; 100]);
        p.free(b).unwrap();
        let b = p.alloc(4096).unwrap();
        assert!(b.to_vec(4096).iter().all(|&x| x == 0), "the device's bytes were zeroed");
        p.free(b).unwrap();
        assert_eq!((p.live(), dma.live()), (0, 1));
        p.release(true).unwrap();
        assert_eq!(dma.live(), 0);
    }

    #[test]
    fn pool_grows_with_runs_larger_than_a_chunk() {
        let (dma, _) = dma();
        let mut p = BouncePool::new(dma.clone(), 0, Strategy::Pool, 1).unwrap();
        let big = p.alloc(100 * 4096).unwrap();
        assert_eq!(p.chunks(), 2);
        assert!(big.to_vec(big.cap).iter().all(|&x| x == 0));
        let small: Vec<_> = (0..64).map(|_| p.alloc(1).unwrap()).collect();
        assert_eq!(p.chunks(), 2, "the first chunk still had 64 pages");
        for b in small.into_iter().chain([big]) {
            p.free(b).unwrap();
        }
        assert_eq!(p.live(), 0);
    }

    #[test]
    fn page_map_finds_the_lowest_free_run() {
        let mut m = PageMap::new(64);
        assert_eq!(m.find(64), Some(0));
        m.set(0, 3, true);
        m.set(5, 10, true);
        assert_eq!((m.find(1), m.find(2), m.find(3)), (Some(3), Some(3), Some(15)));
        assert_eq!(m.find(49), Some(15));
        assert_eq!(m.find(50), None, "49 free pages in a row at most");
        m.set(63, 1, true);
        assert_eq!((m.find(48), m.find(49)), (Some(15), None));
        m.set(0, 3, false);
        assert_eq!((m.find(5), m.find(6)), (Some(0), Some(15)));
        assert_eq!(m.free, 64 - 11);
        // A chunk shorter than a word has no pages past its end.
        let mut m = PageMap::new(10);
        assert_eq!((m.find(10), m.find(11)), (Some(0), None));
        m.set(9, 1, true);
        assert_eq!(m.find(10), None);
        // A chunk of several words: runs across words, taken words skipped.
        let mut m = PageMap::new(200);
        m.set(0, 64, true);
        m.set(100, 1, true);
        assert_eq!((m.find(36), m.find(37), m.find(99)), (Some(64), Some(101), Some(101)));
        assert_eq!(m.find(100), None);
        m.set(100, 1, false);
        assert_eq!(m.find(136), Some(64));
    }

    proptest::proptest! {
        /// Against a page-by-page model: taking the run `find` gives, then freeing some.
        #[test]
        fn page_map_agrees_with_a_page_by_page_scan(
            pages in 1usize..200,
            ops in proptest::collection::vec((1usize..70, proptest::bool::ANY), 1..60),
        ) {
            let mut m = PageMap::new(pages);
            let mut model = vec![false; pages];
            let mut taken: Vec<(usize, usize)> = Vec::new();
            for (n, free_one) in ops {
                if free_one && !taken.is_empty() {
                    let (first, len) = taken.remove(n % taken.len());
                    m.set(first, len, false);
                    model[first..first + len].fill(false);
                    continue;
                }
                let want = (0..pages.saturating_sub(n - 1)).find(|&p| model[p..p + n].iter().all(|t| !t));
                proptest::prop_assert_eq!(m.find(n), want);
                if let Some(first) = want {
                    m.set(first, n, true);
                    model[first..first + n].fill(true);
                    taken.push((first, n));
                }
                proptest::prop_assert_eq!(m.free, model.iter().filter(|t| !**t).count());
            }
        }
    }

    #[test]
    fn per_element_maps_and_unmaps_each_buffer() {
        let (dma, _) = dma();
        let mut p = BouncePool::new(dma.clone(), 0, Strategy::PerElement, 1).unwrap();
        assert_eq!(dma.live(), 0, "nothing up front");
        let a = p.alloc(10).unwrap();
        let b = p.alloc(5000).unwrap();
        assert_eq!((dma.live(), b.cap), (2, 8192));
        assert!(b.to_vec(8192).iter().all(|&x| x == 0));
        p.free(a).unwrap();
        p.free(b).unwrap();
        assert_eq!(dma.live(), 0);
        assert_eq!(dma.counts(), (2, 2));
    }

    #[test]
    fn a_failed_map_takes_nothing() {
        let (dma, faults) = dma();
        let mut p = BouncePool::new(dma.clone(), 0, Strategy::PerElement, 0).unwrap();
        faults.fail_map_at(1);
        assert!(p.alloc(10).is_err());
        assert_eq!((p.live(), dma.live()), (0, 0));
        let mut pool = BouncePool::new(dma.clone(), 0, Strategy::Pool, 0).unwrap();
        faults.fail_map_at(1);
        assert!(pool.alloc(10).is_err(), "growing the pool failed");
        assert_eq!((pool.chunks(), dma.live()), (0, 0));
        assert!(pool.alloc(10).is_ok(), "and works once the device maps again");
    }
}
