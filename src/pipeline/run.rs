//! One sample through the pipeline's threads (see the module above for the picture): the
//! feeder and the decode workers, the model stage on the calling thread, the model workers
//! (shared by the samples of a command), the formatting threads and the writer. Every
//! channel is bounded, so memory does not grow with the tile count.

use anyhow::Result;
use crossbeam_channel::bounded;

use super::decoders::{decode_loop, Item, WorkerTimes};
use super::stage::ModelStage;
use super::state::PipelineState;
use super::workers::{Assignment, BatchDone, BatchJob, ModelWorkers};
use super::writer::{format_loop, writer_loop, Formatted, RowNames, WriterMsg};
use super::ExtractConfig;
use crate::cache::Cache;
use crate::encoder::Encoder;
use crate::error::{kind_of, ExitKind};
use crate::input::{Tile, TileSource};
use crate::output::FeatureWriter;
use crate::progress::Progress;

/// [`pipeline_on`] with model workers of its own (started for this run, stopped after it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pipeline<M: Encoder + 'static>(
    cfg: &ExtractConfig,
    source: &dyn TileSource,
    tiles: &[Tile],
    runner: &M,
    cache: Option<&Cache>,
    file: Box<dyn FeatureWriter>,
    progress: &mut Progress,
    dim: usize,
) -> Result<PipelineState> {
    let workers = ModelWorkers::start(runner, cfg.device, cfg.torch_threads);
    pipeline_on(
        cfg,
        source,
        RowNames::of(tiles),
        runner,
        &workers,
        cache,
        file,
        progress,
        dim,
    )
}

/// One sample's run through `workers` (which outlive it: see [`ModelWorkers`]); `runner`
/// makes the batch buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pipeline_on(
    cfg: &ExtractConfig,
    source: &dyn TileSource,
    names: RowNames<'_>,
    runner: &impl Encoder,
    workers: &ModelWorkers,
    cache: Option<&Cache>,
    file: Box<dyn FeatureWriter>,
    progress: &mut Progress,
    dim: usize,
) -> Result<PipelineState> {
    let tiles = names.tiles;
    let size = cfg.size as usize;
    let batch = cfg.batch_size;
    let n_model = workers.len();
    let window = (2 * n_model * batch + 2 * batch)
        .max(4 * cfg.decode_threads)
        .max(16);

    std::thread::scope(|scope| -> Result<PipelineState> {
        let (credit_tx, credit_rx) = bounded::<()>(window);
        for _ in 0..window {
            credit_tx.send(()).expect("credit channel has room");
        }
        let (job_tx, job_rx) = bounded::<usize>(window);
        let (item_tx, item_rx) = bounded::<(Item, WorkerTimes)>(window);
        let (row_tx, row_rx) = bounded::<WriterMsg>(8);
        let (batch_tx, batch_rx) = bounded::<BatchJob>(1);
        let (done_tx, done_rx) = bounded::<BatchDone>(n_model + 1);

        // Feeder: tile indices in order, never more than `window` in flight.
        let n_tiles = tiles.len();
        scope.spawn(move || {
            for i in 0..n_tiles {
                if credit_rx.recv().is_err() || job_tx.send(i).is_err() {
                    return;
                }
            }
        });
        // Decode workers.
        for _ in 0..cfg.decode_threads {
            let (job_rx, item_tx) = (job_rx.clone(), item_tx.clone());
            scope.spawn(move || decode_loop(source, tiles, size, cache, job_rx, item_tx));
        }
        drop(job_rx);
        drop(item_tx);
        // This sample's batches go to the model workers, whose results come back here.
        for w in &workers.control {
            let assignment = Assignment {
                jobs: batch_rx.clone(),
                done: done_tx.clone(),
            };
            if w.send(assignment).is_err() {
                return Err(anyhow::anyhow!("model workers stopped unexpectedly"));
            }
        }
        // Kept to throw away what is still queued if this sample stops early (below).
        let queued = batch_rx;
        drop(done_tx);
        // Writer: CSV text is made on a few threads, a group of rows each (2,048 floats take
        // 50-100 us a row: one thread would bound a GPU run near 15,000 rows/s), while one
        // thread writes the groups in order and stores new vectors in the cache.
        let format_threads = cfg.decode_threads.clamp(1, 4);
        let encoder = file.encoder();
        // A group is held until every group before it is written: credits bound how many wait
        // (a slow group must not let later ones pile up behind it).
        let in_flight = 2 * format_threads + 2;
        let (group_credit_tx, group_credits) = bounded::<()>(in_flight);
        for _ in 0..in_flight {
            group_credit_tx.send(()).expect("credit channel has room");
        }
        let (text_tx, text_rx) = bounded::<Formatted>(in_flight);
        for _ in 0..format_threads {
            let (row_rx, text_tx) = (row_rx.clone(), text_tx.clone());
            let encoder = encoder.clone();
            scope.spawn(move || format_loop(row_rx, text_tx, names, &*encoder));
        }
        drop(row_rx);
        drop(text_tx);
        let output = cfg.output.clone();
        let writer =
            scope.spawn(move || writer_loop(text_rx, group_credit_tx, file, cache, &output, names));

        let new_buffer = || runner.buffer(batch);
        let mut stage = ModelStage::new(
            cfg,
            n_model,
            tiles,
            &new_buffer,
            batch,
            dim,
            row_tx,
            group_credits,
            batch_tx,
            done_rx,
        );
        let result = stage.run(item_rx, credit_tx, progress);
        drop(stage);
        // A sample that stopped early: its queued batch is not computed (the workers, which
        // outlive this sample, would otherwise run it for no one), and its buffer is freed.
        queued.try_iter().for_each(drop);
        drop(queued);
        let write_result = writer.join().expect("writer thread panicked");
        let (mut state, written) = match (result, write_result) {
            // A cache failure in the writer matters more than what the model stage met after
            // it (say, a bad tile): it must stop the command, not just this sample.
            (Err(e), Err(w)) => {
                return Err(if kind_of(&w) == ExitKind::Output {
                    e
                } else {
                    w
                })
            }
            (Err(e), Ok(_)) => return Err(e),
            (Ok(_), Err(e)) => return Err(e),
            (Ok(s), Ok(w)) => (s, w),
        };
        state.timings.write = written.write;
        state.timings.format = written.format;
        if let Some((staged, committed)) = written.committed {
            state.staged = Some(staged);
            state.committed = committed;
        }
        Ok(state)
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use tch::Device;

    use super::*;
    use crate::cli::Precision;
    use crate::encoder::{NullModel, PixelBuf};
    use crate::input::folder::Folder;
    use crate::input::list_some_tiles;
    use crate::output::CsvWriter;

    /// Runs `pipeline` with `model` on the demo's sampleA (batches of 2) in a thread; the
    /// error chain, or a test failure if the run hangs. Nothing may be left under the final
    /// name either way.
    fn run_demo_pipeline<M: Encoder + 'static>(model: M) -> Result<(), String> {
        let d = tempfile::tempdir().unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/tiles/sampleA");
        let tiles = list_some_tiles(&mut Folder::new(&dir), &dir).unwrap().tiles;
        assert!(tiles.len() >= 5, "three batches of two or more");
        let out = d.path().join("f.csv");
        let cfg = demo_cfg(&dir, &out);
        let (tx, rx) = std::sync::mpsc::channel();
        let target = out.clone();
        std::thread::spawn(move || {
            let csv = Box::new(
                CsvWriter::create(
                    &target,
                    &crate::output::FileInfo {
                        dim: 2048,
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
            let mut progress = Progress::new(tiles.len(), true);
            let source = Folder::new(&cfg.tile_dir);
            let r = pipeline(
                &cfg,
                &source,
                &tiles,
                &model,
                None,
                csv,
                &mut progress,
                2048,
            );
            let _ = tx.send(r.map(|_| ()).map_err(|e| format!("{e:#}")));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the run hung");
        if result.is_err() {
            assert!(!out.exists(), "nothing under the final name");
        }
        result
    }

    /// The demo pipeline's settings: batches of 2, 2 decode threads, 32 px, writing `out`.
    fn demo_cfg(dir: &Path, out: &Path) -> ExtractConfig {
        ExtractConfig::for_pipeline_bench(
            dir,
            out,
            2,
            2,
            32,
            crate::cli::Layer::Layer4,
            Precision::Fp32,
        )
    }

    fn null_model() -> NullModel {
        NullModel {
            dim: 2048,
            tile_bytes: 32 * 32 * 3,
        }
    }

    /// Regression: a model worker that panics (tch does when libtorch fails, e.g. out of GPU
    /// memory) fails the run with an error naming the batch. Before, the other worker kept
    /// the run waiting forever.
    #[test]
    fn a_panicking_model_fails_the_run_instead_of_hanging() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Flaky {
            calls: Arc<AtomicUsize>,
            inner: NullModel,
        }
        impl Encoder for Flaky {
            fn fork(&self) -> Self {
                Flaky {
                    calls: self.calls.clone(),
                    inner: self.inner.fork(),
                }
            }
            fn buffer(&self, tiles: usize) -> PixelBuf {
                self.inner.buffer(tiles)
            }
            fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
                if self.calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    panic!("CUDA out of memory (simulated)\nException raised from ...");
                }
                self.inner.run(pixels, n)
            }
        }
        let e = run_demo_pipeline(Flaky {
            calls: Arc::new(AtomicUsize::new(0)),
            inner: null_model(),
        })
        .expect_err("a panicking model must fail the run");
        assert!(
            e.contains("model failed on the batch starting at ")
                && e.contains("libtorch failed: CUDA out of memory (simulated)")
                && !e.contains("Exception raised"),
            "{e}"
        );
    }

    /// The model workers of one command serve its samples one after the other: each worker is
    /// set up once, and a sample that fails on a batch leaves nothing behind for the next one,
    /// whose rows are those of a run on fresh workers.
    #[test]
    fn model_workers_serve_several_samples_without_mixing_them() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Counting {
            starts: Arc<AtomicUsize>,
            calls: Arc<AtomicUsize>,
            fail_call: usize,
            inner: NullModel,
        }
        impl Encoder for Counting {
            fn fork(&self) -> Self {
                Counting {
                    starts: self.starts.clone(),
                    calls: self.calls.clone(),
                    fail_call: self.fail_call,
                    inner: self.inner.fork(),
                }
            }
            fn buffer(&self, tiles: usize) -> PixelBuf {
                self.inner.buffer(tiles)
            }
            fn start_worker(&self) -> Result<()> {
                self.starts.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
                let call = self.calls.fetch_add(1, Ordering::SeqCst);
                if call == self.fail_call {
                    anyhow::bail!("simulated failure");
                }
                if call == self.fail_call + 1 {
                    // Still busy with the failed sample's batch when the next one starts.
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
                self.inner.run(pixels, n)
            }
        }
        let d = tempfile::tempdir().unwrap();
        let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/tiles");
        // Three samples of different tiles (6, 5 and 4): a row from one sample's late batch
        // showing up in the next would not be that sample's own.
        let dirs: Vec<PathBuf> = ["sampleA", "sampleB", "sampleC"]
            .iter()
            .map(|s| demo.join(s))
            .collect();
        let model = Counting {
            starts: Arc::new(AtomicUsize::new(0)),
            calls: Arc::new(AtomicUsize::new(0)),
            // Sample A takes calls 0-2 (three batches of two); sample B fails on its second.
            fail_call: 4,
            inner: null_model(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let out = d.path().to_path_buf();
        let starts = model.starts.clone();
        std::thread::spawn(move || {
            let run = |dir: &Path, path: &Path, workers: Option<&ModelWorkers>| {
                let tiles = list_some_tiles(&mut Folder::new(dir), dir).unwrap().tiles;
                let cfg = demo_cfg(dir, path);
                let csv = Box::new(
                    CsvWriter::create(
                        path,
                        &crate::output::FileInfo {
                            dim: 2048,
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                );
                let mut progress = Progress::new(tiles.len(), true);
                let source = Folder::new(dir);
                let r = match workers {
                    Some(w) => pipeline_on(
                        &cfg,
                        &source,
                        RowNames::of(&tiles),
                        &model,
                        w,
                        None,
                        csv,
                        &mut progress,
                        2048,
                    ),
                    // A run of its own, on fresh workers.
                    None => pipeline(
                        &cfg,
                        &source,
                        &tiles,
                        &null_model(),
                        None,
                        csv,
                        &mut progress,
                        2048,
                    ),
                };
                r.map(|mut s| {
                    s.staged.take().expect("finished").commit().unwrap();
                    std::fs::read(path).unwrap()
                })
                .map_err(|e| format!("{e:#}"))
            };
            let workers = ModelWorkers::start(&model, Device::Cpu, 2);
            let mut results = Vec::new();
            for (k, dir) in dirs.iter().enumerate() {
                results.push(run(dir, &out.join(format!("s{k}.csv")), Some(&workers)));
            }
            drop(workers);
            for (k, dir) in dirs.iter().enumerate() {
                results.push(run(dir, &out.join(format!("fresh{k}.csv")), None));
            }
            let _ = tx.send(results);
        });
        let results = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the runs hung");
        let fresh: Vec<&Vec<u8>> = results[3..].iter().map(|r| r.as_ref().unwrap()).collect();
        assert_ne!(fresh[0], fresh[2], "the samples' rows differ");
        assert_eq!(
            results[0].as_ref().unwrap(),
            fresh[0],
            "sample A is its own"
        );
        let e = results[1].as_ref().expect_err("the second sample fails");
        assert!(e.contains("simulated failure"), "{e}");
        assert!(
            !d.path().join("s1.csv").exists(),
            "nothing under its final name"
        );
        assert_eq!(
            results[2].as_ref().unwrap(),
            fresh[2],
            "the third sample gets its own rows, none of the failed one's"
        );
        assert_eq!(starts.load(Ordering::SeqCst), 2, "each worker set up once");
    }

    /// A model worker that cannot be set up (say, no CUDA stream for it) fails the run with
    /// the reason, naming the batch, instead of hanging or running without it.
    #[test]
    fn a_worker_that_cannot_start_fails_the_run() {
        struct Unstartable(NullModel);
        impl Encoder for Unstartable {
            fn fork(&self) -> Self {
                Unstartable(self.0.fork())
            }
            fn buffer(&self, tiles: usize) -> PixelBuf {
                self.0.buffer(tiles)
            }
            fn start_worker(&self) -> Result<()> {
                anyhow::bail!("no stream for this worker (simulated)")
            }
            fn run(&self, pixels: &mut PixelBuf, n: usize) -> Result<Vec<f32>> {
                self.0.run(pixels, n)
            }
        }
        let e = run_demo_pipeline(Unstartable(null_model())).expect_err("must fail");
        assert!(
            e.contains("model failed on the batch starting at ")
                && e.contains("no stream for this worker (simulated)"),
            "{e}"
        );
        // The same pipeline with a model that starts runs through.
        run_demo_pipeline(null_model()).unwrap();
    }

    /// A decode worker that panics on a tile (a decoder bug) makes that tile bad, named with
    /// the panic's first line, and the run goes on: with `--on-error skip` the other rows are
    /// written, with `fail` the run stops naming the tile; it never hangs.
    #[test]
    fn a_panicking_decode_worker_makes_its_tile_bad() {
        struct Panicky(Folder);
        impl TileSource for Panicky {
            fn list(&mut self) -> Result<crate::input::Listing> {
                self.0.list()
            }
            fn read(&self, tile: &Tile) -> std::io::Result<Vec<u8>> {
                if tile.rel.ends_with("tile_100_100.jpg") {
                    panic!("decoder bug (simulated)\nsecond line");
                }
                self.0.read(tile)
            }
        }
        let d = tempfile::tempdir().unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/tiles/sampleA");
        let mut source = Panicky(Folder::new(&dir));
        let tiles = list_some_tiles(&mut source, &dir).unwrap().tiles;
        assert!(tiles.iter().any(|t| t.rel == "tile_100_100.jpg"));
        for skip in [true, false] {
            let out = d.path().join(format!("{skip}.csv"));
            let mut cfg = demo_cfg(&dir, &out);
            if !skip {
                cfg.on_error = crate::cli::OnError::Fail;
            }
            let csv = Box::new(
                CsvWriter::create(
                    &out,
                    &crate::output::FileInfo {
                        dim: 2048,
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
            let mut progress = Progress::new(tiles.len(), true);
            let r = crate::error::catch_panic(|| {
                pipeline(
                    &cfg,
                    &source,
                    &tiles,
                    &null_model(),
                    None,
                    csv,
                    &mut progress,
                    2048,
                )
            })
            .expect("the panic is caught in the worker");
            if skip {
                let st = r.unwrap();
                assert_eq!(st.written, tiles.len() - 1);
                assert_eq!(st.skipped.len(), 1);
                assert_eq!(st.skipped[0].tile, "tile_100_100.jpg");
                assert_eq!(
                    st.skipped[0].reason,
                    "internal error: decoder bug (simulated)"
                );
            } else {
                let e = format!("{:#}", r.err().unwrap());
                assert!(
                    e.contains("tile_100_100.jpg") && e.contains("decoder bug"),
                    "{e}"
                );
                assert!(!out.exists());
            }
        }
    }
}
