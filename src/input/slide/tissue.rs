//! Which tiles of a slide hold tissue: CLAM's segmentation (Lu et al. 2021, `mahmoodlab/CLAM`,
//! `WholeSlideImage.segmentTissue` and its `four_pt` patch check), reimplemented in pure Rust
//! from its description (CLAM is GPL-3.0: no code of it here), with every OpenCV step computed
//! exactly as OpenCV computes it, so that the mask, the contours and the tiles kept equal those
//! of a cv2 reference of the same algorithm (`tests/python/tissue_reference.py`).
//!
//! The algorithm, on an RGB picture of the slide at the segmentation level (OpenSlide's best
//! level for a downsample of 64, [`seg_level`]): the HSV saturation of each pixel, a median
//! blur of size `mthresh`, a binary threshold (`S > sthresh` becomes `sthresh_up`) or Otsu's, a
//! morphological closing with a `close` x `close` square of ones (the pixel steps are in
//! [`mask`](super::mask), each as its OpenCV function computes it); then the contours with
//! their holes (`cv2.findContours(RETR_CCOMP, CHAIN_APPROX_NONE)`, see
//! [`contours`]). A contour is tissue when its area minus the areas of all its
//! holes is not 0 and exceeds `a_t` reference patches; CLAM's reference patch is 512 x 512
//! level-0 pixels taken to the segmentation level and truncated to an integer,
//! `int(512^2 / (scale_x * scale_y))`, areas being polygon areas through pixel centres (a
//! one-pixel line has none). Of a tissue contour's holes, the `max_n_holes` largest (ties in
//! OpenCV's order) are kept when over `a_h` reference patches. Contours and holes are taken to
//! level 0 by multiplying by the scale and truncating. A tile (level-0 top-left `x0, y0`,
//! level-0 side `e`) is kept ([`Tissue::keep`]) when, for some tissue contour, one of the four
//! points `x0 + e/2 +/- e/4`, `y0 + e/2 +/- e/4` (integer divisions, as CLAM's) is inside or on
//! the contour, and the tile's exact centre `(x0 + e/2, y0 + e/2)` (real halves) is not
//! strictly inside one of that contour's kept holes (both by cv2's `pointPolygonTest`).
//!
//! Where this follows CLAM's code to the letter: the default and preset settings
//! (`create_patches_fp.py`, `presets/tcga.csv`, `presets/bwh_biopsy.csv`); the scale, CLAM's
//! per-axis `level-0 size / level size` ([`level_scale`]); the strict comparisons (`a_t < area`,
//! hole area `> a_h`, in a hole when `> 0`, in the contour when `>= 0`); the truncations. Where
//! it deviates: CLAM lays a separate grid over each contour's level-0 bounding box, from its
//! top-left corner, and may list a tile twice; here the caller asks about the tiles of one grid
//! over the whole slide, and a tile is kept if any contour keeps it (with that contour's holes).
//! [`Tissue::clam_coords`] gives CLAM's own per-contour list, for comparison. A picture without
//! foreground gives no tissue (CLAM stops with an error on it). `keep_ids` / `exclude_ids` are
//! not offered. CLAM segments the RGBA region OpenSlide returns, whose transparent pixels are
//! black with saturation 0: the caller's RGB picture (transparent to black) gives the same.
//!
//! Memory: [`segment`] works on an [`RgbImage`] the caller builds. A slide with a low level
//! gives it in one read; for a slide without one (a single-level TIFF), the caller builds the
//! picture from strips of level 0, each downsampled as it is read, so that level 0 is never held
//! whole, and passes as `scale` the level-0 size over the picture's size, per axis. Segmenting
//! holds a few planes of the picture's size (saturation, median, mask, labels) at once.

use std::str::FromStr;

use image::{GrayImage, Rgb, RgbImage};

use super::contours::{self, Contour};
use super::mask::{close, median_blur, otsu_threshold, saturation, threshold};
use super::polygon::IndexedPolygon;

/// CLAM's reference patch side in level-0 pixels, the unit of `a_t` and `a_h`.
pub const REF_PATCH_SIZE: u32 = 512;

/// The downsample CLAM segments at (`get_best_level_for_downsample(64)`).
pub const SEG_DOWNSAMPLE: f64 = 64.0;

/// The settings of the segmentation, CLAM's names and meanings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TissueParams {
    /// Saturation threshold: a (blurred) saturation above it is tissue.
    pub sthresh: u8,
    /// The value given to tissue in the mask (CLAM: 255).
    pub sthresh_up: u8,
    /// Median blur kernel size (odd).
    pub mthresh: u32,
    /// Morphological closing kernel size (0: no closing).
    pub close: u32,
    /// Otsu's threshold instead of `sthresh`.
    pub use_otsu: bool,
    /// Minimum tissue area, in reference patches (512 x 512 level-0 pixels).
    pub a_t: u32,
    /// Minimum hole area, in reference patches.
    pub a_h: u32,
    /// The most holes kept per contour (the largest).
    pub max_n_holes: usize,
}

impl Default for TissueParams {
    /// CLAM's `create_patches_fp.py` defaults.
    fn default() -> Self {
        TissueParams {
            sthresh: 8,
            sthresh_up: 255,
            mthresh: 7,
            close: 4,
            use_otsu: false,
            a_t: 100,
            a_h: 16,
            max_n_holes: 8,
        }
    }
}

impl TissueParams {
    /// CLAM's `presets/tcga.csv`.
    pub fn tcga() -> Self {
        TissueParams {
            sthresh: 8,
            mthresh: 7,
            close: 4,
            use_otsu: false,
            a_t: 16,
            a_h: 4,
            max_n_holes: 8,
            ..Self::default()
        }
    }

    /// CLAM's `presets/bwh_biopsy.csv`.
    pub fn bwh_biopsy() -> Self {
        TissueParams {
            sthresh: 15,
            mthresh: 11,
            close: 2,
            use_otsu: false,
            a_t: 1,
            a_h: 1,
            max_n_holes: 2,
            ..Self::default()
        }
    }

    /// Refuses settings OpenCV would refuse (an even or zero median size).
    pub fn validate(&self) -> Result<(), String> {
        if self.mthresh & 1 == 0 {
            return Err(format!(
                "the median blur size must be odd, not {}",
                self.mthresh
            ));
        }
        Ok(())
    }
}

impl FromStr for TissueParams {
    type Err = String;

    /// `clam` (the defaults), `tcga` or `bwh_biopsy`; `none` is the caller's.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "clam" => Ok(Self::default()),
            "tcga" => Ok(Self::tcga()),
            "bwh_biopsy" => Ok(Self::bwh_biopsy()),
            _ => Err(format!(
                "unknown tissue preset {s:?}: expected clam, tcga, bwh_biopsy or none"
            )),
        }
    }
}

/// OpenSlide's `openslide_get_best_level_for_downsample`: level 0 when `downsample` is below
/// level 0's, else the last level before the first whose downsample exceeds it (for increasing
/// downsamples: the largest not above it), else the last level.
pub fn best_level_for_downsample(downsamples: &[f64], downsample: f64) -> usize {
    if downsamples.is_empty() || downsample < downsamples[0] {
        return 0;
    }
    for (i, &d) in downsamples.iter().enumerate().skip(1) {
        if downsample < d {
            return i - 1;
        }
    }
    downsamples.len() - 1
}

/// The level CLAM segments at: the best level for a downsample of 64.
pub fn seg_level(downsamples: &[f64]) -> usize {
    best_level_for_downsample(downsamples, SEG_DOWNSAMPLE)
}

/// CLAM's scale of a level: level-0 size over the level's size, per axis.
pub fn level_scale(level0: (u64, u64), level: (u64, u64)) -> (f64, f64) {
    (
        level0.0 as f64 / level.0 as f64,
        level0.1 as f64 / level.1 as f64,
    )
}

/// One piece of tissue: its outer contour and kept holes, at the segmentation level and at
/// level 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// The outer contour, segmentation-level pixels (cv2's point list).
    pub contour: Vec<(i32, i32)>,
    /// The holes kept, largest first.
    pub holes: Vec<Vec<(i32, i32)>>,
    /// Contour area minus the areas of all its holes (kept or not), segmentation-level pixels.
    pub area: f64,
    /// The contour at level 0 (each point times the scale, truncated).
    pub contour_level0: IndexedPolygon,
    /// The kept holes at level 0.
    pub holes_level0: Vec<IndexedPolygon>,
}

/// The result of segmenting one picture.
#[derive(Debug, Clone)]
pub struct Tissue {
    /// The thresholded, closed mask at the segmentation level (0 or `sthresh_up`).
    pub mask: GrayImage,
    /// Level-0 pixels per segmentation-level pixel, x and y.
    pub scale: (f64, f64),
    /// The threshold applied (`sthresh`, or Otsu's).
    pub threshold: u8,
    /// Every contour of the mask as cv2 lists them (before filtering).
    pub contours: Vec<Contour>,
    /// The tissue kept, in cv2's contour order.
    pub regions: Vec<Region>,
}

/// The mask CLAM contours: saturation, median, threshold (or Otsu), closing. Returns the mask
/// and the threshold used.
pub fn tissue_mask(rgb: &RgbImage, params: &TissueParams) -> (GrayImage, u8) {
    let sat = saturation(rgb);
    let med = median_blur(&sat, params.mthresh);
    let t = if params.use_otsu {
        otsu_threshold(&med)
    } else {
        params.sthresh
    };
    let mut mask = threshold(&med, t, params.sthresh_up);
    if params.close > 0 {
        mask = close(&mask, params.close);
    }
    (mask, t)
}

fn to_level0(points: &[(i32, i32)], scale: (f64, f64)) -> Vec<(i32, i32)> {
    points
        .iter()
        .map(|&(x, y)| ((x as f64 * scale.0) as i32, (y as f64 * scale.1) as i32))
        .collect()
}

/// Segments `rgb`, the slide at the segmentation level, `scale` level-0 pixels per pixel of
/// it (x, y; see [`level_scale`]). `params` should pass [`TissueParams::validate`] (the
/// presets do): an even median size is not OpenCV's and gives a size-plus-one median here.
/// A picture with no foreground gives a `Tissue` with no regions: every tile is dropped.
pub fn segment(rgb: &RgbImage, scale: (f64, f64), params: &TissueParams) -> Tissue {
    let (mask, threshold) = tissue_mask(rgb, params);
    let contours =
        contours::find_contours(mask.as_raw(), mask.width() as usize, mask.height() as usize);
    let ref_area =
        (f64::from(REF_PATCH_SIZE) * f64::from(REF_PATCH_SIZE) / (scale.0 * scale.1)) as i64 as f64;
    let a_t = f64::from(params.a_t) * ref_area;
    let a_h = f64::from(params.a_h) * ref_area;
    let mut regions = Vec::new();
    for (i, c) in contours.iter().enumerate() {
        if c.parent.is_some() {
            continue;
        }
        let holes: Vec<&Contour> = contours.iter().filter(|h| h.parent == Some(i)).collect();
        let hole_sum: f64 = holes
            .iter()
            .map(|h| contours::contour_area(&h.points))
            .sum();
        let area = contours::contour_area(&c.points) - hole_sum;
        if area == 0.0 || area <= a_t {
            continue;
        }
        let mut ranked: Vec<(f64, &Contour)> = holes
            .iter()
            .map(|h| (contours::contour_area(&h.points), *h))
            .collect();
        // Stable, largest first, as Python's sorted(reverse=True).
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let kept: Vec<Vec<(i32, i32)>> = ranked
            .into_iter()
            .take(params.max_n_holes)
            .filter(|(a, _)| *a > a_h)
            .map(|(_, h)| h.points.clone())
            .collect();
        regions.push(Region {
            contour_level0: IndexedPolygon::new(to_level0(&c.points, scale)),
            holes_level0: kept
                .iter()
                .map(|h| IndexedPolygon::new(to_level0(h, scale)))
                .collect(),
            contour: c.points.clone(),
            holes: kept,
            area,
        });
    }
    Tissue {
        mask,
        scale,
        threshold,
        contours,
        regions,
    }
}

impl Region {
    /// CLAM's `four_pt` check and hole check for one tile.
    fn keeps(&self, x0: i64, y0: i64, extent: i64) -> bool {
        let (cx, cy) = (x0 + extent / 2, y0 + extent / 2);
        let s = extent / 4;
        let corners = [
            (cx - s, cy - s),
            (cx + s, cy + s),
            (cx + s, cy - s),
            (cx - s, cy + s),
        ];
        let c = &self.contour_level0;
        if !corners
            .iter()
            .any(|&(x, y)| c.test(x as f64, y as f64) >= 0)
        {
            return false;
        }
        let (hx, hy) = (
            x0 as f64 + extent as f64 / 2.0,
            y0 as f64 + extent as f64 / 2.0,
        );
        !self.holes_level0.iter().any(|h| h.test(hx, hy) > 0)
    }
}

impl Tissue {
    /// Whether the tile with level-0 top-left `(x0, y0)` and level-0 side `extent_level0`
    /// holds tissue (CLAM's `four_pt`, for any tissue region, that region's holes excluded).
    pub fn keep(&self, x0: u64, y0: u64, extent_level0: u64) -> bool {
        let (x0, y0, e) = (x0 as i64, y0 as i64, extent_level0 as i64);
        self.regions.iter().any(|r| r.keeps(x0, y0, e))
    }

    /// The level-0 tiles CLAM itself would list (`process_contours` with `use_padding`):
    /// for each region in order, a grid of step `step_level0` from the top-left of the
    /// contour's bounding box to its end, each tile kept by that region. A tile may appear
    /// under two regions, as in CLAM.
    pub fn clam_coords(&self, extent_level0: u64, step_level0: u64) -> Vec<(u64, u64)> {
        let (e, step) = (extent_level0 as i64, step_level0.max(1) as i64);
        let mut out = Vec::new();
        for r in &self.regions {
            let b = r.contour_level0.bbox();
            // cv2.boundingRect: x, y, width = max - min + 1.
            let (stop_x, stop_y) = (b.2 + 1, b.3 + 1);
            // CLAM's meshgrid with indexing="ij", flattened: x outer, y inner.
            let mut x = b.0;
            while x < stop_x {
                let mut y = b.1;
                while y < stop_y {
                    if r.keeps(x, y, e) {
                        out.push((x as u64, y as u64));
                    }
                    y += step;
                }
                x += step;
            }
        }
        out
    }
}

/// Colours of the picture: tissue contours, holes, kept tiles.
pub const TISSUE_COLOUR: Rgb<u8> = Rgb([0, 255, 0]);
pub const HOLE_COLOUR: Rgb<u8> = Rgb([0, 0, 255]);
pub const TILE_COLOUR: Rgb<u8> = Rgb([255, 0, 0]);

fn plot(img: &mut RgbImage, x: i64, y: i64, half: i64, colour: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for yy in (y - half).max(0)..=(y + half).min(h - 1) {
        for xx in (x - half).max(0)..=(x + half).min(w - 1) {
            img.put_pixel(xx as u32, yy as u32, colour);
        }
    }
}

/// The picture a person checks a slide with: `rgb` (the segmentation-level picture) with the
/// outline of each kept tile (level-0 top-left corners `tiles`, side `extent_level0`), then
/// the tissue contours and their holes, lines `thickness` pixels wide.
pub fn draw(
    rgb: &RgbImage,
    tissue: &Tissue,
    tiles: &[(u64, u64)],
    extent_level0: u64,
    thickness: u32,
) -> RgbImage {
    let mut img = rgb.clone();
    let half = i64::from(thickness.max(1) - 1) / 2;
    let (sx, sy) = tissue.scale;
    for &(x0, y0) in tiles {
        let l = (x0 as f64 / sx).floor() as i64;
        let t = (y0 as f64 / sy).floor() as i64;
        let r = (((x0 + extent_level0) as f64 / sx).ceil() as i64 - 1).max(l);
        let b = (((y0 + extent_level0) as f64 / sy).ceil() as i64 - 1).max(t);
        for x in l..=r {
            plot(&mut img, x, t, 0, TILE_COLOUR);
            plot(&mut img, x, b, 0, TILE_COLOUR);
        }
        for y in t..=b {
            plot(&mut img, l, y, 0, TILE_COLOUR);
            plot(&mut img, r, y, 0, TILE_COLOUR);
        }
    }
    for r in &tissue.regions {
        for &(x, y) in &r.contour {
            plot(&mut img, x.into(), y.into(), half, TISSUE_COLOUR);
        }
        for h in &r.holes {
            for &(x, y) in h {
                plot(&mut img, x.into(), y.into(), half, HOLE_COLOUR);
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
    const RED: Rgb<u8> = Rgb([200, 30, 40]);

    /// White picture with the listed rectangles `(x0, y0, x1, y1)` (inclusive) painted.
    fn picture(w: u32, h: u32, rects: &[(u32, u32, u32, u32, Rgb<u8>)]) -> RgbImage {
        let mut img = RgbImage::from_pixel(w, h, WHITE);
        for &(x0, y0, x1, y1, c) in rects {
            for y in y0..=y1 {
                for x in x0..=x1 {
                    img.put_pixel(x, y, c);
                }
            }
        }
        img
    }

    /// Settings under which the mask is exactly the painted shapes: no blur, no closing, and
    /// areas in units of 64 pixels at scale 64 (`int(512^2 / 64^2)` = 64).
    fn plain(a_t: u32, a_h: u32, max_n_holes: usize) -> TissueParams {
        TissueParams {
            mthresh: 1,
            close: 0,
            a_t,
            a_h,
            max_n_holes,
            ..TissueParams::default()
        }
    }

    #[test]
    fn defaults_and_presets_are_clams() {
        let d = TissueParams::default();
        assert_eq!(
            (d.sthresh, d.sthresh_up, d.mthresh, d.close, d.use_otsu),
            (8, 255, 7, 4, false)
        );
        assert_eq!((d.a_t, d.a_h, d.max_n_holes), (100, 16, 8));
        assert_eq!("clam".parse::<TissueParams>().unwrap(), d);
        let t: TissueParams = "tcga".parse().unwrap();
        assert_eq!(
            (t.sthresh, t.mthresh, t.close, t.a_t, t.a_h, t.max_n_holes),
            (8, 7, 4, 16, 4, 8)
        );
        let b: TissueParams = "bwh_biopsy".parse().unwrap();
        assert_eq!(
            (b.sthresh, b.mthresh, b.close, b.a_t, b.a_h, b.max_n_holes),
            (15, 11, 2, 1, 1, 2)
        );
        assert!(!b.use_otsu && b.sthresh_up == 255);
        assert!("none".parse::<TissueParams>().is_err());
        assert!("TCGA".parse::<TissueParams>().is_err());
        assert!(d.validate().is_ok());
        assert!(TissueParams { mthresh: 4, ..d }.validate().is_err());
    }

    #[test]
    fn seg_level_is_openslides_best_level_for_64() {
        assert_eq!(seg_level(&[1.0]), 0);
        assert_eq!(seg_level(&[1.0, 4.0, 16.0]), 2);
        assert_eq!(seg_level(&[1.0, 4.0, 16.0, 64.0]), 3);
        assert_eq!(seg_level(&[1.0, 4.0, 16.0, 64.0001]), 2);
        assert_eq!(seg_level(&[1.0, 4.000_2, 16.001, 32.0, 128.0]), 3);
        assert_eq!(seg_level(&[1.0, 2.0]), 1);
        assert_eq!(best_level_for_downsample(&[1.0, 4.0], 0.5), 0);
        assert_eq!(seg_level(&[]), 0);
        assert_eq!(
            level_scale((40_000, 30_000), (625, 469)),
            (64.0, 30_000.0 / 469.0)
        );
    }

    #[test]
    fn two_blobs_one_below_the_tissue_area() {
        // At scale 64 a reference patch is 64 pixels: with a_t = 1 a blob needs an area over
        // 64. A 20 x 20 square has area 19^2 = 361; an 8 x 8 one 7^2 = 49.
        let img = picture(60, 40, &[(5, 5, 24, 24, RED), (40, 10, 47, 17, RED)]);
        let t = segment(&img, (64.0, 64.0), &plain(1, 1, 8));
        assert_eq!(t.contours.len(), 2);
        assert_eq!(t.regions.len(), 1);
        let r = &t.regions[0];
        assert_eq!(r.area, 361.0);
        assert_eq!(r.contour[0], (5, 5));
        assert_eq!(r.contour_level0.points[0], (320, 320));
        assert!(r.holes.is_empty());
        // Both pass with a_t = 0, none with a_t = 6 (6 * 64 = 384 > 361).
        assert_eq!(
            segment(&img, (64.0, 64.0), &plain(0, 1, 8)).regions.len(),
            2
        );
        assert!(segment(&img, (64.0, 64.0), &plain(6, 1, 8))
            .regions
            .is_empty());
    }

    #[test]
    fn square_with_a_hole_keeps_tiles_on_tissue_only() {
        // Tissue 10..=49, hole 22..=37 (seg px); the hole border has area 17^2 - 2 = 287.
        let img = picture(60, 60, &[(10, 10, 49, 49, RED), (22, 22, 37, 37, WHITE)]);
        let t = segment(&img, (64.0, 64.0), &plain(1, 1, 8));
        assert_eq!(t.regions.len(), 1);
        let r = &t.regions[0];
        assert_eq!(r.holes.len(), 1);
        assert_eq!(r.area, 39.0 * 39.0 - 287.0);
        // Level 0: tissue 640..=3136, hole border 1344..=2432.
        let e = 256;
        assert!(t.keep(700, 700, e));
        // Centre (1888, 1888) inside the hole: dropped though its four points are in the
        // outer contour.
        assert!(!t.keep(1760, 1760, e));
        assert!(!t.keep(0, 0, e));
        // Only the corner point (640, 640) touches the contour, at a vertex: on counts.
        assert!(t.keep(448, 448, e));
        assert!(!t.keep(447, 447, e));
        // A hole under a_h (1 reference patch = 64 pixels here, 287 > 64 < 5 * 64) is no hole.
        let t = segment(&img, (64.0, 64.0), &plain(1, 5, 8));
        assert!(t.regions[0].holes.is_empty());
        assert!(t.keep(1760, 1760, e));
    }

    #[test]
    fn only_the_largest_holes_are_kept() {
        // Holes of 4 x 4, 8 x 8 and 6 x 6 pixels (areas 23, 79, 47); keep the 2 largest, then
        // those over a_h: with a_h = 0 both, with a_h = 1 (64 pixels) only the 8 x 8.
        let img = picture(
            60,
            30,
            &[
                (2, 2, 57, 27, RED),
                (5, 5, 8, 8, WHITE),
                (20, 5, 27, 12, WHITE),
                (40, 5, 45, 10, WHITE),
            ],
        );
        let t = segment(&img, (64.0, 64.0), &plain(0, 0, 2));
        let areas: Vec<f64> = t.regions[0]
            .holes
            .iter()
            .map(|h| contours::contour_area(h))
            .collect();
        assert_eq!(areas, vec![79.0, 47.0]);
        let t = segment(&img, (64.0, 64.0), &plain(0, 1, 2));
        assert_eq!(t.regions[0].holes.len(), 1);
        // The net area subtracts every hole, kept or not.
        assert_eq!(t.regions[0].area, 55.0 * 25.0 - 23.0 - 79.0 - 47.0);
    }

    #[test]
    fn ring_line_and_nothing() {
        // A ring: one region with one hole; a tile in the middle is not kept.
        let mut img = RgbImage::from_pixel(50, 50, WHITE);
        for y in 0..50 {
            for x in 0..50 {
                let d = (x as i32 - 25).pow(2) + (y as i32 - 25).pow(2);
                if (100..400).contains(&d) {
                    img.put_pixel(x, y, RED);
                }
            }
        }
        let t = segment(&img, (16.0, 16.0), &plain(0, 0, 8));
        assert_eq!(t.regions.len(), 1);
        assert_eq!(t.regions[0].holes.len(), 1);
        assert!(!t.keep(25 * 16 - 64, 25 * 16 - 64, 128));
        assert!(t.keep(8 * 16 - 64, 25 * 16 - 64, 128));
        // A one-pixel line has area 0: never tissue, whatever a_t.
        let line = picture(30, 10, &[(2, 4, 27, 4, RED)]);
        let t = segment(&line, (64.0, 64.0), &plain(0, 0, 8));
        assert_eq!(t.contours.len(), 1);
        assert!(t.regions.is_empty());
        // No tissue at all: no contour, no tile, also with Otsu.
        let blank = RgbImage::from_pixel(40, 30, Rgb([240, 240, 240]));
        for use_otsu in [false, true] {
            let p = TissueParams {
                use_otsu,
                ..TissueParams::default()
            };
            let t = segment(&blank, (64.0, 64.0), &p);
            assert!(t.contours.is_empty() && t.regions.is_empty());
            assert!(t.mask.as_raw().iter().all(|&v| v == 0));
            assert!(!t.keep(0, 0, 512));
        }
    }

    #[test]
    fn default_settings_on_a_blob() {
        // With CLAM's defaults (median 7, close 4, a_t 100): a 100 x 80 blob at scale 16
        // (reference patch 1024 pixels, so tissue needs over 102,400: too small) and at
        // scale 4 (reference patch int(262144 / 16) = 16384: needs 1,638,400: too small) ...
        let img = picture(140, 120, &[(20, 20, 119, 99, RED)]);
        assert!(segment(&img, (16.0, 16.0), &TissueParams::default())
            .regions
            .is_empty());
        // ... but at scale 64 (64 pixels, needs 6400) it is tissue. The median rounds its
        // corners; the 4 x 4 closing (anchor 2: dilate over rows y-2..=y+1, erode the same)
        // moves it by one pixel right and down, as cv2's does: rows 21..=100, columns 21..=120.
        let t = segment(&img, (64.0, 64.0), &TissueParams::default());
        assert_eq!(t.regions.len(), 1);
        let at = |x, y| t.mask.get_pixel(x, y)[0];
        assert_eq!(
            (at(60, 20), at(60, 21), at(60, 100), at(60, 101)),
            (0, 255, 255, 0)
        );
        assert_eq!(
            (at(20, 60), at(21, 60), at(120, 60), at(121, 60)),
            (0, 255, 255, 0)
        );
        assert_eq!((at(21, 21), at(22, 22)), (0, 255));
        let e = 512;
        assert!(t.keep(64 * 60, 64 * 60, e));
        assert!(!t.keep(0, 0, e));
        // CLAM's own grid starts at the contour's level-0 bounding box; every tile it lists is
        // one that keep() keeps.
        let coords = t.clam_coords(e, e);
        assert!(!coords.is_empty());
        assert!(coords.iter().all(|&(x, y)| t.keep(x, y, e)));
        let b = t.regions[0].contour_level0.bbox();
        assert!(coords
            .iter()
            .all(|&(x, y)| x as i64 >= b.0 && y as i64 >= b.1));
    }

    #[test]
    fn picture_draws_tiles_contours_and_holes() {
        let img = picture(60, 60, &[(10, 10, 49, 49, RED), (22, 22, 37, 37, WHITE)]);
        let t = segment(&img, (64.0, 64.0), &plain(1, 1, 8));
        // One kept tile of 256 level-0 pixels at (704, 704): seg pixels 11..=14.
        let d = draw(&img, &t, &[(704, 704)], 256, 1);
        assert_eq!(d.dimensions(), img.dimensions());
        assert_eq!(*d.get_pixel(12, 11), TILE_COLOUR);
        assert_eq!(*d.get_pixel(14, 13), TILE_COLOUR);
        assert_eq!(*d.get_pixel(12, 12), RED);
        assert_eq!(*d.get_pixel(10, 30), TISSUE_COLOUR);
        assert_eq!(*d.get_pixel(21, 30), HOLE_COLOUR);
        assert_eq!(*d.get_pixel(0, 0), WHITE);
        // Thicker lines spread around the contour.
        let d = draw(&img, &t, &[], 256, 3);
        assert_eq!(*d.get_pixel(9, 30), TISSUE_COLOUR);
    }
}
