//! `cargo fuzz run ctrl_command`; without cargo-fuzz, `cargo run --manifest-path
//! fuzz/Cargo.toml --bin ctrl_command -- FILE_OR_DIR...` replays inputs.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| svq_fuzz::ctrl_command::run(data));

#[cfg(not(fuzzing))]
fn main() {
    svq_fuzz::replay_main(svq_fuzz::ctrl_command::run);
}
