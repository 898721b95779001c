//! Where a sample's tiles come from: a source lists them once, in the output's row order,
//! and the decode workers read each tile's bytes from it, in any order, from any thread.
//!
//! A source is a folder ([`folder::Folder`]), a zip archive ([`zip::Zip`]), a tar archive,
//! plain or gzip-compressed ([`tar::Tar`]), or a whole-slide image whose tiles are regions
//! read through OpenSlide ([`slide::Slide`]); archives are read in place, never unpacked. A
//! tile is named by its path relative to the source, `/`-separated (for an archive, its
//! member path): that name is the `tile` column of every output, and the row order is its
//! byte order. Only the bytes matter to the numbers (the cache keys by content), so the same
//! tiles from any source give the same features, and a slide computed as a folder is a cache
//! hit as a zip.

pub mod coords;
pub mod folder;
pub mod gz;
pub mod slide;
pub mod tar;
pub mod zip;

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::error::{fail, ExitKind};

/// One tile: where it is, and its name in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub path: PathBuf,
    /// Path relative to the tile source, `/`-separated (bytes that are not UTF-8 written as
    /// `\xNN`).
    pub rel: String,
    /// Why this tile is bad before it is even read (a name that is not UTF-8, a broken
    /// symbolic link): it is rejected like an undecodable one (`--on-error`).
    pub problem: Option<String>,
}

impl Tile {
    pub fn new(path: PathBuf, rel: String) -> Tile {
        Tile {
            path,
            rel,
            problem: None,
        }
    }
}

/// `bytes` as text: valid UTF-8 as it is, every other byte as `\xNN` (so that two names
/// that differ stay different).
pub fn escape_non_utf8(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// File name extensions of tiles (any case).
pub const EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "tif", "tiff"];

/// Whether `name` (a file name, no folder) is a tile's: a tile extension, not hidden.
pub fn is_tile_name(name: &str) -> bool {
    !name.starts_with('.') && has_tile_extension(name)
}

/// Whether `name` ends in a tile extension (any case).
pub fn has_tile_extension(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e)))
}

/// [`is_tile_name`] for a name that may not be UTF-8 (the extension is ASCII).
pub fn is_tile_name_bytes(name: &[u8]) -> bool {
    is_tile_name(&String::from_utf8_lossy(name))
}

/// Result of listing a source: the tiles, sorted by name, and warnings about what was passed
/// over.
#[derive(Debug, Default)]
pub struct Listing {
    pub tiles: Vec<Tile>,
    pub warnings: Vec<String>,
}

/// What a source gives for one tile: its file's bytes (decoded by the pipeline), or pixels
/// already (a slide's region, read and resized by the source).
pub enum TileData {
    Encoded(Vec<u8>),
    /// 8-bit RGB.
    Rgb(crate::pixels::Image),
}

/// A sample's tiles.
pub trait TileSource: Sync {
    /// Every tile, sorted by name (called once, before any read).
    fn list(&mut self) -> Result<Listing>;
    /// One tile's bytes (called from the decode workers).
    fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>>;
    /// One tile's bytes or pixels (called from the decode workers): its bytes unless the
    /// source makes pixels itself.
    fn read_data(&self, tile: &Tile) -> std::io::Result<TileData> {
        self.read(tile).map(TileData::Encoded)
    }
    /// A tile's content key, when the source knows one without reading the tile (a slide's
    /// region); None: the key is the SHA-256 of the bytes [`TileSource::read`] gives.
    fn cache_key(&self, _tile: &Tile) -> Option<std::io::Result<[u8; 32]>> {
        None
    }
    /// The slide the tiles come from, for the provenance.
    fn slide_info(&self) -> Option<slide::SlideInfo> {
        None
    }
    /// A picture of where the tiles are (a slide's tissue and kept tiles), as PNG bytes, to
    /// go beside the feature file.
    fn picture(&self) -> Option<Vec<u8>> {
        None
    }
}

/// A member larger than this is not a tile (a zip bomb's declared size, say): a bad tile.
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// The archive kinds read in place, by file name suffix (any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    Zip,
    Tar,
    TarGz,
}

/// Suffixes of the archive kinds, longest first.
const ARCHIVE_SUFFIXES: [(&str, ArchiveKind); 4] = [
    (".tar.gz", ArchiveKind::TarGz),
    (".tgz", ArchiveKind::TarGz),
    (".tar", ArchiveKind::Tar),
    (".zip", ArchiveKind::Zip),
];

/// The kind of archive `path` names, and its name without the archive suffix (the default
/// sample ID), if its name ends in an archive suffix.
pub fn archive_kind(path: &Path) -> Option<(ArchiveKind, String)> {
    let name = path.file_name()?.to_str()?;
    let lower = name.to_ascii_lowercase();
    ARCHIVE_SUFFIXES
        .iter()
        .find(|(suffix, _)| lower.ends_with(suffix) && lower.len() > suffix.len())
        .map(|(suffix, kind)| (*kind, name[..name.len() - suffix.len()].to_string()))
}

/// The source a `TILE_DIR` argument names: a folder, an archive by its suffix, or any other
/// regular file as a slide (its tiles as `slide` asks).
pub fn open(path: &Path, slide: &slide::GridRequest) -> Result<Box<dyn TileSource>> {
    match archive_kind(path) {
        Some((ArchiveKind::Zip, _)) if path.is_file() => Ok(Box::new(zip::Zip::open(path)?)),
        Some((ArchiveKind::Tar, _)) if path.is_file() => Ok(Box::new(tar::Tar::open(path, false)?)),
        Some((ArchiveKind::TarGz, _)) if path.is_file() => {
            Ok(Box::new(tar::Tar::open(path, true)?))
        }
        _ if slide::is_slide(path) => Ok(Box::new(slide::Slide::open(path, slide)?)),
        _ => Ok(Box::new(folder::Folder::new(path))),
    }
}

/// List `source` (named `path` in messages); a source without tiles is an input error
/// (exit 3).
pub fn list_some_tiles(source: &mut dyn TileSource, path: &Path) -> Result<Listing> {
    let listing = source.list()?;
    if listing.tiles.is_empty() {
        return Err(fail(
            ExitKind::Input,
            format!(
                "{} {} holds no tiles (*.png, *.jpg, *.jpeg, *.tif, *.tiff)",
                if archive_kind(path).is_some() && path.is_file() {
                    "archive"
                } else {
                    "tile folder"
                },
                path.display()
            ),
        ));
    }
    Ok(listing)
}

/// The one folder every tile of an archive lies in, with its `/` (`S1/` for the usual
/// `zip -r S1.zip S1`), if there is one: the archive then reads as that folder, so its tile
/// names are the folder's. None when a tile lies at the top or the tiles span folders.
pub fn single_top_folder(tiles: &[Tile]) -> Option<String> {
    let first = tiles.first()?.rel.split_once('/')?.0;
    let prefix = format!("{first}/");
    tiles
        .iter()
        .all(|t| t.rel.starts_with(&prefix))
        .then_some(prefix)
}

/// Tile names without the archive's [`single_top_folder`] (if any), and the index by name
/// rebuilt to match (each name maps to what its full name mapped to).
pub fn strip_top_folder<V: Copy>(
    tiles: &mut [Tile],
    index: &mut std::collections::HashMap<String, V>,
) {
    let Some(prefix) = single_top_folder(tiles) else {
        return;
    };
    let mut stripped = std::collections::HashMap::with_capacity(index.len());
    for t in tiles.iter_mut() {
        let short = t.rel[prefix.len()..].to_string();
        if let Some(v) = index.get(&t.rel) {
            stripped.insert(short.clone(), *v);
        }
        t.rel = short;
    }
    *index = stripped;
}

/// An input error (exit 3) about the archive at `path`.
pub fn archive_error(path: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    fail(
        ExitKind::Input,
        format!("archive {}: {why}", path.display()),
    )
}

/// The tile an archive member is, if it is one: `name` is the member path as stored, `size`
/// the bytes it declares. Folders, hidden members (any part starting with `.`) and names
/// that are not a tile's are none; a member that is not a regular file (a link), whose name
/// is not UTF-8, or that declares more than [`MAX_MEMBER_BYTES`] is a bad tile. A member
/// path that is absolute or climbs out with `..` makes the whole archive suspect: an error
/// (its reason returned). A folder's tiles are its members too (`folder::Folder`).
pub fn member_tile(
    archive: &Path,
    name: &[u8],
    regular: bool,
    size: u64,
) -> Result<Option<Tile>, String> {
    let shown = escape_non_utf8(name);
    if name.starts_with(b"/") || name.split(|&b| b == b'/' || b == b'\\').any(|p| p == b"..") {
        return Err(format!(
            "member {shown} has an unsafe path (absolute, or with ..): refusing the archive"
        ));
    }
    let parts: Vec<&[u8]> = name
        .split(|&b| b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    let Some(last) = parts.last() else {
        return Ok(None);
    };
    if name.ends_with(b"/") || parts.iter().any(|p| p.starts_with(b".")) {
        return Ok(None);
    }
    if !is_tile_name_bytes(last) {
        return Ok(None);
    }
    let rel_bytes = parts.join(&b'/');
    let rel = escape_non_utf8(&rel_bytes);
    let mut tile = Tile::new(archive.join(&rel), rel);
    if std::str::from_utf8(&rel_bytes).is_err() {
        tile.problem = Some("its path is not valid UTF-8".into());
    } else if !regular {
        tile.problem = Some("not a regular file in the archive (a link?)".into());
    } else if size > MAX_MEMBER_BYTES {
        tile.problem = Some(format!(
            "declares {size} bytes, more than a tile may hold ({MAX_MEMBER_BYTES})"
        ));
    }
    Ok(Some(tile))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a.png", "b.JPG", "c.jpeg", "d.TIF", "e.tiff", "x.y.Png"] {
            assert!(is_tile_name(ok), "{ok}");
        }
        for no in [".a.png", "a.gif", "png", "a.png.txt", "a.svs"] {
            assert!(!is_tile_name(no), "{no}");
        }
        assert!(is_tile_name_bytes(b"t\xff\xfe.PNG"));
        assert!(!is_tile_name_bytes(b".\xff.png"));
    }

    #[test]
    fn archive_members_and_kinds() {
        let a = Path::new("/x/s.zip");
        let t = member_tile(a, b"./sub/t.PNG", true, 10).unwrap().unwrap();
        assert_eq!((t.rel.as_str(), t.problem.is_none()), ("sub/t.PNG", true));
        assert_eq!(t.path, PathBuf::from("/x/s.zip/sub/t.PNG"));
        for none in [
            &b"sub/"[..],
            b".hidden/t.png",
            b"sub/.t.png",
            b"notes.txt",
            b"",
        ] {
            assert!(
                member_tile(a, none, true, 10).unwrap().is_none(),
                "{none:?}"
            );
        }
        for unsafe_ in [
            &b"/etc/t.png"[..],
            b"../t.png",
            b"a/../../t.png",
            b"a\\..\\t.png",
        ] {
            let e = member_tile(a, unsafe_, true, 10).unwrap_err();
            assert!(e.contains("unsafe path"), "{e}");
        }
        let problem = |name: &[u8], regular: bool, size: u64| {
            member_tile(a, name, regular, size)
                .unwrap()
                .unwrap()
                .problem
        };
        assert!(problem(b"l.png", false, 10)
            .unwrap()
            .contains("not a regular file"));
        assert!(problem(b"\xff.png", true, 10)
            .unwrap()
            .contains("not valid UTF-8"));
        let big = problem(b"b.png", true, MAX_MEMBER_BYTES + 1).unwrap();
        assert!(big.contains("more than a tile may hold"), "{big}");
        assert_eq!(problem(b"ok.png", true, MAX_MEMBER_BYTES), None);
        let kind = |p: &str| archive_kind(Path::new(p));
        assert_eq!(kind("a/S1.tar.gz"), Some((ArchiveKind::TarGz, "S1".into())));
        assert_eq!(kind("S1.TGZ"), Some((ArchiveKind::TarGz, "S1".into())));
        assert_eq!(kind("S.1.tar"), Some((ArchiveKind::Tar, "S.1".into())));
        assert_eq!(kind("S1.Zip"), Some((ArchiveKind::Zip, "S1".into())));
        assert_eq!(kind("S1"), None);
        assert_eq!(kind(".zip"), None);
    }

    #[test]
    fn an_archive_of_one_folder_reads_as_that_folder() {
        let tiles = |names: &[&str]| -> Vec<Tile> {
            names
                .iter()
                .map(|n| Tile::new(PathBuf::from(n), n.to_string()))
                .collect()
        };
        let mut t = tiles(&["S1/a.png", "S1/sub/b.png"]);
        let mut index: std::collections::HashMap<String, usize> =
            [("S1/a.png".to_string(), 7), ("S1/sub/b.png".to_string(), 9)].into();
        strip_top_folder(&mut t, &mut index);
        let names: Vec<&str> = t.iter().map(|t| t.rel.as_str()).collect();
        assert_eq!(names, ["a.png", "sub/b.png"]);
        assert_eq!((index["a.png"], index["sub/b.png"], index.len()), (7, 9, 2));
        // A tile at the top, or tiles in two folders: names as stored.
        for names in [
            &["a.png", "S1/b.png"][..],
            &["S1/a.png", "S2/b.png"],
            &["S1a.png"],
        ] {
            assert_eq!(single_top_folder(&tiles(names)), None, "{names:?}");
        }
        assert_eq!(single_top_folder(&[]), None);
    }

    #[test]
    fn names_that_are_not_utf8_are_escaped_and_stay_distinct() {
        assert_eq!(escape_non_utf8(b"a\xffb\xc3\xa9.png"), "a\\xffb\u{e9}.png");
        assert_ne!(escape_non_utf8(b"\xfe.png"), escape_non_utf8(b"\xff.png"));
    }
}
