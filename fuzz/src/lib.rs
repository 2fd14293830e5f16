//! Fuzz harnesses for svq: the guest-facing ring reader, the device-facing used-ring
//! reaper, the IOVA allocator and the control-command decoder, each checked against a
//! small reference model or a round trip.
//!
//! Every harness is a `run(&[u8])` that must never panic for any input: a panic is either a
//! bug in svq or a disagreement with the model that needs a look. The bytes are decoded by
//! [`Input`], which yields zeros once exhausted, so every input (even empty) is valid.
//!
//! The fuzz targets in `fuzz_targets/` call these functions; `tests/seeds.rs` replays the
//! committed seed corpora through them and runs a few thousand pseudo-random inputs, so the
//! harnesses are exercised by a plain `cargo test` without cargo-fuzz.

/// `eprintln!` when `SVQ_FUZZ_TRACE` is set (to see what an input does).
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::tracing() {
            eprintln!($($arg)*);
        }
    };
}

pub mod ctrl_command;
pub mod iova_ops;
pub mod pop_guest_ring;
pub mod reap_used_ring;
pub mod vhost_user_requests;

/// A cursor over the fuzzer's bytes; reads past the end give zeros.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    /// Whether every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// Next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }
    /// Next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// Next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    /// Next byte's low bit.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }
}

/// Whether `SVQ_FUZZ_TRACE` is set.
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SVQ_FUZZ_TRACE").is_some())
}

/// Entry point of a fuzz target built without libFuzzer: runs `f` on every file named on
/// the command line (directories are walked one level deep), printing each name first so a
/// panic points at its input.
pub fn replay_main(f: fn(&[u8])) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: {} FILE_OR_DIR...", std::env::args().next().unwrap_or_default());
        std::process::exit(2);
    }
    let mut n = 0;
    for a in args {
        let p = std::path::Path::new(&a);
        let mut files = Vec::new();
        if p.is_dir() {
            for e in std::fs::read_dir(p).expect("read_dir") {
                let e = e.expect("dir entry").path();
                if e.is_file() {
                    files.push(e);
                }
            }
            files.sort();
        } else {
            files.push(p.to_path_buf());
        }
        for file in files {
            eprintln!("running {}", file.display());
            let data = std::fs::read(&file).expect("read input");
            f(&data);
            n += 1;
        }
    }
    eprintln!("{n} inputs ran without a failure");
}
