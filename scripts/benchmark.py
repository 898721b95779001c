#!/usr/bin/env python3
"""tilefeat throughput benchmark: one command, one run, the same tiles for everyone.

Prints tiles/s for
  1. tilefeat end-to-end (read, decode, resize, model, write; no cache, so no hashing),
  2. tilefeat model-only (random input, same batch, precision and device: the ceiling),
     and the pipeline without the network (the most the CPU side can feed a device),
  3. the Python tutorial loop (one tile at a time, cv2 + torchvision, as the notebook),
  4. the batched Python DataLoader pipeline (bf16 on a GPU, like tilefeat's --precision),
and their ratios; with --cache also a cached rerun, SHA-256 speed and a 1M-entry cache open.
On a GPU a few thousand tiles take a second or two, about what one process spends starting
(CUDA context, weights, the first batches): --repeat R also runs end-to-end on the tiles linked
R times, a slide-sized run, and reports its marginal rate (the extra tiles over the extra
time) and its steady state once warm (from its provenance: computed tiles per second from the
moment every model worker had its first batch back to the last batch back, the figure to
hold against model-only, which excludes its warm-up batches too).

    .venv/bin/python scripts/benchmark.py                       # CPU, here
    .venv/bin/python scripts/benchmark.py --device cuda --precision bf16 --batch-size 256 \
        --tiles 4000 --repeat 12

The Python baselines are slow on a CPU (the tutorial loop measured ~16 tiles/s and the
DataLoader ~11 on this project's 2-core machine), so by default they run on the first
--python-tiles tiles (all tiles on a GPU); throughput is tiles/s either way and the report
says how many tiles each row used. Results also go to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))


def make_tiles(folder: Path, n: int, source: Path) -> None:
    """n distinct 256 px tiles, half PNG, half JPEG, cropped (and flipped/rotated) from a
    real IHC image."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.iterdir())) >= n:
        return
    im = cv2.imread(str(source))
    if im is None:
        raise SystemExit(f"cannot read {source}")
    h, w = im.shape[:2]
    rng = np.random.default_rng(0)
    for i in range(n):
        y, x = rng.integers(0, h - 256 + 1), rng.integers(0, w - 256 + 1)
        t = np.rot90(im[y : y + 256, x : x + 256], k=i % 4).copy()
        if (i // 4) % 2:
            t = t[:, ::-1].copy()
        if i % 2:
            cv2.imwrite(str(folder / f"tile_{i:05d}.jpg"), t, [cv2.IMWRITE_JPEG_QUALITY, 90])
        else:
            cv2.imwrite(str(folder / f"tile_{i:05d}.png"), t)


def link_copies(src: Path, dest: Path, copies: int) -> int:
    """dest/K_NAME -> src/NAME for every file of src and K < copies (a slide-sized folder of
    the same tiles; existing links are kept). Returns how many tiles dest then holds."""
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src.iterdir())
    for k in range(copies):
        for n in names:
            link = dest / f"{k}_{n}"
            if not link.exists():
                os.symlink(src / n, link)
    return copies * len(names)


def run(cmd: list[str], env=None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout + r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--python-tiles", type=int, default=None, help="tiles for the Python baselines")
    ap.add_argument("--python-workers", type=int, default=None, help="DataLoader workers")
    ap.add_argument("--dataloader-tiles", type=int, default=None,
                    help="tiles for the DataLoader pipeline (default: --python-tiles); with --repeat, up to "
                    "--tiles x --repeat, taken from the linked folder, so it can run on tilefeat's slide-sized run's tiles")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tilefeat-bench"))
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "tilefeat")
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "ihc.png")
    ap.add_argument("--cache", action="store_true", help="also benchmark the cache (rerun, SHA-256, 1M-entry open)")
    ap.add_argument("--repeat", type=int, default=1, help="also run end-to-end on the tiles linked this many times")
    ap.add_argument("--skip-python", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from tutorial_reference import dataloader_pipeline, load_model, make_random_weights, tutorial_loop

    gpu = a.device.startswith("cuda")
    threads = a.threads or os.cpu_count()
    torch.set_num_threads(threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    tiles = a.workdir / f"tiles{a.tiles}"
    source = a.source if a.source.exists() else ROOT / "demo" / "ihc.png"
    make_tiles(tiles, a.tiles, source)
    n_tiles = len(list(tiles.iterdir()))  # --tiles, or more if the folder already held more
    weights = make_random_weights(a.workdir / "resnet50_random", seed=0)["zip"]
    results: dict = {"device": a.device, "precision": a.precision, "batch_size": a.batch_size, "tiles": n_tiles, "threads": threads}
    common = ["--device", a.device, "--precision", a.precision, "--batch-size", str(a.batch_size), "--threads", str(threads)]

    print(run([str(a.bin), "info"]).strip())
    # 2. model-only (also warms the page cache and cuDNN for the end-to-end run below).
    b = run([str(a.bin), "bench", "--machine", "--batches", "30" if gpu else "6", "--warmup", "5" if gpu else "1", *common])
    results["tilefeat_model_only"] = float(b.split("images_per_s=")[1].split()[0])

    # 1. end-to-end, uncached.
    out = a.workdir / "features.csv"
    t = time.perf_counter()
    run([str(a.bin), "extract", str(tiles), "-o", str(out), "--weights", str(weights), "--quiet", "--no-cache", *common])
    secs = time.perf_counter() - t
    results["tilefeat_end_to_end"] = n_tiles / secs
    if a.repeat > 1:
        big = a.workdir / f"tiles{a.tiles}x{a.repeat}"
        n_big = link_copies(tiles, big, a.repeat)
        t = time.perf_counter()
        run([str(a.bin), "extract", str(big), "-o", str(a.workdir / "features_big.csv"), "--weights", str(weights), "--quiet", "--no-cache", *common])
        secs_big = time.perf_counter() - t
        results["repeat"] = a.repeat
        results["tilefeat_end_to_end_repeat"] = n_big / secs_big
        # Start-up costs both runs the same: what is left is what each further tile costs.
        results["tilefeat_steady_state"] = (n_big - n_tiles) / max(secs_big - secs, 1e-9)
        prov_big = (a.workdir / "features_big.provenance.yaml").read_text()
        warm = [l.split(": ", 1)[1] for l in prov_big.splitlines() if l.startswith("steady_tiles_per_s: ")]
        if warm:
            results["tilefeat_once_warm"] = float(warm[0])
    prov = (a.workdir / "features.provenance.yaml").read_text()
    # The indented lines of the provenance's `timings_s:` block (no YAML module needed on the
    # GPU machine).
    block = []
    for line in prov.split("\ntimings_s:\n", 1)[1].splitlines():
        if not line.startswith(" "):
            break
        block.append(line.strip())
    results["tilefeat_profile"] = "\n".join(block)
    timings = dict(l.split(": ", 1) for l in block)
    # Pipeline: from the first tile read to the last row written, without start-up (weights,
    # model build, CUDA context) but with the model workers' first batches (on a GPU: kernels
    # loaded, cuDNN plans built); a long run converges to it.
    results["tilefeat_pipeline"] = n_tiles / max(float(timings["pipeline"]), 1e-9)
    # What the decode workers reach without the model: per core, then on all threads.
    dec = run([str(a.bin), "bench", "--what", "decode", "--tiles", str(tiles), "--threads", str(threads)])
    results["decode_bench"] = dec.strip()
    per_core = [l.split() for l in dec.splitlines() if l.split()[:1] in (["all"], ["png"], ["jpeg"])]
    results["decode_tiles_per_s_per_core"] = {r[0]: float(r[-1]) for r in per_core}
    # The whole pipeline with a stand-in for the network (as `extract --device cuda` splits
    # the threads: all but one decode): the most this host can feed any device.
    pipe = run([str(a.bin), "bench", "--what", "pipeline", "--tiles", str(tiles), "--batch-size", str(a.batch_size), "--machine"])
    results["pipeline_without_network"] = float(pipe.split("tiles_per_s=")[1].split()[0])

    if not a.skip_python:
        n_py = a.python_tiles or (a.tiles if gpu else 120)
        py_tiles = a.workdir / f"pytiles{n_py}"
        if py_tiles.exists():
            shutil.rmtree(py_tiles)
        py_tiles.mkdir()
        for p in sorted(tiles.iterdir())[:n_py]:
            os.symlink(p, py_tiles / p.name)
        n_dl = a.dataloader_tiles or n_py
        dl_tiles = py_tiles
        if n_dl != n_py:
            src = big if (a.repeat > 1 and n_dl > n_tiles) else tiles
            dl_tiles = a.workdir / f"dltiles{n_dl}"
            if dl_tiles.exists():
                shutil.rmtree(dl_tiles)
            dl_tiles.mkdir()
            picked = sorted(p for p in src.rglob("*") if p.is_file())[:n_dl]
            for k, p in enumerate(picked):
                os.symlink(p.resolve(), dl_tiles / f"{k:06d}_{p.name}")
            n_dl = len(picked)
        model = load_model(weights, a.device)
        t = time.perf_counter()
        tutorial_loop(py_tiles, weights, device=a.device, model=model)
        if gpu:
            torch.cuda.synchronize()
        results["python_tutorial_loop"] = n_py / (time.perf_counter() - t)
        py_prec = "bf16" if gpu else "fp32"
        workers = a.python_workers or (min(8, threads) if gpu else threads)
        t = time.perf_counter()
        dataloader_pipeline(dl_tiles, weights, device=a.device, batch=a.batch_size, workers=workers, precision=py_prec, model=load_model(weights, a.device))
        results["python_dataloader"] = n_dl / (time.perf_counter() - t)
        results["python_dataloader_precision"] = py_prec
        results["python_tiles"] = n_py
        results["python_dataloader_tiles"] = n_dl

    if a.cache:
        cache = a.workdir / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        t = time.perf_counter()
        run([str(a.bin), "extract", str(tiles), "-o", str(out), "--weights", str(weights), "--quiet", "--cache-dir", str(cache), *common])
        first = time.perf_counter() - t
        t = time.perf_counter()
        run([str(a.bin), "extract", str(tiles), "-o", str(out), "--weights", str(weights), "--quiet", "--cache-dir", str(cache), *common])
        second = time.perf_counter() - t
        results["cache_first_run_s"] = first
        results["cache_second_run_s"] = second
        results["cache_speedup"] = first / second
        results["sha256"] = run([str(a.bin), "bench", "--what", "hash"]).strip()
        big = a.workdir / "cache1m"
        # Fills once, measures in a fresh process, gc, measures again (one line each).
        results["cache_open_1m"] = run([str(a.bin), "bench", "--what", "cache-open", "--cache-dir", str(big)]).strip()

    # Report.
    e2e, mo = results["tilefeat_end_to_end"], results["tilefeat_model_only"]
    print(f"\ntilefeat benchmark: {n_tiles} tiles of 256 px (PNG+JPEG), device {a.device}, {a.precision}, batch {a.batch_size}, {threads} threads")
    print(f"  tilefeat end-to-end         {e2e:9.2f} tiles/s   ({e2e / mo:.2f}x model-only)")
    pl = results["tilefeat_pipeline"]
    print(f"  tilefeat pipeline only      {pl:9.2f} tiles/s   ({pl / mo:.2f}x model-only; end-to-end without start-up)")
    if "repeat" in results:
        rep, st = results["tilefeat_end_to_end_repeat"], results["tilefeat_steady_state"]
        print(f"  tilefeat end-to-end x{a.repeat:<4}    {rep:9.2f} tiles/s   ({rep / mo:.2f}x model-only; the tiles linked {a.repeat} times, {a.repeat * n_tiles} tiles)")
        print(f"  tilefeat marginal rate      {st:9.2f} tiles/s   ({st / mo:.2f}x model-only; x{a.repeat} against x1: the extra tiles over the extra time)")
        if "tilefeat_once_warm" in results:
            w = results["tilefeat_once_warm"]
            print(f"  tilefeat x{a.repeat} once warm      {w:9.2f} tiles/s   ({w / mo:.2f}x model-only; from the last worker's first batch to the last batch, as model-only excludes its warm-up)")
    print(f"  tilefeat model-only         {mo:9.2f} tiles/s")
    dpc = results["decode_tiles_per_s_per_core"]
    if "all" in dpc:
        print(f"  decoders (read+hash+decode+resize): {dpc['all']:.0f} tiles/s per core "
              f"({', '.join(f'{k} {v:.0f}' for k, v in dpc.items() if k != 'all')}); "
              f"the model-only rate needs {mo / dpc['all']:.2f} such cores")
    pn = results["pipeline_without_network"]
    print(f"  pipeline without the network {pn:8.0f} tiles/s   (all cores but one decoding; the most this host can feed a device: {pn / mo:.2f}x model-only)")
    if "python_tutorial_loop" in results:
        n, n_dl = results["python_tiles"], results["python_dataloader_tiles"]
        tl, dl = results["python_tutorial_loop"], results["python_dataloader"]
        print(f"  python tutorial loop        {tl:9.2f} tiles/s   (fp32, batch 1, {n} tiles)  -> tilefeat {e2e / tl:.1f}x")
        # Against tilefeat's run on as many tiles, where there is one.
        tf = {n_tiles: e2e, results.get("repeat", 1) * n_tiles: results.get("tilefeat_end_to_end_repeat", e2e)}.get(n_dl)
        vs = f"  -> tilefeat {tf / dl:.1f}x (on as many tiles)" if tf else ""
        print(f"  python DataLoader pipeline  {dl:9.2f} tiles/s   ({results['python_dataloader_precision']}, batch {a.batch_size}, {n_dl} tiles){vs}")
        if "repeat" in results:
            same = " (the same tiles)" if n_dl == a.repeat * n_tiles else ""
            print(f"  tilefeat end-to-end x{a.repeat} against them: {rep / tl:.1f}x the tutorial loop, {rep / dl:.1f}x the DataLoader{same}")
    print(f"  tilefeat time per stage (s, summed over threads): {results['tilefeat_profile'].replace(chr(10), ', ')}")
    if a.cache:
        print(f"  cache: first run {results['cache_first_run_s']:.1f} s, unchanged rerun {results['cache_second_run_s']:.2f} s -> {results['cache_speedup']:.0f}x")
        print(f"  {results['sha256']}")
        print("  " + results["cache_open_1m"].replace("\n", "\n  "))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
