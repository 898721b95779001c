//! Regression tests for the defects a hostile new user found: every bad input gets a clear
//! error naming the file (or is recorded with `--on-error skip`), the process never aborts,
//! and nothing is left half-written or overwritten.

mod common;

use common::*;
use predicates::prelude::*;
use std::path::Path;

/// Three good tiles to put the bad ones among.
fn good_tiles(dir: &Path) {
    make_tiles(dir, 3, 64);
}

/// No temporary or lock file left beside `out`.
#[track_caller]
fn nothing_left_beside(out: &Path) {
    let dir = out.parent().unwrap();
    let left: Vec<String> = files_containing(dir, "tilefeat-");
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `png` (a real PNG) with its IHDR declaring `width` x `height` (its CRC made right), its
/// pixel data unchanged: a header that lies about the image's size.
fn png_declaring(png: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = png[..33].to_vec(); // signature + IHDR
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&png[33..]);
    out
}

/// PNG and JPEG header bombs (declared 100000 x 100000 and 65500 x 65500 pixels in a few
/// hundred bytes) and half a JPEG with an end marker are bad tiles: named, recorded with
/// `--on-error skip`, never an abort (the PNG used to abort with exit 134 trying to allocate
/// 30 GB, the JPEG to decode for 50 s at 13 GB into gray padding).
#[test]
fn image_bombs_and_cut_jpegs_are_bad_tiles() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    good_tiles(&tiles);
    let png = std::fs::read(tiles.join("tile_000.png")).unwrap();
    std::fs::write(
        tiles.join("bomb.png"),
        png_declaring(&png, 100_000, 100_000),
    )
    .unwrap();
    let mut jpg = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        64,
        64,
        image::Rgb([9, 99, 199]),
    ))
    .write_to(
        &mut std::io::Cursor::new(&mut jpg),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    let sof = jpg.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    let mut forged = jpg.clone();
    forged[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]); // 65500 x 65500
    std::fs::write(tiles.join("forged.jpg"), &forged).unwrap();
    // Cut halfway through its scan (a one-colour tile's scan is short after long headers).
    let sos = jpg.windows(2).position(|m| m == [0xFF, 0xDA]).unwrap();
    let mut half = jpg[..(sos + jpg.len()) / 2].to_vec();
    half.extend_from_slice(&[0xFF, 0xD9]);
    std::fs::write(tiles.join("half.jpg"), &half).unwrap();

    let out = d.path().join("x.csv");
    extract_cmd(&tiles, &out)
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .code(3)
        .stderr(
            predicate::str::contains("bomb.png").and(predicate::str::contains("100000 x 100000")),
        );
    assert!(!out.exists());
    nothing_left_beside(&out);
    extract_cmd(&tiles, &out)
        .args(["--on-error", "skip"])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .success();
    let rejected = read(&out.with_extension("rejected.tsv"));
    assert!(
        rejected.contains("bomb.png\tPng declares 100000 x 100000"),
        "{rejected}"
    );
    assert!(
        rejected.contains("forged.jpg\tJPEG declares 65500 x 65500"),
        "{rejected}"
    );
    assert!(
        rejected.contains("half.jpg\t") && rejected.contains("ends before the last scan line"),
        "{rejected}"
    );
    assert_eq!(read(&out).lines().count(), 1 + 3);
    assert_eq!(prov_u64(&out, &["tiles", "skipped"]), 3);
}

/// Two runs on one `--output`: the second is refused while the first holds the output, so a
/// CSV is never paired with another run's provenance; and `join` checks the pairing through
/// the CSV's SHA-256 in the provenance.
#[test]
fn one_writer_per_output_and_join_checks_the_pair() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    make_tiles(&tiles, 40, 64);
    let out = d.path().join("x.csv");
    let mut first = std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"))
        .args([
            "extract",
            tiles.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .args(["--weights", "random:0", "--quiet", "--threads", "1"])
        .args(["--batch-size", "4"])
        // Ten batches of at least 300 ms: still running while the others are refused,
        // however fast the machine.
        .env("TILEFEAT_TEST_BATCH_DELAY_MS", "300")
        .spawn()
        .unwrap();
    let lock = d.path().join(".x.tilefeat-lock");
    let t = std::time::Instant::now();
    while !lock.exists() {
        assert!(
            t.elapsed().as_secs() < 60,
            "the first run never took its lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    extract_cmd(&tiles, &out)
        .args(["--pool", "avg"])
        .assert()
        .code(6)
        .stderr(predicate::str::contains(
            "being written by another tilefeat run",
        ));
    // Regression: `-o x.h5` took another lock and both runs wrote `x.provenance.yaml`.
    extract_cmd(&tiles, &d.path().join("x.h5"))
        .assert()
        .code(6)
        .stderr(predicate::str::contains(
            "being written by another tilefeat run",
        ));
    assert!(!d.path().join("x.h5").exists());
    assert!(first.wait().unwrap().success());
    assert!(!lock.exists(), "the lock goes with its run");
    let prov = provenance(&out);
    let sha = prov["output_sha256"].as_str().unwrap().to_string();
    use sha2::Digest;
    assert_eq!(
        sha,
        hex::encode(sha2::Sha256::digest(std::fs::read(&out).unwrap()))
    );
    assert_eq!(
        prov["output_bytes"].as_u64(),
        Some(std::fs::metadata(&out).unwrap().len())
    );

    // A CSV of one run beside the provenance of another (as two unsynchronised runs, or a
    // copy, could leave them): join refuses it.
    let kept = d.path().join("max.csv");
    std::fs::copy(&out, &kept).unwrap();
    extract_ok(&tiles, &out, &["--pool", "avg"]);
    std::fs::copy(&kept, &out).unwrap();
    tilefeat()
        .args(["join", out.to_str().unwrap(), "-o"])
        .arg(d.path().join("cohort.csv"))
        .assert()
        .code(3)
        .stderr(predicate::str::contains("x.csv").and(predicate::str::contains("different runs")));
    assert!(!d.path().join("cohort.csv").exists());
}

/// Broken symbolic links: one named like a tile is a bad tile (named; recorded with skip),
/// others are ignored. They used to stop the run with exit 3 even with `--on-error skip`.
#[test]
fn broken_links_named_like_tiles_are_bad_tiles_and_others_ignored() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    good_tiles(&tiles);
    std::os::unix::fs::symlink(d.path().join("missing"), tiles.join("notes.txt")).unwrap();
    let out = d.path().join("x.csv");
    extract_ok(&tiles, &out, &[]);
    assert_eq!(read(&out).lines().count(), 1 + 3);
    std::os::unix::fs::symlink(d.path().join("missing.png"), tiles.join("gone.png")).unwrap();
    std::os::unix::fs::symlink(tiles.join("loop.png"), tiles.join("loop.png")).unwrap();
    extract_cmd(&tiles, &out).assert().code(3).stderr(
        predicate::str::contains("gone.png").and(predicate::str::contains("broken symbolic link")),
    );
    extract_cmd(&tiles, &out)
        .args(["--on-error", "skip"])
        .assert()
        .success();
    let rejected = read(&out.with_extension("rejected.tsv"));
    assert!(
        rejected.contains("gone.png\tbroken symbolic link"),
        "{rejected}"
    );
    assert!(
        rejected.contains("loop.png\tbroken symbolic link"),
        "{rejected}"
    );
    assert_eq!(prov_u64(&out, &["tiles", "found"]), 5);
    assert_eq!(prov_u64(&out, &["tiles", "skipped"]), 2);
}

/// A tile whose name is not UTF-8 is a bad tile (it used to vanish: in no output, not
/// counted, exit 0); with skip it is recorded with its bytes escaped.
#[test]
fn tiles_with_names_that_are_not_utf8_are_bad_tiles() {
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    good_tiles(&tiles);
    let name = std::ffi::OsStr::from_bytes(b"t\xff\xfe.png");
    std::fs::copy(tiles.join("tile_000.png"), tiles.join(name)).unwrap();
    let out = d.path().join("x.csv");
    extract_cmd(&tiles, &out)
        .assert()
        .code(3)
        .stderr(predicate::str::contains("not valid UTF-8"));
    assert!(!out.exists());
    extract_cmd(&tiles, &out)
        .args(["--on-error", "skip", "--quiet"])
        .assert()
        .success()
        .stderr("");
    let rejected = read(&out.with_extension("rejected.tsv"));
    assert!(
        rejected.contains("t\\xff\\xfe.png\tits path is not valid UTF-8"),
        "{rejected}"
    );
    assert_eq!(prov_u64(&out, &["tiles", "found"]), 4);
    assert_eq!(prov_u64(&out, &["tiles", "skipped"]), 1);
    assert_eq!(
        provenance(&out)["skipped_tiles"][0]["tile"].as_str(),
        Some("t\\xff\\xfe.png")
    );
}

/// `join` reads every CSV `extract` writes: a tile name with a newline is quoted over two
/// lines (join used to say "line 2 is malformed").
#[test]
fn join_reads_tile_names_with_newlines() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    good_tiles(&tiles);
    std::fs::rename(tiles.join("tile_001.png"), tiles.join("a\nb, \"c\".png")).unwrap();
    let out = d.path().join("x.csv");
    extract_ok(&tiles, &out, &[]);
    let cohort = d.path().join("cohort.csv");
    tilefeat()
        .args([
            "join",
            out.to_str().unwrap(),
            "--quiet",
            "-o",
            cohort.to_str().unwrap(),
        ])
        .assert()
        .success();
    let mut r = csv::Reader::from_path(&cohort).unwrap();
    let names: Vec<String> = r.records().map(|x| x.unwrap()[1].to_string()).collect();
    assert_eq!(names, ["a\nb, \"c\".png", "tile_000.png", "tile_002.png"]);
    let mean = d.path().join("mean.csv");
    tilefeat()
        .args([
            "join",
            out.to_str().unwrap(),
            "--quiet",
            "--aggregate",
            "mean",
            "-o",
        ])
        .arg(&mean)
        .assert()
        .success();
    assert!(read(&mean).lines().nth(1).unwrap().starts_with("s,3,"));
}

/// `--output` naming a tile (or anything with a tile extension) is refused before anything
/// is read or written: it used to overwrite the tile with the CSV.
#[test]
fn an_output_named_like_a_tile_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    good_tiles(&tiles);
    let tile = tiles.join("tile_000.png");
    let before = std::fs::read(&tile).unwrap();
    for out in [tile.clone(), d.path().join("features.JPG")] {
        extract_cmd(&tiles, &out)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(
                "an image name, not a feature file",
            ));
    }
    assert_eq!(
        std::fs::read(&tile).unwrap(),
        before,
        "the tile is untouched"
    );
    assert!(!d.path().join("features.JPG").exists());
}

/// A CMYK JPEG (Adobe, inverted, as Photoshop and PIL write it) is read as `cv2.imread`
/// reads it (pixel parity with OpenCV: tests/python/test_resize_parity.py); it used to be
/// rejected ("Unsupported color conversion request").
#[test]
fn cmyk_jpegs_are_read() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    std::fs::create_dir_all(&tiles).unwrap();
    std::fs::copy(repo().join("tests/golden/cmyk.jpg"), tiles.join("cmyk.jpg")).unwrap();
    let out = d.path().join("x.csv");
    extract_ok(&tiles, &out, &[]);
    assert_eq!(read(&out).lines().count(), 2);
}

/// A minimal baseline TIFF (little-endian, one 8-bit gray strip of 16 bytes) whose header
/// declares `w` x `h` pixels.
fn tiff_declaring(w: u32, h: u32) -> Vec<u8> {
    // (tag, type: 3 SHORT / 4 LONG, value), ascending by tag as TIFF requires.
    let entries: [(u16, u16, u32); 9] = [
        (256, 4, w),  // ImageWidth
        (257, 4, h),  // ImageLength
        (258, 3, 8),  // BitsPerSample
        (259, 3, 1),  // Compression: none
        (262, 3, 1),  // PhotometricInterpretation: BlackIsZero
        (273, 4, 0),  // StripOffsets: set below
        (277, 3, 1),  // SamplesPerPixel
        (278, 4, h),  // RowsPerStrip
        (279, 4, 16), // StripByteCounts
    ];
    let data_at = 8 + 2 + 12 * entries.len() as u32 + 4;
    let mut b = b"II\x2a\x00".to_vec();
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, typ, value) in entries {
        let value = if tag == 273 { data_at } else { value };
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&typ.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        if typ == 3 {
            b.extend_from_slice(&(value as u16).to_le_bytes());
            b.extend_from_slice(&[0, 0]);
        } else {
            b.extend_from_slice(&value.to_le_bytes());
        }
    }
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&[128u8; 16]);
    b
}

/// Issue 27 (promises with no test): the per-side limit (2^20, OpenCV's) on its own, for a PNG
/// and a TIFF whose pixel count is small, and a TIFF header bomb (100000 x 100000 declared in
/// 150 bytes), are bad tiles named with what they declare, refused from the header (never an
/// allocation or an abort); a good TIFF of the same make is read.
#[test]
fn side_limit_and_tiff_header_bombs_are_bad_tiles() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    good_tiles(&tiles);
    let png = std::fs::read(tiles.join("tile_000.png")).unwrap();
    std::fs::write(
        tiles.join("wide.png"),
        png_declaring(&png, (1 << 20) + 1, 1),
    )
    .unwrap();
    std::fs::write(tiles.join("tall.tif"), tiff_declaring(1, (1 << 20) + 1)).unwrap();
    std::fs::write(tiles.join("bomb.tif"), tiff_declaring(100_000, 100_000)).unwrap();
    std::fs::write(tiles.join("small.tif"), tiff_declaring(4, 4)).unwrap();

    let out = d.path().join("x.csv");
    extract_cmd(&tiles, &out)
        .args(["--on-error", "skip", "--size", "32"])
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .success();
    let rejected = read(&out.with_extension("rejected.tsv"));
    for (name, declares) in [
        ("wide.png", "declares 1048577 x 1 pixels"),
        ("tall.tif", "declares 1 x 1048577 pixels"),
        ("bomb.tif", "declares 100000 x 100000 pixels"),
    ] {
        assert!(
            rejected
                .lines()
                .any(|l| l.starts_with(&format!("{name}\t")) && l.contains(declares)),
            "{name}: {rejected}"
        );
    }
    assert!(!rejected.contains("small.tif"), "{rejected}");
    let csv = read(&out);
    assert!(csv.contains("small.tif"), "the good TIFF is read");
}

/// The highest address space (`VmPeak`, KiB) `tilefeat ARGS` reaches, read from `/proc`
/// until it exits (each batch held 1 s, so the model stage is seen).
fn peak_address_space_kib(args: &[&str]) -> u64 {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("tilefeat"))
        .args(args)
        .env("TILEFEAT_TEST_BATCH_DELAY_MS", "1000")
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Ok(text) = std::fs::read_to_string(&status) {
            let kib = text
                .lines()
                .find_map(|l| l.strip_prefix("VmPeak:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak = peak.max(kib.unwrap_or(0));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    assert!(peak > 0, "no VmPeak read from {status}");
    peak
}

/// Out of memory (regression, issue 28: `--size 4096` ended in a Rust unwrap with libtorch's
/// 29-frame C++ backtrace, no hint). The limit is derived, not one machine's figure: the
/// address space the same run reaches at `--size 32` (libtorch's libraries mapped, threads
/// started; 3.2 GB on this machine), plus 1.5 GiB, which two 4096 px tiles in one batch
/// exceed (their float input is 0.4 GB, conv1's output 2 x 64 x 2048^2 floats, 2.1 GB). The
/// error says out of memory first, naming the sample, the settings and the flags that lower
/// memory, then libtorch's own line without its backtrace; nothing is written.
#[test]
fn out_of_memory_names_the_sample_and_the_flags_that_lower_it() {
    let d = tempfile::tempdir().unwrap();
    let tiles = d.path().join("s");
    make_tiles(&tiles, 2, 64);
    let out = d.path().join("x.csv");
    let (tiles_arg, out_arg) = (tiles.to_str().unwrap(), out.to_str().unwrap());
    let flags = [
        "--weights",
        "random:0",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--no-cache",
        "--quiet",
    ];
    let small = d.path().join("small.csv");
    let mut args = vec![
        "extract",
        tiles_arg,
        "-o",
        small.to_str().unwrap(),
        "--size",
        "32",
    ];
    args.extend(flags);
    let limit_kib = peak_address_space_kib(&args) + (3 << 19);
    let o = std::process::Command::new("bash")
        .args([
            "-c",
            "ulimit -v \"$0\" && exec \"$@\"",
            &limit_kib.to_string(),
        ])
        .arg(assert_cmd::cargo::cargo_bin("tilefeat"))
        .args(["extract", tiles_arg, "-o", out_arg, "--size", "4096"])
        .args(flags.iter().filter(|f| **f != "--quiet"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "error: out of memory computing sample s on cpu (--batch-size 2, --size 4096, \
             --threads 1, --precision fp32): lower --batch-size first"
        ),
        "{err}"
    );
    assert!(
        err.contains("model failed on the batch starting at "),
        "{err}"
    );
    assert!(!err.contains("frame #") && !err.contains("unwrap"), "{err}");
    assert!(!out.exists(), "nothing written");
    assert!(
        files_containing(d.path(), "x.").is_empty(),
        "no side file either"
    );
}
