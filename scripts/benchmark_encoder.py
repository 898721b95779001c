#!/usr/bin/env python3
"""TorchScript encoders (`extract --model`) against PyTorch eager, on one machine in one run.

For a model exported by scripts/export_encoder.py (FILE.pt + FILE.json), at the same batch
size and thread count:
  model-only: PyTorch eager images/s (random input)   vs  `tilefeat bench --what model --model`
  end-to-end: eager loop (cv2.imread, resize, normalise, forward) vs `tilefeat extract --model`
and, with --native-weights W.pth for a ResNet50 trunk export, `tilefeat extract --weights W`
(the native trunk) on the same tiles. Prints one line per figure and the ratios.

  scripts/benchmark_encoder.py --model vit.pt --tiles DIR --batch-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def eager_model_only(module, size, batch, batches):
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        module(x)  # warm-up (oneDNN primitives made)
        t = time.perf_counter()
        for _ in range(batches):
            module(x)
    return batch * batches / (time.perf_counter() - t)


def eager_end_to_end(module, tiles, size, mean, std, batch):
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            imgs = []
            for p in tiles[i : i + batch]:
                im = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
                imgs.append(cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR))
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
            out = module((x - mean) / std)
            if out.dim() == 4:
                out = out.amax(dim=(2, 3))
    return len(tiles) / (time.perf_counter() - t)


def tilefeat_extract(binary, tiles_dir, extra, batch, threads):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "f.csv"
        subprocess.run([binary, "extract", tiles_dir, "-o", out, "--batch-size", str(batch),
                        "--threads", str(threads), "--quiet", *extra], check=True)
        p = yaml.safe_load(out.with_suffix(".provenance.yaml").read_text())
    t = p["timings_s"]
    return p["tiles"]["found"] / t["pipeline"], p.get("steady_tiles_per_s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--tiles", required=True, type=Path)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--native-weights", type=Path, help="torchvision .pth of the same ResNet50")
    ap.add_argument("--binary", default=str(ROOT / "target/release/tilefeat"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    side = json.loads(a.model.with_suffix(".json").read_text())
    size, mean, std = side["size"], side["mean"], side["std"]
    # PyTorch eager: the same architecture as a plain nn.Module (random init: speed only).
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import export_encoder as ex

    name = side.get("name") or ""
    if name == "resnet50_trunk":
        module = ex.build_resnet50_trunk(None, 0)[0].eval()
    elif side.get("source") == "torchvision":
        module = ex.build_torchvision_vit(name, None, 0, size)[0].eval()
    else:
        raise SystemExit(f"no eager builder for {name!r} ({side.get('source')}): torchvision models only")
    tiles = sorted(p for p in a.tiles.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = set(next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), []))
    print(f"CPU {cpu}; avx512f={'avx512f' in flags} avx512_bf16={'avx512_bf16' in flags}; "
          f"{a.threads} threads, batch {a.batch_size}, {len(tiles)} tiles, {a.model.name} ({side.get('name')})")

    e_model = eager_model_only(module, size, a.batch_size, a.batches)
    r = subprocess.run([a.binary, "bench", "--what", "model", "--model", a.model, "--device", "cpu",
                        "--batch-size", str(a.batch_size), "--threads", str(a.threads),
                        "--batches", str(a.batches), "--size", str(size), "--machine"],
                       check=True, capture_output=True, text=True)
    t_model = float(r.stdout.strip().split("=")[1])
    print(f"model-only  eager {e_model:.2f} img/s   tilefeat bench {t_model:.2f} img/s   ratio {t_model / e_model:.2f}")
    e_e2e = eager_end_to_end(module, tiles, size, mean, std, a.batch_size)
    t_e2e, steady = tilefeat_extract(a.binary, a.tiles, ["--model", a.model], a.batch_size, a.threads)
    print(f"end-to-end  eager {e_e2e:.2f} tiles/s  tilefeat extract {t_e2e:.2f} tiles/s (steady {steady})   ratio {t_e2e / e_e2e:.2f}")
    if a.native_weights:
        n_e2e, _ = tilefeat_extract(a.binary, a.tiles, ["--weights", a.native_weights], a.batch_size, a.threads)
        print(f"native ResNet50 trunk extract {n_e2e:.2f} tiles/s   TorchScript/native {t_e2e / n_e2e:.2f}")


if __name__ == "__main__":
    main()
