//! virtio-net control queue (virtio spec 5.1.6.5): commands encoded and decoded with
//! their lengths validated, the device state tracked from acknowledged commands, and the
//! minimal command sequence that restores a saved state on a freshly started device.

/// `VIRTIO_NET_OK`.
pub const ACK_OK: u8 = 0;
/// `VIRTIO_NET_ERR`.
pub const ACK_ERR: u8 = 1;

/// Command classes.
pub mod class {
    /// RX modes.
    pub const RX: u8 = 0;
    /// MAC table and address.
    pub const MAC: u8 = 1;
    /// VLAN filter.
    pub const VLAN: u8 = 2;
    /// Gratuitous packet announcement.
    pub const ANNOUNCE: u8 = 3;
    /// Multiqueue.
    pub const MQ: u8 = 4;
    /// Guest offloads.
    pub const GUEST_OFFLOADS: u8 = 5;
}

/// Entries of one MAC filter table the device must take (`MAC_TABLE_ENTRIES` in common
/// implementations); longer tables are refused as malformed.
pub const MAX_MAC_TABLE: usize = 64;
/// Largest VLAN id.
pub const MAX_VLAN: u16 = 4095;

/// The six RX mode switches (class RX, commands 0..=5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RxMode {
    /// Receive everything.
    Promisc = 0,
    /// Receive all multicast.
    AllMulti = 1,
    /// Receive all unicast.
    AllUni = 2,
    /// Receive no multicast.
    NoMulti = 3,
    /// Receive no unicast.
    NoUni = 4,
    /// Receive no broadcast.
    NoBcast = 5,
}

impl RxMode {
    /// All modes, in command order.
    pub const ALL: [RxMode; 6] = [RxMode::Promisc, RxMode::AllMulti, RxMode::AllUni, RxMode::NoMulti, RxMode::NoUni, RxMode::NoBcast];

    fn from_cmd(cmd: u8) -> Option<Self> {
        Self::ALL.get(cmd as usize).copied()
    }
}

/// A decoded control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Switch one RX mode on or off.
    Rx(RxMode, bool),
    /// Replace the unicast and multicast filter tables.
    MacTable {
        /// Unicast addresses.
        unicast: Vec<[u8; 6]>,
        /// Multicast addresses.
        multicast: Vec<[u8; 6]>,
    },
    /// Set the primary MAC address.
    MacAddr([u8; 6]),
    /// Add a VLAN id to the filter.
    VlanAdd(u16),
    /// Remove a VLAN id from the filter.
    VlanDel(u16),
    /// Acknowledge a gratuitous-announcement request.
    AnnounceAck,
    /// Number of queue pairs in use.
    MqPairs(u16),
    /// RSS configuration, kept as its validated wire bytes.
    RssConfig(Vec<u8>),
    /// Hash-report configuration, kept as its validated wire bytes.
    HashConfig(Vec<u8>),
    /// Guest offloads bitmap.
    GuestOffloads(u64),
}

/// Why a command was refused before it reached the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Fewer than two header bytes.
    #[error("control command of {0} bytes has no class/command header")]
    NoHeader(usize),
    /// Unknown class or command.
    #[error("unknown control command class {class} command {cmd}")]
    Unknown {
        /// Class byte.
        class: u8,
        /// Command byte.
        cmd: u8,
    },
    /// The data has the wrong length or an invalid value.
    #[error("malformed control command class {class} command {cmd}: {why}")]
    Malformed {
        /// Class byte.
        class: u8,
        /// Command byte.
        cmd: u8,
        /// What is wrong.
        why: String,
    },
}

fn mac_at(b: &[u8], at: usize) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

/// Validates an RSS or hash configuration (`struct virtio_net_rss_config`): hash_types
/// u32, indirection_table_mask u16, unclassified_queue u16, indirection_table
/// [mask+1] u16, max_tx_vq u16, hash_key_length u8, key. The hash config has no table
/// (mask 0, table of one entry is still present in the wire format of both).
fn check_rss(d: &[u8]) -> Result<(), String> {
    if d.len() < 8 {
        return Err(format!("{} bytes, less than the fixed header", d.len()));
    }
    let mask = u16::from_le_bytes([d[4], d[5]]) as usize;
    if (mask + 1) & mask != 0 {
        return Err(format!("indirection table mask {mask:#x} is not 2^n - 1"));
    }
    let table_end = 8 + 2 * (mask + 1);
    if d.len() < table_end + 3 {
        return Err(format!("{} bytes, too short for a table of {} entries", d.len(), mask + 1));
    }
    let key_len = d[table_end + 2] as usize;
    if d.len() != table_end + 3 + key_len {
        return Err(format!("{} bytes, but the header says {}", d.len(), table_end + 3 + key_len));
    }
    Ok(())
}

impl Command {
    /// Decodes the device-readable bytes of a control command (header + data).
    pub fn decode(bytes: &[u8]) -> Result<Command, CommandError> {
        let [class, cmd, data @ ..] = bytes else { return Err(CommandError::NoHeader(bytes.len())) };
        let (class, cmd) = (*class, *cmd);
        let bad = |why: String| CommandError::Malformed { class, cmd, why };
        let want = |n: usize| if data.len() == n { Ok(()) } else { Err(bad(format!("{} data bytes, expected {n}", data.len()))) };
        Ok(match (class, cmd) {
            (class::RX, c) if c <= 5 => {
                want(1)?;
                let on = match data[0] {
                    0 => false,
                    1 => true,
                    v => return Err(bad(format!("switch value {v}, expected 0 or 1"))),
                };
                Command::Rx(RxMode::from_cmd(c).ok_or_else(|| bad("mode".into()))?, on)
            }
            (class::MAC, 0) => {
                let table = |at: usize| -> Result<(Vec<[u8; 6]>, usize), CommandError> {
                    let n = data.get(at..at + 4).ok_or_else(|| bad("truncated table header".into()))?;
                    let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
                    if n > MAX_MAC_TABLE {
                        return Err(bad(format!("table of {n} entries, at most {MAX_MAC_TABLE}")));
                    }
                    let end = at + 4 + 6 * n;
                    if data.len() < end {
                        return Err(bad(format!("table of {n} entries truncated")));
                    }
                    Ok(((0..n).map(|i| mac_at(data, at + 4 + 6 * i)).collect(), end))
                };
                let (unicast, end) = table(0)?;
                let (multicast, end) = table(end)?;
                if end != data.len() {
                    return Err(bad(format!("{} bytes after the tables", data.len() - end)));
                }
                Command::MacTable { unicast, multicast }
            }
            (class::MAC, 1) => {
                want(6)?;
                Command::MacAddr(mac_at(data, 0))
            }
            (class::VLAN, c @ (0 | 1)) => {
                want(2)?;
                let vid = u16::from_le_bytes([data[0], data[1]]);
                if vid > MAX_VLAN {
                    return Err(bad(format!("VLAN id {vid} > {MAX_VLAN}")));
                }
                if c == 0 {
                    Command::VlanAdd(vid)
                } else {
                    Command::VlanDel(vid)
                }
            }
            (class::ANNOUNCE, 0) => {
                want(0)?;
                Command::AnnounceAck
            }
            (class::MQ, 0) => {
                want(2)?;
                let pairs = u16::from_le_bytes([data[0], data[1]]);
                if !(1..=0x8000).contains(&pairs) {
                    return Err(bad(format!("{pairs} queue pairs, expected 1..=32768")));
                }
                Command::MqPairs(pairs)
            }
            (class::MQ, c @ (1 | 2)) => {
                check_rss(data).map_err(bad)?;
                if c == 1 {
                    Command::RssConfig(data.to_vec())
                } else {
                    Command::HashConfig(data.to_vec())
                }
            }
            (class::GUEST_OFFLOADS, 0) => {
                want(8)?;
                Command::GuestOffloads(u64::from_le_bytes(data.try_into().map_err(|_| bad("length".into()))?))
            }
            _ => return Err(CommandError::Unknown { class, cmd }),
        })
    }

    /// The wire bytes (header + data).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        match self {
            Command::Rx(m, on) => v.extend([class::RX, *m as u8, *on as u8]),
            Command::MacTable { unicast, multicast } => {
                v.extend([class::MAC, 0]);
                for t in [unicast, multicast] {
                    v.extend((t.len() as u32).to_le_bytes());
                    t.iter().for_each(|m| v.extend(m));
                }
            }
            Command::MacAddr(m) => {
                v.extend([class::MAC, 1]);
                v.extend(m);
            }
            Command::VlanAdd(id) => {
                v.extend([class::VLAN, 0]);
                v.extend(id.to_le_bytes());
            }
            Command::VlanDel(id) => {
                v.extend([class::VLAN, 1]);
                v.extend(id.to_le_bytes());
            }
            Command::AnnounceAck => v.extend([class::ANNOUNCE, 0]),
            Command::MqPairs(n) => {
                v.extend([class::MQ, 0]);
                v.extend(n.to_le_bytes());
            }
            Command::RssConfig(d) => {
                v.extend([class::MQ, 1]);
                v.extend(d);
            }
            Command::HashConfig(d) => {
                v.extend([class::MQ, 2]);
                v.extend(d);
            }
            Command::GuestOffloads(o) => {
                v.extend([class::GUEST_OFFLOADS, 0]);
                v.extend(o.to_le_bytes());
            }
        }
        v
    }

    /// A short name for reports, e.g. "MAC_ADDR_SET".
    pub fn name(&self) -> &'static str {
        match self {
            Command::Rx(RxMode::Promisc, _) => "RX_PROMISC",
            Command::Rx(RxMode::AllMulti, _) => "RX_ALLMULTI",
            Command::Rx(RxMode::AllUni, _) => "RX_ALLUNI",
            Command::Rx(RxMode::NoMulti, _) => "RX_NOMULTI",
            Command::Rx(RxMode::NoUni, _) => "RX_NOUNI",
            Command::Rx(RxMode::NoBcast, _) => "RX_NOBCAST",
            Command::MacTable { .. } => "MAC_TABLE_SET",
            Command::MacAddr(_) => "MAC_ADDR_SET",
            Command::VlanAdd(_) => "VLAN_ADD",
            Command::VlanDel(_) => "VLAN_DEL",
            Command::AnnounceAck => "ANNOUNCE_ACK",
            Command::MqPairs(_) => "MQ_VQ_PAIRS_SET",
            Command::RssConfig(_) => "MQ_RSS_CONFIG",
            Command::HashConfig(_) => "MQ_HASH_CONFIG",
            Command::GuestOffloads(_) => "GUEST_OFFLOADS_SET",
        }
    }
}

/// The control-plane state of a virtio-net device, as far as the control queue sets it.
/// `Default` is the state a device starts in after reset (the one vdpa_sim_net and the
/// embedded device filter with): promiscuous off, all multicast accepted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// Primary MAC set through the control queue (None: the config-space MAC).
    pub mac: Option<[u8; 6]>,
    /// Unicast filter table.
    pub unicast: Vec<[u8; 6]>,
    /// Multicast filter table.
    pub multicast: Vec<[u8; 6]>,
    /// Queue pairs in use.
    pub mq_pairs: u16,
    /// RSS configuration wire bytes.
    pub rss: Option<Vec<u8>>,
    /// Hash-report configuration wire bytes.
    pub hash: Option<Vec<u8>>,
    /// Guest offloads (None: what was negotiated).
    pub offloads: Option<u64>,
    /// RX mode switches, in [`RxMode::ALL`] order.
    pub rx: [bool; 6],
    /// VLAN ids in the filter.
    pub vlans: VlanSet,
}

/// The VLAN filter: ids `0..=MAX_VLAN`, one bit each (a restore adds up to 4 096 of them,
/// one command each, applied by svq's tracker and by the device: a bit costs a store where
/// an ordered set costs a tree insert). Read and written as an ascending list of ids.
#[derive(Clone, PartialEq, Eq)]
pub struct VlanSet([u64; VlanSet::WORDS]);

impl VlanSet {
    const WORDS: usize = (MAX_VLAN as usize + 1) / 64;

    /// Adds `id`; whether it was not there. Ids above [`MAX_VLAN`] are not VLANs (the
    /// command decoder refuses them) and are never held.
    pub fn insert(&mut self, id: u16) -> bool {
        if id > MAX_VLAN {
            return false;
        }
        let (w, bit) = (usize::from(id / 64), 1u64 << (id % 64));
        let new = self.0[w] & bit == 0;
        self.0[w] |= bit;
        new
    }

    /// Removes `id`; whether it was there.
    pub fn remove(&mut self, id: u16) -> bool {
        let had = self.contains(id);
        if had {
            self.0[usize::from(id / 64)] &= !(1u64 << (id % 64));
        }
        had
    }

    /// Whether `id` is in the filter.
    pub fn contains(&self, id: u16) -> bool {
        id <= MAX_VLAN && self.0[usize::from(id / 64)] & (1u64 << (id % 64)) != 0
    }

    /// Ids in the filter.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the filter holds no id.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The ids, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| (0..64u16).filter(move |b| bits & (1 << b) != 0).map(move |b| w as u16 * 64 + b))
    }
}

impl Default for VlanSet {
    fn default() -> Self {
        VlanSet([0; VlanSet::WORDS])
    }
}

impl std::fmt::Debug for VlanSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<u16> for VlanSet {
    /// The set of the ids at most [`MAX_VLAN`] (others are not VLANs and are dropped).
    fn from_iter<I: IntoIterator<Item = u16>>(ids: I) -> Self {
        let mut s = VlanSet::default();
        ids.into_iter().for_each(|id| {
            s.insert(id);
        });
        s
    }
}

impl serde::Serialize for VlanSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for VlanSet {
    /// An ascending (or any) list of ids; an id above [`MAX_VLAN`] is an error.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ids = Vec::<u16>::deserialize(d)?;
        if let Some(id) = ids.iter().find(|&&id| id > MAX_VLAN) {
            return Err(serde::de::Error::custom(format!("VLAN id {id} > {MAX_VLAN}")));
        }
        Ok(ids.into_iter().collect())
    }
}

/// RX modes after reset: promiscuous off, all-multicast on, the rest off.
pub const RX_RESET: [bool; 6] = [false, true, false, false, false, false];

impl Default for NetState {
    fn default() -> Self {
        NetState {
            mac: None,
            unicast: Vec::new(),
            multicast: Vec::new(),
            mq_pairs: 1,
            rss: None,
            hash: None,
            offloads: None,
            rx: RX_RESET,
            vlans: VlanSet::default(),
        }
    }
}

impl NetState {
    /// Applies a command the device acknowledged with OK.
    pub fn apply(&mut self, cmd: &Command) {
        match cmd {
            Command::Rx(m, on) => self.rx[*m as usize] = *on,
            Command::MacTable { unicast, multicast } => {
                self.unicast = unicast.clone();
                self.multicast = multicast.clone();
            }
            Command::MacAddr(m) => self.mac = Some(*m),
            Command::VlanAdd(id) => {
                self.vlans.insert(*id);
            }
            Command::VlanDel(id) => {
                self.vlans.remove(*id);
            }
            Command::AnnounceAck => {}
            Command::MqPairs(n) => self.mq_pairs = *n,
            Command::RssConfig(d) => self.rss = Some(d.clone()),
            Command::HashConfig(d) => self.hash = Some(d.clone()),
            Command::GuestOffloads(o) => self.offloads = Some(*o),
        }
    }

    /// The commands that bring a device from reset (primary MAC `device_mac` in config
    /// space) to this state, in restore order: MAC, MAC table, MQ, RSS/hash, offloads, RX
    /// modes, VLANs; whatever equals the reset default is skipped.
    pub fn restore_commands(&self, device_mac: [u8; 6]) -> Vec<Command> {
        let mut v = Vec::new();
        if let Some(m) = self.mac.filter(|m| *m != device_mac) {
            v.push(Command::MacAddr(m));
        }
        if !self.unicast.is_empty() || !self.multicast.is_empty() {
            v.push(Command::MacTable { unicast: self.unicast.clone(), multicast: self.multicast.clone() });
        }
        if self.mq_pairs != 1 {
            v.push(Command::MqPairs(self.mq_pairs));
        }
        if let Some(r) = &self.rss {
            v.push(Command::RssConfig(r.clone()));
        }
        if let Some(h) = &self.hash {
            v.push(Command::HashConfig(h.clone()));
        }
        if let Some(o) = self.offloads {
            v.push(Command::GuestOffloads(o));
        }
        for (m, (&now, &reset)) in RxMode::ALL.iter().zip(self.rx.iter().zip(RX_RESET.iter())) {
            if now != reset {
                v.push(Command::Rx(*m, now));
            }
        }
        v.extend(self.vlans.iter().map(Command::VlanAdd));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vlan_filter_holds_each_id_once_in_order() {
        let mut v = VlanSet::default();
        assert!(v.is_empty());
        assert!(v.insert(4095) && v.insert(0) && v.insert(64) && v.insert(63));
        assert!(!v.insert(64), "already there");
        assert!(!v.insert(MAX_VLAN + 1) && !v.contains(MAX_VLAN + 1), "not a VLAN");
        assert_eq!(v.iter().collect::<Vec<_>>(), [0, 63, 64, 4095]);
        assert_eq!(v.len(), 4);
        assert!(v.remove(63) && !v.remove(63) && !v.contains(63));
        assert_eq!(format!("{v:?}"), "{0, 64, 4095}");
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, "[0,64,4095]");
        assert_eq!(serde_json::from_str::<VlanSet>("[4095,0,64]").unwrap(), v);
        assert!(serde_json::from_str::<VlanSet>("[4096]").is_err());
        let all: VlanSet = (0..=MAX_VLAN).collect();
        assert_eq!((all.len(), all.iter().last()), (4096, Some(MAX_VLAN)));
    }

    fn rss(mask: u16, key: usize) -> Vec<u8> {
        let mut d = vec![0u8; 4];
        d.extend(mask.to_le_bytes());
        d.extend([0, 0]);
        d.extend(std::iter::repeat_n(0u8, 2 * (mask as usize + 1)));
        d.extend([1, 0, key as u8]);
        d.extend(std::iter::repeat_n(7u8, key));
        d
    }

    #[test]
    fn every_command_round_trips() {
        let cmds = vec![
            Command::Rx(RxMode::Promisc, true),
            Command::Rx(RxMode::NoBcast, false),
            Command::MacTable { unicast: vec![[2, 0, 0, 0, 0, 1]], multicast: vec![[1, 0, 0x5e, 0, 0, 1], [1, 0, 0x5e, 0, 0, 2]] },
            Command::MacTable { unicast: vec![], multicast: vec![] },
            Command::MacAddr([2, 1, 2, 3, 4, 5]),
            Command::VlanAdd(4095),
            Command::VlanDel(1),
            Command::AnnounceAck,
            Command::MqPairs(4),
            Command::RssConfig(rss(7, 40)),
            Command::HashConfig(rss(0, 40)),
            Command::GuestOffloads(0x1234_5678_9abc),
        ];
        for c in cmds {
            assert_eq!(Command::decode(&c.encode()), Ok(c.clone()), "{}", c.name());
        }
    }

    #[test]
    fn malformed_commands_are_refused() {
        let m = |b: &[u8]| Command::decode(b).unwrap_err();
        assert_eq!(m(&[1]), CommandError::NoHeader(1));
        assert!(matches!(m(&[9, 0]), CommandError::Unknown { class: 9, .. }));
        assert!(matches!(m(&[0, 6, 1]), CommandError::Unknown { .. }));
        assert!(matches!(m(&[0, 0]), CommandError::Malformed { .. }));
        assert!(matches!(m(&[0, 0, 2]), CommandError::Malformed { .. }));
        assert!(matches!(m(&[1, 1, 1, 2, 3]), CommandError::Malformed { .. }));
        assert!(matches!(m(&[2, 0, 0x00, 0x10]), CommandError::Malformed { .. }), "VLAN 4096");
        assert!(matches!(m(&[3, 0, 0]), CommandError::Malformed { .. }));
        assert!(matches!(m(&[4, 0, 0, 0]), CommandError::Malformed { .. }), "0 pairs");
        assert!(matches!(m(&[5, 0, 1, 2, 3]), CommandError::Malformed { .. }));
        // A MAC table whose count runs past the data, and trailing bytes.
        assert!(matches!(m(&[1, 0, 2, 0, 0, 0, 1, 2, 3, 4, 5, 6]), CommandError::Malformed { .. }));
        let mut ok = Command::MacTable { unicast: vec![], multicast: vec![] }.encode();
        ok.push(0);
        assert!(matches!(m(&ok), CommandError::Malformed { .. }));
        let mut big = vec![1u8, 0];
        big.extend(1000u32.to_le_bytes());
        assert!(matches!(m(&big), CommandError::Malformed { .. }));
        // RSS: mask not 2^n-1, wrong key length.
        let mut bad = rss(5, 0);
        bad.splice(0..0, [4u8, 1]);
        assert!(matches!(m(&bad), CommandError::Malformed { .. }));
        let mut short = rss(3, 10);
        short.pop();
        short.splice(0..0, [4u8, 1]);
        assert!(matches!(m(&short), CommandError::Malformed { .. }));
    }

    #[test]
    fn restore_is_minimal_and_ordered() {
        let dev_mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert!(NetState::default().restore_commands(dev_mac).is_empty());
        let mut s = NetState::default();
        for c in [
            Command::VlanAdd(7),
            Command::Rx(RxMode::Promisc, true),
            Command::GuestOffloads(3),
            Command::MqPairs(2),
            Command::MacAddr([2, 0, 0, 0, 0, 9]),
            Command::MacTable { unicast: vec![[2, 0, 0, 0, 0, 8]], multicast: vec![] },
            Command::Rx(RxMode::AllMulti, true), // the reset default: skipped
            Command::VlanAdd(3),
        ] {
            s.apply(&c);
        }
        let names: Vec<_> = s.restore_commands(dev_mac).iter().map(Command::name).collect();
        assert_eq!(names, ["MAC_ADDR_SET", "MAC_TABLE_SET", "MQ_VQ_PAIRS_SET", "GUEST_OFFLOADS_SET", "RX_PROMISC", "VLAN_ADD", "VLAN_ADD"]);
        // A MAC equal to the device's own is not sent again.
        s.mac = Some(dev_mac);
        assert_eq!(s.restore_commands(dev_mac)[0].name(), "MAC_TABLE_SET");
    }
}
