//! The pyo3 bindings (`svq._native`), and nothing else: each method converts arguments,
//! releases the interpreter around device work and waits, and maps errors in one place
//! ([`errors`]).

use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::live;

mod aio;
mod args;
mod capture;
mod device;
mod driver;
mod errors;
mod serve;
mod session;
mod state;

/// Locks, taking the state even if a panic elsewhere poisoned the mutex.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Live resources svq holds: {"eventfds": n, "threads": n, "bounce_buffers": n,
/// "quarantined_bytes": n} (memory kept because a device may still reach it).
#[pyfunction]
fn live_resources<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("eventfds", live::eventfds())?;
    d.set_item("threads", live::threads())?;
    d.set_item("bounce_buffers", crate::bounce::live_buffers())?;
    d.set_item("quarantined_bytes", live::quarantined_bytes())?;
    Ok(d)
}

/// Fault injection: the `n`-th eventfd svq creates from now fails with EMFILE (0
/// disarms).
#[pyfunction]
fn fail_eventfd_at(n: args::U64) {
    crate::eventfd::fail_creation_at(n.0);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<device::Device>()?;
    m.add_class::<session::Session>()?;
    m.add_class::<driver::Driver>()?;
    m.add_class::<state::SavedState>()?;
    m.add_class::<serve::VhostUserServer>()?;
    m.add_class::<aio::Notifier>()?;
    m.add_class::<aio::InjectBatch>()?;
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(live_resources, m)?)?;
    m.add_function(wrap_pyfunction!(fail_eventfd_at, m)?)?;
    #[cfg(feature = "bench")]
    crate::bench::register(m)?;
    errors::register(m)?;
    Ok(())
}
