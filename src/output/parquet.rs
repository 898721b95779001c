//! Parquet feature files: columns `tile` (string), `x`, `y` (int64, or float64 for
//! fractional coordinates such as micrometres) when the tile names give coordinates, then
//! `0`..`D-1` as float32, zstd-compressed, in the CSV's row order, so that
//! `pandas.read_parquet(p).set_index("tile")` holds the CSV's values. Rows are written in row
//! groups of [`row_group_rows`] (4,096 rows, fewer for rows wider than 2,048 floats: at most
//! 32 MiB of features) as they come (memory does not grow with the tile count). `join`
//! writes the same layout with a `sample` column in front ([`Columns`]).

use std::io::Write;
use std::sync::Arc;

use anyhow::Result;
use arrow_array::builder::{Float32Builder, Float64Builder, Int64Builder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use sha2::{Digest, Sha256};

use super::{
    AtomicFile, Committed, FeatureRow, FeatureWriter, FileInfo, NoEncoding, RowEncoder, Staged,
};
use crate::error::{fail, ExitKind};

/// Rows per row group at most: 4,096 rows of 2,048 float32 are 32 MiB before compression.
pub const ROW_GROUP: usize = 4096;

/// Bytes of features a row group holds at most (in memory while it fills).
const ROW_GROUP_BYTES: usize = 32 << 20;

/// Rows per row group for rows of `dim` floats: at most [`ROW_GROUP`], and at most
/// [`ROW_GROUP_BYTES`] of features (65,536 floats a row: 128 rows, not 1 GiB).
pub fn row_group_rows(dim: usize) -> usize {
    (ROW_GROUP_BYTES / (4 * dim.max(1))).clamp(1, ROW_GROUP)
}

/// The columns of a Parquet feature file: leading string columns (`tile`; `join` puts
/// `sample` first), an optional int64 count (`n_tiles`, for `join --aggregate`), optional
/// `x`,`y`, then the features.
#[derive(Debug, Clone)]
pub struct Columns {
    pub strings: Vec<&'static str>,
    pub count: Option<&'static str>,
    /// None: no coordinates; Some(true): int64 x,y; Some(false): float64 x,y.
    pub xy_integral: Option<bool>,
    pub dim: usize,
}

impl Columns {
    pub fn schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .strings
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, false))
            .collect();
        if let Some(n) = self.count {
            fields.push(Field::new(n, DataType::Int64, false));
        }
        if let Some(integral) = self.xy_integral {
            let t = if integral {
                DataType::Int64
            } else {
                DataType::Float64
            };
            fields.push(Field::new("x", t.clone(), false));
            fields.push(Field::new("y", t, false));
        }
        fields.extend((0..self.dim).map(|k| Field::new(k.to_string(), DataType::Float32, false)));
        Arc::new(Schema::new(fields))
    }
}

/// The bytes written, hashed as they go, into the atomic file.
struct Hashing {
    file: AtomicFile,
    sha: Sha256,
    bytes: u64,
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.writer().write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.writer().flush()
    }
}

/// Rows gathered into column builders until a row group is full.
pub struct ParquetWriter {
    path: std::path::PathBuf,
    columns: Columns,
    schema: SchemaRef,
    writer: ArrowWriter<Hashing>,
    pending: Pending,
}

/// Builders for the rows not yet handed to the Parquet writer.
struct Pending {
    strings: Vec<StringBuilder>,
    count: Int64Builder,
    xi: Int64Builder,
    yi: Int64Builder,
    xf: Float64Builder,
    yf: Float64Builder,
    features: Vec<Float32Builder>,
    rows: usize,
}

impl Pending {
    fn new(c: &Columns) -> Pending {
        Pending {
            strings: c.strings.iter().map(|_| StringBuilder::new()).collect(),
            count: Int64Builder::new(),
            xi: Int64Builder::new(),
            yi: Int64Builder::new(),
            xf: Float64Builder::new(),
            yf: Float64Builder::new(),
            features: (0..c.dim)
                .map(|_| Float32Builder::with_capacity(row_group_rows(c.dim)))
                .collect(),
            rows: 0,
        }
    }

    fn batch(&mut self, c: &Columns, schema: &SchemaRef) -> RecordBatch {
        let mut cols: Vec<ArrayRef> = self
            .strings
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        if c.count.is_some() {
            cols.push(Arc::new(self.count.finish()));
        }
        match c.xy_integral {
            Some(true) => {
                cols.push(Arc::new(self.xi.finish()));
                cols.push(Arc::new(self.yi.finish()));
            }
            Some(false) => {
                cols.push(Arc::new(self.xf.finish()));
                cols.push(Arc::new(self.yf.finish()));
            }
            None => {}
        }
        cols.extend(
            self.features
                .iter_mut()
                .map(|b| Arc::new(b.finish()) as ArrayRef),
        );
        self.rows = 0;
        RecordBatch::try_new(schema.clone(), cols).expect("columns match the schema")
    }
}

/// The writer's settings; `metadata` goes into the file's key-value metadata (what made the
/// features, and what the coordinates mean), which `pyarrow.parquet.read_metadata(p).metadata`
/// returns.
fn properties(metadata: &[(String, String)], dim: usize) -> WriterProperties {
    let kv = metadata
        .iter()
        .map(|(k, v)| parquet::file::metadata::KeyValue::new(format!("tilefeat.{k}"), v.clone()))
        .collect::<Vec<_>>();
    WriterProperties::builder()
        .set_key_value_metadata((!kv.is_empty()).then_some(kv))
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_size(row_group_rows(dim))
        // Features are not repeated values: dictionaries and statistics only cost space.
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::None)
        .build()
}

impl ParquetWriter {
    pub fn create(
        path: &std::path::Path,
        columns: Columns,
        metadata: &[(String, String)],
    ) -> Result<ParquetWriter> {
        let schema = columns.schema();
        let sink = Hashing {
            file: AtomicFile::create(path)?,
            sha: Sha256::new(),
            bytes: 0,
        };
        let writer = ArrowWriter::try_new(
            sink,
            schema.clone(),
            Some(properties(metadata, columns.dim)),
        )
        .map_err(|e| perr(path, e))?;
        Ok(ParquetWriter {
            path: path.to_path_buf(),
            pending: Pending::new(&columns),
            columns,
            schema,
            writer,
        })
    }

    /// For `extract`: `tile`, coordinates if the sample has them, features.
    pub fn for_extract(path: &std::path::Path, info: &FileInfo) -> Result<ParquetWriter> {
        let columns = Columns {
            strings: vec!["tile"],
            count: None,
            xy_integral: info.coords.as_ref().map(|c| c.integral),
            dim: info.dim,
        };
        let mut metadata = info.attrs.clone();
        metadata.push(("feature_dim".into(), info.dim.to_string()));
        if let Some(c) = &info.coords {
            metadata.extend([
                ("coords_convention".to_string(), c.convention.clone()),
                ("coords_origin".to_string(), c.origin.clone()),
                ("coords_unit".to_string(), c.unit.clone()),
            ]);
        }
        ParquetWriter::create(path, columns, &metadata)
    }

    /// One row: the string columns' values, the count (if the file has one), x,y (if it has
    /// them) and the features.
    pub fn push(
        &mut self,
        strings: &[&str],
        count: Option<i64>,
        xy: Option<[f64; 2]>,
        features: &[f32],
    ) -> Result<()> {
        let p = &mut self.pending;
        for (b, v) in p.strings.iter_mut().zip(strings) {
            b.append_value(v);
        }
        if self.columns.count.is_some() {
            p.count.append_value(count.unwrap_or_default());
        }
        if let Some(integral) = self.columns.xy_integral {
            let [x, y] = xy.ok_or_else(|| {
                fail(
                    ExitKind::Internal,
                    format!(
                        "internal error: a row of {} without coordinates",
                        self.path.display()
                    ),
                )
            })?;
            if integral {
                p.xi.append_value(x as i64);
                p.yi.append_value(y as i64);
            } else {
                p.xf.append_value(x);
                p.yf.append_value(y);
            }
        }
        for (b, &v) in p.features.iter_mut().zip(features) {
            b.append_value(v);
        }
        p.rows += 1;
        if p.rows == row_group_rows(self.columns.dim) {
            self.flush_rows()?;
        }
        Ok(())
    }

    fn flush_rows(&mut self) -> Result<()> {
        if self.pending.rows == 0 {
            return Ok(());
        }
        let batch = self.pending.batch(&self.columns, &self.schema);
        self.writer.write(&batch).map_err(|e| perr(&self.path, e))
    }

    /// Finish the file, complete under its temporary name until [`Staged::commit`].
    pub fn finish(mut self) -> Result<(Staged, Committed)> {
        self.flush_rows()?;
        let path = self.path.clone();
        let Hashing { file, sha, bytes } = self.writer.into_inner().map_err(|e| perr(&path, e))?;
        let staged = file.finish()?;
        let committed = Committed {
            sha256: hex::encode(sha.finalize()),
            bytes,
            companion: None,
        };
        Ok((staged, committed))
    }
}

fn perr(path: &std::path::Path, e: impl std::fmt::Display) -> anyhow::Error {
    fail(
        ExitKind::Output,
        format!("cannot write Parquet file {}: {e}", path.display()),
    )
}

impl FeatureWriter for ParquetWriter {
    fn encoder(&self) -> Arc<dyn RowEncoder> {
        Arc::new(NoEncoding)
    }

    fn append(&mut self, _encoded: &[u8], rows: &[FeatureRow<'_>]) -> Result<()> {
        for r in rows {
            self.push(&[r.tile], None, r.xy, r.features)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(Staged, Committed)> {
        ParquetWriter::finish(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_are_bounded_in_bytes() {
        assert_eq!(row_group_rows(2048), ROW_GROUP);
        assert_eq!(row_group_rows(16), ROW_GROUP);
        assert_eq!(row_group_rows(65_536), 128);
        assert_eq!(row_group_rows(10_000_000), 1);
        for dim in [1, 2048, 4096, 65_536] {
            assert!(row_group_rows(dim) * dim * 4 <= ROW_GROUP_BYTES);
        }
    }
}
