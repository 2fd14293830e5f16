//! The one place where Rust errors become Python exceptions: svq's own hierarchy under
//! `SvqError`, OS failures as `OSError` with their errno (Python picks the subclass),
//! bad arguments as `ValueError`, timeouts as `TimeoutError`.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

use crate::device::DeviceError;
use crate::driver::DriverError;
use crate::session::SessionError;
use crate::shadow::FaultKind;

create_exception!(svq, SvqError, PyException, "Base class of svq's own errors.");
create_exception!(svq, NegotiationError, SvqError, "The device lacks or refused what svq needs.");
create_exception!(svq, SessionClosedError, SvqError, "The session was closed.");
create_exception!(svq, GuestMemoryError, SvqError, "Guest memory is exhausted or an access is outside it.");
create_exception!(svq, QueueBrokenError, SvqError, "A queue stopped because a peer broke the virtio protocol.");
create_exception!(svq, GuestProtocolError, QueueBrokenError, "The guest wrote an invalid chain or index.");
create_exception!(svq, DeviceProtocolError, QueueBrokenError, "The device wrote an invalid used entry.");
create_exception!(svq, DeviceNeedsResetError, QueueBrokenError, "The device entered NEEDS_RESET.");
create_exception!(svq, ElementTooLargeError, QueueBrokenError, "An element can never fit the shadow ring.");
create_exception!(svq, InjectError, SvqError, "An injected element failed (the queue broke or stopped, or a map failed).");
create_exception!(svq, RestoreError, SvqError, "A command restoring a saved state was refused or failed.");

/// The one place where Rust errors become Python exceptions.
pub(super) fn to_py(e: SessionError) -> PyErr {
    match e {
        SessionError::Device(d) => device_err(d),
        SessionError::Driver(d) => driver_err(d),
        SessionError::Dma(crate::dma::DmaError::Device(d)) => device_err(d),
        SessionError::Dma(e) => GuestMemoryError::new_err(e.to_string()),
        SessionError::Bounce(crate::bounce::BounceError::Dma(crate::dma::DmaError::Device(d))) => device_err(d),
        SessionError::Bounce(crate::bounce::BounceError::Mem(m)) => mem_err(m),
        SessionError::Bounce(e) => GuestMemoryError::new_err(e.to_string()),
        SessionError::Invalid(m) => PyValueError::new_err(m),
        e @ SessionError::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        e @ SessionError::Injected { .. } => InjectError::new_err(e.to_string()),
        e @ SessionError::Restore { .. } => RestoreError::new_err(e.to_string()),
        SessionError::Mem(e) => mem_err(e),
        SessionError::Negotiation(m) => NegotiationError::new_err(m),
        SessionError::Os { op, errno } => PyOSError::new_err((errno as i32, format!("{op}: {}", errno.desc()))),
        SessionError::Closed => SessionClosedError::new_err("session is closed"),
    }
}

pub(super) fn device_err(e: DeviceError) -> PyErr {
    match &e {
        // OSError(errno, msg) becomes the matching subclass (FileExistsError, ...).
        DeviceError::Os { errno, .. } => PyOSError::new_err((*errno as i32, e.to_string())),
        DeviceError::Unsupported(_) => NegotiationError::new_err(e.to_string()),
        DeviceError::NotVhostVdpa { .. } => PyValueError::new_err(e.to_string()),
    }
}

pub(super) fn mem_err(e: crate::mem::MemError) -> PyErr {
    match e {
        crate::mem::MemError::Layout(m) => PyValueError::new_err(m),
        crate::mem::MemError::Os { op, errno } => PyOSError::new_err((errno as i32, format!("{op}: {}", errno.desc()))),
        e @ crate::mem::MemError::OutOfBounds { .. } => GuestMemoryError::new_err(e.to_string()),
    }
}

pub(super) fn driver_err(e: DriverError) -> PyErr {
    match e {
        DriverError::Broken(f) => match f.kind {
            FaultKind::Guest => GuestProtocolError::new_err(f.message),
            FaultKind::DeviceProtocol => DeviceProtocolError::new_err(f.message),
            FaultKind::DeviceNeedsReset => DeviceNeedsResetError::new_err(f.message),
            FaultKind::TooLarge => ElementTooLargeError::new_err(f.message),
            FaultKind::Internal => QueueBrokenError::new_err(f.message),
        },
        e @ DriverError::Used { .. } => DeviceProtocolError::new_err(e.to_string()),
        e @ DriverError::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        e @ (DriverError::NoQueue(_) | DriverError::TooLong(_)) => PyValueError::new_err(e.to_string()),
        e @ (DriverError::NoMemory(_) | DriverError::RingFull(_)) => GuestMemoryError::new_err(e.to_string()),
        DriverError::Mem(m) => mem_err(m),
    }
}

/// Registers the exception types on the module.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SvqError", py.get_type::<SvqError>())?;
    m.add("NegotiationError", py.get_type::<NegotiationError>())?;
    m.add("SessionClosedError", py.get_type::<SessionClosedError>())?;
    m.add("GuestMemoryError", py.get_type::<GuestMemoryError>())?;
    m.add("QueueBrokenError", py.get_type::<QueueBrokenError>())?;
    m.add("GuestProtocolError", py.get_type::<GuestProtocolError>())?;
    m.add("DeviceProtocolError", py.get_type::<DeviceProtocolError>())?;
    m.add("DeviceNeedsResetError", py.get_type::<DeviceNeedsResetError>())?;
    m.add("ElementTooLargeError", py.get_type::<ElementTooLargeError>())?;
    m.add("InjectError", py.get_type::<InjectError>())?;
    m.add("RestoreError", py.get_type::<RestoreError>())?;
    Ok(())
}
