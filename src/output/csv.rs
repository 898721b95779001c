//! The feature CSV: the tutorial's format with a named first column, `tile,0,1,...,D-1`, one
//! row per tile, floats in the shortest form that reads back as the same f32 (`ryu`), names
//! quoted as RFC 4180 says; with coordinates, `tile,x,y,0,...` (whole numbers as integers,
//! others in their shortest f64 form). `join` writes the same format with a `sample` column
//! in front.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use sha2::{Digest, Sha256};

use super::{AtomicFile, Committed, FeatureRow, FeatureWriter, FileInfo, RowEncoder, Staged};
use crate::error::{ExitKind, WithKind};

/// Append a CSV field, quoted only if it needs to be (RFC 4180).
pub fn push_csv_field(line: &mut String, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        line.push('"');
        line.push_str(&field.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(field);
    }
}

/// The tutorial's feature CSV, `tile,0,...,D-1`, written by `extract` (see [`FeatureWriter`]).
pub struct CsvWriter {
    path: PathBuf,
    file: AtomicFile,
    /// Of every byte written, for the provenance.
    sha: Sha256,
    bytes: u64,
    xy: bool,
}

impl CsvWriter {
    /// The CSV at `path`, not yet under its final name, with its header written: fails
    /// before any compute when the output cannot be written.
    pub fn create(path: &Path, info: &FileInfo) -> Result<CsvWriter> {
        let xy = info.coords.is_some();
        let mut csv = CsvWriter {
            path: path.to_path_buf(),
            file: AtomicFile::create(path)?,
            sha: Sha256::new(),
            bytes: 0,
            xy,
        };
        let leading: &[&str] = if xy { &["tile", "x", "y"] } else { &["tile"] };
        csv.write(csv_header(leading, info.dim).as_bytes())?;
        Ok(csv)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.sha.update(bytes);
        self.bytes += bytes.len() as u64;
        self.file
            .writer()
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", self.path.display()))
            .kind(ExitKind::Output)
    }
}

/// Append `,x,y`: whole numbers as integers, others in their shortest f64 form.
pub fn push_xy(line: &mut String, [x, y]: [f64; 2]) {
    let mut buf = ryu::Buffer::new();
    for v in [x, y] {
        line.push(',');
        if v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15 {
            line.push_str(&(v as i64).to_string());
        } else {
            line.push_str(buf.format(v));
        }
    }
}

/// CSV text of feature rows: one line per row, the tile's name (quoted where needed), its
/// coordinates when it has them, and its values in the shortest form that reads back as the
/// same f32.
pub struct CsvRows;

impl RowEncoder for CsvRows {
    fn encode(&self, rows: &[FeatureRow<'_>]) -> Vec<u8> {
        let mut text = String::with_capacity(rows.len() * 28 * 1024);
        for r in rows {
            push_csv_field(&mut text, r.tile);
            if let Some(xy) = r.xy {
                push_xy(&mut text, xy);
            }
            push_features(&mut text, r.features);
        }
        text.into_bytes()
    }
}

impl FeatureWriter for CsvWriter {
    fn encoder(&self) -> std::sync::Arc<dyn RowEncoder> {
        std::sync::Arc::new(CsvRows)
    }

    fn append(&mut self, encoded: &[u8], rows: &[FeatureRow<'_>]) -> Result<()> {
        // Every row has coordinates if the header says so, or none has (a bug otherwise).
        anyhow::ensure!(
            rows.iter().all(|r| r.xy.is_some() == self.xy),
            "internal error: rows of {} with and without coordinates",
            self.path.display()
        );
        self.write(encoded)
    }

    fn finish(self: Box<Self>) -> Result<(Staged, Committed)> {
        let CsvWriter {
            file, sha, bytes, ..
        } = *self;
        let staged = file.finish()?;
        let committed = Committed {
            sha256: hex::encode(sha.finalize()),
            bytes,
            companion: None,
        };
        Ok((staged, committed))
    }
}

/// The header `first,0,1,...,dim-1` (possibly with more leading columns).
pub fn csv_header(leading: &[&str], dim: usize) -> String {
    let mut line = leading.join(",");
    for i in 0..dim {
        line.push(',');
        line.push_str(&i.to_string());
    }
    line.push('\n');
    line
}

/// Append `,v0,v1,...` in shortest round-trip form, then a newline.
pub fn push_features(line: &mut String, features: &[f32]) {
    let mut buf = ryu::Buffer::new();
    for &v in features {
        line.push(',');
        if v.is_finite() {
            line.push_str(buf.format_finite(v));
        } else if v.is_nan() {
            line.push_str("NaN");
        } else if v > 0.0 {
            line.push_str("inf");
        } else {
            line.push_str("-inf");
        }
    }
    line.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_and_floats_round_trip() {
        let mut l = String::new();
        push_csv_field(&mut l, "a,\"b\".png");
        push_features(&mut l, &[0.1, -2.5e-8, 3.0, f32::NAN]);
        assert_eq!(l, "\"a,\"\"b\"\".png\",0.1,-2.5e-8,3.0,NaN\n");
        for v in [0.1f32, 1.0 / 3.0, f32::from_bits(5), f32::MAX, 123456.79] {
            let mut l = String::new();
            push_features(&mut l, &[v]);
            let back: f32 = l.trim_start_matches(',').trim().parse().unwrap();
            assert_eq!(back.to_bits(), v.to_bits());
        }
    }
}
