//! Tile coordinates from tile file names.
//!
//! Tiling tools write each tile's position into its file name. [`CONVENTIONS`] knows five,
//! each checked against its tool's own source: histolab (`tile_{n}_level{L}_{x0}-{y0}-{x1}-{y1}`,
//! level-0 top-left and bottom-right, x1/y1 exclusive), TRIDENT's `--dump_patches`
//! (`{idx:06d}_x{x}_y{y}`, level-0 top-left), QuPath's TileExporter
//! (`{image} [d=..,x=..,y=..,w=..,h=..]`, full-resolution top-left and size), slideflow's
//! exports (`{slide}-{x}-{y}`, level-0 centre) and STAMP's tile archives (`tile_({x}, {y})`,
//! micrometres, top-left). A user's own convention is a regex with named groups `x` and `y`.
//!
//! `auto` takes the first convention (in that order, most specific first) that every tile's
//! name matches: a sample whose names mix conventions, or match none, gets no coordinates,
//! with a message naming a tile that does not match. Only the file name is matched (not the
//! folders above it).

use regex::Regex;

use super::Tile;

/// Where in the tile a name's x,y point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    TopLeft,
    Centre,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::TopLeft => "top-left",
            Origin::Centre => "centre",
        }
    }
}

/// The unit of a name's x,y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Pixels of the slide's level 0 (full resolution).
    Level0Pixels,
    Micrometres,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Level0Pixels => "level-0 pixels",
            Unit::Micrometres => "micrometres",
        }
    }
}

/// A naming convention: a pattern over the file name with groups `x` and `y` (and, where the
/// name has them, the tile's level-0 extent `w`/`x1` and its pyramid `level`).
pub struct Convention {
    pub name: &'static str,
    pub tool: &'static str,
    pub pattern: &'static str,
    pub origin: Origin,
    pub unit: Unit,
}

/// The known conventions, most specific first (a histolab name also matches slideflow's
/// pattern, so histolab is tried first).
pub const CONVENTIONS: [Convention; 5] = [
    Convention {
        name: "histolab",
        tool: "histolab",
        pattern: r"tile_\d+_level(?P<level>\d+)_(?P<x>\d+)-(?P<y>\d+)-(?P<x1>\d+)-(?P<y1>\d+)",
        origin: Origin::TopLeft,
        unit: Unit::Level0Pixels,
    },
    Convention {
        name: "qupath",
        tool: "QuPath TileExporter",
        pattern: r"^.* \[(?:d=(?P<d>[0-9.]+),)?x=(?P<x>\d+),y=(?P<y>\d+),w=(?P<w>\d+),h=(?P<h>\d+)(?:,z=\d+)?(?:,t=\d+)?\]\.[A-Za-z]+$",
        origin: Origin::TopLeft,
        unit: Unit::Level0Pixels,
    },
    Convention {
        name: "trident",
        tool: "TRIDENT --dump_patches",
        pattern: r"^\d+_x(?P<x>\d+)_y(?P<y>\d+)\.[A-Za-z]+$",
        origin: Origin::TopLeft,
        unit: Unit::Level0Pixels,
    },
    Convention {
        name: "stamp",
        tool: "STAMP tile archives",
        pattern: r"^tile_\((?P<x>-?[0-9][0-9.eE+-]*), (?P<y>-?[0-9][0-9.eE+-]*)\)\.[A-Za-z]+$",
        origin: Origin::TopLeft,
        unit: Unit::Micrometres,
    },
    Convention {
        name: "slideflow",
        tool: "slideflow",
        pattern: r"^.+-(?P<x>\d+)-(?P<y>\d+)\.[A-Za-z]+$",
        origin: Origin::Centre,
        unit: Unit::Level0Pixels,
    },
];

/// `--coords`: find a known convention, none, or the user's regex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordsMode {
    Auto,
    None,
    Regex(String),
}

impl CoordsMode {
    pub fn parse(s: &str) -> CoordsMode {
        match s {
            "auto" => CoordsMode::Auto,
            "none" => CoordsMode::None,
            _ => CoordsMode::Regex(s.to_string()),
        }
    }
}

/// Check a user's regex: it compiles and has groups `x` and `y`.
pub fn compile_user_regex(pattern: &str) -> Result<Regex, String> {
    let re =
        Regex::new(pattern).map_err(|e| format!("--coords {pattern:?} is not a regex: {e}"))?;
    let names: Vec<&str> = re.capture_names().flatten().collect();
    if !names.contains(&"x") || !names.contains(&"y") {
        return Err(format!(
            "--coords {pattern:?}: the regex needs named groups `x` and `y`, e.g. \
             '_x(?P<x>\\d+)_y(?P<y>\\d+)'"
        ));
    }
    Ok(re)
}

/// A sample's coordinates: one x,y per tile (in tile order), as the names give them.
#[derive(Debug, Clone, PartialEq)]
pub struct Coords {
    /// The convention's name (`histolab`, ...) or `regex:PATTERN`.
    pub convention: String,
    pub origin: Origin,
    pub unit: Unit,
    pub xy: Vec<[f64; 2]>,
    /// Every x and y is a whole number (written as integers).
    pub integral: bool,
    /// The tiles' extent in level-0 pixels, when the names give it and it is the same for
    /// every tile (histolab's x1-x0, QuPath's w).
    pub patch_size_level0: Option<u64>,
    /// The pyramid level the tiles were cut at, when the names give it and it is the same
    /// for every tile (histolab).
    pub patch_level: Option<u32>,
    /// QuPath's downsample, when the same for every tile.
    pub downsample: Option<f64>,
}

/// Why a sample has no coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoCoords(pub String);

/// The file name of a tile (its name without the folders above it).
fn file_name(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap_or(rel)
}

/// The largest magnitude a coordinate may have: every integer up to it is held exactly (as an
/// f64 here, an int64 in HDF5 and Parquet); beyond it, 9007199254740993 would silently become
/// ...992.
pub const MAX_COORDINATE: f64 = 9_007_199_254_740_992.0; // 2^53

/// A group's number and whether it is an integer: None when the group is missing or not a
/// number, an error when it is a number no file could hold exactly.
fn number(caps: &regex::Captures<'_>, group: &str) -> Result<Option<(f64, bool)>, String> {
    let Some(s) = caps.name(group).map(|m| m.as_str()) else {
        return Ok(None);
    };
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (value, integral) = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        // An integer is parsed as one (never through a float), then checked to be exact.
        match s.parse::<i64>() {
            Ok(i) if i.unsigned_abs() <= MAX_COORDINATE as u64 => {
                return Ok(Some((i as f64, true)))
            }
            _ => (f64::INFINITY, true),
        }
    } else {
        match s.parse::<f64>() {
            Ok(v) => (v, false),
            Err(_) => return Ok(None),
        }
    };
    if !value.is_finite() || value.abs() > MAX_COORDINATE {
        return Err(format!(
            "coordinate {s} is out of range (at most 2^53 = {} in magnitude{})",
            MAX_COORDINATE as u64,
            if integral { "" } else { ", a finite number" }
        ));
    }
    Ok(Some((value, integral)))
}

/// Per-tile facts a pattern gives: x, y, whether both are integers, extent, level.
struct Parsed {
    xy: [f64; 2],
    integral: bool,
    size: Option<u64>,
    level: Option<u32>,
    downsample: Option<f64>,
}

/// The facts `re` gives of a tile's name: None when it does not match, an error naming the
/// tile when it matches with a number out of range.
fn parse_name(re: &Regex, name: &str) -> Result<Option<Parsed>, String> {
    let Some(caps) = re.captures(file_name(name)) else {
        return Ok(None);
    };
    let in_tile = |e: String| format!("tile {name}: {e}");
    let (Some((x, xi)), Some((y, yi))) = (
        number(&caps, "x").map_err(in_tile)?,
        number(&caps, "y").map_err(in_tile)?,
    ) else {
        return Ok(None);
    };
    let size = match (caps.name("x1"), caps.name("w")) {
        (Some(x1), _) => match x1.as_str().parse::<u64>() {
            Ok(x1) => x1.checked_sub(x as u64),
            Err(_) => return Err(in_tile(format!("extent {} is out of range", x1.as_str()))),
        },
        (None, Some(w)) => w.as_str().parse::<u64>().ok(),
        _ => None,
    };
    Ok(Some(Parsed {
        xy: [x, y],
        integral: xi && yi,
        size,
        level: caps.name("level").and_then(|l| l.as_str().parse().ok()),
        downsample: caps.name("d").and_then(|d| d.as_str().parse().ok()),
    }))
}

/// The same value for every tile, or None.
fn uniform<T: PartialEq + Copy>(mut values: impl Iterator<Item = Option<T>>) -> Option<T> {
    let first = values.next()??;
    values.all(|v| v == Some(first)).then_some(first)
}

fn coords_from(convention: String, origin: Origin, unit: Unit, parsed: Vec<Parsed>) -> Coords {
    Coords {
        convention,
        origin,
        unit,
        integral: parsed.iter().all(|p| p.integral),
        patch_size_level0: uniform(parsed.iter().map(|p| p.size)),
        patch_level: uniform(parsed.iter().map(|p| p.level)),
        downsample: uniform(parsed.iter().map(|p| p.downsample.map(f64::to_bits)))
            .map(f64::from_bits),
        xy: parsed.into_iter().map(|p| p.xy).collect(),
    }
}

/// Every tile's name through `re`; the first that does not match is named in the error.
fn parse_all(re: &Regex, tiles: &[Tile], what: &str) -> Result<Vec<Parsed>, NoCoords> {
    tiles
        .iter()
        .map(|t| {
            parse_name(re, &t.rel).map_err(NoCoords)?.ok_or_else(|| {
                NoCoords(format!(
                    "tile {} does not match {what} (no numeric x and y in its name)",
                    t.rel
                ))
            })
        })
        .collect()
}

/// The coordinates of `tiles` under `mode` (`None` for `--coords none`). An error says why
/// there are none: which tile does not match which convention.
pub fn find(mode: &CoordsMode, tiles: &[Tile]) -> Result<Option<Coords>, NoCoords> {
    match mode {
        CoordsMode::None => Ok(None),
        CoordsMode::Regex(pattern) => {
            let re = compile_user_regex(pattern).map_err(NoCoords)?;
            let parsed = parse_all(&re, tiles, &format!("--coords {pattern:?}"))?;
            let name = format!("regex:{pattern}");
            Ok(Some(coords_from(
                name,
                Origin::TopLeft,
                Unit::Level0Pixels,
                parsed,
            )))
        }
        CoordsMode::Auto => {
            if tiles.is_empty() {
                return Ok(None);
            }
            // Each tile's convention is the most specific one its name follows (a histolab
            // name also follows slideflow's pattern, with other numbers): a convention is taken
            // only when it is every tile's. Regression: histolab tiles and one slideflow tile
            // all got slideflow's coordinates, histolab's top-left corners written as centres.
            let res: Vec<Regex> = CONVENTIONS
                .iter()
                .map(|c| Regex::new(c.pattern).expect("built-in pattern compiles"))
                .collect();
            let of = |t: &Tile| res.iter().position(|re| re.is_match(file_name(&t.rel)));
            let own: Vec<Option<usize>> = tiles.iter().map(of).collect();
            if let Some(i) = own[0].filter(|&i| own.iter().all(|&o| o == Some(i))) {
                let c = &CONVENTIONS[i];
                let parsed = parse_all(&res[i], tiles, c.name)?;
                return Ok(Some(coords_from(
                    c.name.to_string(),
                    c.origin,
                    c.unit,
                    parsed,
                )));
            }
            // The convention most tiles follow, and a tile that does not, for the message.
            let mut counts = [0usize; CONVENTIONS.len()];
            for i in own.iter().flatten() {
                counts[*i] += 1;
            }
            let best = (0..counts.len())
                .filter(|&i| counts[i] > 0)
                .max_by_key(|&i| (counts[i], std::cmp::Reverse(i)));
            Err(NoCoords(match best {
                Some(i) => {
                    let (t, other) = tiles
                        .iter()
                        .zip(&own)
                        .find(|(_, o)| **o != Some(i))
                        .expect("not every tile follows it");
                    format!(
                        "tile names mix conventions: {} of {} tiles are named as {} does, \
                         but tile {} is {}",
                        counts[i],
                        tiles.len(),
                        CONVENTIONS[i].tool,
                        t.rel,
                        match other {
                            Some(o) => format!("named as {} does", CONVENTIONS[*o].tool),
                            None => "not".to_string(),
                        }
                    )
                }
                None => format!(
                    "no tile name follows a known convention (histolab, QuPath, TRIDENT, \
                     STAMP, slideflow), e.g. {}; give --coords REGEX with groups x and y",
                    tiles[0].rel
                ),
            }))
        }
    }
}

/// How a name's x,y become integer level-0 pixels: `round(v / per_pixel) + shift`, where
/// `per_pixel` is the names' unit per level-0 pixel (1 for pixels, the slide's microns per
/// pixel for micrometres) and `shift` moves a centre to a corner or back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToLevel0 {
    pub per_pixel: f64,
    pub shift: i64,
}

impl ToLevel0 {
    pub fn apply(&self, v: f64) -> i64 {
        (v / self.per_pixel).round() as i64 + self.shift
    }
}

/// How a name's x,y become micrometres from the slide's top-left corner to the tile's:
/// `(v + shift) * per_unit` (STAMP's `coords`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ToMicrons {
    pub per_unit: f64,
    pub shift: f64,
}

impl ToMicrons {
    pub fn apply(&self, v: f64) -> f64 {
        (v + self.shift) * self.per_unit
    }
}

/// The names' unit per level-0 pixel: 1 for pixels (which must be whole), `slide_mpp` for
/// micrometres (which need it).
fn per_pixel(c: &Coords, slide_mpp: Option<f64>) -> Result<f64, String> {
    match c.unit {
        Unit::Micrometres => slide_mpp.ok_or_else(|| {
            format!(
                "tile names give micrometres ({}), not level-0 pixels: give --slide-mpp F (the \
                 slide's micrometres per pixel at level 0) to convert them, or write CSV or \
                 Parquet, or use --coords none",
                c.convention
            )
        }),
        Unit::Level0Pixels if !c.integral => Err(format!(
            "tile names give fractional coordinates ({}), HDF5's `coords` holds integer pixels",
            c.convention
        )),
        Unit::Level0Pixels => Ok(1.0),
    }
}

/// The tiles' extent in level-0 pixels, or why a conversion that needs it cannot be done.
fn extent(c: &Coords, size_level0: Option<u64>, needed_for: &str) -> Result<u64, String> {
    size_level0.or(c.patch_size_level0).ok_or_else(|| {
        format!(
            "tile names give {} ({}): {needed_for}, which needs the tiles' extent in level-0 \
             pixels: give --patch-size-level0 PX",
            match c.origin {
                Origin::Centre => "tile centres",
                Origin::TopLeft => "top-left corners",
            },
            c.convention
        )
    })
}

/// The integer level-0 top-left corners HDF5's `coords` holds (half the extent off a
/// centre): names with fractions, micrometres without `slide_mpp`, or centres without a known
/// tile extent cannot be converted (the error says why).
pub fn top_left(
    c: &Coords,
    size_level0: Option<u64>,
    slide_mpp: Option<f64>,
) -> Result<ToLevel0, String> {
    let per_pixel = per_pixel(c, slide_mpp)?;
    let shift = match c.origin {
        Origin::TopLeft => 0,
        Origin::Centre => {
            -((extent(c, size_level0, "HDF5's `coords` are top-left corners")? / 2) as i64)
        }
    };
    Ok(ToLevel0 { per_pixel, shift })
}

/// The integer level-0 tile centres slideflow's `.index.npz` holds (half the extent on from a
/// top-left corner), or why they cannot be had.
pub fn centre(
    c: &Coords,
    size_level0: Option<u64>,
    slide_mpp: Option<f64>,
) -> Result<ToLevel0, String> {
    // The same conditions as for corners: a known unit, integers, a known extent where needed.
    let corner = top_left(c, size_level0, slide_mpp)?;
    let shift = match c.origin {
        Origin::Centre => 0,
        Origin::TopLeft => {
            (extent(c, size_level0, "slideflow's index holds tile centres")? / 2) as i64
        }
    };
    Ok(ToLevel0 {
        per_pixel: corner.per_pixel,
        shift,
    })
}

/// Micrometre top-left corners (STAMP's `coords`): names in micrometres as they are, pixel
/// names times `slide_mpp` (which they then need), centres moved by half the extent.
pub fn microns(
    c: &Coords,
    size_level0: Option<u64>,
    slide_mpp: Option<f64>,
) -> Result<ToMicrons, String> {
    let per_unit = match (c.unit, slide_mpp) {
        (Unit::Micrometres, _) => 1.0,
        (Unit::Level0Pixels, Some(mpp)) => mpp,
        (Unit::Level0Pixels, None) => {
            return Err(format!(
                "tile names give level-0 pixels ({}): micrometres need the slide's \
                 micrometres per pixel at level 0: give --slide-mpp F",
                c.convention
            ))
        }
    };
    let shift = match c.origin {
        Origin::TopLeft => 0.0,
        Origin::Centre => {
            -((extent(c, size_level0, "STAMP's `coords` are top-left corners")? / 2) as f64)
        }
    };
    Ok(ToMicrons { per_unit, shift })
}

/// The names' x,y as HDF5's integer level-0 top-left corners (see [`top_left`]).
#[cfg(test)]
fn level0_top_left(
    c: &Coords,
    size_level0: Option<u64>,
    slide_mpp: Option<f64>,
) -> Result<Vec<[i64; 2]>, String> {
    let t = top_left(c, size_level0, slide_mpp)?;
    Ok(c.xy
        .iter()
        .map(|&[x, y]| [t.apply(x), t.apply(y)])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tiles(names: &[&str]) -> Vec<Tile> {
        names
            .iter()
            .map(|n| Tile::new(PathBuf::from(n), n.to_string()))
            .collect()
    }

    fn auto(names: &[&str]) -> Result<Option<Coords>, NoCoords> {
        find(&CoordsMode::Auto, &tiles(names))
    }

    /// Each convention, as its tool writes names: name -> convention and coordinates.
    #[test]
    fn each_convention_golden() {
        type Case<'a> = (&'a [&'a str], &'a str, Origin, Unit, &'a [[f64; 2]]);
        let cases: [Case<'_>; 6] = [
            (
                &[
                    "tile_0_level0_1024-2048-1536-2560.png",
                    "sub/pre_tile_12_level0_0-512-512-1024_suf.png",
                ],
                "histolab",
                Origin::TopLeft,
                Unit::Level0Pixels,
                &[[1024.0, 2048.0], [0.0, 512.0]],
            ),
            (
                &["000000_x0_y512.png", "000001_x224_y512.jpg"],
                "trident",
                Origin::TopLeft,
                Unit::Level0Pixels,
                &[[0.0, 512.0], [224.0, 512.0]],
            ),
            (
                &[
                    "slide 1.svs [d=2,x=1024,y=0,w=512,h=512].png",
                    "slide 1.svs [d=2,x=0,y=2048,w=512,h=512].png",
                ],
                "qupath",
                Origin::TopLeft,
                Unit::Level0Pixels,
                &[[1024.0, 0.0], [0.0, 2048.0]],
            ),
            (
                &["img [x=10,y=20,w=256,h=256,z=0,t=1].tif"],
                "qupath",
                Origin::TopLeft,
                Unit::Level0Pixels,
                &[[10.0, 20.0]],
            ),
            (
                &[
                    "TCGA-AA-3947-01Z-00-DX1-1536-768.jpg",
                    "TCGA-AA-3947-01Z-00-DX1-256-0.jpg",
                ],
                "slideflow",
                Origin::Centre,
                Unit::Level0Pixels,
                &[[1536.0, 768.0], [256.0, 0.0]],
            ),
            (
                &["tile_(256.0, 512.5).jpg", "tile_(0.0, 1e-05).jpg"],
                "stamp",
                Origin::TopLeft,
                Unit::Micrometres,
                &[[256.0, 512.5], [0.0, 1e-5]],
            ),
        ];
        for (names, conv, origin, unit, xy) in cases {
            let c = auto(names).unwrap().unwrap();
            assert_eq!(c.convention, conv, "{names:?}");
            assert_eq!((c.origin, c.unit), (origin, unit), "{names:?}");
            assert_eq!(c.xy, xy, "{names:?}");
        }
        let h = auto(&["tile_0_level1_100-200-612-712.png"])
            .unwrap()
            .unwrap();
        assert_eq!((h.patch_size_level0, h.patch_level), (Some(512), Some(1)));
        assert!(h.integral);
        let q = auto(&["a [d=4,x=0,y=0,w=1024,h=1024].png"])
            .unwrap()
            .unwrap();
        assert_eq!((q.patch_size_level0, q.downsample), (Some(1024), Some(4.0)));
        let s = auto(&["tile_(256.0, 512.5).jpg"]).unwrap().unwrap();
        assert!(!s.integral);
    }

    #[test]
    fn mixed_or_unknown_names_get_no_coordinates_and_a_reason() {
        let e = auto(&["000000_x0_y0.png", "000001_x0_y224.png", "other.png"]).unwrap_err();
        assert!(e.0.contains("2 of 3") && e.0.contains("TRIDENT") && e.0.contains("other.png"));
        let e = auto(&["a.png", "b.png"]).unwrap_err();
        assert!(
            e.0.contains("no tile name follows") && e.0.contains("a.png"),
            "{}",
            e.0
        );
        // The demo's names (tile_000_256.png) follow no convention.
        assert!(auto(&["tile_000_256.png"]).is_err());
        assert_eq!(auto(&[]), Ok(None));
        assert_eq!(
            find(&CoordsMode::None, &tiles(&["000000_x0_y0.png"])),
            Ok(None)
        );
    }

    /// Regression: histolab names also follow slideflow's pattern, so histolab tiles and one
    /// slideflow tile all got slideflow's coordinates (exit 0).
    #[test]
    fn a_mix_of_histolab_and_slideflow_names_has_no_coordinates() {
        let e = auto(&[
            "tile_0_level0_1024-2048-1536-2560.png",
            "tile_1_level0_0-512-512-1024.png",
            "slide-1536-768.png",
        ])
        .unwrap_err();
        assert!(
            e.0.contains("2 of 3 tiles are named as histolab does")
                && e.0
                    .contains("slide-1536-768.png is named as slideflow does"),
            "{}",
            e.0
        );
        // Either convention alone still has its coordinates.
        assert_eq!(
            auto(&["tile_1_level0_0-512-512-1024.png"])
                .unwrap()
                .unwrap()
                .convention,
            "histolab"
        );
        assert_eq!(
            auto(&["slide-1536-768.png"]).unwrap().unwrap().convention,
            "slideflow"
        );
    }

    /// Regression: coordinates went through f64 (9007199254740993 became ...992) and `1e20`
    /// was taken, then refused by HDF5 as "fractional".
    #[test]
    fn coordinates_beyond_exact_integers_are_refused_naming_the_tile() {
        let ok = auto(&["000000_x9007199254740992_y1.png"]).unwrap().unwrap();
        assert_eq!(ok.xy, [[9007199254740992.0, 1.0]]);
        assert!(ok.integral);
        for name in [
            "000000_x9007199254740993_y1.png",
            "000000_x99999999999999999999_y1.png",
            "tile_(1e20, 5.0).png",
            "tile_(1e400, 5.0).png",
        ] {
            let e = auto(&[name]).unwrap_err();
            assert!(
                e.0.contains(name) && e.0.contains("out of range"),
                "{}",
                e.0
            );
        }
        let mode = CoordsMode::Regex(r"r(?P<y>-?\d+)_c(?P<x>-?\d+)".into());
        let e = find(&mode, &tiles(&["r-9223372036854775808_c0.png"])).unwrap_err();
        assert!(e.0.contains("out of range"), "{}", e.0);
        let c = find(&mode, &tiles(&["r-12_c3.png"])).unwrap().unwrap();
        assert_eq!(c.xy, [[3.0, -12.0]]);
    }

    #[test]
    fn user_regex() {
        let mode = CoordsMode::Regex(r"r(?P<y>\d+)_c(?P<x>\d+)".into());
        let c = find(&mode, &tiles(&["r3_c4.png", "d/r10_c0.png"]))
            .unwrap()
            .unwrap();
        assert_eq!(c.xy, [[4.0, 3.0], [0.0, 10.0]]);
        assert_eq!(c.convention, r"regex:r(?P<y>\d+)_c(?P<x>\d+)");
        let e = find(&mode, &tiles(&["r3_c4.png", "zzz.png"])).unwrap_err();
        assert!(e.0.contains("zzz.png"));
        assert!(compile_user_regex(r"(?P<x>\d+)")
            .unwrap_err()
            .contains("`x` and `y`"));
        assert!(compile_user_regex(r"(")
            .unwrap_err()
            .contains("not a regex"));
    }

    #[test]
    fn level0_top_left_conversion() {
        let sf = auto(&["s-1536-768.jpg"]).unwrap().unwrap();
        assert!(level0_top_left(&sf, None, None)
            .unwrap_err()
            .contains("--patch-size-level0"));
        assert_eq!(
            level0_top_left(&sf, Some(512), None).unwrap(),
            [[1280, 512]]
        );
        let st = auto(&["tile_(1.0, 2.0).jpg"]).unwrap().unwrap();
        let e = level0_top_left(&st, None, None).unwrap_err();
        assert!(
            e.contains("micrometres") && e.contains("--slide-mpp"),
            "{e}"
        );
        let tr = auto(&["000003_x7_y9.png"]).unwrap().unwrap();
        assert_eq!(level0_top_left(&tr, None, None).unwrap(), [[7, 9]]);
        // A slide's mpp turns STAMP's micrometres into pixels (rounded), and changes nothing
        // for pixel names.
        let st = auto(&["tile_(256.0, 512.25).jpg"]).unwrap().unwrap();
        assert_eq!(
            level0_top_left(&st, None, Some(0.5)).unwrap(),
            [[512, 1025]]
        );
        assert_eq!(level0_top_left(&tr, None, Some(0.5)).unwrap(), [[7, 9]]);
        // Centres for slideflow's index; micrometres for STAMP.
        let c = centre(&tr, Some(10), None).unwrap();
        assert_eq!([c.apply(7.0), c.apply(9.0)], [12, 14]);
        assert!(centre(&tr, None, None)
            .unwrap_err()
            .contains("--patch-size-level0"));
        assert!(microns(&tr, None, None)
            .unwrap_err()
            .contains("--slide-mpp"));
        let m = microns(&tr, None, Some(0.25)).unwrap();
        assert_eq!([m.apply(7.0), m.apply(9.0)], [1.75, 2.25]);
        let m = microns(&sf, Some(512), Some(0.5)).unwrap();
        assert_eq!(m.apply(1536.0), 640.0);
        assert_eq!(microns(&st, None, None).unwrap().apply(512.25), 512.25);
    }
}
