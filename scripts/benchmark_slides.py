#!/usr/bin/env python3
"""tilefeat slide benchmark (issue 30): one synthetic Aperio SVS, one command, the same tiles
for everyone.

Prints tiles/s for
  1. tilefeat end-to-end on the slide: open, tissue detection, region reads, resize, model,
     HDF5 written (no cache, so no hashing), the whole process timed;
  2. tilefeat model-only (random input, same batch, precision, device and threads: the ceiling);
  3. the region-read cost per tile on one core (OpenSlide read + ARGB to RGB + resizes; `tilefeat
     bench --what decode` on the slide, nothing else running);
  4. the peers' path on the same slide and the same tiles (the coordinates tilefeat wrote):
     openslide-python in a torch `Dataset` (`read_region(...).convert("RGB")`, as CLAM's and
     TRIDENT's slide datasets read), OpenCV resizes, a `DataLoader` with --workers workers,
     batch --batch-size, torchvision's ResNet50 with the same weights and head (layer4, max
     pool, 224 px, mean = std = 0.5), the whole process timed (import, model, slide, loop);
and the ratios. The slide: the shared IHC image tiled with flips to --width x --height px at
0.25 µm/px ("40x"), levels at downsamples 1, 4, 16, JPEG tiles; the tiles: --magnification
(default 20: 512 level-0 px read at level 0 and resized to 256) with `--tissue none` (every grid
tile), so both sides compute the same tiles.

    .venv/bin/python scripts/benchmark_slides.py                      # CPU, fp32, here
    .venv/bin/python scripts/benchmark_slides.py --precision bf16     # where bf16 is fast (AMX)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))

# Run as a separate process (python -c), so that its time includes what a user's script pays.
PEERS = r"""
import sys, time
t0 = time.perf_counter()
import cv2, h5py, numpy as np, openslide, torch
sys.path.insert(0, {tests!r})
from tutorial_reference import load_model, pool, trunk

slide, h5, weights, batch, workers, threads, precision = {args!r}
torch.set_num_threads(threads)
with h5py.File(h5) as f:
    coords = f["coords"][:]
    level, read = int(f["coords"].attrs["patch_level"]), int(f["coords"].attrs["patch_size"])
patch = {patch}


class SlideDataset(torch.utils.data.Dataset):
    def __init__(self):
        self.wsi = None  # one handle per worker, opened there

    def __len__(self):
        return len(coords)

    def __getitem__(self, i):
        if self.wsi is None:
            self.wsi = openslide.OpenSlide(slide)
        x, y = (int(v) for v in coords[i])
        im = np.asarray(self.wsi.read_region((x, y), level, (read, read)).convert("RGB"))
        if read != patch:
            im = cv2.resize(im, (patch, patch), interpolation=cv2.INTER_LINEAR)
        im = cv2.resize(im, (224, 224), interpolation=cv2.INTER_LINEAR)
        t = torch.from_numpy(im).permute(2, 0, 1).float().div_(255)
        return (t - 0.5) / 0.5


dtype = {{"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}}[precision]
model = load_model(weights, "cpu").to(dtype=dtype)
dl = torch.utils.data.DataLoader(SlideDataset(), batch_size=batch, num_workers=workers)
n = 0
with torch.inference_mode():
    for x in dl:
        n += len(pool(trunk(model, x.to(dtype))["layer4"], "max"))
print(n, time.perf_counter() - t0)
"""


def run(cmd: list[str]) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout + r.stderr


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "unknown CPU")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(have) or 'no AVX2'}), {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--height", type=int, default=9216)
    ap.add_argument("--magnification", type=float, default=20)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers for the peers' path [default: --threads]")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tilefeat-bench-slides"))
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "tilefeat")
    ap.add_argument("--skip-python", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    from make_slides import canvas, write_aperio
    from tutorial_reference import make_random_weights

    a.workdir.mkdir(parents=True, exist_ok=True)
    slide = a.workdir / f"bench_{a.width}x{a.height}.svs"
    if not slide.exists():
        part = slide.with_suffix(".part.svs")
        write_aperio(part, canvas(a.width, a.height), "bench")
        part.rename(slide)
    weights = make_random_weights(a.workdir / "resnet50_random", seed=0)["zip"]
    common = ["--precision", a.precision, "--batch-size", a.batch_size, "--threads", a.threads, "--device", "cpu"]
    res: dict = {"cpu": cpu_model(), "slide": f"{a.width} x {a.height} px", "precision": a.precision,
                 "batch_size": a.batch_size, "threads": a.threads}

    print(run([a.bin, "info"]).strip())

    def model_only() -> float:
        b = run([a.bin, "bench", "--machine", "--batches", "12", "--warmup", "1", *common])
        return float(b.split("images_per_s=")[1].split()[0])

    # Model-only before and after the end-to-end run: the faster is the ceiling (a shared
    # machine's speed drifts by more than the gap being measured).
    res["model_only_runs"] = [model_only()]

    h5 = a.workdir / "slide.h5"
    t = time.perf_counter()
    run([a.bin, "extract", slide, "-o", h5, "--weights", weights, "--quiet", "--no-cache", "--tissue", "none",
         "--magnification", a.magnification, "--patch-size", a.patch_size, *common])
    secs = time.perf_counter() - t
    import yaml

    prov = yaml.safe_load(h5.with_suffix(".provenance.yaml").read_text())
    n = prov["tiles"]["written"]
    tm = prov["timings_s"]
    res["model_only_runs"].append(model_only())
    res["model_only"] = max(res["model_only_runs"])
    # The region cost on one core with nothing else running (`bench --what decode`: read,
    # ARGB to RGB, resize to the patch size and to 224 px), not the decode thread's time in
    # the run above, which competes with the model for the cores.
    res.update(tiles=n, level=prov["slide"]["level"], read_size=prov["slide"]["read_size"],
               end_to_end=n / secs, end_to_end_s=secs, timings_s=tm)
    # `bench` takes no slide flags: it tiles at tilefeat's defaults (20x, 256 px, CLAM's
    # tissue: every tile of this all-tissue slide but its edges), so only at those.
    if (a.magnification, a.patch_size) == (20, 256):
        dec = run([a.bin, "bench", "--what", "decode", "--tiles", slide, "--threads", "1"])
        row = next(l.split() for l in dec.splitlines() if l.split()[:1] == ["all"] or l.split()[:1] == ["png"])
        res["region_ms_per_tile"] = float(row[-2])

    if not a.skip_python:
        import torch  # noqa: F401  (fail here, not in the child, when torch is missing)

        args = (str(slide), str(h5), str(weights), a.batch_size, a.workers or a.threads, a.threads, a.precision)
        code = PEERS.format(tests=str(ROOT / "tests" / "python"), args=args, patch=a.patch_size)
        t = time.perf_counter()
        out = run([sys.executable, "-c", code]).split()
        py_secs = time.perf_counter() - t
        assert int(out[0]) == n, f"the peers' path computed {out[0]} tiles, tilefeat {n}"
        res.update(peers=n / py_secs, peers_s=py_secs)

    e2e, mo = res["end_to_end"], res["model_only"]
    print(f"\ntilefeat slide benchmark: {res['slide']} SVS, {n} tiles ({a.patch_size} px at {a.magnification}x, "
          f"read at level {res['level']} as {res['read_size']} px), {a.precision}, batch {a.batch_size}, "
          f"{a.threads} threads, on {res['cpu']}")
    print(f"  tilefeat end-to-end          {e2e:8.2f} tiles/s  ({e2e / mo:.2f}x model-only; {secs:.1f} s, whole process)")
    print(f"  tilefeat model-only          {mo:8.2f} tiles/s  (the faster of {', '.join(f'{v:.2f}' for v in res['model_only_runs'])}: before and after)")
    if "region_ms_per_tile" in res:
        r = res["region_ms_per_tile"]
        print(f"  region read + resize         {r:8.2f} ms/tile on one core  ({1e3 / r:.0f} tiles/s per core; the "
              f"model-only rate needs {mo * r / 1e3:.2f} cores of {os.cpu_count()}; `bench --what decode`)")
    else:
        print("  region read + resize: not measured (`bench --what decode` tiles at 20x and 256 px only)")
    if "peers" in res:
        p = res["peers"]
        print(f"  peers' path (openslide-python + DataLoader, {a.workers or a.threads} workers) {p:8.2f} tiles/s  "
              f"({res['peers_s']:.1f} s, whole process)  -> tilefeat {e2e / p:.2f}x")
    print(f"  tilefeat time per stage (s, summed over threads): {', '.join(f'{k}: {v}' for k, v in tm.items())}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
