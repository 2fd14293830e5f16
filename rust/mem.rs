//! Guest memory: regions mapping guest addresses to host memory, backed by memfd
//! `MAP_SHARED` (the only memory the kernel simulator maps in its default VA mode, and what
//! a VMM shares with other processes). Every access is bounds-checked.

use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::ring::reader::BufferSpace;
use crate::ring::Descriptor;

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
    /// memfd_create/ftruncate/mmap failed.
    #[error("{op}: {errno}")]
    Os {
        /// The call.
        op: &'static str,
        /// Its errno.
        #[source]
        errno: nix::errno::Errno,
    },
}

/// One region of guest memory.
#[derive(Debug)]
pub struct Region {
    /// First guest address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    host: NonNull<u8>,
    _memfd: OwnedFd,
}

impl Region {
    /// Host address of the region's first byte.
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }
    fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.gpa && addr.checked_add(len).is_some_and(|end| end <= self.gpa + self.size)
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

const PAGE: u64 = 4096;

impl GuestMemory {
    /// Creates memfd-backed regions at the given `(guest address, size)` pairs.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, MemError> {
        let mut spec: Vec<(u64, u64)> = layout.to_vec();
        spec.sort();
        for w in spec.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(MemError::Layout(format!("regions at {:#x} and {:#x} overlap", w[0].0, w[1].0)));
            }
        }
        let mut regions = Vec::with_capacity(spec.len());
        for (gpa, size) in spec {
            if size == 0 || size % PAGE != 0 || gpa % PAGE != 0 || gpa.checked_add(size).is_none() {
                return Err(MemError::Layout(format!("region {gpa:#x}+{size:#x} must be non-empty and page-aligned")));
            }
            let os = |op| move |errno| MemError::Os { op, errno };
            let fd = memfd_create(c"svq-guest", MemFdCreateFlag::MFD_CLOEXEC).map_err(os("memfd_create"))?;
            nix::unistd::ftruncate(&fd, size as i64).map_err(os("ftruncate"))?;
            let len = NonZeroUsize::new(size as usize).ok_or_else(|| MemError::Layout("empty region".into()))?;
            // SAFETY: a fresh shared mapping of our own memfd; no existing memory is affected.
            let host = unsafe {
                mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, 0)
            }
            .map_err(os("mmap"))?;
            regions.push(Region { gpa, size, host: host.cast(), _memfd: fd });
        }
        Ok(GuestMemory { regions })
    }

    /// The regions, by guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
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

    /// Splits `[addr, addr+len)` into per-region pieces `(addr, len, region index)`;
    /// fails when any byte is outside guest memory.
    pub fn pieces(&self, addr: u64, len: u64, mut f: impl FnMut(u64, u64, usize)) -> Result<(), MemError> {
        let end = addr.checked_add(len).ok_or(MemError::OutOfBounds { addr, len })?;
        let mut cur = addr;
        while cur < end {
            let (i, r) = self
                .regions
                .iter()
                .enumerate()
                .find(|(_, r)| cur >= r.gpa && cur < r.gpa + r.size)
                .ok_or(MemError::OutOfBounds { addr, len })?;
            let n = (r.gpa + r.size).min(end) - cur;
            f(cur, n, i);
            cur += n;
        }
        Ok(())
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let mut done = 0usize;
        let mut out = Vec::new();
        self.pieces(addr, buf.len() as u64, |a, n, _| out.push((a, n)))?;
        for (a, n) in out {
            let src = self.host_ptr(a, n)?;
            // SAFETY: `src` is valid for n bytes (host_ptr checked), `buf` has n bytes left;
            // guest memory never overlaps a Rust buffer.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.as_mut_ptr().add(done), n as usize) };
            done += n as usize;
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let mut done = 0usize;
        let mut out = Vec::new();
        self.pieces(addr, data.len() as u64, |a, n, _| out.push((a, n)))?;
        for (a, n) in out {
            let dst = self.host_ptr(a, n)?;
            // SAFETY: as in `read`, in the other direction.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), dst.as_ptr(), n as usize) };
            done += n as usize;
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: each region is a mapping we created with exactly this length, and no
            // pointer into it outlives GuestMemory (rings and sessions hold an Arc of it).
            let _ = unsafe { munmap(r.host.cast(), r.size as usize) };
        }
    }
}

impl BufferSpace for GuestMemory {
    const NAME: &'static str = "guest memory";

    fn check(&self, addr: u64, len: u64, _write: bool) -> bool {
        // A buffer may straddle two regions as long as every byte is guest memory.
        self.region_of(addr, len).is_some() || self.pieces(addr, len, |_, _, _| ()).is_ok()
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
}
