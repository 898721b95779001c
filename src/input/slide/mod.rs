//! A whole-slide image read in place through OpenSlide: a grid of tiles at a requested
//! resolution, each read as a region of one pyramid level and resized to the patch size, so
//! a slide's tiles are pixels, never files.
//!
//! [`Slide::open`] reads the slide's levels and resolution (its properties, or `--slide-mpp`),
//! lays the [`grid::Grid`] and names the tiles TRIDENT's way (`{idx}_x{x}_y{y}.png`, level-0
//! top left), so coordinates come from the names as for tile folders. With `--tissue`, the
//! grid tiles off tissue are dropped before they are listed ([`segment`]), and the picture of
//! what was kept goes beside the output. The decode workers share one OpenSlide handle; a
//! region that fails to read is a bad tile (`--on-error`) and later tiles are read from a
//! fresh handle.
//!
//! A tile's cache key is known without reading its pixels ([`Slide::region_key`]): the
//! slide's content SHA-256 (every byte of its files, streamed once, on the first key asked
//! for: a run without a cache never hashes), the region, the patch size, the resize and
//! OpenSlide's version (its decoders make the pixels).

pub mod contours;
pub mod grid;
pub mod mask;
pub mod openslide;
pub mod polygon;
pub mod segment;
pub mod tissue;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::grid::{Grid, Level, Region};
use self::openslide::{Handle, Library};
use super::{Listing, Tile, TileData, TileSource};
use crate::error::{fail, ExitKind};
use crate::pixels::{resize_linear, Image};

/// Bytes of OpenSlide's tile cache per handle (its default, 32 MiB, holds a few hundred
/// decoded tiles: too few for several decode workers reading neighbouring regions).
const OPENSLIDE_CACHE_BYTES: usize = 256 << 20;

/// A region read for one tile holds at most this many pixels (4 bytes each while read).
const MAX_REGION_PIXELS: u64 = 1 << 26;

/// A slide's grid holds at most this many tiles (a 100k x 80k px slide at 40x has about
/// 120,000 tiles of 256 px at 20x; `--stride 1` would make billions).
const MAX_GRID_TILES: usize = 10_000_000;

/// Part of every slide tile's cache key: bump it when the way a region becomes pixels changes.
const READER_VERSION: &str = "tilefeat-openslide-region/1";

/// What a slide's tiles are: the resolution and patch flags, validated (`pipeline::plan`).
#[derive(Debug, Clone, PartialEq)]
pub struct GridRequest {
    /// Target µm/px.
    pub target_mpp: f64,
    /// How it was asked for, e.g. `--magnification 20 (default)`.
    pub asked: String,
    /// Tile side at the target resolution, and the step between tiles, in target pixels.
    pub patch: u32,
    pub stride: u32,
    /// `--slide-mpp`: level 0's µm/px, instead of the slide's own.
    pub slide_mpp: Option<f64>,
    /// `--tissue`: the segmentation's settings and their name; None keeps every grid tile.
    pub tissue: Option<(String, tissue::TissueParams)>,
    /// Threads that read a segmentation level too large to read whole, a strip each.
    pub threads: usize,
}

impl Default for GridRequest {
    fn default() -> GridRequest {
        GridRequest {
            target_mpp: 0.5,
            asked: "--magnification 20 (default)".into(),
            patch: 256,
            stride: 256,
            slide_mpp: None,
            tissue: Some(("clam".into(), tissue::TissueParams::default())),
            threads: 1,
        }
    }
}

/// What the provenance records of a slide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideInfo {
    pub path: String,
    /// OpenSlide's name for the format (aperio, generic-tiff, mirax, ...).
    pub vendor: String,
    pub openslide_version: String,
    pub openslide_library: String,
    pub levels: Vec<Level>,
    /// Level 0's µm/px, and where it came from (a property, or `--slide-mpp`).
    pub mpp: f64,
    pub mpp_source: String,
    /// `aperio.AppMag` or `openslide.objective-power`, when the slide records one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective_power: Option<String>,
    pub target_mpp: f64,
    pub target: String,
    pub patch_size: u32,
    pub stride: u32,
    /// The level read, its downsample, a region's side there and a tile's side in level 0.
    pub level: usize,
    pub level_downsample: f64,
    pub read_size: u64,
    pub patch_size_level0: u64,
    pub step_level0: u64,
    pub grid_cols: u64,
    pub grid_rows: u64,
    pub tiles: usize,
    /// Tiles dropped from the grid (tissue): `none` keeps every one.
    pub tissue: String,
    /// Tissue detection: the level segmented (and the factor its pixels were averaged by
    /// where it was too large to read whole), Otsu's threshold when used, regions found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tissue_found: Option<TissueFound>,
    /// The files hashed for the cache keys, and their SHA-256 (absent: no cache, not hashed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_sha256: Option<String>,
}

/// What tissue detection found, for the provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TissueFound {
    pub seg_level: usize,
    pub averaged: u64,
    pub threshold: u8,
    pub regions: usize,
    pub holes: usize,
    pub grid_tiles: usize,
}

/// A slide as a tile source.
pub struct Slide {
    path: PathBuf,
    lib: &'static Library,
    /// The handle the workers read from; replaced by a fresh one after an error.
    handle: RwLock<Arc<Handle>>,
    grid: Grid,
    /// The grid tiles kept, by grid index (every one until a tissue filter drops some).
    kept: Vec<usize>,
    info: SlideInfo,
    /// The slide's files' SHA-256, computed on the first cache key asked for.
    content: OnceLock<Result<[u8; 32], String>>,
    warnings: Vec<String>,
    /// `S.tissue.png` (PNG bytes), when tissue was looked for.
    picture: Option<Vec<u8>>,
}

/// Whether `path` is read as a slide: a regular file that is not an archive.
pub fn is_slide(path: &Path) -> bool {
    path.is_file() && super::archive_kind(path).is_none()
}

/// A slide's default sample name: its file name without the extension (`.ome.tiff`,
/// or `.ome.tif` without both).
pub fn sample_name(file_name: &str) -> &str {
    let lower = file_name.to_ascii_lowercase();
    for double in [".ome.tiff", ".ome.tif"] {
        if lower.ends_with(double) && lower.len() > double.len() {
            return &file_name[..file_name.len() - double.len()];
        }
    }
    match file_name.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => file_name,
    }
}

impl Slide {
    /// Open `path` with OpenSlide, read its levels and resolution and lay the grid `req`
    /// asks for. Every error is an input error (exit 3) naming the file and the fix.
    pub fn open(path: &Path, req: &GridRequest) -> Result<Slide> {
        let shown = path.display();
        let lib = openslide::library().map_err(|e| {
            fail(
                ExitKind::Input,
                format!(
                    "{shown} is not a tile folder or an archive (.zip, .tar, .tar.gz), and \
                     reading it as a slide needs OpenSlide: {e}"
                ),
            )
        })?;
        let handle = lib.open(path).map_err(|why| {
            fail(
                ExitKind::Input,
                format!(
                    "{shown} is neither a tile folder, an archive (.zip, .tar, .tar.gz) nor a \
                     slide OpenSlide can open: {why}"
                ),
            )
        })?;
        let bad = |what: String| fail(ExitKind::Input, format!("slide {shown}: {what}"));
        let count = handle.level_count();
        if count < 1 {
            return Err(bad(format!(
                "OpenSlide reports {count} levels{}",
                handle
                    .error()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )));
        }
        let mut levels = Vec::with_capacity(count as usize);
        for l in 0..count {
            let (w, h) = handle.level_dimensions(l);
            let d = handle.level_downsample(l);
            if w < 1 || h < 1 || !(d.is_finite() && d > 0.0) {
                return Err(bad(format!(
                    "level {l} is {w} x {h} pixels at downsample {d}: not a readable level"
                )));
            }
            levels.push(Level {
                width: w as u64,
                height: h as u64,
                downsample: d,
            });
        }
        let props = handle.properties();
        let prop = |name: &str| {
            props
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let mpp = match req.slide_mpp {
            Some(v) => grid::Mpp {
                value: v,
                source: "--slide-mpp".into(),
            },
            None => grid::slide_mpp(prop).map_err(|why| {
                bad(format!(
                    "{why}; give level 0's resolution with --slide-mpp F (µm/px, e.g. 0.25 for \
                     a 40x scan, 0.5 for 20x)"
                ))
            })?,
        };
        let grid =
            Grid::new(&levels, mpp.value, req.target_mpp, req.patch, req.stride).map_err(|e| {
                bad(format!(
                    "{e}: ask for a coarser resolution or a larger patch"
                ))
            })?;
        if grid.len() > MAX_GRID_TILES {
            return Err(bad(format!(
                "a grid of {} x {} tiles ({} px tiles {} px apart at {} µm/px) is more than {} \
                 tiles: give a larger --stride (or --patch-size, or a coarser resolution)",
                grid.cols, grid.rows, req.patch, req.stride, req.target_mpp, MAX_GRID_TILES
            )));
        }
        let l = levels[grid.level];
        if grid.read_size.saturating_mul(grid.read_size) > MAX_REGION_PIXELS {
            return Err(bad(format!(
                "a {} px tile at {} µm/px is a {} x {} px region of its nearest level (level {},                  {} µm/px), too large to read per tile: ask for a finer resolution or a smaller                  --patch-size (or give the slide a pyramid)",
                req.patch,
                req.target_mpp,
                grid.read_size,
                grid.read_size,
                grid.level,
                mpp.value * l.downsample
            )));
        }
        let mut warnings = Vec::new();
        if grid.factor < 1.0 - 1e-3 {
            warnings.push(format!(
                "slide {shown}: level 0 is {} µm/px, coarser than {} µm/px ({}): its tiles are \
                 upsampled {:.3}x",
                mpp.value,
                req.target_mpp,
                req.asked,
                1.0 / grid.factor
            ));
        }
        handle.set_cache(OPENSLIDE_CACHE_BYTES);
        let info = SlideInfo {
            path: std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_path_buf())
                .display()
                .to_string(),
            vendor: prop("openslide.vendor")
                .or_else(|| lib.detect_vendor(path))
                .unwrap_or_else(|| "unknown".into()),
            openslide_version: lib.version(),
            openslide_library: lib.path.clone(),
            levels: levels.clone(),
            mpp: mpp.value,
            mpp_source: mpp.source,
            objective_power: prop("openslide.objective-power").or_else(|| prop("aperio.AppMag")),
            target_mpp: req.target_mpp,
            target: req.asked.clone(),
            patch_size: req.patch,
            stride: req.stride,
            level: grid.level,
            level_downsample: l.downsample,
            read_size: grid.read_size,
            patch_size_level0: grid.extent,
            step_level0: grid.step,
            grid_cols: grid.cols,
            grid_rows: grid.rows,
            tiles: grid.len(),
            tissue: "none".into(),
            tissue_found: None,
            files: Vec::new(),
            content_sha256: None,
        };
        let mut info = info;
        let mut kept: Vec<usize> = (0..grid.len()).collect();
        let mut picture = None;
        if let (Some((name, params)), false) = (&req.tissue, grid.is_empty()) {
            let found = segment::find(&handle, &levels, params, req.threads).map_err(&bad)?;
            kept = segment::kept(&found, &grid);
            picture = Some(segment::picture_png(&found, &grid, &kept).map_err(&bad)?);
            info.tissue = format!("--tissue {name}");
            info.tiles = kept.len();
            info.tissue_found = Some(TissueFound {
                seg_level: found.level,
                averaged: found.averaged,
                threshold: found.tissue.threshold,
                regions: found.tissue.regions.len(),
                holes: found.tissue.regions.iter().map(|r| r.holes.len()).sum(),
                grid_tiles: grid.len(),
            });
            if kept.is_empty() {
                return Err(bad(format!(
                    "no tissue found (--tissue {name}: {} regions, none of the {} grid tiles on \
                     one): check the slide, or try --tissue tcga, bwh_biopsy or none",
                    found.tissue.regions.len(),
                    grid.len()
                )));
            }
        }
        Ok(Slide {
            path: path.to_path_buf(),
            lib,
            handle: RwLock::new(Arc::new(handle)),
            grid,
            kept,
            info,
            content: OnceLock::new(),
            warnings,
            picture,
        })
    }

    /// The grid laid on the slide (every tile, kept or not).
    pub fn grid(&self) -> &Grid {
        &self.grid
    }

    /// The region read for a tile of this slide (by its name).
    fn region_of(&self, tile: &Tile) -> std::io::Result<Region> {
        self.grid
            .index_of(&tile.rel)
            .map(|idx| self.grid.region(idx))
            .ok_or_else(|| {
                std::io::Error::other(format!("{} is not a tile of this slide", tile.rel))
            })
    }

    fn current(&self) -> Arc<Handle> {
        self.handle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A fresh handle in place of `failed` (unless another worker already replaced it).
    fn reopen(&self, failed: &Arc<Handle>) -> Result<Arc<Handle>, String> {
        let mut slot = self.handle.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, failed) {
            let fresh = self.lib.open(&self.path)?;
            fresh.set_cache(OPENSLIDE_CACHE_BYTES);
            *slot = Arc::new(fresh);
        }
        Ok(slot.clone())
    }

    /// A region's pixels as RGB, the patch size. A read that fails is tried again on a fresh
    /// handle (twice: the failure may be another region's, which failed the shared handle);
    /// the handle it leaves failed is replaced, so later tiles read on.
    pub fn read_rgb(&self, r: &Region) -> Result<Image, String> {
        let (x, y, level, w, h) = (
            r.x as i64,
            r.y as i64,
            r.level as i32,
            r.w as i64,
            r.h as i64,
        );
        let mut handle = self.current();
        let mut tries = 0;
        let argb = loop {
            match handle.read_region(x, y, level, w, h) {
                Ok(b) => break b,
                Err(e) => {
                    tries += 1;
                    let fresh = self.reopen(&handle);
                    let why = match fresh {
                        Ok(f) if tries < 3 => {
                            handle = f;
                            continue;
                        }
                        Ok(_) => e,
                        Err(reopen) => format!("{e}; reopening the slide failed: {reopen}"),
                    };
                    return Err(format!(
                        "cannot read region x={} y={} level {} ({} x {} px) of {}: {why}",
                        r.x,
                        r.y,
                        r.level,
                        r.w,
                        r.h,
                        self.path.display()
                    ));
                }
            }
        };
        let rgb = Image::new(r.w as usize, r.h as usize, 3, argb_to_rgb(&argb));
        let p = self.grid.patch as usize;
        Ok(resize_linear(&rgb, p, p))
    }

    /// The cache key of a region: SHA-256 over what makes its pixels.
    pub fn region_key(&self, r: &Region) -> Result<[u8; 32], String> {
        let content = self
            .content
            .get_or_init(|| hash_files(&slide_files(&self.path, &self.info.vendor)))
            .clone()?;
        #[derive(Serialize)]
        struct Key<'a> {
            reader: &'a str,
            openslide: &'a str,
            slide_sha256: String,
            region: &'a Region,
            patch: u32,
            resize: &'a str,
        }
        let key = Key {
            reader: READER_VERSION,
            openslide: &self.info.openslide_version,
            slide_sha256: hex::encode(content),
            region: r,
            patch: self.grid.patch,
            resize: "cv2.INTER_LINEAR",
        };
        let bytes = serde_json::to_vec(&key).map_err(|e| e.to_string())?;
        Ok(Sha256::digest(bytes).into())
    }
}

/// OpenSlide's premultiplied ARGB as RGB, as openslide-python's `read_region(...)
/// .convert("RGB")`: un-premultiplied (`255 * c / a`, truncated), alpha dropped, a fully
/// transparent pixel black.
pub fn argb_to_rgb(argb: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(argb.len() * 3);
    for &v in argb {
        out.extend_from_slice(&unpremultiply(v));
    }
    out
}

/// One pixel of [`argb_to_rgb`].
#[inline]
pub fn unpremultiply(v: u32) -> [u8; 3] {
    let a = v >> 24;
    let [r, g, b] = [(v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff];
    match a {
        255 => [r as u8, g as u8, b as u8],
        0 => [0, 0, 0],
        // Valid premultiplied data has c <= a; anything else is clipped, as Pillow does.
        _ => [r, g, b].map(|c| (255 * c / a).min(255) as u8),
    }
}

/// The files OpenSlide reads for the slide at `path`: the file itself, and for the
/// multi-file formats the files beside it (MIRAX: the folder named after the slide; DICOM:
/// every `.dcm` in its folder; Hamamatsu VMS/VMU: the files its index names).
pub fn slide_files(path: &Path, vendor: &str) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    let dir = path.parent().unwrap_or(Path::new("."));
    let listed = |d: &Path, want: &dyn Fn(&Path) -> bool| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && want(p))
            .collect();
        v.sort();
        v
    };
    let ext = |p: &Path| {
        p.extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default()
    };
    match vendor {
        "mirax" => {
            if let Some(stem) = path.file_stem() {
                files.extend(listed(&dir.join(stem), &|_| true));
            }
        }
        "dicom" => {
            files = listed(dir, &|p| ext(p) == "dcm");
            if !files.iter().any(|f| f == path) {
                files.insert(0, path.to_path_buf());
            }
        }
        "hamamatsu" if matches!(ext(path).as_str(), "vms" | "vmu") => {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for line in text.lines() {
                if let Some((k, v)) = line.split_once('=') {
                    let k = k.trim();
                    if k.starts_with("ImageFile") || k == "MapFile" || k == "OptimisationFile" {
                        let f = dir.join(v.trim());
                        if !files.contains(&f) {
                            files.push(f);
                        }
                    }
                }
            }
        }
        _ => {}
    }
    files
}

/// SHA-256 over the files in order (each one's name and length before its bytes, so that
/// the same bytes split differently hash differently).
fn hash_files(files: &[PathBuf]) -> Result<[u8; 32], String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file =
            std::fs::File::open(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update([0]);
        h.update(len.to_le_bytes());
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| format!("cannot read {}: {e}", f.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().into())
}

impl TileSource for Slide {
    fn list(&mut self) -> Result<Listing> {
        if self.kept.is_empty() {
            let l0 = self.info.levels[0];
            let why = if self.grid.is_empty() {
                format!(
                    "no whole tile of {} px at {} µm/px ({} level-0 px a side) fits in its \
                     {} x {} level-0 pixels: ask for a finer resolution or a smaller \
                     --patch-size",
                    self.grid.patch, self.info.target_mpp, self.grid.extent, l0.width, l0.height
                )
            } else {
                format!(
                    "no tile is left of {} after tissue detection ({})",
                    self.grid.len(),
                    self.info.tissue
                )
            };
            return Err(fail(
                ExitKind::Input,
                format!("slide {}: {why}", self.path.display()),
            ));
        }
        let tiles = self
            .kept
            .iter()
            .map(|&idx| Tile::new(self.path.join(self.grid.name(idx)), self.grid.name(idx)))
            .collect();
        Ok(Listing {
            tiles,
            warnings: self.warnings.clone(),
        })
    }

    fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>> {
        Err(std::io::Error::other(format!(
            "{} is a region of a slide, read as pixels, not a file",
            tile.rel
        )))
    }

    fn read_data(&self, tile: &Tile) -> std::io::Result<TileData> {
        let r = self.region_of(tile)?;
        self.read_rgb(&r)
            .map(TileData::Rgb)
            .map_err(std::io::Error::other)
    }

    fn cache_key(&self, tile: &Tile) -> Option<std::io::Result<[u8; 32]>> {
        Some(
            self.region_of(tile)
                .and_then(|r| self.region_key(&r).map_err(std::io::Error::other)),
        )
    }

    fn slide_info(&self) -> Option<SlideInfo> {
        let mut info = self.info.clone();
        if let Some(Ok(sha)) = self.content.get() {
            info.files = slide_files(&self.path, &info.vendor)
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            info.content_sha256 = Some(hex::encode(sha));
        }
        Some(info)
    }

    fn picture(&self) -> Option<Vec<u8>> {
        self.picture.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argb_is_converted_as_openslide_python_does() {
        let px = |a: u32, r: u32, g: u32, b: u32| a << 24 | r << 16 | g << 8 | b;
        let rgb = argb_to_rgb(&[
            px(255, 10, 20, 30),
            px(0, 0, 0, 0),
            px(128, 64, 128, 0),
            px(1, 1, 0, 1),
            px(3, 1, 2, 3),
        ]);
        assert_eq!(
            rgb,
            [
                10, 20, 30, // opaque: as it is
                0, 0, 0, // transparent: black
                127, 255, 0, // 255 * 64 / 128 = 127.5 -> 127; 255 * 128 / 128 = 255
                255, 0, 255, //
                85, 170, 255,
            ]
        );
    }

    #[test]
    fn sample_names() {
        assert_eq!(sample_name("S1.svs"), "S1");
        assert_eq!(sample_name("S.1.ndpi"), "S.1");
        assert_eq!(sample_name("a.ome.tiff"), "a");
        assert_eq!(sample_name("a.OME.TIF"), "a");
        assert_eq!(sample_name("noext"), "noext");
        assert_eq!(sample_name(".svs"), ".svs");
    }

    #[test]
    fn multi_file_slides_hash_every_file() {
        let d = tempfile::tempdir().unwrap();
        let mrxs = d.path().join("s.mrxs");
        std::fs::write(&mrxs, b"x").unwrap();
        std::fs::create_dir(d.path().join("s")).unwrap();
        for f in ["Slidedat.ini", "Data0000.dat"] {
            std::fs::write(d.path().join("s").join(f), f).unwrap();
        }
        let files = slide_files(&mrxs, "mirax");
        assert_eq!(files.len(), 3, "{files:?}");
        let before = hash_files(&files).unwrap();
        std::fs::write(d.path().join("s/Data0000.dat"), b"changed").unwrap();
        assert_ne!(hash_files(&files).unwrap(), before);
        assert_eq!(slide_files(&mrxs, "aperio"), vec![mrxs.clone()]);
        let vms = d.path().join("h.vms");
        std::fs::write(&vms, "[Virtual Microscope Specimen]\nImageFile=h.jpg\nImageFile(1,0)=h1.jpg\nMapFile=h.map\n").unwrap();
        assert_eq!(slide_files(&vms, "hamamatsu").len(), 4);
        assert!(hash_files(&slide_files(&vms, "hamamatsu"))
            .unwrap_err()
            .contains("h.jpg"));
    }
}
