//! The event loop: one worker thread per session waits on the guests' kick eventfds, the
//! device's call eventfds and the device's config interrupt, and runs the shadow queues.
//! Python is never on this path.
//!
//! The engine can be stopped from any thread, its own included (a hook that closes its
//! session): then the thread cannot be joined, so whoever stops it hands over the rest of
//! the teardown, which the engine thread runs after its loop, on the queues it owns.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::device::Device;
use crate::eventfd::EventFd;
use crate::fault::{Fault, QueueFault, QueueHealth};
use crate::live::ThreadToken;
use crate::shadow::{InjectError, InjectSlot, QueueHook, ShadowQueue};
use crate::virtio::status;

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

impl Request {
    fn queue(&self) -> u32 {
        match self {
            Request::Inject { queue, .. } | Request::Hook { queue, .. } => *queue,
        }
    }

    /// Tells whoever waits on the request that it will never run.
    fn cancel(self, why: InjectError) {
        match self {
            Request::Inject { slot, .. } => slot.complete(Err(why)),
            Request::Hook { done, .. } => done.complete(Err(why)),
        }
    }
}

/// The rest of a teardown, run by the engine thread after its loop when the engine was
/// stopped from that thread.
pub type Teardown = Box<dyn FnOnce(Vec<ShadowQueue>) + Send>;

#[derive(Default)]
struct Inbox {
    requests: Vec<Request>,
    /// Set once the engine stops: later requests are cancelled, not queued.
    closed: bool,
    teardown: Option<Teardown>,
}

/// A queue every fault on the device reaches: its index, health and guest notifier.
pub type Watched = (u32, Arc<QueueHealth>, Arc<EventFd>);

/// A running engine. [`Engine::stop`] returns the shadow queues.
pub struct Engine {
    stop: Arc<EventFd>,
    wake: Arc<EventFd>,
    inbox: Arc<Mutex<Inbox>>,
    queues: Vec<u32>,
    thread_id: ThreadId,
    thread: Option<JoinHandle<Vec<ShadowQueue>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("queues", &self.queues).finish()
    }
}

fn lock(m: &Mutex<Inbox>) -> std::sync::MutexGuard<'_, Inbox> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Starts the worker thread over `queues`. `config_call` is the device's config
    /// interrupt; when it fires with NEEDS_RESET set, every queue in `watched` is marked
    /// broken and its guest woken.
    pub fn start(
        queues: Vec<ShadowQueue>,
        device: Arc<dyn Device>,
        config_call: EventFd,
        watched: Vec<Watched>,
        busy_poll: Duration,
    ) -> Result<Self, Errno> {
        let stop = Arc::new(EventFd::new()?);
        let wake = Arc::new(EventFd::new()?);
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, INBOX))?;
        epoll.add(config_call.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, CONFIG))?;
        for (i, q) in queues.iter().enumerate() {
            epoll.add(q.fds.guest_kick.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, (i as u64) << 1))?;
            epoll.add(q.fds.device_call.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, ((i as u64) << 1) | 1))?;
        }
        let indices = queues.iter().map(|q| q.index).collect();
        let poll = (!busy_poll.is_zero()).then(|| Poll::new(busy_poll));
        let ctx = Worker { epoll, device, config_call, watched, stop: stop.clone(), wake: wake.clone(), inbox: inbox.clone(), poll };
        let token = ThreadToken::new();
        let thread = std::thread::Builder::new()
            .name("svq-engine".into())
            .spawn(move || {
                let _token = token;
                ctx.run(queues)
            })
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)))?;
        let thread_id = thread.thread().id();
        Ok(Engine { stop, wake, inbox, queues: indices, thread_id, thread: Some(thread) })
    }

    /// Whether queue `q` is shadowed by this engine.
    pub fn has_queue(&self, q: u32) -> bool {
        self.queues.contains(&q)
    }

    /// Whether the caller runs on the engine thread (inside a hook).
    pub fn on_engine_thread(&self) -> bool {
        std::thread::current().id() == self.thread_id
    }

    /// Hands work to the engine thread; after the engine stopped, each request is
    /// cancelled with [`InjectError::Closed`] at once.
    pub fn submit(&self, reqs: Vec<Request>) {
        let mut inbox = lock(&self.inbox);
        if inbox.closed {
            drop(inbox);
            reqs.into_iter().for_each(|r| r.cancel(InjectError::Closed));
            return;
        }
        inbox.requests.extend(reqs);
        drop(inbox);
        self.wake.signal();
    }

    /// Stops the worker and hands back the queues (for draining and teardown). Must not
    /// be called on the engine thread (see [`Engine::stop_from_engine_thread`]).
    pub fn stop(mut self) -> Vec<ShadowQueue> {
        self.stop.signal();
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }

    /// Stops the worker from its own thread: the loop ends once the current event is
    /// handled, then `teardown` runs there on the queues, and the thread exits.
    pub fn stop_from_engine_thread(mut self, teardown: Teardown) {
        lock(&self.inbox).teardown = Some(teardown);
        self.stop.signal();
        // Detached: the thread finishes on its own (and is counted until it does).
        drop(self.thread.take());
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.signal();
            if std::thread::current().id() != t.thread().id() {
                let _ = t.join();
            }
        }
    }
}

/// The adaptive poll: after work, the engine keeps looking at the rings (notifications
/// off, so neither the guest nor the device pays for a kick or a call) for a window that
/// grows while work keeps coming within it and shrinks while it does not, up to `max`.
/// Then it re-arms notifications, looks once more, and sleeps: an idle queue costs
/// nothing.
struct Poll {
    max: Duration,
    window: Duration,
    /// When the last work was seen; None while sleeping.
    last_work: Option<Instant>,
    /// Whether work came after a pause inside the current window (the window paid off).
    paid_off: bool,
}

impl Poll {
    const MIN: Duration = Duration::from_micros(5);

    fn new(max: Duration) -> Self {
        Poll { max, window: (max / 4).max(Self::MIN), last_work: None, paid_off: false }
    }
}

/// What handling one event did.
enum Handled {
    Stop,
    /// A queue was kicked or called.
    Moved,
    Nothing,
}

struct Worker {
    poll: Option<Poll>,
    epoll: Epoll,
    device: Arc<dyn Device>,
    config_call: EventFd,
    watched: Vec<Watched>,
    stop: Arc<EventFd>,
    wake: Arc<EventFd>,
    inbox: Arc<Mutex<Inbox>>,
}

impl Worker {
    /// Runs until told to stop, then hands the queues back (or tears them down itself
    /// when stopped from this thread). A panic while handling an event (a bug in svq or
    /// in a hook) breaks every queue with an internal fault and ends the loop, still
    /// handing the queues back so that closing returns every element and releases every
    /// buffer.
    fn run(mut self, mut queues: Vec<ShadowQueue>) -> Vec<ShadowQueue> {
        let mut events = [EpollEvent::empty(); 16];
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Guest kicks that arrived before the engine started are not lost: look once.
            queues.iter_mut().for_each(|q| q.forward());
            loop {
                let polling = self.poll.as_ref().is_some_and(|p| p.last_work.is_some());
                let timeout = if polling { EpollTimeout::ZERO } else { EpollTimeout::NONE };
                let n = match self.epoll.wait(&mut events, timeout) {
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    Err(_) => return,
                };
                let mut moved = false;
                for ev in &events[..n] {
                    match self.handle(ev.data(), &mut queues) {
                        Handled::Stop => return,
                        Handled::Moved => moved = true,
                        Handled::Nothing => {}
                    }
                }
                self.keep_polling(&mut queues, moved);
            }
        }));
        if let Err(panic) = outcome {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            for q in &mut queues {
                q.fail(Fault::Internal(why.clone()));
            }
        }
        // No request runs from now on: whoever waits on one learns it now.
        let (pending, teardown) = {
            let mut inbox = lock(&self.inbox);
            inbox.closed = true;
            (std::mem::take(&mut inbox.requests), inbox.teardown.take())
        };
        pending.into_iter().for_each(|r| r.cancel(InjectError::Closed));
        match teardown {
            Some(t) => {
                t(queues);
                Vec::new()
            }
            None => queues,
        }
    }

    /// After a round of events: with polling on, looks at every ring again, and keeps
    /// doing so (without sleeping) while work comes within the window; once the window
    /// passes idle, re-arms notifications and looks a last time before sleeping.
    fn keep_polling(&mut self, queues: &mut [ShadowQueue], moved: bool) {
        let Some(poll) = self.poll.as_mut() else { return };
        let now = Instant::now();
        let moved = queues.iter_mut().fold(moved, |m, q| q.poll() | m);
        match poll.last_work {
            _ if moved => {
                if poll.last_work.is_some_and(|t| now - t > Poll::MIN) {
                    poll.paid_off = true;
                }
                poll.last_work = Some(now);
            }
            Some(t) if now - t < poll.window => {}
            Some(_) => {
                // The window passed idle: adapt it, re-arm, and sleep unless work raced in.
                poll.window = if poll.paid_off { (poll.window * 2).min(poll.max) } else { (poll.window / 2).max(Poll::MIN) };
                poll.paid_off = false;
                let raced = queues.iter_mut().fold(false, |r, q| q.rearm() | r);
                poll.last_work = raced.then_some(now);
            }
            None => {}
        }
    }

    /// Handles one event.
    fn handle(&self, token: u64, queues: &mut [ShadowQueue]) -> Handled {
        match token {
            STOP => {
                self.stop.drain();
                return Handled::Stop;
            }
            CONFIG => {
                self.config_call.drain();
                if self.device.status().is_ok_and(|s| s & status::NEEDS_RESET != 0) {
                    for (q, h, wake) in &self.watched {
                        h.set(QueueFault { queue: *q, fault: Fault::DeviceNeedsReset });
                        wake.signal();
                    }
                    // Injected elements waiting on a dead device fail now.
                    queues.iter_mut().for_each(|q| q.fail(Fault::DeviceNeedsReset));
                }
            }
            INBOX => {
                self.wake.drain();
                let reqs = std::mem::take(&mut lock(&self.inbox).requests);
                let mut touched = Vec::new();
                for r in reqs {
                    let queue = r.queue();
                    let Some(q) = queues.iter_mut().find(|q| q.index == queue) else {
                        r.cancel(InjectError::Invalid(format!("queue {queue} is not shadowed")));
                        continue;
                    };
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
                let Some(q) = queues.get_mut((token >> 1) as usize) else { return Handled::Nothing };
                if token & 1 == 0 {
                    let kicks = q.fds.guest_kick.drain();
                    q.stats().guest_kicks.fetch_add(kicks, Ordering::Relaxed);
                    if self.poll.is_none() {
                        q.forward();
                    }
                } else {
                    let calls = q.fds.device_call.drain();
                    q.stats().device_calls.fetch_add(calls, Ordering::Relaxed);
                    if self.poll.is_none() {
                        q.reap();
                    }
                }
                // A polling engine looks at every ring right after the events.
                return Handled::Moved;
            }
        }
        Handled::Nothing
    }
}
