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
use crate::encoder::weights::Weights;
use crate::encoder::NativeResNet;
use crate::error::{ExitKind, WithKind};
use crate::output::provenance::RANDOM_WEIGHTS_WARNING;

/// What the samples of one `extract` command share, set up once, when the first sample needs
/// it: the weights (after the first folder is listed), then the model on its device and the
/// cache (after the first CSV could be created).
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) weights: Option<Weights>,
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
    pub(crate) runner: NativeResNet,
    /// Started with the model, shared by the samples (see [`ModelWorkers`]).
    pub(crate) workers: ModelWorkers,
    pub(crate) cuda: Option<CudaSetup>,
    pub(crate) cache: Option<Cache>,
    pub(crate) entries_at_open: usize,
}

impl Shared {
    pub(crate) fn weights(&mut self, cfg: &ExtractConfig) -> Result<&Weights> {
        if self.weights.is_none() {
            if cfg.weights.is_random() && !cfg.quiet {
                eprintln!("tilefeat: WARNING: {RANDOM_WEIGHTS_WARNING}");
            }
            let t = Instant::now();
            self.weights = Some(Weights::load(&cfg.weights, cfg.layer).kind(ExitKind::Weights)?);
            self.setup.weights = t.elapsed().as_secs_f64();
        }
        Ok(self.weights.as_ref().expect("just loaded"))
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
            let weights = self.weights(cfg)?;
            let t = Instant::now();
            let cuda = configure_cuda(cfg.device);
            let opts = RunOptions {
                device: cfg.device,
                precision: cfg.precision,
                channels_last: cfg.channels_last,
            };
            let model = ResNetTrunk::new(&weights.tensors, cfg.layer, cfg.pool, opts)
                .kind(ExitKind::Weights)?;
            let pad_to = matches!(cfg.device, Device::Cuda(_)).then_some(cfg.batch_size);
            let worker_stream = cuda.as_ref().and_then(|c| c.worker_stream);
            let runner = NativeResNet::new(model, cfg.normalize, cfg.size, pad_to, worker_stream);
            let t_cache = Instant::now();
            self.setup.model = (t_cache - t).as_secs_f64();
            let cache = match &cfg.cache_dir {
                Some(d) => Some(Cache::open(d, fingerprint)?),
                None => None,
            };
            self.setup.cache = t_cache.elapsed().as_secs_f64();
            let workers = ModelWorkers::start(&runner, cfg.device, cfg.torch_threads);
            self.session = Some(Session {
                workers,
                runner,
                cuda,
                entries_at_open: cache.as_ref().map_or(0, |c| c.len()),
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
