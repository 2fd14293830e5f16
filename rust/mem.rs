//! Guest memory: regions mapping guest addresses to host memory, always file-backed and
//! `MAP_SHARED` (the only memory the kernel simulator maps in its default VA mode, and
//! what a VMM shares with other processes). svq either creates the regions (memfds of its
//! own) or maps the files a VMM hands over.
//!
//! Memory another party may write at any time is never seen through a Rust reference:
//! every byte moves through [`SharedSlice`], whose one copy routine ([`copy_shared`]) is
//! the only place that touches such memory apart from the ring accessors.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::ring::layout::RingLayout;
use crate::ring::reader::BufferSpace;
use crate::ring::{Descriptor, Vring};
use crate::virtio::PAGE_SIZE;

/// A failed guest-memory operation.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// An access outside every region (or across a gap between regions).
    #[error("guest address {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Regions that overlap, are empty, or are not page-aligned.
    #[error("bad guest memory layout: {0}")]
    Layout(String),
    /// A region's file cannot back it safely (too short, or free to shrink under us).
    #[error("guest memory region at {gpa:#x}: {reason}")]
    File {
        /// The region's first guest address.
        gpa: u64,
        /// What is wrong with its file.
        reason: String,
    },
    /// memfd_create/ftruncate/mmap failed.
    #[error("{op}: {errno}")]
    Os {
        /// The call.
        op: &'static str,
        /// Its errno.
        #[source]
        errno: Errno,
    },
}

/// Copies `len` bytes between memory that another party (a guest, a device) may access
/// concurrently. No reference to either side is formed; the bytes are copied as they are
/// at the time of the copy, and a concurrent writer can only make them stale, never make
/// the copy unsound for svq.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges
/// must not overlap.
#[inline]
pub unsafe fn copy_shared(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: the caller's contract; a byte copy has no alignment requirement.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
}

/// A byte range of memory another party may access concurrently (guest memory, a bounce
/// buffer the device writes). Every access is bounds-checked and goes through
/// [`copy_shared`].
#[derive(Debug, Clone, Copy)]
pub struct SharedSlice {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a SharedSlice is a pointer and a length over memory shared by design; every
// access through it is a byte copy, sound from any thread.
unsafe impl Send for SharedSlice {}
// SAFETY: as above.
unsafe impl Sync for SharedSlice {}

impl SharedSlice {
    /// A slice over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as the slice (or
    /// a copy of it) is used.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        SharedSlice { ptr, len }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Its first byte, never null.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    #[inline]
    fn check(&self, at: usize, n: usize) {
        assert!(at.checked_add(n).is_some_and(|end| end <= self.len), "shared memory access {at}+{n} past {}", self.len);
    }

    /// Copies `dst.len()` bytes from offset `at` into `dst`.
    #[inline]
    pub fn read(&self, at: usize, dst: &mut [u8]) {
        self.check(at, dst.len());
        // SAFETY: in bounds (checked); `dst` is a Rust buffer, never shared memory.
        unsafe { copy_shared(self.ptr.as_ptr().add(at), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` to offset `at`.
    #[inline]
    pub fn write(&self, at: usize, src: &[u8]) {
        self.check(at, src.len());
        // SAFETY: in bounds (checked); `src` is a Rust buffer, never shared memory.
        unsafe { copy_shared(src.as_ptr(), self.ptr.as_ptr().add(at), src.len()) }
    }

    /// Copies `len` bytes from offset `from` of `src` to offset `at` of this slice.
    #[inline]
    pub fn copy_from(&self, at: usize, src: &SharedSlice, from: usize, len: usize) {
        self.check(at, len);
        src.check(from, len);
        // SAFETY: both in bounds (checked); svq never copies a range onto itself (guest
        // memory and bounce buffers are separate mappings).
        unsafe { copy_shared(src.ptr.as_ptr().add(from), self.ptr.as_ptr().add(at), len) }
    }

    /// Zeroes `len` bytes from offset `at`.
    #[inline]
    pub fn zero(&self, at: usize, len: usize) {
        self.check(at, len);
        // SAFETY: in bounds (checked).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(at), 0, len) }
    }

    /// The first `len` bytes copied out.
    pub fn to_vec(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(0, &mut v);
        v
    }
}

/// A file region a VMM hands over: `size` bytes of `fd` from `offset`, seen by the guest
/// at `gpa`.
#[derive(Debug)]
pub struct FileRegion {
    /// First guest address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// The file (a memfd, a hugetlbfs or shm file).
    pub fd: OwnedFd,
    /// Where the region starts in the file.
    pub offset: u64,
}

/// One region of guest memory.
#[derive(Debug)]
pub struct Region {
    /// First guest address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    host: NonNull<u8>,
    /// The mapping (`host` may sit inside it when the file offset is not page-aligned).
    map: NonNull<u8>,
    map_len: usize,
    fd: OwnedFd,
}

impl Region {
    /// Host address of the region's first byte.
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// Whether `[addr, addr + len)` lies inside the region.
    #[inline]
    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.gpa && addr.checked_add(len).is_some_and(|end| end <= self.gpa + self.size)
    }

    /// The whole region as a shared slice.
    pub fn slice(&self) -> SharedSlice {
        // SAFETY: the mapping holds `size` bytes at `host` while the region lives.
        unsafe { SharedSlice::new(self.host, self.size as usize) }
    }

    /// The file backing the region.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Guest memory: a sorted set of non-overlapping regions.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
}

// SAFETY: the regions are MAP_SHARED mappings owned by this value; every access is a
// bounds-checked byte copy or goes through the ring accessors, so sharing across threads
// is sound (the guest and the device share this memory by design).
unsafe impl Send for GuestMemory {}
// SAFETY: as above.
unsafe impl Sync for GuestMemory {}

fn os(op: &'static str) -> impl Fn(Errno) -> MemError {
    move |errno| MemError::Os { op, errno }
}

/// Makes sure the file cannot shrink under the mapping (a shrunk file turns accesses into
/// SIGBUS): already sealed, or sealed now when the file allows it.
pub(crate) fn seal_against_shrinking(fd: &OwnedFd) -> Result<(), String> {
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(|e| format!("cannot read its seals ({e}): svq needs a memfd"))?;
    if SealFlag::from_bits_truncate(seals).contains(SealFlag::F_SEAL_SHRINK) {
        return Ok(());
    }
    fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK))
        .map(drop)
        .map_err(|e| format!("the file may shrink under svq and refuses the F_SEAL_SHRINK seal ({e}): create it with MFD_ALLOW_SEALING"))
}

impl GuestMemory {
    /// Creates memfd-backed regions at the given `(guest address, size)` pairs.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, MemError> {
        let mut files = Vec::with_capacity(layout.len());
        for &(gpa, size) in layout {
            let fd = memfd_create(c"svq-guest", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)
                .map_err(os("memfd_create"))?;
            let len = i64::try_from(size).map_err(|_| MemError::Layout(format!("region {gpa:#x}+{size:#x} is too large")))?;
            nix::unistd::ftruncate(&fd, len).map_err(os("ftruncate"))?;
            files.push(FileRegion { gpa, size, fd, offset: 0 });
        }
        Self::from_files(files)
    }

    /// Maps files a VMM handed over. Each region must be non-empty, page-aligned in guest
    /// addresses and size, inside its file (checked against the file's size now), and its
    /// file must not be able to shrink (a sealed memfd, or one svq may seal).
    pub fn from_files(files: Vec<FileRegion>) -> Result<Self, MemError> {
        let mut files = files;
        files.sort_by_key(|f| f.gpa);
        for f in &files {
            if f.size == 0 || f.size % PAGE_SIZE != 0 || f.gpa % PAGE_SIZE != 0 || f.gpa.checked_add(f.size).is_none() {
                return Err(MemError::Layout(format!("region {:#x}+{:#x} must be non-empty and page-aligned", f.gpa, f.size)));
            }
            if usize::try_from(f.size).is_err() || f.offset.checked_add(f.size).is_none() {
                return Err(MemError::Layout(format!("region {:#x}+{:#x} at file offset {:#x} is too large", f.gpa, f.size, f.offset)));
            }
        }
        for w in files.windows(2) {
            if w[0].gpa + w[0].size > w[1].gpa {
                return Err(MemError::Layout(format!("regions at {:#x} and {:#x} overlap", w[0].gpa, w[1].gpa)));
            }
        }
        let mut regions = Vec::with_capacity(files.len());
        for f in files {
            let file_size = nix::sys::stat::fstat(f.fd.as_raw_fd()).map_err(os("fstat"))?.st_size as u64;
            if file_size < f.offset + f.size {
                return Err(MemError::File {
                    gpa: f.gpa,
                    reason: format!("its file has {file_size:#x} bytes, fewer than offset {:#x} + size {:#x}", f.offset, f.size),
                });
            }
            seal_against_shrinking(&f.fd).map_err(|reason| MemError::File { gpa: f.gpa, reason })?;
            // A VMM's fd arrives without close-on-exec: never hand it to a child process.
            fcntl(f.fd.as_raw_fd(), FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).map_err(os("fcntl"))?;
            let skew = (f.offset % PAGE_SIZE) as usize;
            let map_len = f.size as usize + skew;
            let len = NonZeroUsize::new(map_len).ok_or_else(|| MemError::Layout("empty region".into()))?;
            let file_off =
                i64::try_from(f.offset - skew as u64).map_err(|_| MemError::Layout(format!("file offset {:#x} is too large", f.offset)))?;
            // SAFETY: a fresh shared mapping of the region's file; no existing memory is affected.
            let map = unsafe { mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &f.fd, file_off) }
                .map_err(os("mmap"))?
                .cast::<u8>();
            // SAFETY: skew < PAGE_SIZE <= map_len, inside the mapping.
            let host = unsafe { map.add(skew) };
            regions.push(Region { gpa: f.gpa, size: f.size, host, map, map_len, fd: f.fd });
        }
        Ok(GuestMemory { regions })
    }

    /// The regions, by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    #[inline]
    fn region_of(&self, addr: u64, len: u64) -> Option<&Region> {
        // Few regions: a linear scan beats a tree here.
        self.regions.iter().find(|r| r.contains(addr, len))
    }

    /// Host pointer to `[addr, addr+len)` when it lies inside one region.
    #[inline]
    pub fn host_ptr(&self, addr: u64, len: u64) -> Result<NonNull<u8>, MemError> {
        let r = self.region_of(addr, len).ok_or(MemError::OutOfBounds { addr, len })?;
        // SAFETY: `contains` checked addr - gpa + len <= size, so the offset is inside the mapping.
        Ok(unsafe { r.host.add((addr - r.gpa) as usize) })
    }

    /// `[addr, addr+len)` as one shared slice, when it lies inside one region.
    #[inline]
    pub fn slice(&self, addr: u64, len: u64) -> Result<SharedSlice, MemError> {
        let p = self.host_ptr(addr, len)?;
        // SAFETY: host_ptr checked that len bytes at p are inside one region, which lives
        // as long as self (and every user of guest memory holds it).
        Ok(unsafe { SharedSlice::new(p, len as usize) })
    }

    /// Calls `f` with each per-region piece of `[addr, addr+len)` in order; fails (before
    /// calling `f` at all) when any byte is outside guest memory.
    pub fn for_each_piece(&self, addr: u64, len: u64, mut f: impl FnMut(SharedSlice)) -> Result<(), MemError> {
        if let Ok(s) = self.slice(addr, len) {
            f(s);
            return Ok(());
        }
        let end = addr.checked_add(len).ok_or(MemError::OutOfBounds { addr, len })?;
        let mut pieces: Vec<SharedSlice> = Vec::new();
        let mut cur = addr;
        while cur < end {
            let r = self.regions.iter().find(|r| cur >= r.gpa && cur < r.gpa + r.size).ok_or(MemError::OutOfBounds { addr, len })?;
            let n = (r.gpa + r.size).min(end) - cur;
            pieces.push(self.slice(cur, n)?);
            cur += n;
        }
        pieces.into_iter().for_each(f);
        Ok(())
    }

    /// Whether `[addr, addr+len)`, in no single region, is guest memory across several
    /// (a buffer may straddle regions as long as every byte is guest memory).
    #[cold]
    fn straddles(&self, addr: u64, len: u64) -> bool {
        self.for_each_piece(addr, len, |_| ()).is_ok()
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let mut done = 0usize;
        self.for_each_piece(addr, buf.len() as u64, |s| {
            s.read(0, &mut buf[done..done + s.len()]);
            done += s.len();
        })
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let mut done = 0usize;
        self.for_each_piece(addr, data.len() as u64, |s| {
            s.write(0, &data[done..done + s.len()]);
            done += s.len();
        })
    }

    /// The split ring whose parts sit at the guest addresses `desc`, `avail`, `used`: each
    /// part must lie inside one region and be aligned as virtio requires.
    pub fn vring(&self, layout: RingLayout, desc: u64, avail: u64, used: u64) -> Result<Vring, MemError> {
        let d = self.host_ptr(desc, layout.desc_bytes())?;
        let a = self.host_ptr(avail, layout.avail_bytes())?;
        let u = self.host_ptr(used, layout.used_bytes())?;
        // The host addresses are what the accessors use (a file offset that is not
        // page-aligned shifts them against the guest addresses).
        let aligned = |p: NonNull<u8>, to: u64| (p.as_ptr() as u64).is_multiple_of(to);
        if !aligned(d, RingLayout::DESC_ALIGN) || !aligned(a, RingLayout::AVAIL_ALIGN) || !aligned(u, RingLayout::USED_ALIGN) {
            return Err(MemError::Layout(format!("ring parts at {desc:#x}/{avail:#x}/{used:#x} are not aligned to 16/2/4 bytes")));
        }
        // SAFETY: each part lies in one region (host_ptr checked the full size) and is
        // aligned (checked above); the regions live as long as every user of the ring
        // holds this memory.
        Ok(unsafe { Vring::new(d, a, u, layout) })
    }
}

impl GuestMemory {
    /// The ring of `layout` packed at guest address `gpa` (descriptor table, avail ring,
    /// used ring back to back, as [`RingLayout::packed_offsets`] places them).
    pub fn packed_vring(&self, gpa: u64, layout: RingLayout) -> Result<Vring, MemError> {
        let (d, a, u, _) = layout.packed_offsets();
        self.vring(layout, gpa + d, gpa + a, gpa + u)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: each mapping was created with exactly this length, and no pointer into
            // it outlives GuestMemory (rings and sessions hold an Arc of it).
            let _ = unsafe { munmap(r.map.cast(), r.map_len) };
        }
    }
}

impl BufferSpace for GuestMemory {
    const NAME: &'static str = "guest memory";

    #[inline]
    fn check(&self, addr: u64, len: u64, _write: bool) -> bool {
        self.region_of(addr, len).is_some() || self.straddles(addr, len)
    }

    fn read_desc(&self, table: u64, i: u32) -> Option<Descriptor> {
        let p = self.host_ptr(table + 16 * i as u64, 16).ok()?;
        // SAFETY: 16 bytes inside guest memory; volatile because the guest may change them.
        Some(unsafe { std::ptr::read_volatile(p.as_ptr() as *const Descriptor) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_straddling() {
        let m = GuestMemory::new(&[(0x10000, 0x2000), (0x12000, 0x1000), (0x20000, 0x1000)]).unwrap();
        m.write(0x11ff0, &[7u8; 32]).unwrap(); // straddles the first two regions
        let mut b = [0u8; 32];
        m.read(0x11ff0, &mut b).unwrap();
        assert_eq!(b, [7u8; 32]);
        assert!(m.host_ptr(0x11ff0, 32).is_err(), "not contiguous in one region");
        assert!(m.check(0x11ff0, 32, false));
        assert!(!m.check(0x12ff0, 32, false), "runs into the gap");
        assert!(m.read(0xffff, &mut b).is_err());
        assert!(m.write(u64::MAX - 4, &b).is_err());
        assert!(GuestMemory::new(&[(0, 0x2000), (0x1000, 0x1000)]).is_err());
        assert!(GuestMemory::new(&[(0, 0x1001)]).is_err());
    }

    fn memfd(size: i64, sealing: bool) -> OwnedFd {
        let flags = if sealing { MemFdCreateFlag::MFD_ALLOW_SEALING } else { MemFdCreateFlag::empty() };
        let fd = memfd_create(c"t", flags).unwrap();
        nix::unistd::ftruncate(&fd, size).unwrap();
        fd
    }

    #[test]
    fn files_are_checked_against_their_size_and_sealed() {
        // A file shorter than offset + size is refused before anything is mapped.
        let short = FileRegion { gpa: 0x10000, size: 0x4000, fd: memfd(0x4000, true), offset: 0x1000 };
        assert!(matches!(GuestMemory::from_files(vec![short]), Err(MemError::File { .. })));
        // A file that can neither be sealed nor is sealed is refused.
        let unsealable = FileRegion { gpa: 0x10000, size: 0x4000, fd: memfd(0x4000, false), offset: 0 };
        assert!(matches!(GuestMemory::from_files(vec![unsealable]), Err(MemError::File { .. })));
        // A sealable one is sealed: it can no longer shrink.
        let fd = memfd(0x8000, true);
        let probe = fd.try_clone().unwrap();
        let m = GuestMemory::from_files(vec![FileRegion { gpa: 0x10000, size: 0x4000, fd, offset: 0x2800 }]).unwrap();
        assert_eq!(nix::unistd::ftruncate(&probe, 0x1000), Err(Errno::EPERM));
        // An offset that is not page-aligned still maps the right bytes.
        std::os::unix::fs::FileExt::write_at(&std::fs::File::from(probe.try_clone().unwrap()), b"hello", 0x2800).unwrap();
        let mut b = [0u8; 5];
        m.read(0x10000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
    }
}
