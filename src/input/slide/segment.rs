//! Tissue on a slide: the picture it is found on, the finding ([`super::tissue`]), the grid
//! tiles kept, and the picture a person checks it with (`S.tissue.png`).
//!
//! The picture is the slide at CLAM's segmentation level (the level OpenSlide picks for a
//! downsample of 64), read whole: at that level a slide is a few megapixels. A slide with no
//! such level (one level, or a pyramid that stops early) is never read whole: its level is
//! read in strips (whole multiples of `k` rows, `k` the integer downsample still missing to
//! 64, or more where the picture would still be too large) and each `k` x `k` block
//! averaged into one pixel, so memory holds the picture and the strips being read (up to
//! four threads, 2^24 pixels each).
//! `scale` is then level 0's size over the picture's, as CLAM's `level_downsamples` are.

use image::RgbImage;

use super::grid::{Grid, Level};
use super::openslide::Handle;
use super::tissue::{self, Tissue, TissueParams};
use super::{argb_to_rgb, unpremultiply};

/// A segmentation picture read whole holds at most this many pixels; a larger level is
/// averaged down from strips.
const MAX_PICTURE_PIXELS: u64 = 1 << 25;

/// A strip read while averaging holds at most this many pixels (4 bytes each; more only
/// where k rows are already more).
const MAX_STRIP_PIXELS: u64 = 1 << 24;

/// Threads that read strips at once, at most.
const MAX_READERS: usize = 4;

/// What tissue detection found on a slide.
pub struct Found {
    pub tissue: Tissue,
    pub picture: RgbImage,
    /// The segmentation level, and by how much its pixels were averaged (1: read as is).
    pub level: usize,
    pub averaged: u64,
}

/// The picture of `levels`' segmentation level, and its scale (level 0 over picture).
fn picture(
    handle: &Handle,
    levels: &[Level],
    threads: usize,
) -> Result<(RgbImage, usize, u64), String> {
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
        // Level-0 coordinates of the level's row y: whole (y = 0), or in strips only at a
        // near-whole downsample, rounded (Aperio's 4.0002: OpenSlide's strips then start up
        // to about one row of the level off by the slide's end, well below a block of k rows).
        let y0 = (y as f64 * l.downsample.round().max(1.0)) as i64;
        handle
            .read_region(0, y0, level as i32, w as i64, rows as i64)
            .map_err(|e| {
                format!("cannot read level {level} ({w} x {h} px) for tissue detection: {e}")
            })
    };
    if k == 1 {
        let rgb = argb_to_rgb(&read(0, h)?);
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
    // At most MAX_READERS threads, a strip each: memory stays within their strips and the
    // picture whatever the machine's cores. (Smaller strips would cost time, not only
    // memory: a strip lower than the slide's tiles decodes each tile again.)
    let readers = threads.clamp(1, MAX_READERS) as u64;
    let strip_rows = (MAX_STRIP_PIXELS / w).max(k) / k * k;
    // Strips start at multiples of k rows, so each gives whole picture rows of its own, its
    // own slice of the picture: the threads read and average strips in any order, each
    // writing its slice, and the picture is the same.
    let mut out = vec![0u8; (pw * ph * 3) as usize];
    let slices = std::sync::Mutex::new(
        out.chunks_mut((strip_rows / k * pw * 3) as usize)
            .enumerate(),
    );
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..readers.min(h.div_ceil(strip_rows)) {
            scope.spawn(|| loop {
                let Some((i, slice)) = slices.lock().unwrap().next() else {
                    return;
                };
                if failed.lock().unwrap().is_some() {
                    return;
                }
                let y = i as u64 * strip_rows;
                let rows = strip_rows.min(h - y);
                match read(y, rows) {
                    Ok(argb) => average(&argb, w, rows, k, slice),
                    Err(e) => {
                        failed.lock().unwrap().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    let img = RgbImage::from_raw(pw as u32, ph as u32, out).expect("pw x ph x 3 bytes");
    Ok((img, level, k))
}

/// A strip of `rows` x `w` ARGB pixels averaged in `k` x `k` blocks (the last ones partial)
/// into `out`: `rows.div_ceil(k)` rows of `w.div_ceil(k)` RGB pixels, each the rounded mean
/// of its block as [`argb_to_rgb`] converts it.
fn average(argb: &[u32], w: u64, rows: u64, k: u64, out: &mut [u8]) {
    let (w, k) = (w as usize, k as usize);
    let pw = w.div_ceil(k);
    debug_assert_eq!(out.len(), rows.div_ceil(k as u64) as usize * pw * 3);
    let mut at = 0;
    let mut sums = vec![0u64; pw * 3];
    for block in argb.chunks(w * k) {
        sums.iter_mut().for_each(|s| *s = 0);
        for row in block.chunks(w) {
            for (px, run) in row.chunks(k).enumerate() {
                let (mut r, mut g, mut b) = (0u64, 0u64, 0u64);
                for &v in run {
                    let [pr, pg, pb] = unpremultiply(v);
                    (r, g, b) = (r + u64::from(pr), g + u64::from(pg), b + u64::from(pb));
                }
                sums[px * 3] += r;
                sums[px * 3 + 1] += g;
                sums[px * 3 + 2] += b;
            }
        }
        let rows_in = (block.len() / w) as u64;
        for px in 0..pw {
            let n = rows_in * (k.min(w - px * k) as u64);
            for c in 0..3 {
                out[at] = ((sums[px * 3 + c] + n / 2) / n) as u8;
                at += 1;
            }
        }
    }
}

/// Find tissue on the slide `handle` reads.
/// A level read in strips is read by `threads` threads at once, at most four (one strip each
/// in memory).
pub fn find(
    handle: &Handle,
    levels: &[Level],
    params: &TissueParams,
    threads: usize,
) -> Result<Found, String> {
    let (picture, level, averaged) = picture(handle, levels, threads)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_average_with_partial_edges_and_premultiplied_alpha() {
        // 5 x 3 px in 2 x 2 blocks: 3 x 2 picture pixels, the last column and row partial.
        let px = |r: u32, g: u32, b: u32| 0xff00_0000 | r << 16 | g << 8 | b;
        let mut argb: Vec<u32> = (0..15).map(|i| px(10 * i, 255 - 10 * i, 7)).collect();
        argb[0] = 0; // fully transparent: black
        argb[1] = 0x8040_2010; // half alpha: 255 * c / 128 -> (127, 63, 31)
        let mut got = vec![0u8; 3 * 2 * 3];
        average(&argb, 5, 3, 2, &mut got);
        let rgb = argb_to_rgb(&argb);
        let mut want = Vec::new();
        for (ys, xs) in [
            (0..2, 0..2),
            (0..2, 2..4),
            (0..2, 4..5),
            (2..3, 0..2),
            (2..3, 2..4),
            (2..3, 4..5),
        ] {
            let n = (ys.len() * xs.len()) as u64;
            for c in 0..3 {
                let sum: u64 = ys
                    .clone()
                    .flat_map(|y| xs.clone().map(move |x| (y, x)))
                    .map(|(y, x)| u64::from(rgb[(y * 5 + x) * 3 + c]))
                    .sum();
                want.push(((sum + n / 2) / n) as u8);
            }
        }
        assert_eq!(got, want);
        assert_eq!(&rgb[..6], &[0, 0, 0, 127, 63, 31]);
    }
}
