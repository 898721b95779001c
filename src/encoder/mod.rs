//! Encoders: what turns a batch of preprocessed tiles into one feature vector per tile.
//!
//! The pipeline sees an encoder only through the [`Encoder`] trait: it asks it for a batch
//! buffer ([`PixelBuf`]), fills the buffer with u8 RGB tiles, and gets `n * dim` floats back.
//! One implementation is the native ResNet50 trunk ([`resnet`], built from torchvision
//! state dicts read by [`weights`], normalized and run by [`native`]); another is any
//! TorchScript model a user exports ([`script`]); [`AnyEncoder`] is either, as `extract`
//! runs them. [`null::NullModel`] is a stand-in that costs nothing, for measuring the rest of
//! the pipeline. Nothing here knows about tiles, files, caches or outputs.
//!
//! Every encoder's features are checked the same way ([`check_finite`]): a NaN or an infinity
//! fails the run (exit 4, naming the model and, through the pipeline, the tile), never
//! written. A feature dimension above [`MAX_FEATURE_DIM`] is refused when the model loads.

pub mod audit;
pub mod batch;
pub mod native;
pub mod null;
pub mod resnet;
pub mod script;
pub mod weights;

use anyhow::Result;

use crate::error::{fail, ExitKind};

pub(crate) use batch::PixelBuf;
pub(crate) use native::NativeResNet;
pub(crate) use null::NullModel;
pub(crate) use script::ScriptEncoder;

/// The largest feature dimension a model may have: real encoders give at most 2,560 (Virchow;
/// ResNet50 2,048), and a model that claims millions would write gigabytes per thousand tiles.
/// CSV, HDF5 and Parquet are tested at this width (tests/python/test_encoders.py).
pub const MAX_FEATURE_DIM: usize = 65_536;

/// Row `0` (0-based) of a batch holds a feature that is not a finite number. It is the context
/// of the model's error (exit 4), so the pipeline can name the tile of that row.
#[derive(Debug, Clone, Copy)]
pub struct NonFiniteRow(pub usize);

impl std::fmt::Display for NonFiniteRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "row {} of the batch", self.0 + 1)
    }
}

/// `features` are `dim` per tile: an error (exit 4) naming `model` (the model file, or the
/// weights) and the first tile whose features hold a NaN or an infinity.
pub fn check_finite(features: &[f32], dim: usize, model: &str) -> Result<()> {
    let Some(k) = features.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    let dim = dim.max(1);
    Err(fail(
        ExitKind::Weights,
        format!(
            "{model} gave a feature that is not a finite number: {} (feature {} of {dim})",
            features[k],
            k % dim,
        ),
    )
    .context(NonFiniteRow(k / dim)))
}

/// What a model worker runs on each batch: the native ResNet50 ([`NativeResNet`]), or
/// [`NullModel`] for `bench --what pipeline`, which measures everything else.
pub(crate) trait Encoder: Send {
    /// A handle for another worker (shared weights).
    fn fork(&self) -> Self
    where
        Self: Sized;
    /// An empty buffer for a batch of up to `tiles` tiles (the model stage fills it).
    fn buffer(&self, tiles: usize) -> PixelBuf;
    /// Set up the calling thread, a model worker, before its first batch.
    fn start_worker(&self) -> Result<()> {
        Ok(())
    }
    /// `pixels` holds `n` RGB tiles of size x size; returns `n * dim` features. May pad the
    /// buffer (it is cleared before it is filled again).
    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>>;
}

/// The encoder `extract` runs: the native ResNet50, or a user's TorchScript model.
pub(crate) enum AnyEncoder {
    Native(NativeResNet),
    Script(ScriptEncoder),
}

impl AnyEncoder {
    /// The memory layout the built network computes in, as the provenance records it (what
    /// the model uses, not what was asked: a TorchScript model always gets NCHW).
    pub(crate) fn layout(&self) -> &'static str {
        match self {
            AnyEncoder::Native(e) if e.channels_last() => "nhwc",
            _ => "nchw",
        }
    }
}

impl Encoder for AnyEncoder {
    fn fork(&self) -> AnyEncoder {
        match self {
            AnyEncoder::Native(e) => AnyEncoder::Native(e.fork()),
            AnyEncoder::Script(e) => AnyEncoder::Script(e.fork()),
        }
    }

    fn buffer(&self, tiles: usize) -> PixelBuf {
        match self {
            AnyEncoder::Native(e) => e.buffer(tiles),
            AnyEncoder::Script(e) => e.buffer(tiles),
        }
    }

    fn start_worker(&self) -> Result<()> {
        match self {
            AnyEncoder::Native(e) => e.start_worker(),
            AnyEncoder::Script(e) => e.start_worker(),
        }
    }

    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
        match self {
            AnyEncoder::Native(e) => e.run(pixels, n),
            AnyEncoder::Script(e) => e.run(pixels, n),
        }
    }
}
