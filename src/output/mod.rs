//! Outputs: the per-tile feature file, and the files beside it.
//!
//! Every output is written atomically ([`atomic`]): nothing ever appears half-written under
//! its final name. The feature file is written through the [`FeatureWriter`] trait, one
//! implementation per format ([`csv`] today): the pipeline's formatting threads encode groups
//! of rows with its [`RowEncoder`] in parallel, and one writer thread appends them in tile
//! order and commits the file once every row is in. Beside it go the rejected tiles
//! (`rejected.tsv`) and the [`provenance`] record.

pub mod atomic;
pub mod csv;
pub mod lock;
pub mod provenance;

use std::path::{Path, PathBuf};

use anyhow::Result;

pub use atomic::{write_atomic, AtomicFile};
pub use csv::{csv_header, push_csv_field, push_features, CsvWriter};
pub use lock::OutputLock;

/// One row of the feature file: a tile's name and its vector.
pub struct FeatureRow<'a> {
    pub tile: &'a str,
    pub features: &'a [f32],
}

/// Turns groups of rows into a format's bytes; shared by the formatting threads.
pub trait RowEncoder: Send + Sync {
    fn encode(&self, rows: &[FeatureRow<'_>]) -> Vec<u8>;
}

/// A feature file being written: encoded groups appended in tile order, then committed
/// (it appears under its final name only then; dropped uncommitted, it leaves nothing).
pub trait FeatureWriter: Send {
    /// How groups of rows are encoded for [`FeatureWriter::append`].
    fn encoder(&self) -> std::sync::Arc<dyn RowEncoder>;
    /// Append a group's encoded rows.
    fn append(&mut self, encoded: &[u8]) -> Result<()>;
    /// Finish the file and move it under its final name.
    fn commit(self: Box<Self>) -> Result<Committed>;
}

/// A feature file in place: its SHA-256 (recorded in the provenance, checked by `join`) and
/// size.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    pub sha256: String,
    pub bytes: u64,
}

/// The feature file at `path` for rows of `dim` values, ready for its rows.
pub fn create_features(path: &Path, dim: usize) -> Result<Box<dyn FeatureWriter>> {
    Ok(Box::new(CsvWriter::create(path, dim)?))
}

/// `x.csv` -> `x.<suffix>`; other names get `.<suffix>` appended.
pub fn side_file(output: &Path, suffix: &str) -> PathBuf {
    let s = output.to_string_lossy();
    match s.strip_suffix(".csv").or_else(|| s.strip_suffix(".CSV")) {
        Some(stem) => PathBuf::from(format!("{stem}.{suffix}")),
        None => PathBuf::from(format!("{s}.{suffix}")),
    }
}

pub fn provenance_path(output: &Path) -> PathBuf {
    side_file(output, "provenance.yaml")
}

pub fn rejected_path(output: &Path) -> PathBuf {
    side_file(output, "rejected.tsv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_files() {
        assert_eq!(
            provenance_path(Path::new("a/x.csv")),
            PathBuf::from("a/x.provenance.yaml")
        );
        assert_eq!(
            rejected_path(Path::new("x.tsv")),
            PathBuf::from("x.tsv.rejected.tsv")
        );
    }
}
