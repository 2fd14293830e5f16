//! Feature negotiation: what svq can drive with the device, per device class, and for a
//! guest svq does not own, what that guest negotiated.

use super::{Mode, Session, SessionConfig, SessionError};
use crate::virtio::{blk_feature, device_id, feature, net_feature, status};

/// virtio-net features svq can drive (virtio spec 5.1.3): the control-plane features svq
/// understands, and data-path features it passes through untouched (it never looks
/// inside a packet).
const NET_FEATURES: u64 = (1 << net_feature::CSUM)
    | (1 << net_feature::GUEST_CSUM)
    | (1 << net_feature::CTRL_GUEST_OFFLOADS)
    | (1 << net_feature::MTU)
    | (1 << net_feature::MAC)
    | (0x7f << 7) // GUEST_TSO4 .. HOST_UFO
    | (1 << net_feature::MRG_RXBUF)
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

/// The ring features: how a ring is laid out and notified.
const RING_FEATURES: u64 = (1 << feature::RING_EVENT_IDX) | (1 << feature::RING_INDIRECT_DESC);

/// The class features svq can drive for device `id`.
pub(crate) fn class_features(id: u32) -> Result<u64, SessionError> {
    match id {
        device_id::NET => Ok(NET_FEATURES),
        device_id::BLOCK => Ok(BLK_FEATURES),
        id => Err(SessionError::Negotiation(format!("device id {id} is not virtio-net or virtio-blk"))),
    }
}

/// The virtio features a guest in front of svq may negotiate with `device_features`
/// behind it: the device's class features svq can drive, VERSION_1, and the ring
/// features (svq serves the guest's rings itself, whatever the device's are). The
/// device's ACCESS_PLATFORM is svq's business, not the guest's.
pub fn guest_offer(device_id: u32, device_features: u64) -> Result<u64, SessionError> {
    Ok((device_features & class_features(device_id)?) | (1 << feature::VERSION_1) | RING_FEATURES)
}

impl Session {
    /// Sets backend and virtio features and FEATURES_OK; returns the device id. `guest`
    /// is what a guest svq does not own negotiated (None for the in-process guest).
    pub(super) fn negotiate(
        &mut self,
        cfg: &SessionConfig,
        offered_backend: u64,
        want_backend: u64,
        guest: Option<u64>,
    ) -> Result<u32, SessionError> {
        let dev = self.device.clone();
        let offered = dev.features()?;
        let required = (1u64 << feature::VERSION_1) | (1 << feature::ACCESS_PLATFORM);
        if offered & required != required {
            return Err(SessionError::Negotiation(format!("device features {offered:#x} lack VERSION_1 or ACCESS_PLATFORM")));
        }
        let id = dev.device_id()?;
        // A saved state of another device class is named as such, before its features are.
        if let Some(state) = &cfg.resume {
            state.check_class(id)?;
        }
        let class = class_features(id)?;
        let any_passthrough = cfg.mode == Mode::Passthrough || cfg.queue_modes.iter().any(|(_, m)| *m == Mode::Passthrough);
        let wanted = match guest {
            None => {
                let mut w = required | class;
                if cfg.event_idx {
                    w |= 1 << feature::RING_EVENT_IDX;
                }
                if any_passthrough && cfg.indirect {
                    w |= 1 << feature::RING_INDIRECT_DESC;
                }
                w
            }
            Some(gf) => {
                let allowed = guest_offer(id, offered)? | (1 << feature::ACCESS_PLATFORM);
                let refused = gf & !allowed;
                if refused != 0 {
                    return Err(SessionError::Negotiation(format!(
                        "the guest negotiated features {refused:#x} that the device or svq cannot honour"
                    )));
                }
                let mut w = required | (gf & class);
                if any_passthrough {
                    // The device reads the guest's rings: their format is the guest's.
                    let ring = gf & RING_FEATURES;
                    if offered & ring != ring {
                        return Err(SessionError::Negotiation(format!(
                            "passthrough needs the device to offer the ring features the guest negotiated ({ring:#x})"
                        )));
                    }
                    w |= ring;
                } else if cfg.event_idx {
                    w |= 1 << feature::RING_EVENT_IDX;
                }
                w
            }
        };
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
