//! Helpers shared by the black-box tests of the `tilefeat` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn demo_sample(name: &str) -> PathBuf {
    repo().join("demo").join("tiles").join(name)
}

/// The binary, without the caller's cache and weights settings, and without the default
/// cache: runs compared with each other (batch sizes, threads) must compute, not find each
/// other's vectors in the cache beside their outputs. Tests of a cache give `--cache-dir`;
/// `tests/resume.rs` tests the default one (it removes `TILEFEAT_DEFAULT_CACHE`).
pub fn tilefeat() -> Command {
    let mut c = Command::cargo_bin("tilefeat").unwrap();
    c.env_remove("TILEFEAT_CACHE_DIR")
        .env_remove("TILEFEAT_WEIGHTS")
        .env("TILEFEAT_DEFAULT_CACHE", "0");
    c
}

/// `tilefeat extract TILES -o OUT`, with no weights (the tests of weight lookup add theirs).
pub fn extract_base(tiles: &Path, out: &Path) -> Command {
    let mut c = tilefeat();
    c.args([
        "extract",
        tiles.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    c
}

/// `tilefeat extract TILES -o OUT --weights random:0 --device cpu`, to which a test adds its
/// flags: on the CPU on a GPU host too (`--device` is the default `auto` there otherwise, and
/// these tests' promises are the CPU's). A test of `--device` starts from `extract_base`.
pub fn extract_cmd(tiles: &Path, out: &Path) -> Command {
    let mut c = extract_base(tiles, out);
    c.args(["--weights", "random:0", "--device", "cpu"]);
    c
}

/// `tilefeat cache SUBCOMMAND --cache-dir CACHE`.
pub fn cache_cmd(subcommand: &str, cache: &Path) -> Command {
    let mut c = tilefeat();
    c.args(["cache", subcommand, "--cache-dir", cache.to_str().unwrap()]);
    c
}

/// `n` distinct real tiles (crops of the demo tiles at different offsets), `size` px, PNG.
pub fn make_tiles(dir: &Path, n: usize, size: u32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let src = image::open(demo_sample("sampleA").join("tile_000_000.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = src.dimensions();
    (0..n)
        .map(|i| {
            let x = (i as u32 * 37) % (w - size);
            let y = (i as u32 * 53) % (h - size);
            let crop = image::imageops::crop_imm(&src, x, y, size, size).to_image();
            let p = dir.join(format!("tile_{i:03}.png"));
            crop.save(&p).unwrap();
            p
        })
        .collect()
}

/// Copy a folder's files (flat).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Run `extract` with random weights (unless `extra` has its own), on the CPU (unless `extra`
/// names a device) and extra args; panics unless it succeeds.
pub fn extract_ok(tiles: &Path, out: &Path, extra: &[&str]) -> String {
    let o = extract_base(tiles, out)
        .args(if extra.contains(&"--weights") {
            vec![]
        } else {
            vec!["--weights", "random:0"]
        })
        .args(if extra.contains(&"--device") {
            vec![]
        } else {
            vec!["--device", "cpu"]
        })
        .arg("--quiet")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "extract failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Take a finished run's provenance away, so that a rerun into the same file is not "up to
/// date" (which leaves the old provenance) and records its own counts.
pub fn forget_run(out_csv: &Path) {
    let p = out_csv.with_extension("provenance.yaml");
    std::fs::remove_file(&p).unwrap_or_else(|e| panic!("cannot remove {}: {e}", p.display()));
}

pub fn provenance(out_csv: &Path) -> serde_yaml::Value {
    let p = out_csv.with_extension("provenance.yaml");
    serde_yaml::from_str(&read(&p)).unwrap()
}

pub fn prov_u64(out_csv: &Path, path: &[&str]) -> u64 {
    let mut v = provenance(out_csv);
    for k in path {
        v = v[*k].clone();
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number: {v:?}"))
}

/// The files of `dir` with extension `ext`, sorted.
pub fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// Files in a directory whose names contain `part`.
pub fn files_containing(dir: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(part))
        .collect()
}

/// Assert two files are byte-identical, reporting only the first differing line.
#[track_caller]
pub fn assert_same(a: &Path, b: &Path, what: &str) {
    let (x, y) = (read(a), read(b));
    if x != y {
        let line = x
            .lines()
            .zip(y.lines())
            .position(|(p, q)| p != q)
            .map(|i| i + 1)
            .unwrap_or_else(|| x.lines().count().min(y.lines().count()) + 1);
        panic!(
            "{what}: {} and {} differ (first at line {line}; {} vs {} lines)",
            a.display(),
            b.display(),
            x.lines().count(),
            y.lines().count()
        );
    }
}

/// Peak RSS (KiB) of `tilefeat ARGS`, which must succeed: the child is reaped with `wait4`,
/// which reports its resource use (the memory tests bound this, never a time).
pub fn peak_rss_kib(args: &[&std::ffi::OsStr]) -> i64 {
    #[allow(clippy::zombie_processes)] // reaped by wait4 below, which also gives its rusage
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"))
        .args(args)
        .env_remove("TILEFEAT_CACHE_DIR")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: plain wait4 on our own child, with a zeroed rusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    assert_eq!(status, 0, "tilefeat {args:?} failed");
    usage.ru_maxrss // KiB on Linux
}

/// A complete ResNet50 state dict with seeded random values, as `.safetensors` (whatever the
/// file's name: tilefeat reads the format from the bytes).
pub fn write_weights(path: &Path, seed: u64) {
    let sd = tilefeat::encoder::weights::random_state_dict(seed, tilefeat::cli::Layer::Layer4);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = sd
        .iter()
        .map(|(k, t)| {
            let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
            let v = Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap();
            (
                k.clone(),
                shape,
                v.iter().flat_map(|f| f.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(k, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (k.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

/// Tests that fill a real disk mount a small tmpfs in a private mount namespace: they need
/// `unshare -m` (util-linux) and root, as CI has, and fail loudly without (never pass
/// untested).
pub fn require_private_mounts() {
    if !std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        panic!("this test needs `unshare -m` (util-linux) and root, to fill a real tmpfs");
    }
}
