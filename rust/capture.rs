//! Packet capture to a pcapng file, written by svq itself: a Section Header Block, one
//! Interface Description Block per captured queue (link type Ethernet, nanosecond
//! timestamps: `if_tsresol` 9), one Enhanced Packet Block per frame, and at the end one
//! Interface Statistics Block per interface with the frames seen and dropped.
//!
//! A shadow queue records frames through its [`Tap`] on the engine thread: it copies at
//! most the snap length into an EPB in a batch of its own (the virtio-net header is not
//! part of the frame), and hands the batch over once per pass of the queue. A writer
//! thread writes the batches; the channel between them is bounded, and a batch that
//! does not fit (the disk is slower than the queue) is dropped and counted, never
//! waited for: the engine never blocks on the file. The writer keeps the file under its
//! size cap: once the next frame would not fit, capture stops, and every later frame is
//! counted as dropped.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::live::ThreadToken;

/// The snap length when none is given (tcpdump's and Wireshark's), and the largest one.
pub const DEFAULT_SNAPLEN: u32 = 262_144;
/// Batches waiting for the writer, at most: a pass of a busy queue hands over a few
/// frames, and the writer thread shares the CPUs with the queues, so it catches up in
/// bursts. A batch holds less than FLUSH_AT bytes plus one frame of at most the snap
/// length; what waits is bounded by DEPTH such batches.
const DEPTH: usize = 256;
/// Emptied batch buffers kept for the taps to reuse (their capacity stays allocated).
const SPARES: usize = 64;
/// A tap hands its batch over once it holds this many bytes, or at the end of a pass.
const FLUSH_AT: usize = 64 << 10;

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 1;
const EPB: u32 = 6;
const ISB: u32 = 5;
const LINKTYPE_ETHERNET: u16 = 1;
/// EPB header (type, length, interface, timestamp, captured and original lengths) and
/// trailing length.
const EPB_FIXED: usize = 32;

const RUNNING: u8 = 0;
/// The size cap was reached (or the file failed): frames are counted, not captured.
const FULL: u8 = 1;
/// Finished: nothing is counted any more.
const DONE: u8 = 2;

/// Capture settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Bytes of each frame kept (the rest is counted in its original length only).
    pub snaplen: u32,
    /// The file's largest size in bytes, statistics at the end included (None: no cap).
    pub limit: Option<u64>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig { snaplen: DEFAULT_SNAPLEN, limit: None }
    }
}

/// A capture that could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be created or written.
    #[error("capture file {path}: {source}")]
    Io {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A bad setting.
    #[error("{0}")]
    Invalid(String),
}

/// One captured interface (a queue), as its statistics say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceReport {
    /// Its name (`rx0`, `tx0`, ...).
    pub name: String,
    /// Frames written to the file.
    pub packets: u64,
    /// Frames seen and not written (size cap, or the writer behind).
    pub dropped: u64,
}

/// What a capture did so far (or in all, once finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureReport {
    /// The file.
    pub path: PathBuf,
    /// Frames written.
    pub packets: u64,
    /// Frames not written, for any reason.
    pub dropped: u64,
    /// Frames not written because the file reached its size cap.
    pub dropped_limit: u64,
    /// Frames not written because the writer was behind (the channel to it was full).
    pub dropped_busy: u64,
    /// Bytes written to the file.
    pub bytes: u64,
    /// Per interface, in the file's order.
    pub interfaces: Vec<InterfaceReport>,
    /// Whether the file is complete (statistics written, closed).
    pub finished: bool,
    /// Why writing stopped early, if it did (frames after it are counted as dropped).
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    state: AtomicU8,
    /// Timestamps: wall-clock time at the start plus monotonic time since, so that they
    /// never go backwards within a file.
    epoch_ns: u64,
    started: Instant,
    ifaces: Vec<Counters>,
    dropped_limit: AtomicU64,
    dropped_busy: AtomicU64,
    bytes: AtomicU64,
    error: Mutex<Option<String>>,
    /// Batch buffers the writer gave back, for taps to reuse.
    spare: Mutex<Vec<Vec<u8>>>,
}

impl Shared {
    #[inline]
    fn now_ns(&self) -> u64 {
        self.epoch_ns.wrapping_add(self.started.elapsed().as_nanos() as u64)
    }

    fn drop_packets(&self, iface: u32, n: u64, busy: bool) {
        if let Some(c) = self.ifaces.get(iface as usize) {
            c.dropped.fetch_add(n, Ordering::Relaxed);
        }
        let which = if busy { &self.dropped_busy } else { &self.dropped_limit };
        which.fetch_add(n, Ordering::Relaxed);
    }
}

enum Msg {
    /// EPBs of one interface: `packets` whole blocks.
    Batch {
        iface: u32,
        bytes: Vec<u8>,
        packets: u64,
    },
    Stop,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pcapng file being written. Shared by whoever attaches taps (sessions, one after the
/// other for a server); [`Capture::finish`] (or dropping it) completes the file and ends
/// the writer thread.
pub struct Capture {
    path: PathBuf,
    snaplen: u32,
    names: Vec<String>,
    shared: Arc<Shared>,
    tx: Mutex<Option<SyncSender<Msg>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("path", &self.path).field("interfaces", &self.names).finish()
    }
}

impl Capture {
    /// Creates (or truncates) `path` and writes its headers: one interface per entry of
    /// `interfaces` (name, description), in that order.
    pub fn create(path: &Path, interfaces: &[(String, String)], cfg: CaptureConfig) -> Result<Self, CaptureError> {
        if cfg.snaplen == 0 || cfg.snaplen > DEFAULT_SNAPLEN {
            return Err(CaptureError::Invalid(format!("the snap length must be 1..={DEFAULT_SNAPLEN} bytes, got {}", cfg.snaplen)));
        }
        if interfaces.is_empty() {
            return Err(CaptureError::Invalid("a capture needs at least one interface".into()));
        }
        let mut head = shb();
        for (name, description) in interfaces {
            head.extend(idb(name, description, cfg.snaplen));
        }
        let reserve = interfaces.len() * isb_max_len();
        let needed = (head.len() + reserve) as u64;
        if let Some(limit) = cfg.limit.filter(|&l| l < needed) {
            return Err(CaptureError::Invalid(format!(
                "the capture limit of {limit} bytes is smaller than the file's headers and statistics ({needed} bytes)"
            )));
        }
        let io_err = |source| CaptureError::Io { path: path.to_owned(), source };
        let mut file = File::create(path).map_err(io_err)?;
        file.write_all(&head).map_err(io_err)?;
        let epoch_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let shared = Arc::new(Shared {
            state: AtomicU8::new(RUNNING),
            epoch_ns,
            started: Instant::now(),
            ifaces: interfaces.iter().map(|_| Counters::default()).collect(),
            dropped_limit: AtomicU64::new(0),
            dropped_busy: AtomicU64::new(0),
            bytes: AtomicU64::new(head.len() as u64),
            error: Mutex::new(None),
            spare: Mutex::new(Vec::new()),
        });
        let (tx, rx) = std::sync::mpsc::sync_channel(DEPTH);
        let names: Vec<String> = interfaces.iter().map(|(n, _)| n.clone()).collect();
        let limit = cfg.limit.map(|l| l - reserve as u64);
        let w = Writer { file: io::BufWriter::with_capacity(256 << 10, file), shared: shared.clone(), limit, names: names.clone() };
        let token = ThreadToken::new();
        let writer = std::thread::Builder::new()
            .name("svq-capture".into())
            .spawn(move || {
                let _token = token;
                w.run(rx)
            })
            .map_err(io_err)?;
        Ok(Capture {
            path: path.to_owned(),
            snaplen: cfg.snaplen,
            names,
            shared,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The interfaces' names, in the file's order.
    pub fn interfaces(&self) -> &[String] {
        &self.names
    }

    /// A tap recording into interface `name`, dropping the first `strip` bytes of each
    /// frame (the virtio-net header); None when there is no such interface or the
    /// capture is finished.
    pub fn tap(&self, name: &str, strip: u32) -> Option<Tap> {
        let iface = self.names.iter().position(|n| n == name)? as u32;
        let tx = lock(&self.tx).clone()?;
        Some(Tap { iface, snaplen: self.snaplen, strip, shared: self.shared.clone(), tx, batch: Vec::new(), packets: 0 })
    }

    /// What the capture did so far.
    pub fn report(&self) -> CaptureReport {
        let sh = &self.shared;
        let interfaces: Vec<InterfaceReport> = self
            .names
            .iter()
            .zip(&sh.ifaces)
            .map(|(name, c)| InterfaceReport {
                name: name.clone(),
                packets: c.written.load(Ordering::Relaxed),
                dropped: c.dropped.load(Ordering::Relaxed),
            })
            .collect();
        CaptureReport {
            path: self.path.clone(),
            packets: interfaces.iter().map(|i| i.packets).sum(),
            dropped: interfaces.iter().map(|i| i.dropped).sum(),
            dropped_limit: sh.dropped_limit.load(Ordering::Relaxed),
            dropped_busy: sh.dropped_busy.load(Ordering::Relaxed),
            bytes: sh.bytes.load(Ordering::Relaxed),
            interfaces,
            finished: sh.state.load(Ordering::SeqCst) == DONE,
            error: lock(&sh.error).clone(),
        }
    }

    /// Writes what the taps handed over, the statistics, and closes the file; the
    /// writer thread has ended when this returns. Taps still attached record nothing
    /// from then on. Idempotent.
    pub fn finish(&self) -> CaptureReport {
        if let Some(tx) = lock(&self.tx).take() {
            // Blocks only while the writer drains the channel; fails when it is gone.
            let _ = tx.send(Msg::Stop);
        }
        if let Some(t) = lock(&self.writer).take() {
            let _ = t.join();
        }
        self.shared.state.store(DONE, Ordering::SeqCst);
        self.report()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Where a shadow queue records frames (see the module's description). Dropping it
/// hands its last batch over.
#[derive(Debug)]
pub struct Tap {
    iface: u32,
    snaplen: u32,
    strip: u32,
    shared: Arc<Shared>,
    tx: SyncSender<Msg>,
    batch: Vec<u8>,
    packets: u64,
}

impl Tap {
    /// Records one frame of `len` bytes, virtio-net header included. `fill(skip, dst)`
    /// copies the frame's bytes from offset `skip` into `dst` (the captured part), and
    /// says whether it could; a frame no longer than the header is not recorded.
    #[inline]
    pub fn record(&mut self, len: u64, fill: impl FnOnce(u64, &mut [u8]) -> bool) {
        let Some(orig) = len.checked_sub(u64::from(self.strip)).filter(|&n| n > 0) else { return };
        if self.shared.state.load(Ordering::Relaxed) != RUNNING {
            return self.refused();
        }
        let orig = orig.min(u64::from(u32::MAX)) as u32;
        let cap = orig.min(self.snaplen) as usize;
        let ts = self.shared.now_ns();
        let padded = (cap + 3) & !3;
        let total = (EPB_FIXED + padded) as u32;
        let start = self.batch.len();
        self.batch.reserve(total as usize);
        for v in [EPB, total, self.iface, (ts >> 32) as u32, ts as u32, cap as u32, orig] {
            self.batch.extend_from_slice(&v.to_le_bytes());
        }
        let data = self.batch.len();
        self.batch.resize(data + padded, 0);
        if !fill(u64::from(self.strip), &mut self.batch[data..data + cap]) {
            self.batch.truncate(start);
            return;
        }
        self.batch.extend_from_slice(&total.to_le_bytes());
        self.packets += 1;
        if self.batch.len() >= FLUSH_AT {
            self.flush();
        }
    }

    #[cold]
    fn refused(&self) {
        if self.shared.state.load(Ordering::Relaxed) == FULL {
            self.shared.drop_packets(self.iface, 1, false);
        }
    }

    /// Hands the batch to the writer; when the writer is behind, the batch is dropped
    /// and counted.
    pub fn flush(&mut self) {
        if self.packets == 0 {
            return;
        }
        let packets = std::mem::take(&mut self.packets);
        let spare = lock(&self.shared.spare).pop().unwrap_or_default();
        let bytes = std::mem::replace(&mut self.batch, spare);
        match self.tx.try_send(Msg::Batch { iface: self.iface, bytes, packets }) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Batch { mut bytes, .. })) => {
                self.shared.drop_packets(self.iface, packets, true);
                bytes.clear();
                self.batch = bytes;
            }
            // Finished: nothing counts any more.
            Err(_) => self.batch.clear(),
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.flush();
    }
}

struct Writer {
    file: io::BufWriter<File>,
    shared: Arc<Shared>,
    /// Bytes EPBs may bring the file to (the cap less the statistics at the end).
    limit: Option<u64>,
    names: Vec<String>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let msg = match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    // Idle: what was written so far becomes readable.
                    if let Err(e) = self.file.flush() {
                        self.failed(e);
                    }
                    match rx.recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            match msg {
                Msg::Batch { iface, bytes, packets } => self.batch(iface, bytes, packets),
                Msg::Stop => break,
            }
        }
        // Frames from here on are not captured (nor counted: the report is final).
        self.shared.state.store(DONE, Ordering::SeqCst);
        drop(rx);
        let stats = self.statistics();
        if let Err(e) = self.file.write_all(&stats).and_then(|()| self.file.flush()) {
            self.failed(e);
        } else {
            self.shared.bytes.fetch_add(stats.len() as u64, Ordering::Relaxed);
        }
    }

    fn batch(&mut self, iface: u32, mut bytes: Vec<u8>, packets: u64) {
        let sh = self.shared.clone();
        // Whole blocks that fit under the cap.
        let (mut end, mut fit) = (0usize, 0u64);
        let room = self.limit.map_or(u64::MAX, |l| l.saturating_sub(sh.bytes.load(Ordering::Relaxed)));
        if sh.state.load(Ordering::Relaxed) == RUNNING {
            while end + 8 <= bytes.len() {
                let len = u32::from_le_bytes([bytes[end + 4], bytes[end + 5], bytes[end + 6], bytes[end + 7]]) as usize;
                if (end + len) as u64 > room {
                    break;
                }
                end += len;
                fit += 1;
            }
        }
        if fit < packets {
            sh.drop_packets(iface, packets - fit, false);
            if sh.state.load(Ordering::Relaxed) == RUNNING {
                sh.state.store(FULL, Ordering::SeqCst);
            }
        }
        if end > 0 {
            match self.file.write_all(&bytes[..end]) {
                Ok(()) => {
                    sh.bytes.fetch_add(end as u64, Ordering::Relaxed);
                    if let Some(c) = sh.ifaces.get(iface as usize) {
                        c.written.fetch_add(fit, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    sh.drop_packets(iface, fit, false);
                    self.failed(e);
                }
            }
        }
        bytes.clear();
        let mut spare = lock(&sh.spare);
        if spare.len() < SPARES {
            spare.push(bytes);
        }
    }

    #[cold]
    fn failed(&mut self, e: io::Error) {
        lock(&self.shared.error).get_or_insert_with(|| e.to_string());
        // Later frames are counted, never written to a file that failed.
        self.limit = Some(0);
        let _ = self.shared.state.compare_exchange(RUNNING, FULL, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// One ISB per interface: frames seen (`isb_ifrecv`), dropped (`isb_ifdrop`), and a
    /// comment saying why.
    fn statistics(&self) -> Vec<u8> {
        let sh = &self.shared;
        let (limit, busy) = (sh.dropped_limit.load(Ordering::Relaxed), sh.dropped_busy.load(Ordering::Relaxed));
        let error = lock(&sh.error).is_some();
        let ts = sh.now_ns();
        let mut out = Vec::new();
        for (i, c) in sh.ifaces.iter().enumerate() {
            let (written, dropped) = (c.written.load(Ordering::Relaxed), c.dropped.load(Ordering::Relaxed));
            let why = if error { "a write failed" } else { "size cap or writer behind" };
            let comment = comment(&self.names[i], written, dropped, limit, busy, why);
            out.extend(isb(i as u32, ts, written + dropped, dropped, &comment));
        }
        out
    }
}

fn comment(name: &str, written: u64, dropped: u64, limit: u64, busy: u64, why: &str) -> String {
    let name: String = name.chars().take(32).collect();
    format!("svq {name}: {written} captured, {dropped} dropped; all interfaces: {limit} over the size cap, {busy} with the writer behind ({why})")
}

/// The longest ISB [`Writer::statistics`] writes for one interface.
fn isb_max_len() -> usize {
    let c = comment(&"x".repeat(32), u64::MAX, u64::MAX, u64::MAX, u64::MAX, "size cap or writer behind");
    isb(0, 0, 0, 0, &c).len()
}

fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.resize((out.len() + 3) & !3, 0);
}

/// A block: type, total length, `body` (already padded), total length.
fn block(kind: u32, body: &[u8]) -> Vec<u8> {
    let total = (12 + body.len()) as u32;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
    out
}

fn end_of_options(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0, 0]);
}

fn shb() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Section length not known in advance.
    body.extend_from_slice(&(-1i64).to_le_bytes());
    option(&mut body, 4, format!("svq {}", env!("CARGO_PKG_VERSION")).as_bytes()); // shb_userappl
    end_of_options(&mut body);
    block(SHB, &body)
}

fn idb(name: &str, description: &str, snaplen: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&snaplen.to_le_bytes());
    option(&mut body, 2, name.as_bytes()); // if_name
    option(&mut body, 3, description.as_bytes()); // if_description
    option(&mut body, 9, &[9]); // if_tsresol: 10^-9 s
    end_of_options(&mut body);
    block(IDB, &body)
}

fn isb(iface: u32, ts: u64, received: u64, dropped: u64, comment: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&iface.to_le_bytes());
    body.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
    body.extend_from_slice(&(ts as u32).to_le_bytes());
    option(&mut body, 1, comment.as_bytes()); // opt_comment
    option(&mut body, 4, &received.to_le_bytes()); // isb_ifrecv
    option(&mut body, 5, &dropped.to_le_bytes()); // isb_ifdrop
    end_of_options(&mut body);
    block(ISB, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (type, body) of each block, checking both lengths.
    fn blocks(file: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        let u32_at = |i: usize| u32::from_le_bytes(file[i..i + 4].try_into().unwrap());
        while at < file.len() {
            let (kind, len) = (u32_at(at), u32_at(at + 4) as usize);
            assert_eq!(len % 4, 0);
            assert_eq!(u32_at(at + len - 4) as usize, len, "trailing length of block at {at}");
            out.push((kind, file[at + 8..at + len - 4].to_vec()));
            at += len;
        }
        out
    }

    /// (interface, timestamp, captured bytes, original length) of each EPB.
    fn packets(file: &[u8]) -> Vec<(u32, u64, Vec<u8>, u32)> {
        blocks(file)
            .into_iter()
            .filter(|(k, _)| *k == EPB)
            .map(|(_, b)| {
                let w = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
                let cap = w(12) as usize;
                (w(0), (u64::from(w(4)) << 32) | u64::from(w(8)), b[20..20 + cap].to_vec(), w(16))
            })
            .collect()
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("svq-capture-{}-{name}.pcapng", std::process::id()))
    }

    fn ifaces() -> Vec<(String, String)> {
        vec![("rx0".into(), "receive".into()), ("tx1".into(), "transmit".into())]
    }

    fn frame(n: usize, seq: u8) -> Vec<u8> {
        (0..n).map(|i| seq.wrapping_add(i as u8)).collect()
    }

    fn record(tap: &mut Tap, f: &[u8]) {
        tap.record(f.len() as u64, |skip, dst| {
            dst.copy_from_slice(&f[skip as usize..skip as usize + dst.len()]);
            true
        });
    }

    #[test]
    fn frames_are_written_without_the_header_and_cut_at_the_snap_length() {
        let path = tmp("snap");
        let cap = Capture::create(&path, &ifaces(), CaptureConfig { snaplen: 100, limit: None }).unwrap();
        let mut rx = cap.tap("rx0", 12).unwrap();
        let mut tx = cap.tap("tx1", 12).unwrap();
        assert!(cap.tap("rx2", 12).is_none());
        let frames: Vec<Vec<u8>> = (0..6).map(|i| frame(12 + 60 + 40 * i, i as u8)).collect();
        for (i, f) in frames.iter().enumerate() {
            // One frame per pass of its queue: handed over at once.
            let tap = if i % 2 == 0 { &mut rx } else { &mut tx };
            record(tap, f);
            tap.flush();
        }
        record(&mut tx, &frame(12, 9)); // a header alone is no frame
        drop((rx, tx));
        let r = cap.finish();
        assert_eq!((r.packets, r.dropped, r.finished, r.error.clone()), (6, 0, true, None));
        assert_eq!(r.interfaces.iter().map(|i| (i.name.as_str(), i.packets)).collect::<Vec<_>>(), [("rx0", 3), ("tx1", 3)]);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len() as u64, r.bytes);
        let kinds: Vec<u32> = blocks(&file).iter().map(|b| b.0).collect();
        assert_eq!(kinds, [SHB, IDB, IDB, EPB, EPB, EPB, EPB, EPB, EPB, ISB, ISB]);
        let got = packets(&file);
        let mut last = 0;
        for ((iface, ts, data, orig), (i, f)) in got.iter().zip(frames.iter().enumerate()) {
            let want = &f[12..];
            assert_eq!((*iface, *orig as usize), ((i % 2) as u32, want.len()));
            assert_eq!(&data[..], &want[..want.len().min(100)]);
            assert!(*ts >= last);
            last = *ts;
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_size_cap_holds_and_what_did_not_fit_is_counted() {
        let path = tmp("cap");
        let limit = 4096;
        let cap = Capture::create(&path, &ifaces(), CaptureConfig { snaplen: 1000, limit: Some(limit) }).unwrap();
        let mut rx = cap.tap("rx0", 12).unwrap();
        for i in 0..20 {
            record(&mut rx, &frame(12 + 200, i));
            rx.flush();
        }
        drop(rx);
        let r = cap.finish();
        let file = std::fs::read(&path).unwrap();
        assert!(file.len() as u64 <= limit, "{} bytes", file.len());
        assert_eq!(file.len() as u64, r.bytes);
        assert_eq!(packets(&file).len() as u64, r.packets);
        assert!(r.packets > 0 && r.packets < 20);
        assert_eq!((r.packets + r.dropped, r.dropped_limit, r.dropped_busy), (20, r.dropped, 0));
        // The statistics block says so.
        let isbs: Vec<Vec<u8>> = blocks(&file).into_iter().filter(|b| b.0 == ISB).map(|b| b.1).collect();
        assert_eq!(isbs.len(), 2);
        assert!(String::from_utf8_lossy(&isbs[0]).contains(&format!("{} dropped", r.dropped)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_settings_are_refused_and_the_writer_ends() {
        let path = tmp("bad");
        assert!(matches!(Capture::create(&path, &ifaces(), CaptureConfig { snaplen: 0, limit: None }), Err(CaptureError::Invalid(_))));
        let small = Capture::create(&path, &ifaces(), CaptureConfig { snaplen: 64, limit: Some(100) });
        assert!(matches!(small, Err(CaptureError::Invalid(m)) if m.contains("smaller than")));
        let nowhere = Path::new("/nonexistent-dir/x.pcapng");
        assert!(matches!(Capture::create(nowhere, &ifaces(), CaptureConfig::default()), Err(CaptureError::Io { .. })));
        let cap = Capture::create(&path, &ifaces(), CaptureConfig::default()).unwrap();
        let mut tap = cap.tap("tx1", 12).unwrap();
        cap.finish();
        // A tap left behind records nothing, and never blocks.
        record(&mut tap, &frame(100, 1));
        tap.flush();
        assert_eq!(cap.finish().packets, 0);
        assert!(cap.tap("tx1", 12).is_none());
        std::fs::remove_file(&path).unwrap();
    }
}
