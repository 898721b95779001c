//! The decode workers: each takes tile indices in order, reads the tile's bytes from its
//! source and, with a cache, hashes them (SHA-256) and looks the vector up; on a miss it
//! decodes and resizes the tile to the network's u8 RGB pixels. A slide's tiles have a key
//! before they are read (their region) and come as pixels: looked up, then read and resized. A bad tile becomes
//! [`Prepared::Bad`] with its reason, never an abort (a decoder panic too).

use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::cache::{Cache, Hash32};
use crate::error::first_line;
use crate::input::{Tile, TileData, TileSource};
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
/// it is left at zeros. A source that knows a tile's key without reading it (a slide's region)
/// gives it instead, and a hit then reads nothing; its tiles come as pixels, not bytes.
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
    let keyed = hash || cache.is_some();
    let clock = Instant::now();
    // The key known before reading, and the lookup it allows.
    let mut sha: Hash32 = [0; 32];
    let mut known = false;
    if keyed {
        if let Some(key) = source.cache_key(tile) {
            known = true;
            sha = match key {
                Ok(k) => k,
                Err(e) => return ([0; 32], Prepared::Bad(format!("cannot read: {e}"))),
            };
            let t1 = Instant::now();
            t.hash += (t1 - clock).as_secs_f64();
            if let Some(v) = cache.and_then(|c| c.get(&sha)) {
                t.lookup += t1.elapsed().as_secs_f64();
                return (sha, Prepared::Hit(v));
            }
            t.lookup += t1.elapsed().as_secs_f64();
        }
    }
    let clock = Instant::now();
    let bytes = match source.read_data(tile) {
        Ok(TileData::Encoded(b)) => b,
        Ok(TileData::Rgb(img)) => {
            let t1 = Instant::now();
            t.read += (t1 - clock).as_secs_f64();
            let out = resize_linear(&img, size, size);
            t.resize += t1.elapsed().as_secs_f64();
            return (sha, Prepared::Pixels(out.data));
        }
        Err(e) => return (sha, Prepared::Bad(format!("cannot read: {e}"))),
    };
    let t1 = Instant::now();
    t.read += (t1 - clock).as_secs_f64();
    if keyed && !known {
        sha = Sha256::digest(&bytes).into();
    }
    let t2 = Instant::now();
    t.hash += (t2 - t1).as_secs_f64();
    if let Some(c) = cache.filter(|_| !known) {
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

    /// A fingerprint for a test cache (the ResNet's defaults at 32 px).
    fn test_fingerprint() -> Fingerprint {
        Fingerprint {
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
        }
    }

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
        let fp = test_fingerprint();
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

    /// A source that knows its tiles' keys (a slide's regions) is looked up before it is
    /// read: a hit reads nothing; its pixels are resized, not decoded.
    #[test]
    fn keyed_sources_are_looked_up_before_reading() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Keyed(AtomicUsize);
        impl TileSource for Keyed {
            fn list(&mut self) -> anyhow::Result<crate::input::Listing> {
                unreachable!()
            }
            fn read(&self, _: &Tile) -> std::io::Result<Vec<u8>> {
                unreachable!("a keyed source's tiles are pixels")
            }
            fn read_data(&self, _: &Tile) -> std::io::Result<TileData> {
                self.0.fetch_add(1, Ordering::SeqCst);
                let px = (0..40 * 30 * 3).map(|v| v as u8).collect();
                Ok(TileData::Rgb(crate::pixels::Image::new(40, 30, 3, px)))
            }
            fn cache_key(&self, _: &Tile) -> Option<std::io::Result<Hash32>> {
                Some(Ok([7; 32]))
            }
        }
        let d = tempfile::tempdir().unwrap();
        let source = Keyed(AtomicUsize::new(0));
        let tile = Tile::new(d.path().join("r"), "000000_x0_y0.png".into());
        let mut t = WorkerTimes::default();
        let (sha, p) = prepare(&source, &tile, 32, None, false, &mut t);
        assert_eq!(sha, [0; 32], "no cache: no key");
        let Prepared::Pixels(px) = p else {
            panic!("not pixels")
        };
        assert_eq!(px.len(), 32 * 32 * 3);
        let fp = test_fingerprint();
        let cache = Cache::open(&d.path().join("cache"), &fp).unwrap();
        let (sha, p) = prepare(&source, &tile, 32, Some(&cache), false, &mut t);
        assert_eq!(sha, [7; 32], "the source's key, not a hash of pixels");
        assert!(matches!(p, Prepared::Pixels(_)), "a miss is read");
        assert_eq!(source.0.load(Ordering::SeqCst), 2);
        cache.put(&[7; 32], &[1.0, 2.0]).unwrap();
        cache.close().unwrap();
        let cache = Cache::open(&d.path().join("cache"), &fp).unwrap();
        let (_, p) = prepare(&source, &tile, 32, Some(&cache), false, &mut t);
        assert!(
            matches!(p, Prepared::Hit(ref v) if v == &[1.0, 2.0]),
            "a hit"
        );
        assert_eq!(source.0.load(Ordering::SeqCst), 2, "a hit reads nothing");
    }
}
