//! The fingerprint of a feature vector: everything besides the tile's bytes that changes its
//! numbers (weights or model, layer, pooling, normalization, size, precision, preprocessing
//! version, layout). The cache keys vectors by it, the provenance records it, and `join`
//! refuses to put vectors of different fingerprints in one cohort. Its own module, so that
//! `output` and `join` need not reach into `cache` for it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cli::{Layer, Normalize, Pool, Precision};

/// Bumped whenever decoding or resizing changes in a way that changes pixels.
pub const PREPROCESSING_VERSION: u32 = 1;

/// Everything besides the tile bytes that changes the numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub weights_sha256: String,
    pub layer: Layer,
    pub pool: Pool,
    pub normalize: Normalize,
    pub size: u32,
    pub precision: Precision,
    pub preprocessing_version: u32,
    /// `nchw` when the network ran NCHW (its last bits differ from the NHWC default's by
    /// ~1e-6); absent for NHWC, so the ids of NHWC fingerprints are those they always had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
    /// `torchscript` for a `--model` (whose file's SHA-256 is `weights_sha256`); absent for
    /// the native ResNet50, whose fingerprints keep their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<String>,
    /// `mean=R,G,B std=R,G,B` when the normalization is not one of `--normalize`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_std: Option<String>,
}

impl Fingerprint {
    /// Stable id: SHA-256 of the canonical YAML of the struct.
    pub fn id(&self) -> [u8; 32] {
        let yaml = serde_yaml::to_string(self).expect("fingerprint serializes");
        Sha256::digest(yaml.as_bytes()).into()
    }
}
