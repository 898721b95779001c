"""Issue 29: `.pt` feature bags read as CLAM's and slideflow's training code reads them.

CLAM's `Generic_MIL_Dataset` (datasets/dataset_generic.py, `__getitem__` without
`load_from_h5`) does `torch.load(os.path.join(data_dir, 'pt_files', f'{slide_id}.pt'))` and
uses the (N, D) float tensor as the bag; slideflow's MIL loaders (`mil/_load_bag`,
`Dataset.get_bags`) list `{slide}.pt` with `{slide}.index.npz` beside it and read the tile
locations as `np.load(index)['arr_0']` (level-0 tile centres). Both are re-done here from that
description (no code copied); torch.load runs with `weights_only=True`, which refuses anything
but tensors and plain containers.
"""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest
import torch

from conftest import source_image

N = 11


def named_tiles(d, name):
    im = source_image()
    d.mkdir()
    for i in range(N):
        crop = im[(i * 29) % 300 : (i * 29) % 300 + 96, (i * 41) % 300 : (i * 41) % 300 + 96]
        cv2.imwrite(str(d / name(i)), crop)
    return d


@pytest.fixture(scope="module")
def bags(tilefeat, tmp_path_factory):
    """histolab-named tiles (level 0, extent 448) as a .pt bag and as HDF5."""
    root = tmp_path_factory.mktemp("bags")
    tiles = named_tiles(root / "S1", lambda i: f"tile_{i}_level0_{(i % 4) * 448}-{(i // 4) * 448}-{(i % 4) * 448 + 448}-{(i // 4) * 448 + 448}.png")
    out = root / "out"
    (out / "pt_files").mkdir(parents=True)
    (out / "h5_files").mkdir()
    common = ["--weights", "random:0", "--quiet", "--size", "64"]
    tilefeat("extract", tiles, "-o", out / "pt_files" / "S1.pt", *common)
    tilefeat("extract", tiles, "-o", out / "h5_files" / "S1.h5", *common)
    return out


def test_clam_loads_the_bag_and_it_equals_the_hdf5_features(bags):
    bag = torch.load(bags / "pt_files" / "S1.pt", weights_only=True)
    assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32 and bag.shape == (N, 2048)
    assert bag.is_contiguous() and not bag.requires_grad
    with h5py.File(bags / "h5_files" / "S1.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
    # Bit for bit, in the same row order.
    np.testing.assert_array_equal(bag.numpy().view(np.uint32), feats.view(np.uint32))
    # slideflow: the index beside the bag holds each row's level-0 centre.
    index = np.load(bags / "pt_files" / "S1.index.npz")
    assert index.files == ["arr_0"]
    centres = index["arr_0"]
    assert centres.dtype == np.int64 and centres.shape == (N, 2)
    np.testing.assert_array_equal(centres, coords + 224)


def test_slideflow_finds_bag_and_index_pairs(bags):
    # Dataset.get_bags: every {slide}.pt in the folder; _load_bag: the bag and its index.
    pts = sorted(p for p in (bags / "pt_files").iterdir() if p.suffix == ".pt")
    assert [p.stem for p in pts] == ["S1"]
    for p in pts:
        bag = torch.load(p, weights_only=True)
        loc = np.load(p.with_suffix(".index.npz"))["arr_0"]
        assert len(loc) == len(bag)


def test_a_bag_without_coordinates_has_no_index(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "plain", lambda i: f"t{i:03d}.png")
    r = tilefeat("extract", tiles, "-o", tmp_path / "p.pt", "--weights", "random:0", "--size", "64")
    assert torch.load(tmp_path / "p.pt", weights_only=True).shape == (N, 2048)
    assert not (tmp_path / "p.index.npz").exists()
    assert "no tile coordinates" in r.stderr, r.stderr


def test_top_left_corners_of_unknown_extent_give_no_index_and_say_why(tilefeat, tmp_path):
    tiles = named_tiles(tmp_path / "trident", lambda i: f"{i:06d}_x{i * 512}_y0.png")
    r = tilefeat("extract", tiles, "-o", tmp_path / "t.pt", "--weights", "random:0", "--size", "64")
    assert "t.index.npz" in r.stderr and "--patch-size-level0" in r.stderr, r.stderr
    assert not (tmp_path / "t.index.npz").exists()
    tilefeat("extract", tiles, "-o", tmp_path / "u.pt", "--weights", "random:0", "--size", "64",
             "--patch-size-level0", "512", "--quiet")
    centres = np.load(tmp_path / "u.index.npz")["arr_0"]
    np.testing.assert_array_equal(centres, [[i * 512 + 256, 256] for i in range(N)])


def test_an_empty_bag_loads_as_zero_rows(tilefeat, tmp_path):
    tiles = tmp_path / "bad"
    tiles.mkdir()
    (tiles / "a.png").write_bytes(b"not a png")
    tilefeat("extract", tiles, "-o", tmp_path / "e.pt", "--weights", "random:0", "--size", "64",
             "--on-error", "skip", "--quiet")
    assert torch.load(tmp_path / "e.pt", weights_only=True).shape == (0, 2048)


def test_join_refuses_a_bag_naming_why(tilefeat, bags, tmp_path):
    r = tilefeat("join", bags / "pt_files" / "S1.pt", "-o", tmp_path / "c.csv", check=False)
    assert r.returncode == 3 and "holds no tile names" in r.stderr, r.stderr
    assert not (tmp_path / "c.csv").exists()


def test_a_bag_written_without_index_takes_the_old_index_away(tilefeat, tmp_path):
    """Regression (review): a bag written again without coordinates left the previous run's
    index beside it (another N, other tiles), which slideflow would pair with the new bag."""
    tiles = named_tiles(tmp_path / "hl", lambda i: f"tile_{i}_level0_{i * 448}-0-{i * 448 + 448}-448.png")
    common = ["--weights", "random:0", "--size", "64", "--quiet"]
    tilefeat("extract", tiles, "-o", tmp_path / "S.pt", *common)
    assert (tmp_path / "S.index.npz").exists()
    tilefeat("extract", tiles, "-o", tmp_path / "S.pt", "--coords", "none", *common)
    assert torch.load(tmp_path / "S.pt", weights_only=True).shape == (N, 2048)
    assert not (tmp_path / "S.index.npz").exists()
