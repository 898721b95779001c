"""tilefeat's features against the tutorial pipeline (OpenCV + torchvision), on real tiles.

Tolerance: for every tile, max |tilefeat - reference| / max |reference| <= 1e-4 on fp32 CPU.
With pixel-exact preprocessing the remaining difference is float summation order (BatchNorm
folded into the convolutions, oneDNN kernels); measured values are printed with -s.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from conftest import read_features
from tutorial_reference import batched_all

TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def reference(mixed_tiles, weights):
    return {norm: batched_all(mixed_tiles, weights["zip"], normalize=norm) for norm in ("tutorial", "imagenet")}


def rel_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)


@pytest.mark.parametrize("layer,pool", [("layer4", "max"), ("layer3", "avg")])
@pytest.mark.parametrize("norm", ["tutorial", "imagenet"])
def test_features_match_tutorial(tilefeat, tmp_path, mixed_tiles, weights, reference, layer, pool, norm):
    out = tmp_path / "f.csv"
    tilefeat("extract", mixed_tiles, "-o", out, "--weights", weights["zip"], "--layer", layer,
             "--pool", pool, "--normalize", norm, "--quiet")
    names, ours = read_features(out)
    ref_names, ref = reference[norm]
    assert names == ref_names
    ref = ref[(layer, pool)]
    assert ours.shape == ref.shape == (len(names), 2048 if layer == "layer4" else 1024)
    err = rel_err(ours, ref)
    print(f"{layer}/{pool}/{norm}: max relative error {err.max():.2e} over {len(names)} tiles")
    assert err.max() <= TOLERANCE, dict(zip(names, err))


def test_weights_formats_give_identical_csv(tilefeat, tmp_path, mixed_tiles, weights):
    outs = []
    for fmt in ("zip", "legacy", "safetensors"):
        out = tmp_path / f"{fmt}.csv"
        tilefeat("extract", mixed_tiles, "-o", out, "--weights", weights[fmt], "--quiet")
        outs.append(out)
    assert filecmp.cmp(outs[0], outs[1], shallow=False)
    assert filecmp.cmp(outs[0], outs[2], shallow=False)


def test_damaged_weights_are_refused(tilefeat, tmp_path, mixed_tiles, weights):
    """tilefeat reads torch.save's uncompressed zip entries where they lie in the file, after
    checking their CRC-32: a flipped byte in a tensor's data, or a legacy file cut short,
    is refused (exit 4, naming the file) instead of giving other numbers."""
    import struct
    import zipfile

    data = bytearray(weights["zip"].read_bytes())
    with zipfile.ZipFile(weights["zip"]) as z:
        entry = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len
    data[start + entry.file_size // 2] ^= 0xFF
    flipped = tmp_path / "flipped.pth"
    flipped.write_bytes(bytes(data))
    legacy = weights["legacy"].read_bytes()
    cut = tmp_path / "cut_legacy.pth"
    cut.write_bytes(legacy[: len(legacy) // 2])
    for bad in (flipped, cut):
        out = tmp_path / f"{bad.stem}.csv"
        r = tilefeat("extract", mixed_tiles, "-o", out, "--weights", bad, "--quiet", check=False)
        assert r.returncode == 4, r.stderr
        assert bad.name in r.stderr, r.stderr
        assert not out.exists()


def test_wrong_batchnorm_would_be_caught(mixed_tiles, weights, reference):
    """The weights' BatchNorm statistics matter: ignoring them moves features far beyond the
    tolerance, so the parity test above can see a BatchNorm bug."""
    import torch
    from tutorial_reference import load_model, pool, preprocess, trunk

    model = load_model(weights["zip"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    names, ref = reference["tutorial"]
    from tutorial_reference import find_tiles

    tile = find_tiles(mixed_tiles)[0]
    with torch.no_grad():
        wrong = pool(trunk(model, preprocess(tile).unsqueeze(0))["layer4"], "max").numpy()
    assert rel_err(wrong, ref[("layer4", "max")][:1]).max() > 100 * TOLERANCE
