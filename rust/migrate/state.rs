//! The device state handed from a stopped session to the next one: the features the
//! guest's driver negotiated, each guest ring's position and the requests a device that
//! completes out of order still had in flight, and the tracked virtio-net state.

use crate::net::{NetState, MAX_MAC_TABLE};

/// The format version [`DeviceState`] is written in; a state of another version is
/// refused.
pub const STATE_VERSION: u32 = 1;

/// Where one guest ring stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// Queue index.
    pub index: u32,
    /// Ring size.
    pub size: u16,
    /// The next avail index to pop.
    pub avail: u16,
    /// The used index published.
    pub used: u16,
    /// Chains popped and never completed (a device that completes out of order held
    /// them): the next session submits them again, so each completes exactly once.
    pub inflight: Vec<u16>,
}

/// A stopped session's device state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The virtio device id (1 net, 2 blk).
    pub device_id: u32,
    /// The virtio features the guest's driver negotiated (what its rings and buffers
    /// follow).
    pub features: u64,
    /// Every served queue.
    pub queues: Vec<QueueState>,
    /// The virtio-net control-plane state, when a shadowed control queue tracked it.
    pub net: Option<NetState>,
}

/// A state that cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Not a state svq wrote.
    #[error("not a device state: {0}")]
    Format(String),
    /// Written by another version.
    #[error("device state version {found} cannot be restored by this svq (version {STATE_VERSION})")]
    Version {
        /// Its version.
        found: u32,
    },
    /// It does not fit the device or the guest it is restored on.
    #[error("device state does not fit: {0}")]
    Mismatch(String),
}

impl DeviceState {
    /// The state as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of plain fields always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A state from JSON bytes, checked for its version.
    pub fn from_json(bytes: &[u8]) -> Result<Self, StateError> {
        #[derive(serde::Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(|e| StateError::Format(e.to_string()))?;
        if v.version != STATE_VERSION {
            return Err(StateError::Version { found: v.version });
        }
        serde_json::from_slice(bytes).map_err(|e| StateError::Format(e.to_string()))
    }

    /// Checks the state's version and device class.
    pub fn check_class(&self, device_id: u32) -> Result<(), StateError> {
        if self.version != STATE_VERSION {
            return Err(StateError::Version { found: self.version });
        }
        if self.device_id != device_id {
            return Err(StateError::Mismatch(format!("saved from device class {} onto class {device_id}", self.device_id)));
        }
        Ok(())
    }

    /// Checks the state against what it is restored on: the same device class, guest
    /// features the new side honours, and a ring per queue with sane positions.
    pub fn check(&self, device_id: u32, honoured: u64) -> Result<(), StateError> {
        self.check_class(device_id)?;
        let missing = self.features & !honoured;
        if missing != 0 {
            return Err(StateError::Mismatch(format!("the guest negotiated features {missing:#x} the new device cannot honour")));
        }
        for q in &self.queues {
            let outstanding = q.avail.wrapping_sub(q.used);
            if !q.size.is_power_of_two() || outstanding > q.size || usize::from(outstanding) != q.inflight.len() {
                return Err(StateError::Mismatch(format!(
                    "queue {}: avail {} used {} with {} in flight in a ring of {}",
                    q.index,
                    q.avail,
                    q.used,
                    q.inflight.len(),
                    q.size
                )));
            }
            if q.inflight.iter().any(|&h| h >= q.size) {
                return Err(StateError::Mismatch(format!("queue {}: a chain in flight is outside the ring", q.index)));
            }
            let mut heads = q.inflight.clone();
            heads.sort_unstable();
            if heads.windows(2).any(|w| w[0] == w[1]) {
                return Err(StateError::Mismatch(format!("queue {}: a chain is in flight twice", q.index)));
            }
        }
        let mut indices: Vec<u32> = self.queues.iter().map(|q| q.index).collect();
        indices.sort_unstable();
        if indices.windows(2).any(|w| w[0] == w[1]) {
            return Err(StateError::Mismatch("a queue is listed twice".into()));
        }
        if let Some(net) = &self.net {
            // (A VLAN id out of range is refused when the state is read.)
            if net.mq_pairs == 0 {
                return Err(StateError::Mismatch("virtio-net state out of range: 0 queue pairs".into()));
            }
            if net.unicast.len().max(net.multicast.len()) > MAX_MAC_TABLE {
                return Err(StateError::Mismatch(format!("virtio-net state: a MAC filter table longer than {MAX_MAC_TABLE}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> DeviceState {
        DeviceState {
            version: STATE_VERSION,
            device_id: 2,
            features: 1 << 32,
            queues: vec![QueueState { index: 0, size: 128, avail: 10, used: 7, inflight: vec![4, 9, 2] }],
            net: None,
        }
    }

    #[test]
    fn round_trips_and_refuses_what_does_not_fit() {
        let s = state();
        assert_eq!(DeviceState::from_json(&s.to_json()).unwrap(), s);
        assert!(s.check(2, 1 << 32).is_ok());
        assert!(matches!(s.check(1, 1 << 32), Err(StateError::Mismatch(_))), "another class");
        assert!(matches!(s.check(2, 0), Err(StateError::Mismatch(_))), "features the new side lacks");
        let mut v2 = s.clone();
        v2.version = 2;
        assert!(matches!(DeviceState::from_json(&v2.to_json()), Err(StateError::Version { found: 2 })));
        assert!(matches!(DeviceState::from_json(b"{}"), Err(StateError::Format(_))));
        let mut bad = s.clone();
        bad.queues[0].inflight.pop();
        assert!(matches!(bad.check(2, 1 << 32), Err(StateError::Mismatch(_))), "positions and in-flight disagree");
        let mut twice = s.clone();
        twice.queues[0].inflight[1] = 4;
        assert!(matches!(twice.check(2, 1 << 32), Err(StateError::Mismatch(_))), "a head in flight twice");
        let mut vlan = s.clone();
        vlan.net = Some(NetState { vlans: [7, 4095].into_iter().collect(), ..NetState::default() });
        let json = String::from_utf8(vlan.to_json()).unwrap();
        assert_eq!(DeviceState::from_json(json.as_bytes()).unwrap(), vlan);
        let out_of_range = json.replace("[7,4095]", "[7,4096]");
        assert_ne!(out_of_range, json);
        assert!(matches!(DeviceState::from_json(out_of_range.as_bytes()), Err(StateError::Format(_))), "a VLAN out of range");
        let mut no_pairs = s.clone();
        no_pairs.net = Some(NetState { mq_pairs: 0, ..NetState::default() });
        assert!(matches!(no_pairs.check(2, 1 << 32), Err(StateError::Mismatch(_))), "no queue pair");
    }
}
