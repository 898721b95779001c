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
    for (archive, sample) in [
        (&zip_stored, "S1"),
        (&zip_deflated, "S2"),
        (&plain, "S3"),
        (&tgz, "S4"),
        (&tgz2, "S5"),
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
    extract_cmd(&zip_stored, &outdir.join("unused.csv"));
    tilefeat()
        .args([
            "extract",
            zip_stored.to_str().unwrap(),
            plain.to_str().unwrap(),
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
    // Nothing beside the archives, and nothing unpacked anywhere.
    let mut left: Vec<String> = std::fs::read_dir(&arch)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["S1.zip", "S2.ZIP", "S3.tar", "S4.tar.gz", "S5.tgz"]);
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
