#!/usr/bin/env bash
# GPU slide-sized runs, in one go (about 2 minutes on an H200): end-to-end on 16,000 and 48,000
# tiles and the pipeline without the network on 48,000, where per-process start-up no longer
# hides the steady state; the defaults against their alternatives. Run on a GPU machine from
# the repo root with the release binary carried along, as scripts/gpu-check.sh (which ends with
# this). With TILEFEAT_BIN_B set to another build (say, of the previous commit), the
# 48,000-tile measurements alternate A, B, A, B on the same machine. Prints, and writes to
# OUT_DIR/gpu-longrun.txt:
#   - model-only bf16 at batch 256 (with its warm-up time), with a CUDA stream per model
#     worker (the default) and with TILEFEAT_CUDA_STREAMS=0 (the shared default stream);
#   - pipeline without the network on 48,000 tiles (A/B);
#   - end-to-end bf16, batch 256, --no-cache, --profile on 48,000 tiles (A/B), then on 16,000
#     tiles (A only), each with its steady state once warm;
#   - 8 samples of 500 tiles: 8 processes vs one `extract --outdir` process;
#   - end-to-end on 48,000 tiles, alternating twice: the defaults, TILEFEAT_CUDA_STREAMS=0,
#     TILEFEAT_CUDA_SLEEP=1 (the model workers stop spinning: is the host the bound?) and
#     --threads 12 (fewer decoders: if this is as fast, the host is not the bound).
# The tiles are the benchmark's 4,000 (256 px, half PNG, half JPEG) linked 4 and 12 times.
# The runs read the benchmark's torch.save weights ($W/bench/resnet50_random.pth, made if
# missing), so their start-up is a user's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPORT=gpu-longrun.txt
# shellcheck source=scripts/gpu-common.sh
source scripts/gpu-common.sh
A=$B
BINS=("$A")
[ -n "${TILEFEAT_BIN_B:-}" ] && BINS=("$A" "$TILEFEAT_BIN_B" "$A" "$TILEFEAT_BIN_B")

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
linked_tiles t16k 4
linked_tiles t48k 12
# Weights as users have them (a torch.save file), as the benchmark makes them.
WEIGHTS=$W/bench/resnet50_random.pth
[ -f "$WEIGHTS" ] || python3 -c 'import sys; sys.path.insert(0, "tests/python")
from tutorial_reference import make_random_weights; make_random_weights(sys.argv[1], seed=0)' "${WEIGHTS%.pth}"
for b in "${BINS[@]}"; do echo "binary $b: $("$b" --version)"; done

section "model-only bf16, batch 256: a stream per worker (default), then the shared default stream"
"$A" bench --device cuda --precision bf16 --batch-size 256 --batches 40 --warmup 2
TILEFEAT_CUDA_STREAMS=0 "$A" bench --device cuda --precision bf16 --batch-size 256 --batches 40 --warmup 2

section "pipeline without the network, 48,000 tiles, batch 256"
for b in "${BINS[@]}"; do
  echo "$b:"; "$b" bench --what pipeline --tiles "$W/t48k" --batch-size 256
done

section "end-to-end bf16, batch 256, --no-cache, 48,000 tiles"
e2e() {  # $1: binary, $2: folder, then VAR=VALUE settings and extra flags
  local bin=$1 dir=$2 envs=() flags=()
  shift 2
  for a in "$@"; do case $a in TILEFEAT_*=*) envs+=("$a") ;; *) flags+=("$a") ;; esac; done
  echo "$bin $(basename "$dir") ${envs[*]:-} ${flags[*]:-}:"
  rm -f "$W/e2e.csv" "$W/e2e.provenance.yaml"
  time env ${envs[@]+"${envs[@]}"} "$bin" extract "$dir" -o "$W/e2e.csv" --weights "$WEIGHTS" \
    --device cuda --precision bf16 --batch-size 256 --no-cache --profile --quiet \
    ${flags[@]+"${flags[@]}"} 2>&1
  grep -sE '^(cuda_(streams|waits)|steady_tiles_per_s):' "$W/e2e.provenance.yaml" | sed 's/^/  /'
}
for b in "${BINS[@]}"; do e2e "$b" "$W/t48k"; done

section "end-to-end bf16, batch 256, --no-cache, 16,000 tiles"
e2e "$A" "$W/t16k"

section "several samples: the 4,000 tiles as 8 folders of 500, a process each vs one process (--outdir)"
mkdir -p "$W/many"
i=0
for f in "$W"/bench/tiles4000/*; do
  mkdir -p "$W/many/s$((i % 8))"
  ln -sf "$f" "$W/many/s$((i % 8))/"
  i=$((i + 1))
done
rm -rf "$W/many-out1" "$W/many-out2"
mkdir -p "$W/many-out1"
GPU_ARGS=(--weights "$WEIGHTS" --device cuda --precision bf16 --batch-size 256 --no-cache --quiet)
echo "8 processes:"
time for d in "$W"/many/s*; do "$A" extract "$d" -o "$W/many-out1/$(basename "$d").csv" "${GPU_ARGS[@]}"; done
echo "one process:"
time "$A" extract "$W"/many/s* --outdir "$W/many-out2" "${GPU_ARGS[@]}" --profile 2>&1 |
  grep -oE 'startup [0-9.]+ s \(.*\), pipeline [0-9.]+ s|model warm-up \(first batches\) [0-9.]+'
find "$W/many-out2" -name "*.csv" | wc -l

section "end-to-end, 48,000 tiles: defaults vs the shared default stream vs sleeping waits vs 12 threads"
for round in 1 2; do
  echo "round $round"
  e2e "$A" "$W/t48k"
  e2e "$A" "$W/t48k" TILEFEAT_CUDA_STREAMS=0
  e2e "$A" "$W/t48k" TILEFEAT_CUDA_SLEEP=1
  e2e "$A" "$W/t48k" --threads 12
done
echo "done"
