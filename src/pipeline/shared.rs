//! What the samples of one `extract` command share, set up once, when the first sample needs
//! it: the weights (after the first folder is listed), then the encoder on its device, its
//! model workers and the cache (after the first output could be created).

use std::time::Instant;

use anyhow::Result;
use tch::Device;

use super::workers::ModelWorkers;
use super::ExtractConfig;
use crate::cache::{Cache, Fingerprint};
use crate::device::{configure_cuda, CudaSetup};
use crate::encoder::resnet::{ResNetTrunk, RunOptions};
use crate::encoder::script::ScriptModel;
use crate::encoder::weights::Weights;
use crate::encoder::{AnyEncoder, NativeResNet, ScriptEncoder};
use crate::error::{ExitKind, WithKind};
use crate::output::provenance::RANDOM_WEIGHTS_WARNING;

/// What the samples of one `extract` command share, set up once, when the first sample needs
/// it: the weights (after the first folder is listed), then the model on its device and the
/// cache (after the first CSV could be created).
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) weights: Option<Weights>,
    /// `--model`'s TorchScript file, read and checked with the weights' step.
    pub(crate) script: Option<ScriptModel>,
    pub(crate) session: Option<Session>,
    /// Seconds the set-up took (`setup_*` of [`Timings`]), until a sample reports them.
    pub(crate) setup: SetupTimes,
}

#[derive(Default)]
pub(crate) struct SetupTimes {
    pub(crate) weights: f64,
    pub(crate) model: f64,
    pub(crate) cache: f64,
}

pub(crate) struct Session {
    pub(crate) runner: AnyEncoder,
    /// Started with the model, shared by the samples (see [`ModelWorkers`]).
    pub(crate) workers: ModelWorkers,
    pub(crate) cuda: Option<CudaSetup>,
    pub(crate) cache: Option<Cache>,
    pub(crate) entries_at_open: usize,
}

impl Shared {
    pub(crate) fn weights(&mut self, cfg: &ExtractConfig) -> Result<&Weights> {
        if self.weights.is_none() {
            if cfg.untrained() && !cfg.quiet {
                eprintln!("tilefeat: WARNING: {RANDOM_WEIGHTS_WARNING}");
            }
            let t = Instant::now();
            self.weights = Some(match &cfg.model {
                Some(m) => {
                    let script = ScriptModel::load(&m.path, cfg.size, m.allow_unsafe)?;
                    if let Some((p, sc)) = &m.sidecar {
                        if sc.output_dim.is_some_and(|d| d != script.dim) && !cfg.quiet {
                            eprintln!(
                                "tilefeat: warning: {} gives {} features per tile, {} says {}",
                                m.path.display(),
                                script.dim,
                                p.display(),
                                sc.output_dim.unwrap_or_default()
                            );
                        }
                    }
                    let w = Weights {
                        source: cfg.weights.clone(),
                        id: script.sha256.clone(),
                        tensors: Default::default(),
                    };
                    self.script = Some(script);
                    w
                }
                None => Weights::load(&cfg.weights, cfg.layer).kind(ExitKind::Weights)?,
            });
            self.setup.weights = t.elapsed().as_secs_f64();
        }
        Ok(self.weights.as_ref().expect("just loaded"))
    }

    /// Features per tile: the TorchScript model's output (after the weights' step), or the
    /// ResNet stage's channels.
    pub(crate) fn feature_dim(&self, cfg: &ExtractConfig) -> usize {
        match &self.script {
            Some(s) => s.dim,
            None => crate::encoder::resnet::feature_dim(cfg.layer),
        }
    }

    pub(crate) fn session(
        &mut self,
        cfg: &ExtractConfig,
        fingerprint: &Fingerprint,
    ) -> Result<&Session> {
        if self.session.is_none() {
            if cfg.device == Device::Cpu && !cfg.quiet {
                if let Some(w) = crate::cpu::CpuInfo::detect().emulation_warning(cfg.precision) {
                    eprintln!("tilefeat: warning: {w}");
                }
            }
            self.weights(cfg)?;
            let t = Instant::now();
            let cuda = configure_cuda(cfg.device);
            let pad_to = matches!(cfg.device, Device::Cuda(_)).then_some(cfg.batch_size);
            let worker_stream = cuda.as_ref().and_then(|c| c.worker_stream);
            let (mean, std) = (cfg.mean_std.mean, cfg.mean_std.std);
            let runner = match &self.script {
                Some(script) => AnyEncoder::Script(
                    ScriptEncoder::new(
                        script,
                        cfg.device,
                        cfg.precision,
                        mean,
                        std,
                        cfg.size,
                        cfg.pool,
                        pad_to,
                        worker_stream,
                    )
                    .kind(ExitKind::Weights)?,
                ),
                None => {
                    let opts = RunOptions {
                        device: cfg.device,
                        precision: cfg.precision,
                        channels_last: cfg.channels_last,
                    };
                    let weights = self.weights.as_ref().expect("loaded above");
                    let model = ResNetTrunk::new(&weights.tensors, cfg.layer, cfg.pool, opts)
                        .kind(ExitKind::Weights)?;
                    AnyEncoder::Native(NativeResNet::new(
                        model,
                        (mean, std),
                        cfg.size,
                        pad_to,
                        worker_stream,
                        &cfg.weights.describe(),
                    ))
                }
            };
            let t_cache = Instant::now();
            self.setup.model = (t_cache - t).as_secs_f64();
            let cache = match &cfg.cache_dir {
                // The default cache was not asked for: one that cannot be used (a read-only
                // output folder's, a file in its place) is said, and the run goes on without.
                Some(d) if cfg.cache_default => match Cache::open(d, fingerprint) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        eprintln!(
                            "tilefeat: warning: the default cache {} cannot be used ({e:#}); \
                             going on without a cache (--cache-dir DIR names another)",
                            d.display()
                        );
                        None
                    }
                },
                Some(d) => Some(Cache::open(d, fingerprint)?),
                None => None,
            }
            .map(|c| c.with_lookups(!cfg.force));
            self.setup.cache = t_cache.elapsed().as_secs_f64();
            let workers = ModelWorkers::start(&runner, cfg.device, cfg.torch_threads);
            self.session = Some(Session {
                workers,
                runner,
                cuda,
                entries_at_open: cache.as_ref().map_or(0, |c| c.entries_at_open()),
                cache,
            });
            // The model holds its own (folded, converted) copies.
            if let Some(w) = self.weights.as_mut() {
                w.tensors.clear();
            }
        }
        Ok(self.session.as_ref().expect("just set up"))
    }
}
