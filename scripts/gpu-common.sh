# shellcheck shell=bash
# Sourced by scripts/gpu-check.sh and scripts/gpu-longrun.sh (run from the repo root on a GPU
# machine): the report file, that machine's torch libraries, the binary, the work folder, and
# helpers. $1 of the sourcing script is the output folder; REPORT names the report in it.
OUT_DIR=${1:-${OUT:-/tmp/tilefeat-gpu}}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/${REPORT:?set REPORT before sourcing gpu-common.sh}") 2>&1
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
# shellcheck disable=SC2034  # used by the scripts that source this file
B=${TILEFEAT_BIN:-$PWD/target/release/tilefeat}
W=/tmp/tilefeat-gpu-work
mkdir -p "$W"
TIMEFORMAT='  wall %R s, CPU user %U s, system %S s'

section() { printf '\n===== %s =====\n' "$*"; }

# The benchmark's 4,000 tiles (256 px, half PNG, half JPEG) in $W/bench/tiles4000, then
# $W/tNAME with them linked COPIES times: `linked_tiles NAME COPIES`.
linked_tiles() {
  python3 - "$W" "$1" "$2" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from benchmark import link_copies, make_tiles
W, name, copies = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
src = W / "bench" / "tiles4000"
make_tiles(src, 4000, Path("demo/ihc.png"))
link_copies(src, W / name, copies)
PY
}
