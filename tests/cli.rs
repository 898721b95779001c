//! Black-box tests of `tilefeat extract`, `info`, `preprocess`, `weights` and `bench`: errors
//! and exit codes, the CSV and provenance layout (golden), bad input, determinism.

mod common;

use common::*;
use predicates::prelude::*;
use std::path::{Path, PathBuf};

#[test]
fn version_and_info() {
    tilefeat()
        .arg("--version")
        .assert()
        .success()
        .stdout(format!("tilefeat {}\n", env!("CARGO_PKG_VERSION")));
    let info = tilefeat()
        .arg("info")
        .assert()
        .success()
        .stdout(predicate::str::contains("libtorch 2.11.0"))
        .stdout(predicate::str::contains("cuda available:"))
        .stdout(predicate::str::contains(
            "stream per model worker (TILEFEAT_CUDA_STREAMS): ",
        ))
        .stdout(predicate::str::contains(
            "jpeg decoding: libjpeg-turbo, SIMD ",
        ))
        .get_output()
        .stdout
        .clone();
    let info = String::from_utf8(info).unwrap();
    // A libtorch built with CUDA (setup.sh's pip build: CUDA 13) carries the CUDA runtime,
    // GPU or not; a CPU-only one says why there is none.
    let lib_dir = info
        .lines()
        .find_map(|l| l.strip_prefix("libtorch lib dir (build time) "))
        .expect("info names the libtorch lib dir");
    let runtime = info
        .lines()
        .find_map(|l| l.strip_prefix("cuda runtime: "))
        .expect("info has a cuda runtime line");
    if Path::new(lib_dir).join("libtorch_cuda.so").exists() {
        let major: u32 = runtime.split('.').next().unwrap().parse().unwrap();
        assert!(major >= 12, "{runtime}");
    } else {
        assert!(runtime.starts_with("none ("), "{runtime}");
    }
}

#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_tuning_is_on_unless_the_user_says_otherwise() {
    let line = |envs: &[(&str, &str)]| {
        let mut c = tilefeat();
        c.env_remove("GLIBC_TUNABLES")
            .env_remove("TILEFEAT_NO_HEAP_TUNING");
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MALLOC_")) {
            c.env_remove(k);
        }
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.arg("info").output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .find(|l| l.starts_with("heap tuning for libtorch: "))
            .unwrap_or_else(|| panic!("no heap tuning line in:\n{text}"))
            .to_string()
    };
    assert!(line(&[]).contains(": on ("), "{}", line(&[]));
    assert!(line(&[("GLIBC_TUNABLES", "glibc.pthread.rseq=0")]).contains(": on ("));
    assert!(line(&[("TILEFEAT_NO_HEAP_TUNING", "1")]).contains("off (TILEFEAT_NO_HEAP_TUNING"));
    // `=0` means off, as for the other TILEFEAT_ switches (it once turned the tuning off).
    assert!(line(&[("TILEFEAT_NO_HEAP_TUNING", "0")]).contains(": on ("));
    assert!(line(&[("TILEFEAT_NO_HEAP_TUNING", "false")]).contains(": on ("));
    assert!(line(&[("MALLOC_ARENA_MAX", "2")]).contains("off (MALLOC_*"));
}

/// The tuning variables are documented where users look: `extract --help`.
#[test]
fn extract_help_lists_exit_codes_and_tuning_variables() {
    tilefeat()
        .args(["extract", "--help"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("TILEFEAT_NO_HEAP_TUNING")
                .and(predicate::str::contains("TILEFEAT_CUDNN_BENCHMARK"))
                .and(predicate::str::contains("TILEFEAT_CUDA_SLEEP"))
                .and(predicate::str::contains("TILEFEAT_CUDA_STREAMS")),
        );
    tilefeat()
        .args(["--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Exit codes: 0 success"));
}

#[test]
fn usage_errors_exit_2() {
    tilefeat().args(["extract"]).assert().code(2);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.csv");
    for bad in [
        ["--batch-size", "0"],
        ["--size", "8"],
        ["--device", "tpu"],
        ["--pool", "min"],
    ] {
        extract_base(&demo_sample("sampleA"), &out)
            .args(["--weights", "random:0"])
            .args(bad)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(bad[0]).or(predicate::str::contains(bad[1])));
    }
}

#[test]
fn missing_empty_and_non_folder_inputs_exit_3() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.csv");
    let missing = d.path().join("no-such-slide");
    extract_cmd(&missing, &out).assert().code(3).stderr(
        predicate::str::contains("no-such-slide").and(predicate::str::contains("does not exist")),
    );
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not a tile").unwrap();
    extract_cmd(&empty, &out)
        .assert()
        .code(3)
        .stderr(predicate::str::contains("holds no tiles").and(predicate::str::contains("empty")));
    let file = d.path().join("file.png");
    std::fs::write(&file, "x").unwrap();
    // Any other file is taken for a slide, which OpenSlide cannot open (or is absent).
    extract_cmd(&file, &out)
        .assert()
        .code(3)
        .stderr(predicate::str::contains("file.png is n"));
    assert!(!out.exists());
}

#[test]
fn unwritable_output_exit_6() {
    let d = tempfile::tempdir().unwrap();
    // A missing folder is made (`the_outputs_folder_is_made`); a file where it should be
    // cannot be.
    std::fs::write(d.path().join("a-file"), "x").unwrap();
    let out = d.path().join("a-file").join("x.csv");
    extract_cmd(&demo_sample("sampleC"), &out)
        .assert()
        .code(6)
        .stderr(predicate::str::contains("a-file"));
    extract_cmd(&demo_sample("sampleC"), d.path())
        .assert()
        .code(6)
        .stderr(predicate::str::contains("is a directory"));
}

#[test]
fn bad_weights_exit_4() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.csv");
    let tiles = demo_sample("sampleC");
    let garbage = d.path().join("garbage.pth");
    std::fs::write(&garbage, b"this is not a checkpoint at all").unwrap();
    let truncated = d.path().join("truncated.pth");
    std::fs::write(&truncated, b"PK\x03\x04\x14\x00\x00\x00").unwrap();
    for (w, msg) in [
        (garbage.to_str().unwrap(), "garbage.pth"),
        (truncated.to_str().unwrap(), "truncated.pth"),
        ("/no/such/weights.pth", "does not exist"),
        ("random:abc", "SEED"),
    ] {
        extract_base(&tiles, &out)
            .args(["--weights", w])
            .assert()
            .code(4)
            .stderr(predicate::str::contains(msg));
    }
    // No weights and an empty torchvision cache: instructions, not a crash.
    extract_base(&tiles, &out)
        .env("TORCH_HOME", d.path())
        .assert()
        .code(4)
        .stderr(
            predicate::str::contains("resnet50-0676ba61.pth")
                .and(predicate::str::contains("tilefeat weights fetch")),
        );
    assert!(!out.exists());
}

#[test]
fn cuda_without_cuda_fails_loudly() {
    let info = tilefeat().arg("info").output().unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.csv");
    if String::from_utf8_lossy(&info.stdout).contains("cuda available: true") {
        // On a CUDA host the refusal cannot happen: the request must then run on the GPU
        // (scripts/gpu-check.sh asserts the rest there).
        extract_base(&demo_sample("sampleC"), &out)
            .args(["--weights", "random:0", "--device", "cuda", "--quiet"])
            .assert()
            .success();
        assert!(provenance(&out)["device"]
            .as_str()
            .unwrap()
            .starts_with("cuda"));
        return;
    }
    for dev in ["cuda", "cuda:1"] {
        extract_base(&demo_sample("sampleC"), &out)
            .args(["--weights", "random:0", "--device", dev])
            .assert()
            .code(5)
            .stderr(predicate::str::contains("CUDA is not available"));
    }
    assert!(!out.exists());
}

/// Golden test of the output layout: header, row names and order, field count, provenance keys.
#[test]
fn csv_and_provenance_layout_golden() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("slide-7");
    copy_dir(&demo_sample("sampleC"), &tiles.join("nested"));
    std::fs::copy(
        demo_sample("sampleA").join("tile_000_000.png"),
        tiles.join("a, \"odd\" name.PNG"),
    )
    .unwrap();
    std::fs::write(tiles.join(".hidden.png"), b"ignored").unwrap();
    let out = d.path().join("features.csv");
    extract_ok(&tiles, &out, &["--batch-size", "2"]);
    let csv = read(&out);
    let lines: Vec<&str> = csv.lines().collect();
    let golden_header = read(&repo().join("tests/golden/header_layer4.txt"));
    assert_eq!(format!("{}\n", lines[0]), golden_header);
    let names: Vec<String> = lines[1..]
        .iter()
        .map(|l| {
            if let Some(rest) = l.strip_prefix('"') {
                rest[..rest.find("\",").unwrap()].replace("\"\"", "\"")
            } else {
                l.split(',').next().unwrap().to_string()
            }
        })
        .collect();
    let golden_names: Vec<String> = read(&repo().join("tests/golden/tiles_slide7.txt"))
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(names, golden_names);
    for l in &lines[1..] {
        let fields = l.rsplitn(2049, ',').count();
        assert_eq!(fields, 2049, "2048 features and a name");
        for v in l.rsplitn(2049, ',').take(2048) {
            let f: f32 = v.parse().unwrap();
            assert!(f.is_finite());
        }
    }
    // Provenance: the golden list of keys, the sample defaulting to the folder name.
    let prov = provenance(&out);
    let mut keys: Vec<String> = prov
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    keys.sort();
    let golden_keys: Vec<String> = read(&repo().join("tests/golden/provenance_keys.txt"))
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(keys, golden_keys);
    assert_eq!(prov["sample"].as_str(), Some("slide-7"));
    assert_eq!(prov["tiles"]["written"].as_u64(), Some(5));
    assert_eq!(prov["weights"]["trained"].as_bool(), Some(false));
    let prov_text = read(&out.with_extension("provenance.yaml"));
    assert!(
        prov_text.starts_with("# WARNING: RANDOM WEIGHTS"),
        "random weights are flagged loudly"
    );
    assert_eq!(read(&out.with_extension("rejected.tsv")), "tile\treason\n");
}

#[test]
fn bad_tile_fail_names_it_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    copy_dir(&demo_sample("sampleC"), &tiles);
    std::fs::write(
        tiles.join("tile_999_broken.png"),
        b"\x89PNG\r\n\x1a\n garbage",
    )
    .unwrap();
    let out = d.path().join("x.csv");
    extract_cmd(&tiles, &out).assert().code(3).stderr(
        predicate::str::contains("tile_999_broken.png")
            .and(predicate::str::contains("--on-error skip")),
    );
    assert!(!out.exists());
    assert!(
        files_containing(d.path(), "tmp").is_empty(),
        "no temporary file left behind"
    );
}

#[test]
fn bad_tiles_skip_are_recorded() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    copy_dir(&demo_sample("sampleC"), &tiles);
    std::fs::write(tiles.join("a_empty.png"), b"").unwrap();
    let good = std::fs::read(demo_sample("sampleA").join("tile_100_100.jpg")).unwrap();
    std::fs::write(tiles.join("b_truncated.jpg"), &good[..good.len() / 2]).unwrap();
    std::fs::write(tiles.join("c_text.tif"), b"hello").unwrap();
    let out = d.path().join("x.csv");
    extract_cmd(&tiles, &out)
        .args(["--on-error", "skip"])
        .assert()
        .success()
        .stderr(predicate::str::contains("skipping"));
    let csv = read(&out);
    assert_eq!(csv.lines().count(), 1 + 4, "header + the 4 good tiles");
    assert!(!csv.contains("a_empty"));
    let rej = read(&out.with_extension("rejected.tsv"));
    let rej_lines: Vec<&str> = rej.lines().collect();
    assert_eq!(rej_lines[0], "tile\treason");
    assert!(rej_lines[1].starts_with("a_empty.png\tempty file"), "{rej}");
    assert!(
        rej_lines[2].starts_with("b_truncated.jpg\tcannot decode JPEG: JPEG data ends before"),
        "{rej}"
    );
    assert!(rej_lines[3].starts_with("c_text.tif\t"), "{rej}");
    let prov = provenance(&out);
    assert_eq!(prov["tiles"]["skipped"].as_u64(), Some(3));
    assert_eq!(
        prov["skipped_tiles"][1]["tile"].as_str(),
        Some("b_truncated.jpg")
    );
}

#[test]
fn dry_run_validates_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.csv");
    extract_base(&demo_sample("sampleB"), &out)
        .args(["--weights", "random:3", "--dry-run", "--sample", "B"])
        .assert()
        .success()
        .stdout(predicate::str::contains("sample B").and(predicate::str::contains("5 tiles")));
    assert!(!out.exists());
}

#[test]
fn symlinked_folders_are_followed_without_loops() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    std::fs::create_dir(&tiles).unwrap();
    std::os::unix::fs::symlink(demo_sample("sampleC"), tiles.join("linked")).unwrap();
    std::os::unix::fs::symlink(&tiles, tiles.join("linked-loop")).unwrap();
    let out = d.path().join("x.csv");
    extract_cmd(&tiles, &out)
        .assert()
        .success()
        // The warning itself (the link's own name, `linked-loop`, contains "loop" too).
        .stderr(predicate::str::contains("skipped symbolic link loop at "));
    assert_eq!(read(&out).lines().count(), 1 + 4);
    assert!(read(&out).contains("\nlinked/tile_000_100.jpg,"));
}

#[test]
fn preprocess_writes_the_network_input() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("p.png");
    tilefeat()
        .args([
            "preprocess",
            demo_sample("sampleA")
                .join("tile_000_000.png")
                .to_str()
                .unwrap(),
        ])
        .args(["-o", out.to_str().unwrap(), "--size", "128"])
        .assert()
        .success();
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (128, 128));
}

#[test]
fn weights_verify_rejects_garbage() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("w.safetensors");
    std::fs::write(&f, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}        ").unwrap();
    tilefeat()
        .args(["weights", "verify", f.to_str().unwrap()])
        .assert()
        .code(4)
        .stderr(predicate::str::contains("w.safetensors"));
}

#[test]
fn profile_reports_wall_times_and_stage_times() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("f.csv");
    let o = extract_cmd(&demo_sample("sampleA"), &out)
        .args(["--profile", "--quiet", "--no-cache"])
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&o.get_output().stderr).into_owned();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("tilefeat: profile:"))
        .unwrap_or_else(|| panic!("no profile line in:\n{stderr}"));
    for part in [
        "startup",
        "device and model",
        "pipeline",
        "tiles/s",
        "decode",
        "resize",
        "model warm-up",
        "model compute",
        "format",
        "write",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    // GPU set-up is reported for GPU runs only.
    assert!(!stderr.contains("waiting for the GPU"), "{stderr}");
    let prov = provenance(&out);
    let t = &prov["timings_s"];
    let (startup, pipeline) = (
        t["startup"].as_f64().unwrap(),
        t["pipeline"].as_f64().unwrap(),
    );
    let elapsed = prov["elapsed_s"].as_f64().unwrap();
    assert!(startup > 0.0 && pipeline > 0.0, "{t:?}");
    // Both are parts of the run's wall time (rounded to ms each).
    assert!(startup + pipeline <= elapsed + 0.002, "{t:?} vs {elapsed}");
    // The shared set-up's parts are parts of the start-up.
    let setup: Vec<f64> = ["setup_weights", "setup_model", "setup_cache"]
        .iter()
        .map(|k| t[*k].as_f64().unwrap_or_else(|| panic!("no {k} in {t:?}")))
        .collect();
    assert!(setup[0] > 0.0 && setup[1] > 0.0, "{t:?}");
    assert!(setup.iter().sum::<f64>() <= startup + 0.003, "{t:?}");
    // On the CPU a worker's first batch is ordinary compute, not a GPU warm-up (regression:
    // a run of one batch per worker once reported all its compute as warm-up).
    assert!(t["model_compute"].as_f64().unwrap() > 0.0);
    assert_eq!(t["model_warmup"].as_f64(), Some(0.0), "{t:?}");
    assert!(t["format"].as_f64().unwrap() >= 0.0, "{t:?}");
    assert!(prov.get("cuda_waits").is_none() && prov.get("cudnn_algorithms").is_none());
}

/// Once every model worker has finished its first batch, the computed tiles per second up to
/// the last batch are the run's steady state: reported when enough batches came after the
/// first ones, left out when too few did (one batch: nothing to measure).
#[test]
fn steady_state_is_reported_when_there_are_batches_to_measure() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("f.csv");
    // One worker, six batches of one tile: the first warms up, five follow.
    let o = extract_cmd(&demo_sample("sampleA"), &out)
        .args(["--threads", "1", "--batch-size", "1"])
        .args(["--profile", "--quiet", "--no-cache"])
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&o.get_output().stderr).into_owned();
    let prov = provenance(&out);
    let steady = prov["steady_tiles_per_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("no steady_tiles_per_s in {prov:?}"));
    assert!(steady > 0.0, "{steady}");
    assert!(
        stderr.contains("steady state once the model workers were warm"),
        "{stderr}"
    );
    // Which side waited is in the timings, on the CPU as on a GPU.
    let t = &prov["timings_s"];
    for k in ["workers_waiting_for_batches", "batches_waiting_for_workers"] {
        assert!(t[k].as_f64().is_some_and(|v| v >= 0.0), "{k} in {t:?}");
    }
    // One batch for the whole sample: no steady state to speak of.
    let out1 = d.path().join("one.csv");
    extract_cmd(&demo_sample("sampleA"), &out1)
        .args(["--threads", "1", "--batch-size", "8"])
        .args(["--quiet", "--no-cache"])
        .assert()
        .success();
    assert!(provenance(&out1).get("steady_tiles_per_s").is_none());
}

/// sampleA's six tiles, and one that is not an image.
fn tiles_and_a_broken_one(d: &Path) -> PathBuf {
    let tiles = d.join("tiles");
    copy_dir(&demo_sample("sampleA"), &tiles);
    std::fs::write(tiles.join("broken.png"), b"not a png").unwrap();
    tiles
}

/// `tilefeat bench ARGS --tiles TILES`, which must succeed; its output.
fn bench_ok(args: &[&str], tiles: &Path, tmpdir: &Path) -> String {
    let out = tilefeat()
        .env("TMPDIR", tmpdir)
        .arg("bench")
        .args(args)
        .arg("--tiles")
        .arg(tiles)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap()
}

#[test]
fn bench_decode_reports_each_format_and_unreadable_tiles() {
    let d = tempfile::tempdir().unwrap();
    let tiles = tiles_and_a_broken_one(d.path());
    let args = ["--what", "decode", "--threads", "2", "--size", "64"];
    let out = bench_ok(&args, &tiles, d.path());
    assert!(out.contains("(6 tiles, 1 unreadable;"), "{out}");
    assert!(out.contains("resize to 64 px"), "{out}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| matches!(w.first(), Some(&"png" | &"jpeg" | &"all")))
        .collect();
    let names: Vec<&str> = rows.iter().map(|w| w[0]).collect();
    assert_eq!(names, ["jpeg", "png", "all"], "{out}");
    let count = |name: &str| rows.iter().find(|w| w[0] == name).unwrap()[1];
    assert_eq!((count("jpeg"), count("png"), count("all")), ("2", "4", "6"));
    for w in &rows {
        let per_core: f64 = w[7].parse().unwrap();
        assert!(per_core > 0.0 && per_core.is_finite(), "{w:?}");
    }
    assert!(out.contains("on 2 threads at once:"), "{out}");
}

#[test]
fn bench_pipeline_runs_every_tile_through_and_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let tiles = tiles_and_a_broken_one(d.path());
    let (tmp, cache) = (d.path().join("tmp"), d.path().join("cache"));
    std::fs::create_dir(&tmp).unwrap();
    std::fs::create_dir(&cache).unwrap();
    let run = |extra: &[&str]| {
        let base = [
            "--what",
            "pipeline",
            "--decode-threads",
            "2",
            "--size",
            "64",
        ];
        let args = [&base[..], &["--batch-size", "4"], extra].concat();
        bench_ok(&args, &tiles, &tmp)
    };
    let out = run(&[]);
    assert!(out.contains("(6 tiles written, 1 unreadable;"), "{out}");
    assert!(out.contains("no cache (no hashing)"), "{out}");
    assert!(
        out.contains("2 decode threads, batch 4, 2048 columns"),
        "{out}"
    );
    let out = run(&["--cache-dir", cache.to_str().unwrap(), "--layer", "layer3"]);
    assert!(
        out.contains("a fresh cache (removed): 6 vectors stored"),
        "{out}"
    );
    assert!(out.contains("1024 columns"), "{out}");
    let out = run(&["--machine"]);
    let tps: f64 = out
        .trim()
        .strip_prefix("tiles_per_s=")
        .unwrap()
        .parse()
        .unwrap();
    assert!(tps > 0.0 && tps.is_finite(), "{out}");
    // The CSV (under TMPDIR) and the fresh cache are removed.
    for dir in [&tmp, &cache] {
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
        assert!(left.is_empty(), "{} still holds {left:?}", dir.display());
    }
    tilefeat()
        .args(["bench", "--what", "pipeline"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(
            "--what pipeline needs --tiles DIR",
        ));
}

#[test]
fn bench_decode_needs_a_tile_folder() {
    tilefeat()
        .args(["bench", "--what", "decode"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--tiles DIR"));
    let d = tempfile::tempdir().unwrap();
    tilefeat()
        .args(["bench", "--what", "decode", "--tiles"])
        .arg(d.path())
        .assert()
        .code(3)
        .stderr(predicate::str::contains("holds no tiles"));
}

/// `tilefeat extract DIR... --outdir OUT` with the given tile folders and flags.
fn extract_many(dirs: &[&Path], outdir: &Path, extra: &[&str]) -> assert_cmd::Command {
    let mut c = tilefeat();
    c.arg("extract")
        .args(dirs)
        .arg("--outdir")
        .arg(outdir)
        .args(["--weights", "random:0", "--quiet", "--device", "cpu"])
        .args(extra);
    c
}

/// Several tile folders in one process: each sample gets what a run of its folder alone
/// writes (the same CSV bytes), named after the folder, and the shared cache's counters are
/// each sample's own.
#[test]
fn several_samples_in_one_process_match_separate_runs() {
    let d = tempfile::tempdir().unwrap();
    let outdir = d.path().join("out"); // created by extract
    let cache = d.path().join("cache");
    let names = ["sampleA", "sampleB", "sampleC"];
    let dirs: Vec<PathBuf> = names.iter().map(|n| demo_sample(n)).collect();
    let dir_refs: Vec<&Path> = dirs.iter().map(|p| p.as_path()).collect();
    let cache_arg = ["--cache-dir", cache.to_str().unwrap()];
    extract_many(&dir_refs, &outdir, &cache_arg)
        .assert()
        .success();
    for (name, dir) in names.iter().zip(&dirs) {
        let alone = d.path().join(format!("{name}-alone.csv"));
        extract_ok(dir, &alone, &["--no-cache"]);
        let csv = outdir.join(format!("{name}.csv"));
        assert_eq!(
            std::fs::read(&csv).unwrap(),
            std::fs::read(&alone).unwrap(),
            "{name}"
        );
        let p = provenance(&csv);
        assert_eq!(p["sample"].as_str(), Some(*name));
        let found = std::fs::read_dir(dir).unwrap().count() as u64;
        assert_eq!(p["tiles"]["computed"].as_u64(), Some(found), "{name}");
        assert_eq!(p["cache"]["stored"].as_u64(), Some(found), "{name}");
        assert!(outdir.join(format!("{name}.rejected.tsv")).is_file());
    }
    // Again, in the other order: everything comes from the cache, same bytes.
    let again = d.path().join("again");
    let reversed: Vec<&Path> = dir_refs.iter().rev().copied().collect();
    extract_many(&reversed, &again, &cache_arg)
        .assert()
        .success();
    for name in names {
        let p = provenance(&again.join(format!("{name}.csv")));
        assert_eq!(p["tiles"]["computed"].as_u64(), Some(0), "{name}");
        assert_eq!(p["cache"]["stored"].as_u64(), Some(0), "{name}");
        assert_eq!(
            std::fs::read(again.join(format!("{name}.csv"))).unwrap(),
            std::fs::read(outdir.join(format!("{name}.csv"))).unwrap()
        );
    }
}

/// What cannot name one output per folder is refused before anything runs.
#[test]
fn several_samples_need_distinct_names_and_an_outdir() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (demo_sample("sampleA"), demo_sample("sampleB"));
    let out = d.path().join("x.csv");
    tilefeat()
        .arg("extract")
        .args([&a, &b])
        .arg("-o")
        .arg(&out)
        .args(["--weights", "random:0"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--outdir"));
    extract_many(&[&a, &b], d.path(), &["--sample", "x"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("1 --sample for 2 tile folders"));
    extract_many(&[&a, &b], d.path(), &["--sample", "x", "--sample", "x"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("both sample \"x\""));
    tilefeat()
        .args(["extract", a.to_str().unwrap(), "--weights", "random:0"])
        .assert()
        .code(2);
    // Two folders with the same name would write the same SAMPLE.csv.
    let (one, two) = (d.path().join("1").join("s"), d.path().join("2").join("s"));
    copy_dir(&demo_sample("sampleC"), &one);
    copy_dir(&demo_sample("sampleC"), &two);
    let outdir = d.path().join("out");
    extract_many(&[&one, &two], &outdir, &[])
        .assert()
        .code(2)
        .stderr(
            predicate::str::contains(one.to_str().unwrap())
                .and(predicate::str::contains(two.to_str().unwrap())),
        );
    // ... unless each gets its own name.
    let named = d.path().join("named");
    extract_many(&[&one, &two], &named, &["--sample", "s1", "--sample", "s2"])
        .assert()
        .success();
    assert!(named.join("s1.csv").is_file() && named.join("s2.csv").is_file());
    let file = d.path().join("file");
    std::fs::write(&file, "x").unwrap();
    extract_many(&[&a], &file, &[])
        .assert()
        .code(6)
        .stderr(predicate::str::contains("is not a directory"));
    assert!(!outdir.exists() && !out.exists());
}

/// One sample's bad input does not cost the others: they are written, the failed ones are
/// named, nothing of theirs is left, and the exit code is the failure's (3).
#[test]
fn a_failing_sample_does_not_stop_the_others() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad");
    copy_dir(&demo_sample("sampleC"), &bad);
    std::fs::write(
        bad.join("tile_999_broken.png"),
        b"\x89PNG\r\n\x1a\n garbage",
    )
    .unwrap();
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let good = demo_sample("sampleB");
    let outdir = d.path().join("out");
    extract_many(&[&bad, &good, &empty], &outdir, &[])
        .assert()
        .code(3)
        .stderr(
            predicate::str::contains("sample bad: ")
                .and(predicate::str::contains("tile_999_broken.png"))
                .and(predicate::str::contains("sample empty: "))
                .and(predicate::str::contains(
                    "2 of 3 samples failed (bad, empty); the others were written",
                )),
        );
    // When none is written, the message does not say the others were.
    let empty2 = d.path().join("empty2");
    std::fs::create_dir(&empty2).unwrap();
    let none = extract_many(&[&empty, &empty2], &d.path().join("none"), &[])
        .assert()
        .code(3)
        .get_output()
        .stderr
        .clone();
    let none = String::from_utf8(none).unwrap();
    assert!(
        none.contains("2 of 2 samples failed (empty, empty2)") && !none.contains("others"),
        "{none}"
    );
    let alone = d.path().join("alone.csv");
    extract_ok(&good, &alone, &[]);
    assert_eq!(
        std::fs::read(outdir.join("sampleB.csv")).unwrap(),
        std::fs::read(&alone).unwrap()
    );
    let mut left: Vec<String> = std::fs::read_dir(&outdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "sampleB.csv",
            "sampleB.provenance.yaml",
            "sampleB.rejected.tsv"
        ]
    );
}

/// A sample whose output cannot be written (exit 6) does not stop the others either; a dry
/// run creates no --outdir.
#[test]
fn an_unwritable_sample_output_does_not_stop_the_others() {
    let d = tempfile::tempdir().unwrap();
    let outdir = d.path().join("out");
    let (a, b) = (demo_sample("sampleA"), demo_sample("sampleB"));
    extract_many(&[&a, &b], &outdir, &["--dry-run"])
        .assert()
        .success()
        .stdout(predicate::str::contains("sampleB.csv"));
    assert!(!outdir.exists(), "a dry run writes nothing");
    // A folder where sampleA.csv should go: its CSV cannot be put in place.
    std::fs::create_dir_all(outdir.join("sampleA.csv")).unwrap();
    extract_many(&[&a, &b], &outdir, &[])
        .assert()
        .code(6)
        .stderr(
            predicate::str::contains("sample sampleA: ").and(predicate::str::contains(
                "1 of 2 samples failed (sampleA); the others were written",
            )),
        );
    assert!(outdir.join("sampleA.csv").is_dir());
    assert!(!outdir.join("sampleA.provenance.yaml").exists());
    assert!(outdir.join("sampleB.provenance.yaml").is_file());
}

/// `--output features/S1.csv` in a new project makes its folder, as `--outdir` does
/// (regression, issue 28: the README's command exited 6 "folder features does not exist");
/// a file in the way of the folder is still an output error naming it.
#[test]
fn the_outputs_folder_is_made() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("features/new/S1.csv");
    extract_ok(&demo_sample("sampleA"), &out, &[]);
    assert!(out.is_file() && d.path().join("features/new/S1.provenance.yaml").is_file());
    std::fs::write(d.path().join("file"), "not a folder").unwrap();
    extract_cmd(&demo_sample("sampleA"), &d.path().join("file/S1.csv"))
        .assert()
        .code(6)
        .stderr(predicate::str::contains("file/S1.csv"));
    // A dry run makes nothing.
    extract_cmd(&demo_sample("sampleA"), &d.path().join("dry/S1.csv"))
        .arg("--dry-run")
        .assert()
        .success();
    assert!(!d.path().join("dry").exists());
}

/// What every sample shares failing (here the cache) stops the command at once: no sample
/// runs without it, none is written.
#[test]
fn a_shared_setup_failure_stops_every_sample() {
    let d = tempfile::tempdir().unwrap();
    let outdir = d.path().join("out");
    let not_a_dir = d.path().join("cache-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let (a, b) = (demo_sample("sampleA"), demo_sample("sampleB"));
    extract_many(
        &[&a, &b],
        &outdir,
        &["--cache-dir", not_a_dir.to_str().unwrap()],
    )
    .assert()
    .code(7)
    .stderr(
        predicate::str::contains("sample sampleA: ").and(predicate::str::contains("sampleB").not()),
    );
    assert_eq!(
        std::fs::read_dir(&outdir).unwrap().count(),
        0,
        "nothing written"
    );
}

/// Regression: the CSV is committed by the pipeline's writer; when the provenance beside it
/// could not be written, the CSV stayed under its final name without it.
#[test]
fn no_csv_is_left_without_its_provenance() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.csv");
    std::fs::create_dir(d.path().join("x.provenance.yaml")).unwrap();
    extract_cmd(&demo_sample("sampleC"), &out)
        .arg("--quiet")
        .assert()
        .code(6)
        .stderr(predicate::str::contains("x.provenance.yaml"));
    assert!(!out.exists(), "the CSV was taken back");
    assert!(!d.path().join("x.rejected.tsv").exists());
    assert!(
        files_containing(d.path(), "tmp").is_empty(),
        "no temporary file left behind"
    );
}

/// `--sample` once per folder names the samples (and their files), whatever the folders are
/// called: what a workflow with a samplesheet needs.
#[test]
fn several_samples_named_by_sample_flags() {
    let d = tempfile::tempdir().unwrap();
    let outdir = d.path().join("out");
    let (a, b) = (demo_sample("sampleA"), demo_sample("sampleB"));
    extract_many(&[&a, &b], &outdir, &["--sample", "P-1", "--sample", "Q.2"])
        .assert()
        .success();
    for (name, dir) in [("P-1", &a), ("Q.2", &b)] {
        let csv = outdir.join(format!("{name}.csv"));
        assert_eq!(provenance(&csv)["sample"].as_str(), Some(name));
        let alone = d.path().join(format!("{name}-alone.csv"));
        extract_ok(dir, &alone, &[]);
        assert_eq!(std::fs::read(&csv).unwrap(), std::fs::read(&alone).unwrap());
    }
    assert!(!outdir.join("sampleA.csv").exists());
}

/// `info` names the CPU and says, per precision, whether it is native; `extract` warns once
/// when bf16 or fp16 is emulated on the CPU (7-10x slower than fp32 on AVX2-only CPUs) and not
/// when it is native; the provenance records the CPU. Native or not is read here from
/// /proc/cpuinfo's flags by the documented rule (bf16: AVX-512 BF16 or AMX-BF16; fp16:
/// AVX-512 FP16 or AMX-FP16; Arm: bf16, asimdhp), not from the binary's own `info`.
#[test]
fn emulated_cpu_precisions_are_named_and_warned_about() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: std::collections::HashSet<&str> = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .flat_map(|l| l.split(':').nth(1).unwrap_or("").split_whitespace())
        .collect();
    let native = |p: &str| match p {
        "bf16" => ["avx512_bf16", "amx_bf16", "bf16"]
            .iter()
            .any(|f| flags.contains(f)),
        _ => ["avx512_fp16", "amx_fp16", "asimdhp"]
            .iter()
            .any(|f| flags.contains(f)),
    };
    let info = tilefeat().arg("info").output().unwrap();
    let info = String::from_utf8(info.stdout).unwrap();
    assert!(info.contains("\ncpu: "), "{info}");
    assert!(info.contains("cpu fp32: native"), "{info}");
    let d = tempfile::tempdir().unwrap();
    for p in ["bf16", "fp16"] {
        let said = if native(p) { "native" } else { "emulated" };
        assert!(info.contains(&format!("cpu {p}: {said}")), "{p}: {info}");
        let out = d.path().join(format!("{p}.csv"));
        let o = extract_cmd(&demo_sample("sampleC"), &out)
            .args(["--precision", p, "--size", "32"])
            .output()
            .unwrap();
        assert!(o.status.success());
        let err = String::from_utf8(o.stderr).unwrap();
        let warned = err.matches(&format!("libtorch emulates {p}")).count();
        assert_eq!(warned, if native(p) { 0 } else { 1 }, "{p}: {err}");
        let cpu = &provenance(&out)["cpu"];
        assert!(cpu["model"].as_str().is_some(), "{cpu:?}");
        assert!(cpu["instruction_sets"].as_sequence().is_some(), "{cpu:?}");
    }
}
