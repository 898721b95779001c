//! [`NullModel`]: a stand-in for the network, for `bench --what pipeline` and tests.

use anyhow::Result;

use super::{Encoder, PixelBuf};

/// A stand-in for the network that costs next to nothing: it reads every pixel once (as the
/// upload does) and returns `dim` full-precision values per tile, so that the writer
/// formats realistic numbers. With it, `pipeline` runs at the speed of reading, hashing (with
/// a cache), decoding, resizing, batching and writing: the most it can feed any device.
pub(crate) struct NullModel {
    pub dim: usize,
    pub tile_bytes: usize,
}

impl Encoder for NullModel {
    fn fork(&self) -> Self {
        NullModel { ..*self }
    }

    fn buffer(&self, tiles: usize) -> PixelBuf {
        PixelBuf::host(tiles * self.tile_bytes)
    }

    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
        let pixels = pixels.as_slice();
        anyhow::ensure!(
            pixels.len() == n * self.tile_bytes,
            "batch of {n} tiles holds {} bytes, not {}",
            pixels.len(),
            n * self.tile_bytes
        );
        let mut out = Vec::with_capacity(n * self.dim);
        for tile in pixels.chunks_exact(self.tile_bytes.max(1)) {
            let sum = tile.iter().fold(0u64, |a, &b| a.wrapping_add(b as u64));
            // xorshift64*, seeded by the pixels: values in [0, 4) with all 24 bits used.
            let mut x = sum.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            out.extend((0..self.dim).map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u32 << 22) as f32
            }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipeline bench's stand-in: one row of `dim` values per tile, a function of the
    /// tile's pixels only, full-precision floats in [0, 4).
    #[test]
    fn null_model_rows_depend_on_each_tile_only() {
        let m = NullModel {
            dim: 50,
            tile_bytes: 12,
        };
        let a: Vec<u8> = (0..12).collect();
        let b: Vec<u8> = (100..112).collect();
        let run = |m: &NullModel, tiles: &[&[u8]]| {
            let mut buf = m.buffer(tiles.len());
            tiles.iter().for_each(|t| buf.push(t));
            m.run(&mut buf, tiles.len()).unwrap()
        };
        let ab = run(&m.fork(), &[&a, &b]);
        let ba = run(&m, &[&b, &a]);
        assert_eq!(ab.len(), 100);
        assert_eq!(ab[..50], ba[50..]);
        assert_eq!(ab[50..], ba[..50]);
        assert_ne!(ab[..50], ab[50..]);
        assert_eq!(run(&m, &[&a]), ab[..50]);
        assert!(ab.iter().all(|v| (0.0..4.0).contains(v)));
        assert!(ab
            .iter()
            .any(|v| v.fract() != 0.0 && (v * 1024.0).fract() != 0.0));
    }
}
