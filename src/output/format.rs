//! Which format a feature file is written in: from `--format`, else from the output's
//! extension (`.csv`, `.h5`/`.hdf5`, `.parquet`, `.pt`); any other extension is a usage
//! error, so a file named `.h5` never holds CSV text. Two formats are a tool's layout rather
//! than an extension: `stamp` (an `.h5` file in STAMP's layout) and `clam` (CLAM's folders,
//! `h5_files/` and `pt_files/`, under `--outdir`).

use std::path::Path;

use clap::ValueEnum;

/// A feature file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The tutorial's CSV: `tile,[x,y,]0..D-1`.
    Csv,
    /// HDF5 as CLAM and TRIDENT read it: `features` (N, D) float32, `coords` (N, 2) int64,
    /// `tiles` (N,) strings.
    #[value(alias = "hdf5")]
    H5,
    /// Parquet: `tile`, [`x`, `y`,] `0`..`D-1` float32, zstd.
    Parquet,
    /// A `torch.save` bag for CLAM and slideflow: one float32 (N, D) tensor, with
    /// `NAME.index.npz` (level-0 tile centres) beside it when the tiles have coordinates.
    Pt,
    /// HDF5 as STAMP reads it (`.h5`): `feats` (= `features`), `coords` in micrometres,
    /// `feat_type`, `unit`, `tile_size_um`; needs --slide-mpp unless the names give
    /// micrometres.
    Stamp,
    /// CLAM's layout under --outdir: `h5_files/SAMPLE.h5` and `pt_files/SAMPLE.pt`, both
    /// from one computation.
    Clam,
}

impl Format {
    /// The format an output's extension names (any case), or None.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "h5" | "hdf5" => Some(Format::H5),
            "parquet" => Some(Format::Parquet),
            "pt" => Some(Format::Pt),
            _ => None,
        }
    }

    /// The extension `--outdir` names files with (CLAM's layout: its HDF5 file's).
    pub fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::H5 | Format::Stamp | Format::Clam => "h5",
            Format::Parquet => "parquet",
            Format::Pt => "pt",
        }
    }

    /// The name `--format` takes and the provenance records.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Stamp => "stamp",
            Format::Clam => "clam",
            f => f.extension(),
        }
    }
}

/// The format of `output`: `--format` when given (it must agree with a known extension), else
/// the extension. The error is the message for a usage error.
pub fn resolve(output: &Path, flag: Option<Format>) -> Result<Format, String> {
    match (Format::from_path(output), flag) {
        (_, Some(Format::Clam)) => Err(format!(
            "--format clam writes CLAM's folders (h5_files/SAMPLE.h5 and pt_files/SAMPLE.pt): \
             give --outdir DIR instead of --output {}",
            output.display()
        )),
        (Some(Format::H5), Some(Format::Stamp)) => Ok(Format::Stamp),
        (Some(ext), Some(f)) if ext != f => Err(format!(
            "--output {} names a {} file but --format is {}",
            output.display(),
            ext.as_str(),
            f.as_str()
        )),
        (Some(ext), _) => Ok(ext),
        (None, Some(f)) => Ok(f),
        (None, None) => Err(format!(
            "--output {}: unknown feature file extension; use .csv, .h5 (or .hdf5), .parquet \
             or .pt (or give --format csv|h5|parquet|pt|stamp)",
            output.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_extensions() {
        for (p, f) in [
            ("a.csv", Format::Csv),
            ("a.CSV", Format::Csv),
            ("d/a.h5", Format::H5),
            ("a.HDF5", Format::H5),
            ("a.parquet", Format::Parquet),
            ("a.PT", Format::Pt),
        ] {
            assert_eq!(resolve(Path::new(p), None), Ok(f), "{p}");
        }
        // An unknown extension is taken with --format naming the format (documented).
        assert_eq!(
            resolve(Path::new("a.txt"), Some(Format::Csv)),
            Ok(Format::Csv)
        );
        assert!(resolve(Path::new("a.txt"), None)
            .unwrap_err()
            .contains("unknown"));
        assert!(resolve(Path::new("a"), None).is_err());
        assert_eq!(resolve(Path::new("a"), Some(Format::H5)), Ok(Format::H5));
        // `--format hdf5` as `.hdf5` is accepted (regression: only `h5` was).
        assert_eq!(Format::from_str("hdf5", true), Ok(Format::H5));
        let e = resolve(Path::new("a.csv"), Some(Format::Parquet)).unwrap_err();
        assert!(e.contains("--format is parquet"), "{e}");
        // STAMP's layout is an HDF5 file; CLAM's is folders, only under --outdir.
        assert_eq!(
            resolve(Path::new("a.h5"), Some(Format::Stamp)),
            Ok(Format::Stamp)
        );
        assert_eq!(
            resolve(Path::new("a"), Some(Format::Stamp)),
            Ok(Format::Stamp)
        );
        let e = resolve(Path::new("a.csv"), Some(Format::Stamp)).unwrap_err();
        assert!(e.contains("--format is stamp"), "{e}");
        let e = resolve(Path::new("a.h5"), Some(Format::Clam)).unwrap_err();
        assert!(e.contains("--outdir"), "{e}");
    }
}
