"""Shared fixtures: the tilefeat binary, random-init weights, and real tiles of mixed sizes
and formats cropped from the shared IHC image (or the repo's demo tiles)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import urllib.request
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))


def tilefeat_bin() -> Path:
    return Path(os.environ.get("TILEFEAT_BIN", ROOT / "target" / "release" / "tilefeat"))


def peak_rss(args, tmp_path) -> tuple[int, str]:
    """Peak RSS (bytes) and stdout of `tilefeat args`, run from a child that reports wait4's
    rusage (the binary's own: a fresh child of a fresh Python reaps nothing else)."""
    code = (
        "import os, subprocess, sys\n"
        "with open(sys.argv[1], 'wb') as err:\n"
        "    p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=err)\n"
        "    out = p.stdout.read()\n"
        "    _, status, ru = os.wait4(p.pid, 0)\n"
        "sys.stdout.write(f'{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss}\\n')\n"
        "sys.stdout.buffer.write(out)\n"
    )
    err = tmp_path / "stderr.txt"
    r = subprocess.run([sys.executable, "-c", code, str(err), str(tilefeat_bin()), *map(str, args)],
                       capture_output=True, text=True)
    head, _, out = r.stdout.partition("\n")
    rc, kb = (int(v) for v in head.split())
    assert rc == 0, err.read_text()
    return kb * 1024, out


@pytest.fixture(scope="session")
def tilefeat():
    b = tilefeat_bin()
    if not b.exists():
        pytest.fail(f"{b} does not exist: build it first (scripts/setup.sh --no-demo)")

    def run(*args, check=True, **kw):
        args = list(map(str, args))
        # No default cache (tests of a cache give --cache-dir): runs compared with each other
        # must compute, not find each other's vectors in the cache beside their outputs.
        kw["env"] = {**kw.get("env", os.environ), "TILEFEAT_DEFAULT_CACHE": "0"}
        # On the CPU on a GPU host too (--device auto would pick the GPU), unless a test
        # names the device: these tests' promises are the CPU's.
        if args[:1] == ["extract"] and "--device" not in args:
            args += ["--device", "cpu"]
        r = subprocess.run([str(b), *args], capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"tilefeat {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}")
        return r

    return run


def source_image() -> np.ndarray:
    # The shared copy when present, else the repo's copy of the same image.
    for p in (ROOT.parent / "shared" / "data" / "ihc.png", ROOT / "demo" / "ihc.png"):
        if p.exists():
            return cv2.imread(str(p))
    raise FileNotFoundError("ihc.png not found in ../shared/data or demo/")


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    from tutorial_reference import make_random_weights

    d = tmp_path_factory.mktemp("weights")
    return make_random_weights(d / "resnet50_random", seed=0)


@pytest.fixture(scope="session")
def mixed_tiles(tmp_path_factory):
    """~20 real tiles: sizes 224..1000, PNG (RGB, gray, RGBA, 16-bit), JPEG (4:2:0, 4:4:4), TIFF."""
    im = source_image()
    h, w = im.shape[:2]
    d = tmp_path_factory.mktemp("tiles")
    (d / "sub").mkdir()
    rng = np.random.default_rng(0)

    def crop(n):
        if n > min(h, w):
            return cv2.resize(im, (n, n), interpolation=cv2.INTER_CUBIC)
        y, x = rng.integers(0, h - n + 1), rng.integers(0, w - n + 1)
        return im[y : y + n, x : x + n]

    k = 0
    for n in (224, 256, 300, 448, 512, 1000, 200, 333):
        cv2.imwrite(str(d / f"t{k:02d}_{n}.png"), crop(n)); k += 1
        cv2.imwrite(str(d / "sub" / f"t{k:02d}_{n}.jpg"), crop(n), [cv2.IMWRITE_JPEG_QUALITY, 90]); k += 1
    cv2.imwrite(str(d / f"t{k:02d}_gray.png"), cv2.cvtColor(crop(256), cv2.COLOR_BGR2GRAY)); k += 1
    rgba = cv2.cvtColor(crop(256), cv2.COLOR_BGR2BGRA); rgba[..., 3] = 128
    cv2.imwrite(str(d / f"t{k:02d}_rgba.png"), rgba); k += 1
    cv2.imwrite(str(d / f"t{k:02d}_16bit.png"), crop(256).astype(np.uint16) * 257 + 77); k += 1
    cv2.imwrite(str(d / f"t{k:02d}_444.jpg"), crop(240), [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]); k += 1
    cv2.imwrite(str(d / f"t{k:02d}.tif"), crop(256)); k += 1
    return d


def read_features(csv: Path):
    import pandas as pd

    df = pd.read_csv(csv, index_col=0)
    return list(df.index), df.to_numpy(dtype=np.float32)


def make_archive(folder: Path, archive: Path) -> Path:
    """The folder's files as a .zip, .tar, or gzipped tar (chosen by the suffix, in any
    case), member paths relative to the folder."""
    import tarfile
    import zipfile

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert files, f"{folder} holds no files"
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, p.relative_to(folder).as_posix())
    else:
        mode = "w:gz" if archive.name.lower().endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(archive, mode) as tf:
            for p in files:
                tf.add(p, p.relative_to(folder).as_posix())
    return archive


# openslide-python's own test slides (LGPL-2.1: downloaded, never committed), pinned by hash.
OPENSLIDE_SDIST = (
    "https://files.pythonhosted.org/packages/4d/b3/83f1a3d593f3e2a0c569ec284881eafed3424819342ea41b599c2433adbf/"
    "openslide_python-1.4.7.tar.gz",
    "730fed798de683b00c8ef4d956f3d429cc02f2c449eb0d58944e1769ba7983cc",
)
OPENSLIDE_FIXTURES = ("small.svs", "😐.svs", "boxes.tiff", "boxes_0.dcm", "boxes_1.dcm", "unopenable.tiff",
                      "unreadable.svs")


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """openslide-python 1.4.7's `tests/fixtures` (small.svs, boxes.tiff, boxes_0/1.dcm,
    unopenable.tiff, unreadable.svs, 😐.svs), fetched once from PyPI into target/test-data/.
    No network is a failure, not a skip: CI reaches PyPI (setup installs from it)."""
    url, sha = OPENSLIDE_SDIST
    dest = ROOT / "target" / "test-data" / "openslide-python-1.4.7"
    if not all((dest / f).is_file() for f in OPENSLIDE_FIXTURES):
        try:
            data = urllib.request.urlopen(url, timeout=120).read()
        except OSError as e:
            pytest.fail(f"cannot download openslide-python's test slides from {url}: {e}")
        assert hashlib.sha256(data).hexdigest() == sha, f"{url}: unexpected SHA-256"
        part = dest.with_name(dest.name + f".part{os.getpid()}")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.startswith("openslide_python-1.4.7/tests/fixtures/"):
                    (part / Path(m.name).name).write_bytes(t.extractfile(m).read())
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier copy
        try:
            part.rename(dest)
        except OSError:  # another process's copy got there first
            shutil.rmtree(part, ignore_errors=True)
    missing = [f for f in OPENSLIDE_FIXTURES if not (dest / f).is_file()]
    assert not missing, f"{dest}: {missing} missing after the download"
    return dest
