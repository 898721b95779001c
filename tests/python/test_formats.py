"""Issue 17: the HDF5 and Parquet feature files read with the tools users train with.

h5py reads the HDF5 file the way CLAM's and TRIDENT's feature loaders do (`features`,
`coords` and their attributes); pandas reads the Parquet file; both hold exactly the CSV's
values (the CSV's floats round-trip to the same float32) in the CSV's row order.
"""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import source_image

N = 13


@pytest.fixture(scope="module")
def histolab_tiles(tmp_path_factory):
    """Real tiles named as histolab names them: level 0, 448 px extent, 3 rows of 5."""
    im = source_image()
    d = tmp_path_factory.mktemp("histolab")
    for i in range(N):
        x, y = (i % 5) * 448, (i // 5) * 448
        crop = im[(i * 29) % 300 : (i * 29) % 300 + 224, (i * 41) % 300 : (i * 41) % 300 + 224]
        cv2.imwrite(str(d / f"tile_{i}_level0_{x}-{y}-{x + 448}-{y + 448}.png"), crop)
    return d


@pytest.fixture(scope="module")
def outputs(tilefeat, histolab_tiles, tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    files = {}
    for name, extra in [("f.csv", ["--coords", "auto"]), ("f.h5", []), ("f.parquet", [])]:
        sub = d / name.split(".")[1]
        sub.mkdir()
        files[name.split(".")[1]] = sub / name
        tilefeat("extract", histolab_tiles, "-o", sub / name, "--weights", "random:0", "--quiet", *extra)
    return files


def csv_frame(path):
    return pd.read_csv(path, index_col=0)


def test_hdf5_loads_as_clam_and_trident_do(outputs):
    csv = csv_frame(outputs["csv"])
    features = [str(k) for k in range(2048)]
    with h5py.File(outputs["h5"], "r") as f:
        # CLAM's Dataset_All_Bags / TRIDENT's loaders: f["features"][:], f["coords"][:].
        feats, coords = f["features"][:], f["coords"][:]
        assert feats.shape == (N, 2048) and feats.dtype == np.float32
        assert coords.shape == (N, 2) and coords.dtype == np.int64
        tiles = f["tiles"].asstr()[:]
        attrs = dict(f["coords"].attrs)
        root = dict(f.attrs)
    assert list(tiles) == list(csv.index)
    np.testing.assert_array_equal(feats, csv[features].to_numpy(np.float32))
    np.testing.assert_array_equal(coords, csv[["x", "y"]].to_numpy())
    assert coords[list(tiles).index("tile_1_level0_448-0-896-448.png")].tolist() == [448, 0]
    assert attrs["patch_size"] == 448 and attrs["patch_level"] == 0
    assert attrs["patch_size_level0"] == 448
    for key in ["encoder", "layer", "pool", "fingerprint", "weights_sha256", "tilefeat_version"]:
        assert key in root, key
    assert root["layer"] == "layer4" and root["pool"] == "max"


def test_parquet_equals_the_csv(outputs):
    csv = csv_frame(outputs["csv"])
    par = pd.read_parquet(outputs["parquet"]).set_index("tile")
    assert list(par.columns) == list(csv.columns)
    features = [str(k) for k in range(2048)]
    assert (par[features].dtypes == np.float32).all()
    assert par[["x", "y"]].dtypes.tolist() == [np.int64, np.int64]
    pd.testing.assert_frame_equal(par, csv.astype({c: np.float32 for c in features}))
    meta = pq.ParquetFile(outputs["parquet"]).metadata
    assert meta.num_rows == N
    assert meta.row_group(0).column(5).compression == "ZSTD"


def test_join_checks_hold_across_formats(tilefeat, outputs, tmp_path):
    # The three files are one sample (named after the folder): a duplicate ID is refused,
    # whatever the formats, and nothing is written.
    cohort = tmp_path / "cohort.parquet"
    r = tilefeat("join", outputs["csv"], outputs["h5"], "-o", cohort, check=False)
    assert r.returncode == 3 and "duplicate sample" in r.stderr, r.stderr
    assert not cohort.exists()


def test_cohort_parquet_matches_cohort_csv(tilefeat, histolab_tiles, tmp_path):
    paths = []
    for sample, ext in [("A", "h5"), ("B", "parquet"), ("C", "csv")]:
        p = tmp_path / f"{sample}.{ext}"
        tilefeat("extract", histolab_tiles, "-o", p, "--sample", sample, "--weights", "random:0",
                 "--quiet", "--coords", "auto")
        paths.append(p)
    tilefeat("join", *paths, "-o", tmp_path / "c.parquet", "--quiet")
    tilefeat("join", *paths, "-o", tmp_path / "c-csv.csv", "--quiet")
    par = pd.read_parquet(tmp_path / "c.parquet")
    csv = pd.read_csv(tmp_path / "c-csv.csv")
    features = [str(k) for k in range(2048)]
    assert list(par.columns[:4]) == ["sample", "tile", "x", "y"]
    pd.testing.assert_frame_equal(par, csv.astype({c: np.float32 for c in features}))
    assert par["sample"].tolist() == ["A"] * N + ["B"] * N + ["C"] * N


def test_parquet_files_carry_what_made_them(tilefeat, outputs, histolab_tiles, tmp_path):
    """Issue 29: per-sample and cohort Parquet files carry the provenance essentials as
    key-value metadata (read back with pyarrow), not only in the provenance file beside."""
    meta = pq.read_metadata(outputs["parquet"]).metadata
    kv = {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"tilefeat.")}
    for key in ["encoder", "layer", "pool", "normalize", "size", "precision", "fingerprint",
                "weights_sha256", "tilefeat_version", "sample", "feature_dim"]:
        assert key in {k.removeprefix("tilefeat.") for k in kv}, (key, kv)
    assert kv["tilefeat.feature_dim"] == "2048" and kv["tilefeat.layer"] == "layer4"
    assert kv["tilefeat.coords_convention"] == "histolab"
    assert kv["tilefeat.coords_origin"] == "top-left" and kv["tilefeat.coords_unit"] == "level-0 pixels"
    cohort = tmp_path / "c.parquet"
    tilefeat("join", outputs["parquet"], "-o", cohort, "--quiet")
    ckv = {k.decode(): v.decode() for k, v in pq.read_metadata(cohort).metadata.items()}
    assert ckv["tilefeat.fingerprint"] == kv["tilefeat.fingerprint"]
    assert ckv["tilefeat.coords_origin"] == "top-left" and ckv["tilefeat.aggregate"] == "none"
    # pandas still reads them as before.
    assert len(pd.read_parquet(cohort)) == N


BIG = 4_100  # over a Parquet row group (4,096 rows), 4 join blocks (1,024) and 512 HDF5 chunks (8 rows)


def test_every_format_across_its_block_boundaries(tilefeat, tmp_path):
    """Issue 27: every other format test has fewer rows than one HDF5 chunk, one join block
    and one Parquet row group. 4,100 tiles: the HDF5 and Parquet files hold the CSV's rows
    exactly (the Parquet file in two row groups), joining any of the three gives the same
    cohort bytes, the cohort Parquet (tile rows and per-sample aggregates) reads back equal to
    the cohort CSV, and the aggregates are the rows' mean and max."""
    im = source_image()
    tiles = tmp_path / "S"
    tiles.mkdir()
    for i in range(BIG):
        x, y = (i % 64) * 448, (i // 64) * 448
        oy, ox = (i * 29) % 400, (i * 41) % 400
        cv2.imwrite(str(tiles / f"tile_{i}_level0_{x}-{y}-{x + 448}-{y + 448}.png"), im[oy : oy + 16, ox : ox + 16])
    cache = tmp_path / "cache"
    files = {}
    for ext, extra in [("csv", ["--coords", "auto"]), ("h5", []), ("parquet", [])]:
        (tmp_path / ext).mkdir()
        files[ext] = tmp_path / ext / f"S.{ext}"
        # Computed once; the other formats are cache hits (the format is not in the key).
        tilefeat("extract", tiles, "-o", files[ext], "--weights", "random:0", "--size", "32",
                 "--batch-size", "64", "--cache-dir", cache, "--quiet", *extra)  # fmt: skip
    features = [str(k) for k in range(2048)]
    csv = pd.read_csv(files["csv"], index_col=0)
    assert csv.shape == (BIG, 2 + 2048)
    ref = csv[features].to_numpy(np.float32)
    with h5py.File(files["h5"], "r") as f:
        assert list(f["tiles"].asstr()[:]) == list(csv.index)
        np.testing.assert_array_equal(f["features"][:], ref)
        np.testing.assert_array_equal(f["coords"][:], csv[["x", "y"]].to_numpy())
    assert pq.ParquetFile(files["parquet"]).metadata.num_row_groups == 2
    par = pd.read_parquet(files["parquet"]).set_index("tile")
    pd.testing.assert_frame_equal(par, csv.astype({c: np.float32 for c in features}))

    cohorts = []
    for ext, path in files.items():
        tilefeat("join", path, "-o", tmp_path / f"cohort-{ext}.csv", "--quiet")
        cohorts.append((tmp_path / f"cohort-{ext}.csv").read_bytes())
    assert cohorts[0] == cohorts[1] == cohorts[2]
    cohort_csv = pd.read_csv(tmp_path / "cohort-csv.csv")
    assert len(cohort_csv) == BIG
    tilefeat("join", files["h5"], "-o", tmp_path / "cohort.parquet", "--quiet")
    assert pq.ParquetFile(tmp_path / "cohort.parquet").metadata.num_row_groups >= 2
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cohort.parquet"),
                                  cohort_csv.astype({c: np.float32 for c in features}))  # fmt: skip

    for aggregate, expected in [("mean", ref.astype(np.float64).mean(axis=0)), ("max", ref.max(axis=0))]:
        a_csv, a_par = tmp_path / f"{aggregate}-c.csv", tmp_path / f"{aggregate}-p.parquet"
        tilefeat("join", files["parquet"], "-o", a_csv, "--aggregate", aggregate, "--quiet")
        tilefeat("join", files["csv"], "-o", a_par, "--aggregate", aggregate, "--quiet")
        got_csv, got_par = pd.read_csv(a_csv), pd.read_parquet(a_par)
        assert len(got_csv) == 1 and got_csv["sample"].tolist() == ["S"], got_csv.columns[:5]
        pd.testing.assert_frame_equal(got_par, got_csv.astype({c: got_par[c].dtype for c in features}))
        values = got_csv[features].to_numpy(np.float64)[0]
        if aggregate == "max":
            np.testing.assert_array_equal(values.astype(np.float32), expected)
        else:
            # join sums in f64 and rounds each mean to f32 once (2^-24 relative), whatever the
            # CPU; rtol 1e-5 leaves room for the CSV's float text, atol for all-zero columns.
            np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
