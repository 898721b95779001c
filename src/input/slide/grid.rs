//! A slide's resolution and the grid of tiles laid on it, as pure arithmetic (no OpenSlide):
//! the slide's microns per pixel from its properties, the level a resolution is read from, and
//! each tile's region.
//!
//! With target resolution T µm/px and level-0 resolution S, a target pixel is f = T/S level-0
//! pixels. Tiles are read at the level with the largest downsample d <= f (within 0.1%: never
//! upsampled from a coarser level), `round(patch * f)` level-0 pixels a side, `round(stride *
//! f)` apart, only where wholly inside level 0, row by row from the top left; the region read
//! is `round(extent / d)` level pixels a side (clamped to the level), then resized to the
//! patch size.

use serde::{Deserialize, Serialize};

/// Detected level-0 resolutions outside this range are not believed (a 72-dpi TIFF says
/// 352.78 µm/px): `--slide-mpp` must say.
pub const PLAUSIBLE_MPP: std::ops::RangeInclusive<f64> = 0.05..=10.0;

/// How far a level's downsample may exceed the wanted factor and still be read from.
const LEVEL_TOLERANCE: f64 = 1e-3;

/// One level of a slide.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Level {
    pub width: u64,
    pub height: u64,
    pub downsample: f64,
}

/// The slide's level-0 µm/px and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Mpp {
    pub value: f64,
    /// The property (or properties) read, e.g. `openslide.mpp-x`, `aperio.MPP`.
    pub source: String,
}

/// Why a slide's resolution cannot be trusted (the caller adds the file and the fix).
#[derive(Debug, Clone, PartialEq)]
pub enum MppProblem {
    Missing,
    /// A value found, but not a plausible microscope resolution (or not a number).
    Implausible {
        source: String,
        value: String,
    },
    /// Pixels that are not square (mpp-x and mpp-y more than 1% apart).
    NotSquare {
        x: f64,
        y: f64,
    },
}

impl std::fmt::Display for MppProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MppProblem::Missing => f.write_str(
                "it records no resolution (no openslide.mpp-x, aperio.MPP or TIFF resolution)",
            ),
            MppProblem::Implausible { source, value } => write!(
                f,
                "its resolution {source} = {value} µm/px is not plausible for a microscope slide \
                 (expected {}..={} µm/px)",
                PLAUSIBLE_MPP.start(),
                PLAUSIBLE_MPP.end()
            ),
            MppProblem::NotSquare { x, y } => write!(
                f,
                "its pixels are not square (openslide.mpp-x = {x}, openslide.mpp-y = {y})"
            ),
        }
    }
}

/// The level-0 µm/px a slide's properties give: `openslide.mpp-x`/`mpp-y` (within 1% of each
/// other), else `aperio.MPP`, else `tiff.XResolution` in `tiff.ResolutionUnit` (centimeter or
/// inch). A value found but implausible is refused, never passed over for the next.
pub fn slide_mpp(prop: impl Fn(&str) -> Option<String>) -> Result<Mpp, MppProblem> {
    let number = |name: &str| prop(name).map(|v| (v.trim().parse::<f64>().ok(), v));
    let checked = |source: String, value: Option<f64>, text: String| match value {
        Some(v) if v.is_finite() && PLAUSIBLE_MPP.contains(&v) => Ok(Mpp { value: v, source }),
        _ => Err(MppProblem::Implausible {
            source,
            value: text.trim().to_string(),
        }),
    };
    if let Some((x, xt)) = number("openslide.mpp-x") {
        match number("openslide.mpp-y") {
            Some((Some(y), _)) if x.is_some_and(|x| (x - y).abs() > 0.01 * x.max(y)) => {
                return Err(MppProblem::NotSquare { x: x.unwrap(), y });
            }
            _ => return checked("openslide.mpp-x".into(), x, xt),
        }
    }
    if let Some((v, t)) = number("aperio.MPP") {
        return checked("aperio.MPP".into(), v, t);
    }
    if let Some((res, t)) = number("tiff.XResolution") {
        let unit = prop("tiff.ResolutionUnit").unwrap_or_default();
        let um_per_unit = match unit.trim().to_ascii_lowercase().as_str() {
            "centimeter" | "3" => 10_000.0,
            "inch" | "2" => 25_400.0,
            // No unit (or "none"): the numbers mean nothing.
            _ => return Err(MppProblem::Missing),
        };
        let source = format!("tiff.XResolution = {} per {unit}", t.trim());
        return match res.filter(|r| *r > 0.0) {
            Some(r) => checked(
                source,
                Some(um_per_unit / r),
                format!("{}", um_per_unit / r),
            ),
            None => Err(MppProblem::Implausible { source, value: t }),
        };
    }
    Err(MppProblem::Missing)
}

/// The level to read a target pixel of `factor` level-0 pixels from: the largest downsample
/// not above it (within 0.1%), level 0 when none is (then tiles are upsampled).
pub fn choose_level(levels: &[Level], factor: f64) -> usize {
    let mut best = 0;
    for (k, l) in levels.iter().enumerate() {
        if l.downsample <= factor * (1.0 + LEVEL_TOLERANCE)
            && l.downsample > levels[best].downsample
        {
            best = k;
        }
    }
    best
}

/// A grid on a slide: where each tile is in level 0 and how it is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    /// Level-0 pixels per target pixel.
    pub factor: f64,
    /// The level read.
    pub level: usize,
    /// A tile's side in level-0 pixels, and the step between tiles.
    pub extent: u64,
    pub step: u64,
    /// Tiles across and down.
    pub cols: u64,
    pub rows: u64,
    /// A region's side at the level read (before clamping to the level's bounds).
    pub read_size: u64,
    /// The tile's side after resizing (the requested patch size).
    pub patch: u32,
    #[serde(skip)]
    level_dims: (u64, u64),
    #[serde(skip)]
    downsample: f64,
}

/// One tile's region: level-0 top left, the level, and its size at that level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub x: u64,
    pub y: u64,
    pub level: u32,
    pub w: u64,
    pub h: u64,
}

impl Grid {
    /// The grid of `patch`-pixel tiles `stride` apart at `target_mpp`, on a slide whose level
    /// 0 is `slide_mpp` µm/px. An error when a tile would be under one level-0 pixel.
    pub fn new(
        levels: &[Level],
        slide_mpp: f64,
        target_mpp: f64,
        patch: u32,
        stride: u32,
    ) -> Result<Grid, String> {
        let factor = target_mpp / slide_mpp;
        let extent = (patch as f64 * factor).round() as u64;
        let step = (stride as f64 * factor).round() as u64;
        if extent == 0 || step == 0 {
            return Err(format!(
                "a tile of {patch} px at {target_mpp} µm/px would be {extent} level-0 pixels \
                 ({slide_mpp} µm/px) and its stride {step}"
            ));
        }
        let level = choose_level(levels, factor);
        let l0 = levels[0];
        let fit = |side: u64| {
            if side >= extent {
                (side - extent) / step + 1
            } else {
                0
            }
        };
        let l = levels[level];
        Ok(Grid {
            factor,
            level,
            extent,
            step,
            cols: fit(l0.width),
            rows: fit(l0.height),
            read_size: ((extent as f64 / l.downsample).round() as u64).max(1),
            patch,
            level_dims: (l.width, l.height),
            downsample: l.downsample,
        })
    }

    pub fn len(&self) -> usize {
        (self.cols * self.rows) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tile `idx` (row by row from the top left).
    pub fn region(&self, idx: usize) -> Region {
        let (row, col) = (idx as u64 / self.cols, idx as u64 % self.cols);
        let (x, y) = (col * self.step, row * self.step);
        // Where the tile starts in the level, and what of it the level holds.
        let clamp = |pos: u64, side: u64| {
            let start = (pos as f64 / self.downsample).floor() as u64;
            self.read_size.min(side.saturating_sub(start)).max(1)
        };
        Region {
            x,
            y,
            level: self.level as u32,
            w: clamp(x, self.level_dims.0),
            h: clamp(y, self.level_dims.1),
        }
    }

    /// Tile `idx`'s name: `{idx}_x{x}_y{y}.png`, the index zero-padded to at least 6 digits
    /// (as many as the count has), so that name order is grid order.
    pub fn name(&self, idx: usize) -> String {
        let width = self.len().to_string().len().max(6);
        let r = self.region(idx);
        format!("{idx:0width$}_x{}_y{}.png", r.x, r.y)
    }

    /// The tile index a name of [`Grid::name`] holds.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        let idx: usize = name.split('_').next()?.parse().ok()?;
        (idx < self.len() && self.name(idx) == name).then_some(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn levels(w: u64, h: u64, downs: &[u64]) -> Vec<Level> {
        downs
            .iter()
            .map(|&d| Level {
                width: w / d,
                height: h / d,
                downsample: d as f64,
            })
            .collect()
    }

    fn props(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn level_is_the_largest_downsample_not_above_the_factor() {
        let l = levels(4096, 4096, &[1, 4, 16]);
        assert_eq!(choose_level(&l, 1.0), 0);
        assert_eq!(choose_level(&l, 2.0), 0);
        assert_eq!(choose_level(&l, 3.999), 1, "within 0.1% of 4");
        assert_eq!(
            choose_level(&l, 3.99),
            0,
            "more than 0.1% below 4: never upsample"
        );
        assert_eq!(choose_level(&l, 4.0), 1);
        assert_eq!(choose_level(&l, 15.0), 1);
        assert_eq!(choose_level(&l, 64.0), 2);
        assert_eq!(choose_level(&l, 0.5), 0, "finer than level 0: level 0");
        // Levels need not be sorted (the largest qualifying one wins).
        let shuffled = vec![l[0], l[2], l[1]];
        assert_eq!(choose_level(&shuffled, 5.0), 2);
    }

    #[test]
    fn grid_arithmetic() {
        // 40x slide (0.25 µm/px) at 20x (0.5): 512 level-0 px, level 0, resize 512 -> 256.
        let l = levels(3000, 2000, &[1, 4, 16]);
        let g = Grid::new(&l, 0.25, 0.5, 256, 256).unwrap();
        assert_eq!((g.level, g.extent, g.step, g.read_size), (0, 512, 512, 512));
        assert_eq!((g.cols, g.rows, g.len()), (5, 3, 15));
        assert_eq!(
            g.region(6),
            Region {
                x: 512,
                y: 512,
                level: 0,
                w: 512,
                h: 512
            }
        );
        assert_eq!(g.name(6), "000006_x512_y512.png");
        assert_eq!(g.index_of("000006_x512_y512.png"), Some(6));
        assert_eq!(g.index_of("000006_x512_y0.png"), None);
        assert_eq!(g.index_of("000099_x0_y0.png"), None);
        // At 10x (1.0): level 1 (downsample 4), 1024 level-0 px read as 256.
        let g = Grid::new(&l, 0.25, 1.0, 256, 256).unwrap();
        assert_eq!(
            (g.level, g.extent, g.read_size, g.cols, g.rows),
            (1, 1024, 256, 2, 1)
        );
        // Overlap: stride 128 at 0.5 µm/px = 256 level-0 px: (3000-512)/256+1 = 10.
        let g = Grid::new(&l, 0.25, 0.5, 256, 128).unwrap();
        assert_eq!((g.step, g.cols, g.rows), (256, 10, 6));
        // Non-integer factor: 0.2527 µm/px slide at 0.5: f = 1.97863..., extent round(506.5).
        let g = Grid::new(&l, 0.2527, 0.5, 256, 256).unwrap();
        assert_eq!((g.level, g.extent, g.read_size), (0, 507, 507));
        // Too small a slide: no tile fits.
        let g = Grid::new(&levels(500, 500, &[1]), 0.25, 0.5, 256, 256).unwrap();
        assert!(g.is_empty());
        assert!(Grid::new(&l, 0.25, 0.0001, 256, 256).is_err());
    }

    #[test]
    fn regions_are_clamped_to_the_level() {
        // A level whose downsample is above the factor is not read from.
        let l = vec![
            Level {
                width: 1030,
                height: 1030,
                downsample: 1.0,
            },
            Level {
                width: 250,
                height: 250,
                downsample: 4.12,
            },
        ];
        let g = Grid::new(&l, 0.25, 1.0, 250, 1).unwrap();
        assert_eq!(g.level, 0, "4.12 is above the factor 4");
        // A level cut short (as some scanners' are): the region stops at its edge.
        let l = vec![
            Level {
                width: 1024,
                height: 1024,
                downsample: 1.0,
            },
            Level {
                width: 250,
                height: 250,
                downsample: 4.0,
            },
        ];
        let g = Grid::new(&l, 0.25, 1.0, 64, 64).unwrap();
        let r = g.region(g.cols as usize - 1);
        assert_eq!((r.x, r.w, r.h), (768, 250 - 192, 64));
    }

    #[test]
    fn names_are_padded_to_the_count() {
        let l = levels(1_000_000, 2_000, &[1]);
        let g = Grid::new(&l, 1.0, 1.0, 1, 1).unwrap();
        assert_eq!(g.len(), 2_000_000_000);
        assert_eq!(g.name(5), "0000000005_x5_y0.png");
    }

    #[test]
    fn mpp_from_properties() {
        let m = slide_mpp(props(&[
            ("openslide.mpp-x", "0.2527"),
            ("openslide.mpp-y", "0.2529"),
        ]));
        assert_eq!(
            m.unwrap(),
            Mpp {
                value: 0.2527,
                source: "openslide.mpp-x".into()
            }
        );
        let m = slide_mpp(props(&[
            ("openslide.mpp-x", "0.25"),
            ("openslide.mpp-y", "0.5"),
        ]));
        assert_eq!(m.unwrap_err(), MppProblem::NotSquare { x: 0.25, y: 0.5 });
        let m = slide_mpp(props(&[("aperio.MPP", "0.499"), ("aperio.AppMag", "20")]));
        assert_eq!(m.unwrap().source, "aperio.MPP");
        // openslide.mpp-x wins over aperio.MPP.
        let m = slide_mpp(props(&[
            ("aperio.MPP", "0.499"),
            ("openslide.mpp-x", "0.25"),
        ]));
        assert_eq!(m.unwrap().value, 0.25);
        let cm = props(&[
            ("tiff.XResolution", "40000"),
            ("tiff.ResolutionUnit", "centimeter"),
        ]);
        assert_eq!(slide_mpp(cm).unwrap().value, 0.25);
        let inch = props(&[
            ("tiff.XResolution", "50800"),
            ("tiff.ResolutionUnit", "inch"),
        ]);
        assert_eq!(slide_mpp(inch).unwrap().value, 0.5);
        // 72 dpi: 352.78 µm/px, refused rather than believed.
        let dpi = props(&[("tiff.XResolution", "72"), ("tiff.ResolutionUnit", "inch")]);
        match slide_mpp(dpi).unwrap_err() {
            MppProblem::Implausible { value, .. } => assert!(value.starts_with("352.7"), "{value}"),
            e => panic!("{e:?}"),
        }
        let none = props(&[("tiff.XResolution", "72"), ("tiff.ResolutionUnit", "none")]);
        assert_eq!(slide_mpp(none).unwrap_err(), MppProblem::Missing);
        assert_eq!(slide_mpp(props(&[])).unwrap_err(), MppProblem::Missing);
        for bad in ["0", "-1", "nan", "abc", "352.78", "inf"] {
            let e = slide_mpp(props(&[("openslide.mpp-x", bad)])).unwrap_err();
            assert!(matches!(e, MppProblem::Implausible { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
