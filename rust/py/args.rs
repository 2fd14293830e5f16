//! Argument conversion: an integer out of range is a `ValueError` naming the range, as the
//! API documents (pyo3 alone would raise `OverflowError`), and blocking waits that still
//! answer Ctrl-C.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;

use super::errors::to_py;
use crate::session::Session;
use crate::shadow::{InjectResult, InjectSlot};

macro_rules! int_arg {
    ($(#[$doc:meta] $name:ident($t:ty);)*) => {$(
        #[$doc]
        #[derive(Debug, Clone, Copy)]
        pub(super) struct $name(pub $t);

        impl<'a, 'py> FromPyObject<'a, 'py> for $name {
            type Error = PyErr;

            fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
                match obj.extract::<$t>() {
                    Ok(v) => Ok($name(v)),
                    Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Err(PyValueError::new_err(format!(
                        "{} is out of range: expected an integer in {}..={}",
                        obj.repr().map(|r| r.to_string()).unwrap_or_default(),
                        <$t>::MIN,
                        <$t>::MAX
                    ))),
                    Err(e) => Err(e),
                }
            }
        }
    )*};
}

int_arg! {
    /// A `u16` argument.
    U16(u16);
    /// A `u32` argument (queue indices, sizes).
    U32(u32);
    /// A `u64` argument (addresses).
    U64(u64);
    /// A `usize` argument (counts).
    Usize(usize);
}

/// A timeout in seconds: finite and not negative.
pub(super) fn timeout(t: f64) -> PyResult<Duration> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(PyValueError::new_err(format!("timeout must be a finite number of seconds >= 0, got {t}")));
    }
    Ok(Duration::from_secs_f64(t.min(1e9)))
}

/// How long a blocking call sleeps between looks at pending signals (Ctrl-C).
pub(super) const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// Runs `step` with the interpreter released, in slices of at most [`SIGNAL_SLICE`], until
/// it returns `Some` or `deadline` passes (then `None`); pending signals are handled
/// between slices, so Ctrl-C interrupts the wait with `KeyboardInterrupt`.
pub(super) fn wait_interruptibly<T: Send>(
    py: Python<'_>,
    deadline: Instant,
    mut step: impl FnMut(Instant) -> Option<T> + Send,
) -> PyResult<Option<T>> {
    loop {
        let until = deadline.min(Instant::now() + SIGNAL_SLICE);
        if let Some(v) = py.detach(|| step(until)) {
            return Ok(Some(v));
        }
        py.check_signals()?;
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

/// Waits for every slot of elements on queue `q` with one deadline, `timeout` from now,
/// answering Ctrl-C (see [`InjectSlot::wait_all_with`]): every outcome, or the timeout
/// counting those without one.
pub(super) fn wait_all_interruptibly(py: Python<'_>, q: u32, slots: &[Arc<InjectSlot>], timeout: Duration) -> PyResult<Vec<InjectResult>> {
    let deadline = Instant::now() + timeout;
    let outcomes = InjectSlot::wait_all_with(slots, |s| wait_interruptibly(py, deadline, |until| s.wait_until(until)))?;
    Session::all_done(q, outcomes, timeout).map_err(to_py)
}
