"""Slides read in place (issue 30, step 1): a slide's features are byte-identical to those of
the tile folder a Python reference cuts from it with openslide-python and OpenCV (the peers'
path), its HDF5 coordinates are the reference grid, bad slides fail clearly with nothing
written, and a rerun with a cache reads no pixels.

The reference: the level with the largest downsample not above the wanted factor,
`read_region(...).convert("RGB")` at that level, `cv2.resize(INTER_LINEAR)` to the patch
size, PNG under TRIDENT's names `{idx:06d}_x{x}_y{y}.png` (level-0 top left).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import yaml

import openslide  # noqa: E402  (openslide-python: requirements-dev.txt)

from make_slides import make_all  # noqa: E402
from slide_reference import reference_tiles, rnd  # noqa: E402


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("slides"))


# (slide, flags, target µm/px, patch, stride, level expected, region side expected)
CASES = {
    # 10x from a 40x SVS: level 1 (downsample 4), 1024 level-0 px read as 256: no resize.
    "svs-level1": ("aperio.svs", ["--magnification", "10"], 1.0, 256, None, 1, 256),
    # 0.6 µm/px, 224 px, stride 300: level 0, 538 px resized to 224 (not a 2x shrink).
    "svs-resize": ("aperio.svs", ["--mpp", "0.6", "--patch-size", "224", "--stride", "300"], 0.6, 224, 300, 0, 538),
    # Generic TIFF at the default 20x (0.5 µm/px on a 0.25 slide): level 1 of downsample 2.
    "tiff-default": ("generic.tiff", [], 0.5, 256, None, 1, 256),
}


@pytest.mark.parametrize("case", list(CASES))
def test_slide_features_equal_the_reference_tile_folder(tilefeat, slides, tmp_path, case):
    name, flags, mpp, patch, stride, level, read = CASES[case]
    xy, ref_level, ref_read = reference_tiles(slides[name], tmp_path / "ref", mpp, patch, stride)
    assert (ref_level, ref_read) == (level, read), "the case no longer tests what it says"
    assert len(xy) >= 2
    common = ["--weights", "random:0", "--quiet", "--threads", "2"]
    # The whole grid (tissue detection has its own test: test_slide_tissue.py).
    tilefeat("extract", slides[name], "-o", tmp_path / "slide.csv", *flags, *common, "--tissue", "none")
    tilefeat("extract", tmp_path / "ref", "-o", tmp_path / "ref.csv", *common)
    got, want = (tmp_path / "slide.csv").read_bytes(), (tmp_path / "ref.csv").read_bytes()
    assert got.count(b"\n") == len(xy) + 1
    assert got == want, "slide features differ from the reference tile folder's"
    prov = yaml.safe_load((tmp_path / "slide.provenance.yaml").read_text())
    s = prov["slide"]
    assert (s["level"], s["read_size"], s["tiles"], s["tissue"]) == (level, read, len(xy), "none")
    assert s["mpp_source"] == "openslide.mpp-x" and s["target_mpp"] == pytest.approx(mpp)
    assert prov["sample"] == Path(name).stem
    assert "content_sha256" not in s, "a run without a cache must not hash the slide"

    # HDF5: the coordinates are the reference grid's level-0 top-left corners.
    (tmp_path / "h5").mkdir()
    tilefeat("extract", slides[name], "-o", tmp_path / "h5" / "slide.h5", *flags, *common, "--tissue", "none")
    with h5py.File(tmp_path / "h5" / "slide.h5") as f:
        assert f["coords"][:].tolist() == [list(p) for p in xy]
        attrs = dict(f["coords"].attrs)
        # CLAM's patch_size: the region's side at patch_level (what its readers read there).
        assert (attrs["patch_size"], attrs["patch_level"], attrs["mpp"]) == (read, level, 0.25), attrs
        assert attrs["patch_size_level0"] == s["patch_size_level0"] == rnd(patch * mpp / 0.25)
        assert xy[1][0] - xy[0][0] == s["step_level0"] == rnd((stride or patch) * mpp / 0.25)
        assert attrs["level0_magnification"] == 40.0
        assert attrs["target_magnification"] == pytest.approx(10 / mpp, rel=5e-3)
        csv_rows = np.loadtxt(tmp_path / "slide.csv", delimiter=",", skiprows=1, usecols=range(1, 2049), dtype=np.float32)
        np.testing.assert_array_equal(f["features"][:], csv_rows)


def test_bad_slides_fail_clearly_and_write_nothing(tilefeat, slides, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    not_a_slide = tmp_path / "x.svs"
    not_a_slide.write_text("not a slide\n")
    r = tilefeat("extract", not_a_slide, "-o", out / "x.csv", "--weights", "random:0", check=False)
    assert r.returncode == 3, r.stderr
    assert "x.svs is neither a tile folder, an archive" in r.stderr and "OpenSlide" in r.stderr, r.stderr

    # 72 dpi: 352.78 µm/px is no microscope's; --slide-mpp is the fix, and works.
    r = tilefeat("extract", slides["dpi72.tiff"], "-o", out / "d.csv", "--weights", "random:0", check=False)
    assert r.returncode == 3, r.stderr
    assert "dpi72.tiff" in r.stderr and "352.7" in r.stderr and "--slide-mpp" in r.stderr, r.stderr
    assert list(out.iterdir()) == [], "nothing may be written for a failed slide"
    tilefeat("extract", slides["dpi72.tiff"], "-o", out / "d.csv", "--weights", "random:0", "--quiet",
             "--slide-mpp", "0.5", "--patch-size", "512", "--tissue", "none")
    prov = yaml.safe_load((out / "d.provenance.yaml").read_text())
    assert prov["slide"]["mpp_source"] == "--slide-mpp" and prov["tiles"]["written"] == 2

    # Slide flags with a tile folder: a usage error.
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    cv2.imwrite(str(tiles / "a.png"), np.zeros((32, 32, 3), np.uint8))
    for flag in (["--mpp", "0.5"], ["--patch-size", "128"], ["--magnification", "20"], ["--stride", "64"]):
        r = tilefeat("extract", tiles, "-o", tmp_path / "t.csv", "--weights", "random:0", *flag, check=False)
        assert r.returncode == 2 and flag[0] in r.stderr, r.stderr
    r = tilefeat("extract", slides["aperio.svs"], "-o", tmp_path / "t.csv", "--weights", "random:0",
                 "--mpp", "0.5", "--magnification", "20", check=False)
    assert r.returncode == 2, r.stderr
    # A slide too small for one tile says so.
    r = tilefeat("extract", slides["single.tiff"], "-o", tmp_path / "t.csv", "--weights", "random:0",
                 "--magnification", "1", check=False)
    assert r.returncode == 3 and "no whole tile" in r.stderr, r.stderr
    assert not (tmp_path / "t.csv").exists()


def test_a_cached_rerun_reads_no_pixels(tilefeat, slides, tmp_path):
    cache = tmp_path / "cache"
    args = ["--weights", "random:0", "--quiet", "--tissue", "none", "--cache-dir", cache, "--magnification", "10"]
    tilefeat("extract", slides["aperio.svs"], "-o", tmp_path / "a.csv", *args)
    first = yaml.safe_load((tmp_path / "a.provenance.yaml").read_text())
    tilefeat("extract", slides["aperio.svs"], "-o", tmp_path / "b.csv", *args)
    second = yaml.safe_load((tmp_path / "b.provenance.yaml").read_text())
    n = first["tiles"]["found"]
    assert n >= 2 and first["tiles"]["computed"] == n
    assert second["tiles"]["cache_hits"] == n and second["tiles"]["computed"] == 0
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    sha = second["slide"]["content_sha256"]
    assert len(sha) == 64 and sha == first["slide"]["content_sha256"]
    assert second["slide"]["files"] == [str(slides["aperio.svs"].resolve())]
    # No pixels were read on the rerun: only the slide hashed and the keys looked up.
    assert second["timings_s"]["read"] == 0.0 and second["timings_s"]["resize"] == 0.0
    assert first["timings_s"]["read"] > 0.0
    # Another resolution is another key: no hits.
    tilefeat("extract", slides["aperio.svs"], "-o", tmp_path / "c.csv", *args[:-2], "--mpp", "0.9")
    third = yaml.safe_load((tmp_path / "c.provenance.yaml").read_text())
    assert third["tiles"]["cache_hits"] == 0


def test_an_unreadable_region_is_a_bad_tile_and_the_rest_read_on(tilefeat, slides, tmp_path):
    # Level 0's first JPEG tile is zeroed: grid tile 0 (x=0, y=0; 512 px at 20x) cannot be read.
    args = ["--weights", "random:0", "--quiet", "--threads", "2", "--tissue", "none"]
    r = tilefeat("extract", slides["corrupt.svs"], "-o", tmp_path / "f.csv", *args, check=False)
    assert r.returncode == 3 and "000000_x0_y0.png" in r.stderr and "x=0 y=0 level 0" in r.stderr, r.stderr
    assert not (tmp_path / "f.csv").exists()
    tilefeat("extract", slides["corrupt.svs"], "-o", tmp_path / "s.csv", *args, "--on-error", "skip")
    prov = yaml.safe_load((tmp_path / "s.provenance.yaml").read_text())
    assert prov["tiles"]["found"] == 15 and prov["tiles"]["written"] == 14, prov["tiles"]
    rejected = (tmp_path / "s.rejected.tsv").read_text().splitlines()
    assert len(rejected) == 2 and rejected[1].startswith("000000_x0_y0.png\t"), rejected
    assert "corrupt.svs" in rejected[1], rejected
    # The tiles after it were read from a fresh handle: the same rows as the intact slide's.
    tilefeat("extract", slides["aperio.svs"], "-o", tmp_path / "ok.csv", *args)
    ok = (tmp_path / "ok.csv").read_text().splitlines()
    assert (tmp_path / "s.csv").read_text().splitlines() == [ok[0], *ok[2:]]


def test_without_openslide_slides_say_how_to_get_it_and_tile_folders_run(tilefeat, slides, tmp_path):
    import os

    env = {**os.environ, "TILEFEAT_OPENSLIDE": str(tmp_path / "missing" / "libopenslide.so.1")}
    r = tilefeat("extract", slides["aperio.svs"], "-o", tmp_path / "a.csv", "--weights", "random:0",
                 check=False, env=env)
    assert r.returncode == 3, r.stderr
    assert "aperio.svs" in r.stderr and "TILEFEAT_OPENSLIDE" in r.stderr and "openslide-bin" in r.stderr, r.stderr
    assert not (tmp_path / "a.csv").exists()
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    cv2.imwrite(str(tiles / "a.png"), np.full((64, 64, 3), 128, np.uint8))
    tilefeat("extract", tiles, "-o", tmp_path / "t.csv", "--weights", "random:0", "--quiet", env=env)
    assert (tmp_path / "t.csv").exists()


def test_several_slides_are_named_after_their_files(tilefeat, slides, tmp_path):
    ome = tmp_path / "s1.ome.tiff"
    ome.symlink_to(slides["generic.tiff"])
    r = tilefeat("extract", slides["aperio.svs"], ome, "--outdir", tmp_path / "out", "--weights", "random:0",
                 "--dry-run", "--magnification", "10", "--tissue", "none")
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    assert "sample aperio — 2 tiles" in lines[0] and "out/aperio.csv" in lines[0], lines[0]
    assert "sample s1 — " in lines[1] and "out/s1.csv" in lines[1], lines[1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
