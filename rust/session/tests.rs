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
