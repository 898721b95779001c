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

/// Raise this process's soft limit on open files to its hard limit. A cache holds two files
/// open per pack (the pack and its segment) until gc merges them, and cluster nodes often
/// set a soft limit of 1,024 under a hard one many times higher.
pub fn raise_open_file_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            // An unlimited hard limit is refused by setrlimit: the kernel's ceiling instead.
            let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
                .unwrap_or(1 << 20);
            l.rlim_cur = l.rlim_max.min(ceiling);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
