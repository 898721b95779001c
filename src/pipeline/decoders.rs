//! The decode workers: each takes tile indices in order, reads the tile's bytes from its
//! source and, with a cache, hashes them (SHA-256) and looks the vector up; on a miss it
//! decodes and resizes the tile to the network's u8 RGB pixels. A bad tile becomes
//! [`Prepared::Bad`] with its reason, never an abort (a decoder panic too).

use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::cache::{Cache, Hash32};
use crate::error::first_line;
use crate::input::{Tile, TileSource};
use crate::pixels::{decode_rgb, resize_linear};

/// What a worker produced for one tile.
pub(crate) enum Prepared {
    Hit(Vec<f32>),
    Pixels(Vec<u8>),
    Bad(String),
}

pub(crate) struct Item {
    pub(crate) idx: usize,
    pub(crate) sha: Hash32,
    pub(crate) prepared: Prepared,
}

/// Seconds a decode worker spent per step.
#[derive(Default, Clone)]
pub(crate) struct WorkerTimes {
    pub read: f64,
    pub hash: f64,
    pub lookup: f64,
    pub decode: f64,
    pub resize: f64,
}

impl std::ops::AddAssign<&WorkerTimes> for WorkerTimes {
    fn add_assign(&mut self, o: &WorkerTimes) {
        self.read += o.read;
        self.hash += o.hash;
        self.lookup += o.lookup;
        self.decode += o.decode;
        self.resize += o.resize;
    }
}

/// Read, hash, look up and (on a miss) decode and resize one tile. The content hash is only
/// worth its time (~10% of a PNG tile's) when a cache uses it: with `hash` false and no cache,
/// it is left at zeros.
pub(crate) fn prepare(
    source: &dyn TileSource,
    tile: &Tile,
    size: usize,
    cache: Option<&Cache>,
    hash: bool,
    t: &mut WorkerTimes,
) -> (Hash32, Prepared) {
    if let Some(problem) = &tile.problem {
        return ([0; 32], Prepared::Bad(problem.clone()));
    }
    let clock = Instant::now();
    let bytes = match source.read(tile) {
        Ok(b) => b,
        Err(e) => return ([0; 32], Prepared::Bad(format!("cannot read: {e}"))),
    };
    let t1 = Instant::now();
    t.read += (t1 - clock).as_secs_f64();
    let sha: Hash32 = if hash || cache.is_some() {
        Sha256::digest(&bytes).into()
    } else {
        [0; 32]
    };
    let t2 = Instant::now();
    t.hash += (t2 - t1).as_secs_f64();
    if let Some(c) = cache {
        let hit = c.get(&sha);
        t.lookup += t2.elapsed().as_secs_f64();
        if let Some(v) = hit {
            return (sha, Prepared::Hit(v));
        }
    }
    let t3 = Instant::now();
    let img = match decode_rgb(&bytes) {
        Ok(i) => i,
        Err(e) => return (sha, Prepared::Bad(e)),
    };
    let t4 = Instant::now();
    t.decode += (t4 - t3).as_secs_f64();
    let out = resize_linear(&img, size, size);
    t.resize += t4.elapsed().as_secs_f64();
    (sha, Prepared::Pixels(out.data))
}

/// A decode worker: prepares the tiles whose indices it gets, in the order it gets them.
pub(crate) fn decode_loop(
    source: &dyn TileSource,
    tiles: &[Tile],
    size: usize,
    cache: Option<&Cache>,
    jobs: Receiver<usize>,
    items: Sender<(Item, WorkerTimes)>,
) {
    for idx in jobs.iter() {
        let mut t = WorkerTimes::default();
        // A panic on one tile (a decoder bug) makes that tile bad instead of ending this
        // worker, which would leave the run waiting for it forever.
        let (sha, prepared) =
            crate::error::catch_panic(|| prepare(source, &tiles[idx], size, cache, false, &mut t))
                .unwrap_or_else(|msg| {
                    let first = first_line(&msg);
                    ([0; 32], Prepared::Bad(format!("internal error: {first}")))
                });
        if items.send((Item { idx, sha, prepared }, t)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Fingerprint, PREPROCESSING_VERSION};
    use crate::cli::{Normalize, Precision};
    use crate::input::folder::Folder;

    /// Without a cache the content hash is skipped unless asked for; pixels are the same.
    #[test]
    fn tiles_are_hashed_only_for_a_cache_or_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t.png");
        let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 7]));
        img.save(&path).unwrap();
        let tile = Tile::new(path.clone(), "t.png".into());
        let want: Hash32 = Sha256::digest(std::fs::read(&path).unwrap()).into();
        let mut t = WorkerTimes::default();
        let (sha0, p0) = prepare(&Folder::new(d.path()), &tile, 32, None, false, &mut t);
        let (sha1, p1) = prepare(&Folder::new(d.path()), &tile, 32, None, true, &mut t);
        assert_eq!(sha0, [0; 32]);
        assert_eq!(sha1, want);
        match (p0, p1) {
            (Prepared::Pixels(a), Prepared::Pixels(b)) => {
                assert_eq!(a.len(), 32 * 32 * 3);
                assert_eq!(a, b);
            }
            _ => panic!("tile did not decode"),
        }
        let fp = Fingerprint {
            weights_sha256: "test".into(),
            layer: crate::cli::Layer::Layer4,
            pool: crate::cli::Pool::Max,
            normalize: Normalize::Tutorial,
            size: 32,
            precision: Precision::Fp32,
            preprocessing_version: PREPROCESSING_VERSION,
            layout: None,
            encoder: None,
            mean_std: None,
        };
        let cache = Cache::open(&d.path().join("cache"), &fp).unwrap();
        let (sha2, _) = prepare(
            &Folder::new(d.path()),
            &tile,
            32,
            Some(&cache),
            false,
            &mut t,
        );
        assert_eq!(sha2, want, "a cache always gets the real hash");
    }
}
