//! The vhost-user front: svq as the backend of a VMM (qemu, cloud-hypervisor, ...) over a
//! unix socket, so that a VM's NIC or disk runs on a vDPA device through svq. The VMM's
//! `SET_MEM_TABLE`, `SET_VRING_*` and `SET_STATUS` configure an external guest (see
//! `front::external`); whenever the VMM starts the device, a [`Session`] serves it, and
//! when it stops the device (`GET_VRING_BASE`), the rings' positions are handed back.
//!
//! The wire protocol is rust-vmm's `vhost` crate (its backend-side request handler); the
//! few requests it does not dispatch, or gates too strictly for qemu, are answered in
//! [`intercept`].
//!
//! Unlike the other fronts, this one decides when sessions start and stop (the VMM
//! does), so it sits above the session layer and drives sessions itself.

mod backend;
mod intercept;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::{BackendReqHandler, Listener};

use crate::capture::{CaptureConfig, CaptureReport};
use crate::device::Device;
use crate::eventfd::EventFd;
use crate::fault::QueueFault;
use crate::session::{Mode, Session, SessionConfig, SessionError};
use backend::VuBackend;

/// A failure of the server itself (a refused request only ends its connection).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be created.
    #[error("vhost-user socket {path}: {source}")]
    Socket {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The device could not be probed.
    #[error(transparent)]
    Device(#[from] SessionError),
    /// Waiting for connections failed.
    #[error("{op}: {errno}")]
    Os {
        /// The call.
        op: &'static str,
        /// Its errno.
        #[source]
        errno: Errno,
    },
}

/// One served queue, as `svq ctl` reports it.
#[derive(Debug, Clone)]
pub struct QueueReport {
    /// Queue index.
    pub index: u32,
    /// Its mode.
    pub mode: Mode,
    /// Its counters.
    pub stats: Vec<(&'static str, u64)>,
    /// What broke it, if anything did.
    pub fault: Option<QueueFault>,
}

/// What a running server is doing.
#[derive(Debug, Clone, Default)]
pub struct ServerReport {
    /// A VMM is connected.
    pub connected: bool,
    /// Connections accepted so far.
    pub connections: u64,
    /// Sessions started so far (the VMM starts the device once per boot or migration).
    pub sessions_started: u64,
    /// The device runs (a session serves the VMM's rings).
    pub running: bool,
    /// Virtio features the VMM acked.
    pub features: u64,
    /// vhost-user protocol features the VMM acked.
    pub protocol_features: u64,
    /// The device status the VMM set.
    pub status: u8,
    /// Bytes of guest memory mapped (shared with the VMM, never copied).
    pub guest_memory_bytes: u64,
    /// The served queues.
    pub queues: Vec<QueueReport>,
    /// Recent refusals and failures, newest last.
    pub events: Vec<String>,
    /// The packet capture's counters, when the server captures.
    pub capture: Option<CaptureReport>,
}

struct Shared {
    backend: Arc<Mutex<VuBackend>>,
    stop: EventFd,
    stopping: AtomicBool,
    connected: AtomicBool,
    connections: AtomicU64,
    /// A handle on the connection being served, to cut it when the server stops.
    active: Mutex<Option<UnixStream>>,
    /// Held while a connection is served: one VMM at a time.
    serving: Mutex<()>,
}

/// A vhost-user backend listening on a unix socket, serving one VMM connection at a
/// time and then the next. Dropping it removes the socket.
pub struct Server {
    path: PathBuf,
    listener: Mutex<Option<Listener>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| {
        m.clear_poison();
        p.into_inner()
    })
}

/// A cheap handle that stops a [`Server`] from another thread (or a signal handler's
/// thread).
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Stops the server: the current connection is cut, the device is stopped and reset.
    pub fn stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
        self.0.stop.signal();
        if let Some(s) = lock(&self.0.active).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Server {
    /// Listens on `path` (a stale socket there is replaced) for a VMM to put `device`
    /// behind svq with `cfg`'s modes.
    pub fn bind(device: Arc<dyn Device>, path: &Path, cfg: SessionConfig) -> Result<Self, ServeError> {
        let backend = VuBackend::new(device, cfg)?;
        let socket_err = |source| ServeError::Socket { path: path.to_owned(), source };
        let listener = Listener::new(path, true).map_err(|e| socket_err(std::io::Error::other(e.to_string())))?;
        listener.set_nonblocking(true).map_err(|e| socket_err(std::io::Error::other(e.to_string())))?;
        let shared = Arc::new(Shared {
            backend: Arc::new(Mutex::new(backend)),
            stop: EventFd::new().map_err(|errno| ServeError::Os { op: "eventfd", errno })?,
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            active: Mutex::new(None),
            serving: Mutex::new(()),
        });
        Ok(Server { path: path.to_owned(), listener: Mutex::new(Some(listener)), shared })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Captures the frames on every session's shadowed data queues from now on into a new
    /// pcapng file at `path` (see [`crate::capture`]); the file is complete once
    /// [`Server::finish_capture`] returns or the server is dropped.
    pub fn start_capture(&self, path: &Path, cfg: CaptureConfig) -> Result<(), SessionError> {
        lock(&self.shared.backend).start_capture(path, cfg)
    }

    /// Completes the capture file (taps of a running session record nothing more); what
    /// the capture did, or None when the server does not capture.
    pub fn finish_capture(&self) -> Option<CaptureReport> {
        lock(&self.shared.backend).finish_capture()
    }

    /// A handle to stop the server from elsewhere.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// Serves connections until stopped. On return the device is stopped and reset, and
    /// nothing is mapped; the socket is removed when the server is dropped.
    pub fn serve(&self) -> Result<(), ServeError> {
        let listener = lock(&self.listener);
        let Some(listener) = listener.as_ref() else { return Ok(()) };
        let sh = &self.shared;
        while !sh.stopping.load(Ordering::SeqCst) {
            // SAFETY: the listener's socket is open while `listener` lives (this loop).
            let listening = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener.as_raw_fd()) };
            let mut fds = [PollFd::new(listening, PollFlags::POLLIN), PollFd::new(sh.stop.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => return Err(ServeError::Os { op: "poll", errno }),
            }
            if sh.stopping.load(Ordering::SeqCst) {
                break;
            }
            let Ok(Some(stream)) = listener.accept() else { continue };
            sh.connections.fetch_add(1, Ordering::SeqCst);
            self.serve_connection(stream);
        }
        lock(&sh.backend).disconnected();
        Ok(())
    }

    /// Serves one VMM on an accepted stream until it disconnects, breaks the protocol, or
    /// the server stops; then the device is stopped and reset. [`Server::serve`] calls it
    /// for each connection; tests and fuzzing hand it one end of a socket pair. One
    /// connection is served at a time: a call made while another connection is served
    /// waits until that one ends (as a VMM that connects to a busy socket waits to be
    /// accepted).
    pub fn serve_connection(&self, stream: UnixStream) {
        let sh = &self.shared;
        let _turn = lock(&sh.serving);
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        *lock(&sh.active) = stream.try_clone().ok();
        lock(&sh.backend).connected();
        sh.connected.store(true, Ordering::SeqCst);
        let mut handler = BackendReqHandler::from_stream(stream, sh.backend.clone());
        let why = loop {
            let mut fds = [PollFd::new(handler.as_fd_ref(), PollFlags::POLLIN), PollFd::new(sh.stop.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => break format!("poll: {e}"),
            }
            if sh.stopping.load(Ordering::SeqCst) {
                break "the server stopped".into();
            }
            let fd = handler.as_fd_ref().as_raw_fd();
            // SAFETY: `fd` is the handler's socket, open while `handler` lives (all of
            // this iteration).
            let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let next = intercept::peek(fd);
            let answered = intercept::serve(&sock, &mut lock(&sh.backend));
            match answered {
                intercept::Intercepted::Done => continue,
                intercept::Intercepted::Bad(why) => break why,
                intercept::Intercepted::NotMine => {}
            }
            let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle_request()));
            match handled {
                Ok(Ok(())) => {}
                Ok(Err(vhost::vhost_user::Error::Disconnected)) => break "the VMM disconnected".into(),
                Ok(Err(vhost::vhost_user::Error::ReqHandlerError(e))) => {
                    let request = next.map_or(0, |h| h.request);
                    lock(&sh.backend).note(format!("request {request} refused: {e}"));
                    // A refused request the VMM waits a reply for gets none: close.
                    if intercept::expects_reply(request) {
                        break format!("request {request} refused and it expects a reply");
                    }
                }
                // Anything else may have left the stream out of step: close.
                Ok(Err(e)) => break format!("protocol error: {e}"),
                Err(_) => break "internal error while handling a request".into(),
            }
        };
        sh.connected.store(false, Ordering::SeqCst);
        *lock(&sh.active) = None;
        let mut b = lock(&sh.backend);
        b.note(format!("connection closed: {why}"));
        b.disconnected();
    }

    /// What the server is doing now.
    pub fn report(&self) -> ServerReport {
        let sh = &self.shared;
        let b = lock(&sh.backend);
        let (features, protocol_features, status, guest_memory_bytes) = b.connection_info();
        let queues = b.session().map(queue_reports).unwrap_or_default();
        ServerReport {
            connected: sh.connected.load(Ordering::SeqCst) && b.owned(),
            connections: sh.connections.load(Ordering::SeqCst),
            sessions_started: b.sessions_started,
            running: b.session().is_some(),
            features,
            protocol_features,
            status,
            guest_memory_bytes,
            queues,
            events: b.events.clone(),
            capture: b.capture.as_ref().map(|c| c.report()),
        }
    }
}

fn queue_reports(s: &Session) -> Vec<QueueReport> {
    s.modes()
        .iter()
        .map(|&(index, mode)| QueueReport {
            index,
            mode,
            stats: s.stats(index).unwrap_or_default(),
            fault: s.guest_queues().iter().find(|g| g.index == index).and_then(|g| g.health.fault()),
        })
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stopper().stop();
        let capture = {
            let mut b = lock(&self.shared.backend);
            b.disconnected();
            b.capture.take()
        };
        if let Some(c) = capture {
            c.finish();
        }
        // Dropping the listener removes the socket file.
        drop(lock(&self.listener).take());
    }
}

/// Borrowing the handler's socket for `poll`.
trait AsFdRef {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl<S: vhost::vhost_user::VhostUserBackendReqHandler> AsFdRef for BackendReqHandler<S> {
    fn as_fd_ref(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the handler owns its socket for as long as it lives, and the borrow
        // cannot outlive the handler.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;
    use crate::device::sim::SimDevice;

    /// GET_FEATURES (request 1, protocol version 1) as a VMM writes it.
    const GET_FEATURES: [u8; 12] = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

    /// Whether the backend answers GET_FEATURES on `vmm` within `wait`.
    fn answers(vmm: &mut UnixStream, wait: Duration) -> bool {
        vmm.set_read_timeout(Some(wait)).unwrap();
        let mut reply = [0u8; 20];
        vmm.read_exact(&mut reply).is_ok()
    }

    #[test]
    fn a_second_connection_waits_until_the_first_ends() {
        let dir = std::env::temp_dir().join(format!("svq-vu-turns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let device: Arc<dyn Device> = Arc::new(SimDevice::net([0x52, 0x54, 0, 0, 0, 1], 1500).unwrap());
        let server = Server::bind(device, &dir.join("vu.sock"), SessionConfig::default()).unwrap();
        let (mut first, first_ours) = UnixStream::pair().unwrap();
        let (mut second, second_ours) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| server.serve_connection(first_ours));
            first.write_all(&GET_FEATURES).unwrap();
            assert!(answers(&mut first, Duration::from_secs(10)), "the first VMM is served");
            s.spawn(|| server.serve_connection(second_ours));
            second.write_all(&GET_FEATURES).unwrap();
            assert!(!answers(&mut second, Duration::from_millis(300)), "the second VMM was served beside the first");
            drop(first);
            assert!(answers(&mut second, Duration::from_secs(10)), "the second VMM is served once the first hung up");
            drop(second);
        });
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
