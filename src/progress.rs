//! Progress reporting on stderr: a bar on a terminal, periodic plain lines otherwise (logs of
//! Slurm jobs and workflow engines), nothing with `--quiet`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: usize,
    start: Instant,
    last_log: Instant,
}

impl Progress {
    pub fn new(total: usize, quiet: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} tiles  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("valid template"),
            );
            b
        });
        Progress {
            bar,
            plain: !quiet && !tty,
            total,
            start: Instant::now(),
            last_log: Instant::now(),
        }
    }

    pub fn update(&mut self, done: usize, hits: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            if hits > 0 {
                b.set_message(format!("{hits} cached"));
            }
        } else if self.plain && self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let rate = done as f64 / secs.max(1e-9);
            let eta = if rate > 0.0 {
                format!("{:.0}s", (self.total - done) as f64 / rate)
            } else {
                "?".into()
            };
            eprintln!(
                "tilefeat: {done}/{} tiles ({:.0}%), {rate:.1} tiles/s, {hits} cached, ETA {eta}",
                self.total,
                100.0 * done as f64 / self.total.max(1) as f64
            );
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
