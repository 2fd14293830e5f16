//! `vhost_user_requests`: a hostile VMM writes arbitrary vhost-user messages (any request
//! code, flags, payload and attached fds, in any order) to svq's vhost-user backend over
//! a real socket pair; the backend must answer or hang up, never panic or hang, and once
//! the connection ends the embedded device behind it must be reset with nothing mapped.
//!
//! Input: a sequence of messages, each `code flags len {payload}*len fds`, where `code`
//! picks a request (mostly the ones svq serves), `len` is the payload length (at most 96
//! bytes, so a message may lie about its size), and `fds` attaches 0, 1 or 2 descriptors:
//! eventfds, or a sealable 1 MiB memfd (what SET_MEM_TABLE expects).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use svq::device::sim::SimDevice;
use svq::device::Device;
use svq::session::SessionConfig;
use svq::vhost_user::Server;

use crate::Input;

/// The requests a VMM sends most, so that inputs reach deep states often.
const CODES: [u32; 20] = [1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 39, 40];

struct Backend {
    device: Arc<SimDevice>,
    server: Server,
    /// Held for a whole input: the test harness runs the seed and smoke tests on parallel
    /// threads, and the device must be checked before the next connection starts.
    turn: Mutex<()>,
    _dir: std::path::PathBuf,
}

fn backend() -> &'static Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    B.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("svq-fuzz-vu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let device = Arc::new(SimDevice::net([0x52, 0x54, 0, 0x12, 0x34, 0x56], 1500).expect("embedded device"));
        let dynamic: Arc<dyn Device> = device.clone();
        let server = Server::bind(dynamic, &dir.join("vu.sock"), SessionConfig::default()).expect("server");
        Backend { device, server, turn: Mutex::new(()), _dir: dir }
    })
}

fn eventfd() -> OwnedFd {
    nix::sys::eventfd::EventFd::from_value_and_flags(0, nix::sys::eventfd::EfdFlags::EFD_CLOEXEC).expect("eventfd").into()
}

fn memfd() -> OwnedFd {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"fuzz-guest", MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING).expect("memfd");
    nix::unistd::ftruncate(&fd, 1 << 20).expect("ftruncate");
    fd
}

/// Runs one input as one VMM connection.
pub fn run(data: &[u8]) {
    let b = backend();
    let (vmm, ours) = UnixStream::pair().expect("socket pair");
    let mut input = Input::new(data);
    let mut messages: Vec<(Vec<u8>, Vec<OwnedFd>)> = Vec::new();
    while !input.is_empty() && messages.len() < 64 {
        let pick = input.u8();
        let code = if pick < 240 { CODES[pick as usize % CODES.len()] } else { u32::from(input.u8()) };
        let flags = match input.u8() % 4 {
            0 => 1,
            1 => 1 | 8,
            2 => 0x5,
            _ => input.u32(),
        };
        let len = (input.u8() % 97) as usize;
        let mut msg = Vec::with_capacity(12 + len);
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&(len as u32).to_le_bytes());
        (0..len).for_each(|_| msg.push(input.u8()));
        let fds = match input.u8() % 5 {
            0 | 1 => Vec::new(),
            2 => vec![eventfd()],
            3 => vec![memfd()],
            _ => vec![eventfd(), memfd()],
        };
        trace!("message {code} flags {flags:#x} len {len} fds {}", fds.len());
        messages.push((msg, fds));
    }
    // The VMM writes everything and hangs up; a thread reads whatever the backend answers
    // so that it never blocks on a full socket.
    let reader = vmm.try_clone().expect("clone");
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        let mut r = reader;
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    });
    let writer = std::thread::spawn(move || {
        for (msg, fds) in messages {
            let iov = [std::io::IoSlice::new(&msg)];
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let sent = if raw.is_empty() {
                sendmsg::<()>(vmm.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
            } else {
                sendmsg::<()>(vmm.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = vmm.shutdown(std::net::Shutdown::Write);
    });
    let _turn = b.turn.lock().unwrap_or_else(|p| p.into_inner());
    b.server.serve_connection(ours);
    writer.join().expect("writer");
    drain.join().expect("reader");
    trace!("backend: {:?}", b.server.report());
    // The connection is over: the device was reset and nothing stays mapped.
    assert_eq!(b.device.live_mappings(), Some(0), "mappings left after the VMM hung up");
    assert_eq!(b.device.status().expect("status"), 0, "the device still runs after the VMM hung up");
}
