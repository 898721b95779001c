//! Reading per-sample feature files for `join`: one [`FeatureReader`] per format, each
//! checking the file's layout against its provenance (dimension, coordinate columns) and
//! giving rows one at a time, so memory does not depend on the file's size. Each also hashes
//! the file's bytes, to be checked against the provenance's `output_sha256`.
//!
//! A CSV's values are handed on as text ([`Values::Text`]) so that a CSV cohort copies them
//! without re-formatting; the binary formats hand on floats.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::Result;
use arrow_array::{Array, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::DataType;
use hdf5::types::VarLenUnicode;
use ndarray::s;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use sha2::{Digest, Sha256};

use crate::error::{fail, ExitKind};
use crate::output::csv_header;

/// Rows read at a time from HDF5 and Parquet.
const BLOCK: usize = 1024;

pub(crate) fn input_err(path: &Path, msg: impl std::fmt::Display) -> anyhow::Error {
    fail(ExitKind::Input, format!("{}: {msg}", path.display()))
}

/// A row's feature values.
pub(crate) enum Values<'a> {
    /// `,v0,v1,...` as a tilefeat CSV holds them (D values, checked).
    Text(&'a str),
    Floats(&'a [f32]),
}

impl Values<'_> {
    /// The values as floats (parsed into `buf` if they are text).
    pub(crate) fn floats<'b>(
        &'b self,
        buf: &'b mut Vec<f32>,
        path: &Path,
        row: usize,
    ) -> Result<&'b [f32]> {
        match self {
            Values::Floats(v) => Ok(v),
            Values::Text(text) => {
                buf.clear();
                // One pass over the bytes: parse a number, expect a comma, repeat. fast-float2
                // gives the same result as str::parse, several times faster.
                let bytes = &text.as_bytes()[1..];
                let mut pos = 0;
                while pos <= bytes.len() && !bytes.is_empty() {
                    let (x, n) = fast_float2::parse_partial::<f32, _>(&bytes[pos..])
                        .ok()
                        .filter(|&(_, n)| matches!(bytes.get(pos + n), Some(b',') | None))
                        .ok_or_else(|| {
                            input_err(
                                path,
                                format!("row {row}: feature {} is not a number", buf.len()),
                            )
                        })?;
                    buf.push(x);
                    pos += n + 1;
                }
                Ok(buf)
            }
        }
    }
}

/// One row of a feature file.
pub(crate) struct Row<'a> {
    pub tile: &'a str,
    pub xy: Option<[f64; 2]>,
    pub values: Values<'a>,
}

/// A feature file read row by row.
pub(crate) trait FeatureReader {
    /// The next row (None at the end).
    fn next_row(&mut self) -> Result<Option<Row<'_>>>;
    /// SHA-256 (hex) and size of the file's bytes, once every row was read.
    fn finish(self: Box<Self>) -> Result<(String, u64)>;
}

/// What a reader checks the file against.
pub(crate) struct Expect {
    pub dim: usize,
    /// The file has coordinates; the value is added to HDF5's top-left corners to give the
    /// names' x,y again (half the tile for a centre convention).
    pub xy: Option<i64>,
}

/// SHA-256 and size of a whole file.
fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(|e| input_err(path, format!("cannot read: {e}")))?;
    let mut sha = Sha256::new();
    let bytes = std::io::copy(&mut f, &mut sha).map_err(|e| input_err(path, e))?;
    Ok((hex::encode(sha.finalize()), bytes))
}

// ---------------------------------------------------------------------------------------- CSV

/// A tilefeat CSV: header `tile,[x,y,]0..D-1`, every record checked for its field count and
/// its final newline (a truncated file is caught); records may span lines inside quotes.
pub(crate) struct CsvReader {
    path: PathBuf,
    r: BufReader<File>,
    sha: Sha256,
    bytes: u64,
    line: String,
    tile: String,
    rows: usize,
    dim: usize,
    xy: bool,
}

impl CsvReader {
    pub(crate) fn open(path: &Path, expect: &Expect) -> Result<CsvReader> {
        let f = File::open(path).map_err(|e| input_err(path, format!("cannot open: {e}")))?;
        let mut r = CsvReader {
            path: path.to_path_buf(),
            r: BufReader::with_capacity(1 << 20, f),
            sha: Sha256::new(),
            bytes: 0,
            line: String::new(),
            tile: String::new(),
            rows: 0,
            dim: expect.dim,
            xy: expect.xy.is_some(),
        };
        r.bytes +=
            read_record(&mut r.r, &mut r.line, &mut r.sha).map_err(|e| input_err(path, e))? as u64;
        let leading: &[&str] = if r.xy { &["tile", "x", "y"] } else { &["tile"] };
        if r.line != csv_header(leading, r.dim) {
            return Err(input_err(
                path,
                format!(
                    "header is not `{},0,...,{}` (a tilefeat CSV with {} features{})",
                    leading.join(","),
                    r.dim - 1,
                    r.dim,
                    if r.xy {
                        " and coordinates, as its provenance says"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(r)
    }
}

impl FeatureReader for CsvReader {
    fn next_row(&mut self) -> Result<Option<Row<'_>>> {
        let n = read_record(&mut self.r, &mut self.line, &mut self.sha)
            .map_err(|e| input_err(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        self.bytes += n as u64;
        self.rows += 1;
        let line_no = self.rows + 1;
        let path = &self.path;
        if !self.line.ends_with('\n') {
            return Err(input_err(
                path,
                format!("line {line_no} is truncated (no newline at end of file)"),
            ));
        }
        let body = self.line.trim_end_matches(['\n', '\r']);
        let (tile, mut rest) = split_first_field(body)
            .ok_or_else(|| input_err(path, format!("line {line_no} is malformed")))?;
        self.tile = tile;
        let mut xy = None;
        if self.xy {
            let mut v = [0.0; 2];
            for (k, name) in ["x", "y"].iter().enumerate() {
                let field = rest.get(1..).unwrap_or("");
                let end = field.find(',').unwrap_or(field.len());
                v[k] = field[..end].parse::<f64>().map_err(|_| {
                    input_err(path, format!("line {line_no}: {name} is not a number"))
                })?;
                rest = &field[end..];
            }
            xy = Some(v);
        }
        let fields = rest.bytes().filter(|&b| b == b',').count();
        if fields != self.dim {
            return Err(input_err(
                path,
                format!(
                    "line {line_no} has {fields} features, expected {}",
                    self.dim
                ),
            ));
        }
        Ok(Some(Row {
            tile: &self.tile,
            xy,
            values: Values::Text(rest),
        }))
    }

    fn finish(self: Box<Self>) -> Result<(String, u64)> {
        Ok((hex::encode(self.sha.finalize()), self.bytes))
    }
}

/// Whether `record` starts with a quoted field that is not closed yet (a tile name with a
/// newline in it, which `extract` writes quoted, continues on the next line).
pub(crate) fn first_field_open(record: &str) -> bool {
    let Some(rest) = record.strip_prefix('"') else {
        return false;
    };
    // Inside the quotes a quote is doubled; the first single one closes the field.
    let mut quotes = rest.bytes().peekable();
    while let Some(b) = quotes.next() {
        if b == b'"' {
            if quotes.peek() == Some(&b'"') {
                quotes.next();
            } else {
                return false;
            }
        }
    }
    true
}

/// Read one CSV record (one line, or more where a quoted tile name holds newlines) into
/// `record`, hashing what was read; returns the bytes read (0 at the end).
pub(crate) fn read_record(
    r: &mut impl BufRead,
    record: &mut String,
    sha: &mut Sha256,
) -> std::io::Result<usize> {
    record.clear();
    let mut n = r.read_line(record)?;
    while n > 0 && record.ends_with('\n') && first_field_open(record) {
        let more = r.read_line(record)?;
        if more == 0 {
            break;
        }
        n += more;
    }
    sha.update(record.as_bytes());
    Ok(n)
}

/// Split one CSV line into its first field (unquoted) and the rest (starting at the comma).
pub(crate) fn split_first_field(line: &str) -> Option<(String, &str)> {
    if let Some(rest) = line.strip_prefix('"') {
        let mut field = String::new();
        let mut chars = rest.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if let Some((_, '"')) = chars.peek() {
                    field.push('"');
                    chars.next();
                } else {
                    return Some((field, &rest[i + 1..]));
                }
            } else {
                field.push(c);
            }
        }
        None
    } else {
        let i = line.find(',')?;
        Some((line[..i].to_string(), &line[i..]))
    }
}

// --------------------------------------------------------------------------------------- HDF5

/// A tilefeat HDF5 file: `features` (N, D) float32, `tiles` (N,) strings, and `coords` (N, 2)
/// int64 when its provenance says it has coordinates.
pub(crate) struct H5Reader {
    path: PathBuf,
    features: hdf5::Dataset,
    tiles: hdf5::Dataset,
    coords: Option<(hdf5::Dataset, i64)>,
    n: usize,
    dim: usize,
    /// The block of rows read last, from row `start`.
    start: usize,
    block_features: Vec<f32>,
    block_tiles: Vec<String>,
    block_xy: Vec<[i64; 2]>,
    next: usize,
}

impl H5Reader {
    pub(crate) fn open(path: &Path, expect: &Expect) -> Result<H5Reader> {
        let bad =
            |what: String| input_err(path, format!("not a tilefeat HDF5 feature file: {what}"));
        let file = hdf5::File::open(path).map_err(|e| bad(format!("cannot open it ({e})")))?;
        let dataset = |name: &str| {
            file.dataset(name)
                .map_err(|_| bad(format!("no dataset `{name}`")))
        };
        let features = dataset("features")?;
        let shape = features.shape();
        if shape.len() != 2 || shape[1] != expect.dim {
            return Err(bad(format!(
                "`features` has shape {shape:?}, expected (N, {})",
                expect.dim
            )));
        }
        if !features.dtype().is_ok_and(|t| t.is::<f32>()) {
            return Err(bad("`features` is not float32".into()));
        }
        let n = shape[0];
        let tiles = dataset("tiles")?;
        if tiles.shape() != [n] {
            return Err(bad(format!(
                "`tiles` has shape {:?}, expected ({n},)",
                tiles.shape()
            )));
        }
        let coords = match expect.xy {
            Some(shift) => {
                let c = dataset("coords")?;
                if c.shape() != [n, 2] || !c.dtype().is_ok_and(|t| t.is::<i64>()) {
                    return Err(bad(format!(
                        "`coords` has shape {:?}, expected ({n}, 2) int64",
                        c.shape()
                    )));
                }
                Some((c, shift))
            }
            None => None,
        };
        Ok(H5Reader {
            path: path.to_path_buf(),
            features,
            tiles,
            coords,
            n,
            dim: expect.dim,
            start: 0,
            block_features: Vec::new(),
            block_tiles: Vec::new(),
            block_xy: Vec::new(),
            next: 0,
        })
    }

    fn read_block(&mut self) -> Result<()> {
        let (a, b) = (self.next, (self.next + BLOCK).min(self.n));
        let err = |e: hdf5::Error| input_err(&self.path, format!("cannot read rows {a}..{b}: {e}"));
        let f = self
            .features
            .read_slice_2d::<f32, _>(s![a..b, ..])
            .map_err(err)?;
        self.block_features = f.iter().copied().collect();
        let t = self
            .tiles
            .read_slice_1d::<VarLenUnicode, _>(s![a..b])
            .map_err(err)?;
        self.block_tiles = t.iter().map(|s| s.as_str().to_string()).collect();
        if let Some((c, _)) = &self.coords {
            let c = c.read_slice_2d::<i64, _>(s![a..b, ..]).map_err(err)?;
            self.block_xy = c.rows().into_iter().map(|r| [r[0], r[1]]).collect();
        }
        self.start = a;
        Ok(())
    }
}

impl FeatureReader for H5Reader {
    fn next_row(&mut self) -> Result<Option<Row<'_>>> {
        if self.next == self.n {
            return Ok(None);
        }
        if self.next == self.start + self.block_tiles.len() || self.block_tiles.is_empty() {
            self.read_block()?;
        }
        let k = self.next - self.start;
        self.next += 1;
        let xy = self.coords.as_ref().map(|(_, shift)| {
            let [x, y] = self.block_xy[k];
            [(x + shift) as f64, (y + shift) as f64]
        });
        Ok(Some(Row {
            tile: &self.block_tiles[k],
            xy,
            values: Values::Floats(&self.block_features[k * self.dim..(k + 1) * self.dim]),
        }))
    }

    fn finish(self: Box<Self>) -> Result<(String, u64)> {
        hash_file(&self.path)
    }
}

// ------------------------------------------------------------------------------------ Parquet

/// A tilefeat Parquet file: `tile`, [`x`, `y`,] `0`..`D-1` float32.
pub(crate) struct ParquetReader {
    path: PathBuf,
    batches: ParquetRecordBatchReader,
    batch: Option<RecordBatch>,
    row: usize,
    xy: bool,
    dim: usize,
    tile: String,
    /// The batch's features, row by row (transposed once per batch from its columns).
    values: Vec<f32>,
}

impl ParquetReader {
    pub(crate) fn open(path: &Path, expect: &Expect) -> Result<ParquetReader> {
        let bad =
            |what: String| input_err(path, format!("not a tilefeat Parquet feature file: {what}"));
        let f = File::open(path).map_err(|e| input_err(path, format!("cannot open: {e}")))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| bad(format!("cannot read it ({e})")))?;
        let schema = builder.schema().clone();
        let xy = expect.xy.is_some();
        let mut want: Vec<(String, Vec<DataType>)> = vec![("tile".into(), vec![DataType::Utf8])];
        if xy {
            for n in ["x", "y"] {
                want.push((n.into(), vec![DataType::Int64, DataType::Float64]));
            }
        }
        want.extend((0..expect.dim).map(|k| (k.to_string(), vec![DataType::Float32])));
        let fields = schema.fields();
        if fields.len() != want.len()
            || fields
                .iter()
                .zip(&want)
                .any(|(f, (name, types))| f.name() != name || !types.contains(f.data_type()))
        {
            return Err(bad(format!(
                "its columns are not `tile`,{} `0`..`{}` (float32) ({} columns found)",
                if xy { " `x`, `y`," } else { "" },
                expect.dim - 1,
                fields.len()
            )));
        }
        let batches = builder
            .with_batch_size(BLOCK)
            .build()
            .map_err(|e| bad(format!("cannot read it ({e})")))?;
        Ok(ParquetReader {
            path: path.to_path_buf(),
            batches,
            batch: None,
            row: 0,
            xy,
            dim: expect.dim,
            tile: String::new(),
            values: Vec::new(),
        })
    }
}

fn number(col: &dyn Array, row: usize) -> Option<f64> {
    let any = col.as_any();
    if let Some(a) = any.downcast_ref::<Int64Array>() {
        return Some(a.value(row) as f64);
    }
    any.downcast_ref::<Float64Array>().map(|a| a.value(row))
}

impl ParquetReader {
    /// The next batch with rows, its features transposed into `values`; false at the end.
    fn next_batch(&mut self) -> Result<bool> {
        let path = self.path.clone();
        let err = |e: &dyn std::fmt::Display| input_err(&path, format!("cannot read rows: {e}"));
        loop {
            let Some(b) = self.batches.next() else {
                return Ok(false);
            };
            let b = b.map_err(|e| err(&e))?;
            if b.num_rows() == 0 {
                continue;
            }
            if b.columns().iter().any(|c| c.null_count() > 0) {
                return Err(input_err(&path, "has missing (null) values"));
            }
            let (n, dim) = (b.num_rows(), self.dim);
            let first = if self.xy { 3 } else { 1 };
            self.values.clear();
            self.values.resize(n * dim, 0.0);
            for k in 0..dim {
                let col = b.column(first + k).as_any().downcast_ref::<Float32Array>();
                let col = col.ok_or_else(|| err(&"a feature column is not float32"))?;
                for (r, &v) in col.values().iter().enumerate() {
                    self.values[r * dim + k] = v;
                }
            }
            self.batch = Some(b);
            self.row = 0;
            return Ok(true);
        }
    }
}

impl FeatureReader for ParquetReader {
    fn next_row(&mut self) -> Result<Option<Row<'_>>> {
        if self.batch.as_ref().is_none_or(|b| self.row == b.num_rows()) && !self.next_batch()? {
            return Ok(None);
        }
        let b = self.batch.as_ref().expect("a batch with rows left");
        let r = self.row;
        self.row += 1;
        let tiles = b.column(0).as_any().downcast_ref::<StringArray>();
        let tiles = tiles.ok_or_else(|| input_err(&self.path, "`tile` is not text"))?;
        self.tile.clear();
        self.tile.push_str(tiles.value(r));
        let xy = if self.xy {
            let x = number(b.column(1).as_ref(), r);
            let y = number(b.column(2).as_ref(), r);
            Some([x.unwrap_or_default(), y.unwrap_or_default()])
        } else {
            None
        };
        let dim = self.dim;
        Ok(Some(Row {
            tile: &self.tile,
            xy,
            values: Values::Floats(&self.values[r * dim..(r + 1) * dim]),
        }))
    }

    fn finish(self: Box<Self>) -> Result<(String, u64)> {
        hash_file(&self.path)
    }
}
