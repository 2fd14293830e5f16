//! One session per device at a time: a second session would reset the device under the
//! first and unmap its mappings on close.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::SessionError;
use crate::device::Device;

static CLAIMED: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

/// Ownership of a device, released on drop.
#[derive(Debug)]
pub(super) struct DeviceClaim {
    identity: usize,
}

impl DeviceClaim {
    /// Claims `device`, or fails with [`SessionError::Busy`] while another session owns it.
    pub(super) fn take(device: &Arc<dyn Device>) -> Result<Self, SessionError> {
        let identity = device.identity();
        let mut claimed = CLAIMED.lock().unwrap_or_else(|p| p.into_inner());
        if !claimed.get_or_insert_with(HashSet::new).insert(identity) {
            return Err(SessionError::Busy);
        }
        Ok(DeviceClaim { identity })
    }
}

impl Drop for DeviceClaim {
    fn drop(&mut self) {
        if let Some(set) = CLAIMED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            set.remove(&self.identity);
        }
    }
}
