//! The model worker threads: each takes batches from the sample it is assigned to, runs the
//! encoder on them and sends the features back. They outlive a sample (see [`ModelWorkers`]).

use std::time::Instant;

use anyhow::Result;
use crossbeam_channel::{Receiver, Sender};
use tch::Device;

use crate::encoder::{Encoder, PixelBuf};

/// A batch for a model worker, and what comes back.
pub(crate) struct BatchJob {
    pub(crate) id: u64,
    pub(crate) pixels: PixelBuf,
    pub(crate) n: usize,
}

pub(crate) struct BatchDone {
    pub(crate) id: u64,
    pub(crate) features: Result<Vec<f32>>,
    /// The batch's pixel buffer, handed back for the next batch to fill.
    pub(crate) pixels: PixelBuf,
    pub(crate) secs: f64,
    /// How long the worker waited for this batch.
    pub(crate) idle: f64,
    /// The worker's first batch of this sample (its first ever, or its first after an
    /// earlier sample of the command).
    pub(crate) first_in_sample: bool,
    /// This worker's first batch: on a GPU it also loads kernels and builds cuDNN's plans
    /// (which libtorch keeps per thread), so it is timed apart.
    pub(crate) first: bool,
}

/// How many model workers, and libtorch threads each: on the CPU, one single-threaded worker
/// per thread (per-image arithmetic is then identical whatever --threads and --batch-size,
/// which multi-threaded kernels do not guarantee); on a GPU, two workers so that one batch is
/// always queued while the other's results come back.
pub fn model_workers(device: Device, torch_threads: usize) -> (usize, usize) {
    match device {
        Device::Cpu => (torch_threads, 1),
        _ => (2, torch_threads),
    }
}

/// The model worker threads. They outlive a sample: `extract DIR... --outdir` starts them
/// once, with the model, and each sample hands them its batches ([`Assignment`]), so on a
/// GPU only the first sample's first batches pay the warm-up (kernels loaded, cuDNN plans
/// made, which libtorch keeps per thread; later samples' new threads took 0.13-0.15 s each
/// on an H200). Results go back on the sample's own channel, so samples never mix: a sample
/// that stops early drops its channels, and a worker still busy with one of its batches
/// finds no one to reply to and moves on to the next sample. Dropping `ModelWorkers` stops
/// and joins the threads.
pub(crate) struct ModelWorkers {
    pub(crate) control: Vec<Sender<Assignment>>,
    pub(crate) handles: Vec<std::thread::JoinHandle<()>>,
}

/// One sample's work for a model worker: batches to take, and where the results go.
pub(crate) struct Assignment {
    pub(crate) jobs: Receiver<BatchJob>,
    pub(crate) done: Sender<BatchDone>,
}

impl ModelWorkers {
    /// Start the workers for `device` (see [`model_workers`]), each with its own handle on
    /// `model`'s (shared) weights.
    pub(crate) fn start<M: Encoder + 'static>(
        model: &M,
        device: Device,
        torch_threads: usize,
    ) -> ModelWorkers {
        let (n_model, model_threads) = model_workers(device, torch_threads);
        let slow = SlowWorker::from_env();
        let mut control = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n_model {
            let (tx, rx) = crossbeam_channel::unbounded::<Assignment>();
            let worker = model.fork();
            handles.push(std::thread::spawn(move || {
                worker_loop(worker, model_threads, rx, slow)
            }));
            control.push(tx);
        }
        ModelWorkers { control, handles }
    }

    pub(crate) fn len(&self) -> usize {
        self.control.len()
    }
}

impl Drop for ModelWorkers {
    fn drop(&mut self) {
        self.control.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// For the black-box tests of what a crash or a slow device does (kill -9 resume, `cache gc`
/// beside a live writer, progress lines): `TILEFEAT_TEST_BATCH_DELAY_MS` makes every model
/// worker sleep that long before each batch, and `TILEFEAT_TEST_STALL_AFTER_BATCHES=N` makes
/// each worker stop for good after N batches (the process then holds its cache pack open
/// until it is killed). Not for users: both only slow a run down.
#[derive(Debug, Clone, Copy, Default)]
struct SlowWorker {
    delay_ms: u64,
    stall_after: Option<u64>,
}

impl SlowWorker {
    fn from_env() -> SlowWorker {
        let num = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        SlowWorker {
            delay_ms: num("TILEFEAT_TEST_BATCH_DELAY_MS").unwrap_or(0),
            stall_after: num("TILEFEAT_TEST_STALL_AFTER_BATCHES"),
        }
    }

    /// Before batch number `done` (counted from 0) of this worker.
    fn before_batch(&self, done: u64) {
        if self.stall_after.is_some_and(|n| done >= n) {
            loop {
                std::thread::park();
            }
        }
        if self.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
        }
    }
}

/// A model worker: set up once, then each sample's batches until that sample's queue closes.
fn worker_loop<M: Encoder>(
    worker: M,
    threads: usize,
    control: Receiver<Assignment>,
    slow: SlowWorker,
) {
    tch::set_num_threads(threads as i32);
    // A worker that cannot start fails each batch it gets, so the run stops with the reason
    // (tch panics when libtorch fails: caught the same way).
    let started = match crate::error::catch_panic(|| worker.start_worker()) {
        Ok(r) => r.map_err(|e| format!("{e:#}")),
        Err(msg) => Err(format!(
            "libtorch failed: {}",
            crate::error::libtorch_message(&msg)
        )),
    };
    let mut first = true;
    let mut batches = 0u64;
    for sample in control.iter() {
        let mut first_in_sample = true;
        loop {
            let t = Instant::now();
            let Ok(mut job) = sample.jobs.recv() else {
                break;
            };
            let idle = t.elapsed().as_secs_f64();
            slow.before_batch(batches);
            batches += 1;
            let t = Instant::now();
            // A panic (tch panics when libtorch fails, e.g. out of GPU memory) is this
            // batch's error: a dead worker would leave the run waiting forever.
            let features = match &started {
                Err(e) => Err(anyhow::anyhow!("{e}")),
                Ok(()) => crate::error::catch_panic(|| worker.run(&mut job.pixels, job.n))
                    .unwrap_or_else(|msg| {
                        Err(anyhow::anyhow!(
                            "libtorch failed: {}",
                            crate::error::libtorch_message(&msg)
                        ))
                    }),
            };
            let secs = t.elapsed().as_secs_f64();
            let was_first = std::mem::replace(&mut first, false);
            let done = BatchDone {
                id: job.id,
                features,
                pixels: job.pixels,
                secs,
                idle,
                first: was_first,
                first_in_sample: std::mem::replace(&mut first_in_sample, false),
            };
            if sample.done.send(done).is_err() {
                break; // that sample has stopped: on to the next
            }
        }
    }
}
