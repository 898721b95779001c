//! Progress reporting on stderr: a bar on a terminal, plain lines at a steady interval
//! otherwise (logs of Slurm jobs and workflow engines), nothing with `--quiet`.
//!
//! The bar redraws every second, so its elapsed time moves while the first batches compute;
//! off a terminal a thread of its own prints a line every [`LOG_EVERY`] (the first one after
//! [`FIRST_LOG`]), whether or not a row came back since, so a log never stays silent while a
//! large model warms up. Rates are rounded; the ETA comes from the rate so far.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Off a terminal: a line this often...
const LOG_EVERY: Duration = Duration::from_secs(10);
/// ...the first one this soon.
const FIRST_LOG: Duration = Duration::from_secs(2);

/// Set (under its lock) and signalled to stop the logging thread.
type Stop = Arc<(Mutex<bool>, Condvar)>;

/// Tiles done and cache hits so far, shared with the logging thread.
#[derive(Default)]
struct Counts {
    done: AtomicUsize,
    hits: AtomicUsize,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    counts: Arc<Counts>,
    total: usize,
    start: Instant,
    /// The logging thread (off a terminal) and how to stop it.
    logger: Option<(std::thread::JoinHandle<()>, Stop)>,
    finished: AtomicBool,
}

/// `12.3 tiles/s, ETA 4m05s` for `done` of `total` tiles in `secs`.
fn rate_and_eta(done: usize, total: usize, secs: f64) -> String {
    let rate = done as f64 / secs.max(1e-9);
    let eta = if done == 0 {
        "?".to_string()
    } else {
        clock((total.saturating_sub(done)) as f64 / rate)
    };
    format!("{rate:.1} tiles/s, ETA {eta}")
}

/// Seconds as `45s`, `4m05s` or `2h03m`.
pub fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// One plain progress line.
fn line(done: usize, hits: usize, total: usize, secs: f64) -> String {
    format!(
        "tilefeat: {done}/{total} tiles ({:.0}%), {} elapsed, {}, {hits} cached",
        100.0 * done as f64 / total.max(1) as f64,
        clock(secs),
        rate_and_eta(done, total, secs)
    )
}

impl Progress {
    pub fn new(total: usize, quiet: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress::with(total, quiet, tty, LOG_EVERY)
    }

    fn with(total: usize, quiet: bool, tty: bool, every: Duration) -> Progress {
        let counts = Arc::new(Counts::default());
        let start = Instant::now();
        let bar = (!quiet && tty).then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "[{elapsed_precise}] {bar:40} {pos}/{len} tiles  {msg}",
                )
                .expect("valid template"),
            );
            b.enable_steady_tick(Duration::from_secs(1));
            b
        });
        let logger = (!quiet && !tty).then(|| {
            let stop: Stop = Arc::new((Mutex::new(false), Condvar::new()));
            let (c, s) = (counts.clone(), stop.clone());
            let handle = std::thread::spawn(move || {
                let mut wait = FIRST_LOG.min(every);
                loop {
                    let (lock, cv) = &*s;
                    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (guard, _) = cv
                        .wait_timeout_while(guard, wait, |stopped| !*stopped)
                        .unwrap_or_else(|e| e.into_inner());
                    if *guard {
                        return;
                    }
                    drop(guard);
                    let (done, hits) = (
                        c.done.load(Ordering::Relaxed),
                        c.hits.load(Ordering::Relaxed),
                    );
                    eprintln!("{}", line(done, hits, total, start.elapsed().as_secs_f64()));
                    wait = every;
                }
            });
            (handle, stop)
        });
        Progress {
            bar,
            counts,
            total,
            start,
            logger,
            finished: AtomicBool::new(false),
        }
    }

    pub fn update(&mut self, done: usize, hits: usize) {
        self.counts.done.store(done, Ordering::Relaxed);
        self.counts.hits.store(hits, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            let secs = self.start.elapsed().as_secs_f64();
            let mut msg = rate_and_eta(done, self.total, secs);
            if hits > 0 {
                msg.push_str(&format!(", {hits} cached"));
            }
            b.set_message(msg);
        }
    }

    pub fn finish(&self) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if let Some((_, stop)) = &self.logger {
            let (lock, cv) = &**stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
        if let Some((handle, _)) = self.logger.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_and_rates_are_rounded() {
        assert_eq!(clock(0.4), "0s");
        assert_eq!(clock(59.6), "1m00s");
        assert_eq!(clock(245.0), "4m05s");
        assert_eq!(clock(7385.0), "2h03m");
        assert_eq!(rate_and_eta(0, 40, 3.0), "0.0 tiles/s, ETA ?");
        assert_eq!(rate_and_eta(10, 40, 0.9155), "10.9 tiles/s, ETA 3s");
        assert_eq!(
            line(10, 2, 40, 0.9155),
            "tilefeat: 10/40 tiles (25%), 1s elapsed, 10.9 tiles/s, ETA 3s, 2 cached"
        );
    }

    /// Off a terminal the logging thread stops with the progress (dropping it joins the
    /// thread: a thread that kept waiting out its hour-long interval would hang this test).
    #[test]
    fn the_logging_thread_stops_at_finish() {
        let mut p = Progress::with(10, false, false, Duration::from_secs(3600));
        p.update(3, 1);
        drop(p);
    }
}
