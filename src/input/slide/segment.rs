//! Tissue on a slide: the picture it is found on, the finding ([`super::tissue`]), the grid
//! tiles kept, and the picture a person checks it with (`S.tissue.png`).
//!
//! The picture is the slide at CLAM's segmentation level (the level OpenSlide picks for a
//! downsample of 64), read whole: at that level a slide is a few megapixels. A slide with no
//! such level (one level, or a pyramid that stops early) is never read whole: its level is
//! read in strips (whole multiples of `k` rows, `k` the integer downsample still missing to
//! 64, or more where the picture would still be too large) and each `k` x `k` block
//! averaged into one pixel, so memory holds one strip and the picture.
//! `scale` is then level 0's size over the picture's, as CLAM's `level_downsamples` are.

use image::RgbImage;

use super::argb_to_rgb;
use super::grid::{Grid, Level};
use super::openslide::Handle;
use super::tissue::{self, Tissue, TissueParams};

/// A segmentation picture read whole holds at most this many pixels; a larger level is
/// averaged down from strips.
const MAX_PICTURE_PIXELS: u64 = 1 << 25;

/// A strip read while averaging holds at most this many pixels (4 bytes each).
const MAX_STRIP_PIXELS: u64 = 1 << 24;

/// What tissue detection found on a slide.
pub struct Found {
    pub tissue: Tissue,
    pub picture: RgbImage,
    /// The segmentation level, and by how much its pixels were averaged (1: read as is).
    pub level: usize,
    pub averaged: u64,
}

/// The picture of `levels`' segmentation level, and its scale (level 0 over picture).
fn picture(handle: &Handle, levels: &[Level]) -> Result<(RgbImage, usize, u64), String> {
    let downsamples: Vec<f64> = levels.iter().map(|l| l.downsample).collect();
    let level = tissue::seg_level(&downsamples);
    let l = levels[level];
    let (w, h) = (l.width, l.height);
    // The integer factor still missing to a downsample of 64, when the level is too large.
    // Aperio's downsamples are near whole numbers (4.0002, 16.0011: OpenSlide derives them
    // from the levels' sizes); strips are read at whole ones only.
    let whole = l.downsample.round().max(1.0);
    let k = if w * h <= MAX_PICTURE_PIXELS {
        1
    } else {
        ((tissue::SEG_DOWNSAMPLE / whole).round() as u64)
            .max(((w * h) as f64 / MAX_PICTURE_PIXELS as f64).sqrt().ceil() as u64)
            .max(2)
    };
    let read = |y: u64, rows: u64| {
        // Level-0 coordinates of the level's row y: whole (y = 0), or in strips only at an
        // integer downsample, where they are exact (no resampling between rows).
        let y0 = (y as f64 * l.downsample.round().max(1.0)) as i64;
        handle
            .read_region(0, y0, level as i32, w as i64, rows as i64)
            .map(|argb| argb_to_rgb(&argb))
            .map_err(|e| {
                format!("cannot read level {level} ({w} x {h} px) for tissue detection: {e}")
            })
    };
    if k == 1 {
        let rgb = read(0, h)?;
        let img = RgbImage::from_raw(w as u32, h as u32, rgb).expect("w x h x 3 bytes");
        return Ok((img, level, 1));
    }
    if (l.downsample - whole).abs() > 1e-2 {
        return Err(format!(
            "level {level} ({w} x {h} px, downsample {}) is too large to read whole for tissue \
             detection, and its downsample is not a whole number (strips would be resampled): \
             use --tissue none",
            l.downsample
        ));
    }
    let (pw, ph) = (w.div_ceil(k), h.div_ceil(k));
    let mut out = RgbImage::new(pw as u32, ph as u32);
    let strip_rows = (MAX_STRIP_PIXELS / w).max(k) / k * k;
    let mut sums = vec![0u64; pw as usize * 3];
    let mut counts = vec![0u64; pw as usize];
    let mut y = 0;
    while y < h {
        let rows = strip_rows.min(h - y);
        let rgb = read(y, rows)?;
        for r in 0..rows {
            let row = &rgb[(r * w * 3) as usize..((r + 1) * w * 3) as usize];
            for x in 0..w as usize {
                let px = x / k as usize;
                for c in 0..3 {
                    sums[px * 3 + c] += u64::from(row[x * 3 + c]);
                }
                counts[px] += 1;
            }
            let abs = y + r;
            if (abs + 1) % k == 0 || abs + 1 == h {
                let py = (abs / k) as u32;
                for px in 0..pw as usize {
                    let n = counts[px].max(1);
                    let v = |c: usize| ((sums[px * 3 + c] + n / 2) / n) as u8;
                    out.put_pixel(px as u32, py, image::Rgb([v(0), v(1), v(2)]));
                }
                sums.iter_mut().for_each(|s| *s = 0);
                counts.iter_mut().for_each(|c| *c = 0);
            }
        }
        y += rows;
    }
    Ok((out, level, k))
}

/// Find tissue on the slide `handle` reads.
pub fn find(handle: &Handle, levels: &[Level], params: &TissueParams) -> Result<Found, String> {
    let (picture, level, averaged) = picture(handle, levels)?;
    let l0 = levels[0];
    let scale = tissue::level_scale(
        (l0.width, l0.height),
        (u64::from(picture.width()), u64::from(picture.height())),
    );
    let tissue = tissue::segment(&picture, scale, params);
    Ok(Found {
        tissue,
        picture,
        level,
        averaged,
    })
}

/// The grid tiles (by index) on tissue.
pub fn kept(found: &Found, grid: &Grid) -> Vec<usize> {
    (0..grid.len())
        .filter(|&idx| {
            let r = grid.region(idx);
            found.tissue.keep(r.x, r.y, grid.extent)
        })
        .collect()
}

/// `S.tissue.png`: the picture with the kept tiles, the tissue contours and their holes, as
/// PNG bytes.
pub fn picture_png(found: &Found, grid: &Grid, kept: &[usize]) -> Result<Vec<u8>, String> {
    let tiles: Vec<(u64, u64)> = kept
        .iter()
        .map(|&idx| {
            let r = grid.region(idx);
            (r.x, r.y)
        })
        .collect();
    let drawn = tissue::draw(&found.picture, &found.tissue, &tiles, grid.extent, 1);
    let mut png = Vec::new();
    drawn
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the tissue picture: {e}"))?;
    Ok(png)
}
