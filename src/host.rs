//! This host's name and its processes: what tells a live writer (of a cache pack, or of an
//! output) from one that died, on a shared filesystem where several hosts write.

use std::path::Path;

/// This host's name, reduced to `[A-Za-z0-9._]` (it is part of file names).
pub fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let h: String = h
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if h.is_empty() {
        "host".into()
    } else {
        h
    }
}

/// Whether process `pid` of this host is running.
pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
