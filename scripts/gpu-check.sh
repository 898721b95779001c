#!/usr/bin/env bash
# GPU check, in one go: run on a GPU machine from the repo root, with the release binary built
# on a CPU machine (scripts/setup.sh --build-only) and carried along. Uses that machine's
# python3 with torch 2.11.0 (+ torchvision, opencv, pandas) and its torch libraries.
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# Prints, and writes to OUT_DIR/gpu-report.txt (and gpu-longrun.txt): GPU and libtorch info;
# proof that `--device cuda` runs on the GPU; GPU features vs the tutorial pipeline on the GPU
# and vs tilefeat on the CPU; bf16/fp16 precision effects against fp32; model-only throughput
# (fp32, fp16, bf16 at batch 256) and warm-up; process start-up; the full benchmark (tilefeat
# end-to-end on 4,000 tiles and on 48,000, its steady state, start-up split, model-only,
# Python tutorial loop and bf16 DataLoader pipeline, ratios); decoder speed per core; the
# pipeline's ceiling without the network, with a cache; then scripts/gpu-longrun.sh (48,000
# tiles: the defaults against their alternatives, alternating; several samples in one
# process); output formats (CSV/HDF5/Parquet, same rows asserted); TorchScript --model (ResNet50
# trunk vs native, asserted within 5e-3; ViT-B/16 and ViT-L/16 bf16 model-only and end-to-end).
# About 6-7 minutes on an H200.
#
# The parity section asserts, and the script exits 1 at the end (after printing everything)
# when an assertion failed: every GPU run succeeds, `--device auto` picks CUDA, GPU fp32 agrees
# with the tutorial on the GPU and with tilefeat on the CPU within the README's tolerance
# (max relative error 5e-3, cosine 0.99999), a worker stream of its own gives the same bytes
# as the shared default stream, and bf16/fp16 stay within the README's precision figures
# (2.5e-2 / 0.9999 and 5e-3 / 0.99999).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPORT=gpu-report.txt
# shellcheck source=scripts/gpu-common.sh
source scripts/gpu-common.sh

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c 'import torch, torchvision, cv2; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cv2", cv2.__version__)'
"$B" info

section "extract --device cuda on mixed real tiles (parity; asserted)"
python3 - "$B" "$W" <<'PY'
import subprocess, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "tests/python")
from tutorial_reference import batched_all, make_random_weights
B, W = sys.argv[1], Path(sys.argv[2])
weights = make_random_weights(W / "rand", seed=0)["zip"]
# Mixed tiles as in the CPU parity test.
import cv2
im = cv2.imread("demo/ihc.png"); rng = np.random.default_rng(0); tiles = W / "mixed"; tiles.mkdir(exist_ok=True)
for k, n in enumerate((224, 256, 300, 448, 512, 1000, 200, 333)):
    c = im[:n, :n] if n <= im.shape[0] else cv2.resize(im, (n, n), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(tiles / f"t{k}.png"), c); cv2.imwrite(str(tiles / f"t{k}.jpg"), c)
failures = []
def check(ok, what):
    print(("ok    " if ok else "FAILED ") + what)
    if not ok:
        failures.append(what)
def run(*a, env=None):
    import os
    # --no-cache: each run computes on its device (the default cache beside the outputs would
    # serve the GPU's vectors to the CPU and auto runs: the device is not in the cache key).
    r = subprocess.run([B, "extract", str(tiles), "--weights", str(weights), "--quiet", "--no-cache", *a],
                       capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    print(" ".join(a), env or "", "->", r.returncode, r.stderr.strip()[-300:])
    check(r.returncode == 0, f"extract {' '.join(a)} {env or ''} exits 0")
    return r.returncode
def feats(p):
    import pandas as pd
    return pd.read_csv(p, index_col=0).to_numpy(np.float32)
for prec in ("fp32", "bf16", "fp16"):
    run("-o", str(W / f"gpu_{prec}.csv"), "--device", "cuda", "--precision", prec, "--batch-size", "8")
run("-o", str(W / "gpu_fp32_shared.csv"), "--device", "cuda", "--batch-size", "8", env={"TILEFEAT_CUDA_STREAMS": "0"})
run("-o", str(W / "cpu_fp32.csv"), "--device", "cpu")
run("-o", str(W / "auto.csv"), "--device", "auto", "--batch-size", "8")
for name in ("gpu_fp32", "auto"):
    p = W / f"{name}.provenance.yaml"
    dev = [l for l in p.read_text().splitlines() if l.startswith("device:")] if p.exists() else []
    print(name, "provenance device:", dev)
    check(bool(dev) and "cuda" in dev[0], f"{name}: the provenance names a CUDA device")
_, ref = batched_all(tiles, weights, device="cuda")
ref = ref[("layer4", "max")]
_, ref_cpu = batched_all(tiles, weights, device="cpu")
ref_cpu = ref_cpu[("layer4", "max")]
def cmp(name, a, b, max_rel=None, min_cos=None):
    rel = (np.abs(a - b).max(1) / np.abs(b).max(1)).max()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"{name:45s} max rel err {rel:.2e}   min cosine {cos.min():.6f}")
    if max_rel is not None:
        check(rel <= max_rel and cos.min() >= min_cos, f"{name}: within {max_rel:g} / {min_cos}")
g32 = feats(W / "gpu_fp32.csv"); c32 = feats(W / "cpu_fp32.csv")
check(np.array_equal(feats(W / "auto.csv"), g32), "--device auto gives the GPU's features")
cmp("tilefeat GPU fp32 vs tutorial on GPU (torch)", g32, ref, 5e-3, 0.99999)
cmp("tilefeat CPU fp32 vs tutorial on CPU (torch)", c32, ref_cpu, 1e-4, 0.9999999)
cmp("tilefeat GPU fp32 vs tilefeat CPU fp32", g32, c32, 5e-3, 0.99999)
for name in ("gpu_fp32", "gpu_fp32_shared"):
    print(name, "provenance:", [l for l in (W / f"{name}.provenance.yaml").read_text().splitlines() if l.startswith("cuda_streams:")])
if (W / "gpu_fp32_shared.provenance.yaml").exists():
    shared = feats(W / "gpu_fp32_shared.csv")
    cmp("tilefeat GPU fp32, shared default stream, vs default", shared, g32)
    check(np.array_equal(shared, g32), "a stream per worker gives the shared stream's features exactly")
else:
    check(False, "TILEFEAT_CUDA_STREAMS=0 run (see above)")
cmp("tutorial GPU vs tutorial CPU (torch)", ref, ref_cpu)
for prec, tol, cos in (("bf16", 2.5e-2, 0.9999), ("fp16", 5e-3, 0.99999)):
    cmp(f"tilefeat GPU {prec} vs GPU fp32", feats(W / f"gpu_{prec}.csv"), g32, tol, cos)
if failures:
    print(f"PARITY CHECKS FAILED: {len(failures)}: " + "; ".join(failures))
    sys.exit(1)
print("parity checks: all passed")
PY
parity=$?

section "model-only throughput (batch 256), with the warm-up batches' time"
for pl in "fp32 nhwc" "fp16 nhwc" "bf16 nhwc" "bf16 nchw"; do
  read -r prec layout <<<"$pl"
  "$B" bench --device cuda --precision "$prec" --layout "$layout" --batch-size 256 --batches 40 --warmup 2
done

section "process start-up: libtorch loaded (--version), then CUDA initialised (info)"
time "$B" --version >/dev/null
time "$B" info >/dev/null

section "benchmark: 4000 tiles (and linked 12 times), bf16, batch 256; the DataLoader on the 48,000"
python3 scripts/benchmark.py --device cuda --precision bf16 --batch-size 256 --tiles 4000 --repeat 12 \
  --python-tiles 2000 --dataloader-tiles 48000 --workdir "$W/bench" --bin "$B" --json "$OUT_DIR/benchmark-gpu.json"
grep -E '^(  )?(startup|setup_|pipeline|model_|workers_|batches_|steady)' "$W/bench/features_big.provenance.yaml" | sed 's/^ */  x12 run: /'

section "decoders: tiles/s per core, then on all cores (read, hash, decode, resize; no model)"
"$B" bench --what decode --tiles "$W/bench/tiles4000" --threads "$(nproc)"

section "pipeline without the network, 4000 tiles, with a fresh cache (hashing and storing)"
"$B" bench --what pipeline --tiles "$W/bench/tiles4000" --batch-size 256 --cache-dir "$W"

section "archives: the benchmark's 4000 tiles as a folder, a zip and a tar (bf16, batch 256)"
python3 - "$W" <<'PY'
import sys, tarfile, zipfile
from pathlib import Path
W = Path(sys.argv[1]); src = W / "bench" / "tiles4000"; files = sorted(src.iterdir())
with zipfile.ZipFile(W / "tiles4000.zip", "w", zipfile.ZIP_STORED) as z:
    for f in files: z.write(f, f.name)
with tarfile.open(W / "tiles4000.tar", "w") as t:
    for f in files: t.add(f, f.name)
PY
for src in "$W/bench/tiles4000" "$W/tiles4000.zip" "$W/tiles4000.tar"; do
  if "$B" extract "$src" -o "$W/archive.csv" --weights random:0 --quiet --device cuda \
    --precision bf16 --batch-size 256 --no-cache; then
    printf '%s: ' "$(basename "$src")"
    grep -E '^(tiles_per_s|steady_tiles_per_s):' "$W/archive.provenance.yaml" | tr '\n' ' '
    echo
  else
    echo "archive run on $src FAILED"
    parity=1
  fi
done

section "output formats: the 4000 tiles to CSV, HDF5 and Parquet (bf16, batch 256; asserted: same rows)"
# histolab-style names, so that HDF5 and Parquet get coordinates.
python3 - "$W" <<'PY'
import os, sys
from pathlib import Path
W = Path(sys.argv[1]); src = W / "bench" / "tiles4000"; dst = W / "histolab4000"
dst.mkdir(exist_ok=True)
for i, f in enumerate(sorted(src.iterdir())):
    x, y = (i % 64) * 256, (i // 64) * 256
    link = dst / f"tile_{i}_level0_{x}-{y}-{x + 256}-{y + 256}{f.suffix}"
    if not link.exists():
        os.symlink(f, link)
PY
for fmt in csv h5 parquet; do
  mkdir -p "$W/fmt-$fmt"
  if "$B" extract "$W/histolab4000" -o "$W/fmt-$fmt/s.$fmt" --coords auto --weights random:0 \
    --quiet --device cuda --precision bf16 --batch-size 256 --no-cache &&
    "$B" join --quiet "$W/fmt-$fmt/s.$fmt" -o "$W/fmt-$fmt/joined.csv"; then
    printf '%s: %s bytes/tile; ' "$fmt" "$(python3 -c "import os,sys;print(os.path.getsize(sys.argv[1])//4000)" "$W/fmt-$fmt/s.$fmt")"
    grep -E '^(tiles_per_s|steady_tiles_per_s):' "$W/fmt-$fmt/s.provenance.yaml" | tr '\n' ' '
    grep -E '^  (format|write):' "$W/fmt-$fmt/s.provenance.yaml" | tr '\n' ' '
    echo
  else
    echo "format $fmt FAILED"
    parity=1
  fi
done
for fmt in h5 parquet; do
  cmp -s "$W/fmt-csv/joined.csv" "$W/fmt-$fmt/joined.csv" || { echo "format $fmt: rows differ from the CSV's"; parity=1; }
done

section "TorchScript --model: ResNet50 trunk vs native; ViT-B/16 and ViT-L/16 bf16 (model-only vs end-to-end)"
# Exported here (no registry on the GPU machine: needs torchvision there; random weights).
if python3 -c "import torchvision" 2>/dev/null; then
  python3 scripts/export_encoder.py torchvision-resnet50-trunk --random-init 0 --normalize tutorial \
    -o "$W/trunk.pt" --save-state-dict "$W/trunk.pth" >/dev/null
  for m in vit_b_16 vit_l_16; do
    python3 scripts/export_encoder.py "$m" --random-init 0 -o "$W/$m.pt" >/dev/null
  done
  run_model() { # NAME ARGS...: end-to-end tiles/s (overall and steady) of one extract
    local name=$1; shift
    if "$B" extract "$W/bench/tiles4000" -o "$W/ts-$name.csv" --quiet --device cuda --batch-size 256 \
      --no-cache "$@"; then
      printf '%s end-to-end: ' "$name"
      grep -E '^(tiles_per_s|steady_tiles_per_s):' "$W/ts-$name.provenance.yaml" | tr '\n' ' '
      echo
    else
      echo "--model run $name FAILED"; parity=1
    fi
  }
  for p in fp32 bf16; do
    run_model "native-$p" --weights "$W/trunk.pth" --precision "$p"
    run_model "trunk-$p" --model "$W/trunk.pt" --precision "$p"
  done
  python3 - "$W/ts-native-fp32.csv" "$W/ts-trunk-fp32.csv" <<'PY' || parity=1
import sys, numpy as np, pandas as pd
a, b = (pd.read_csv(p, index_col=0).to_numpy(np.float32) for p in sys.argv[1:])
rel = float(np.abs(a - b).max() / np.abs(a).max())
print(f"TorchScript trunk vs native on the GPU, fp32: max relative difference {rel:.2e} (asserted <= 5e-3)")
sys.exit(rel > 5e-3)
PY
  for m in vit_b_16 vit_l_16; do
    "$B" bench --what model --model "$W/$m.pt" --device cuda --precision bf16 --batch-size 256 --batches 10
    run_model "$m-bf16" --model "$W/$m.pt" --precision bf16
  done
else
  echo "torchvision is not installed here: TorchScript models not exported, not measured"
fi

section "slide-sized runs (scripts/gpu-longrun.sh)"
scripts/gpu-longrun.sh "$OUT_DIR"
if [ "$parity" -ne 0 ]; then
  echo "GPU CHECKS FAILED (parity, archive, format or --model section, above)"
  exit 1
fi
echo "done: every asserted GPU check passed"
