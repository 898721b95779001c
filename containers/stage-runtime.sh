#!/usr/bin/env bash
# What a tilefeat container carries at run time, in one place, for every recipe
# (containers/Dockerfile, containers/Dockerfile.cpu, containers/tilefeat-native.def).
#
#   containers/stage-runtime.sh STAGE   in the builder, after `scripts/setup.sh --build-only`:
#       copy target/release/tilefeat to STAGE/usr/local/bin/ and the shared libraries libtorch
#       loads into STAGE, each under the SAME absolute path it has in the builder's venv, so
#       the RUNPATH baked into the binary (build.rs) and the wheels' $ORIGIN-relative RPATHs
#       keep working with no LD_LIBRARY_PATH. Python itself is not copied (not needed).
#   /usr/local/libexec/tilefeat/stage-runtime.sh --check   in the runtime image (the stage
#       puts this script there): every library the binary and libtorch load (also the lazily
#       dlopen()ed ones: cuDNN engines, NVRTC, cuSOLVER) resolves; only the driver (libcuda,
#       which --gpus / --nv bring from the host) may be missing. Needs only ldd (no readelf):
#       the directories come from STAGE/usr/local/libexec/tilefeat/lib-dirs.
#
# Which directories: the closure of the RPATH/RUNPATH entries of torch/lib and of everything
# they point to (for the CUDA 13 wheels: site-packages/nvidia/{cu13,cudnn,cusparselt,nccl,
# nvshmem}/lib); a CPU wheel has none. Environment: VENV (default .venv, as setup.sh),
# BIN (default target/release/tilefeat).
set -euo pipefail

die() { echo "stage-runtime.sh: $*" >&2; exit 1; }

# The RPATH or RUNPATH entries of an ELF file, one per line, $ORIGIN expanded.
elf_paths() {
  local file=$1 origin
  origin=$(dirname "$file")
  readelf -d "$file" 2>/dev/null |
    sed -n 's/.*(R\(UN\)\{0,1\}PATH).*\[\(.*\)\]$/\2/p' | tr ':' '\n' |
    sed -e "s|\${ORIGIN}|$origin|g" -e "s|\$ORIGIN|$origin|g" | sed '/^$/d'
}

# Libraries a pip wheel ships that nothing in libtorch links or dlopen()s (checked with
# readelf -d and grep -a over torch/lib and nvidia/*/lib for torch 2.11.0 + CUDA 13.0):
# multi-GPU cuSOLVER, the BLAS/FFTW drop-in shims, the alternative NVRTC build (~220 MB),
# and libtorch's Python bindings.
UNUSED=('libcusolverMg.so.*' 'libnvblas.so.*' 'libcufftw.so.*' 'libnvrtc.alt.so.*'
  'libnvrtc-builtins.alt.so.*' 'libtorch_python.so')
# May be unresolved at image build time: the driver, which --gpus / --nv bring from the host.
HOST_PROVIDED='libcuda.so.1|libnvidia-ml.so.1'
# Plugins dlopen()ed only on InfiniBand/MPI clusters (cuFile RDMA, NVSHMEM bootstraps and
# transports); their own dependencies (libibverbs, MPI, UCX, ...) are not in the image.
OPTIONAL_PLUGINS=('libcufile_rdma.so.*' 'nvshmem_bootstrap_*' 'nvshmem_transport_*')

# matches NAME PATTERN...: NAME matches one of the glob patterns.
matches() {
  local name=$1 pat
  shift
  for pat in "$@"; do
    # shellcheck disable=SC2254 # $pat is a pattern on purpose
    case "$name" in $pat) return 0 ;; esac
  done
  return 1
}

# Directories to carry: torch/lib plus the closure of the RPATHs found in it.
lib_dirs() {
  local torch_lib=$1 site=$2 dir f p
  local -a queue=("$torch_lib")
  local -A seen=(["$torch_lib"]=1)
  while [ "${#queue[@]}" -gt 0 ]; do
    dir=${queue[0]}
    queue=("${queue[@]:1}")
    echo "$dir"
    for f in "$dir"/*.so*; do
      [ -f "$f" ] || continue
      while IFS= read -r p; do
        p=$(realpath -m "$p")
        case "$p" in "$site"/*) ;; *) continue ;; esac
        if [ -d "$p" ] && [ -z "${seen[$p]:-}" ]; then
          seen[$p]=1
          queue+=("$p")
        fi
      done < <(elf_paths "$f")
    done
  done
}

# The directory holding libtorch.so that BIN's RUNPATH names.
runpath_torch_lib() {
  local bin=$1 p
  while IFS= read -r p; do
    if [ -f "$p/libtorch.so" ]; then echo "$p"; return 0; fi
  done < <(elf_paths "$bin")
  return 1
}

check() {
  local bin manifest torch_lib f bad=0 out
  manifest=$(dirname "$0")/lib-dirs
  bin=$(command -v tilefeat) || die "tilefeat not on PATH"
  [ -f "$manifest" ] || die "no $manifest (written by the stage step)"
  # No readelf in a slim image: ldd shows where the loader finds libtorch.
  torch_lib=$(ldd "$bin" | sed -n 's|.*libtorch\.so => \(/.*\)/libtorch\.so .*|\1|p')
  [ -n "$torch_lib" ] || die "$bin does not find libtorch.so: $(ldd "$bin" 2>&1 | grep libtorch)"
  grep -qxF "$torch_lib" "$manifest" || die "$bin loads libtorch from $torch_lib, not a staged directory"
  while IFS= read -r f; do
    if matches "$(basename "$f")" "${OPTIONAL_PLUGINS[@]}"; then continue; fi
    out=$(ldd "$f" 2>&1 | grep 'not found' | grep -v -E "^[[:space:]]*($HOST_PROVIDED) " || true)
    if [ -n "$out" ]; then
      echo "stage-runtime.sh: $f: unresolved:" >&2
      echo "$out" >&2
      bad=1
    fi
  done < <(echo "$bin"; while IFS= read -r dir; do
    find "$dir" -maxdepth 1 -type f -name '*.so*' | sort; done <"$manifest")
  [ "$bad" = 0 ] || die "missing shared libraries (see above)"
  echo "stage-runtime.sh: all libraries of $bin resolve (libtorch in $torch_lib)"
}

stage() {
  local stage venv bin site torch_lib dir rel f n=0 bytes
  stage=$(realpath -m "$1")
  cd "$(dirname "$0")/.."
  venv=${VENV:-.venv}
  bin=${BIN:-target/release/tilefeat}
  [ -x "$bin" ] || die "$bin not built (run scripts/setup.sh --build-only first)"
  [ -x "$venv/bin/python" ] || die "no venv at $venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  site=$(realpath "$site")
  torch_lib=$site/torch/lib
  [ -f "$torch_lib/libtorch.so" ] || die "no libtorch in $torch_lib"
  # The binary must look for libtorch exactly where we put it, or nothing below works.
  [ "$(runpath_torch_lib "$bin" || true)" = "$torch_lib" ] ||
    die "$bin RUNPATH ($(elf_paths "$bin" | paste -sd:)) does not name $torch_lib"

  install -D -m 0755 "$bin" "$stage/usr/local/bin/tilefeat"
  # This script goes along, for `--check` in the image build and in `apptainer test`.
  install -D -m 0755 containers/stage-runtime.sh "$stage/usr/local/libexec/tilefeat/stage-runtime.sh"
  lib_dirs "$torch_lib" "$site" >"$stage/usr/local/libexec/tilefeat/lib-dirs"
  while IFS= read -r dir; do
    mkdir -p "$stage$dir"
    for f in "$dir"/*.so*; do
      [ -f "$f" ] || continue
      if matches "$(basename "$f")" "${UNUSED[@]}"; then continue; fi
      cp -a "$f" "$stage$dir/"
      n=$((n + 1))
    done
  done <"$stage/usr/local/libexec/tilefeat/lib-dirs"

  # OpenSlide, for slides: the openslide-bin wheel's one self-contained library (it needs
  # only glibc), under the path the binary looks in (build.rs bakes the wheel's folder in).
  if [ -f "$site/openslide_bin/libopenslide.so.1" ]; then
    echo "$site/openslide_bin" >>"$stage/usr/local/libexec/tilefeat/lib-dirs"
    install -D -m 0644 "$site/openslide_bin/libopenslide.so.1" \
      "$stage$site/openslide_bin/libopenslide.so.1"
    n=$((n + 1))
  fi

  # Licences of the redistributed wheels (torch: BSD-3-Clause; NVIDIA: CUDA EULA; OpenSlide
  # and the libraries inside it: LGPL-2.1 and others, listed in its wheel).
  for f in "$site"/torch-*.dist-info "$site"/nvidia_*.dist-info "$site"/openslide_bin-*.dist-info; do
    [ -d "$f/licenses" ] || continue
    rel=$(basename "$f" .dist-info)
    mkdir -p "$stage/usr/share/doc/tilefeat/third-party/$rel"
    cp -a "$f/licenses/." "$stage/usr/share/doc/tilefeat/third-party/$rel/"
  done

  bytes=$(du -sb "$stage" | cut -f1)
  echo "stage-runtime.sh: staged tilefeat + $n libraries from $site into $stage ($((bytes / 1048576)) MiB)"
}

case "${1:-}" in
  --check) check ;;
  "" | -*) die "usage: containers/stage-runtime.sh STAGE | --check" ;;
  *) stage "$1" ;;
esac
