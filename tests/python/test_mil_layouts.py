"""Issue 29: STAMP's HDF5 layout, CLAM's folder layout and the `coords` attributes the MIL
tools read, each checked the way that tool reads them.

- STAMP: `stamp_data.py` holds STAMP's own `detect_feature_type` and `get_coords` (MIT,
  vendored unchanged); its `BagDataset.__getitem__` (src/stamp/modeling/data.py) reads
  `h5["feats"][()]` and `get_coords(h5).coords_um` for every bag.
- CLAM: `Generic_MIL_Dataset.__getitem__` (datasets/dataset_generic.py) loads
  `{data_dir}/pt_files/{slide_id}.pt` with torch.load, or with `use_h5`
  `{data_dir}/h5_files/{slide_id}.h5`'s `features` and `coords`; `Whole_Slide_Bag_FP`
  (dataset_modules/dataset_h5.py) reads `patch_level` and `patch_size` from `coords`' attributes.
  Re-done here from that description (CLAM is GPL-3.0; nothing copied).
- TRIDENT's readers take `patch_size_level0`, `level0_magnification` and
  `target_magnification` from `coords`' attributes.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import yaml

import stamp_data
from test_bags import N, named_tiles

COMMON = ["--weights", "random:0", "--size", "64", "--quiet"]


def histolab(i):
    """histolab names: level 0, extent 448 (a 448-pixel tile at level 0)."""
    x, y = (i % 4) * 448, (i // 4) * 448
    return f"tile_{i}_level0_{x}-{y}-{x + 448}-{y + 448}.png"


def test_stamp_reads_pixel_named_tiles_with_the_slide_mpp(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "S1", histolab)
    feats = tmp_path / "feats"
    feats.mkdir()
    tilefeat("extract", tiles, "-o", feats / "S1.h5", "--format", "stamp", "--slide-mpp", "0.5", *COMMON)
    tilefeat("extract", tiles, "-o", tmp_path / "S1.h5", *COMMON)
    # STAMP's own checks, as its training runs them on the folder and on each file.
    assert stamp_data.detect_feature_type(feats) == "tile"
    with h5py.File(feats / "S1.h5", "r") as h5, h5py.File(tmp_path / "S1.h5", "r") as clam:
        info = stamp_data.get_coords(h5)
        # Micrometres: level-0 top-left pixels times 0.5, the tiles 448 px = 224 um.
        np.testing.assert_array_equal(info.coords_um, clam["coords"][:] * 0.5)
        assert info.tile_size_um == 224.0 and info.tile_size_px == 448
        assert info.mpp == 0.5
        bag = h5["feats"][()]
        # `feats` is `features` under a second name (a hard link: the same object, no extra
        # bytes), and bit for bit the CLAM-layout file's features.
        assert h5["feats"] == h5["features"]
        assert h5.get("feats", getlink=True).__class__ is h5py.HardLink
        np.testing.assert_array_equal(bag.view(np.uint32), clam["features"][:].view(np.uint32))
        assert bag.shape == (N, 2048) and bag.dtype == np.float32
        assert h5.attrs["unit"] == "um" and h5.attrs["feat_type"] == "tile"
    extra = (feats / "S1.h5").stat().st_size - (tmp_path / "S1.h5").stat().st_size
    assert extra < N * 2048 * 4 // 4, f"the STAMP file is {extra} bytes larger: features stored twice?"


def test_stamp_named_tiles_keep_their_micrometres(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "st", lambda i: f"tile_({i * 256.0}, {(i % 3) * 256.0}).jpg")
    tilefeat("extract", tiles, "-o", tmp_path / "s.h5", "--format", "stamp", "--slide-mpp", "0.25",
             "--patch-size-level0", "1024", *COMMON)
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        info = stamp_data.get_coords(h5)
        names = [t.decode() for t in h5["tiles"][:]]
    want = np.array([[float(v) for v in n[len("tile_("):-len(").jpg")].split(", ")] for n in names])
    np.testing.assert_array_equal(info.coords_um, want)
    assert info.tile_size_um == 256.0
    # In CLAM's layout the same names become level-0 pixels: micrometres / 0.25.
    tilefeat("extract", tiles, "-o", tmp_path / "c.h5", "--slide-mpp", "0.25",
             "--patch-size-level0", "1024", *COMMON)
    with h5py.File(tmp_path / "c.h5", "r") as h5:
        np.testing.assert_array_equal(h5["coords"][:], (want / 0.25).astype(np.int64))
        assert h5["coords"].attrs["level0_magnification"] == 40.0


def test_stamp_layout_without_micrometres_is_refused_naming_the_flag(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "S1", histolab)
    r = tilefeat("extract", tiles, "-o", tmp_path / "s.h5", "--format", "stamp", *COMMON, check=False)
    assert r.returncode == 3 and "--slide-mpp" in r.stderr and "s.h5" in r.stderr, r.stderr
    # STAMP-named tiles (micrometres) need the tiles' extent for tile_size_um.
    st = named_tiles(tmp_path / "st", lambda i: f"tile_({i * 256.0}, 0.0).jpg")
    r = tilefeat("extract", st, "-o", tmp_path / "t.h5", "--format", "stamp", "--slide-mpp", "0.5",
                 *COMMON, check=False)
    assert r.returncode == 3 and "--patch-size-level0" in r.stderr, r.stderr
    # Micrometre names cannot go into CLAM's pixel `coords` without the mpp.
    r = tilefeat("extract", st, "-o", tmp_path / "u.h5", *COMMON, check=False)
    assert r.returncode == 3 and "--slide-mpp" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1", "st"], "nothing written"


@pytest.mark.parametrize("mpp", ["0", "-0.5", "352.78", "nan", "inf", "1e-9"])
def test_an_implausible_slide_mpp_is_a_usage_error(tilefeat, tmp_path, mpp):
    tiles = named_tiles(tmp_path / "S1", histolab)
    r = tilefeat("extract", tiles, "-o", tmp_path / "s.h5", f"--slide-mpp={mpp}", *COMMON, check=False)
    assert r.returncode == 2 and "--slide-mpp" in r.stderr and "0.25" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1"], "nothing written"


def test_clam_layout_writes_both_files_from_one_computation(tilefeat, tmp_path):
    a = named_tiles(tmp_path / "A", histolab)
    b = named_tiles(tmp_path / "B", lambda i: f"img [x={i * 512},y=0,w=512,h=512].png")
    out = tmp_path / "features"
    tilefeat("extract", a, b, "--outdir", out, "--format", "clam", "--slide-mpp", "0.25", *COMMON)
    assert sorted(p.name for p in (out / "pt_files").iterdir() if p.suffix == ".pt") == ["A.pt", "B.pt"]
    for slide_id in ["A", "B"]:
        # Generic_MIL_Dataset: pt_files by default, h5_files with use_h5; same rows.
        bag = torch.load(out / "pt_files" / f"{slide_id}.pt", weights_only=True)
        with h5py.File(out / "h5_files" / f"{slide_id}.h5", "r") as f:
            features, coords = f["features"][:], f["coords"][:]
            attrs = dict(f["coords"].attrs)
        np.testing.assert_array_equal(bag.numpy().view(np.uint32), features.view(np.uint32))
        assert coords.shape == (N, 2)
        # Whole_Slide_Bag_FP's read_region(coord, patch_level, (patch_size, patch_size)).
        assert attrs["patch_level"] == 0
        assert attrs["patch_size"] == {"A": 448, "B": 512}[slide_id]
        assert attrs["patch_size_level0"] == attrs["patch_size"]
        # TRIDENT: 0.25 um/px is 40x; tiles cut at level 0 are at 40x too.
        assert attrs["level0_magnification"] == 40.0 and attrs["target_magnification"] == 40.0
        prov = yaml.safe_load((out / "h5_files" / f"{slide_id}.provenance.yaml").read_text())
        # One computation: every tile computed once, the bag recorded with its hash.
        assert prov["tiles"]["computed"] == N and prov["format"] == "h5"
        assert prov["bag"]["path"].endswith(f"pt_files/{slide_id}.pt")
        assert prov["coords"]["slide_mpp"] == 0.25
        import hashlib

        assert prov["bag"]["sha256"] == hashlib.sha256((out / "pt_files" / f"{slide_id}.pt").read_bytes()).hexdigest()
    # join reads CLAM's h5_files as any tilefeat HDF5.
    tilefeat("join", out / "h5_files" / "A.h5", out / "h5_files" / "B.h5", "-o", tmp_path / "c.csv")


def test_clam_layout_takes_away_an_earlier_bags_side_files(tilefeat, tmp_path):
    """Regression (review): a `--format pt` run into FEATS/pt_files left S.provenance.yaml
    there, which still described the bag a later `--format clam` run replaced."""
    tiles = named_tiles(tmp_path / "S1", histolab)
    out = tmp_path / "features"
    tilefeat("extract", tiles, "--outdir", out / "pt_files", "--format", "pt", *COMMON)
    assert (out / "pt_files" / "S1.provenance.yaml").exists()
    tilefeat("extract", tiles, "--outdir", out, "--format", "clam", *COMMON)
    assert sorted(p.name for p in (out / "pt_files").iterdir()) == ["S1.index.npz", "S1.pt"]
    assert (out / "h5_files" / "S1.provenance.yaml").exists()


def test_clam_layout_needs_outdir(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "S1", histolab)
    r = tilefeat("extract", tiles, "-o", tmp_path / "s.h5", "--format", "clam", *COMMON, check=False)
    assert r.returncode == 2 and "--outdir" in r.stderr, r.stderr


def test_trident_names_without_extent_warn_about_heatmaps(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "tr", lambda i: f"{i:06d}_x{i * 512}_y0.png")
    r = tilefeat("extract", tiles, "-o", tmp_path / "t.h5", "--weights", "random:0", "--size", "64")
    assert "patch_size_level0" in r.stderr and "--patch-size-level0" in r.stderr, r.stderr
    tilefeat("extract", tiles, "-o", tmp_path / "u.h5", "--patch-size-level0", "512", *COMMON)
    with h5py.File(tmp_path / "u.h5", "r") as f:
        assert f["coords"].attrs["patch_size_level0"] == 512


def test_join_refuses_stamp_files_and_converted_micrometres(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "S1", histolab)
    tilefeat("extract", tiles, "-o", tmp_path / "s.h5", "--format", "stamp", "--slide-mpp", "0.5", *COMMON)
    r = tilefeat("join", tmp_path / "s.h5", "-o", tmp_path / "c.csv", check=False)
    assert r.returncode == 3 and "STAMP" in r.stderr and "s.h5" in r.stderr, r.stderr
    st = named_tiles(tmp_path / "st", lambda i: f"tile_({i * 256.0}, 0.0).jpg")
    tilefeat("extract", st, "-o", tmp_path / "u.h5", "--slide-mpp", "0.5", *COMMON)
    r = tilefeat("join", tmp_path / "u.h5", "-o", tmp_path / "d.csv", check=False)
    assert r.returncode == 3 and "--slide-mpp" in r.stderr, r.stderr
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "d.csv").exists()
