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

/// Whether an environment switch (`TILEFEAT_NO_HEAP_TUNING`, `TILEFEAT_CUDNN_BENCHMARK`,
/// `TILEFEAT_CUDA_SLEEP`, `TILEFEAT_CUDA_STREAMS`) is on: set, not empty and not `0`.
pub fn env_on(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The tch crate version this build uses (pinned in Cargo.toml).
pub const TCH_VERSION: &str = "0.24.0";
