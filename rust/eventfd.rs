//! Eventfds: how a driver kicks a device and a device calls a driver.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd as NixEventFd};
use nix::unistd;

use crate::live;

static CREATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static FAIL_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Fault injection: the `n`-th eventfd created from now fails with EMFILE (0 disarms).
pub fn fail_creation_at(n: u64) {
    use std::sync::atomic::Ordering::SeqCst;
    CREATED.store(0, SeqCst);
    FAIL_AT.store(n, SeqCst);
}

fn creation_fails() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    let n = CREATED.fetch_add(1, SeqCst) + 1;
    let hit = FAIL_AT.load(SeqCst) == n;
    if hit {
        FAIL_AT.store(0, SeqCst);
    }
    hit
}

/// A non-blocking eventfd, counted in [`live::eventfds`].
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> Result<Self, Errno> {
        if creation_fails() {
            return Err(Errno::EMFILE);
        }
        let fd: OwnedFd = NixEventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?.into();
        live::eventfd_opened();
        Ok(EventFd { fd })
    }

    /// A counted duplicate of an eventfd someone else owns (how a device keeps the fd it
    /// was given with SET_VRING_KICK/CALL).
    pub fn dup_of(fd: BorrowedFd<'_>) -> Result<Self, Errno> {
        // If it is not an eventfd, signals and drains fail with an errno, which is ignored
        // like a lost notification: the peer that passed a bad fd gets no wake-ups.
        let fd = fd.try_clone_to_owned().map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))?;
        live::eventfd_opened();
        Ok(EventFd { fd })
    }

    /// Takes over an eventfd someone handed to svq (a VMM's kick or call fd): it must be
    /// an eventfd. With `nonblocking` its file description is switched to non-blocking
    /// (svq reads it; the writer is not affected, writes to an eventfd never block).
    pub fn adopt(fd: OwnedFd, nonblocking: bool) -> Result<Self, Errno> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|_| Errno::EBADF)?;
        if link.to_str() != Some("anon_inode:[eventfd]") {
            return Err(Errno::EINVAL);
        }
        // Never inherited by a child process svq's host may start.
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        if nonblocking {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
            let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        }
        live::eventfd_opened();
        Ok(EventFd { fd })
    }

    /// Gives the descriptor up to a new owner (it is no longer counted as svq's).
    pub fn into_owned(self) -> OwnedFd {
        let this = std::mem::ManuallyDrop::new(self);
        live::eventfd_closed();
        // SAFETY: `this` is never used or dropped again, so the fd is moved out exactly once.
        unsafe { std::ptr::read(&this.fd) }
    }

    /// Signals (adds 1).
    pub fn signal(&self) {
        // EAGAIN only when the counter would overflow, which means a signal is pending anyway.
        let _ = unistd::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Consumes pending signals; returns how many there were (0 if none).
    pub fn drain(&self) -> u64 {
        let mut b = [0u8; 8];
        match unistd::read(self.fd.as_raw_fd(), &mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    /// Waits up to `timeout` for a signal and consumes it. Returns false on timeout.
    pub fn wait(&self, timeout: Duration) -> bool {
        if self.drain() > 0 {
            return true;
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)) {
            Ok(n) if n > 0 => self.drain() > 0,
            _ => false,
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_fd().as_raw_fd()
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        live::eventfd_closed();
    }
}
