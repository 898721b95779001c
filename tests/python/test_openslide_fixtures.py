"""Slides from another hand (issue 30): openslide-python's own test slides, made by OpenSlide's
authors, not by our test-data script: a tiny Aperio SVS (`small.svs`, and a copy under a
non-ASCII name), a generic pyramidal TIFF at 72 dpi (`boxes.tiff`), a two-file DICOM slide
(`boxes_0.dcm` + `boxes_1.dcm`), a TIFF OpenSlide cannot open and an SVS whose only tile
cannot be decoded. Each gives the features of the tile folder openslide-python and OpenCV cut
from it, byte for byte, or a clear error naming the file with nothing written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from slide_reference import reference_tiles  # noqa: E402

COMMON = ["--weights", "random:0", "--quiet", "--threads", "2"]


def same_as_reference(tilefeat, slide: Path, tmp: Path, flags, target_mpp, patch, slide_mpp=None):
    """Extract `slide` with `flags` and its reference folder; assert equal CSVs; the provenance."""
    xy, level, read = reference_tiles(slide, tmp / "ref", target_mpp, patch, slide_mpp=slide_mpp)
    assert xy, "the case must have tiles"
    tilefeat("extract", slide, "-o", tmp / "slide.csv", *flags, *COMMON, "--tissue", "none")
    tilefeat("extract", tmp / "ref", "-o", tmp / "ref.csv", *COMMON)
    got = (tmp / "slide.csv").read_bytes()
    assert got.count(b"\n") == len(xy) + 1
    assert got == (tmp / "ref.csv").read_bytes(), f"{slide.name}: features differ from the reference folder's"
    prov = yaml.safe_load((tmp / "slide.provenance.yaml").read_text())
    assert (prov["slide"]["level"], prov["slide"]["read_size"]) == (level, read)
    return xy, prov


@pytest.mark.parametrize(
    "flags, target_mpp, patch, level, read, tiles",
    [
        # 1 µm/px on a slide said to be 0.5: level 1 (downsample exactly 2), no resize.
        (["--mpp", "1.0", "--patch-size", "64"], 1.0, 64, 1, 64, 2),
        # 0.6 µm/px: level 0, 77 px regions resized to 64, 3 x 3 of them.
        (["--mpp", "0.6", "--patch-size", "64"], 0.6, 64, 0, 77, 9),
    ],
)
def test_generic_tiff_with_a_given_mpp_equals_the_reference(tilefeat, openslide_fixtures, tmp_path, flags, target_mpp,
                                                            patch, level, read, tiles):
    slide = openslide_fixtures / "boxes.tiff"
    xy, prov = same_as_reference(tilefeat, slide, tmp_path, ["--slide-mpp", "0.5", *flags], target_mpp, patch,
                                 slide_mpp=0.5)
    s = prov["slide"]
    assert (s["vendor"], s["mpp_source"], s["level"], s["read_size"], len(xy)) == (
        "generic-tiff", "--slide-mpp", level, read, tiles), s


def test_generic_tiff_at_72_dpi_is_refused_without_slide_mpp(tilefeat, openslide_fixtures, tmp_path):
    r = tilefeat("extract", openslide_fixtures / "boxes.tiff", "-o", tmp_path / "b.h5", "--weights", "random:0",
                 check=False)
    assert r.returncode == 3, r.stderr
    assert "boxes.tiff" in r.stderr and "352.7" in r.stderr and "--slide-mpp" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_tissue_on_a_real_slide_says_so_and_names_the_presets(tilefeat, openslide_fixtures, tmp_path):
    # CLAM's default keeps regions over 100 x 512^2 level-0 px: boxes.tiff (300 x 250) has none.
    r = tilefeat("extract", openslide_fixtures / "boxes.tiff", "-o", tmp_path / "b.csv", "--weights", "random:0",
                 "--slide-mpp", "0.5", "--mpp", "0.5", "--patch-size", "64", check=False)
    assert r.returncode == 3, r.stderr
    assert "boxes.tiff" in r.stderr and "tissue" in r.stderr and "bwh_biopsy" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_aperio_svs_equals_the_reference_and_too_small_a_slide_says_so(tilefeat, openslide_fixtures, tmp_path):
    slide = openslide_fixtures / "small.svs"
    # 16 x 16 px at 0.499 µm/px (aperio.MPP): one 16 px tile at its own resolution.
    _, prov = same_as_reference(tilefeat, slide, tmp_path, ["--mpp", "0.499", "--patch-size", "16"], 0.499, 16)
    s = prov["slide"]
    assert (s["vendor"], s["mpp"], s["tiles"]) == ("aperio", 0.499, 1), s
    # At the default 20x, 256 px: no whole tile.
    r = tilefeat("extract", slide, "-o", tmp_path / "d.csv", "--weights", "random:0", check=False)
    assert r.returncode == 3 and "small.svs" in r.stderr and "no whole tile" in r.stderr, r.stderr
    assert not (tmp_path / "d.csv").exists()


def test_a_non_ascii_slide_name_names_its_sample_and_files(tilefeat, openslide_fixtures, tmp_path):
    flags = ["--mpp", "0.499", "--patch-size", "16", "--tissue", "none", *COMMON]
    tilefeat("extract", openslide_fixtures / "😐.svs", "--outdir", tmp_path / "out", *flags)
    tilefeat("extract", openslide_fixtures / "small.svs", "-o", tmp_path / "small.csv", *flags)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "😐.csv", "😐.provenance.yaml", "😐.rejected.tsv"]
    assert (tmp_path / "out" / "😐.csv").read_bytes() == (tmp_path / "small.csv").read_bytes()
    assert yaml.safe_load((tmp_path / "out" / "😐.provenance.yaml").read_text(encoding="utf-8"))["sample"] == "😐"


def test_dicom_slide_equals_the_reference_and_is_keyed_by_all_its_files(tilefeat, openslide_fixtures, tmp_path):
    # A DICOM slide is a folder of .dcm files (here one per level-0 frame set and its metadata):
    # OpenSlide opens it from any of them; the cache key hashes them all.
    dcm = tmp_path / "dcm"
    dcm.mkdir()
    for f in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(openslide_fixtures / f, dcm / f)
    slide = dcm / "boxes_0.dcm"
    _, prov = same_as_reference(tilefeat, slide, tmp_path, ["--mpp", "0.499", "--patch-size", "16"], 0.499, 16)
    assert (prov["slide"]["vendor"], prov["slide"]["tiles"]) == ("dicom", 1), prov["slide"]

    cache = ["--cache-dir", tmp_path / "cache", "--mpp", "0.499", "--patch-size", "16", "--tissue", "none", *COMMON]
    tilefeat("extract", slide, "-o", tmp_path / "c1.csv", *cache)
    first = yaml.safe_load((tmp_path / "c1.provenance.yaml").read_text())["slide"]
    assert first["files"] == [str(dcm.resolve() / "boxes_0.dcm"), str(dcm.resolve() / "boxes_1.dcm")], first
    # Another byte in the second file is another slide: another key, no hits.
    with open(dcm / "boxes_1.dcm", "ab") as f:
        f.write(b"\0")
    tilefeat("extract", slide, "-o", tmp_path / "c2.csv", *cache)
    second = yaml.safe_load((tmp_path / "c2.provenance.yaml").read_text())
    assert second["slide"]["content_sha256"] != first["content_sha256"]
    assert second["tiles"]["cache_hits"] == 0, second["tiles"]


def test_an_unopenable_slide_is_refused_naming_it(tilefeat, openslide_fixtures, tmp_path):
    r = tilefeat("extract", openslide_fixtures / "unopenable.tiff", "-o", tmp_path / "u.csv", "--weights", "random:0",
                 check=False)
    assert r.returncode == 3, r.stderr
    assert "unopenable.tiff" in r.stderr and "Unsupported TIFF compression" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_undecodable_slide_is_a_bad_tile_or_a_clear_error(tilefeat, openslide_fixtures, tmp_path):
    slide = openslide_fixtures / "unreadable.svs"
    flags = ["--mpp", "0.499", "--patch-size", "16", "--weights", "random:0", "--quiet"]
    # Tissue detection reads the slide's picture first: that read fails, naming the slide.
    r = tilefeat("extract", slide, "-o", tmp_path / "t.csv", *flags, check=False)
    assert r.returncode == 3 and "unreadable.svs" in r.stderr and "Bogus marker length" in r.stderr, r.stderr
    # Without it, its one tile is a bad tile: --on-error fail names it, skip records it.
    r = tilefeat("extract", slide, "-o", tmp_path / "f.csv", *flags, "--tissue", "none", check=False)
    assert r.returncode == 3 and "000000_x0_y0.png" in r.stderr and "unreadable.svs" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
    tilefeat("extract", slide, "-o", tmp_path / "s.csv", *flags, "--tissue", "none", "--on-error", "skip")
    prov = yaml.safe_load((tmp_path / "s.provenance.yaml").read_text())
    assert (prov["tiles"]["found"], prov["tiles"]["written"]) == (1, 0), prov["tiles"]
    rejected = (tmp_path / "s.rejected.tsv").read_text().splitlines()
    assert len(rejected) == 2 and rejected[1].startswith("000000_x0_y0.png\t"), rejected
    assert "Bogus marker length" in rejected[1], rejected
