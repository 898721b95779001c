//! The cohort file `join` writes, CSV or Parquet (from its extension): one row per tile,
//! `sample,tile,[x,y,]0..D-1`, or with `--aggregate` one row per sample,
//! `sample,n_tiles,0..D-1`. It appears under its name only once complete.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::read::{Row, Values};
use crate::error::{fail, ExitKind};
use crate::output::csv::push_xy;
use crate::output::parquet::{Columns, ParquetWriter};
use crate::output::{csv_header, push_csv_field, push_features, AtomicFile, Format, Staged};

/// What the cohort file holds.
pub(crate) struct Layout {
    pub dim: usize,
    pub aggregate: bool,
    /// None: no coordinates; Some(integral).
    pub xy: Option<bool>,
    /// A Parquet cohort's key-value metadata (fingerprint, dimension, coordinates' meaning).
    pub metadata: Vec<(String, String)>,
}

/// A cohort file being written.
pub(crate) trait Cohort {
    /// One tile's row.
    fn row(&mut self, sample: &str, row: &Row<'_>, floats: &[f32]) -> Result<()>;
    /// Whether [`Cohort::row`] needs the values as floats (else a CSV's text is copied).
    fn needs_floats(&self) -> bool;
    /// One sample's aggregate row.
    fn aggregate(&mut self, sample: &str, n_tiles: usize, v: &[f32]) -> Result<()>;
    /// The complete file under its temporary name, renamed with its provenance.
    fn finish(self: Box<Self>) -> Result<Staged>;
}

/// The cohort file at `path`, in the format its extension names (CSV or Parquet).
pub(crate) fn create(path: &Path, layout: &Layout) -> Result<Box<dyn Cohort>> {
    match Format::from_path(path) {
        Some(Format::Csv) => Ok(Box::new(CsvCohort::create(path, layout)?)),
        Some(Format::Parquet) => {
            let columns = Columns {
                strings: if layout.aggregate {
                    vec!["sample"]
                } else {
                    vec!["sample", "tile"]
                },
                count: layout.aggregate.then_some("n_tiles"),
                xy_integral: layout.xy.filter(|_| !layout.aggregate),
                dim: layout.dim,
            };
            Ok(Box::new(ParquetWriter::create(
                path,
                columns,
                &layout.metadata,
            )?))
        }
        _ => Err(fail(
            ExitKind::Usage,
            format!(
                "--output {}: a cohort file is .csv or .parquet",
                path.display()
            ),
        )),
    }
}

struct CsvCohort {
    path: PathBuf,
    file: AtomicFile,
    line: String,
}

impl CsvCohort {
    fn create(path: &Path, layout: &Layout) -> Result<CsvCohort> {
        let leading: &[&str] = match (layout.aggregate, layout.xy.is_some()) {
            (true, _) => &["sample", "n_tiles"],
            (false, true) => &["sample", "tile", "x", "y"],
            (false, false) => &["sample", "tile"],
        };
        let mut c = CsvCohort {
            path: path.to_path_buf(),
            file: AtomicFile::create(path)?,
            line: csv_header(leading, layout.dim),
        };
        c.write_line()?;
        Ok(c)
    }

    fn write_line(&mut self) -> Result<()> {
        let r = self.file.writer().write_all(self.line.as_bytes());
        self.line.clear();
        r.map_err(|e| {
            fail(
                ExitKind::Output,
                format!("cannot write {}: {e}", self.path.display()),
            )
        })
    }
}

impl Cohort for CsvCohort {
    fn row(&mut self, sample: &str, row: &Row<'_>, floats: &[f32]) -> Result<()> {
        push_csv_field(&mut self.line, sample);
        self.line.push(',');
        push_csv_field(&mut self.line, row.tile);
        if let Some(xy) = row.xy {
            push_xy(&mut self.line, xy);
        }
        match row.values {
            // Copied as bytes: no float re-formatting.
            Values::Text(text) => {
                self.line.push_str(text);
                self.line.push('\n');
            }
            Values::Floats(_) => push_features(&mut self.line, floats),
        }
        self.write_line()
    }

    fn needs_floats(&self) -> bool {
        false
    }

    fn aggregate(&mut self, sample: &str, n_tiles: usize, v: &[f32]) -> Result<()> {
        push_csv_field(&mut self.line, sample);
        self.line.push_str(&format!(",{n_tiles}"));
        push_features(&mut self.line, v);
        self.write_line()
    }

    fn finish(self: Box<Self>) -> Result<Staged> {
        self.file.finish()
    }
}

impl Cohort for ParquetWriter {
    fn row(&mut self, sample: &str, row: &Row<'_>, floats: &[f32]) -> Result<()> {
        self.push(&[sample, row.tile], None, row.xy, floats)
    }

    fn needs_floats(&self) -> bool {
        true
    }

    fn aggregate(&mut self, sample: &str, n_tiles: usize, v: &[f32]) -> Result<()> {
        self.push(&[sample], Some(n_tiles as i64), None, v)
    }

    fn finish(self: Box<Self>) -> Result<Staged> {
        ParquetWriter::finish(*self).map(|(staged, _)| staged)
    }
}
