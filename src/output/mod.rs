//! Outputs: the per-tile feature file, and the files beside it.
//!
//! Every output is written atomically ([`atomic`]): nothing ever appears half-written under
//! its final name. The feature file is written through the [`FeatureWriter`] trait, one
//! implementation per [`format`]: [`csv`], [`h5`], [`parquet`]. The pipeline's formatting
//! threads encode groups of rows with its [`RowEncoder`] in parallel (CSV text; the binary
//! formats encode in the writer), and one writer thread appends them in tile order and commits
//! the file once every row is in. Beside it go the rejected tiles (`rejected.tsv`) and the
//! [`provenance`] record.

pub mod atomic;
pub mod csv;
pub mod format;
pub mod h5;
pub mod inputs;
pub mod lock;
pub mod pair;
pub mod parquet;
pub mod provenance;
pub mod pt;

use std::path::{Path, PathBuf};

use anyhow::Result;

pub use atomic::{stage, write_atomic, AtomicFile, AtomicPath, Staged};
pub use csv::{csv_header, push_csv_field, push_features, CsvWriter};
pub use format::Format;
pub use inputs::refuse_overwriting_inputs;
pub use lock::OutputLock;

use crate::input::coords::{Coords, ToLevel0, ToMicrons};

/// One row of the feature file: a tile's name, its coordinates (as its name gives them) when
/// the file has them, and its vector.
pub struct FeatureRow<'a> {
    pub tile: &'a str,
    pub xy: Option<[f64; 2]>,
    pub features: &'a [f32],
}

/// What a feature file holds besides its rows: their dimension, their coordinates' layout,
/// and (HDF5) what made them.
#[derive(Debug, Clone, Default)]
pub struct FileInfo {
    pub dim: usize,
    /// Some when every row carries x,y.
    pub coords: Option<CoordsInfo>,
    /// Name and value of each attribute an HDF5 file records (encoder, fingerprint, ...).
    pub attrs: Vec<(String, String)>,
}

/// How a file's coordinates are laid out.
#[derive(Debug, Clone)]
pub struct CoordsInfo {
    /// x,y are whole numbers (written as integers).
    pub integral: bool,
    pub convention: String,
    /// Where in the tile the names' x,y point (`top-left`, `centre`) and in what unit
    /// (`level-0 pixels`, `micrometres`), as the provenance says them.
    pub origin: String,
    pub unit: String,
    /// A name's x,y to HDF5's level-0 top-left corners, or why that cannot be done
    /// (micrometres without the slide's mpp; centres of unknown extent).
    pub top_left: std::result::Result<ToLevel0, String>,
    /// A name's x,y to level-0 tile centres (slideflow's `.index.npz`), or why not.
    pub centre: std::result::Result<ToLevel0, String>,
    /// A name's x,y to micrometre top-left corners (STAMP's `coords`), or why not.
    pub microns: std::result::Result<ToMicrons, String>,
    /// `--slide-mpp`: the slide's micrometres per pixel at level 0.
    pub slide_mpp: Option<f64>,
    /// The resolution the tiles were made at, µm/px, when known (a slide's grid).
    pub target_mpp: Option<f64>,
    pub patch_size_level0: Option<u64>,
    /// The tiles' size in pixels at the level they were cut at, when known.
    pub patch_size: Option<u64>,
    pub patch_level: Option<u32>,
}

impl CoordsInfo {
    /// The layout of `coords`; `size_level0` is `--patch-size-level0`, `slide_mpp`
    /// `--slide-mpp`.
    pub fn of(c: &Coords, size_level0: Option<u64>, slide_mpp: Option<f64>) -> CoordsInfo {
        let size = size_level0.or(c.patch_size_level0);
        // A histolab tile cut at level 0 is as large as its extent; QuPath's is its extent over
        // the downsample (1 when the name leaves it out), and at the full resolution (level 0)
        // when that is 1.
        let downsample = c.downsample.unwrap_or(1.0);
        let patch_size = match (size, c.patch_level, c.convention.as_str()) {
            (Some(s), Some(0), "histolab") => Some(s),
            (Some(s), None, "qupath") => (downsample > 0.0
                && (s as f64 / downsample).fract() == 0.0)
                .then(|| (s as f64 / downsample) as u64),
            _ => None,
        };
        let patch_level = match c.convention.as_str() {
            "qupath" if downsample == 1.0 => Some(0),
            _ => c.patch_level,
        };
        CoordsInfo {
            integral: c.integral,
            convention: c.convention.clone(),
            origin: c.origin.as_str().into(),
            unit: c.unit.as_str().into(),
            top_left: crate::input::coords::top_left(c, size, slide_mpp),
            centre: crate::input::coords::centre(c, size, slide_mpp),
            microns: crate::input::coords::microns(c, size, slide_mpp),
            slide_mpp,
            target_mpp: None,
            patch_size_level0: size,
            patch_size,
            patch_level,
        }
    }

    /// The tiles' side in micrometres, when their extent and the slide's mpp are known.
    pub fn tile_size_um(&self) -> Option<f64> {
        Some(self.patch_size_level0? as f64 * self.slide_mpp?)
    }

    /// The slide's magnification at level 0 by the usual convention (10 / mpp: 0.25 um/px is
    /// 40x), and the tiles' (10 / their µm/px when known, else level 0's times their size
    /// over their extent), when known.
    pub fn magnifications(&self) -> (Option<f64>, Option<f64>) {
        let level0 = self.slide_mpp.map(|m| 10.0 / m);
        let target = match (
            self.target_mpp,
            level0,
            self.patch_size,
            self.patch_size_level0,
        ) {
            (Some(t), ..) => Some(10.0 / t),
            (None, Some(m), Some(p), Some(e)) if e > 0 => Some(m * p as f64 / e as f64),
            _ => None,
        };
        (level0, target)
    }
}

/// For formats that encode in the writer thread: nothing to do on the formatting threads.
pub struct NoEncoding;

impl RowEncoder for NoEncoding {
    fn encode(&self, _rows: &[FeatureRow<'_>]) -> Vec<u8> {
        Vec::new()
    }
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
    /// Append a group of rows, and their bytes as [`FeatureWriter::encoder`] made them.
    fn append(&mut self, encoded: &[u8], rows: &[FeatureRow<'_>]) -> Result<()>;
    /// Finish the file (complete and fsynced under its temporary name): it goes under its
    /// final name with its side files, by [`Staged::commit`].
    fn finish(self: Box<Self>) -> Result<(Staged, Committed)>;
}

/// A finished feature file: its SHA-256 (recorded in the provenance, checked by `join`) and
/// size.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    pub sha256: String,
    pub bytes: u64,
    /// The file written with it from the same rows (CLAM's layout: the `.pt` bag).
    pub companion: Option<Box<Committed>>,
}

/// The feature file at `path` in `format`, ready for its rows: fails before any compute when
/// it cannot be written.
/// `warn` gets what the caller should tell the user (a `.pt` bag without its index).
pub fn create_features(
    path: &Path,
    format: Format,
    info: &FileInfo,
    warn: &mut dyn FnMut(String),
) -> Result<Box<dyn FeatureWriter>> {
    Ok(match format {
        Format::Csv => Box::new(CsvWriter::create(path, info)?),
        Format::H5 => {
            if let Some(c) = info
                .coords
                .as_ref()
                .filter(|c| c.patch_size_level0.is_none())
            {
                warn(format!(
                    "{}: the tiles' extent is unknown ({} names do not give it): TRIDENT's \
                     heatmaps and CLAM's patch readers need `patch_size_level0`; give \
                     --patch-size-level0 PX",
                    path.display(),
                    c.convention
                ));
            }
            Box::new(h5::H5Writer::create(path, info, h5::H5Layout::Clam)?)
        }
        Format::Stamp => Box::new(h5::H5Writer::create(path, info, h5::H5Layout::Stamp)?),
        Format::Parquet => Box::new(parquet::ParquetWriter::for_extract(path, info)?),
        Format::Pt => Box::new(pt::PtWriter::create(path, info, warn)?),
        Format::Clam => anyhow::bail!(
            "internal error: CLAM's layout is an HDF5 file and a .pt bag, created one by one"
        ),
    })
}

/// `x.csv` (or `.h5`, `.hdf5`, `.parquet`, `.pt`, any case) -> `x.<suffix>`; other names get
/// `.<suffix>` appended.
pub fn side_file(output: &Path, suffix: &str) -> PathBuf {
    let s = output.to_string_lossy();
    let stem = [".csv", ".h5", ".hdf5", ".parquet", ".pt"]
        .iter()
        .find_map(|ext| {
            let cut = s.len().checked_sub(ext.len())?;
            (s.is_char_boundary(cut) && s[cut..].eq_ignore_ascii_case(ext)).then(|| &s[..cut])
        });
    match stem {
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
        for out in ["a/x.h5", "a/x.HDF5", "a/x.parquet"] {
            assert_eq!(
                provenance_path(Path::new(out)),
                PathBuf::from("a/x.provenance.yaml")
            );
        }
    }
}
