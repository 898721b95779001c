"""The pixels tilefeat feeds the network equal OpenCV's, bit for bit: decode (cv2.imread),
resize (cv2.resize INTER_LINEAR, area for exact 2x), BGR->RGB."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import source_image


def reference_pixels(path, size):
    return cv2.cvtColor(cv2.resize(cv2.imread(str(path)), (size, size)), cv2.COLOR_BGR2RGB)


def tilefeat_pixels(tilefeat, path, size, tmp_path):
    out = tmp_path / "pp.png"
    tilefeat("preprocess", path, "-o", out, "--size", size)
    return cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("n", [224, 256, 300, 448, 512, 1000, 97, 225])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("size", [224, 256, 299])
def test_resized_pixels_equal_opencv(tilefeat, tmp_path, n, fmt, size):
    im = source_image()
    tile = im[:n, :n] if n <= im.shape[0] else cv2.resize(im, (n, n), interpolation=cv2.INTER_CUBIC)
    if n == 97:
        tile = im[:97, :131]  # not square
    p = tmp_path / f"tile.{fmt}"
    cv2.imwrite(str(p), tile)
    ours = tilefeat_pixels(tilefeat, p, size, tmp_path)
    ref = reference_pixels(p, size)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() == 0, f"{(diff > 0).mean():.2%} pixels differ, max {diff.max()}"


@pytest.mark.parametrize(
    "kind", ["gray", "rgba", "16bit", "tif", "jpg444", "jpg420_q50", "progressive", "cmyk", "cmyk_golden"]
)
def test_pixel_formats_equal_opencv(tilefeat, tmp_path, kind):
    im = source_image()[:300, :260]
    p = tmp_path / "x.png"
    if kind == "gray":
        cv2.imwrite(str(p), cv2.cvtColor(im, cv2.COLOR_BGR2GRAY))
    elif kind == "rgba":
        a = cv2.cvtColor(im, cv2.COLOR_BGR2BGRA)
        a[..., 3] = np.arange(a.shape[1], dtype=np.uint8)[None, :]
        cv2.imwrite(str(p), a)
    elif kind == "16bit":
        cv2.imwrite(str(p), im.astype(np.uint16) * 257 + 100)
    elif kind == "tif":
        p = tmp_path / "x.tif"
        cv2.imwrite(str(p), im)
    elif kind == "jpg444":
        p = tmp_path / "x.jpg"
        cv2.imwrite(str(p), im, [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    elif kind == "jpg420_q50":
        p = tmp_path / "x.jpg"
        cv2.imwrite(str(p), im, [cv2.IMWRITE_JPEG_QUALITY, 50])
    elif kind == "progressive":
        p = tmp_path / "x.jpg"
        cv2.imwrite(str(p), im, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    elif kind == "cmyk":
        # Adobe CMYK JPEG (inverted values), as PIL and Photoshop write it; cv2 reads it as
        # 3-channel BGR with its own CMYK formula, and so must tilefeat.
        from PIL import Image

        p = tmp_path / "x.jpg"
        Image.fromarray(cv2.cvtColor(im, cv2.COLOR_BGR2RGB)).convert("CMYK").save(p, quality=85)
        assert Image.open(p).mode == "CMYK"
    elif kind == "cmyk_golden":
        p = Path(__file__).resolve().parents[1] / "golden" / "cmyk.jpg"
    ours = tilefeat_pixels(tilefeat, p, 224, tmp_path)
    ref = reference_pixels(p, 224)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() == 0, f"{kind}: {(diff > 0).mean():.2%} pixels differ, max {diff.max()}"


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_missing_only_its_end_marker_reads_as_opencv_reads_it(tilefeat, tmp_path, progressive):
    """Issue 26 (18): a JPEG whose last two bytes (the end-of-image marker) are missing was
    refused; cv2.imread reads it with the same pixels as the whole file, and so does tilefeat.
    Cut anywhere inside its data, it is still refused."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, jpg = cv2.imencode(".jpg", source_image()[:300, :260], params)
    assert ok and jpg.tobytes()[-2:] == b"\xff\xd9"
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    whole.write_bytes(jpg.tobytes())
    cut.write_bytes(jpg.tobytes()[:-2])
    np.testing.assert_array_equal(cv2.imread(str(cut)), cv2.imread(str(whole)))
    np.testing.assert_array_equal(tilefeat_pixels(tilefeat, cut, 224, tmp_path), reference_pixels(whole, 224))
    half = tmp_path / "half.jpg"
    half.write_bytes(jpg.tobytes()[: len(jpg) * 3 // 4])
    r = tilefeat("preprocess", half, "-o", tmp_path / "h.png", check=False)
    assert r.returncode == 3 and "JPEG data ends before" in r.stderr, r.stderr
