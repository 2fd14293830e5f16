//! `cargo fuzz run pop_guest_ring`; without cargo-fuzz, `cargo run --manifest-path fuzz/Cargo.toml
//! --bin pop_guest_ring -- FILE_OR_DIR...` replays inputs (crash reproducers, corpus directories).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| svq_fuzz::pop_guest_ring::run(data));

#[cfg(not(fuzzing))]
fn main() {
    svq_fuzz::replay_main(svq_fuzz::pop_guest_ring::run);
}
