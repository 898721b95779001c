//! Error kinds and the process exit codes they map to.
//!
//! Errors travel as `anyhow::Error` with context naming the file involved. Where the kind of
//! failure matters to the caller (a workflow engine deciding whether to retry, a user reading
//! the README's table), the root of the chain is a [`Kinded`] error carrying an [`ExitKind`].
//! `main` prints the whole chain once and exits with the kind's code.

use std::fmt;

thread_local! {
    /// Set while a panic is caught by [`catch_panic`] and reported as an error naming what
    /// failed (a libjpeg error against its tile, a libtorch failure against its batch): the
    /// binary's panic hook then stays quiet, so the error is printed once.
    pub static PANIC_IS_CAUGHT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The first line of a message: libtorch's errors (and the panics tch makes of them) go on
/// with a C++ backtrace that nobody wants in a one-line report.
pub fn first_line(msg: &str) -> &str {
    msg.lines().next().unwrap_or_default()
}

/// What libtorch said, from the message of a tch panic (`called `Result::unwrap()` on an
/// `Err` value: Torch("...")`): its first line, without the C++ backtrace that follows it and
/// without the `[enforce fail at FILE:LINE] CONDITION.` prefix. Any other message: its first
/// line.
pub fn libtorch_message(panic: &str) -> String {
    let Some((_, payload)) = panic.split_once("Torch(\"") else {
        return first_line(panic).to_string();
    };
    // The payload is Debug-escaped: a line break is a backslash and an `n`.
    let end = [payload.find("\\n"), payload.find("\")")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(payload.len());
    let mut text = &payload[..end];
    if text.starts_with("[enforce fail at ") {
        if let Some((_, rest)) = text.split_once("] ") {
            // The failed condition (`err == 0.`), when there is one.
            text = match rest.split_once(". ") {
                Some((cond, r)) if cond.contains("==") || cond.contains("!=") => r,
                _ => rest,
            };
        }
    }
    text.trim().to_string()
}

/// Whether an error's text says that memory ran out (libtorch's CPU allocator, CUDA's,
/// oneDNN's `std::bad_alloc`).
pub fn is_out_of_memory(text: &str) -> bool {
    [
        "can't allocate memory",
        "out of memory",
        "bad_alloc",
        "Cannot allocate memory",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// Run `f`; a panic inside it (libjpeg errors unwind as panics; tch panics when libtorch
/// fails, e.g. out of GPU memory) comes back as its message instead of taking the thread
/// down.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let was = PANIC_IS_CAUGHT.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    PANIC_IS_CAUGHT.with(|c| c.set(was));
    result.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Exit codes, documented in the README and `tilefeat --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// 1: a bug or an unexpected system failure.
    Internal = 1,
    /// 2: invalid flags or combinations (clap also exits 2).
    Usage = 2,
    /// 3: bad input: missing/empty tile folder, unreadable tile, bad CSV for join.
    Input = 3,
    /// 4: weights missing, unreadable or not a ResNet50.
    Weights = 4,
    /// 5: the requested device is unavailable (e.g. `--device cuda` without CUDA).
    Device = 5,
    /// 6: an output cannot be written.
    Output = 6,
    /// 7: the cache directory is unusable or damaged (`cache verify`).
    Cache = 7,
}

/// An error whose kind decides the exit code. Its message is the full cause.
#[derive(Debug)]
pub struct Kinded {
    pub kind: ExitKind,
    pub message: String,
}

impl fmt::Display for Kinded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Kinded {}

/// A new error of `kind`.
pub fn fail(kind: ExitKind, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Kinded {
        kind,
        message: message.into(),
    })
}

/// Give any error a kind, keeping its whole chain as the message.
pub trait WithKind<T> {
    fn kind(self, kind: ExitKind) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> WithKind<T> for Result<T, E> {
    fn kind(self, kind: ExitKind) -> anyhow::Result<T> {
        self.map_err(|e| {
            let e: anyhow::Error = e.into();
            if kind_of(&e) != ExitKind::Internal {
                return e; // already kinded: the innermost kind wins
            }
            fail(kind, format!("{e:#}"))
        })
    }
}

/// The kind of an error chain: the first [`Kinded`] in it, else `Internal`.
pub fn kind_of(err: &anyhow::Error) -> ExitKind {
    err.chain()
        .find_map(|c| c.downcast_ref::<Kinded>().map(|k| k.kind))
        .unwrap_or(ExitKind::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn libtorch_messages_lose_their_backtrace() {
        let panic = r#"called `Result::unwrap()` on an `Err` value: Torch("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 134217728 bytes. Error code 12 (Cannot allocate memory)\nframe #0: c10::ThrowEnforceNotMet(char const*, int) + 0x6a\nframe #1: x\n")"#;
        let m = super::libtorch_message(panic);
        assert_eq!(
            m,
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 134217728 bytes. Error code 12 (Cannot allocate memory)"
        );
        assert!(super::is_out_of_memory(&m));
        let cuda = r#"called `Result::unwrap()` on an `Err` value: Torch("CUDA out of memory. Tried to allocate 2.00 GiB")"#;
        assert_eq!(
            super::libtorch_message(cuda),
            "CUDA out of memory. Tried to allocate 2.00 GiB"
        );
        assert_eq!(super::libtorch_message("plain\nsecond"), "plain");
        assert!(!super::is_out_of_memory("shape mismatch"));
    }

    #[test]
    fn kind_survives_context() {
        let r: anyhow::Result<()> = Err(fail(ExitKind::Input, "tile x is broken"));
        let e = r.context("while reading folder y").unwrap_err();
        assert_eq!(kind_of(&e), ExitKind::Input);
        assert_eq!(format!("{e:#}"), "while reading folder y: tile x is broken");
    }

    #[test]
    fn plain_errors_are_internal_until_kinded() {
        let e = anyhow::anyhow!("boom");
        assert_eq!(kind_of(&e), ExitKind::Internal);
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("disk full"));
        let e = r.kind(ExitKind::Output).unwrap_err();
        assert_eq!(kind_of(&e), ExitKind::Output);
    }
}
