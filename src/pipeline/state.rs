//! What one sample's pipeline hands back: rows written, computed and cached, the tiles
//! skipped and why, where the time went, and the feature file, complete under its temporary
//! name until the sample commits it with its side files. Filled by the model stage
//! (`stage.rs`) and the writer, returned by `run.rs`.

use crate::output::provenance::{Skipped, Timings};
use crate::output::{Committed, Staged};

/// What the pipeline hands back.
#[derive(Default)]
pub struct PipelineState {
    pub written: usize,
    pub computed: usize,
    pub hits: usize,
    pub skipped: Vec<Skipped>,
    pub timings: Timings,
    /// See `Provenance::steady_tiles_per_s`.
    pub steady_tiles_per_s: Option<f64>,
    /// The feature file, complete under its temporary name (None when the run failed).
    pub staged: Option<Staged>,
    pub committed: Committed,
}
