//! Restoring a saved virtio-net control-plane state on a freshly started device: the
//! commands that differ from the reset defaults, all in flight at once, every ack checked.

use std::time::Duration;

use super::{Session, SessionError};
use crate::net::{NetState, ACK_OK};
use crate::shadow::InjectSlot;
use crate::virtio::net_feature;

impl Session {
    /// Sends the commands that bring the device to `saved`, all in flight at once, and
    /// checks every acknowledgement within one deadline.
    pub(super) fn restore(&mut self, saved: &NetState, timeout: Duration) -> Result<(), SessionError> {
        let cvq = self.cvq.as_ref().map(|c| c.queue).ok_or_else(|| SessionError::Invalid("no control queue".into()))?;
        let mut mac = [0u8; 6];
        if crate::virtio::has(self.features, net_feature::MAC) {
            self.device.config(0, &mut mac)?;
        }
        let cmds = saved.restore_commands(mac);
        // A MAC the device already holds (it survives a reset) is not sent, yet it is the
        // state: tracked as if acknowledged.
        if let (Some(m), Some(state)) = (saved.mac.filter(|m| *m == mac), &self.net_state) {
            state.lock().unwrap_or_else(|p| p.into_inner()).mac = Some(m);
        }
        let slots = self.inject_many(cvq, cmds.iter().map(|c| (c.encode(), 1)).collect())?;
        let outcomes = InjectSlot::wait_all_until(&slots, std::time::Instant::now() + timeout);
        for (index, (cmd, outcome)) in cmds.iter().zip(outcomes).enumerate() {
            let fail = |reason: String| SessionError::Restore { index, name: cmd.name(), reason };
            match outcome {
                None => return Err(fail(format!("got no acknowledgement within {timeout:?}"))),
                Some(Err(e)) => return Err(fail(e.to_string())),
                Some(Ok((len, ack))) if len == 1 && ack.first() == Some(&ACK_OK) => {}
                Some(Ok((len, ack))) => return Err(fail(format!("was refused (ack {ack:?}, length {len})"))),
            }
        }
        Ok(())
    }
}
