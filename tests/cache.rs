//! Black-box tests of the content-hash cache: hits and misses, fingerprints, damage,
//! concurrent writers (`kill -9` resume and live writers: `cache_live.rs`).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use predicates::prelude::*;

fn with_cache(cache: &Path) -> Vec<String> {
    vec!["--cache-dir".into(), cache.to_str().unwrap().into()]
}

fn args<'a>(v: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    v.iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
        .collect()
}

#[test]
fn rerun_hits_and_equals_and_moving_tiles_still_hits() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = with_cache(&cache);
    let tiles = demo_sample("sampleB");
    let fresh = d.path().join("fresh.csv");
    extract_ok(&tiles, &fresh, &[]);
    let first = d.path().join("first.csv");
    extract_ok(&tiles, &first, &args(&c, &[]));
    assert_eq!(prov_u64(&first, &["cache", "hits"]), 0);
    assert_eq!(prov_u64(&first, &["cache", "stored"]), 5);
    assert_same(
        &first,
        &fresh,
        "a cached run writes what an uncached one does",
    );
    let second = d.path().join("second.csv");
    extract_ok(&tiles, &second, &args(&c, &["--batch-size", "3"]));
    assert_eq!(prov_u64(&second, &["cache", "hits"]), 5);
    assert_eq!(prov_u64(&second, &["tiles", "computed"]), 0);
    assert_same(&second, &fresh, "hits return exactly the stored values");
    // Move and rename the tiles: same bytes, same features.
    let moved = d.path().join("elsewhere").join("renamed");
    std::fs::create_dir_all(&moved).unwrap();
    for (i, e) in std::fs::read_dir(&tiles).unwrap().enumerate() {
        let e = e.unwrap();
        let ext = e.path().extension().unwrap().to_str().unwrap().to_string();
        std::fs::copy(e.path(), moved.join(format!("x{i}.{ext}"))).unwrap();
    }
    let third = d.path().join("third.csv");
    extract_ok(&moved, &third, &args(&c, &[]));
    assert_eq!(prov_u64(&third, &["cache", "hits"]), 5);
    // Environment variable works too, and --no-cache bypasses it.
    let o = d.path().join("env.csv");
    extract_cmd(&tiles, &o)
        .env("TILEFEAT_CACHE_DIR", &cache)
        .arg("--quiet")
        .assert()
        .success();
    assert_eq!(prov_u64(&o, &["cache", "hits"]), 5);
    forget_run(&o);
    extract_cmd(&tiles, &o)
        .env("TILEFEAT_CACHE_DIR", &cache)
        .args(["--quiet", "--no-cache"])
        .assert()
        .success();
    assert_eq!(prov_u64(&o, &["cache", "hits"]), 0);
    cache_cmd("verify", &cache).assert().success();
    tilefeat()
        .args(["cache", "stats", "--cache-dir", cache.to_str().unwrap()])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("entries: 5 (5 unique)")
                .and(predicate::str::contains("fingerprints: 1")),
        );
}

#[test]
fn every_fingerprint_change_misses() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = with_cache(&cache);
    let tiles = d.path().join("two");
    make_tiles(&tiles, 2, 96);
    let out = d.path().join("o.csv");
    extract_ok(&tiles, &out, &args(&c, &[]));
    for change in [
        vec!["--layer", "layer3"],
        vec!["--pool", "avg"],
        vec!["--normalize", "imagenet"],
        vec!["--size", "160"],
        vec!["--precision", "bf16"],
        vec!["--weights", "random:1"],
        // Its last bits differ from NHWC's: a cache must not serve one for the other.
        vec!["--layout", "nchw"],
    ] {
        extract_ok(&tiles, &out, &args(&c, &change));
        assert_eq!(
            prov_u64(&out, &["cache", "hits"]),
            0,
            "{change:?} must miss"
        );
        forget_run(&out);
        extract_ok(&tiles, &out, &args(&c, &change));
        assert_eq!(
            prov_u64(&out, &["cache", "hits"]),
            2,
            "{change:?} rerun must hit"
        );
    }
    tilefeat()
        .args(["cache", "stats", "--cache-dir", cache.to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("fingerprints: 8"));
}

fn pack_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(cache.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_packs_are_reported_never_served_and_recomputed() {
    for damage in ["bitflip", "truncate"] {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        let c = with_cache(&cache);
        let tiles = demo_sample("sampleC");
        let clean = d.path().join("clean.csv");
        extract_ok(&tiles, &clean, &args(&c, &[]));
        let pack = &pack_files(&cache)[0];
        let mut bytes = std::fs::read(pack).unwrap();
        match damage {
            "bitflip" => {
                let n = bytes.len();
                bytes[n / 2] ^= 0x01;
            }
            _ => bytes.truncate(bytes.len() - 100),
        }
        std::fs::write(pack, bytes).unwrap();
        cache_cmd("verify", &cache)
            .assert()
            .code(7)
            .stdout(predicate::str::contains("DAMAGED"));
        let again = d.path().join("again.csv");
        extract_ok(&tiles, &again, &args(&c, &[]));
        assert_eq!(
            prov_u64(&again, &["cache", "damaged_records"]),
            1,
            "{damage}"
        );
        assert_eq!(prov_u64(&again, &["cache", "hits"]), 3, "{damage}");
        assert_same(
            &again,
            &clean,
            &format!("{damage}: the damaged tile was recomputed"),
        );
        // gc drops the damaged record and keeps the rest, plus the recomputed one.
        tilefeat()
            .args(["cache", "gc", "--cache-dir", cache.to_str().unwrap()])
            .assert()
            .success();
        cache_cmd("verify", &cache).assert().success();
        assert_eq!(pack_files(&cache).len(), 1);
        forget_run(&again);
        extract_ok(&tiles, &again, &args(&c, &[]));
        assert_eq!(
            prov_u64(&again, &["cache", "hits"]),
            4,
            "{damage}: nothing lost by gc"
        );
    }
}

/// Four processes extracting overlapping tile sets into one cache at once.
#[test]
fn concurrent_writers_share_one_cache() {
    let d = tempfile::tempdir().unwrap();
    let all = d.path().join("all");
    let tiles = make_tiles(&all, 16, 80);
    let cache = d.path().join("cache");
    // Sets overlap: process k takes tiles [4k, 4k + 8).
    let mut sets = Vec::new();
    for k in 0..4 {
        let dir = d.path().join(format!("set{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        for t in tiles.iter().skip(4 * k).take(8) {
            std::fs::copy(t, dir.join(t.file_name().unwrap())).unwrap();
        }
        sets.push(dir);
    }
    let children: Vec<_> = sets
        .iter()
        .enumerate()
        .map(|(k, dir)| {
            std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"))
                .args(["extract", dir.to_str().unwrap()])
                .args(["-o", d.path().join(format!("c{k}.csv")).to_str().unwrap()])
                .args([
                    "--weights",
                    "random:0",
                    "--quiet",
                    "--threads",
                    "1",
                    "--batch-size",
                    "2",
                ])
                .args(["--cache-dir", cache.to_str().unwrap()])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    for (k, dir) in sets.iter().enumerate() {
        let reference = d.path().join(format!("r{k}.csv"));
        extract_ok(dir, &reference, &["--batch-size", "2"]);
        assert_same(
            &d.path().join(format!("c{k}.csv")),
            &reference,
            &format!("set {k}"),
        );
    }
    cache_cmd("verify", &cache).assert().success();
    // No entry lost: the union is all hits.
    let out = d.path().join("union.csv");
    extract_ok(&all, &out, &["--cache-dir", cache.to_str().unwrap()]);
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 16);
    assert_eq!(pack_files(&cache).len(), 4, "one pack per writer process");
}

#[test]
fn gc_keeps_only_named_fingerprints() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let c = with_cache(&cache);
    let tiles = d.path().join("t");
    make_tiles(&tiles, 2, 64);
    let out = d.path().join("o.csv");
    extract_ok(&tiles, &out, &args(&c, &["--pool", "avg"]));
    extract_ok(&tiles, &out, &args(&c, &[]));
    let keep = provenance(&out)["fingerprint"]["id"].as_str().unwrap()[..12].to_string();
    tilefeat()
        .args([
            "cache",
            "gc",
            "--cache-dir",
            cache.to_str().unwrap(),
            "--keep",
            &keep,
        ])
        .assert()
        .success()
        .stdout(predicate::str::contains("kept 2 records, dropped 2"));
    forget_run(&out);
    extract_ok(&tiles, &out, &args(&c, &[]));
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 2);
    extract_ok(&tiles, &out, &args(&c, &["--pool", "avg"]));
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 0);
    let gc_unused_since = |date: &str, says: &str| {
        cache_cmd("gc", &cache)
            .args(["--unused-since", date])
            .assert()
            .success()
            .stdout(predicate::str::contains(says));
    };
    // Every record was used after 2000: a date in the past keeps them all (a gc that dropped
    // everything would pass the far-future case below alone), and they still serve.
    gc_unused_since("2000-01-01", "kept 4 records, dropped 0");
    forget_run(&out);
    extract_ok(&tiles, &out, &args(&c, &["--pool", "avg"]));
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 2);
    gc_unused_since("2999-01-01", "kept 0 records");
    tilefeat()
        .args(["cache", "stats", "--cache-dir", d.path().to_str().unwrap()])
        .assert()
        .code(7)
        .stderr(predicate::str::contains("not a tilefeat cache directory"));
}

/// Regression: a miss followed by more cached tiles than the model stage holds back used to
/// deadlock (rows all finished, none flushed, nothing outstanding to wait for).
#[test]
fn one_miss_before_many_hits_does_not_hang() {
    let d = tempfile::tempdir().unwrap();
    let all = d.path().join("all");
    let tiles = make_tiles(&all, 150, 48);
    let cache = d.path().join("cache");
    let warm = d.path().join("warm");
    std::fs::create_dir(&warm).unwrap();
    for t in &tiles[1..] {
        std::fs::copy(t, warm.join(t.file_name().unwrap())).unwrap();
    }
    let out = d.path().join("o.csv");
    extract_ok(&warm, &out, &["--cache-dir", cache.to_str().unwrap()]);
    extract_cmd(&all, &out)
        .args(["--quiet", "--cache-dir", cache.to_str().unwrap()])
        .timeout(Duration::from_secs(120))
        .assert()
        .success();
    assert_eq!(prov_u64(&out, &["cache", "hits"]), 149);
    assert_eq!(prov_u64(&out, &["tiles", "computed"]), 1);
    // And the rows are the right ones, in the right order.
    let reference = d.path().join("reference.csv");
    extract_ok(&all, &reference, &["--no-cache"]);
    assert_same(
        &out,
        &reference,
        "149 hits and a miss equal a run without the cache",
    );
}

/// `tilefeat cache SUB --cache-dir CACHE` with its data segment limited to 1 GiB (a regression
/// that reads a whole pack, or `/dev/zero`, stops there instead of taking the machine's memory)
/// and killed if still running after 300 s (a hang guard: opening a FIFO for reading blocks).
/// Returns its exit code (`None`: killed by a signal), its stdout and its peak RSS in KiB.
fn cache_measured(sub: &str, cache: &Path) -> (Option<i32>, String, i64) {
    use std::os::unix::process::CommandExt;
    let stdout = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"));
    cmd.args(["cache", sub, "--cache-dir", cache.to_str().unwrap()])
        .env_remove("TILEFEAT_CACHE_DIR")
        .stdout(stdout.reopen().unwrap())
        .stderr(std::process::Stdio::null());
    // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    #[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives its rusage
    let child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut status = 0;
    // SAFETY: wait4 on our own child, with a zeroed rusage to fill; kill of that child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "wait4");
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let text = String::from_utf8_lossy(&std::fs::read(stdout.path()).unwrap()).into_owned();
    (code, text, usage.ru_maxrss)
}

/// The first lines of a command's output, for a failure message.
fn head(text: &str) -> String {
    text.lines().take(12).collect::<Vec<_>>().join("\n")
}

/// A cache holding `samples`' tiles (one pack each), and the CSV of the last one.
fn cache_of(d: &Path, samples: &[&str]) -> (PathBuf, PathBuf) {
    let cache = d.join("cache");
    let out = d.join("first.csv");
    for s in samples {
        extract_ok(&demo_sample(s), &out, &args(&with_cache(&cache), &[]));
    }
    (cache, out)
}

/// One index entry as the cache writes it: `fp | tile | offset | len | crc32`.
fn idx_entry(fp: &[u8], tile: &[u8], offset: u64, len: u32) -> Vec<u8> {
    let mut b = [fp, tile, &offset.to_le_bytes(), &len.to_le_bytes()].concat();
    let c = crc32fast::hash(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}

/// Regression (issue 8): a pack with a 64 MiB zero tail gave one DAMAGED line per 76 bytes
/// (880k lines), all held in memory with the whole pack; now the damage is one byte range,
/// and neither verify nor gc holds the tail.
#[test]
fn a_damaged_tail_is_one_range_and_is_never_held_in_memory() {
    let d = tempfile::tempdir().unwrap();
    let (cache, first) = cache_of(d.path(), &["sampleC"]);
    let stored = prov_u64(&first, &["cache", "stored"]);
    let clean = d.path().join("clean");
    copy_dir(&cache, &clean);
    copy_dir(&cache.join("packs"), &clean.join("packs"));
    copy_dir(&cache.join("fingerprints"), &clean.join("fingerprints"));
    let (code, out, verify_clean) = cache_measured("verify", &clean);
    assert_eq!(code, Some(0), "{}", head(&out));
    let pack = &pack_files(&cache)[0];
    let good_len = std::fs::metadata(pack).unwrap().len();
    const TAIL: u64 = 64 << 20;
    let mut f = std::fs::OpenOptions::new().append(true).open(pack).unwrap();
    for _ in 0..TAIL >> 20 {
        std::io::Write::write_all(&mut f, &[0u8; 1 << 20]).unwrap();
    }
    drop(f);
    let (code, out, verify_damaged) = cache_measured("verify", &cache);
    assert_eq!(code, Some(7), "{}", head(&out));
    let damaged: Vec<&str> = out.lines().filter(|l| l.contains("DAMAGED")).collect();
    assert_eq!(
        damaged.len(),
        1,
        "one range, not one line per record:\n{}",
        head(&out)
    );
    let range = format!(
        "bytes {good_len}..{} damaged ({TAIL} bytes",
        good_len + TAIL
    );
    assert!(damaged[0].contains(&range), "{}", damaged[0]);
    assert!(
        out.contains(&format!("{stored} good records")),
        "{}",
        head(&out)
    );
    // Holding the tail costs 64 MiB: allow half of that for everything else.
    let bound = (TAIL / 2 / 1024) as i64;
    assert!(
        verify_damaged - verify_clean < bound,
        "verify: peak RSS {verify_damaged} KiB with the tail vs {verify_clean} KiB without"
    );
    // gc keeps every good record, drops the tail, in the same bound.
    let (code, _, gc_clean) = cache_measured("gc", &clean);
    assert_eq!(code, Some(0));
    let (code, out, gc_damaged) = cache_measured("gc", &cache);
    assert_eq!(code, Some(0), "{}", head(&out));
    assert!(
        out.contains(&format!("kept {stored} records")) && out.contains("1 damaged"),
        "{out}"
    );
    assert!(
        gc_damaged - gc_clean < bound,
        "gc: peak RSS {gc_damaged} KiB with the tail vs {gc_clean} KiB without"
    );
    cache_cmd("verify", &cache).assert().success();
    let again = d.path().join("again.csv");
    extract_ok(
        &demo_sample("sampleC"),
        &again,
        &args(&with_cache(&cache), &[]),
    );
    assert_eq!(prov_u64(&again, &["cache", "hits"]), stored);
}

/// Regression (issue 8): a pack symlinked to /dev/zero was read until the OOM killer came
/// (22.8 GB), and a FIFO named like a pack blocked verify, gc and extract for ever. Neither
/// is opened for reading now: verify reports them, gc leaves them alone, extract skips them.
#[test]
fn packs_that_are_not_regular_files_are_reported_and_never_read() {
    let d = tempfile::tempdir().unwrap();
    let (cache, first) = cache_of(d.path(), &["sampleC"]);
    let stored = prov_u64(&first, &["cache", "stored"]);
    let packs = cache.join("packs");
    let real_idx = pack_files(&cache)[0].with_extension("idx");
    let zero = packs.join("elsewhere-1-zero.pack");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let fifo = packs.join("elsewhere-2-fifo.pack");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    for p in [&zero, &fifo] {
        // Sealed, with the real pack's entries: gc and extract would both want to read them.
        std::fs::copy(&real_idx, p.with_extension("idx")).unwrap();
        std::fs::write(p.with_extension("sealed"), b"").unwrap();
    }
    let (code, out, _) = cache_measured("verify", &cache);
    assert_eq!(code, Some(7), "{}", head(&out));
    for (p, what) in [(&zero, "a symbolic link"), (&fifo, "a FIFO")] {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(
            out.lines()
                .any(|l| l.starts_with("DAMAGED") && l.contains(name) && l.contains(what)),
            "{name} reported as {what}:\n{}",
            head(&out)
        );
    }
    let (code, out, _) = cache_measured("gc", &cache);
    assert_eq!(code, Some(0), "{}", head(&out));
    assert_eq!(out.matches("left alone: ").count(), 2, "{out}");
    assert!(out.contains(&format!("kept {stored} records")), "{out}");
    assert!(std::fs::symlink_metadata(&zero).is_ok() && std::fs::symlink_metadata(&fifo).is_ok());
    let again = d.path().join("again.csv");
    extract_cmd(&demo_sample("sampleC"), &again)
        .args(["--quiet", "--cache-dir", cache.to_str().unwrap()])
        .timeout(Duration::from_secs(300))
        .assert()
        .success();
    assert_eq!(prov_u64(&again, &["cache", "hits"]), stored);
    assert_eq!(prov_u64(&again, &["cache", "damaged_records"]), 0);
}

/// Regression (issue 17): an index entry pointing at another key's record passed verify
/// ("0 problems") while extract refused it.
#[test]
fn verify_cross_checks_index_entries_against_their_records() {
    let d = tempfile::tempdir().unwrap();
    let (cache, _) = cache_of(d.path(), &["sampleC"]);
    let idx = pack_files(&cache)[0].with_extension("idx");
    let bytes = std::fs::read(&idx).unwrap();
    let mut e: Vec<Vec<u8>> = bytes[16..].chunks(80).map(<[u8]>::to_vec).collect();
    assert!(e.len() >= 2);
    // Swap the offsets of the first two entries (same length: same dimension).
    let off = |x: &[u8]| u64::from_le_bytes(x[64..72].try_into().unwrap());
    let len = |x: &[u8]| u32::from_le_bytes(x[72..76].try_into().unwrap());
    let (o0, o1) = (off(&e[0]), off(&e[1]));
    e[0] = idx_entry(&e[0][..32], &e[0][32..64], o1, len(&e[0]));
    e[1] = idx_entry(&e[1][..32], &e[1][32..64], o0, len(&e[1]));
    std::fs::write(&idx, [bytes[..16].to_vec(), e.concat()].concat()).unwrap();
    cache_cmd("verify", &cache).assert().code(7).stdout(
        predicate::str::contains("2 index entries point at a record that fails its check").and(
            predicate::str::contains("record key does not match its index entry"),
        ),
    );
}

/// Regression (issue 17): index entries with an absurd length, or pointing past the end of
/// the pack, were not reported as such.
#[test]
fn verify_reports_index_entries_with_absurd_lengths_or_offsets() {
    let d = tempfile::tempdir().unwrap();
    let (cache, _) = cache_of(d.path(), &["sampleC"]);
    let pack = &pack_files(&cache)[0];
    let idx = pack.with_extension("idx");
    let bytes = std::fs::read(&idx).unwrap();
    let first = &bytes[16..96];
    let pack_len = std::fs::metadata(pack).unwrap().len();
    let len = u32::from_le_bytes(first[72..76].try_into().unwrap());
    let absurd = idx_entry(&first[..32], &[1; 32], 16, u32::MAX - 3);
    let beyond = idx_entry(&first[..32], &[2; 32], pack_len + 4096, len);
    std::fs::write(&idx, [bytes.clone(), absurd, beyond].concat()).unwrap();
    cache_cmd("verify", &cache).assert().code(7).stdout(
        predicate::str::contains("1 index entries have an absurd offset or length").and(
            predicate::str::contains("1 index entries point beyond the end of the pack"),
        ),
    );
}

/// Regression (issue 17): a pack without its index was never reported (its records are never
/// served), and an index without its pack stopped verify with a read error.
#[test]
fn verify_reports_a_pack_without_index_and_an_index_without_pack() {
    let d = tempfile::tempdir().unwrap();
    let (cache, _) = cache_of(d.path(), &["sampleA", "sampleB"]);
    let packs = pack_files(&cache);
    assert_eq!(packs.len(), 2);
    std::fs::remove_file(packs[0].with_extension("idx")).unwrap();
    std::fs::remove_file(&packs[1]).unwrap();
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    let out = cache_cmd("verify", &cache)
        .assert()
        .code(7)
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.lines()
            .any(|l| l.contains(&name(&packs[0])) && l.contains("a pack without its index")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains(&name(&packs[1].with_extension("idx")))
                && l.contains("an index without its pack")),
        "{out}"
    );
}

/// Regression (issue 28): a cache on a disk that fills up stopped the run (exit 7). Storing
/// now stops with one warning and the run goes on: the features are the no-cache run's byte
/// for byte, the provenance says why nothing more was stored, and what was stored before the
/// disk filled is still served. The disk is a real tmpfs in a private mount namespace (needs
/// root, as CI has), too small for the run's vectors (20 tiles of 2,048 floats: 160 KiB).
#[test]
fn a_full_cache_disk_warns_and_the_run_goes_on() {
    use std::process::Command as Std;
    require_private_mounts();
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    make_tiles(&tiles, 20, 64);
    let reference = d.path().join("ref.csv");
    extract_ok(&tiles, &reference, &["--no-cache", "--size", "32"]);
    let disk = d.path().join("disk");
    let out = d.path().join("out");
    std::fs::create_dir_all(&disk).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("tilefeat");
    // Two runs on the same small disk: the first fills it, the second finds it full. Batches
    // of 4 tiles (33 KB) spaced by 100 ms, so that the first group's vectors fit whatever
    // the load (regression: on a busy machine several batches made one group, larger than
    // the disk, and nothing was stored).
    let run = |name: &str| {
        format!(
            "TILEFEAT_TEST_BATCH_DELAY_MS=100 {bin} extract {tiles} -o {out}/{name}.csv \
             --weights random:0 --size 32 --batch-size 4 \
             --cache-dir {disk}/cache 2> {out}/{name}.err; echo $? > {out}/{name}.rc",
            bin = bin.display(),
            tiles = tiles.display(),
            out = out.display(),
            disk = disk.display(),
        )
    };
    // Then what stats and verify say of the cache the full disk left.
    let inspect = format!(
        "{bin} cache stats --cache-dir {disk}/cache > {out}/stats.txt; \
         {bin} cache verify --cache-dir {disk}/cache > {out}/verify.txt",
        bin = bin.display(),
        out = out.display(),
        disk = disk.display(),
    );
    let script = format!(
        "mount -t tmpfs -o size=96k tmpfs {disk} && {} && {} && {inspect}",
        run("a"),
        run("b"),
        disk = disk.display()
    );
    let o = Std::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["a", "b"] {
        let err = std::fs::read_to_string(out.join(format!("{name}.err"))).unwrap();
        let rc = std::fs::read_to_string(out.join(format!("{name}.rc"))).unwrap();
        assert_eq!(rc.trim(), "0", "run {name}: {err}");
        assert_same(&out.join(format!("{name}.csv")), &reference, name);
        assert!(
            err.contains("cannot store vectors") && err.contains("No space left on device"),
            "run {name}: {err}"
        );
        assert_eq!(
            err.matches("cannot store vectors").count(),
            1,
            "one warning: {err}"
        );
        let prov = provenance(&out.join(format!("{name}.csv")));
        let why = prov["cache"]["store_failed"].as_str().unwrap_or("");
        assert!(
            why.contains("No space left on device"),
            "run {name}: {prov:?}"
        );
    }
    // What the first run stored before the disk filled is served to the second (at least
    // what it counted as stored: vectors whose index entries were not all written are not).
    let stored = prov_u64(&out.join("a.csv"), &["cache", "stored"]);
    let hits = prov_u64(&out.join("b.csv"), &["cache", "hits"]);
    assert!(
        stored > 0 && hits >= stored && hits < 20,
        "stored {stored}, hits {hits}"
    );
    // Regression (issue 28): verify counted good records where stats said 0 entries, with
    // nothing to tell why. Now verify says how many are indexed (stats' entries) and why the
    // rest are not served.
    let stats = std::fs::read_to_string(out.join("stats.txt")).unwrap();
    let verify = std::fs::read_to_string(out.join("verify.txt")).unwrap();
    let entries: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("entries: "))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{stats}"));
    assert!(entries >= hits, "{stats}");
    assert!(
        verify.contains(&format!("({entries} index entries)")),
        "{stats}\n{verify}"
    );
    let good: u64 = verify
        .lines()
        .find_map(|l| l.strip_prefix("verified "))
        .and_then(|l| l.split(", ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{verify}"));
    assert_eq!(
        good > entries,
        verify.contains("have no index entry"),
        "{verify}"
    );
}
