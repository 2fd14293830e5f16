//! Packet capture on a session's shadowed virtio-net data queues: each captured queue is
//! one interface of a pcapng file (`rx0`, `tx0`, `rx1`, ... by queue pair), its frames without
//! the virtio-net header. A passthrough queue cannot be captured (svq is not on its
//! path), nor the control queue (it carries commands, not frames).
//!
//! A session either owns its capture ([`Session::start_capture`]: the file ends with the
//! capture or the session) or has one attached that outlives it
//! ([`Session::attach_capture`]: a vhost-user server's, across its sessions).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{Mode, Session, SessionError};
use crate::capture::{Capture, CaptureConfig, CaptureError, CaptureReport};
use crate::engine::Request;
use crate::shadow::InjectSlot;
use crate::virtio::{device_id, feature, has, net_feature};

/// The capture attached to a session's queues.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) capture: Arc<Capture>,
    /// Whether the session finishes it (it started it).
    pub(crate) owned: bool,
    pub(crate) queues: Vec<u32>,
}

/// The interface name of net data queue `q`, by queue pair as Linux names them: queue 0
/// is `rx0`, 1 is `tx0`, 2 is `rx1`, ...
pub fn interface_name(q: u32) -> String {
    let pair = q / 2;
    if q.is_multiple_of(2) {
        format!("rx{pair}")
    } else {
        format!("tx{pair}")
    }
}

/// What interface [`interface_name`]`(q)` carries.
pub fn interface_description(q: u32) -> String {
    if q.is_multiple_of(2) {
        format!("virtio-net queue {q}: frames the device wrote for the guest (receive)")
    } else {
        format!("virtio-net queue {q}: frames the guest sent (transmit)")
    }
}

/// Bytes of virtio-net header before each frame, with the guest's `features`.
pub fn net_header_len(features: u64) -> u32 {
    if has(features, feature::VERSION_1) || has(features, net_feature::MRG_RXBUF) {
        12
    } else {
        10
    }
}

impl From<CaptureError> for SessionError {
    fn from(e: CaptureError) -> Self {
        match e {
            CaptureError::Invalid(m) => SessionError::Invalid(m),
            io => SessionError::Capture(io),
        }
    }
}

/// Waits until every tap of an attach is in place.
pub fn wait_attached(slots: &[Arc<InjectSlot>], timeout: Duration) -> Result<(), SessionError> {
    Session::wait_all(0, slots, timeout)?.into_iter().try_for_each(|r| Ok(r.map(drop)?))
}

impl Session {
    /// The queues a capture covers: `queues`, or every shadowed data queue; each one
    /// checked.
    pub fn capture_queues(&self, queues: Option<&[u32]>) -> Result<Vec<u32>, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        if self.device.device_id()? != device_id::NET {
            return Err(SessionError::Invalid("packet capture needs a virtio-net device".into()));
        }
        let cvq = self.cvq.as_ref().map(|c| c.queue);
        let Some(queues) = queues else {
            let data: Vec<u32> = self.modes.iter().filter(|(q, m)| Some(*q) != cvq && *m != Mode::Passthrough).map(|(q, _)| *q).collect();
            if data.is_empty() {
                return Err(SessionError::Invalid(
                    "no data queue is shadowed: a passthrough queue cannot be captured (svq is not on its path); \
                     use mode translate or copy"
                        .into(),
                ));
            }
            return Ok(data);
        };
        let mut out = Vec::with_capacity(queues.len());
        for &q in queues {
            match self.mode(q) {
                None => return Err(SessionError::Invalid(format!("queue {q} is not served by this session"))),
                Some(_) if Some(q) == cvq => {
                    return Err(SessionError::Invalid(format!("queue {q} is the control queue: only data queues carry frames")))
                }
                Some(Mode::Passthrough) => {
                    return Err(SessionError::Invalid(format!(
                        "queue {q} is in passthrough mode: svq is not on its path, so it cannot capture it \
                         (shadow it: mode translate or copy)"
                    )))
                }
                Some(_) if out.contains(&q) => {}
                Some(_) => out.push(q),
            }
        }
        if out.is_empty() {
            return Err(SessionError::Invalid("no queue to capture".into()));
        }
        Ok(out)
    }

    /// Starts capturing `queues` (None: every shadowed data queue) into a new pcapng file
    /// at `path`, which the session finishes with [`Session::stop_capture`] or when it
    /// closes. Frames flow into the file once the returned slots complete (wait for them
    /// without holding anything the engine thread or a hook might need, e.g. with
    /// [`wait_attached`]).
    pub fn start_capture(&mut self, path: &Path, queues: Option<&[u32]>, cfg: CaptureConfig) -> Result<Vec<Arc<InjectSlot>>, SessionError> {
        if self.capture.is_some() {
            return Err(SessionError::Invalid("a capture is running on this session already: stop it first".into()));
        }
        let queues = self.capture_queues(queues)?;
        let interfaces: Vec<(String, String)> = queues.iter().map(|&q| (interface_name(q), interface_description(q))).collect();
        let capture = Arc::new(Capture::create(path, &interfaces, cfg)?);
        self.attach(capture, true, queues)
    }

    /// Attaches a capture that outlives the session (it is never finished here) to every
    /// shadowed data queue it has an interface for; the queues it covers, and the slots
    /// to wait on (see [`Session::start_capture`]).
    pub fn attach_capture(&mut self, capture: &Arc<Capture>) -> Result<(Vec<u32>, Vec<Arc<InjectSlot>>), SessionError> {
        if self.capture.is_some() {
            return Err(SessionError::Invalid("a capture is attached to this session already".into()));
        }
        let names = capture.interfaces();
        let queues: Vec<u32> = self.capture_queues(None)?.into_iter().filter(|&q| names.contains(&interface_name(q))).collect();
        if queues.is_empty() {
            return Err(SessionError::Invalid("the capture has no interface for any shadowed data queue".into()));
        }
        let slots = self.attach(capture.clone(), false, queues.clone())?;
        Ok((queues, slots))
    }

    fn attach(&mut self, capture: Arc<Capture>, owned: bool, queues: Vec<u32>) -> Result<Vec<Arc<InjectSlot>>, SessionError> {
        let engine = self.engine.as_ref().ok_or(SessionError::Closed)?;
        let strip = net_header_len(self.guest_features);
        let mut reqs = Vec::with_capacity(queues.len());
        let mut slots = Vec::with_capacity(queues.len());
        for &q in &queues {
            let tap = capture.tap(&interface_name(q), strip).ok_or_else(|| SessionError::Invalid("the capture is finished".into()))?;
            let done = Arc::new(InjectSlot::default());
            reqs.push(Request::Capture { queue: q, tap: Some(Box::new(tap)), done: done.clone() });
            slots.push(done);
        }
        engine.submit(reqs);
        self.capture = Some(Attached { capture, owned, queues });
        Ok(slots)
    }

    /// A new tap for queue `q`, which a live switch is putting back on a shadow ring, when
    /// the running capture covers it (it left the capture while svq was off its path).
    /// The tap goes in with the queue: a request sent after it would race the guest's
    /// first elements, which the engine may forward before it reads its requests.
    pub(super) fn tap_again(&self, q: u32) -> Option<Box<crate::capture::Tap>> {
        let a = self.capture.as_ref().filter(|a| a.queues.contains(&q))?;
        a.capture.tap(&interface_name(q), net_header_len(self.guest_features)).map(Box::new)
    }

    /// The capture attached to the session, if any.
    pub fn capture(&self) -> Option<&Arc<Capture>> {
        self.capture.as_ref().map(|a| &a.capture)
    }

    /// Stops capturing: the taps are detached, and a capture the session started is
    /// finished (the file complete). What the capture did.
    pub fn stop_capture(&mut self) -> Result<CaptureReport, SessionError> {
        let Some(a) = self.capture.take() else { return Err(SessionError::Invalid("no capture is running on this session".into())) };
        if let Some(engine) = self.engine.as_ref() {
            // Not waited for: a tap detached late records into a finished capture, which
            // ignores it.
            let reqs = a.queues.iter().map(|&q| Request::Capture { queue: q, tap: None, done: Arc::new(InjectSlot::default()) }).collect();
            engine.submit(reqs);
        }
        Ok(if a.owned { a.capture.finish() } else { a.capture.report() })
    }
}
