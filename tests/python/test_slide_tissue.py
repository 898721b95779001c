"""Tissue on slides (issue 30): the tiles kept are those a cv2 reference of CLAM's algorithm
(`tissue_reference.py`) keeps on the same segmentation picture (openslide-python's
`read_region` of the level OpenSlide picks for a downsample of 64), for CLAM's default
settings and its `tcga` preset; the picture beside the output shows them; a slide without
tissue says so and writes nothing.
"""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
import yaml

import openslide  # noqa: E402  (openslide-python: requirements-dev.txt)

import tissue_reference  # noqa: E402
from make_slides import TISSUE_LAYOUT, tissue_canvas, write_tissue_svs, write_tiff  # noqa: E402

COMMON = ["--weights", "random:0", "--quiet", "--size", "32", "--threads", "2"]


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("tissue")
    layout = write_tissue_svs(d / "tissue.svs")
    return d / "tissue.svs", layout


def reference(slide_path, preset, extent):
    """The grid tiles (level-0 top-left, rows first) the reference keeps."""
    with openslide.OpenSlide(str(slide_path)) as s:
        level = s.get_best_level_for_downsample(64)
        w, h = s.level_dimensions[level]
        rgb = np.asarray(s.read_region((0, 0), level, (w, h)).convert("RGB"))
        w0, h0 = s.dimensions
    scale = (w0 / w, h0 / h)
    seg = tissue_reference.segment(np.ascontiguousarray(rgb), scale, tissue_reference.PRESETS[preset])
    # tilefeat's grid holds whole tiles only: x + extent <= w0.
    return tissue_reference.grid_keep(seg, w0 - extent + 1, h0 - extent + 1, extent, extent), seg, (w, h)


@pytest.mark.parametrize("preset", ["clam", "tcga"])
def test_kept_tiles_are_the_references(tilefeat, tissue_slide, tmp_path, preset):
    slide, layout = tissue_slide
    out = tmp_path / "t.h5"
    # 20x, 256 px: tiles of 512 level-0 px.
    tilefeat("extract", slide, "-o", out, "--tissue", preset, *COMMON)
    want, seg, (w, h) = reference(slide, preset, 512)
    with h5py.File(out, "r") as f:
        got = [tuple(p) for p in f["coords"][:].tolist()]
    assert got == want, (len(got), len(want))
    prov = yaml.safe_load((tmp_path / "t.provenance.yaml").read_text())["slide"]
    assert prov["tissue"] == f"--tissue {preset}" and prov["tiles"] == len(want)
    found = prov["tissue_found"]
    assert found["regions"] == len(seg["regions"]) == {"clam": 1, "tcga": 2}[preset], found
    assert found["holes"] == 1 and found["grid_tiles"] == 20 * 15
    # The hole's tiles are not kept; the small piece only with tcga; the speck never.
    hx, hy, hw, hh = layout["holes"][0]
    assert (hx + hw // 2) // 512 * 512 not in [x for x, y in got if y == (hy + hh // 2) // 512 * 512]
    small = [(x, y) for x, y in got if x >= 7000 and y < 3700]
    assert bool(small) == (preset == "tcga"), small
    assert not [(x, y) for x, y in got if x >= 8000 and y >= 5800]
    # The picture: the segmentation level, with tissue outlined in green and kept tiles in red.
    pic = cv2.cvtColor(cv2.imread(str(tmp_path / "t.tissue.png")), cv2.COLOR_BGR2RGB)
    assert pic.shape[:2] == (h, w)
    colours = {tuple(c) for c in pic.reshape(-1, 3)[:: 7].tolist()}
    assert (0, 255, 0) in colours and (255, 0, 0) in colours and (0, 0, 255) in colours


@pytest.mark.parametrize("threads", [1, 2])
def test_a_level_too_large_to_read_whole_is_averaged_from_strips(tilefeat, tmp_path, threads):
    """A slide whose segmentation level is over 2^25 px (here its only level, 10250 x 7700:
    sides that are not multiples of 64) is read in strips, each 64 x 64 block (the last row and
    column of blocks partial) averaged, rounded half up, into one picture pixel: the tiles kept
    are the reference's on that picture, with one thread reading strips or two."""
    w0, h0 = 10250, 7700
    slide = tmp_path / "flat.tiff"
    write_tiff(slide, tissue_canvas(w0, h0, **TISSUE_LAYOUT), [1], (4e4, 4e4), "CENTIMETER")
    with openslide.OpenSlide(str(slide)) as s:
        assert s.level_count == 1
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    rows, cols = np.arange(0, h0, 64), np.arange(0, w0, 64)
    sums = np.add.reduceat(np.add.reduceat(rgb.astype(np.uint64), rows, axis=0), cols, axis=1)
    n = np.outer(np.diff(np.append(rows, h0)), np.diff(np.append(cols, w0)))[..., None].astype(np.uint64)
    picture = ((sums + n // 2) // n).astype(np.uint8)
    assert picture.shape == (121, 161, 3)
    seg = tissue_reference.segment(np.ascontiguousarray(picture), (w0 / 161, h0 / 121),
                                   tissue_reference.PRESETS["clam"])
    want = tissue_reference.grid_keep(seg, w0 - 512 + 1, h0 - 512 + 1, 512, 512)
    assert 50 < len(want) < 200, len(want)
    out = tmp_path / "t.h5"
    tilefeat("extract", slide, "-o", out, *COMMON[:-1], str(threads))
    with h5py.File(out, "r") as f:
        got = [tuple(p) for p in f["coords"][:].tolist()]
    assert got == want, (len(got), len(want))
    found = yaml.safe_load((tmp_path / "t.provenance.yaml").read_text())["slide"]["tissue_found"]
    assert (found["seg_level"], found["averaged"]) == (0, 64), found
    # The picture itself, where nothing is drawn over it (tiles red, tissue green, holes blue).
    drawn = cv2.cvtColor(cv2.imread(str(tmp_path / "t.tissue.png")), cv2.COLOR_BGR2RGB)
    assert drawn.shape == picture.shape
    bare = ~np.isin(drawn.reshape(-1, 3) @ np.array([65536, 256, 1]), [0xFF0000, 0x00FF00, 0x0000FF]).reshape(121, 161)
    assert bare.mean() > 0.5, bare.mean()
    np.testing.assert_array_equal(drawn[bare], picture[bare])


def test_no_tissue_says_so_and_writes_nothing(tilefeat, tmp_path):
    glass = np.full((1536, 2048, 3), 240, np.uint8)
    write_tiff(tmp_path / "glass.tiff", glass, [1, 4], (4e4, 4e4), "CENTIMETER")
    out = tmp_path / "out"
    r = tilefeat("extract", tmp_path / "glass.tiff", "-o", out / "g.h5", "--tissue", "bwh_biopsy", *COMMON,
                 check=False)
    assert r.returncode == 3 and "no tissue found" in r.stderr and "glass.tiff" in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())
    # --tissue none keeps the whole grid (and takes away a previous run's picture).
    tilefeat("extract", tmp_path / "glass.tiff", "-o", out / "g.h5", "--tissue", "none", *COMMON)
    assert not (out / "g.tissue.png").exists()


def test_tissue_is_a_slide_flag(tilefeat, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    cv2.imwrite(str(tiles / "a.png"), np.zeros((32, 32, 3), np.uint8))
    r = tilefeat("extract", tiles, "-o", tmp_path / "t.csv", "--tissue", "tcga", *COMMON, check=False)
    assert r.returncode == 2 and "--tissue" in r.stderr, r.stderr
    r = tilefeat("extract", tiles, "-o", tmp_path / "t.csv", "--tissue", "otsu", *COMMON, check=False)
    assert r.returncode == 2 and "--tissue" in r.stderr, r.stderr


def test_a_grid_of_billions_is_refused_before_anything_is_read(tilefeat, tissue_slide, tmp_path):
    """Regression (review): `--stride 1` laid a grid of one tile per level-0 pixel (78 million
    here; billions on a real slide) in memory before anything else."""
    slide, _ = tissue_slide
    r = tilefeat("extract", slide, "-o", tmp_path / "g.h5", "--magnification", "40", "--patch-size", "16",
                 "--stride", "1", *COMMON, check=False)
    assert r.returncode == 3 and "--stride" in r.stderr and "10000000 tiles" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())
