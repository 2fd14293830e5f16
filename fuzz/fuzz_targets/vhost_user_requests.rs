//! `cargo fuzz run vhost_user_requests`; without cargo-fuzz, `cargo run --manifest-path
//! fuzz/Cargo.toml --bin vhost_user_requests -- FILE_OR_DIR...` replays inputs.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| svq_fuzz::vhost_user_requests::run(data));

#[cfg(not(fuzzing))]
fn main() {
    svq_fuzz::replay_main(svq_fuzz::vhost_user_requests::run);
}
