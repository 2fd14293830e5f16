//! Feature negotiation: what svq can drive with the device, per device class.

use super::{Mode, Session, SessionConfig, SessionError};
use crate::virtio::{blk_feature, device_id, feature, net_feature, status};

/// virtio-net features svq can drive (virtio spec 5.1.3).
const NET_FEATURES: u64 = (1 << net_feature::CTRL_GUEST_OFFLOADS)
    | (1 << net_feature::MTU)
    | (1 << net_feature::MAC)
    | (1 << net_feature::STATUS)
    | (1 << net_feature::CTRL_VQ)
    | (1 << net_feature::CTRL_RX)
    | (1 << net_feature::CTRL_VLAN)
    | (1 << net_feature::CTRL_RX_EXTRA)
    | (1 << net_feature::GUEST_ANNOUNCE)
    | (1 << net_feature::MQ)
    | (1 << net_feature::CTRL_MAC_ADDR)
    | (1 << net_feature::ANY_LAYOUT);

/// virtio-blk features svq can drive (virtio spec 5.2.3).
const BLK_FEATURES: u64 =
    (1 << blk_feature::SIZE_MAX) | (1 << blk_feature::SEG_MAX) | (1 << blk_feature::BLK_SIZE) | (1 << blk_feature::FLUSH);

/// The class features svq can drive for device `id`.
pub(crate) fn class_features(id: u32) -> Result<u64, SessionError> {
    match id {
        device_id::NET => Ok(NET_FEATURES),
        device_id::BLOCK => Ok(BLK_FEATURES),
        id => Err(SessionError::Negotiation(format!("device id {id} is not virtio-net or virtio-blk"))),
    }
}

impl Session {
    /// Sets backend and virtio features and FEATURES_OK; returns the device id.
    pub(super) fn negotiate(&mut self, cfg: &SessionConfig, offered_backend: u64, want_backend: u64) -> Result<u32, SessionError> {
        let dev = self.device.clone();
        let offered = dev.features()?;
        let required = (1u64 << feature::VERSION_1) | (1 << feature::ACCESS_PLATFORM);
        if offered & required != required {
            return Err(SessionError::Negotiation(format!("device features {offered:#x} lack VERSION_1 or ACCESS_PLATFORM")));
        }
        let id = dev.device_id()?;
        let mut wanted = required | class_features(id)?;
        if cfg.event_idx {
            wanted |= 1 << feature::RING_EVENT_IDX;
        }
        let any_passthrough = cfg.mode == Mode::Passthrough || cfg.queue_modes.iter().any(|(_, m)| *m == Mode::Passthrough);
        if any_passthrough && cfg.indirect {
            wanted |= 1 << feature::RING_INDIRECT_DESC;
        }
        self.features = offered & wanted;
        self.backend_features = offered_backend & want_backend;
        dev.set_backend_features(self.backend_features)?;
        dev.set_features(self.features)?;
        dev.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK)?;
        if dev.status()? & status::FEATURES_OK == 0 {
            return Err(SessionError::Negotiation(format!("device refused features {:#x}", self.features)));
        }
        Ok(id)
    }
}
