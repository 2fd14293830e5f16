//! `ctrl_command`: arbitrary bytes as a virtio-net control command from a hostile guest.
//! Decoding never panics; a command it accepts encodes back to exactly the same bytes (so
//! nothing the guest sent is lost or invented on the way to the device or into the
//! tracked state); applying it to a state and restoring that state on a fresh device
//! reproduces the state.

use svq::net::{Command, NetState};

/// One input: the whole buffer is the command's readable bytes.
pub fn run(data: &[u8]) {
    let Ok(cmd) = Command::decode(data) else { return };
    assert_eq!(cmd.encode(), data, "{} does not round-trip", cmd.name());
    let mut state = NetState::default();
    state.apply(&cmd);
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut restored = NetState::default();
    for c in state.restore_commands(mac) {
        let again = Command::decode(&c.encode()).expect("restore commands decode");
        restored.apply(&again);
    }
    // A MAC equal to the device's own is not sent, so compare it as the device sees it.
    let eff = |s: &NetState| s.mac.unwrap_or(mac);
    assert_eq!(eff(&restored), eff(&state));
    restored.mac = state.mac;
    assert_eq!(restored, state, "restoring {} differs", cmd.name());
}
