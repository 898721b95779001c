//! Heap tuning for libtorch on the CPU. A ResNet forward allocates and frees activation
//! buffers of 1-100 MB per layer; with glibc's defaults those above its (dynamic, at most
//! 32 MiB) mmap threshold are mapped and unmapped every time, and freed heap tops are trimmed
//! back to the kernel, so every batch pays page faults and page zeroing again. Raising the mmap
//! threshold to 256 MiB and the trim threshold to 512 MiB keeps that memory in the process for
//! the next batch. Measured on the 2-core development machine (glibc 2.36, batch 32,
//! model-only): bf16 36 -> 42 images/s, fp32 17.6 -> 19.0; peak resident memory of a short
//! fp32 run 1.40 -> 1.78 GB, as memory now stays near the run's high-water mark instead of
//! dipping between batches. Results are byte-identical (only where buffers live changes).
//!
//! Only on glibc, never over a user's own malloc settings (`MALLOC_*` variables or
//! `glibc.malloc.*` in `GLIBC_TUNABLES`, which glibc has already applied when `main` starts),
//! and not when `TILEFEAT_NO_HEAP_TUNING=1` (for jobs whose memory limit is tight).
//! Older glibc refuses thresholds above 32 MiB; the tuning then uses 32 MiB (smaller buffers
//! still benefit). The trim threshold is only raised together with the mmap threshold: on its
//! own it switches off glibc's dynamic threshold and was measured slower (bf16 28 images/s).

use std::sync::OnceLock;

static STATE: OnceLock<&'static str> = OnceLock::new();

/// Apply the tuning once, before any thread starts. Returns a one-line account of what was
/// done (also shown by `tilefeat info`); later calls change nothing and return the same.
pub fn tune_heap() -> &'static str {
    STATE.get_or_init(imp::tune_heap)
}

/// What [`tune_heap`] did in this process ("not applied" if it was not called).
pub fn heap_tuning() -> &'static str {
    STATE.get().copied().unwrap_or("not applied")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    /// Above the largest activation of a batch of 32 in fp32 (conv1 and layer1: 103 MB).
    const MMAP_THRESHOLD: i32 = 256 << 20;
    /// The most glibc before 2.36 accepts (`HEAP_MAX_SIZE / 2`).
    const MMAP_THRESHOLD_OLD_GLIBC: i32 = 32 << 20;
    const TRIM_THRESHOLD: i32 = 512 << 20;

    /// Whether the user tuned malloc through the environment.
    pub fn user_set(vars: impl Iterator<Item = (String, String)>) -> bool {
        vars.into_iter().any(|(k, v)| {
            k.starts_with("MALLOC_") || (k == "GLIBC_TUNABLES" && v.contains("glibc.malloc."))
        })
    }

    pub fn tune_heap() -> &'static str {
        let vars = std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        });
        if crate::env_on("TILEFEAT_NO_HEAP_TUNING") {
            return "off (TILEFEAT_NO_HEAP_TUNING is set)";
        }
        if user_set(vars) {
            return "off (MALLOC_* or glibc.malloc tunables set by the user)";
        }
        // SAFETY: mallopt only changes allocator parameters; called from `main` before any
        // other thread exists.
        unsafe {
            let how = if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 {
                "on (mmap threshold 256 MiB, trim threshold 512 MiB)"
            } else if libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_GLIBC) == 1 {
                "on (mmap threshold 32 MiB, the most this glibc allows; trim threshold 512 MiB)"
            } else {
                return "off (glibc refused the mmap threshold)";
            };
            if libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 {
                how
            } else {
                "partly on (mmap threshold raised; glibc refused the trim threshold)"
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::user_set;

        fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
                .into_iter()
        }

        #[test]
        fn only_malloc_settings_count_as_the_users() {
            assert!(!user_set(env(&[("PATH", "/bin"), ("MALLOC", "x")])));
            assert!(!user_set(env(&[(
                "GLIBC_TUNABLES",
                "glibc.pthread.rseq=0"
            )])));
            assert!(user_set(env(&[("MALLOC_ARENA_MAX", "2")])));
            assert!(user_set(env(&[("MALLOC_MMAP_THRESHOLD_", "1000")])));
            assert!(user_set(env(&[(
                "GLIBC_TUNABLES",
                "glibc.pthread.rseq=0:glibc.malloc.mmap_threshold=1000"
            )])));
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn tune_heap() -> &'static str {
        "off (not glibc)"
    }
}
