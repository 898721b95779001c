#!/usr/bin/env bash
# Set up tilefeat on a fresh machine: a project-local Python venv with libtorch (pip
# torch==$LIBTORCH_VERSION, the build tch needs) and the test tools, then the release binary.
# Used as is by the README quick start, CI (.ci/run via scripts/test.sh) and the container
# recipes (containers/Dockerfile*, containers/tilefeat.def), so all build the same way.
#
#   scripts/setup.sh              venv + test deps + build, then run the demo
#   scripts/setup.sh --no-demo    venv + test deps + build
#   scripts/setup.sh --build-only venv with torch only + build (containers)
#
# Environment: VENV (default .venv), TORCH_INDEX_URL (e.g. the CPU-only wheel index for a
# CPU image), CARGO (default cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../versions.env
. ./versions.env

mode=demo
for arg in "$@"; do
  case "$arg" in
    --no-demo) mode=build-test ;;
    --build-only) mode=build-only ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
CARGO=${CARGO:-cargo}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null

have_torch=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$have_torch" != "$LIBTORCH_VERSION" ]; then
  echo "==> installing torch==$LIBTORCH_VERSION into $VENV (libtorch for tch $TCH_VERSION; ~5 GB with CUDA wheels)"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$VENV/bin/pip" install -q --index-url "$TORCH_INDEX_URL" "torch==$LIBTORCH_VERSION"
  else
    "$VENV/bin/pip" install -q "torch==$LIBTORCH_VERSION"
  fi
fi

# A CUDA torch ships the CUDA runtime's headers but not crt/, which they include: without it
# the build leaves out per-worker CUDA streams (on by default where built: 15% faster on an
# H200), with a warning.
if "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null &&
  ! "$VENV/bin/pip" show -q nvidia-cuda-crt >/dev/null 2>&1; then
  echo "==> installing the CUDA runtime headers (nvidia-cuda-crt==$CUDA_VERSION.*) into $VENV"
  "$VENV/bin/pip" install -q "nvidia-cuda-crt==$CUDA_VERSION.*" ||
    echo "==> warning: could not install nvidia-cuda-crt: building without per-worker CUDA streams" >&2
fi

if [ "$mode" != build-only ]; then
  echo "==> installing test tools into $VENV"
  "$VENV/bin/pip" install -q -r requirements-dev.txt
fi

# Slides: OpenSlide is loaded at run time from the openslide-bin wheel (one self-contained
# libopenslide.so.1), which the build finds in the venv; tile folders never need it. Pinned in
# requirements-dev.txt (test tools share the pin); also in --build-only mode (containers).
openslide_pin=$(grep -E '^openslide-bin==' requirements-dev.txt 2>/dev/null | cut -d' ' -f1 || true)
if ! "$VENV/bin/python" -c "import openslide_bin" 2>/dev/null; then
  echo "==> installing ${openslide_pin:-openslide-bin} into $VENV (OpenSlide, to read slides)"
  "$VENV/bin/pip" install -q "${openslide_pin:-openslide-bin}" ||
    echo "==> warning: could not install openslide-bin: slides will need TILEFEAT_OPENSLIDE" >&2
fi

# nasm: libjpeg-turbo's SIMD kernels (JPEG decoding about 2x faster, same pixels). Without it
# the build still works, with a warning; `tilefeat info` says which build you have.
if ! command -v nasm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing nasm with apt-get (libjpeg-turbo SIMD)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nasm >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nasm >/dev/null 2>&1; }; then
      # A libjpeg-turbo built earlier without nasm is not rebuilt by itself.
      "${CARGO:-cargo}" clean --release -p mozjpeg-sys >/dev/null 2>&1 || true
    else
      echo "==> warning: could not install nasm; JPEG decoding will be built without SIMD" >&2
    fi
  else
    echo "==> warning: nasm not found (apt install nasm / module load nasm): JPEG decoding will be" >&2
    echo "    built without SIMD, about 2x slower with the same pixels" >&2
  fi
fi

# HDF5 output: libhdf5 is compiled into the binary (hdf5-metno-src, static), which needs
# CMake >= 3.26 at build time only (Debian bookworm's is 3.25): from pip, into the venv.
cmake_ok=$("$VENV/bin/python" - <<'PY' 2>/dev/null || true
import re, shutil, subprocess, sys
exe = shutil.which("cmake")
if exe:
    m = re.search(r"(\d+)\.(\d+)", subprocess.run([exe, "--version"], capture_output=True, text=True).stdout)
    print("yes" if m and (int(m[1]), int(m[2])) >= (3, 26) else "")
PY
)
if [ "$cmake_ok" != yes ] && [ ! -x "$VENV/bin/cmake" ]; then
  echo "==> installing CMake >= 3.26 into $VENV (builds the static libhdf5 for HDF5 output)"
  "$VENV/bin/pip" install -q "cmake>=3.26,<5"
fi

echo "==> building tilefeat (release)"
export LIBTORCH_USE_PYTORCH=1
case "$VENV" in /*) venv_abs=$VENV ;; *) venv_abs=$PWD/$VENV ;; esac
export PATH="$venv_abs/bin:$PATH"
"$CARGO" build --release --locked
echo "==> built target/release/tilefeat"

if [ "$mode" = demo ]; then
  target/release/tilefeat info
  mkdir -p demo/out
  if target/release/tilefeat weights where | grep -q present; then
    weights=()
    echo "==> demo: features of demo/tiles/sampleA with the torchvision weights in your torch cache"
  else
    weights=(--weights random:0)
    echo "==> demo: features of demo/tiles/sampleA with RANDOM weights (no resnet50-0676ba61.pth in"
    echo "    your torch cache; see 'tilefeat weights fetch'): the pipeline is real, the numbers are not"
  fi
  target/release/tilefeat extract demo/tiles/sampleA --output demo/out/demo.csv "${weights[@]}"
  echo "==> wrote demo/out/demo.csv, demo/out/demo.provenance.yaml, demo/out/demo.rejected.tsv"
fi
