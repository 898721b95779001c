//! Any TorchScript image model as an [`Encoder`] (`extract --model FILE.pt`): pathology
//! foundation models (ViTs), pathology-pretrained ResNets, whatever a user can export with
//! `torch.jit.trace`/`script` (see `scripts/export_encoder.py`).
//!
//! The module gets float32 NCHW batches preprocessed exactly as the native ResNet's (same
//! decoding, resizing, `x / 255`, `(x - mean) / std` on the device), cast to `--precision`
//! with the module. Its output (N, D) is used as is; (N, C, H, W) is pooled (`--pool`); any
//! other shape, or a NaN, is an error naming the model file. [`ScriptModel::load`] reads the
//! file once, checks it is TorchScript and learns D from one forward pass on a blank tile
//! (before any output is created); each model worker loads its own module instance from the
//! same bytes. On the CPU every tile goes through the module alone, as for the native model,
//! so its features never depend on the batch size.
//!
//! An optional sidecar `FILE.json` ([`Sidecar`]), written by the export script, sets the
//! preprocessing the model was trained with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{CModule, Device, Kind, Tensor};

use super::audit::audit;
use super::{check_finite, Encoder, PixelBuf, MAX_FEATURE_DIM};
use crate::cli::{Pool, Precision};
use crate::error::{fail, ExitKind};

/// What `scripts/export_encoder.py` writes beside the module: how to preprocess its input.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sidecar {
    pub tilefeat_encoder: u32,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub output_dim: Option<usize>,
    #[serde(default)]
    pub weights_sha256: Option<String>,
    /// The seed of a random initialisation (`export_encoder.py --random-init`): the features
    /// are not trained ones.
    #[serde(default)]
    pub random_init: Option<u64>,
}

/// `model.pt` -> `model.json`.
pub fn sidecar_path(model: &Path) -> PathBuf {
    model.with_extension("json")
}

impl Sidecar {
    /// The sidecar beside `model`, if there is one; a malformed one is an error naming it.
    pub fn find(model: &Path) -> Result<Option<(PathBuf, Sidecar)>> {
        let p = sidecar_path(model);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| {
            fail(
                ExitKind::Weights,
                format!("cannot read {}: {e}", p.display()),
            )
        })?;
        let s: Sidecar = serde_json::from_str(&text).map_err(|e| {
            fail(
                ExitKind::Weights,
                format!(
                    "{} (the sidecar of {}) is not a tilefeat encoder description: {e}",
                    p.display(),
                    model.display()
                ),
            )
        })?;
        if s.tilefeat_encoder != 1 {
            return Err(fail(
                ExitKind::Weights,
                format!(
                    "{}: tilefeat_encoder {} is not a version this tilefeat reads (1)",
                    p.display(),
                    s.tilefeat_encoder
                ),
            ));
        }
        if !(16..=4096).contains(&s.size) {
            return Err(fail(
                ExitKind::Weights,
                format!(
                    "{}: size {} is not between 16 and 4096",
                    p.display(),
                    s.size
                ),
            ));
        }
        if s.std.iter().any(|&v| v <= 0.0 || !v.is_finite())
            || s.mean.iter().any(|v| !v.is_finite())
        {
            return Err(fail(
                ExitKind::Weights,
                format!("{}: std must be positive and mean finite", p.display()),
            ));
        }
        Ok(Some((p, s)))
    }
}

/// A TorchScript model file, read and checked once per command.
pub struct ScriptModel {
    pub path: PathBuf,
    bytes: Arc<Vec<u8>>,
    pub sha256: String,
    /// The feature dimension, from a forward pass on a blank tile.
    pub dim: usize,
    /// The module's raw output shape for one tile, e.g. `[1, 768]` or `[1, 2048, 7, 7]`.
    pub output_shape: Vec<i64>,
}

fn model_err(path: &Path, msg: impl std::fmt::Display) -> anyhow::Error {
    fail(
        ExitKind::Weights,
        format!("model {}: {msg}", path.display()),
    )
}

/// The first lines of a libtorch error (TorchScript's tracebacks run for pages).
fn short(e: &tch::TchError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Exception raised from") && !l.starts_with("frame #"))
        .filter(|l| !l.is_empty())
        .take(8)
        .collect();
    lines.join(" | ")
}

impl ScriptModel {
    /// Read `path`, check what its code calls ([`audit`]: file operations are refused unless
    /// `allow_unsafe`), load it as TorchScript on the CPU and run it once on a blank `size`
    /// tile to learn its output: (N, D), or (N, C, H, W) to be pooled; real, finite, D at most
    /// [`MAX_FEATURE_DIM`].
    pub fn load(path: &Path, size: u32, allow_unsafe: bool) -> Result<ScriptModel> {
        let bytes =
            std::fs::read(path).map_err(|e| model_err(path, format!("cannot read: {e}")))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let calls =
            audit(&bytes).map_err(|why| model_err(path, format!("{NOT_TORCHSCRIPT}: {why}")))?;
        if !calls.is_empty() {
            let list = calls
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            if !allow_unsafe {
                return Err(model_err(
                    path,
                    format!(
                        "its code calls operations that read or write files: {list}. A \
                         TorchScript model is code and can read and write any file the user \
                         can; tilefeat refuses it before running any of it. Only if you trust \
                         where it came from: --allow-unsafe-model"
                    ),
                ));
            }
            eprintln!(
                "tilefeat: warning: model {}: its code calls operations that read or write \
                 files ({list}); running it anyway (--allow-unsafe-model)",
                path.display()
            );
        }
        let module = load_module(path, &bytes, Device::Cpu, Kind::Float)?;
        let _guard = tch::no_grad_guard();
        let blank = Tensor::zeros([1, 3, size as i64, size as i64], (Kind::Float, Device::Cpu));
        let out = module.forward_ts(&[blank]).map_err(|e| {
            model_err(
                path,
                format!(
                    "does not take a float32 (N, 3, {size}, {size}) batch and return one tensor: {}",
                    short(&e)
                ),
            )
        })?;
        let output_shape = out.size();
        check_kind(&out).map_err(|m| model_err(path, m))?;
        let dim = match output_shape.as_slice() {
            [1, d] | [1, d, _, _] if output_shape.iter().all(|&x| x > 0) => *d as usize,
            other => {
                return Err(model_err(
                    path,
                    format!(
                        "output has shape {other:?} for one tile; expected (N, D), or \
                         (N, C, H, W) to be pooled with --pool (a ViT's tokens (N, T, D) need \
                         a wrapper that picks the class token or pools them: see \
                         scripts/export_encoder.py)"
                    ),
                ))
            }
        };
        if dim > MAX_FEATURE_DIM {
            return Err(model_err(
                path,
                format!(
                    "output has {dim} features per tile (shape {output_shape:?}); tilefeat \
                     takes at most {MAX_FEATURE_DIM} (pathology encoders give up to 2,560)"
                ),
            ));
        }
        // As float32, as it will be written (a float64 1e300 is an infinity there).
        let not_finite = out
            .f_to_kind(Kind::Float)
            .and_then(|t| t.f_isfinite())
            .and_then(|t| t.f_logical_not())
            .and_then(|bad| out.f_to_kind(Kind::Float)?.f_masked_select(&bad))
            .map_err(|e| model_err(path, format!("output cannot be read: {}", short(&e))))?;
        if not_finite.numel() > 0 {
            let v = not_finite.f_double_value(&[0]).unwrap_or(f64::NAN) as f32;
            return Err(model_err(
                path,
                format!("output holds {v} for a blank tile (features must be finite numbers)"),
            ));
        }
        Ok(ScriptModel {
            path: path.to_path_buf(),
            bytes: Arc::new(bytes),
            sha256,
            dim,
            output_shape,
        })
    }
}

/// The start of the error for a file that is no TorchScript module.
const NOT_TORCHSCRIPT: &str = "is not a TorchScript module (save one with torch.jit.trace or \
                               torch.jit.script, then torch.jit.save; a state dict is not one)";

/// Features must be real numbers: a complex output (which a cast would silently cut to its
/// real part) is refused.
fn check_kind(out: &Tensor) -> std::result::Result<(), String> {
    match out.kind() {
        k @ (Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble) => Err(format!(
            "output is of type {k:?}; features must be real numbers (float)"
        )),
        _ => Ok(()),
    }
}

impl ScriptModel {
    /// A module instance of its own on `device`, cast to `precision` (for `bench`).
    pub fn module(&self, device: Device, precision: Precision) -> Result<CModule> {
        load_module(&self.path, &self.bytes, device, kind_of(precision))
    }
}

fn kind_of(precision: Precision) -> Kind {
    match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp16 => Kind::Half,
    }
}

fn load_module(path: &Path, bytes: &[u8], device: Device, kind: Kind) -> Result<CModule> {
    let mut module = CModule::load_data_on_device(&mut std::io::Cursor::new(bytes), device)
        .map_err(|e| model_err(path, format!("{NOT_TORCHSCRIPT}: {}", short(&e))))?;
    module.set_eval();
    if kind != Kind::Float {
        module.to(device, kind, false);
    }
    Ok(module)
}

/// A TorchScript model on a model worker's device.
pub(crate) struct ScriptEncoder {
    model: Arc<ScriptModelShared>,
    module: CModule,
}

struct ScriptModelShared {
    path: PathBuf,
    bytes: Arc<Vec<u8>>,
    device: Device,
    kind: Kind,
    mean: Tensor,
    std: Tensor,
    size: i64,
    pool: Pool,
    dim: usize,
    pad_to: Option<usize>,
    worker_stream: Option<usize>,
}

// The tensors are read only (mean, std), as the native model's are.
unsafe impl Sync for ScriptModelShared {}
unsafe impl Send for ScriptModelShared {}

impl ScriptEncoder {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        model: &ScriptModel,
        device: Device,
        precision: Precision,
        mean: [f32; 3],
        std: [f32; 3],
        size: u32,
        pool: Pool,
        pad_to: Option<usize>,
        worker_stream: Option<usize>,
    ) -> Result<ScriptEncoder> {
        let kind = kind_of(precision);
        let shared = ScriptModelShared {
            path: model.path.clone(),
            bytes: model.bytes.clone(),
            device,
            kind,
            mean: Tensor::from_slice(&mean)
                .view([1, 3, 1, 1])
                .to_device(device),
            std: Tensor::from_slice(&std)
                .view([1, 3, 1, 1])
                .to_device(device),
            size: size as i64,
            pool,
            dim: model.dim,
            pad_to,
            worker_stream,
        };
        let module = load_module(&model.path, &model.bytes, device, kind)?;
        Ok(ScriptEncoder {
            model: Arc::new(shared),
            module,
        })
    }

    /// u8 NHWC on the device -> features (N, D) in f32: the output's type and shape are
    /// checked on every call (a model's width may depend on its input), before pooling.
    fn forward_u8(&self, input: &Tensor) -> Result<Tensor> {
        let m = &self.model;
        let rows = input.size()[0];
        let x = input.permute([0, 3, 1, 2]).to_kind(Kind::Float);
        let x = (((x / 255.0) - &m.mean) / &m.std).contiguous();
        let out = self
            .module
            .forward_ts(&[x.to_kind(m.kind)])
            .map_err(|e| model_err(&m.path, format!("forward pass failed: {}", short(&e))))?;
        check_kind(&out).map_err(|e| model_err(&m.path, e))?;
        let size = out.size();
        let fits = match size.as_slice() {
            [n, d] => *n == rows && *d == m.dim as i64,
            [n, d, h, w] => *n == rows && *d == m.dim as i64 && *h > 0 && *w > 0,
            _ => false,
        };
        if !fits {
            return Err(model_err(
                &m.path,
                format!(
                    "output has shape {size:?} for a batch of {rows}; expected ({rows}, {}) or \
                     ({rows}, {}, H, W) as for the blank tile it was checked on (a model whose \
                     output shape depends on its input cannot be used)",
                    m.dim, m.dim
                ),
            ));
        }
        let pooled = match (size.len(), m.pool) {
            (2, _) => Ok(out),
            (_, Pool::Max) => out.f_amax([2, 3], false),
            (_, Pool::Avg) => out.f_mean_dim([2i64, 3].as_slice(), false, out.kind()),
        };
        pooled
            .and_then(|t| t.f_to_kind(Kind::Float))
            .map_err(|e| model_err(&m.path, format!("pooling failed: {}", short(&e))))
    }
}

impl Encoder for ScriptEncoder {
    /// Another worker's own module instance, from the same bytes.
    fn fork(&self) -> ScriptEncoder {
        let m = &self.model;
        let module = load_module(&m.path, &m.bytes, m.device, m.kind)
            .expect("the module loaded once already");
        ScriptEncoder {
            model: self.model.clone(),
            module,
        }
    }

    fn buffer(&self, tiles: usize) -> PixelBuf {
        let m = &self.model;
        let rows = m.pad_to.map_or(tiles, |p| p.max(tiles));
        PixelBuf::tensor(rows, m.size as usize, m.device).0
    }

    fn start_worker(&self) -> Result<()> {
        match self.model.worker_stream {
            Some(i) => crate::device::use_worker_stream(i).map_err(anyhow::Error::msg),
            None => Ok(()),
        }
    }

    fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
        let _guard = tch::no_grad_guard();
        let m = &self.model;
        let input = pixels.upload(n, m.size as usize, m.pad_to, m.device)?;
        let out = match m.device {
            // One tile per call on the CPU: rows never depend on the batch (see native.rs).
            Device::Cpu => {
                let rows = (0..n as i64)
                    .map(|i| self.forward_u8(&input.narrow(0, i, 1)))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::f_cat(&rows, 0)
            }
            _ => self.forward_u8(&input)?.f_narrow(0, 0, n as i64),
        }
        .and_then(|t| t.f_to_device(Device::Cpu))
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_view([-1]))
        .map_err(|e| model_err(&m.path, format!("features cannot be read: {}", short(&e))))?;
        let v = Vec::<f32>::try_from(&out).context("cannot read features back from the model")?;
        if v.len() != n * m.dim {
            return Err(model_err(
                &m.path,
                format!(
                    "gave {} features for {n} tiles, expected {n} x {}",
                    v.len(),
                    m.dim
                ),
            ));
        }
        check_finite(&v, m.dim, &format!("model {}", m.path.display()))?;
        Ok(v)
    }
}
