//! The event loop: one worker thread per session waits on the guests' kick eventfds, the
//! device's call eventfds and the device's config interrupt, and runs the shadow queues.
//! Python is never on this path.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::device::{status, Device};
use crate::eventfd::EventFd;
use crate::live::ThreadToken;
use crate::shadow::{FaultKind, InjectSlot, QueueHealth, QueueHook, ShadowQueue};

const STOP: u64 = u64::MAX;
const CONFIG: u64 = u64::MAX - 1;
const INBOX: u64 = u64::MAX - 2;

/// Work handed to the engine thread.
pub enum Request {
    /// Inject an element on a queue.
    Inject {
        /// Queue index.
        queue: u32,
        /// Readable bytes.
        out: Vec<u8>,
        /// Writable bytes.
        in_len: u32,
        /// Where the outcome goes.
        slot: Arc<InjectSlot>,
    },
    /// Attach a hook to a queue.
    Hook {
        /// Queue index.
        queue: u32,
        /// The hook.
        hook: Box<dyn QueueHook>,
        /// Completed once the hook is in place.
        done: Arc<InjectSlot>,
    },
}

#[derive(Default)]
struct Inbox {
    requests: Mutex<Vec<Request>>,
}

/// A running engine. [`Engine::stop`] returns the shadow queues.
pub struct Engine {
    stop: Arc<EventFd>,
    wake: Arc<EventFd>,
    inbox: Arc<Inbox>,
    queues: Vec<u32>,
    thread: Option<JoinHandle<Vec<ShadowQueue>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("queues", &self.queues).finish()
    }
}

impl Engine {
    /// Starts the worker thread over `queues`. `config_call` is the device's config
    /// interrupt; when it fires with NEEDS_RESET set, every queue in `all_health` is marked
    /// broken and its guest woken through the matching `wake` eventfd.
    pub fn start(
        queues: Vec<ShadowQueue>,
        device: Arc<dyn Device>,
        config_call: EventFd,
        all_health: Vec<(Arc<QueueHealth>, Arc<EventFd>)>,
    ) -> Result<Self, Errno> {
        let stop = Arc::new(EventFd::new()?);
        let wake = Arc::new(EventFd::new()?);
        let inbox = Arc::new(Inbox::default());
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, INBOX))?;
        epoll.add(config_call.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, CONFIG))?;
        for (i, q) in queues.iter().enumerate() {
            epoll.add(q.fds.guest_kick.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, (i as u64) << 1))?;
            epoll.add(q.fds.device_call.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, ((i as u64) << 1) | 1))?;
        }
        let indices = queues.iter().map(|q| q.index).collect();
        let ctx = Worker { epoll, device, config_call, all_health, stop: stop.clone(), wake: wake.clone(), inbox: inbox.clone() };
        let token = ThreadToken::new();
        let thread = std::thread::Builder::new()
            .name("svq-engine".into())
            .spawn(move || {
                let _token = token;
                ctx.run(queues)
            })
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)))?;
        Ok(Engine { stop, wake, inbox, queues: indices, thread: Some(thread) })
    }

    /// Whether queue `q` is shadowed by this engine.
    pub fn has_queue(&self, q: u32) -> bool {
        self.queues.contains(&q)
    }

    /// Hands work to the engine thread.
    pub fn submit(&self, reqs: Vec<Request>) {
        self.inbox.requests.lock().unwrap_or_else(|p| p.into_inner()).extend(reqs);
        self.wake.signal();
    }

    /// Stops the worker and hands back the queues (for draining and teardown).
    pub fn stop(mut self) -> Vec<ShadowQueue> {
        self.stop.signal();
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.signal();
            let _ = t.join();
        }
    }
}

struct Worker {
    epoll: Epoll,
    device: Arc<dyn Device>,
    config_call: EventFd,
    all_health: Vec<(Arc<QueueHealth>, Arc<EventFd>)>,
    stop: Arc<EventFd>,
    wake: Arc<EventFd>,
    inbox: Arc<Inbox>,
}

impl Worker {
    /// Runs until told to stop, then hands the queues back. A panic while handling an
    /// event (a bug in svq or in a hook) breaks every queue with an internal fault and
    /// ends the loop, still handing the queues back so that closing returns every
    /// element and releases every buffer.
    fn run(self, mut queues: Vec<ShadowQueue>) -> Vec<ShadowQueue> {
        let mut events = [EpollEvent::empty(); 16];
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Guest kicks that arrived before the engine started are not lost: look once.
            queues.iter_mut().for_each(|q| q.forward());
            loop {
                let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    Err(_) => return,
                };
                for ev in &events[..n] {
                    if !self.handle(ev.data(), &mut queues) {
                        return;
                    }
                }
            }
        }));
        if let Err(panic) = outcome {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            for q in &mut queues {
                q.fail(FaultKind::Internal, format!("svq internal error: {why}"));
            }
        }
        queues
    }

    /// Handles one event; false when the engine must stop.
    fn handle(&self, token: u64, queues: &mut [ShadowQueue]) -> bool {
        match token {
            STOP => {
                self.stop.drain();
                return false;
            }
            CONFIG => {
                self.config_call.drain();
                if self.device.status().is_ok_and(|s| s & status::NEEDS_RESET != 0) {
                    for (h, wake) in &self.all_health {
                        h.set(FaultKind::DeviceNeedsReset, "device entered NEEDS_RESET".into());
                        wake.signal();
                    }
                    // Injected elements waiting on a dead device fail now.
                    queues.iter_mut().for_each(|q| q.fail(FaultKind::DeviceNeedsReset, "device entered NEEDS_RESET".into()));
                }
            }
            INBOX => {
                self.wake.drain();
                let reqs = std::mem::take(&mut *self.inbox.requests.lock().unwrap_or_else(|p| p.into_inner()));
                let mut touched = Vec::new();
                for r in reqs {
                    let (queue, r) = match r {
                        Request::Inject { queue, .. } | Request::Hook { queue, .. } => (queue, r),
                    };
                    let Some(q) = queues.iter_mut().find(|q| q.index == queue) else { continue };
                    match r {
                        Request::Inject { out, in_len, slot, .. } => q.inject(out, in_len, slot),
                        Request::Hook { hook, done, .. } => {
                            q.add_hook(hook);
                            done.complete(Ok((0, Vec::new())));
                        }
                    }
                    touched.push(queue);
                }
                touched.sort_unstable();
                touched.dedup();
                queues.iter_mut().filter(|q| touched.contains(&q.index)).for_each(|q| q.forward());
            }
            token => {
                let q = &mut queues[(token >> 1) as usize];
                if token & 1 == 0 {
                    let kicks = q.fds.guest_kick.drain();
                    q.stats().guest_kicks.fetch_add(kicks, std::sync::atomic::Ordering::Relaxed);
                    q.forward();
                } else {
                    let calls = q.fds.device_call.drain();
                    q.stats().device_calls.fetch_add(calls, std::sync::atomic::Ordering::Relaxed);
                    q.reap();
                }
            }
        }
        true
    }
}
