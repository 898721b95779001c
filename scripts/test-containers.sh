#!/usr/bin/env bash
# Build the container images and run them, with no Docker and no registry: buildah (chroot
# isolation) from local stand-ins of the recipes' base images.
#
#   scripts/test-containers.sh              prepare the bases, build, run every check
#   scripts/test-containers.sh --bases-only prepare (or refresh) the two base images only
#   scripts/test-containers.sh --preflight  only decide whether this machine can: the same
#                                           checks and exit status, nothing built
#
# Steps (the last line printed says which passed):
#   0. base images, cached: a Debian bookworm rootfs from `debootstrap --variant=minbase` (the
#      mirror apt uses here) imported as the runtime base (stand-in for debian:bookworm-slim),
#      and the same plus build tools and this machine's Rust RUST_VERSION toolchain as the
#      builder base (stand-in for rust:RUST_VERSION-bookworm, with its CARGO_HOME, RUSTUP_HOME
#      and ENV RUST_VERSION=x.y.z). The extra CA certificates this machine trusts
#      (/usr/local/share/ca-certificates) go into both bases, never into the recipes.
#   1. buildah bud of containers/Dockerfile.cpu and containers/Dockerfile, passing the bases as
#      BUILDER_IMAGE / RUNTIME_IMAGE. The PyTorch CPU wheel index is not reachable here, so the
#      CPU recipe gets TORCH_INDEX_URL=https://pypi.org/simple (the CUDA wheel) and
#      SKIP_CPU_WHEEL_CHECK=1; the CPU-wheel path itself stays unverified.
#   2. CPU image, as UID 10001 (the image's user) and as an arbitrary UID without a passwd entry:
#      --version, info, `extract --weights random:0` of demo/tiles/sampleA (CSV byte-identical
#      to the host binary's), `join`, `extract -o x.h5` (same HDF5 data as the host binary's),
#      `extract --model` of a TorchScript file exported by scripts/export_encoder.py (CSV
#      byte-identical to the host binary's), `extract --outdir D --format clam` (CLAM's
#      h5_files/ + pt_files/: the host's HDF5 content, a bag torch.load(weights_only=True)
#      reads as the host's), and Nextflow's `/bin/bash -ue .command.sh` through
#      the entrypoint, .command.sh rendered from nextflow/modules/local/tilefeat/extract/main.nf
#      as tests/python/test_nextflow.py does.
#   3. CUDA image (no GPU needed): info says CUDA is unavailable, `extract --device cpu` gives
#      the same bytes, `--device cuda` exits 5.
#   4. Weights build args: a wrong WEIGHTS_SHA256 fails the build; the right one (a generated
#      ResNet50 state dict standing in for torchvision's file, with the test-only
#      WEIGHTS_SHA256_PREFIX) bakes it in, and `extract` without --weights finds it.
#   5. Image sizes and build times.
#
# Needs root (buildah chroot isolation, debootstrap), buildah and debootstrap (installed with
# apt-get when missing), TILEFEAT_CONTAINER_MIN_FREE_GB (default 35) of free disk for buildah's
# store and the cache (measured peak from scratch: 29 GB; 16 GB stay in the store), the host
# binary (target/release/tilefeat, TILEFEAT_BIN) and the project venv (.venv: torch,
# torchvision, h5py; scripts/setup.sh). Network: the Debian mirror, PyPI and crates.io, from
# inside the builds.
#
# Exit status: 0 every check passed; 1 a check failed (the summary names it); 77 skipped, nothing
# built, in three named cases only, said on stderr: not root; buildah or debootstrap missing
# and no apt-get to install them (not a Debian-like machine); too little free disk. Anything
# else that stops the step is a failure, never a skip: apt-get failing to install them (tried
# three times, `apt-get update` before each retry, TILEFEAT_CONTAINER_APT_WAIT seconds apart,
# default 20) is exit 1. TILEFEAT_REQUIRE_CONTAINERS=1 turns a skip into a failure too.
#
# Caches (TILEFEAT_CONTAINER_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/tilefeat-containers):
# the debootstrap rootfs; buildah's RUN --mount=type=cache folders (the recipes' pip cache and
# cargo registry: TMPDIR is pointed there), seeded from ~/.cargo/registry; logs. The images and
# their layers (--layers) stay in buildah's store, so a second run with unchanged sources reuses
# every layer. Start from scratch: buildah rmi the localhost/tilefeat-test/* images and
# delete the cache folder.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
# shellcheck disable=SC1091 # versions.env: KEY=VALUE lines
. ./versions.env

bases_only=0 preflight=0
for arg in "$@"; do
  case "$arg" in
    --bases-only) bases_only=1 ;;
    --preflight) preflight=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test-containers.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

CACHE=${TILEFEAT_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tilefeat-containers}
BIN=${TILEFEAT_BIN:-$REPO/target/release/tilefeat}
PY=${TILEFEAT_PYTHON:-$REPO/.venv/bin/python}
NS=localhost/tilefeat-test
RUNTIME_BASE=$NS/debian:bookworm-slim
BUILDER_BASE=$NS/rust:$RUST_VERSION-bookworm
CPU_IMAGE=$NS/tilefeat:$TILEFEAT_VERSION-cpu
CUDA_IMAGE=$NS/tilefeat:$TILEFEAT_VERSION-cuda$CUDA_VERSION
WEIGHTS_IMAGE=$NS/tilefeat:$TILEFEAT_VERSION-cpu-weights
# Build context path of the generated weights (must not be in .dockerignore; in .gitignore).
WEIGHTS_DIR=.containers-test
ARBITRARY_UID=4242:4242
LOGS=$CACHE/logs
# buildah keeps RUN --mount=type=cache folders in $TMPDIR/buildah-cache: keep them with
# the other caches (and off a small /tmp).
export TMPDIR=$CACHE/tmp
export BUILDAH_ISOLATION=chroot
ISO=(--isolation chroot)

die() { echo "test-containers.sh: $*" >&2; exit 1; }
# cannot REASON: one of the three named cases where this machine cannot build images (not root,
# no buildah and no apt-get, too little disk): exit 77 (SKIP, as automake's test drivers),
# loudly; a failure with TILEFEAT_REQUIRE_CONTAINERS=1. Nothing else calls it.
cannot() {
  [ -z "${TILEFEAT_REQUIRE_CONTAINERS:-}" ] || die "$*"
  echo "test-containers.sh: SKIPPED, nothing built or run: $*" >&2
  exit 77
}
log() { echo "==> $*"; }

passed=() failed=()
START=$SECONDS

# check NAME COMMAND...: run COMMAND with errexit (in a subshell, so that a failure is
# recorded and the script goes on), record PASS or FAIL.
check() {
  local name=$1 rc
  shift
  set +e
  (set -e; "$@")
  rc=$?
  set -e
  if [ "$rc" = 0 ]; then
    passed+=("$name")
    echo "PASS: $name"
  else
    failed+=("$name")
    echo "FAIL: $name (exit $rc)" >&2
  fi
  return 0
}

summary() {
  local total=$((SECONDS - START))
  echo
  echo "== timings"
  sed 's/^/  /' "$TIMINGS"
  echo "== images"
  buildah images --format '  {{.Name}}:{{.Tag}}  {{.Size}}' 2>/dev/null | grep -F "$NS/" || true
  echo "== failed (${#failed[@]}):"
  [ "${#failed[@]}" = 0 ] || printf '  %s\n' "${failed[@]}"
  echo "test-containers.sh: ${#passed[@]} passed, ${#failed[@]} failed in ${total} s" \
    "(passed: ${passed[*]:-none})"
}

# --- prerequisites ----------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || cannot "must run as root (buildah --isolation chroot, debootstrap)"
missing=()
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 ||
    cannot "${missing[*]} missing and no apt-get to install them (install buildah and debootstrap)"
  # A machine with apt-get can install them: a mirror's hiccup is retried, then a failure (a
  # skip here would turn a network error into a green run without a single image built).
  apt_wait=${TILEFEAT_CONTAINER_APT_WAIT:-20}
  installed=0
  for attempt in 1 2 3; do
    log "installing ${missing[*]} with apt-get (attempt $attempt of 3)"
    if [ "$attempt" -gt 1 ]; then
      sleep "$apt_wait"
      apt-get update -q >/dev/null 2>&1 || true
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
      installed=1
      break
    fi
  done
  [ "$installed" = 1 ] || die "apt-get could not install ${missing[*]} (3 attempts): a failure, not a skip, on a machine that has apt-get"
fi
mkdir -p "$CACHE" "$TMPDIR" "$LOGS"
# One line per step; a file, since check() runs each step in a subshell.
TIMINGS=$LOGS/timings.txt
: >"$TIMINGS"
timing() { echo "$*" >>"$TIMINGS"; }

# Free space, before anything is built: the images and their layers (buildah's store), and the
# cache mounts (TMPDIR). The peak is measured in the header above.
MIN_FREE_GB=${TILEFEAT_CONTAINER_MIN_FREE_GB:-35}
STORE=$(buildah info --format '{{ .store.GraphRoot }}' 2>/dev/null || echo /var/lib/containers/storage)
mkdir -p "$STORE"
for dir in "$STORE" "$TMPDIR"; do
  free_gb=$(df -P -BG "$dir" | awk 'NR == 2 {sub("G", "", $4); print $4}')
  [ "$free_gb" -ge "$MIN_FREE_GB" ] ||
    cannot "$dir has ${free_gb} GB free; the builds need ${MIN_FREE_GB} GB (TILEFEAT_CONTAINER_MIN_FREE_GB). Free space, e.g. 'buildah rmi --prune' or delete old $NS/* images"
done
if [ "$preflight" = 1 ]; then
  echo "test-containers.sh: preflight passed: root, buildah and debootstrap, ${MIN_FREE_GB} GB free"
  exit 0
fi

# The label that says which inputs an image was made from.
KEY_LABEL=io.github.tilefeat.test.key
image_key() {
  buildah inspect --type image --format "{{ index .OCIv1.Config.Labels \"$KEY_LABEL\" }}" "$1" 2>/dev/null || true
}

# The Debian mirror apt already uses on this machine.
debian_mirror() {
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && $2 !~ /^\[/ && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  echo "${TILEFEAT_DEBIAN_MIRROR:-${m:-http://deb.debian.org/debian}}"
}

# --- 0. base images ---------------------------------------------------------------------------

ROOTFS=$CACHE/bookworm-minbase.tar
prepare_rootfs() {
  [ -f "$ROOTFS" ] && return 0
  local tmp=$CACHE/rootfs.tmp mirror
  mirror=$(debian_mirror)
  log "debootstrap --variant=minbase bookworm from $mirror (cached in $ROOTFS)"
  rm -rf "$tmp"
  debootstrap --variant=minbase bookworm "$tmp" "$mirror" >"$LOGS/debootstrap.log" 2>&1 ||
    { tail -20 "$LOGS/debootstrap.log" >&2; die "debootstrap failed (log: $LOGS/debootstrap.log)"; }
  # As debian:bookworm-slim: apt sources with the updates and security suites (this machine's,
  # when it has a deb822 file), no package lists.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$tmp/etc/apt/sources.list.d/debian.sources"
    rm -f "$tmp/etc/apt/sources.list"
  fi
  # The extra CAs this machine trusts (a TLS-inspecting proxy): without them pip and cargo fail
  # inside the builds. The recipes' `apt-get install ca-certificates` keeps them in the bundle.
  if compgen -G '/usr/local/share/ca-certificates/*' >/dev/null; then
    mkdir -p "$tmp/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$tmp/usr/local/share/ca-certificates/"
  fi
  rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin "$tmp"/var/cache/apt/archives/*.deb
  tar -C "$tmp" --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$ROOTFS.partial" .
  mv "$ROOTFS.partial" "$ROOTFS"
  rm -rf "$tmp"
}

prepare_runtime_base() {
  local key c
  key="rootfs $(stat -c '%Y-%s' "$ROOTFS")"
  [ "$(image_key "$RUNTIME_BASE")" = "$key" ] && return 0
  log "importing the rootfs as $RUNTIME_BASE"
  c=$(buildah from --pull=never scratch)
  buildah add "$c" "$ROOTFS" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash --label "$KEY_LABEL=$key" "$c"
  buildah commit --rm -q "$c" "$RUNTIME_BASE" >/dev/null
}

# What rust:*-bookworm (buildpack-deps:bookworm) has that the build uses.
BUILDER_PACKAGES=(build-essential pkg-config git curl ca-certificates python3 python3-venv
  libssl-dev zlib1g-dev)
prepare_builder_base() {
  local key c sysroot rustc_version full toolchain d
  command -v rustc >/dev/null 2>&1 || die "no rustc on this machine (the builder base copies its toolchain)"
  rustc_version=$(rustc --version)
  case "$rustc_version" in
    "rustc $RUST_VERSION."*) ;;
    *) die "this machine's $rustc_version is not RUST_VERSION=$RUST_VERSION (versions.env)" ;;
  esac
  full=$(echo "$rustc_version" | awk '{print $2}')
  sysroot=$(rustc --print sysroot)
  [ -x "$sysroot/bin/cargo" ] || die "no cargo in $sysroot/bin"
  key="$(image_key "$RUNTIME_BASE") $rustc_version ${BUILDER_PACKAGES[*]}"
  [ "$(image_key "$BUILDER_BASE")" = "$key" ] && return 0
  log "making $BUILDER_BASE: build tools and Rust $full from $sysroot"
  toolchain=/usr/local/rustup/toolchains/$full-x86_64-unknown-linux-gnu
  c=$(buildah from --pull=never "$RUNTIME_BASE")
  buildah run "${ISO[@]}" "$c" -- sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends ${BUILDER_PACKAGES[*]} && rm -rf /var/lib/apt/lists/*" \
    >"$LOGS/builder-base.log" 2>&1 || { tail -20 "$LOGS/builder-base.log" >&2; die "apt-get in the builder base failed"; }
  # The toolchain without its documentation (share/: ~800 MB).
  for d in bin lib libexec etc; do
    [ -d "$sysroot/$d" ] && buildah copy -q "$c" "$sysroot/$d" "$toolchain/$d" >/dev/null
  done
  # As the rust image: cargo, rustc, ... on PATH in $CARGO_HOME/bin (here links, not rustup).
  buildah run "${ISO[@]}" "$c" -- sh -c "mkdir -p /usr/local/cargo/bin && ln -sf $toolchain/bin/* /usr/local/cargo/bin/ \
    && chmod -R a+w /usr/local/cargo && export PATH=/usr/local/cargo/bin:\$PATH && cargo --version && rustc --version \
    && curl -sSf -o /dev/null https://pypi.org/simple/pip/ && curl -sSf -o /dev/null https://index.crates.io/config.json" \
    >>"$LOGS/builder-base.log" 2>&1 ||
    { tail -20 "$LOGS/builder-base.log" >&2; die "the builder base cannot run cargo or reach PyPI/crates.io over HTTPS"; }
  buildah config --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$full" --label "$KEY_LABEL=$key" "$c"
  buildah commit --rm -q "$c" "$BUILDER_BASE" >/dev/null
}

# The recipes' cache mounts live under $TMPDIR/buildah-cache/<target> (as root); start the cargo
# registry from this machine's (same cargo), so crates are not downloaded again.
seed_caches() {
  local registry=$TMPDIR/buildah-cache/usr/local/cargo/registry
  if [ ! -d "$registry" ] && [ -d "$HOME/.cargo/registry" ]; then
    mkdir -p "$registry"
    cp -a "$HOME/.cargo/registry/." "$registry/" 2>/dev/null || true
  fi
}

t0=$SECONDS
prepare_rootfs
prepare_runtime_base
prepare_builder_base
seed_caches
timing "bases: $((SECONDS - t0)) s"
if [ "$bases_only" = 1 ]; then
  buildah images --format '{{.Name}}:{{.Tag}}  {{.Size}}' | grep -F "$NS/"
  exit 0
fi

[ -x "$BIN" ] || die "$BIN not built (scripts/setup.sh --no-demo)"
[ -x "$PY" ] || die "no $PY (scripts/setup.sh)"

# --- 1. builds --------------------------------------------------------------------------------

# build NAME DOCKERFILE TAG BUILD-ARG...: buildah bud with the local bases, timed and logged.
build() {
  local name=$1 file=$2 tag=$3 t rc arg
  shift 3
  local args=()
  for arg in "$@"; do args+=(--build-arg "$arg"); done
  t=$SECONDS
  log "building $tag from $file (log: $LOGS/build-$name.log)"
  set +e
  # --format docker: the OCI format has no SHELL, and buildah would run the recipes' RUN lines
  # (bash: pipefail, <<<, [[ ]]) with /bin/sh.
  buildah bud "${ISO[@]}" --format docker --layers --pull=never -f "$file" -t "$tag" \
    --build-arg BUILDER_IMAGE="$BUILDER_BASE" --build-arg RUNTIME_IMAGE="$RUNTIME_BASE" \
    "${args[@]}" . >"$LOGS/build-$name.log" 2>&1
  rc=$?
  set -e
  timing "build $name: $((SECONDS - t)) s (exit $rc)"
  if [ "$rc" != 0 ]; then tail -25 "$LOGS/build-$name.log" >&2; fi
  return "$rc"
}

CPU_ARGS=(TORCH_INDEX_URL=https://pypi.org/simple SKIP_CPU_WHEEL_CHECK=1)
# Every build keeps its layers: the weights builds reuse the CPU builder layer, and a second
# run with unchanged sources reuses them all.
check "build cpu image" build cpu containers/Dockerfile.cpu "$CPU_IMAGE" "${CPU_ARGS[@]}"

# --- host references --------------------------------------------------------------------------

# The work folder is mounted into the containers at its own path, so every folder above it must
# be searchable by any UID: not under /root (mode 0700 here and in the images), where the
# cache and maybe the repository live. The demo tiles are copied into it for the same reason.
WORK=$(mktemp -d "${TILEFEAT_CONTAINER_WORK:-/tmp}/tilefeat-containers.XXXXXX")
CONTAINERS=()
cleanup() {
  local c
  for c in "${CONTAINERS[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
  rm -rf "$WORK" "${REPO:?}/$WEIGHTS_DIR"
}
trap cleanup EXIT
# Any UID must be able to write the outputs.
chmod 0777 "$WORK"
TILES=$WORK/tiles
cp -r "$REPO/demo/tiles" "$TILES"
# Read-only for the containers' users (never root), who must not write beside the tiles.
chmod -R a+rX,a-w "$TILES"
mkdir -p "$WORK/host"
"$BIN" extract "$TILES/sampleA" -o "$WORK/host/sampleA.csv" --weights random:0 -q
"$BIN" extract "$TILES/sampleB" -o "$WORK/host/sampleB.csv" --weights random:0 -q
"$BIN" join "$WORK/host/sampleA.csv" "$WORK/host/sampleB.csv" -o "$WORK/host/cohort.csv" -q
mkdir -p "$WORK/host/h5"
"$BIN" extract "$TILES/sampleA" -o "$WORK/host/h5/x.h5" --weights random:0 -q
"$BIN" extract "$TILES/sampleA" --outdir "$WORK/host/clam" --format clam --weights random:0 -q
# A TorchScript encoder (--model): the ResNet50 trunk with random weights, exported as a user
# would, with its sidecar.
mkdir -p "$WORK/model" "$WORK/host/model"
"$PY" scripts/export_encoder.py torchvision-resnet50-trunk --random-init 0 -o "$WORK/model/trunk.pt" \
  >"$LOGS/export-model.log" 2>&1 || { cat "$LOGS/export-model.log" >&2; die "export_encoder.py failed"; }
chmod -R a+rX "$WORK/model"
"$BIN" extract "$TILES/sampleA" -o "$WORK/host/model/sampleA.csv" --model "$WORK/model/trunk.pt" -q

# The Nextflow task script of TILEFEAT_EXTRACT, rendered as tests/python/test_nextflow.py does
# (pipeline defaults, --weights random:0, no GPU), into a task folder: .command.sh plus the tiles
# staged as a symlink (Nextflow mounts the inputs at their own paths).
render_task() {
  local dir=$1
  mkdir -p "$dir"
  ln -sfn "$TILES/sampleA" "$dir/sampleA"
  "$PY" - "$REPO/tests/python" "$dir/.command.sh" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import test_nextflow as nf  # noqa: E402

args, _ = nf._modules_config_args("TILEFEAT_EXTRACT", nf._default_params(weights="random:0"))
script = nf.render(nf.EXTRACT_NF, "script", nf._extract_ctx("sampleA", args))
with open(sys.argv[2], "w") as f:
    f.write("#!/bin/bash -ue\n" + script)
PY
  chmod -R a+rwX "$dir"
}
render_task "$WORK/host/nf"
mkdir -p "$WORK/hostbin"
ln -sf "$BIN" "$WORK/hostbin/tilefeat"
(cd "$WORK/host/nf" && PATH="$WORK/hostbin:$PATH" bash -ue .command.sh >"$LOGS/nf-host.log" 2>&1) ||
  { cat "$LOGS/nf-host.log" >&2; die "the rendered Nextflow task fails on the host"; }
echo "--- rendered .command.sh:"
cat "$WORK/host/nf/.command.sh"

# --- running in an image ----------------------------------------------------------------------

# container IMAGE: a working container of IMAGE (removed at exit), echoed.
container() {
  local c
  c=$(buildah from --pull=never "$1")
  CONTAINERS+=("$c")
  echo "$c"
}
# crun CONTAINER USER DIR COMMAND...: run COMMAND in the container as USER, in DIR, with the
# work folder (tiles, model, outputs) mounted at its own path. buildah run applies
# no entrypoint: checks that need it name /usr/local/bin/tilefeat-entrypoint.
crun() {
  local c=$1 user=$2 dir=$3
  shift 3
  buildah run "${ISO[@]}" --user "$user" -v "$WORK:$WORK" \
    --workingdir "$dir" "$c" -- "$@"
}

# outdir DIR: a folder for a check's outputs, writable by whichever UID the container runs as.
outdir() {
  mkdir -p "$1"
  chmod 0777 "$1"
}

# same_h5 A B: the same datasets (names, dtypes, values) and file attributes.
same_h5() {
  "$PY" - "$1" "$2" <<'PY'
import sys

import h5py
import numpy as np


def walk(path):
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (str(obj.dtype), np.asarray(obj[()]))
        f.visititems(visit)
        attrs = {k: str(v) for k, v in f.attrs.items()}
    return out, attrs


(a, a_attrs), (b, b_attrs) = walk(sys.argv[1]), walk(sys.argv[2])
assert a and a.keys() == b.keys(), (a.keys(), b.keys())
for k in a:
    assert a[k][0] == b[k][0], (k, a[k][0], b[k][0])
    assert np.array_equal(a[k][1], b[k][1]), k
assert a_attrs == b_attrs, (a_attrs, b_attrs)
print("same HDF5 content:", ", ".join(f"{k} {a[k][0]} {a[k][1].shape}" for k in sorted(a)))
PY
}

# produces FILE HOSTFILE CONTAINER USER DIR COMMAND...: COMMAND succeeds in the container and
# writes FILE, byte-identical to HOSTFILE.
produces() {
  local file=$1 host=$2
  shift 2
  crun "$@"
  cmp "$file" "$host"
}

# cpu_checks CONTAINER USER LABEL
cpu_checks() {
  local c=$1 user=$2 label=$3 out=$WORK/cpu-$3
  outdir "$out"
  check "cpu[$label] --version" version_is "$c" "$user"
  check "cpu[$label] info" crun "$c" "$user" /data /usr/local/bin/tilefeat-entrypoint info
  check "cpu[$label] extract csv == host" produces "$out/sampleA.csv" "$WORK/host/sampleA.csv" \
    "$c" "$user" "$out" /usr/local/bin/tilefeat-entrypoint extract "$TILES/sampleA" -o "$out/sampleA.csv" --weights random:0 -q
  check "cpu[$label] join == host" produces "$out/cohort.csv" "$WORK/host/cohort.csv" "$c" "$user" "$out" \
    bash -c "tilefeat extract $TILES/sampleB -o $out/sampleB.csv --weights random:0 -q \
      && tilefeat join $out/sampleA.csv $out/sampleB.csv -o $out/cohort.csv -q"
  check "cpu[$label] extract h5 == host (static libhdf5)" h5_check "$c" "$user" "$out"
  outdir "$out/model"
  check "cpu[$label] extract --model (TorchScript) == host" produces "$out/model/sampleA.csv" \
    "$WORK/host/model/sampleA.csv" "$c" "$user" "$out/model" \
    tilefeat extract "$TILES/sampleA" -o "$out/model/sampleA.csv" --model "$WORK/model/trunk.pt" -q
  check "cpu[$label] extract --format clam: h5_files/ + pt_files/ == host" clam_check "$c" "$user" "$out"
  render_task "$out/nf"
  check "cpu[$label] nextflow /bin/bash -ue .command.sh via entrypoint == host" \
    produces "$out/nf/sampleA.csv" "$WORK/host/nf/sampleA.csv" \
    "$c" "$user" "$out/nf" /usr/local/bin/tilefeat-entrypoint /bin/bash -ue .command.sh
}
version_is() {
  local got
  got=$(crun "$1" "$2" /data /usr/local/bin/tilefeat-entrypoint --version)
  echo "$got"
  [ "$got" = "tilefeat $TILEFEAT_VERSION" ]
}
h5_check() {
  local c=$1 user=$2 out=$3
  outdir "$out/h5"
  crun "$c" "$user" "$out/h5" tilefeat extract "$TILES/sampleA" -o "$out/h5/x.h5" --weights random:0 -q
  if cmp -s "$out/h5/x.h5" "$WORK/host/h5/x.h5"; then echo "HDF5 byte-identical"; fi
  same_h5 "$out/h5/x.h5" "$WORK/host/h5/x.h5"
  # nothing but the binary's own libraries: no libhdf5 in the image
  crun "$c" "$user" / sh -c '! ldd /usr/local/bin/tilefeat | grep -i hdf5 && ! find / -xdev -name "libhdf5*" | grep .'
}
# clam_check CONTAINER USER OUT: CLAM's layout (--outdir --format clam) from the image: its
# h5_files/sampleA.h5 has the host binary's HDF5 content, and its pt_files/sampleA.pt loads
# with torch.load(weights_only=True) (the host venv's torch: the image has libtorch only) as
# the host's bag, equal to the .h5's features.
clam_check() {
  local c=$1 user=$2 out=$3/clam
  outdir "$out"
  crun "$c" "$user" "$out" tilefeat extract "$TILES/sampleA" --outdir "$out" --format clam --weights random:0 -q
  ls -l "$out/h5_files" "$out/pt_files"
  test -f "$out/h5_files/sampleA.provenance.yaml" && test -f "$out/h5_files/sampleA.rejected.tsv"
  same_h5 "$out/h5_files/sampleA.h5" "$WORK/host/clam/h5_files/sampleA.h5"
  "$PY" - "$out/pt_files/sampleA.pt" "$WORK/host/clam/pt_files/sampleA.pt" "$out/h5_files/sampleA.h5" <<'PY'
import sys

import h5py
import torch

bag, host = (torch.load(p, weights_only=True) for p in sys.argv[1:3])
with h5py.File(sys.argv[3], "r") as f:
    features = torch.from_numpy(f["features"][()])
assert bag.dtype == torch.float32 and bag.ndim == 2, (bag.dtype, bag.shape)
assert torch.equal(bag, host) and torch.equal(bag, features), "the image's bag differs"
print("CLAM bag:", tuple(bag.shape), "float32, equal to the host's and to the .h5's features")
PY
}
built() { ! printf '%s\n' "${failed[@]}" | grep -qxF "$1"; }

if built "build cpu image"; then
  c=$(container "$CPU_IMAGE")
  cpu_checks "$c" 10001:10001 uid10001
  cpu_checks "$c" "$ARBITRARY_UID" "uid${ARBITRARY_UID%%:*}"
fi

# --- 3. weights baked in ----------------------------------------------------------------------

# expect_fail NAME PATTERN BUILD-ARG...: the CPU build fails, its log saying PATTERN.
expect_fail() {
  local name=$1 pattern=$2
  shift 2
  if build "$name" containers/Dockerfile.cpu "$NS/tilefeat:must-not-exist" "${CPU_ARGS[@]}" "$@"; then
    echo "the build succeeded" >&2
    return 1
  fi
  grep -- "$pattern" "$LOGS/build-$name.log"
}
if built "build cpu image"; then
  mkdir -p "$WEIGHTS_DIR"
  weights=$WEIGHTS_DIR/resnet50-standin.pth
  # A ResNet50 state dict (random init, torchvision's layout) standing in for the real file.
  "$PY" -c 'import sys, torch, torchvision
torch.manual_seed(0)
torch.save(torchvision.models.resnet50().state_dict(), sys.argv[1])' "$weights"
  sha=$(sha256sum "$weights" | cut -d' ' -f1)
  wrong=${sha:0:8}$(printf '%056d' 0)
  check "weights: wrong SHA-256 fails the build" expect_fail weights-wrong-sha ": FAILED" \
    WEIGHTS="$weights" WEIGHTS_SHA256="$wrong" WEIGHTS_SHA256_PREFIX="${sha:0:8}"
  check "weights: SHA-256 not starting 0676ba61 fails the build" expect_fail weights-wrong-prefix \
    "must be the full SHA-256" WEIGHTS="$weights" WEIGHTS_SHA256="$sha"
  check "build cpu image with weights" build cpu-weights containers/Dockerfile.cpu "$WEIGHTS_IMAGE" \
    "${CPU_ARGS[@]}" WEIGHTS="$weights" WEIGHTS_SHA256="$sha" WEIGHTS_SHA256_PREFIX="${sha:0:8}"
  if built "build cpu image with weights"; then
    "$BIN" extract "$TILES/sampleA" -o "$WORK/host/weights.csv" --weights "$REPO/$weights" -q
    c=$(container "$WEIGHTS_IMAGE")
    out=$WORK/weights
    outdir "$out"
    check "weights: extract without --weights uses the baked-in file == host" produces \
      "$out/weights.csv" "$WORK/host/weights.csv" "$c" "$ARBITRARY_UID" "$out" \
      tilefeat extract "$TILES/sampleA" -o "$out/weights.csv" -q
    check "weights: provenance names the baked-in file" \
      grep -F /opt/tilefeat/torch/hub/checkpoints/resnet50-0676ba61.pth "$out/weights.provenance.yaml"
  fi
fi

# --- 4. CUDA image ----------------------------------------------------------------------------

cuda_info() {
  local got
  got=$(crun "$1" 10001:10001 /data /usr/local/bin/tilefeat-entrypoint info)
  echo "$got"
  grep -qx "cuda available: false" <<<"$got"
}
exits_5() {
  local rc=0
  crun "$@" || rc=$?
  echo "exit status $rc"
  [ "$rc" = 5 ]
}
check "build cuda image" build cuda containers/Dockerfile "$CUDA_IMAGE"
if built "build cuda image"; then
  c=$(container "$CUDA_IMAGE")
  out=$WORK/cuda
  outdir "$out"
  check "cuda info: CUDA unavailable" cuda_info "$c"
  check "cuda extract --device cpu == host" produces "$out/sampleA.csv" "$WORK/host/sampleA.csv" \
    "$c" 10001:10001 "$out" tilefeat extract "$TILES/sampleA" -o "$out/sampleA.csv" --weights random:0 --device cpu -q
  check "cuda extract --device cuda exits 5" exits_5 \
    "$c" 10001:10001 "$out" tilefeat extract "$TILES/sampleA" -o "$out/gpu.csv" --weights random:0 --device cuda -q
fi

# --- 5. sizes, times, summary -----------------------------------------------------------------

summary
[ "${#failed[@]}" = 0 ]
