//! Session tests against the embedded device.

use super::*;
use crate::device::sim::SimDevice;
use crate::shadow::Verdict;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn frame(dst: [u8; 6], n: usize, seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(n, (seq % 251) as u8);
    f
}

fn loopback(mode: Mode) {
    let dev: Arc<dyn Device> = Arc::new(SimDevice::net(MAC, 1500).unwrap());
    let mut s = Session::start(dev.clone(), &SessionConfig { mode, ..Default::default() }).unwrap();
    let d = s.driver().unwrap();
    let total = 1000u32;
    let mut got = Vec::new();
    let mut sent = 0u32;
    while sent < total {
        let batch = 64.min(total - sent);
        for _ in 0..batch {
            d.add(0, &[], &[2048]).unwrap();
        }
        d.kick(0).unwrap();
        for i in 0..batch {
            let f = frame(MAC, 60 + ((sent + i) as usize * 7) % 1400, sent + i);
            d.add(1, &[&f], &[]).unwrap();
        }
        d.kick(1).unwrap();
        got.extend(d.wait(0, batch as usize, false, Duration::from_secs(5)).unwrap());
        d.wait(1, batch as usize, false, Duration::from_secs(5)).unwrap();
        sent += batch;
    }
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.data, frame(MAC, 60 + (i * 7) % 1400, i as u32), "frame {i}");
    }
    if mode != Mode::Passthrough {
        let st: std::collections::HashMap<_, _> = s.stats(1).unwrap().into_iter().collect();
        assert_eq!(st["elements"], total as u64);
        assert_eq!(st["completed"], total as u64);
    }
    s.close().unwrap();
    assert_eq!(dev.live_mappings(), Some(0));
}

#[test]
fn translate_loopback() {
    loopback(Mode::Translate);
}

#[test]
fn passthrough_loopback() {
    loopback(Mode::Passthrough);
}

#[test]
fn copy_loopback() {
    loopback(Mode::Copy);
}

struct Panics;
impl QueueHook for Panics {
    fn avail(&mut self, _out: &[u8], _in_len: u32) -> Verdict {
        panic!("a hook that panics")
    }
    fn used(&mut self, _out: &[u8], _written: &[u8]) {}
}

#[test]
fn a_panic_on_the_engine_thread_breaks_the_queues_and_close_still_cleans_up() {
    let dev: Arc<dyn Device> = Arc::new(SimDevice::net(MAC, 1500).unwrap());
    let mut s = Session::start(dev.clone(), &SessionConfig::default()).unwrap();
    let done = s.add_hook(2, Box::new(Panics)).unwrap();
    Session::wait_all(2, &[done], Duration::from_secs(5)).unwrap();
    let d = s.driver().unwrap();
    d.add(2, &[&[1, 1, 2, 0, 0, 0, 0, 1]], &[1]).unwrap();
    d.kick(2).unwrap();
    match d.wait(2, 1, false, Duration::from_secs(5)) {
        Err(DriverError::Broken(f)) => {
            assert_eq!(f.rule(), "internal_error");
            assert!(f.to_string().contains("a hook that panics"), "{f}");
        }
        other => panic!("expected an internal fault, got {other:?}"),
    }
    // Every queue is broken, and closing releases everything.
    assert!(matches!(d.wait(0, 1, false, Duration::from_secs(1)), Err(DriverError::Broken(_))));
    s.close().unwrap();
    assert_eq!(dev.live_mappings(), Some(0));
}

#[test]
fn stop_saving_gives_back_what_the_device_did_not_take() {
    for mode in [Mode::Translate, Mode::Copy, Mode::Passthrough] {
        let dev: Arc<dyn Device> = Arc::new(SimDevice::net(MAC, 1500).unwrap());
        let mut s = Session::start(dev.clone(), &SessionConfig { mode, ..Default::default() }).unwrap();
        let d = s.driver().unwrap();
        for _ in 0..64 {
            d.add(0, &[], &[2048]).unwrap();
        }
        d.kick(0).unwrap();
        for i in 0..10 {
            d.add(1, &[&frame(MAC, 100, i)], &[]).unwrap();
        }
        d.kick(1).unwrap();
        assert_eq!(d.wait(0, 10, false, Duration::from_secs(5)).unwrap().len(), 10);
        assert_eq!(d.wait(1, 10, false, Duration::from_secs(5)).unwrap().len(), 10);
        let positions = s.stop_saving().unwrap();
        let pos = |q: u32| positions.iter().find(|p| p.queue == q).copied().unwrap();
        // The 54 receive buffers the device never took go back to the guest ring.
        assert_eq!((pos(0).avail, pos(0).used), (10, 10), "{mode:?}");
        assert_eq!((pos(1).avail, pos(1).used), (10, 10), "{mode:?}");
        assert!(s.driver().is_err(), "the session is closed");
        assert_eq!(dev.live_mappings(), Some(0));
    }
}

/// Sends `n` frames (sequence numbers from `seq`) TX→RX and checks they come back in order.
fn round(s: &mut Session, seq: u32, n: u32) {
    let d = s.driver().unwrap();
    for _ in 0..n {
        d.add(0, &[], &[2048]).unwrap();
    }
    d.kick(0).unwrap();
    for i in 0..n {
        d.add(1, &[&frame(MAC, 200, seq + i)], &[]).unwrap();
    }
    d.kick(1).unwrap();
    let got = d.wait(0, n as usize, false, Duration::from_secs(5)).unwrap();
    d.wait(1, n as usize, false, Duration::from_secs(5)).unwrap();
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.data, frame(MAC, 200, seq + i as u32), "frame {}", seq + i as u32);
    }
}

#[test]
fn queues_switch_between_passthrough_and_the_shadow_while_running() {
    let dev: Arc<dyn Device> = Arc::new(SimDevice::net(MAC, 1500).unwrap());
    let cfg = SessionConfig { mode: Mode::Passthrough, queue_modes: vec![(2, Mode::Copy)], ..Default::default() };
    let mut s = Session::start(dev.clone(), &cfg).unwrap();
    let mut seq = 0;
    for (mode, _) in [(Mode::Translate, 0), (Mode::Passthrough, 1), (Mode::Copy, 2), (Mode::Passthrough, 3)] {
        // Receive buffers posted before the switch are carried over, not lost.
        let d = s.driver().unwrap();
        for _ in 0..8 {
            d.add(0, &[], &[2048]).unwrap();
        }
        d.kick(0).unwrap();
        let r = s.switch(&[0, 1], mode).unwrap();
        assert_eq!(r.queues.len(), 2);
        assert_eq!(s.mode(0), Some(mode));
        // The 8 carried-over buffers take the first 8 frames.
        let d = s.driver().unwrap();
        for i in 0..8 {
            d.add(1, &[&frame(MAC, 200, seq + i)], &[]).unwrap();
        }
        d.kick(1).unwrap();
        let got = d.wait(0, 8, false, Duration::from_secs(5)).unwrap();
        d.wait(1, 8, false, Duration::from_secs(5)).unwrap();
        for (i, c) in got.iter().enumerate() {
            assert_eq!(c.data, frame(MAC, 200, seq + i as u32), "{mode:?}");
        }
        seq += 8;
        round(&mut s, seq, 50);
        seq += 50;
    }
    s.close().unwrap();
    assert_eq!(dev.live_mappings(), Some(0));
}

#[test]
fn the_dirty_log_marks_what_the_device_wrote_for_the_guest() {
    for mode in [Mode::Translate, Mode::Copy] {
        let dev: Arc<dyn Device> = Arc::new(SimDevice::net(MAC, 1500).unwrap());
        let mut s = Session::start(dev.clone(), &SessionConfig { mode, ..Default::default() }).unwrap();
        let log = Arc::new(crate::dirty::DirtyLog::new(s.guest_end()).unwrap());
        s.set_dirty_log(Some(log.clone())).unwrap();
        let used_rx = s.guest_queues()[0].used;
        let d = s.driver().unwrap();
        d.add(0, &[], &[2048]).unwrap();
        d.kick(0).unwrap();
        // One frame whose RX buffer we know the address of.
        d.add(1, &[&frame(MAC, 3000, 1)], &[]).unwrap();
        d.kick(1).unwrap();
        d.wait(0, 1, false, Duration::from_secs(5)).unwrap();
        d.wait(1, 1, false, Duration::from_secs(5)).unwrap();
        let used_tx = s.guest_queues()[1].used;
        let pages = log.fetch_and_clear();
        assert!(pages.contains(&(used_rx / 4096)) && pages.contains(&(used_tx / 4096)), "{mode:?}: the used rings are logged");
        // Every other logged page holds the frame the device wrote (the RX buffer); the
        // TX buffer holds it too but was only read: exactly one more page.
        let mem = s.driver().unwrap().memory().clone();
        let data: Vec<u64> = pages.iter().copied().filter(|&p| p != used_rx / 4096 && p != used_tx / 4096).collect();
        assert_eq!(data.len(), 1, "{mode:?}: {pages:?}");
        let mut page = vec![0u8; 4096];
        mem.read(data[0] * 4096, &mut page).unwrap();
        let f = frame(MAC, 3000, 1);
        assert!(page.windows(32).any(|w| w == &f[12..44]), "{mode:?}: the logged page holds the received frame");
        s.set_dirty_log(None).unwrap();
        round(&mut s, 2, 10);
        assert_eq!(log.count(), 0, "detached: nothing more is logged");
        s.close().unwrap();
    }
}
