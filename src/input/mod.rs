//! Where a sample's tiles come from: a source lists them once, in the output's row order,
//! and the decode workers read each tile's bytes from it, in any order, from any thread.
//!
//! Today's source is a folder ([`folder::Folder`]). A tile is named by its path relative to
//! the source, `/`-separated: that name is the `tile` column of every output, and the row
//! order is its byte order. Only the bytes matter to the numbers (the cache keys by content),
//! so the same tiles from any source give the same features.

pub mod folder;

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

/// A sample's tiles.
pub trait TileSource: Sync {
    /// Every tile, sorted by name.
    fn list(&self) -> Result<Listing>;
    /// One tile's bytes (called from the decode workers).
    fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>>;
}

/// The source a `TILE_DIR` argument names.
pub fn open(path: &Path) -> Box<dyn TileSource> {
    Box::new(folder::Folder::new(path))
}

/// List `source` (named `path` in messages); a source without tiles is an input error
/// (exit 3).
pub fn list_some_tiles(source: &dyn TileSource, path: &Path) -> Result<Listing> {
    let listing = source.list()?;
    if listing.tiles.is_empty() {
        return Err(fail(
            ExitKind::Input,
            format!(
                "tile folder {} holds no tiles (*.png, *.jpg, *.jpeg, *.tif, *.tiff)",
                path.display()
            ),
        ));
    }
    Ok(listing)
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
    fn names_that_are_not_utf8_are_escaped_and_stay_distinct() {
        assert_eq!(escape_non_utf8(b"a\xffb\xc3\xa9.png"), "a\\xffb\u{e9}.png");
        assert_ne!(escape_non_utf8(b"\xfe.png"), escape_non_utf8(b"\xff.png"));
    }
}
