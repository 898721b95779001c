//! The model stage, the in-order heart of the pipeline (on the calling thread): tiles arrive
//! out of order from the decoders and leave in tile order to the writer; misses are put into
//! batch buffers for the model workers, and their rows wait until their batch is back.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, Sender};
use tch::Device;

use super::decoders::{Item, Prepared, WorkerTimes};
use super::stage_clock::{BatchBack, StageClock};
use super::state::PipelineState;
use super::workers::{BatchDone, BatchJob};
use super::writer::{OutRow, WriterMsg};
use super::ExtractConfig;
use crate::cache::Hash32;
use crate::cli::OnError;
use crate::encoder::PixelBuf;
use crate::error::{fail, ExitKind};
use crate::input::Tile;
use crate::output::provenance::{Skipped, Timings};
use crate::progress::Progress;

/// A row on its way to the writer.
pub(crate) struct Row {
    pub(crate) idx: usize,
    pub(crate) sha: Hash32,
    pub(crate) state: RowState,
}

pub(crate) enum RowState {
    Ready {
        features: Vec<f32>,
        hit: bool,
    },
    /// Row `k` of batch `id`.
    InBatch(u64, usize),
    Rejected(String),
}

/// The in-order heart of the pipeline: tiles arrive out of order from the decoders, leave in
/// order to the writer; misses are grouped into batches for the model workers.
pub(crate) struct ModelStage<'a> {
    cfg: &'a ExtractConfig,
    n_model: usize,
    tiles: &'a [Tile],
    batch: usize,
    dim: usize,
    rows_out: Sender<WriterMsg>,
    /// One is taken per group sent, given back once the writer has written it.
    group_credits: Receiver<()>,
    /// Groups of rows sent to the writer so far.
    groups_sent: u64,
    batches: Sender<BatchJob>,
    done: Receiver<BatchDone>,
    /// Rows not yet handed to the writer, in tile order.
    pending: VecDeque<Row>,
    /// The batch being filled.
    pixels: PixelBuf,
    in_batch: usize,
    next_batch: u64,
    /// Finished batches' features, until their rows are written.
    results: std::collections::HashMap<u64, Vec<f32>>,
    outstanding: usize,
    st: PipelineState,
    clock: StageClock,
    /// Makes a pixel buffer for a batch (the model's kind: on a GPU, page-locked).
    new_buffer: &'a dyn Fn() -> PixelBuf,
    /// Pixel buffers of finished batches, reused (a GPU batch of 256 is 38 MB: allocating it
    /// afresh each time costs page faults, and pinning it costs more).
    spare: Vec<PixelBuf>,
}

impl<'a> ModelStage<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &'a ExtractConfig,
        n_model: usize,
        tiles: &'a [Tile],
        new_buffer: &'a dyn Fn() -> PixelBuf,
        batch: usize,
        dim: usize,
        rows_out: Sender<WriterMsg>,
        group_credits: Receiver<()>,
        batches: Sender<BatchJob>,
        done: Receiver<BatchDone>,
    ) -> Self {
        ModelStage {
            cfg,
            n_model,
            tiles,
            batch,
            dim,
            rows_out,
            group_credits,
            groups_sent: 0,
            batches,
            done,
            pending: VecDeque::new(),
            pixels: new_buffer(),
            in_batch: 0,
            next_batch: 0,
            results: Default::default(),
            outstanding: 0,
            st: PipelineState::default(),
            clock: StageClock::new(n_model, !matches!(cfg.device, Device::Cpu)),
            new_buffer,
            spare: Vec::new(),
        }
    }

    pub(crate) fn run(
        &mut self,
        items: Receiver<(Item, WorkerTimes)>,
        credits: Sender<()>,
        progress: &mut Progress,
    ) -> Result<PipelineState> {
        let mut reorder: BTreeMap<usize, Item> = BTreeMap::new();
        let mut next = 0usize;
        let mut wt = WorkerTimes::default();
        let mut waiting = 0.0;
        // Room for every worker's batch, one queued and the one being filled, so the bound
        // never stalls the model; hits and rejects beyond it wait for the batches before them.
        let max_pending = (self.n_model + 2) * self.batch + 64;
        while next < self.tiles.len() {
            // Take the next tile in order, waiting for the decoders as needed.
            let item = loop {
                if let Some(it) = reorder.remove(&next) {
                    break it;
                }
                let t = Instant::now();
                let Ok((it, times)) = items.recv() else {
                    return Err(anyhow::anyhow!("decode workers stopped unexpectedly"));
                };
                waiting += t.elapsed().as_secs_f64();
                wt += &times;
                reorder.insert(it.idx, it);
            };
            next += 1;
            let _ = credits.send(());
            let state = match item.prepared {
                Prepared::Hit(features) => RowState::Ready {
                    features,
                    hit: true,
                },
                Prepared::Pixels(p) => {
                    self.pixels.push(&p);
                    self.in_batch += 1;
                    RowState::InBatch(self.next_batch, self.in_batch - 1)
                }
                Prepared::Bad(reason) => match self.cfg.on_error {
                    OnError::Fail => {
                        return Err(fail(
                            ExitKind::Input,
                            format!(
                            "tile {}: {reason} (use --on-error skip to record bad tiles and go on)",
                            self.tiles[item.idx].path.display()
                        ),
                        ))
                    }
                    OnError::Skip => {
                        if !self.cfg.quiet {
                            eprintln!(
                                "tilefeat: skipping {}: {reason}",
                                self.tiles[item.idx].path.display()
                            );
                        }
                        RowState::Rejected(reason)
                    }
                },
            };
            self.pending.push_back(Row {
                idx: item.idx,
                sha: item.sha,
                state,
            });
            if self.in_batch == self.batch {
                self.dispatch()?;
            }
            // Collect finished batches without blocking, and pass on what is ready.
            while let Ok(d) = self.done.try_recv() {
                self.receive(d)?;
            }
            if !self.flush_ready()? {
                return Ok(self.take_state(wt, waiting));
            }
            // Bound the rows held back: send the partial batch, wait for results, pass on.
            while self.pending.len() >= max_pending {
                if self.in_batch > 0 {
                    self.dispatch()?;
                }
                if self.outstanding == 0 {
                    break; // everything held back is ready and was just flushed
                }
                self.wait_one()?;
                if !self.flush_ready()? {
                    return Ok(self.take_state(wt, waiting));
                }
            }
            progress.update(self.st.written + self.st.skipped.len(), self.st.hits);
        }
        if self.in_batch > 0 {
            self.dispatch()?;
        }
        // The last batches: each one's rows go to the writer (and the cache) as soon as it is
        // back, not when the last is (a kill then loses only the batches still computing).
        while self.outstanding > 0 {
            self.wait_one()?;
            if !self.flush_ready()? {
                return Ok(self.take_state(wt, waiting));
            }
            progress.update(self.st.written + self.st.skipped.len(), self.st.hits);
        }
        if !self.flush_ready()? {
            return Ok(self.take_state(wt, waiting));
        }
        progress.update(next, self.st.hits);
        let _ = self.rows_out.send(WriterMsg::Finish {
            groups: self.groups_sent,
        });
        Ok(self.take_state(wt, waiting))
    }

    fn take_state(&mut self, wt: WorkerTimes, waiting: f64) -> PipelineState {
        let mut st = std::mem::take(&mut self.st);
        st.timings = Timings {
            read: wt.read,
            hash: wt.hash,
            cache_lookup: wt.lookup,
            decode: wt.decode,
            resize: wt.resize,
            model_waiting_for_tiles: waiting,
            ..Timings::default()
        };
        self.clock.fill(&mut st.timings);
        st.steady_tiles_per_s = self.clock.steady_tiles_per_s();
        st
    }

    /// Hand the open batch to a model worker; while they are all busy, take in results (so
    /// that workers blocked on returning them can go on).
    fn dispatch(&mut self) -> Result<()> {
        let mut job = BatchJob {
            id: self.next_batch,
            pixels: std::mem::replace(
                &mut self.pixels,
                self.spare.pop().unwrap_or_else(self.new_buffer),
            ),
            n: self.in_batch,
        };
        self.next_batch += 1;
        self.in_batch = 0;
        let stopped = || anyhow::anyhow!("model workers stopped unexpectedly");
        loop {
            match self.batches.try_send(job) {
                Ok(()) => {
                    self.outstanding += 1;
                    return Ok(());
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => return Err(stopped()),
                Err(crossbeam_channel::TrySendError::Full(j)) => {
                    job = j;
                    let mut sel = crossbeam_channel::Select::new();
                    sel.send(&self.batches);
                    let r = sel.recv(&self.done);
                    let t = Instant::now();
                    let ready = sel.ready();
                    self.clock.blocked(t.elapsed().as_secs_f64());
                    if ready == r {
                        match self.done.try_recv() {
                            Ok(d) => self.receive(d)?,
                            Err(crossbeam_channel::TryRecvError::Disconnected) => {
                                return Err(stopped())
                            }
                            Err(crossbeam_channel::TryRecvError::Empty) => {}
                        }
                    }
                }
            }
        }
    }

    fn wait_one(&mut self) -> Result<()> {
        let d = self
            .done
            .recv()
            .map_err(|_| anyhow::anyhow!("model workers stopped unexpectedly"))?;
        self.receive(d)
    }

    fn receive(&mut self, mut d: BatchDone) -> Result<()> {
        self.outstanding -= 1;
        let mut pixels = std::mem::replace(&mut d.pixels, PixelBuf::host(0));
        // A failed batch's upload may still be reading its buffer (nothing waited for the
        // stream): never refill that one; libtorch frees it once the copy is done.
        if d.features.is_ok() {
            pixels.clear();
            self.spare.push(pixels);
        }
        self.clock.batch_back(BatchBack {
            secs: d.secs,
            idle: d.idle,
            first: d.first,
            first_in_sample: d.first_in_sample,
            tiles: d.features.as_ref().map_or(0, |f| f.len() / self.dim.max(1)),
        });
        // The tile of a row the model got wrong (non-finite features), else the batch's first.
        let bad_row = d.features.as_ref().err().and_then(|e| {
            e.downcast_ref::<crate::encoder::NonFiniteRow>()
                .map(|r| r.0)
        });
        let feats = d.features.with_context(|| {
            let tile = self.pending.iter().find_map(|r| match r.state {
                RowState::InBatch(id, k) if id == d.id && bad_row.is_none_or(|b| b == k) => {
                    Some(self.tiles[r.idx].path.display().to_string())
                }
                _ => None,
            });
            match bad_row {
                Some(_) => format!("model failed on tile {}", tile.unwrap_or_default()),
                None => format!(
                    "model failed on the batch starting at {}",
                    tile.unwrap_or_default()
                ),
            }
        })?;
        self.results.insert(d.id, feats);
        Ok(())
    }

    /// Hand every finished row at the front to the writer. False if the writer stopped.
    fn flush_ready(&mut self) -> Result<bool> {
        let mut group = Vec::new();
        while let Some(front) = self.pending.front() {
            let ready = match front.state {
                RowState::InBatch(id, _) => self.results.contains_key(&id),
                _ => true,
            };
            if !ready {
                break;
            }
            let r = self.pending.pop_front().expect("front exists");
            let (features, hit) = match r.state {
                RowState::Ready { features, hit } => (features, hit),
                RowState::InBatch(id, k) => {
                    let feats = &self.results[&id];
                    let features = feats[k * self.dim..(k + 1) * self.dim].to_vec();
                    if (k + 1) * self.dim == feats.len() {
                        self.results.remove(&id);
                    }
                    (features, false)
                }
                RowState::Rejected(reason) => {
                    self.st.skipped.push(Skipped {
                        tile: self.tiles[r.idx].rel.clone(),
                        reason,
                    });
                    continue;
                }
            };
            if hit {
                self.st.hits += 1;
            } else {
                self.st.computed += 1;
            }
            self.st.written += 1;
            group.push(OutRow {
                idx: r.idx,
                sha: r.sha,
                features,
                hit,
            });
        }
        if group.is_empty() {
            return Ok(true);
        }
        // No credit: the writer has stopped (it failed; the run ends with its error).
        if self.group_credits.recv().is_err() {
            return Ok(false);
        }
        let seq = self.groups_sent;
        self.groups_sent += 1;
        Ok(self
            .rows_out
            .send(WriterMsg::Rows { seq, rows: group })
            .is_ok())
    }
}
