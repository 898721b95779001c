//! `random:SEED` weights: deterministic, with non-trivial BatchNorm statistics, for demos,
//! benchmarks and tests only (the numbers mean nothing).

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::cli::Layer;
use crate::encoder::resnet::parameter_shapes;

/// SplitMix64: a tiny, portable PRNG, so random weights are identical on every machine,
/// thread and libtorch version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Deterministic random weights: Kaiming-normal convolutions (fan-out, as torchvision) and
/// BatchNorm with non-trivial statistics, so that a wrong BatchNorm shows up in features.
/// Each tensor has its own stream, seeded by `seed` and its key, so the tensors are made on
/// all cores (ResNet50's 25M values took 0.7 s on one) with the same values on any number.
pub fn random_state_dict(seed: u64, layer: Layer) -> HashMap<String, Tensor> {
    let mut shapes = parameter_shapes(layer);
    // Largest first, taken in turn by the threads: they finish together.
    shapes.sort_by_key(|(_, shape)| std::cmp::Reverse(shape.iter().product::<i64>()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = crate::device::available_cpus().min(8);
    let mut values: Vec<(usize, Vec<f32>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((key, shape)) = shapes.get(i) else {
                            return done;
                        };
                        done.push((i, random_values(seed, key, shape)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("random weights thread"))
            .collect()
    });
    values.sort_by_key(|(i, _)| *i);
    shapes
        .into_iter()
        .zip(values)
        .map(|((key, shape), (_, v))| {
            let t = Tensor::from_slice(&v).view(shape.as_slice());
            (key, t)
        })
        .collect()
}

/// The values of one random tensor (see [`random_state_dict`]).
fn random_values(seed: u64, key: &str, shape: &[i64]) -> Vec<f32> {
    let digest = Sha256::digest(format!("{seed}:{key}").as_bytes());
    let mut rng = SplitMix64(u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")));
    let n = shape.iter().product::<i64>() as usize;
    let mut gen = |f: &mut dyn FnMut(&mut SplitMix64) -> f64| -> Vec<f32> {
        (0..n).map(|_| f(&mut rng) as f32).collect()
    };
    if key.ends_with("running_var") {
        gen(&mut |r| r.uniform() * 1.5 + 0.5)
    } else if key.ends_with("running_mean") {
        gen(&mut |r| r.normal() * 0.1)
    } else if shape.len() == 4 {
        let std = (2.0 / (shape[0] * shape[2] * shape[3]) as f64).sqrt();
        gen(&mut |r| r.normal() * std)
    } else if key.ends_with(".weight") {
        gen(&mut |r| r.uniform() + 0.5)
    } else {
        gen(&mut |r| r.normal() * 0.1)
    }
}
