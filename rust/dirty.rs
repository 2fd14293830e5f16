//! The dirty log: which guest pages were written on the device's behalf, for live
//! migration. The vhost log format: one bit per 4 KiB page of guest-physical memory,
//! page `p` is bit `p % 8` of byte `p / 8`, bits set atomically. The log lives in svq's
//! own memory (orchestration code fetches and clears it per dirty round) or in memory a
//! VMM shares with svq (vhost-user `SET_LOG_BASE`), which the VMM reads and clears.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::mem::{FileRegion, GuestMemory, MemError, SharedSlice};
use crate::virtio::PAGE_SIZE;

/// A dirty-page bitmap over guest-physical pages `[0, pages)`.
#[derive(Debug)]
pub struct DirtyLog {
    /// The bitmap's memory (a mapping of svq's own memfd, or of the VMM's log file).
    mem: GuestMemory,
    bytes: SharedSlice,
    pages: u64,
}

impl DirtyLog {
    /// A zeroed log of svq's own covering guest addresses below `guest_end`.
    pub fn new(guest_end: u64) -> Result<Self, MemError> {
        let pages = guest_end.div_ceil(PAGE_SIZE);
        let size = pages.div_ceil(8).max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        Self::over(GuestMemory::new(&[(0, size)])?, pages)
    }

    /// The log a VMM shares: `size` bytes of `fd` from `offset` (mapped `MAP_SHARED`; the
    /// file's size is checked and it is sealed against shrinking like guest memory).
    pub fn from_file(fd: OwnedFd, size: u64, offset: u64) -> Result<Self, MemError> {
        let mapped = size.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let mem = GuestMemory::from_files(vec![FileRegion { gpa: 0, size: mapped, fd, offset }])?;
        Self::over(mem, size.saturating_mul(8))
    }

    fn over(mem: GuestMemory, pages: u64) -> Result<Self, MemError> {
        let bytes = mem.slice(0, pages.div_ceil(8))?;
        Ok(DirtyLog { mem, bytes, pages })
    }

    /// Guest pages the log covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of memory behind the log.
    pub fn size(&self) -> u64 {
        self.mem.total_bytes()
    }

    #[inline]
    fn byte(&self, i: usize) -> &AtomicU8 {
        debug_assert!(i < self.bytes.len());
        // SAFETY: i < the slice's length (callers stay below pages/8, which the slice
        // covers); the bytes are shared with a VMM that also accesses them atomically, and
        // an atomic is the sanctioned way to share a byte with another writer. The
        // mapping lives as long as `self`.
        unsafe { &*(self.bytes.as_ptr().add(i) as *const AtomicU8) }
    }

    /// Marks every page `[gpa, gpa + len)` touches (pages beyond the log are ignored: a
    /// VMM sizes its log for all of guest memory).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let last = (gpa.saturating_add(len - 1) / PAGE_SIZE).min(self.pages.saturating_sub(1));
        let mut p = first;
        while p <= last && p < self.pages {
            let (i, bit) = ((p / 8) as usize, (p % 8) as u8);
            let span = (last - p + 1).min(8 - u64::from(bit));
            let bits = (((1u16 << span) - 1) << bit) as u8;
            // Release: the data written to these pages is visible before the bit is.
            self.byte(i).fetch_or(bits, Ordering::Release);
            p += span;
        }
    }

    /// Takes the dirty pages and clears their bits (one dirty round): the page numbers.
    pub fn fetch_and_clear(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.pages.div_ceil(8) as usize {
            if self.byte(i).load(Ordering::Relaxed) == 0 {
                continue;
            }
            let b = self.byte(i).swap(0, Ordering::Acquire);
            out.extend((0..8).filter(|k| b & (1 << k) != 0).map(|k| i as u64 * 8 + k));
        }
        out.retain(|&p| p < self.pages);
        out
    }

    /// Dirty pages now, without clearing them.
    pub fn count(&self) -> u64 {
        (0..self.pages.div_ceil(8) as usize).map(|i| u64::from(self.byte(i).load(Ordering::Relaxed).count_ones())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_page_a_range_touches_in_the_vhost_layout() {
        let log = DirtyLog::new(64 << 20).unwrap();
        assert_eq!(log.pages(), 16384);
        log.mark(0x1fff, 2); // straddles pages 1 and 2
        log.mark(10 * 4096, 40 * 4096); // pages 10..=49
        log.mark(0, 0); // nothing
        log.mark(1 << 40, 4096); // past the log: ignored
        let pages = log.fetch_and_clear();
        let want: Vec<u64> = [1, 2].into_iter().chain(10..50).collect();
        assert_eq!(pages, want);
        assert_eq!(log.count(), 0, "cleared");
        // Byte/bit layout: page 9 is bit 1 of byte 1.
        log.mark(9 * 4096, 1);
        let mut b = [0u8; 2];
        log.bytes.read(0, &mut b);
        assert_eq!(b, [0, 0b10]);
    }

    #[test]
    fn a_shared_log_file_is_the_vmms_bitmap() {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"log", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, 16384).unwrap();
        let probe = std::fs::File::from(fd.try_clone().unwrap());
        let log = DirtyLog::from_file(fd, 16384, 0).unwrap();
        assert_eq!(log.pages(), 16384 * 8);
        log.mark(5 * 4096, 4096);
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&probe, &mut b, 0).unwrap();
        assert_eq!(b[0], 1 << 5, "the VMM sees the bit in its own file");
    }
}
