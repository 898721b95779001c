"""Test slides made from the shared IHC image (tifffile + imagecodecs), small enough for CI.

    python tests/python/make_slides.py OUTDIR

writes, in OUTDIR:
* `aperio.svs`: an Aperio-like SVS (ImageDescription `Aperio Image Library ...|AppMag = 40|MPP
  = 0.25`), 3000 x 2000 px, levels at downsamples 1, 4 and ~16, tiled JPEG in RGB;
* `generic.tiff`: a generic pyramidal TIFF (levels 1, 2, 4), resolution tags 40000 px/cm
  (0.25 µm/px);
* `single.tiff`: one level, 1200 x 900 px, 20000 px/cm (0.5 µm/px);
* `dpi72.tiff`: one level with a 72-dpi resolution (352.78 µm/px: not a microscope's);
* `corrupt.svs`: `aperio.svs` with level 0's first JPEG tile (level-0 x, y < 256) zeroed.

Level 0 is the IHC image tiled with flips, shifted so that tiles never line up with it. JPEG
in RGB (`compression="jpeg"`, photometric RGB): `photometric="ycbcr"` would make tifffile take
the pixels as YCbCr already (wrong colours).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[2]
MPP = 0.25


def source_rgb() -> np.ndarray:
    for p in (ROOT.parent / "shared" / "data" / "ihc.png", ROOT / "demo" / "ihc.png"):
        if p.exists():
            return cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
    raise FileNotFoundError("ihc.png not found in ../shared/data or demo/")


def canvas(width: int, height: int) -> np.ndarray:
    """The IHC image tiled (flipped in turn) over width x height, shifted by (137, 59)."""
    im = source_rgb()
    h, w = im.shape[:2]
    rows = []
    for r in range(height // h + 2):
        row = []
        for c in range(width // w + 2):
            t = im
            if c % 2:
                t = t[:, ::-1]
            if r % 2:
                t = t[::-1]
            row.append(t)
        rows.append(np.concatenate(row, axis=1))
    big = np.concatenate(rows, axis=0)
    return np.ascontiguousarray(big[59 : 59 + height, 137 : 137 + width])


def pyramid(level0: np.ndarray, downsamples: list[int]) -> list[np.ndarray]:
    h, w = level0.shape[:2]
    out = [level0]
    for d in downsamples[1:]:
        out.append(cv2.resize(level0, (max(1, round(w / d)), max(1, round(h / d))), interpolation=cv2.INTER_AREA))
    return out


def write_aperio(path: Path, level0: np.ndarray, name: str, extra: str = "") -> None:
    """`level0` as an Aperio-like SVS: levels at downsamples 1, 4 and 16, tiled JPEG in RGB,
    the ImageDescription Aperio writes (`AppMag = 40`, `MPP`; `extra` fields before them)."""
    h, w = level0.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
        f"|AppMag = 40{extra}|ScanScope ID = TILEFEAT|Filename = {name}|MPP = {MPP}"
    )
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k, lv in enumerate(pyramid(level0, [1, 4, 16])):
            tif.write(
                lv,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                description=desc if k == 0 else f"Aperio Image Library v12.0.15\r\n{w}x{h} -> {lv.shape[1]}x{lv.shape[0]}",
                metadata=None,
                subfiletype=0 if k == 0 else 1,
            )


def write_svs(path: Path) -> None:
    write_aperio(path, canvas(3000, 2000), "aperio", "|StripeWidth = 1000")


def write_tiff(path: Path, level0: np.ndarray, downsamples: list[int], resolution, unit: str) -> None:
    with tifffile.TiffWriter(path) as tif:
        for k, lv in enumerate(pyramid(level0, downsamples)):
            tif.write(
                lv,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                resolution=resolution,
                resolutionunit=unit,
                metadata=None,
                subfiletype=0 if k == 0 else 1,
            )


def tissue_canvas(width: int, height: int, pieces, holes, seed: int = 7) -> np.ndarray:
    """A near-white, faintly noisy glass background (saturation a few units: below CLAM's
    threshold of 8) with tissue `pieces` (x, y, w, h: the IHC image) and `holes` (x, y, w,
    h: glass again, inside a piece)."""
    rng = np.random.default_rng(seed)
    glass = np.clip(238 + rng.normal(0, 2.0, (height, width, 1)), 0, 255).astype(np.uint8)
    out = np.repeat(glass, 3, axis=2)
    out[..., 2] = np.clip(out[..., 2].astype(np.int16) + 2, 0, 255).astype(np.uint8)
    # The IHC image on a pink (eosin-like) ground: saturated everywhere, as stained tissue is,
    # so each piece is one region rather than the IHC image's own islands.
    ihc = canvas(max(p[2] for p in pieces), max(p[3] for p in pieces)).astype(np.float32)
    pink = np.array([225, 140, 185], np.float32)
    tissue = np.round(0.6 * ihc + 0.4 * pink).astype(np.uint8)
    for x, y, w, h in pieces:
        out[y : y + h, x : x + w] = tissue[:h, :w]
    for x, y, w, h in holes:
        out[y : y + h, x : x + w] = np.repeat(glass[y : y + h, x : x + w], 3, axis=2)
    return out


TISSUE_LAYOUT = dict(
    pieces=[(500, 800, 6400, 5600), (7200, 1200, 2600, 2500), (8400, 6200, 400, 400)],
    holes=[(2300, 2300, 2400, 2400)],
)


def write_tissue_svs(path: Path) -> dict:
    """An Aperio-like SVS (0.25 µm/px, levels 1/4/16) of 10240 x 7680 px: a large piece of
    tissue (6400 x 5600 less its hole: over CLAM's default minimum of 100 x 512^2 level-0 px)
    with a hole (2400 x 2400, over its minimum hole of 16 x 512^2), a smaller piece (2600 x
    2500: under the default minimum, over the `tcga` preset's 16 x 512^2) and a speck under
    both."""
    write_aperio(path, tissue_canvas(10240, 7680, **TISSUE_LAYOUT), "tissue")
    return TISSUE_LAYOUT


def corrupt_copy(src: Path, dst: Path, page: int = 0, tile: int = 0) -> None:
    """`src` with one tile's compressed bytes zeroed (not a JPEG any more)."""
    import shutil

    shutil.copyfile(src, dst)
    with tifffile.TiffFile(dst) as t:
        offset, count = t.pages[page].dataoffsets[tile], t.pages[page].databytecounts[tile]
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(bytes(count))


def write_flat_tiff(path: Path, width: int, height: int, tissue: tuple[int, int, int, int],
                    tile: tuple[int, int] = (512, 128)) -> None:
    """A huge one-level tiled TIFF (no pyramid) in a few MB: near-white (245) but for a pink
    rectangle `tissue` (x, y, w, h, in whole tiles' level-0 px). Every tile's offset points to
    one of two deflate-compressed tiles (TIFF allows shared data), so 100,000 x 80,000 px take
    ~1 MB on disk while a reader must still decode every tile. No resolution tags: such a
    slide needs --slide-mpp. Written by hand: tifffile would store every tile."""
    import struct
    import zlib

    tw, th = tile
    cols, rows = -(-width // tw), -(-height // th)
    blank = zlib.compress(np.full((th, tw, 3), 245, np.uint8).tobytes(), 9)
    pink = zlib.compress(np.broadcast_to(np.array([200, 110, 170], np.uint8), (th, tw, 3)).tobytes(), 9)
    tx, ty, tw_px, th_px = tissue
    assert tx % tw == 0 and ty % th == 0 and tw_px % tw == 0 and th_px % th == 0, "tissue in whole tiles"
    n = cols * rows
    # Layout: header, the two tiles' data, BitsPerSample, offsets, byte counts, then the IFD.
    data_at = 8
    pink_at = data_at + len(blank)
    bps_at = pink_at + len(pink)
    offsets_at = bps_at + 6
    counts_at = offsets_at + 4 * n
    ifd_at = counts_at + 4 * n
    offsets = np.full(n, data_at, "<u4")
    counts = np.full(n, len(blank), "<u4")
    for r in range(ty // th, (ty + th_px) // th):
        for c in range(tx // tw, (tx + tw_px) // tw):
            offsets[r * cols + c] = pink_at
            counts[r * cols + c] = len(pink)
    LONG, SHORT = 4, 3
    tags = [
        (256, LONG, 1, width), (257, LONG, 1, height), (258, SHORT, 3, bps_at), (259, SHORT, 1, 8),
        (262, SHORT, 1, 2), (277, SHORT, 1, 3), (284, SHORT, 1, 1), (322, LONG, 1, tw), (323, LONG, 1, th),
        (324, LONG, n, offsets_at), (325, LONG, n, counts_at),
    ]
    with open(path, "wb") as f:
        f.write(struct.pack("<2sHI", b"II", 42, ifd_at))
        f.write(blank + pink + struct.pack("<3H", 8, 8, 8))
        f.write(offsets.tobytes() + counts.tobytes())
        f.write(struct.pack("<H", len(tags)))
        for tag, typ, count, value in tags:
            f.write(struct.pack("<HHII", tag, typ, count, value))
        f.write(struct.pack("<I", 0))


def make_all(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    names = ("aperio.svs", "generic.tiff", "single.tiff", "dpi72.tiff", "corrupt.svs")
    paths = {name: out / name for name in names}
    write_svs(paths["aperio.svs"])
    corrupt_copy(paths["aperio.svs"], paths["corrupt.svs"])
    write_tiff(paths["generic.tiff"], canvas(2048, 1536), [1, 2, 4], (1e4 / MPP, 1e4 / MPP), "CENTIMETER")
    write_tiff(paths["single.tiff"], canvas(1200, 900), [1], (2e4, 2e4), "CENTIMETER")
    write_tiff(paths["dpi72.tiff"], canvas(1024, 768), [1], (72, 72), "INCH")
    return paths


def check(paths: dict[str, Path]) -> None:
    """openslide-python opens each one and says what it should."""
    import openslide

    s = openslide.OpenSlide(paths["aperio.svs"])
    assert s.properties["openslide.vendor"] == "aperio", s.properties["openslide.vendor"]
    assert float(s.properties["openslide.mpp-x"]) == MPP
    assert s.properties["openslide.objective-power"] == "40"
    assert s.level_count == 3 and s.dimensions == (3000, 2000), (s.level_count, s.dimensions)
    assert s.level_downsamples[1] == 4.0, s.level_downsamples
    g = openslide.OpenSlide(paths["generic.tiff"])
    assert g.properties["openslide.vendor"] == "generic-tiff"
    assert g.level_count == 3 and g.level_downsamples[:2] == (1.0, 2.0), g.level_downsamples
    one = openslide.OpenSlide(paths["single.tiff"])
    assert one.level_count == 1 and one.dimensions == (1200, 900)
    bad = openslide.OpenSlide(paths["corrupt.svs"])
    try:
        bad.read_region((0, 0), 0, (256, 256))
        raise AssertionError("corrupt.svs's first tile reads")
    except openslide.OpenSlideError:
        pass
    assert openslide.OpenSlide(paths["corrupt.svs"]).read_region((256, 0), 0, (256, 256)).size == (256, 256)
    dpi = openslide.OpenSlide(paths["dpi72.tiff"])
    assert dpi.properties.get("tiff.ResolutionUnit") == "inch", dict(dpi.properties)


if __name__ == "__main__":
    made = make_all(Path(sys.argv[1] if len(sys.argv) > 1 else "slides"))
    check(made)
    for p in made.values():
        print(p)
