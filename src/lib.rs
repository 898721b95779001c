//! tilefeat: per-tile ResNet50 deep features for computational pathology.
//!
//! The library behind the `tilefeat` binary; see ARCHITECTURE.md for the codemap and the
//! invariants each module keeps.

// The command line, and the errors and exit codes every command shares.
pub mod app;
pub mod cli;
pub mod error;
pub mod file_kind;
pub mod fingerprint;

// The stages of `extract`'s data flow, in order: tiles in, pixels, the encoder, the
// pipeline that drives them, the content-hash cache beside it, the outputs.
pub mod cache;
pub mod encoder;
pub mod input;
pub mod output;
pub mod pipeline;
pub mod pixels;

// The other commands, and what every command may use.
pub mod alloc;
pub mod bench;
pub mod cpu;
pub mod device;
pub mod host;
pub mod interrupt;
pub mod join;
pub mod progress;
pub mod zip_directory;

/// Whether an environment switch that is off by default (`TILEFEAT_NO_HEAP_TUNING`,
/// `TILEFEAT_CUDNN_BENCHMARK`, `TILEFEAT_CUDA_SLEEP`) is on (see [`switch_value`]).
pub fn env_on(name: &str) -> bool {
    env_switch(name, false)
}

/// An environment switch (`TILEFEAT_CUDA_STREAMS` is on by default): see [`switch_value`].
pub fn env_switch(name: &str, default: bool) -> bool {
    switch_value(std::env::var_os(name).as_deref(), default)
}

/// A switch's value: `0`, `false`, `no` or `off` (any case) turn it off, any other non-empty
/// value on; unset or empty leaves `default`.
pub fn switch_value(value: Option<&std::ffi::OsStr>, default: bool) -> bool {
    match value.map(|v| v.to_string_lossy().trim().to_ascii_lowercase()) {
        Some(v) if !v.is_empty() => !matches!(v.as_str(), "0" | "false" | "no" | "off"),
        _ => default,
    }
}

/// The tch crate version this build uses (pinned in Cargo.toml).
pub const TCH_VERSION: &str = "0.24.0";

#[cfg(test)]
mod tests {
    use super::*;

    /// `0` (and false/no/off) is off and anything else on, whatever the default; unset or
    /// empty keeps it (the streams switch is on by default, the others off).
    #[test]
    fn switches_read_zero_as_off_and_keep_their_default_when_unset() {
        use std::ffi::OsStr;
        for (value, default, expected) in [
            (None, true, true),
            (None, false, false),
            (Some(""), true, true),
            (Some(""), false, false),
            (Some("0"), true, false),
            (Some("0"), false, false),
            (Some("false"), true, false),
            (Some("OFF"), true, false),
            (Some(" no "), true, false),
            (Some("1"), false, true),
            (Some("yes"), true, true),
        ] {
            let got = switch_value(value.map(OsStr::new), default);
            assert_eq!(got, expected, "{value:?}, {default}");
        }
    }

    /// `TCH_VERSION` (what `info` and every provenance report) is the one `versions.env` pins,
    /// which Cargo.toml's `tch = "=..."` must match too (tests/python/test_versions.py).
    #[test]
    fn tch_version_is_the_pinned_one() {
        let env = include_str!("../versions.env");
        let pinned = env
            .lines()
            .find_map(|l| l.strip_prefix("TCH_VERSION="))
            .expect("versions.env pins TCH_VERSION")
            .trim_matches('"');
        assert_eq!(TCH_VERSION, pinned);
        let cargo = include_str!("../Cargo.toml");
        assert!(
            cargo.contains(&format!("tch = \"={pinned}\"")),
            "Cargo.toml pins tch {pinned}"
        );
    }
}
