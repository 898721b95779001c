//! Tiles read from archives in place: zip (stored and deflated), tar and tar.gz give the
//! folder's CSV byte for byte; the cache keys by content, so a folder run makes a zip run all
//! hits; bad archives are refused naming the archive and member, bad members follow
//! `--on-error`; nothing is written outside the output paths.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use predicates::prelude::*;

/// A tile folder: 10 tiles (two in a subfolder), plus what every source ignores.
fn tile_folder(d: &Path) -> PathBuf {
    let dir = d.join("S1");
    make_tiles(&dir, 10, 64);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in [3, 7] {
        let from = dir.join(format!("tile_{i:03}.png"));
        std::fs::rename(&from, dir.join("sub").join(from.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "not a tile").unwrap();
    std::fs::create_dir_all(dir.join(".hidden")).unwrap();
    std::fs::copy(dir.join("tile_000.png"), dir.join(".hidden/x.png")).unwrap();
    dir
}

/// Every file under `dir` as (member path, bytes), in name order.
fn members(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = walk(dir)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().to_str().unwrap().to_string();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn write_zip(path: &Path, members: &[(String, Vec<u8>)], method: zip::CompressionMethod) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in members {
        z.start_file(name.as_str(), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

/// A tar of `members` as given (names written raw, so a test can store `..` or twice).
fn tar_bytes(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, bytes.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn archives_give_the_folders_csv_and_share_its_cache() {
    let d = tempfile::tempdir().unwrap();
    let dir = tile_folder(d.path());
    let all = members(&dir);
    let reference = d.path().join("folder.csv");
    let cache = d.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    extract_ok(&dir, &reference, &["--cache-dir", cache_arg]);
    assert_eq!(read(&reference).lines().count(), 11);
    assert!(read(&reference).contains("\nsub/tile_003.png,"));

    let arch = d.path().join("arch");
    std::fs::create_dir_all(&arch).unwrap();
    let zip_stored = arch.join("S1.zip");
    write_zip(&zip_stored, &all, zip::CompressionMethod::Stored);
    let zip_deflated = arch.join("S2.ZIP");
    write_zip(&zip_deflated, &all, zip::CompressionMethod::Deflated);
    let plain = arch.join("S3.tar");
    std::fs::write(&plain, tar_bytes(&all)).unwrap();
    // Members in reverse name order: they are read ahead and wait for their turn.
    let mut reversed = all.clone();
    reversed.reverse();
    let tgz = arch.join("S4.tar.gz");
    std::fs::write(&tgz, gzip(&tar_bytes(&reversed))).unwrap();
    let tgz2 = arch.join("S5.tgz");
    std::fs::write(&tgz2, gzip(&tar_bytes(&all))).unwrap();
    // The usual `zip -r S6.zip S1` (and `tar czf S7.tar.gz S1`): every member under one
    // top-level folder, with the folders' own entries. It reads as that folder (regression,
    // issue 28: the folder's name was in every tile name, so the CSV differed).
    let mut in_folder: Vec<(String, Vec<u8>)> =
        vec![("S1/".into(), vec![]), ("S1/sub/".into(), vec![])];
    in_folder.extend(all.iter().map(|(n, b)| (format!("S1/{n}"), b.clone())));
    let zip_r = arch.join("S6.zip");
    write_zip(&zip_r, &in_folder, zip::CompressionMethod::Deflated);
    let tar_r = arch.join("S7.tar.gz");
    let files: Vec<(String, Vec<u8>)> = in_folder
        .iter()
        .filter(|(n, _)| !n.ends_with('/'))
        .cloned()
        .collect();
    std::fs::write(&tar_r, gzip(&tar_bytes(&files))).unwrap();
    for (archive, sample) in [
        (&zip_stored, "S1"),
        (&zip_deflated, "S2"),
        (&plain, "S3"),
        (&tgz, "S4"),
        (&tgz2, "S5"),
        (&zip_r, "S6"),
        (&tar_r, "S7"),
    ] {
        let out = d.path().join(format!("{sample}.csv"));
        extract_ok(
            archive,
            &out,
            &["--no-cache", "--batch-size", "3", "--decode-threads", "3"],
        );
        assert_same(&out, &reference, &archive.display().to_string());
        assert_eq!(
            provenance(&out)["sample"].as_str(),
            Some(sample),
            "sample ID from the archive's name"
        );
        // The folder's vectors, all hits.
        let cached = d.path().join(format!("{sample}-cached.csv"));
        extract_ok(archive, &cached, &["--cache-dir", cache_arg]);
        assert_eq!(prov_u64(&cached, &["cache", "hits"]), 10, "{sample}");
        assert_same(&cached, &reference, "cached");
    }
    // And the other way round: a zip first, then the folder.
    let cache2 = d.path().join("cache2");
    let z = d.path().join("z.csv");
    extract_ok(
        &zip_deflated,
        &z,
        &["--cache-dir", cache2.to_str().unwrap()],
    );
    let f = d.path().join("f.csv");
    extract_ok(&dir, &f, &["--cache-dir", cache2.to_str().unwrap()]);
    assert_eq!(prov_u64(&f, &["cache", "hits"]), 10);

    // Several archives in one process, like folders.
    let outdir = d.path().join("out");
    // Its own, empty temporary folder: an archive unpacked to read it would show there.
    let tmp = d.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    tilefeat()
        .env("TMPDIR", &tmp)
        .args([
            "extract",
            zip_stored.to_str().unwrap(),
            plain.to_str().unwrap(),
            tgz.to_str().unwrap(),
        ])
        .args([
            "--outdir",
            outdir.to_str().unwrap(),
            "--weights",
            "random:0",
            "--quiet",
        ])
        .assert()
        .success();
    assert_same(&outdir.join("S1.csv"), &reference, "S1 in --outdir");
    assert_same(&outdir.join("S3.csv"), &reference, "S3 in --outdir");
    assert_same(&outdir.join("S4.csv"), &reference, "S4 in --outdir");
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "files left in TMPDIR"
    );
    // Nothing beside the archives, and nothing unpacked anywhere.
    let mut left: Vec<String> = std::fs::read_dir(&arch)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "S1.zip",
            "S2.ZIP",
            "S3.tar",
            "S4.tar.gz",
            "S5.tgz",
            "S6.zip",
            "S7.tar.gz"
        ]
    );
}

#[test]
fn bad_archives_are_refused_naming_the_archive_and_member() {
    let d = tempfile::tempdir().unwrap();
    let dir = tile_folder(d.path());
    let all: Vec<(String, Vec<u8>)> = members(&dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".png") && !n.starts_with('.'))
        .take(4)
        .collect();
    let out = d.path().join("o.csv");
    let refused = |archive: &Path, what: &[&str]| {
        let mut a = extract_cmd(archive, &out).assert().code(3);
        a = a.stderr(predicate::str::contains(
            archive.file_name().unwrap().to_str().unwrap(),
        ));
        for w in what {
            a = a.stderr(predicate::str::contains(*w));
        }
        assert!(!out.exists());
    };
    // Not an archive at all; a truncated zip; a truncated tar.gz.
    let garbage = d.path().join("garbage.zip");
    std::fs::write(&garbage, b"this is not a zip").unwrap();
    refused(&garbage, &["not a readable zip archive"]);
    let z = d.path().join("z.zip");
    write_zip(&z, &all, zip::CompressionMethod::Deflated);
    let bytes = std::fs::read(&z).unwrap();
    let cut = d.path().join("cut.zip");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    refused(&cut, &["not a readable zip archive"]);
    let tgz = gzip(&tar_bytes(&all));
    let cut_tgz = d.path().join("cut.tgz");
    std::fs::write(&cut_tgz, &tgz[..tgz.len() / 2]).unwrap();
    refused(&cut_tgz, &["not a readable tar archive"]);
    // A member climbing out with `..`, an absolute one, a duplicate.
    for (name, bad, why) in [
        ("up.tar", "../evil.png", "unsafe path"),
        ("abs.tar", "/tmp/evil.png", "unsafe path"),
        ("dup.tar", "a.png", "appears twice"),
    ] {
        let mut m = all.clone();
        m.push((bad.to_string(), all[0].1.clone()));
        if name == "dup.tar" {
            m.push((bad.to_string(), all[1].1.clone()));
        }
        let p = d.path().join(name);
        std::fs::write(&p, tar_bytes(&m)).unwrap();
        refused(&p, &[bad, why]);
    }
    assert!(!d.path().join("evil.png").exists() && !Path::new("/tmp/evil.png").exists());
}

#[test]
fn bad_members_follow_on_error() {
    let d = tempfile::tempdir().unwrap();
    let dir = tile_folder(d.path());
    let mut all: Vec<(String, Vec<u8>)> = members(&dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".png") && !n.starts_with('.'))
        .take(4)
        .collect();
    // A zip bomb: 300 MB of zeros deflate to a few hundred KB; its declared size is refused.
    all.push(("bomb.png".into(), vec![0u8; 300 << 20]));
    let z = d.path().join("s.zip");
    write_zip(&z, &all, zip::CompressionMethod::Deflated);
    // A member whose stored bytes no longer match their CRC-32.
    let mut stored = all[..4].to_vec();
    stored.push(("crc.png".into(), all[0].1.clone()));
    let crc = d.path().join("crc.zip");
    write_zip(&crc, &stored, zip::CompressionMethod::Stored);
    let mut bytes = std::fs::read(&crc).unwrap();
    let name_at = bytes.windows(7).position(|w| w == b"crc.png").unwrap();
    bytes[name_at + 7 + 100] ^= 0x01; // inside crc.png's data, after its local header
    std::fs::write(&crc, bytes).unwrap();
    for (archive, member, why) in [
        (&z, "bomb.png", "more than a tile may hold"),
        (&crc, "crc.png", "checksum"),
    ] {
        let out = d.path().join(format!("{member}.csv"));
        extract_cmd(archive, &out)
            .assert()
            .code(3)
            .stderr(predicate::str::contains(member).and(predicate::str::contains(why)));
        assert!(!out.exists());
        extract_cmd(archive, &out)
            .args(["--on-error", "skip", "--quiet"])
            .assert()
            .success();
        let rejected = read(&out.with_extension("rejected.tsv"));
        assert!(
            rejected.contains(&format!("{member}\t")) && rejected.contains(why),
            "{rejected}"
        );
        assert_eq!(read(&out).lines().count(), 1 + 4);
    }
}

/// Four real tiles of the test folder, as (member path, bytes).
fn four_tiles(d: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = tile_folder(d);
    members(&dir)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".png") && !n.starts_with('.'))
        .take(4)
        .collect()
}

/// `extract` refuses `archive` (exit 3), naming it and saying each of `what`; nothing is
/// written.
#[track_caller]
fn assert_refused(archive: &Path, out: &Path, what: &[&str]) {
    let mut a = extract_cmd(archive, out)
        .args(["--on-error", "skip"])
        .assert()
        .code(3)
        .stderr(predicate::str::contains(
            archive.file_name().unwrap().to_str().unwrap(),
        ));
    for w in what {
        a = a.stderr(predicate::str::contains(*w));
    }
    assert!(!out.exists());
}

/// A `.tar.gz` whose gzip trailer says its data is not what was compressed (a CRC-32 or
/// length that differs), or that has no trailer at all, is refused like a truncated one: its
/// bytes are not to be trusted.
#[test]
fn tar_gz_with_a_bad_or_missing_trailer_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let tgz = gzip(&tar_bytes(&four_tiles(d.path())));
    let n = tgz.len();
    let out = d.path().join("o.csv");
    let mut bad_crc = tgz.clone();
    bad_crc[n - 8] ^= 0x01;
    let mut bad_len = tgz.clone();
    bad_len[n - 1] ^= 0x01;
    for (name, bytes, why) in [
        ("crc.tgz", bad_crc, "CRC-32"),
        ("len.tgz", bad_len, "length"),
        ("notrailer.tgz", tgz[..n - 8].to_vec(), "trailer"),
    ] {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        assert_refused(&p, &out, &["not a readable tar archive", why]);
    }
    // The same archive intact is read.
    let p = d.path().join("ok.tgz");
    std::fs::write(&p, &tgz).unwrap();
    extract_ok(&p, &out, &[]);
    assert_eq!(read(&out).lines().count(), 1 + 4);
}

/// A tar that ends before its end-of-archive blocks is truncated, wherever the cut falls: at
/// a member boundary (fewer tiles would look like a whole slide), just before the blocks (every
/// member there), or inside a member (the members after it would vanish under `--on-error
/// skip`); plain or gzipped.
#[test]
fn tar_cut_anywhere_before_its_end_blocks_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let all = four_tiles(d.path());
    let whole = tar_bytes(&all);
    let first_two = tar_bytes(&all[..2]).len() - 1024; // two members, no end blocks
    let out = d.path().join("o.csv");
    for (name, cut) in [
        ("boundary", first_two),
        ("noend", whole.len() - 1024),
        ("oneblock", whole.len() - 512),
        ("inside", first_two + 512 + 100),
    ] {
        let plain = d.path().join(format!("{name}.tar"));
        std::fs::write(&plain, &whole[..cut]).unwrap();
        assert_refused(&plain, &out, &["not a readable tar archive", "truncated"]);
        let gz = d.path().join(format!("{name}.tar.gz"));
        std::fs::write(&gz, gzip(&whole[..cut])).unwrap();
        assert_refused(&gz, &out, &["not a readable tar archive", "truncated"]);
    }
    // Whole, both are read (GNU tar pads with more zero blocks: also fine).
    let mut padded = whole.clone();
    padded.resize(whole.len().next_multiple_of(10240), 0);
    for (name, bytes) in [("whole.tar", whole.clone()), ("padded.tgz", gzip(&padded))] {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        extract_ok(&p, &out, &[]);
        assert_eq!(read(&out).lines().count(), 1 + 4, "{name}");
    }
}

/// Peak RSS (KiB) of `extract ARCHIVE --on-error skip`, which must succeed.
fn extract_peak_kib(archive: &Path, out: &Path) -> i64 {
    let mut args = vec![std::ffi::OsStr::new("extract"), archive.as_os_str()];
    args.extend(["-o".as_ref(), out.as_os_str()]);
    for a in ["--weights", "random:0", "--quiet", "--on-error", "skip"] {
        args.push(a.as_ref());
    }
    for a in ["--size", "32", "--decode-threads", "2"] {
        args.push(a.as_ref());
    }
    peak_rss_kib(&args)
}

/// Members of a `.tar.gz` that declare more than a tile may hold (256 MiB) are bad tiles,
/// passed over without being held in memory: three of them, stored before the real tiles
/// (so reading those goes through them) and small on disk (zeros), cost no more memory than
/// an archive without them. Holding even one would cost 256 MiB.
#[test]
fn oversize_tar_gz_members_are_skipped_without_buffering() {
    let d = tempfile::tempdir().unwrap();
    let tiles = four_tiles(d.path());
    let oversize: u64 = (256 << 20) + (1 << 20);
    let write_tgz = |path: &Path, bombs: usize| {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for i in 0..bombs {
            let mut h = tar::Header::new_gnu();
            h.set_size(oversize);
            h.set_mode(0o644);
            let zeros = std::io::Read::take(std::io::repeat(0), oversize);
            b.append_data(&mut h, format!("zz_bomb_{i}.png"), zeros)
                .unwrap();
        }
        for (name, bytes) in &tiles {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, bytes.as_slice()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    };
    let (plain, bombs) = (d.path().join("plain.tgz"), d.path().join("bombs.tgz"));
    write_tgz(&plain, 0);
    write_tgz(&bombs, 3);
    let on_disk = std::fs::metadata(&bombs).unwrap().len();
    assert!(on_disk < 16 << 20, "small on disk: {on_disk} bytes");
    let out = d.path().join("o.csv");
    let without = extract_peak_kib(&plain, &out);
    let with = extract_peak_kib(&bombs, &out);
    let rejected = read(&out.with_extension("rejected.tsv"));
    assert_eq!(rejected.matches("more than a tile may hold").count(), 3);
    assert_eq!(read(&out).lines().count(), 1 + 4);
    assert!(
        with - without < 128 << 10,
        "peak RSS {with} KiB with three oversize members vs {without} KiB without"
    );
}

/// Byte offsets of every occurrence of `what` in `bytes`.
fn occurrences(bytes: &[u8], what: &[u8]) -> Vec<usize> {
    bytes
        .windows(what.len())
        .enumerate()
        .filter(|(_, w)| *w == what)
        .map(|(i, _)| i)
        .collect()
}

/// Replace every `from` in `bytes` by `to` (same length): names in both the local and the
/// central headers.
fn patch(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let at = occurrences(bytes, from);
    assert_eq!(at.len(), 2, "a local and a central header");
    for i in at {
        bytes[i..i + to.len()].copy_from_slice(to);
    }
}

/// A zip with one name stored twice (two members, the central directory listing both) is
/// refused, naming it: which copy is the tile is not for the reader to guess.
#[test]
fn zip_member_stored_twice_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut all = four_tiles(d.path());
    all.push(("dup_1.png".into(), all[0].1.clone()));
    all.push(("dup_2.png".into(), all[1].1.clone()));
    let z = d.path().join("dup.zip");
    write_zip(&z, &all, zip::CompressionMethod::Deflated);
    let mut bytes = std::fs::read(&z).unwrap();
    patch(&mut bytes, b"dup_2.png", b"dup_1.png");
    std::fs::write(&z, bytes).unwrap();
    assert_refused(&z, &d.path().join("o.csv"), &["dup_1.png", "appears twice"]);
}

/// Zip names are UTF-8 first, as Info-ZIP's `unzip` reads them: `zip` on Linux stores
/// `café.png` without the UTF-8 flag, and the CSV names it as the folder does (not as CP437
/// would, `caf├⌐.png`). A name that claims UTF-8 but is not is a bad tile.
#[test]
fn zip_names_without_the_utf8_flag_are_read_as_utf8() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("S1");
    make_tiles(&dir, 3, 64);
    std::fs::rename(dir.join("tile_001.png"), dir.join("café.png")).unwrap();
    let reference = d.path().join("folder.csv");
    extract_ok(&dir, &reference, &[]);
    assert!(read(&reference).contains("\ncafé.png,"));
    // Written with an ASCII name (no UTF-8 flag), then renamed in place to café.png.
    let mut all = members(&dir);
    for m in &mut all {
        if m.0 == "café.png" {
            m.0 = "caf__.png".into();
        }
    }
    // And a member whose name has the flag (set for a non-ASCII name) but bytes that are not
    // UTF-8.
    all.push(("bad_é.png".into(), all[0].1.clone()));
    let z = d.path().join("S1.zip");
    write_zip(&z, &all, zip::CompressionMethod::Deflated);
    let mut bytes = std::fs::read(&z).unwrap();
    patch(&mut bytes, b"caf__.png", "café.png".as_bytes());
    patch(&mut bytes, "bad_é.png".as_bytes(), b"bad_\xff\xfe.png");
    std::fs::write(&z, bytes).unwrap();
    let out = d.path().join("zip.csv");
    extract_ok(&z, &out, &["--on-error", "skip"]);
    assert_same(&out, &reference, "the zip's CSV and the folder's");
    let rejected = read(&out.with_extension("rejected.tsv"));
    assert!(
        rejected.contains("bad_\\xff\\xfe.png\t") && rejected.contains("not valid UTF-8"),
        "{rejected}"
    );
}
