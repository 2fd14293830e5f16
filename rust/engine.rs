//! The event loop: one worker thread per session waits on the guests' kick eventfds, the
//! device's call eventfds and the device's config interrupt, and runs the shadow queues.
//! Python is never on this path.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::device::{status, Device};
use crate::eventfd::EventFd;
use crate::live::ThreadToken;
use crate::shadow::{FaultKind, QueueHealth, ShadowQueue};

const STOP: u64 = u64::MAX;
const CONFIG: u64 = u64::MAX - 1;

/// A running engine. [`Engine::stop`] returns the shadow queues.
#[derive(Debug)]
pub struct Engine {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Vec<ShadowQueue>>>,
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
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))?;
        epoll.add(config_call.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, CONFIG))?;
        for (i, q) in queues.iter().enumerate() {
            epoll.add(q.fds.guest_kick.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, (i as u64) << 1))?;
            epoll.add(q.fds.device_call.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, ((i as u64) << 1) | 1))?;
        }
        let stop_rx = stop.clone();
        let token = ThreadToken::new();
        let thread = std::thread::Builder::new()
            .name("svq-engine".into())
            .spawn(move || {
                let _token = token;
                run(epoll, queues, device, config_call, all_health, stop_rx)
            })
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)))?;
        Ok(Engine { stop, thread: Some(thread) })
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

fn run(
    epoll: Epoll,
    mut queues: Vec<ShadowQueue>,
    device: Arc<dyn Device>,
    config_call: EventFd,
    all_health: Vec<(Arc<QueueHealth>, Arc<EventFd>)>,
    stop: Arc<EventFd>,
) -> Vec<ShadowQueue> {
    let mut events = [EpollEvent::empty(); 16];
    // Guest kicks that arrived before the engine started are not lost: look once.
    queues.iter_mut().for_each(|q| q.forward());
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(_) => return queues,
        };
        for ev in &events[..n] {
            match ev.data() {
                STOP => {
                    stop.drain();
                    return queues;
                }
                CONFIG => {
                    config_call.drain();
                    if device.status().is_ok_and(|s| s & status::NEEDS_RESET != 0) {
                        for (h, wake) in &all_health {
                            h.set(FaultKind::DeviceNeedsReset, "device entered NEEDS_RESET".into());
                            wake.signal();
                        }
                    }
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
        }
    }
}
