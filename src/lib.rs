//! tilefeat: per-tile ResNet50 deep features for computational pathology.
//!
//! The library behind the `tilefeat` binary; see ARCHITECTURE.md for the codemap and the
//! invariants each module keeps.

pub mod alloc;
pub mod app;
pub mod batch;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod decode;
pub mod device;
pub mod error;
pub mod extract;
pub mod join;
pub mod model;
pub mod output;
pub mod pickle;
pub mod progress;
pub mod provenance;
pub mod resize;
pub mod tiles;
pub mod weights;

/// Whether an environment switch that is off by default (`TILEFEAT_NO_HEAP_TUNING`,
/// `TILEFEAT_CUDNN_BENCHMARK`, `TILEFEAT_CUDA_SLEEP`) is on: set, not empty and not `0`.
pub fn env_on(name: &str) -> bool {
    env_switch(name, false)
}

/// An environment switch: `0` turns it off, any other non-empty value on; unset or empty
/// leaves `default` (`TILEFEAT_CUDA_STREAMS` is on by default).
pub fn env_switch(name: &str, default: bool) -> bool {
    match std::env::var_os(name) {
        Some(v) if !v.is_empty() => v != "0",
        _ => default,
    }
}

/// The tch crate version this build uses (pinned in Cargo.toml).
pub const TCH_VERSION: &str = "0.24.0";

#[cfg(test)]
mod tests {
    use super::*;

    /// `0` is off and anything else on, whatever the default; unset or empty keeps it (the
    /// streams switch is on by default, the others off).
    #[test]
    fn switches_read_zero_as_off_and_keep_their_default_when_unset() {
        let name = "TILEFEAT_TEST_SWITCH_ONLY_IN_THIS_TEST";
        for (value, default, expected) in [
            (None, true, true),
            (None, false, false),
            (Some(""), true, true),
            (Some(""), false, false),
            (Some("0"), true, false),
            (Some("0"), false, false),
            (Some("1"), false, true),
            (Some("yes"), true, true),
        ] {
            match value {
                Some(v) => std::env::set_var(name, v),
                None => std::env::remove_var(name),
            }
            assert_eq!(env_switch(name, default), expected, "{value:?}, {default}");
        }
        std::env::remove_var(name);
        assert!(!env_on(name));
    }
}
