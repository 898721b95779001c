#!/usr/bin/env bash
# Stop the single-node Slurm cluster that scripts/slurm/start.sh started: slurmd, slurmctld
# and (only if start.sh started it) munged, each by the pid it recorded. Idempotent.
#
#   scripts/slurm/stop.sh           stop the daemons and remove the /etc/slurm/{slurm,gres}.conf
#                                   that start.sh wrote (start.sh writes them afresh; left
#                                   behind with no slurmctld, they make every Slurm command,
#                                   and every Snakemake start with the Slurm plugin installed,
#                                   wait ~10 s for a controller that is not there)
#   scripts/slurm/stop.sh --purge   also remove $TILEFEAT_SLURM_DIR (state, logs)
set -euo pipefail

DIR=${TILEFEAT_SLURM_DIR:-/var/tmp/tilefeat-slurm}
MARK="# written by tilefeat scripts/slurm/start.sh"
purge=0
for arg in "$@"; do
  case "$arg" in
    --purge) purge=1 ;;
    *) echo "slurm/stop: unknown option $arg" >&2; exit 2 ;;
  esac
done

log() { echo "slurm/stop: $*" >&2; }

stop() { # name pidfile
  local name=$1 pidfile=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if [ -d "/proc/$pid" ] && grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then
      log "$name (pid $pid) did not exit in 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

# Jobs still running would be orphaned; cancel them first (best effort, only if slurmctld answers).
if [ -s "$DIR/slurmctld.pid" ] && command -v scancel >/dev/null && scontrol ping 2>/dev/null | grep -q UP; then
  scancel --quiet --user="$(id -un)" 2>/dev/null || true
fi

stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munged.pid"

for conf in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
  if [ -e "$conf" ] && grep -qF "$MARK" "$conf"; then rm -f "$conf"; fi
done
if [ "$purge" = 1 ]; then
  case "$DIR" in
    /|"") ;;
    *) rm -rf "$DIR" ;;
  esac
  log "purged $DIR"
fi
log "stopped"
