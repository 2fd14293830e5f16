//! What an asyncio event loop watches: eventfds svq signals (a queue's call, an injected
//! batch's completions), registered with `loop.add_reader` by the Python layer, so a
//! waiter needs neither a thread nor a polling loop.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::{inject_err, to_py};
use super::lock;
use crate::eventfd::EventFd;
use crate::session::SessionError;
use crate::shadow::InjectBatch as RustInjectBatch;

fn closed() -> PyErr {
    PyValueError::new_err("the notifier is closed")
}

/// An eventfd to watch for readability. It stays open while this object holds it (until
/// `close()`), so a signal from a session that closes meanwhile is still seen.
#[pyclass(frozen, module = "svq._native")]
pub(super) struct Notifier {
    fd: Mutex<Option<Arc<EventFd>>>,
}

impl Notifier {
    pub(super) fn new(fd: Arc<EventFd>) -> Self {
        Notifier { fd: Mutex::new(Some(fd)) }
    }
}

#[pymethods]
impl Notifier {
    /// The descriptor to watch.
    fn fileno(&self) -> PyResult<i32> {
        lock(&self.fd).as_ref().map(|f| f.as_raw_fd()).ok_or_else(closed)
    }

    /// Consumes pending signals without blocking; returns how many there were.
    fn drain(&self) -> u64 {
        lock(&self.fd).as_ref().map_or(0, |f| f.drain())
    }

    /// Lets the eventfd go (unregister it from the loop first); idempotent.
    fn close(&self) {
        let fd = lock(&self.fd).take();
        drop(fd);
    }
}

/// One injected element's outcome: (used length, bytes the device wrote).
type Injected<'py> = (u32, Bound<'py, PyBytes>);

/// Injected elements in flight together, completed through one eventfd.
#[pyclass(frozen, module = "svq._native")]
pub(super) struct InjectBatch {
    queue: u32,
    batch: Mutex<Option<RustInjectBatch>>,
}

impl InjectBatch {
    pub(super) fn new(queue: u32, batch: RustInjectBatch) -> Self {
        InjectBatch { queue, batch: Mutex::new(Some(batch)) }
    }
}

#[pymethods]
impl InjectBatch {
    /// The eventfd signalled as elements complete.
    fn fileno(&self) -> PyResult<i32> {
        lock(&self.batch).as_ref().map(|b| b.notifier().as_raw_fd()).ok_or_else(closed)
    }

    /// Consumes pending signals without blocking; returns how many there were.
    fn drain(&self) -> u64 {
        lock(&self.batch).as_ref().map_or(0, |b| b.notifier().drain())
    }

    /// Once every element ended: a list of (length, bytes), or the first failure raised.
    /// Before that None, or, when `expired_s` (the timeout that passed) is given,
    /// `TimeoutError` naming how many are still pending. Elements that did not end stay
    /// in flight and are accounted on the queue as usual.
    #[pyo3(signature = (expired_s = None))]
    fn poll<'py>(&self, py: Python<'py>, expired_s: Option<f64>) -> PyResult<Option<Vec<Injected<'py>>>> {
        let expired = expired_s.map(super::args::timeout).transpose()?;
        let mut g = lock(&self.batch);
        let b = g.as_mut().ok_or_else(closed)?;
        if !b.poll() {
            return match expired {
                Some(t) => Err(to_py(SessionError::Timeout { queue: self.queue, pending: b.pending(), timeout: t })),
                None => Ok(None),
            };
        }
        let mut out = Vec::with_capacity(b.results().len());
        for r in b.results().iter().flatten() {
            let (len, data) = r.clone().map_err(inject_err)?;
            out.push((len, PyBytes::new(py, &data)));
        }
        Ok(Some(out))
    }

    /// Closes the eventfd; elements still in flight complete on the queue as usual.
    fn close(&self) {
        let b = lock(&self.batch).take();
        drop(b);
    }
}
