#!/usr/bin/env bash
# Start a throwaway single-node Slurm cluster on this machine (CI, laptops, tests):
# munged, slurmctld and slurmd, one partition "debug", and fake GPUs declared as GRES so
# that jobs asking for `--gpus`/`--gres=gpu:N` are scheduled and see CUDA_VISIBLE_DEVICES.
# No accounting (no slurmdbd): run the Snakemake Slurm executor with
# `--slurm-status-command squeue` (MinJobAge is 300 s here, so squeue still sees jobs
# that have finished).
#
#   scripts/slurm/start.sh     start (idempotent: returns at once if already up)
#   scripts/slurm/stop.sh      stop what this script started (idempotent)
#
# Debian/Ubuntu only; needs root. Installs slurmctld, slurmd, slurm-client and munge with
# apt-get if they are missing. There is no systemd in the machines this is made for, so the
# daemons are started here and stopped by pid. It writes /etc/slurm/slurm.conf and
# /etc/slurm/gres.conf (where the Slurm commands look for them) and refuses to replace
# files it did not write. Everything else lives in $TILEFEAT_SLURM_DIR.
#
# Environment:
#   TILEFEAT_SLURM_DIR   state, logs, pid files, fake GPU devices (default /var/tmp/tilefeat-slurm)
#   TILEFEAT_SLURM_CPUS  CPUs the node offers (default: max(nproc, 4); more than the
#                        machine has is allowed, jobs then share cores)
#   TILEFEAT_SLURM_GPUS  fake GPUs on the node (default 4)
#   TILEFEAT_SLURM_MEM   node memory in MB (default: 90% of MemTotal)
set -euo pipefail

DIR=${TILEFEAT_SLURM_DIR:-/var/tmp/tilefeat-slurm}
CONF_DIR=/etc/slurm
MARK="# written by tilefeat scripts/slurm/start.sh"
NODE=$(hostname -s)

log() { echo "slurm/start: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"

# Alive = a pid file from us whose process still runs the expected program.
alive() { # name pidfile
  local pid
  [ -s "$2" ] || return 1
  pid=$(cat "$2")
  [ -d "/proc/$pid" ] && grep -q "$1" "/proc/$pid/comm" 2>/dev/null
}

cluster_ready() {
  [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)" = idle ] ||
    [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)" = mixed ] ||
    [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)" = allocated ]
}

if alive slurmctld "$DIR/slurmctld.pid" && alive slurmd "$DIR/slurmd.pid" && cluster_ready; then
  log "already running (node $NODE: $(sinfo -h -n "$NODE" -o %T))"
  exit 0
fi

# --- packages ----------------------------------------------------------------------------
need=()
command -v munged >/dev/null || need+=(munge)
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${need[@]}" >"${TMPDIR:-/tmp}/tilefeat-slurm-apt.log" 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need[@]}" >"${TMPDIR:-/tmp}/tilefeat-slurm-apt.log" 2>&1 ||
      { tail -20 "${TMPDIR:-/tmp}/tilefeat-slurm-apt.log" >&2; die "apt-get install failed"; }
  fi
fi

# --- layout ------------------------------------------------------------------------------
mkdir -p "$DIR"/{state,spool,log,dev}
chmod 755 "$DIR"
for conf in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
  if [ -e "$conf" ] && ! grep -qF "$MARK" "$conf"; then
    die "$conf exists and was not written by this script; not touching a real cluster's configuration"
  fi
done

ncpu=$(nproc)
CPUS=${TILEFEAT_SLURM_CPUS:-$((ncpu > 4 ? ncpu : 4))}
GPUS=${TILEFEAT_SLURM_GPUS:-4}
MEM=${TILEFEAT_SLURM_MEM:-$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)}

# Fake GPUs: Slurm only hands out GRES files that are character devices (a plain file gives
# an empty CUDA_VISIBLE_DEVICES), so make char devices with /dev/null's numbers.
for ((i = 0; i < GPUS; i++)); do
  dev="$DIR/dev/nvidia$i"
  if [ ! -c "$dev" ]; then
    rm -f "$dev"
    mknod "$dev" c 1 3 2>/dev/null || ln -s /dev/null "$dev"
  fi
done

mkdir -p "$CONF_DIR"
cat >"$CONF_DIR/slurm.conf" <<EOF
$MARK ($(date -u +%FT%TZ)); scripts/slurm/stop.sh removes it.
ClusterName=tilefeat
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups/systemd here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default each job would take the whole node's memory and jobs would run one at a time
DefMemPerCPU=256
# finished jobs stay visible to squeue for 5 min (the Snakemake executor's squeue status checks)
MinJobAge=300
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
{
  echo "$MARK"
  echo "AutoDetect=off"
  echo "NodeName=$NODE Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]"
} >"$CONF_DIR/gres.conf"

# --- munge -------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 600 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 755 /run/munge
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  : # a munged is already answering (ours or the system's); use it
else
  log "starting munged"
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  rm -f /run/munge/munged.pid
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  else
    /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
  fi
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null | unmunge >/dev/null || die "munged does not answer"
  cp /run/munge/munged.pid "$DIR/munged.pid" # stop.sh stops only a munged started here
fi

# --- slurm daemons -----------------------------------------------------------------------
if ! alive slurmctld "$DIR/slurmctld.pid"; then
  log "starting slurmctld"
  slurmctld -c # -c: clear old job state, this is a throwaway cluster
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || { tail -20 "$DIR/log/slurmctld.log" >&2; die "slurmctld does not answer"; }

if ! alive slurmd "$DIR/slurmd.pid"; then
  log "starting slurmd"
  slurmd
fi
for _ in $(seq 150); do cluster_ready && break; sleep 0.2; done
if ! cluster_ready; then
  scontrol update nodename="$NODE" state=resume 2>/dev/null || true
  for _ in $(seq 50); do cluster_ready && break; sleep 0.2; done
fi
cluster_ready || {
  sinfo -N -l >&2 || true
  tail -20 "$DIR/log/slurmd.log" >&2
  die "node $NODE did not become idle"
}
log "up: node $NODE, $CPUS CPUs, ${MEM} MB, gpu:$GPUS (fake), partition debug; logs in $DIR/log"
