//! What a cached vector is keyed by: the tile's SHA-256 and the [`Fingerprint`] of
//! everything else that changes the numbers (defined in `crate::fingerprint`, which the
//! provenance and `join` share).

use serde::{Deserialize, Serialize};

pub use crate::fingerprint::{Fingerprint, PREPROCESSING_VERSION};

pub type Hash32 = [u8; 32];

/// The key of one cached vector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CacheKey {
    pub tile_sha256: Hash32,
    pub fingerprint: Hash32,
}

/// What `fingerprints/<id>.yaml` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FingerprintRecord {
    pub id: String,
    pub fingerprint: Fingerprint,
    pub last_used: String,
    pub last_used_unix: u64,
}
