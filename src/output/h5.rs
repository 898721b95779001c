//! HDF5 feature files, laid out as CLAM's and TRIDENT's feature loaders read them:
//! `features` float32 (N, D), `coords` int64 (N, 2) level-0 top-left corners (when the tile
//! names give them), `tiles` (N,) UTF-8 strings, all in the CSV's row order. The file's
//! attributes say what made the features (encoder, layer, pooling, fingerprint, weights,
//! tilefeat version, sample); `coords` carries `patch_size`, `patch_level` and
//! `patch_size_level0` where the names give them, as CLAM's and TRIDENT's writers do.
//!
//! The datasets are chunked and grow as rows come, so memory does not depend on the tile
//! count. libhdf5 writes a temporary file beside the output; it is closed, fsynced, hashed
//! and renamed over the final name only when every row is in ([`AtomicPath`]).

use std::str::FromStr;

use anyhow::{Context, Result};
use hdf5::types::VarLenUnicode;
use ndarray::{s, ArrayView1, ArrayView2};

use super::atomic::AtomicPath;
use super::{Committed, FeatureRow, FeatureWriter, FileInfo, NoEncoding, RowEncoder, Staged};
use crate::error::{fail, ExitKind};

/// Rows per chunk of `tiles` and `coords` (a few bytes a row).
const CHUNK_ROWS: usize = 64;

/// Bytes a chunk of `features` aims at. libhdf5 allocates whole chunks, so a sample's file
/// is at least one chunk: at 64 KiB, 5 tiles of 2,048 floats take one chunk of 8 rows rather
/// than one of 64 rows (512 KiB, five times the CSV); a wide row gets a chunk of its own.
const CHUNK_BYTES: usize = 64 << 10;

/// Rows per chunk of `features` for rows of `dim` floats: [`CHUNK_BYTES`] worth, at least
/// one row, at most 1,024.
fn feature_chunk_rows(dim: usize) -> usize {
    (CHUNK_BYTES / (4 * dim.max(1))).clamp(1, 1024)
}

pub struct H5Writer {
    target: AtomicPath,
    file: Option<hdf5::File>,
    features: hdf5::Dataset,
    coords: Option<(hdf5::Dataset, i64)>,
    tiles: hdf5::Dataset,
    dim: usize,
    rows: usize,
}

fn h5err(path: &std::path::Path) -> impl Fn(hdf5::Error) -> anyhow::Error + '_ {
    move |e| {
        fail(
            ExitKind::Output,
            format!("cannot write HDF5 file {}: {e}", path.display()),
        )
    }
}

fn str_attr(loc: &hdf5::Location, name: &str, value: &str) -> hdf5::Result<()> {
    let v = VarLenUnicode::from_str(value).map_err(|e| hdf5::Error::from(e.to_string()))?;
    loc.new_attr::<VarLenUnicode>()
        .create(name)?
        .write_scalar(&v)
}

fn int_attr(loc: &hdf5::Location, name: &str, value: i64) -> hdf5::Result<()> {
    loc.new_attr::<i64>().create(name)?.write_scalar(&value)
}

impl H5Writer {
    /// The HDF5 file at `path` (a temporary beside it until committed), with its datasets and
    /// attributes made: fails before any compute when it cannot be written, or when the tile
    /// names' coordinates cannot be made level-0 top-left pixels.
    pub fn create(path: &std::path::Path, info: &FileInfo) -> Result<H5Writer> {
        let shift = match &info.coords {
            Some(c) => Some(c.top_left_shift.clone().map_err(|why| {
                fail(
                    ExitKind::Input,
                    format!("cannot write {} as HDF5: {why}", path.display()),
                )
            })?),
            None => None,
        };
        let target = AtomicPath::create(path)?;
        let err = h5err(path);
        let file = hdf5::File::create(target.tmp()).map_err(&err)?;
        let dim = info.dim;
        let features = file
            .new_dataset::<f32>()
            .chunk((feature_chunk_rows(dim), dim.max(1)))
            .shape((0.., dim))
            .create("features")
            .map_err(&err)?;
        let tiles = file
            .new_dataset::<VarLenUnicode>()
            .chunk(CHUNK_ROWS)
            .shape(0..)
            .create("tiles")
            .map_err(&err)?;
        let coords = match (&info.coords, shift) {
            (Some(c), Some(shift)) => {
                let ds = file
                    .new_dataset::<i64>()
                    .chunk((CHUNK_ROWS, 2))
                    .shape((0.., 2))
                    .create("coords")
                    .map_err(&err)?;
                let size = c.patch_size_level0;
                for (name, value) in [
                    ("patch_size", c.patch_size),
                    ("patch_size_level0", size),
                    ("patch_level", c.patch_level.map(u64::from)),
                ] {
                    if let Some(v) = value {
                        int_attr(&ds, name, v as i64).map_err(&err)?;
                    }
                }
                str_attr(&ds, "convention", &c.convention).map_err(&err)?;
                str_attr(&ds, "origin", "top-left, level-0 pixels").map_err(&err)?;
                Some((ds, shift))
            }
            _ => None,
        };
        for (name, value) in &info.attrs {
            str_attr(&file, name, value).map_err(&err)?;
        }
        int_attr(&file, "feature_dim", dim as i64).map_err(&err)?;
        Ok(H5Writer {
            target,
            file: Some(file),
            features,
            coords,
            tiles,
            dim,
            rows: 0,
        })
    }
}

impl FeatureWriter for H5Writer {
    fn encoder(&self) -> std::sync::Arc<dyn RowEncoder> {
        std::sync::Arc::new(NoEncoding)
    }

    fn append(&mut self, _encoded: &[u8], rows: &[FeatureRow<'_>]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let path = self.target.target().to_path_buf();
        let err = h5err(&path);
        let (start, end) = (self.rows, self.rows + rows.len());
        let mut values = Vec::with_capacity(rows.len() * self.dim);
        let mut names = Vec::with_capacity(rows.len());
        for r in rows {
            values.extend_from_slice(r.features);
            names.push(VarLenUnicode::from_str(r.tile).map_err(|e| {
                fail(
                    ExitKind::Output,
                    format!("tile name {:?} cannot be stored in HDF5: {e}", r.tile),
                )
            })?);
        }
        self.features.resize((end, self.dim)).map_err(&err)?;
        let view = ArrayView2::from_shape((rows.len(), self.dim), &values).expect("rows x dim");
        self.features
            .write_slice(view, s![start..end, ..])
            .map_err(&err)?;
        self.tiles.resize(end).map_err(&err)?;
        self.tiles
            .write_slice(ArrayView1::from(&names), s![start..end])
            .map_err(&err)?;
        if let Some((ds, shift)) = &self.coords {
            let mut xy = Vec::with_capacity(rows.len() * 2);
            for r in rows {
                let [x, y] = r.xy.context("internal error: a row without coordinates")?;
                xy.extend([x as i64 - shift, y as i64 - shift]);
            }
            ds.resize((end, 2)).map_err(&err)?;
            let view = ArrayView2::from_shape((rows.len(), 2), &xy).expect("rows x 2");
            ds.write_slice(view, s![start..end, ..]).map_err(&err)?;
        }
        self.rows = end;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(Staged, Committed)> {
        let file = self.file.take().expect("finish once");
        let path = self.target.target().to_path_buf();
        // Every handle closed before the file is: libhdf5 flushes it then.
        let H5Writer {
            target,
            features,
            coords,
            tiles,
            ..
        } = *self;
        drop((features, coords, tiles));
        file.close()
            .map_err(h5err(&path))
            .with_context(|| format!("cannot close {}", path.display()))?;
        target.finish()
    }
}
