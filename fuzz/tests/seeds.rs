//! The fuzz harnesses as ordinary tests: every committed seed (`corpus/<target>/*`), then a
//! few thousand pseudo-random inputs per target (a fixed xorshift stream, so failures
//! reproduce). `cargo test --manifest-path fuzz/Cargo.toml` runs them without cargo-fuzz;
//! `SVQ_FUZZ_SMOKE=N` changes the number of random inputs per target.

use std::path::PathBuf;

fn seeds(target: &str, f: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    for p in files {
        let data = std::fs::read(&p).unwrap();
        eprintln!("seed {}", p.display());
        f(&data);
    }
}

/// Random inputs: random bytes, and seeds with random bytes spliced in (closer to what a
/// fuzzer mutates, so deeper paths are reached than with noise alone).
fn smoke(target: &str, f: fn(&[u8])) {
    let n: usize = std::env::var("SVQ_FUZZ_SMOKE").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut bases: Vec<Vec<u8>> = std::fs::read_dir(&dir).unwrap().map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
    bases.sort();
    let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ target.len() as u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for i in 0..n {
        let mut data = if i % 2 == 0 || bases.is_empty() {
            let len = (next() % 600) as usize;
            (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
        } else {
            bases[(next() % bases.len() as u64) as usize].clone()
        };
        if !data.is_empty() {
            for _ in 0..(next() % 8) {
                let at = (next() % data.len() as u64) as usize;
                data[at] = next() as u8;
            }
        }
        let r = std::panic::catch_unwind(|| f(&data));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("svq-fuzz-{target}-{i}"));
            std::fs::write(&path, &data).unwrap();
            panic!("{target}: random input {i} failed; saved to {}", path.display());
        }
    }
}

#[test]
fn pop_guest_ring_seeds() {
    seeds("pop_guest_ring", svq_fuzz::pop_guest_ring::run);
}
#[test]
fn reap_used_ring_seeds() {
    seeds("reap_used_ring", svq_fuzz::reap_used_ring::run);
}
#[test]
fn iova_ops_seeds() {
    seeds("iova_ops", svq_fuzz::iova_ops::run);
}
#[test]
fn pop_guest_ring_smoke() {
    smoke("pop_guest_ring", svq_fuzz::pop_guest_ring::run);
}
#[test]
fn reap_used_ring_smoke() {
    smoke("reap_used_ring", svq_fuzz::reap_used_ring::run);
}
#[test]
fn iova_ops_smoke() {
    smoke("iova_ops", svq_fuzz::iova_ops::run);
}
#[test]
fn ctrl_command_seeds() {
    seeds("ctrl_command", svq_fuzz::ctrl_command::run);
}
#[test]
fn ctrl_command_smoke() {
    smoke("ctrl_command", svq_fuzz::ctrl_command::run);
}
#[test]
fn vhost_user_requests_seeds() {
    seeds("vhost_user_requests", svq_fuzz::vhost_user_requests::run);
}
#[test]
fn vhost_user_requests_smoke() {
    smoke("vhost_user_requests", svq_fuzz::vhost_user_requests::run);
}
