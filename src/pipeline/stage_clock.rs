//! What the model stage measures about the model workers: compute and warm-up seconds, the
//! waits that say which side bounds a run, and the steady-state rate once every worker is
//! warm (`steady_tiles_per_s`, comparable with `tilefeat bench`'s model-only figure).

use std::time::Instant;

use crate::output::provenance::Timings;

/// The model stage's clock for one sample.
pub(crate) struct StageClock {
    n_model: usize,
    /// On a GPU a worker's first batch ever also loads kernels and builds cuDNN's plans.
    gpu: bool,
    compute: f64,
    /// Model workers' first batches (see `BatchDone::first`).
    warmup: f64,
    /// Model workers waiting for batches, summed.
    workers_idle: f64,
    /// Waiting in `dispatch` for a worker to take the queued batch.
    dispatch_blocked: f64,
    /// Workers whose first batch of this sample came back; when the last of them did.
    warm_workers: usize,
    warm_at: Option<Instant>,
    /// Batches and tiles back since `warm_at`, and when the last came.
    steady_batches: usize,
    steady_tiles: usize,
    last_back: Option<Instant>,
}

/// What the clock needs to know of a batch that came back.
pub(crate) struct BatchBack {
    /// Seconds the worker computed, and waited for the batch before that.
    pub secs: f64,
    pub idle: f64,
    /// The worker's first batch ever, and its first of this sample.
    pub first: bool,
    pub first_in_sample: bool,
    /// Tiles computed (0 for a failed batch).
    pub tiles: usize,
}

impl StageClock {
    pub(crate) fn new(n_model: usize, gpu: bool) -> StageClock {
        StageClock {
            n_model,
            gpu,
            compute: 0.0,
            warmup: 0.0,
            workers_idle: 0.0,
            dispatch_blocked: 0.0,
            warm_workers: 0,
            warm_at: None,
            steady_batches: 0,
            steady_tiles: 0,
            last_back: None,
        }
    }

    /// The model stage held a full batch for `secs` while every worker was busy.
    pub(crate) fn blocked(&mut self, secs: f64) {
        self.dispatch_blocked += secs;
    }

    pub(crate) fn batch_back(&mut self, b: BatchBack) {
        self.workers_idle += b.idle;
        if b.first && self.gpu {
            self.warmup += b.secs;
        } else {
            self.compute += b.secs;
        }
        // The steady state starts once every worker has had its first batch of this sample
        // back: in the first sample of a command that is its warm-up (kernels, cuDNN plans),
        // in later ones the pipeline filling up again.
        let now = Instant::now();
        if b.first_in_sample {
            self.warm_workers += 1;
            if self.warm_workers == self.n_model {
                self.warm_at = Some(now);
            }
        } else if self.warm_at.is_some() {
            self.steady_batches += 1;
            self.steady_tiles += b.tiles;
            self.last_back = Some(now);
        }
    }

    /// Computed tiles per second once every worker was warm; None for runs too short to tell
    /// (fewer than four batches per worker after that).
    pub(crate) fn steady_tiles_per_s(&self) -> Option<f64> {
        match (self.warm_at, self.last_back) {
            (Some(a), Some(b)) if self.steady_batches >= 4 * self.n_model && b > a => {
                Some(self.steady_tiles as f64 / (b - a).as_secs_f64())
            }
            _ => None,
        }
    }

    /// The model side's fields of `t`.
    pub(crate) fn fill(&self, t: &mut Timings) {
        t.model_warmup = self.warmup;
        t.model_compute = self.compute;
        t.workers_waiting_for_batches = self.workers_idle;
        t.batches_waiting_for_workers = self.dispatch_blocked;
    }
}
