//! Ctrl-C, `scancel` and a Slurm time limit: SIGINT, SIGTERM or SIGHUP end the process as a
//! kill would (every vector a batch computed is already in the cache, a pack left unsealed is
//! recovered by the next run), but first say so, say what a rerun resumes from, and remove
//! this process's temporary files and output locks, so that nothing half-written is left
//! beside the outputs and a rerun on another node is not refused by a lock of this one.
//! The exit status is 128 + the signal's number (130, 143, 129), as a shell reports it.
//!
//! The handler only writes to a pipe (`signal-hook`); a thread of its own does the rest. It
//! waits for files being renamed into place as a unit (a feature file and its provenance) to
//! be all renamed, so a signal never splits them. A second signal ends the process at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Temporary files this process is writing (`output::atomic`) and output locks it holds
/// (`output::lock`), removed on a signal.
static REMOVED_ON_SIGNAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// What a rerun of the command resumes from, said on a signal (set by `extract`).
static RESUME: Mutex<Option<String>> = Mutex::new(None);
/// Held (shared) while files that belong together are renamed into place; the signal thread
/// takes it (exclusive) before the process ends, so a signal never leaves a feature file
/// renamed and its provenance not.
static COMMITS: RwLock<()> = RwLock::new(());
/// Set when a signal is being handled (a second one then ends the process at once).
static HANDLING: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Start watching for the signals. Called once, first thing in `main`; a failure (no thread,
/// no pipe) leaves the default action, which ends the process all the same.
pub fn install() {
    let handling = HANDLING
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // A second signal while the first is handled: exit at once.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, handling.clone());
    }
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                handling.store(true, Ordering::SeqCst);
                eprintln!("{}", message(sig, lock(&RESUME).as_deref()));
                let _no_more_commits = COMMITS.write().unwrap_or_else(|e| e.into_inner());
                for tmp in lock(&REMOVED_ON_SIGNAL).iter() {
                    let _ = std::fs::remove_file(tmp);
                }
                signal_hook::low_level::exit(128 + sig);
            }
        });
    drop(spawned);
}

/// Called by `main` before it exits: once a signal is being handled, the signal thread ends
/// the process (with 128 + the signal, after the renames it waits for), not `main` with the
/// status of a run the signal cut short.
pub fn yield_to_signal() {
    if HANDLING.get().is_some_and(|h| h.load(Ordering::SeqCst)) {
        loop {
            std::thread::park();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What is said on signal `sig`, with what a rerun resumes from (`None`: not an `extract`).
fn message(sig: i32, resume: Option<&str>) -> String {
    let name = match sig {
        SIGINT => "SIGINT (Ctrl-C)",
        SIGTERM => "SIGTERM (scancel, or a job's time limit)",
        SIGHUP => "SIGHUP (the terminal closed)",
        _ => "a signal",
    };
    // On a terminal the progress bar holds the line: start a new one.
    let newline = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        "\n"
    } else {
        ""
    };
    let what = match resume {
        Some(r) => {
            format!("; no output was written under its final name for the sample in progress: {r}")
        }
        None => "; no output was written under its final name".to_string(),
    };
    format!("{newline}tilefeat: interrupted by {name}{what}")
}

/// Files that belong together are being renamed into place: a signal waits for them.
pub fn commit_guard() -> RwLockReadGuard<'static, ()> {
    COMMITS.read().unwrap_or_else(|e| e.into_inner())
}

/// A temporary file or a lock now exists; removed on a signal until [`forget`].
pub fn track(tmp: PathBuf) {
    lock(&REMOVED_ON_SIGNAL).push(tmp);
}

/// A temporary file was renamed or removed, a lock released.
pub fn forget(tmp: &std::path::Path) {
    let mut temps = lock(&REMOVED_ON_SIGNAL);
    if let Some(i) = temps.iter().rposition(|t| t == tmp) {
        temps.swap_remove(i);
    }
}

/// What a rerun resumes from, for the message on a signal: e.g. "the tiles computed so far
/// are in the cache /data/.tilefeat-cache: run the same command to resume".
pub fn set_resume(what: String) {
    *lock(&RESUME) = Some(what);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_signal_and_what_a_rerun_resumes_from() {
        let m = message(
            SIGTERM,
            Some("in the cache /c: run the same command to resume"),
        );
        assert!(m.contains("interrupted by SIGTERM"), "{m}");
        assert!(
            m.ends_with("in progress: in the cache /c: run the same command to resume"),
            "{m}"
        );
        let m = message(SIGINT, None);
        assert!(
            m.contains("SIGINT (Ctrl-C)") && !m.contains("resume"),
            "{m}"
        );
    }

    #[test]
    fn temporaries_are_forgotten_once_renamed() {
        let a = PathBuf::from("/nonexistent/.a.tilefeat-tmp.1");
        track(a.clone());
        assert!(lock(&REMOVED_ON_SIGNAL).contains(&a));
        forget(&a);
        assert!(!lock(&REMOVED_ON_SIGNAL).contains(&a));
    }
}
