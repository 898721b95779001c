//! tilefeat: per-tile ResNet50 deep features for computational pathology.
//!
//! The library behind the `tilefeat` binary; see ARCHITECTURE.md for the codemap and the
//! invariants each module keeps.

pub mod alloc;
pub mod app;
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

/// The tch crate version this build uses (pinned in Cargo.toml).
pub const TCH_VERSION: &str = "0.24.0";
