//! `cargo fuzz run iova_ops`; without cargo-fuzz, `cargo run --manifest-path fuzz/Cargo.toml
//! --bin iova_ops -- FILE_OR_DIR...` replays inputs (crash reproducers, corpus directories).
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| svq_fuzz::iova_ops::run(data));

#[cfg(not(fuzzing))]
fn main() {
    svq_fuzz::replay_main(svq_fuzz::iova_ops::run);
}
