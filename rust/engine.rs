//! The event loop: a session's shadow queues spread over one or more worker threads
//! (lanes); each queue is owned by one lane, which waits on its guest kick and device
//! call eventfds and runs it, so nothing on the per-element path takes a lock. Lane 0
//! also watches the device's config interrupt. Python is never on this path.
//!
//! The engine can be stopped from any thread, a lane's own included (a hook that closes
//! its session): then that thread cannot be joined, so whoever stops it hands over the
//! rest of the teardown, which that lane runs after its loop, on every lane's queues.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::capture::Tap;
use crate::device::Device;
use crate::dirty::DirtyLog;
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
    /// Attach a packet capture's tap to a queue (or detach it with None).
    Capture {
        /// Queue index.
        queue: u32,
        /// The tap.
        tap: Option<Box<Tap>>,
        /// Completed once the tap is in place.
        done: Arc<InjectSlot>,
    },
    /// Attach (or detach) the dirty log on every queue.
    Log {
        /// The log.
        log: Option<Arc<DirtyLog>>,
        /// Completed once every queue logs.
        done: Arc<InjectSlot>,
    },
    /// Take over a queue (it was passthrough and is now shadowed).
    Adopt {
        /// The queue.
        queue: Box<ShadowQueue>,
        /// Its outcome (an epoll registration may fail).
        done: SyncSender<Result<(), Errno>>,
    },
    /// Give a queue back (it goes back to passthrough, or is handed over).
    Release {
        /// Queue index.
        queue: u32,
        /// The queue, when the engine had it.
        done: SyncSender<Option<Box<ShadowQueue>>>,
    },
    /// Break every queue of the lane (another lane saw the device need a reset, or
    /// panicked).
    Fail(Fault),
}

impl Request {
    /// The shadowed queue the request acts on, for those that need one already running.
    fn shadowed_queue(&self) -> Option<u32> {
        match self {
            Request::Inject { queue, .. } | Request::Capture { queue, .. } | Request::Hook { queue, .. } => Some(*queue),
            _ => None,
        }
    }

    /// Tells whoever waits on the request that it will never run.
    fn cancel(self, why: InjectError) {
        match self {
            Request::Inject { slot, .. } => slot.complete(Err(why)),
            Request::Hook { done, .. } | Request::Log { done, .. } | Request::Capture { done, .. } => done.complete(Err(why)),
            // The queue comes back to the caller, who tears it down.
            Request::Adopt { queue, done } => {
                let _ = done.send(Err(Errno::ESHUTDOWN));
                drop(queue);
            }
            Request::Release { done, .. } => {
                let _ = done.send(None);
            }
            Request::Fail(_) => {}
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

/// One worker thread and the queues it owns.
struct Lane {
    stop: Arc<EventFd>,
    wake: Arc<EventFd>,
    inbox: Arc<Mutex<Inbox>>,
    queues: Vec<u32>,
    thread_id: ThreadId,
    thread: Option<JoinHandle<Vec<ShadowQueue>>>,
}

impl Lane {
    /// Hands work to the lane; once it stopped, each request is cancelled at once.
    fn submit(&self, reqs: Vec<Request>) {
        if reqs.is_empty() {
            return;
        }
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
}

/// A running engine. [`Engine::stop`] returns the shadow queues.
pub struct Engine {
    lanes: Vec<Lane>,
    /// The lane each queue goes to (queues not listed: lane 0), also when adopted later.
    places: Vec<(u32, usize)>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues: Vec<&Vec<u32>> = self.lanes.iter().map(|l| &l.queues).collect();
        f.debug_struct("Engine").field("lanes", &queues).finish()
    }
}

/// The lanes a session may use by default: one per CPU this process may run on.
pub fn default_workers() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills it.
    let count = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            libc::CPU_COUNT(&set) as usize
        } else {
            0
        }
    };
    if count > 0 {
        count
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A queue's events carry its index: bit 0 says which eventfd (guest kick 0, device call 1).
fn watch(epoll: &Epoll, q: &ShadowQueue) -> Result<(), Errno> {
    let token = u64::from(q.index) << 1;
    epoll.add(q.fds.guest_kick.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))?;
    epoll.add(q.fds.device_call.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token | 1))
}

fn unwatch(epoll: &Epoll, q: &ShadowQueue) {
    let _ = epoll.delete(q.fds.guest_kick.as_fd());
    let _ = epoll.delete(q.fds.device_call.as_fd());
}

fn lock(m: &Mutex<Inbox>) -> std::sync::MutexGuard<'_, Inbox> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Starts one worker thread: see [`Engine::start_lanes`].
    pub fn start(
        queues: Vec<ShadowQueue>,
        device: Arc<dyn Device>,
        config_call: EventFd,
        watched: Vec<Watched>,
        busy_poll: Duration,
    ) -> Result<Self, Errno> {
        Self::start_lanes(queues, Vec::new(), device, config_call, watched, busy_poll)
    }

    /// Starts the worker threads over `queues`, each queue on the lane `places` gives it
    /// (lane 0 when not listed; as many lanes as the highest lane named, plus one).
    /// `config_call` is the device's config interrupt; when it fires with NEEDS_RESET
    /// set, every queue in `watched` is marked broken and its guest woken, and every
    /// shadowed queue fails.
    pub fn start_lanes(
        queues: Vec<ShadowQueue>,
        places: Vec<(u32, usize)>,
        device: Arc<dyn Device>,
        config_call: EventFd,
        watched: Vec<Watched>,
        busy_poll: Duration,
    ) -> Result<Self, Errno> {
        let n = places.iter().map(|&(_, l)| l + 1).max().unwrap_or(1);
        let place = |q: u32| places.iter().find(|(i, _)| *i == q).map_or(0, |&(_, l)| l);
        let mut per_lane: Vec<Vec<ShadowQueue>> = (0..n).map(|_| Vec::new()).collect();
        for q in queues {
            per_lane[place(q.index)].push(q);
        }
        let mut parts = Vec::with_capacity(n);
        for _ in 0..n {
            parts.push((Arc::new(EventFd::new()?), Arc::new(EventFd::new()?), Arc::new(Mutex::new(Inbox::default()))));
        }
        let peers: Vec<Peer> = parts.iter().map(|(_, wake, inbox)| (inbox.clone(), wake.clone())).collect();
        let mut config_call = Some(config_call);
        let mut watched = Some(watched);
        let mut engine = Engine { lanes: Vec::with_capacity(n), places: places.clone() };
        for (k, (queues, (stop, wake, inbox))) in per_lane.into_iter().zip(parts).enumerate() {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
            epoll.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))?;
            epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, INBOX))?;
            let config_call = if k == 0 { config_call.take() } else { None };
            if let Some(c) = &config_call {
                epoll.add(c.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, CONFIG))?;
            }
            for q in &queues {
                watch(&epoll, q)?;
            }
            let indices = queues.iter().map(|q| q.index).collect();
            let peers = peers.iter().enumerate().filter(|(i, _)| *i != k).map(|(_, p)| p.clone()).collect();
            let ctx = Worker {
                epoll,
                device: device.clone(),
                config_call,
                watched: if k == 0 { watched.take().unwrap_or_default() } else { Vec::new() },
                stop: stop.clone(),
                wake: wake.clone(),
                inbox: inbox.clone(),
                poll: Poll::new(busy_poll),
                peers,
            };
            let token = ThreadToken::new();
            let name = if k == 0 { "svq-engine".to_owned() } else { format!("svq-engine-{k}") };
            // A lane that cannot start stops the ones before it (the engine's drop).
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let _token = token;
                    ctx.run(queues)
                })
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)))?;
            let thread_id = thread.thread().id();
            engine.lanes.push(Lane { stop, wake, inbox, queues: indices, thread_id, thread: Some(thread) });
        }
        Ok(engine)
    }

    /// Number of worker threads.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// The lane that owns queue `q`, if any.
    fn owner(&self, q: u32) -> Option<usize> {
        self.lanes.iter().position(|l| l.queues.contains(&q))
    }

    /// The lane queue `q` goes to.
    fn place(&self, q: u32) -> usize {
        self.places.iter().find(|(i, _)| *i == q).map_or(0, |&(_, l)| l.min(self.lanes.len() - 1))
    }

    /// Whether queue `q` is shadowed by this engine.
    pub fn has_queue(&self, q: u32) -> bool {
        self.owner(q).is_some()
    }

    /// Whether the caller runs on one of the engine's threads (inside a hook).
    pub fn on_engine_thread(&self) -> bool {
        let me = std::thread::current().id();
        self.lanes.iter().any(|l| l.thread_id == me)
    }

    /// Takes over a shadowed queue (events and all) while running.
    pub fn adopt(&mut self, queue: ShadowQueue) -> Result<(), Errno> {
        let index = queue.index;
        let lane = self.place(index);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.lanes[lane].submit(vec![Request::Adopt { queue: Box::new(queue), done: tx }]);
        rx.recv().unwrap_or(Err(Errno::ESHUTDOWN))?;
        self.lanes[lane].queues.push(index);
        Ok(())
    }

    /// Gives a shadowed queue back (its events are no longer watched).
    pub fn release(&mut self, index: u32) -> Option<ShadowQueue> {
        let lane = self.owner(index)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.lanes[lane].submit(vec![Request::Release { queue: index, done: tx }]);
        let q = rx.recv().ok().flatten()?;
        self.lanes[lane].queues.retain(|&i| i != index);
        Some(*q)
    }

    /// Hands work to the lanes owning the queues it names (a queue no lane owns: the
    /// lane it would go to, which refuses it); after the engine stopped, each request is
    /// cancelled with [`InjectError::Closed`] at once. A dirty log goes through
    /// [`Engine::set_log`].
    pub fn submit(&self, reqs: Vec<Request>) {
        let mut per_lane: Vec<Vec<Request>> = self.lanes.iter().map(|_| Vec::new()).collect();
        for r in reqs {
            let lane = match &r {
                Request::Inject { queue, .. }
                | Request::Hook { queue, .. }
                | Request::Capture { queue, .. }
                | Request::Release { queue, .. } => self.owner(*queue).unwrap_or_else(|| self.place(*queue)),
                Request::Adopt { queue, .. } => self.place(queue.index),
                Request::Log { .. } if self.lanes.len() > 1 => {
                    r.cancel(InjectError::Invalid("a dirty log is attached with Engine::set_log".into()));
                    continue;
                }
                Request::Log { .. } | Request::Fail(_) => 0,
            };
            per_lane[lane].push(r);
        }
        for (lane, reqs) in self.lanes.iter().zip(per_lane) {
            lane.submit(reqs);
        }
    }

    /// Attaches (or detaches) the dirty log on every queue of every lane; each slot
    /// completes once its lane's queues log.
    pub fn set_log(&self, log: Option<Arc<DirtyLog>>) -> Vec<Arc<InjectSlot>> {
        self.lanes
            .iter()
            .map(|lane| {
                let done = Arc::new(InjectSlot::default());
                lane.submit(vec![Request::Log { log: log.clone(), done: done.clone() }]);
                done
            })
            .collect()
    }

    /// Stops the workers and hands back the queues, by index (for draining and
    /// teardown). Must not be called on an engine thread (see
    /// [`Engine::stop_from_engine_thread`]).
    pub fn stop(mut self) -> Vec<ShadowQueue> {
        self.lanes.iter().for_each(|l| l.stop.signal());
        let mut queues: Vec<ShadowQueue> =
            self.lanes.iter_mut().filter_map(|l| l.thread.take()).flat_map(|t| t.join().unwrap_or_default()).collect();
        queues.sort_by_key(|q| q.index);
        queues
    }

    /// Stops the workers from one of their own threads: that lane's loop ends once the
    /// current event is handled, then it joins the other lanes and runs `teardown`
    /// there on every queue, and the thread exits.
    pub fn stop_from_engine_thread(mut self, teardown: Teardown) {
        let me = std::thread::current().id();
        let Some(mine) = self.lanes.iter().position(|l| l.thread_id == me) else {
            // Not on an engine thread after all: an ordinary stop.
            return teardown(self.stop());
        };
        self.lanes.iter().for_each(|l| l.stop.signal());
        // Joined by this lane once its hook returned (a hook may hold what another lane
        // waits for, the GIL for one).
        let others: Vec<JoinHandle<Vec<ShadowQueue>>> =
            self.lanes.iter_mut().enumerate().filter(|(k, _)| *k != mine).filter_map(|(_, l)| l.thread.take()).collect();
        lock(&self.lanes[mine].inbox).teardown = Some(Box::new(move |mut queues| {
            for t in others {
                queues.extend(t.join().unwrap_or_default());
            }
            queues.sort_by_key(|q| q.index);
            teardown(queues)
        }));
        // Detached: the thread finishes on its own (and is counted until it does).
        drop(self.lanes[mine].thread.take());
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.lanes.iter().for_each(|l| l.stop.signal());
        let me = std::thread::current().id();
        for t in self.lanes.iter_mut().filter_map(|l| l.thread.take()) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

/// Another lane's inbox and wake-up.
type Peer = (Arc<Mutex<Inbox>>, Arc<EventFd>);

/// The adaptive poll: after work, the engine keeps looking at the rings (notifications
/// off, so neither the guest nor the device pays for a kick or a call) for a window that
/// grows while work keeps coming within it and shrinks while it does not, up to `max`.
/// Then it re-arms notifications, looks once more, and sleeps: an idle queue costs
/// nothing.
struct Poll {
    min: Duration,
    max: Duration,
    window: Duration,
    /// When the last work was seen; None while sleeping.
    last_work: Option<Instant>,
    /// Whether work came after a pause inside the current window (the window paid off).
    paid_off: bool,
}

impl Poll {
    const MIN: Duration = Duration::from_micros(5);

    /// A window of at most `max` (zero: re-arm as soon as the queues are idle).
    fn new(max: Duration) -> Self {
        let min = Self::MIN.min(max);
        Poll { min, max, window: (max / 4).max(min), last_work: None, paid_off: false }
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
    poll: Poll,
    epoll: Epoll,
    device: Arc<dyn Device>,
    /// Lane 0's: the device's config interrupt.
    config_call: Option<EventFd>,
    watched: Vec<Watched>,
    stop: Arc<EventFd>,
    wake: Arc<EventFd>,
    inbox: Arc<Mutex<Inbox>>,
    /// The other lanes, told when every queue must fail.
    peers: Vec<Peer>,
}

impl Worker {
    /// Breaks every queue of the other lanes with `fault`.
    fn tell_peers(&self, fault: &Fault) {
        for (inbox, wake) in &self.peers {
            let mut inbox = lock(inbox);
            if !inbox.closed {
                inbox.requests.push(Request::Fail(fault.clone()));
                drop(inbox);
                wake.signal();
            }
        }
    }

    /// Runs until told to stop, then hands the queues back (or tears them down itself
    /// when stopped from this thread). A panic while handling an event (a bug in svq or
    /// in a hook) breaks every queue with an internal fault and ends the loop, still
    /// handing the queues back so that closing returns every element and releases every
    /// buffer.
    fn run(mut self, mut queues: Vec<ShadowQueue>) -> Vec<ShadowQueue> {
        let mut events = [EpollEvent::empty(); 16];
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Guest kicks that arrived before the engine started are not lost: look once.
            self.run_queues(&mut queues, true);
            loop {
                let polling = self.poll.last_work.is_some();
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
                self.run_queues(&mut queues, moved);
            }
        }));
        if let Err(panic) = outcome {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let fault = Fault::Internal(why);
            for q in &mut queues {
                q.fail(fault.clone());
            }
            self.tell_peers(&fault);
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

    /// Runs one request; the queue it touched, if it should forward now.
    fn apply(&self, r: Request, queues: &mut Vec<ShadowQueue>) -> Option<u32> {
        let find = |queues: &mut Vec<ShadowQueue>, i: u32| queues.iter().position(|q| q.index == i);
        if let Some(q) = r.shadowed_queue().filter(|&q| find(queues, q).is_none()) {
            r.cancel(InjectError::Invalid(format!("queue {q} is not shadowed")));
            return None;
        }
        match r {
            Request::Log { log, done } => {
                queues.iter_mut().for_each(|q| q.set_dirty_log(log.clone()));
                done.complete(Ok((0, Vec::new())));
                None
            }
            Request::Fail(fault) => {
                queues.iter_mut().for_each(|q| q.fail(fault.clone()));
                None
            }
            Request::Adopt { queue, done } => {
                let index = queue.index;
                match watch(&self.epoll, &queue) {
                    Ok(()) => {
                        queues.push(*queue);
                        let _ = done.send(Ok(()));
                        Some(index)
                    }
                    Err(e) => {
                        unwatch(&self.epoll, &queue);
                        let _ = done.send(Err(e));
                        None
                    }
                }
            }
            Request::Release { queue, done } => {
                let q = find(queues, queue).map(|at| queues.remove(at));
                if let Some(q) = &q {
                    unwatch(&self.epoll, q);
                }
                let _ = done.send(q.map(Box::new));
                None
            }
            // Checked above: the queue runs here.
            Request::Inject { queue, out, in_len, slot } => {
                let at = find(queues, queue)?;
                queues[at].inject(out, in_len, slot);
                Some(queue)
            }
            Request::Capture { queue, tap, done } => {
                let at = find(queues, queue)?;
                queues[at].set_capture(tap);
                done.complete(Ok((0, Vec::new())));
                None
            }
            Request::Hook { queue, hook, done } => {
                let at = find(queues, queue)?;
                queues[at].add_hook(hook);
                done.complete(Ok((0, Vec::new())));
                Some(queue)
            }
        }
    }

    /// Runs the queues after a round of events: passes over every queue (reaping and
    /// forwarding, notifications off) until a pass finds nothing new, then everything
    /// forwarded reaches the devices at once. Because a pass that found work is always
    /// followed by another, a chain the guest published on one queue of this lane before
    /// a chain on another of its queues (a receive buffer before the frame sent to it, in
    /// one queue pair) is on the device's rings before the other becomes visible; queues
    /// of different lanes have no such order. Then the poll window: while work keeps coming,
    /// the engine keeps looking without sleeping; once it passes idle, notifications are
    /// re-armed, checked once more, and the engine sleeps.
    fn run_queues(&mut self, queues: &mut [ShadowQueue], mut moved: bool) {
        const MAX_PASSES: usize = 8;
        for _ in 0..MAX_PASSES {
            let pass = queues.iter_mut().fold(false, |m, q| q.poll() | m);
            moved |= pass;
            if !pass {
                break;
            }
        }
        queues.iter_mut().for_each(ShadowQueue::publish);
        let poll = &mut self.poll;
        let now = Instant::now();
        if moved {
            if poll.last_work.is_some_and(|t| now - t > Poll::MIN) {
                poll.paid_off = true;
            }
            poll.last_work = Some(now);
        }
        let Some(t) = poll.last_work else { return };
        if now - t < poll.window {
            return;
        }
        // The window passed idle: adapt it, re-arm, and sleep unless work raced in.
        poll.window = if poll.paid_off { (poll.window * 2).min(poll.max) } else { (poll.window / 2).max(poll.min) };
        poll.paid_off = false;
        let raced = queues.iter_mut().fold(false, |r, q| q.rearm() | r);
        poll.last_work = raced.then_some(now);
    }

    /// Handles one event.
    fn handle(&self, token: u64, queues: &mut Vec<ShadowQueue>) -> Handled {
        match token {
            STOP => {
                self.stop.drain();
                return Handled::Stop;
            }
            CONFIG => {
                if let Some(c) = &self.config_call {
                    c.drain();
                }
                if self.device.status().is_ok_and(|s| s & status::NEEDS_RESET != 0) {
                    for (q, h, wake) in &self.watched {
                        h.set(QueueFault { queue: *q, fault: Fault::DeviceNeedsReset });
                        wake.signal();
                    }
                    // Injected elements waiting on a dead device fail now, on every lane.
                    queues.iter_mut().for_each(|q| q.fail(Fault::DeviceNeedsReset));
                    self.tell_peers(&Fault::DeviceNeedsReset);
                }
            }
            INBOX => {
                self.wake.drain();
                let reqs = std::mem::take(&mut lock(&self.inbox).requests);
                let mut touched = false;
                for r in reqs {
                    touched |= self.apply(r, queues).is_some();
                }
                if touched {
                    return Handled::Moved;
                }
            }
            token => {
                let Some(q) = queues.iter_mut().find(|q| u64::from(q.index) == token >> 1) else { return Handled::Nothing };
                if token & 1 == 0 {
                    let kicks = q.fds.guest_kick.drain();
                    q.stats().guest_kicks.fetch_add(kicks, Ordering::Relaxed);
                } else {
                    let calls = q.fds.device_call.drain();
                    q.stats().device_calls.fetch_add(calls, Ordering::Relaxed);
                }
                // The rings are looked at once every event of the round is in.
                return Handled::Moved;
            }
        }
        Handled::Nothing
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::device::sim::Misbehaviour;
    use crate::fault::FaultKind;
    use crate::shadow::testkit::{frame, Rig, PATIENCE};
    use crate::shadow::{Forwarding, StopReason, Verdict};

    /// An engine over `queues`, watching every guest ring of `rig`.
    fn engine(rig: &Rig, queues: Vec<ShadowQueue>) -> Engine {
        Engine::start(queues, rig.device(), rig.config_call(), rig.watched(), Duration::from_micros(50)).unwrap()
    }

    /// The net device's RX (0) and TX (1) queues, translated; the device started.
    fn net() -> (Rig, ShadowQueue, ShadowQueue) {
        let mut rig = Rig::net(true);
        let rx = rig.queue(0, Forwarding::Translate, 64, 64);
        let tx = rig.queue(1, Forwarding::Translate, 64, 64);
        rig.start();
        (rig, rx, tx)
    }

    fn post_buffers(rig: &mut Rig, n: u32) {
        for _ in 0..n {
            rig.add(0, &[], &[2048]);
        }
        rig.publish(0);
    }

    /// Posts `n` frames numbered from `seq` on TX (each in two buffers); the frames.
    fn post_frames(rig: &mut Rig, seq: u32, n: u32) -> Vec<Vec<u8>> {
        let frames: Vec<Vec<u8>> = (seq..seq + n).map(|i| frame(60 + (37 * i as usize) % 1400, i)).collect();
        for f in &frames {
            rig.add(1, &[&f[..12], &f[12..]], &[]);
        }
        rig.publish(1);
        frames
    }

    /// Waits for `frames` back on RX, in order, and their TX completions.
    fn received(rig: &mut Rig, frames: &[Vec<u8>]) {
        let got = rig.wait(0, frames.len());
        for (d, f) in got.iter().zip(frames) {
            assert_eq!(&d.data[..d.len as usize], &f[..]);
        }
        assert!(rig.wait(1, frames.len()).iter().all(|d| d.len == 0));
    }

    fn indices(queues: &[ShadowQueue]) -> Vec<u32> {
        let mut v: Vec<u32> = queues.iter().map(|q| q.index).collect();
        v.sort_unstable();
        v
    }

    /// Attaches `hook` to queue `q` through the engine, and waits until it is in place.
    fn hook(e: &Engine, q: u32, hook: Box<dyn QueueHook>) {
        let done = Arc::new(InjectSlot::default());
        e.submit(vec![Request::Hook { queue: q, hook, done: done.clone() }]);
        assert_eq!(done.wait_until(Instant::now() + PATIENCE), Some(Ok((0, Vec::new()))));
    }

    #[test]
    fn an_engine_forwards_guest_and_injected_traffic_and_stop_returns_its_queues() {
        let (mut rig, rx, tx) = net();
        let e = engine(&rig, vec![rx, tx]);
        for round in 0..4 {
            post_buffers(&mut rig, 16);
            let frames = post_frames(&mut rig, round * 16, 16);
            received(&mut rig, &frames);
        }
        // svq's own frame on TX loops back to the guest's RX like any other.
        post_buffers(&mut rig, 1);
        let own = frame(80, 999);
        let slot = Arc::new(InjectSlot::default());
        e.submit(vec![Request::Inject { queue: 1, out: own.clone(), in_len: 0, slot: slot.clone() }]);
        assert_eq!(slot.wait_until(Instant::now() + PATIENCE), Some(Ok((0, Vec::new()))));
        let got = rig.wait(0, 1);
        assert_eq!(&got[0].data[..got[0].len as usize], &own[..]);
        // A request for a queue the engine does not shadow is refused.
        let other = Arc::new(InjectSlot::default());
        e.submit(vec![Request::Inject { queue: 2, out: vec![1], in_len: 1, slot: other.clone() }]);
        assert!(matches!(other.wait_until(Instant::now() + PATIENCE), Some(Err(InjectError::Invalid(_)))));
        let queues = e.stop();
        assert_eq!(indices(&queues), [0, 1]);
        let elements: Vec<u64> = queues.iter().map(|q| q.stats().elements.load(Ordering::Relaxed)).collect();
        assert_eq!(elements, [65, 65]);
        assert!(queues.iter().all(|q| !q.is_broken()));
    }

    #[test]
    fn queues_are_adopted_and_released_while_the_engine_runs() {
        let (mut rig, rx, tx) = net();
        let mut e = engine(&rig, vec![rx]);
        assert!(e.has_queue(0) && !e.has_queue(1));
        e.adopt(tx).unwrap();
        assert!(e.has_queue(1));
        post_buffers(&mut rig, 8);
        let frames = post_frames(&mut rig, 0, 8);
        received(&mut rig, &frames);
        // RX comes back to be served here; the engine goes on serving TX.
        let mut rx = e.release(0).expect("the engine had queue 0");
        assert_eq!(rx.index, 0);
        assert!(!e.has_queue(0));
        assert!(e.release(0).is_none(), "released once");
        post_buffers(&mut rig, 8);
        rx.forward();
        let frames = post_frames(&mut rig, 8, 8);
        let got = rig.complete(&mut rx, 8);
        for (d, f) in got.iter().zip(&frames) {
            assert_eq!(&d.data[..d.len as usize], &f[..]);
        }
        assert_eq!(rig.wait(1, 8).len(), 8);
        // Adopted again, it is handed back with the others when the engine stops.
        e.adopt(rx).unwrap();
        assert_eq!(indices(&e.stop()), [0, 1]);
    }

    /// What the teardown saw: whether the stop came from the engine thread, the thread
    /// the teardown ran on, the queues it got and the guest chains stopping returned.
    type Report = (bool, Option<String>, Vec<u32>, usize);

    /// Stops the engine from its own thread on the first element it sees, and refuses it.
    struct StopsEngine {
        engine: Arc<Mutex<Option<Engine>>>,
        report: mpsc::Sender<Report>,
    }

    impl QueueHook for StopsEngine {
        fn avail(&mut self, _out: &[u8], _in_len: u32) -> Verdict {
            if let Some(e) = self.engine.lock().unwrap().take() {
                let on_engine = e.on_engine_thread();
                let report = self.report.clone();
                e.stop_from_engine_thread(Box::new(move |mut queues| {
                    let thread = std::thread::current().name().map(str::to_owned);
                    let returned: usize = queues.iter_mut().map(|q| q.stop(StopReason::Closed, false).unwrap()).sum();
                    let indices = indices(&queues);
                    drop(queues);
                    let _ = report.send((on_engine, thread, indices, returned));
                }));
            }
            Verdict::Refuse
        }

        fn used(&mut self, _out: &[u8], _written: &[u8]) {}
    }

    #[test]
    fn a_stop_from_the_engine_thread_runs_the_teardown_there() {
        let (mut rig, rx, tx) = net();
        let e = engine(&rig, vec![rx, tx]);
        let shared = Arc::new(Mutex::new(None));
        let (report, reports) = mpsc::channel();
        hook(&e, 1, Box::new(StopsEngine { engine: shared.clone(), report }));
        *shared.lock().unwrap() = Some(e);
        post_buffers(&mut rig, 2);
        let sent = rig.add(1, &[&frame(100, 1)], &[]);
        rig.publish(1);
        let (on_engine, thread, queues, returned) = reports.recv_timeout(PATIENCE).expect("the teardown ran");
        assert!(on_engine);
        assert_eq!(thread.as_deref(), Some("svq-engine"));
        assert_eq!((queues, returned), (vec![0, 1], 2), "every queue, and the receive buffers in flight");
        assert!(rig.used(0).iter().all(|d| d.len == 0));
        assert_eq!(rig.used(1).iter().map(|d| (d.head, d.len)).collect::<Vec<_>>(), [(sent, 0)], "refused by the hook");
        assert!(shared.lock().unwrap().is_none());
    }

    /// Panics when shown an element (or, with `in_used`, its completion).
    struct Panics {
        in_used: bool,
    }

    impl QueueHook for Panics {
        fn avail(&mut self, _out: &[u8], _in_len: u32) -> Verdict {
            assert!(self.in_used, "a hook that panics");
            Verdict::Forward
        }

        fn used(&mut self, _out: &[u8], _written: &[u8]) {
            panic!("a hook that panics")
        }
    }

    #[test]
    fn a_panicking_hook_breaks_every_queue_and_the_engine_hands_them_back() {
        for in_used in [false, true] {
            let (mut rig, rx, tx) = net();
            let e = engine(&rig, vec![rx, tx]);
            hook(&e, 1, Box::new(Panics { in_used }));
            post_buffers(&mut rig, 2);
            let sent = rig.add(1, &[&frame(100, 1)], &[]);
            rig.publish(1);
            for q in [1, 0] {
                let f = rig.wait_fault(q);
                assert_eq!((f.queue, f.rule(), f.kind()), (q, "internal_error", FaultKind::Internal));
                assert!(matches!(&f.fault, Fault::Internal(why) if why.contains("a hook that panics")), "{f:?}");
            }
            // The process lives on, and so do the queues: closing them returns every chain.
            let mut queues = e.stop();
            assert_eq!(indices(&queues), [0, 1]);
            for q in &mut queues {
                assert!(q.is_broken());
                q.stop(StopReason::Closed, false).unwrap();
            }
            assert_eq!(rig.used(0).len(), 2, "in_used {in_used}: both receive buffers");
            let back: Vec<(u16, u32)> = rig.used(1).iter().map(|d| (d.head, d.len)).collect();
            assert_eq!(back, [(sent, 0)], "in_used {in_used}: the chain the hook was looking at");
        }
    }

    #[test]
    fn a_device_needing_reset_breaks_every_watched_queue() {
        let (mut rig, rx, tx) = net();
        let e = engine(&rig, vec![rx, tx]);
        rig.sim.misbehave(1, Some(Misbehaviour::NeedsReset)).unwrap();
        post_buffers(&mut rig, 1);
        post_frames(&mut rig, 0, 1);
        for q in [0, 1] {
            let f = rig.wait_fault(q);
            assert_eq!((f.rule(), f.kind()), ("device_needs_reset", FaultKind::DeviceNeedsReset));
        }
        let queues = e.stop();
        assert!(queues.len() == 2 && queues.iter().all(|q| q.is_broken()));
    }
}
