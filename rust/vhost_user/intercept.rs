//! The requests svq answers without rust-vmm's `vhost` crate, which reads the wire
//! protocol for every other one: GET_STATUS and SET_STATUS, which `vhost` 0.18 does not
//! dispatch (a VMM that negotiated STATUS would wait forever for the GET_STATUS reply),
//! and SET_VRING_ENABLE, which it refuses until SET_FEATURES acked PROTOCOL_FEATURES
//! while qemu sends it before SET_FEATURES. svq peeks at each request's header and
//! answers these itself, with the same framing.

use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{recv, send, MsgFlags};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;

use super::backend::VuBackend;

const SET_VRING_ENABLE: u32 = 18;
const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
const HEADER: usize = 12;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// A request's header, read without consuming it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    pub(super) request: u32,
    pub(super) flags: u32,
    pub(super) size: u32,
}

/// Peeks at the next request's header; None when fewer than 12 bytes are there yet.
pub(super) fn peek(fd: RawFd) -> Option<Header> {
    let mut h = [0u8; HEADER];
    let n = recv(fd, &mut h, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).ok()?;
    (n == HEADER).then(|| {
        let w = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        Header { request: w(0), flags: w(4), size: w(8) }
    })
}

/// Requests whose reply the VMM waits for: when the handler refuses one, no reply is
/// sent, so the connection must close rather than leave the VMM waiting.
pub(super) fn expects_reply(request: u32) -> bool {
    // GET_FEATURES, SET_LOG_BASE, GET_VRING_BASE, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    // GET_INFLIGHT_FD, GET_MAX_MEM_SLOTS, GET_STATUS, GET_SHMEM_CONFIG.
    matches!(request, 1 | 6 | 11 | 15 | 17 | 31 | 36 | 40 | 44)
}

/// What the connection loop does with the next request.
pub(super) enum Intercepted {
    /// Not one of ours: hand it to the crate.
    NotMine,
    /// Answered.
    Done,
    /// Malformed: close the connection.
    Bad(String),
}

/// Answers the next request if it is one of ours. A request with NEED_REPLY gets its ack
/// whatever was negotiated: a VMM sets the flag only when it waits for one.
pub(super) fn serve(sock: &impl AsRawFd, backend: &mut VuBackend) -> Intercepted {
    let fd = sock.as_raw_fd();
    let Some(h) = peek(fd) else { return Intercepted::NotMine };
    let want = match h.request {
        GET_STATUS => 0,
        SET_STATUS => 8,
        SET_VRING_ENABLE => 8,
        _ => return Intercepted::NotMine,
    };
    if h.size as usize != want || h.flags & !(VERSION | NEED_REPLY) != 0 || h.flags & VERSION == 0 {
        return Intercepted::Bad(format!("malformed request {} (size {}, flags {:#x})", h.request, h.size, h.flags));
    }
    let mut msg = vec![0u8; HEADER + want];
    match recv(fd, &mut msg, MsgFlags::MSG_WAITALL) {
        Ok(n) if n == msg.len() => {}
        _ => return Intercepted::Bad(format!("short request {}", h.request)),
    }
    let body = &msg[HEADER..];
    let word = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let ack = |ok: bool| (h.flags & NEED_REPLY != 0).then_some(u64::from(!ok));
    let answer = match h.request {
        GET_STATUS => Some(u64::from(backend.status())),
        SET_STATUS => {
            let value = u64::from(word(0)) | (u64::from(word(4)) << 32);
            let outcome =
                u8::try_from(value).map_err(|_| format!("status {value:#x} is not a status byte")).and_then(|v| backend.set_status(v));
            if let Err(e) = &outcome {
                backend.note(format!("SET_STATUS refused: {e}"));
            }
            ack(outcome.is_ok())
        }
        _ => {
            let (index, num) = (word(0), word(4));
            let outcome = match num {
                0 | 1 => backend.set_vring_enable(index, num == 1).map_err(|e| e.to_string()),
                n => Err(format!("queue {index}: enable value {n} is neither 0 nor 1")),
            };
            if let Err(e) = &outcome {
                backend.note(format!("SET_VRING_ENABLE refused: {e}"));
            }
            ack(outcome.is_ok())
        }
    };
    if let Some(v) = answer {
        let mut reply = Vec::with_capacity(HEADER + 8);
        reply.extend_from_slice(&h.request.to_le_bytes());
        reply.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&v.to_le_bytes());
        if !matches!(send(fd, &reply, MsgFlags::MSG_NOSIGNAL), Ok(n) if n == reply.len()) {
            return Intercepted::Bad(format!("could not answer request {}", h.request));
        }
    }
    Intercepted::Done
}
