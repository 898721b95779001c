//! HDF5 feature files, in one of two layouts ([`H5Layout`]).
//!
//! CLAM's and TRIDENT's (`.h5`, the default): `features` float32 (N, D), `coords` int64 (N, 2)
//! level-0 top-left corners (when the tile names give them), `tiles` (N,) UTF-8 strings, all
//! in the CSV's row order. `coords` carries what their readers use where it is known:
//! `patch_size`, `patch_level`, `patch_size_level0`, and with `--slide-mpp`
//! `level0_magnification` and `target_magnification`.
//!
//! STAMP's (`--format stamp`): the same `features` and `tiles`, `feats` a hard link to
//! `features` (the same bytes under STAMP's name), `coords` float64 micrometre top-left
//! corners, and the root attributes STAMP's `get_coords` and `detect_feature_type` read:
//! `feat_type = "tile"`, `unit = "um"`, `tile_size_um`, `tile_size_px` (when known). It is
//! only written when the micrometres are known: STAMP takes pixel coordinates without `unit`
//! on a 224 grid as its historic format and silently rescales them by 256/224.
//!
//! The file's attributes say what made the features (encoder, layer, pooling, fingerprint,
//! weights, tilefeat version, sample). The datasets are chunked and grow as rows come, so
//! memory does not depend on the tile count. libhdf5 writes a temporary file beside the
//! output; it is closed, fsynced, hashed and renamed over the final name only when every row
//! is in ([`AtomicPath`]).

use std::str::FromStr;

use anyhow::{Context, Result};
use hdf5::types::VarLenUnicode;
use ndarray::{s, ArrayView1, ArrayView2};

use super::atomic::AtomicPath;
use super::{Committed, FeatureRow, FeatureWriter, FileInfo, NoEncoding, RowEncoder, Staged};
use crate::error::{fail, ExitKind};
use crate::input::coords::{ToLevel0, ToMicrons};

/// Which tools' layout an HDF5 file follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H5Layout {
    /// CLAM's and TRIDENT's: `coords` in level-0 pixels.
    Clam,
    /// STAMP's: `feats`, `coords` in micrometres, its root attributes.
    Stamp,
}

/// `coords` as written: level-0 pixels or micrometres.
enum CoordsOut {
    Pixels(hdf5::Dataset, ToLevel0),
    Microns(hdf5::Dataset, ToMicrons),
}

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
    coords: Option<CoordsOut>,
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

fn float_attr(loc: &hdf5::Location, name: &str, value: f64) -> hdf5::Result<()> {
    loc.new_attr::<f64>().create(name)?.write_scalar(&value)
}

impl H5Writer {
    /// The HDF5 file at `path` (a temporary beside it until committed) in `layout`, with its
    /// datasets and attributes made: fails before any compute when it cannot be written, or
    /// when the tile names' coordinates cannot be had in the layout's unit.
    pub fn create(path: &std::path::Path, info: &FileInfo, layout: H5Layout) -> Result<H5Writer> {
        let refuse = |why: String| {
            fail(
                ExitKind::Input,
                format!("cannot write {} as HDF5: {why}", path.display()),
            )
        };
        let stamp = match layout {
            H5Layout::Clam => None,
            H5Layout::Stamp => Some(stamp_coords(info).map_err(refuse)?),
        };
        let pixels = match (&info.coords, layout) {
            (Some(c), H5Layout::Clam) => Some(c.top_left.clone().map_err(refuse)?),
            _ => None,
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
        let coords = match (&info.coords, pixels, stamp) {
            (Some(c), Some(to), _) => {
                let ds = file
                    .new_dataset::<i64>()
                    .chunk((CHUNK_ROWS, 2))
                    .shape((0.., 2))
                    .create("coords")
                    .map_err(&err)?;
                for (name, value) in [
                    ("patch_size", c.patch_size),
                    ("patch_size_level0", c.patch_size_level0),
                    ("patch_level", c.patch_level.map(u64::from)),
                ] {
                    if let Some(v) = value {
                        int_attr(&ds, name, v as i64).map_err(&err)?;
                    }
                }
                let (level0, target) = c.magnifications();
                for (name, value) in [
                    ("level0_magnification", level0),
                    ("target_magnification", target),
                    ("mpp", c.slide_mpp),
                ] {
                    if let Some(v) = value {
                        float_attr(&ds, name, v).map_err(&err)?;
                    }
                }
                str_attr(&ds, "convention", &c.convention).map_err(&err)?;
                str_attr(&ds, "origin", "top-left, level-0 pixels").map_err(&err)?;
                Some(CoordsOut::Pixels(ds, to))
            }
            (Some(c), None, Some((to, tile_size_um))) => {
                let ds = file
                    .new_dataset::<f64>()
                    .chunk((CHUNK_ROWS, 2))
                    .shape((0.., 2))
                    .create("coords")
                    .map_err(&err)?;
                str_attr(&ds, "convention", &c.convention).map_err(&err)?;
                str_attr(&ds, "origin", "top-left, micrometres").map_err(&err)?;
                file.link_hard("features", "feats").map_err(&err)?;
                str_attr(&file, "feat_type", "tile").map_err(&err)?;
                str_attr(&file, "unit", "um").map_err(&err)?;
                float_attr(&file, "tile_size_um", tile_size_um).map_err(&err)?;
                if let Some(px) = c.patch_size {
                    int_attr(&file, "tile_size_px", px as i64).map_err(&err)?;
                }
                if let Some(mpp) = c.slide_mpp {
                    float_attr(&file, "mpp", mpp).map_err(&err)?;
                }
                Some(CoordsOut::Microns(ds, to))
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

/// What STAMP's layout needs: micrometre corners and the tiles' side in micrometres, or why
/// they cannot be had (with the flag that gives them).
fn stamp_coords(info: &FileInfo) -> std::result::Result<(ToMicrons, f64), String> {
    let c = info.coords.as_ref().ok_or(
        "STAMP's layout needs tile coordinates, and the tile names give none (see --coords)",
    )?;
    let to = c.microns.clone()?;
    let size = c
        .tile_size_um()
        .ok_or_else(|| match (c.slide_mpp, c.patch_size_level0) {
            (None, _) => "STAMP's layout needs the tiles' size in micrometres: give --slide-mpp F \
                 (the slide's micrometres per pixel at level 0)"
                .to_string(),
            _ => {
                "STAMP's layout needs the tiles' size in micrometres: give --patch-size-level0 PX \
                 (their extent in level-0 pixels; with --slide-mpp that is their size)"
                    .to_string()
            }
        })?;
    Ok((to, size))
}

/// The rows' x,y, each through `to`, into `ds` from row `start` on.
fn write_xy<T: hdf5::H5Type>(
    ds: &hdf5::Dataset,
    rows: &[FeatureRow<'_>],
    start: usize,
    to: impl Fn(f64) -> T,
) -> hdf5::Result<()> {
    let mut v = Vec::with_capacity(rows.len() * 2);
    for r in rows {
        let [x, y] =
            r.xy.ok_or_else(|| hdf5::Error::from("internal error: a row without coordinates"))?;
        v.extend([to(x), to(y)]);
    }
    let end = start + rows.len();
    ds.resize((end, 2))?;
    let view = ArrayView2::from_shape((rows.len(), 2), &v).expect("rows x 2");
    ds.write_slice(view, s![start..end, ..])
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
        match &self.coords {
            Some(CoordsOut::Pixels(ds, to)) => write_xy(ds, rows, start, |v| to.apply(v)),
            Some(CoordsOut::Microns(ds, to)) => write_xy(ds, rows, start, |v| to.apply(v)),
            None => Ok(()),
        }
        .map_err(&err)?;
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
