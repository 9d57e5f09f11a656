#!/usr/bin/env bash
# A real single-node SLURM (slurmctld + slurmd + munge) for testing scripts/slurm/, as root.
#
# Usage: tests/slurm/local_slurm.sh up|down|status
#   up      install the Debian packages if missing, start a private munged, write slurm.conf and
#           gres.conf into the state dir, start slurmctld and slurmd, wait until the node is idle.
#           Idempotent: returns at once when the cluster is already up and healthy; restarts it
#           cleanly when it is half up. Prints the line to eval for client commands:
#             export SLURM_CONF=<state>/slurm.conf
#   down    cancel every job, stop slurmd, slurmctld and munged by their pid files, remove the
#           state dir (and with it the conf files). Safe to run when nothing is up.
#   status  exit 0 iff the cluster is up and the node is usable.
#
# Everything lives in the state dir: no file outside it is written except the packages' own.
# Client commands find the cluster through SLURM_CONF (jobs inherit it from the submitter).
#
# Environment knobs:
#   HPT_SLURM_STATE       state dir (default /tmp/hpt-slurm): conf, spool, logs, pid files, sockets
#   HPT_SLURM_CTLD_PORT   slurmctld port (default 6817)
#   HPT_SLURMD_PORT       slurmd port (default 6818)
#   HPT_SLURM_FAKE_GPUS   number of GPUs to fake as GRES "gpu" (char devices in the state dir;
#                         labels only, CUDA stays unavailable); 0 disables (default 2)
#   HPT_SLURM_TIMEOUT     seconds to wait for each daemon to come up or go down (default 30)
#   HPT_SLURM_NO_INSTALL  1: never run apt-get; fail if the packages are missing (default 0)
set -euo pipefail

STATE=${HPT_SLURM_STATE:-/tmp/hpt-slurm}
CTLD_PORT=${HPT_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${HPT_SLURMD_PORT:-6818}
FAKE_GPUS=${HPT_SLURM_FAKE_GPUS:-2}
TIMEOUT=${HPT_SLURM_TIMEOUT:-30}
NODE=$(hostname -s)
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
export SLURM_CONF=$STATE/slurm.conf

log() { echo "local_slurm: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# A pid is alive if it exists and is not a zombie (PID 1 may reap orphans late).
alive() {
  local pid=$1 state
  [[ -n $pid && -r /proc/$pid/stat ]] || return 1
  state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

dead() { ! alive "$1"; }

pid_from() { if [[ -s $1 ]]; then tr -dc '0-9' <"$1"; fi; }

# wait_until SECONDS CMD...: poll CMD every 0.2 s until it succeeds.
wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

stop_pidfile() {  # stop_pidfile NAME FILE: TERM, wait, then KILL
  local name=$1 pid
  pid=$(pid_from "$2")
  alive "$pid" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_until "$TIMEOUT" dead "$pid"; then
    log "$name did not stop on TERM; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_until 5 dead "$pid" || die "$name (pid $pid) survived SIGKILL"
  fi
}

install_packages() {
  local missing=()
  local cmd
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  ((${#missing[@]} == 0)) && return 0
  [[ ${HPT_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and HPT_SLURM_NO_INSTALL=1"
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; installing them needs root"
  log "installing slurmctld slurmd slurm-client munge"
  local apt=(apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >"$STATE.apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update >>"$STATE.apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" >>"$STATE.apt.log" 2>&1 ||
      die "apt-get install failed: $(tail -n 5 "$STATE.apt.log")"
  fi
  rm -f "$STATE.apt.log"
}

munge_ok() { munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
  [[ -r /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall the munge package)"
  install -d -o munge -g munge -m 0755 "$MUNGE_DIR"  # clients need to reach the socket
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file=/etc/munge/munge.key \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" ||
    die "munged failed to start: $(tail -n 5 "$MUNGE_DIR/munged.log" 2>/dev/null)"
  wait_until "$TIMEOUT" munge_ok || die "munge does not answer on $MUNGE_SOCKET"
}

node_layout() {  # the CPU layout line of `slurmd -C`, RealMemory at 85%
  local line mem
  line=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
  line=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$line")
  echo "$line RealMemory=$((mem * 85 / 100))"
}

write_conf() {
  local gres_line=""
  mkdir -p "$STATE/ctld" "$STATE/spool"
  if ((FAKE_GPUS > 0)); then
    mkdir -p "$STATE/dev"
    local i
    for ((i = 0; i < FAKE_GPUS; i++)); do
      [[ -e $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 195 "$i"
    done
    gres_line=" Gres=gpu:$FAKE_GPUS"
    echo "NodeName=$NODE Name=gpu File=$STATE/dev/gpu[0-$((FAKE_GPUS - 1))]" >"$STATE/gres.conf"
  else
    : >"$STATE/gres.conf"
  fi
  cat >"$SLURM_CONF" <<EOF
# Written by tests/slurm/local_slurm.sh; removed by its 'down'.
ClusterName=hptlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# requeued jobs become eligible by time: scan often so they restart promptly
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
EnforcePartLimits=ALL
MailProg=/bin/true
KillWait=5
GresTypes=gpu
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 $(node_layout)$gres_line
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null; }
node_idle() { [[ $(node_state) == idle ]]; }
node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

healthy() {
  [[ -s $SLURM_CONF ]] && alive "$(pid_from "$MUNGE_DIR/munged.pid")" &&
    alive "$(pid_from "$STATE/slurmctld.pid")" && alive "$(pid_from "$STATE/slurmd.pid")" &&
    ctld_up && node_usable
}

up() {
  if healthy; then
    log "already up ($NODE $(node_state))"
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  [[ -e $STATE ]] && { log "found a stale state dir; cleaning it first"; down; }
  trap 'rc=$?; ((rc == 0)) || { log "bring-up failed; stopping what was started"; down; }' EXIT
  mkdir -p "$STATE"
  chmod 0755 "$STATE"
  install_packages
  start_munge
  write_conf
  slurmctld -i || die "slurmctld failed: $(tail -n 5 "$STATE/slurmctld.log" 2>/dev/null)"
  wait_until "$TIMEOUT" ctld_up ||
    die "slurmctld is not UP after ${TIMEOUT}s: $(tail -n 5 "$STATE/slurmctld.log" 2>/dev/null)"
  slurmd -N "$NODE" || die "slurmd failed: $(tail -n 5 "$STATE/slurmd.log" 2>/dev/null)"
  wait_until "$TIMEOUT" node_idle ||
    die "node $NODE is '$(node_state)', not idle: $(tail -n 5 "$STATE/slurmd.log" 2>/dev/null)"
  log "up: node $NODE idle"
  echo "export SLURM_CONF=$SLURM_CONF"
}

no_jobs_left() {
  [[ -z $(squeue -h -o %A 2>/dev/null) ]] && ! compgen -G "$STATE/spool/${NODE}_*" >/dev/null
}

cancel_jobs() {
  alive "$(pid_from "$STATE/slurmctld.pid")" && ctld_up || return 0
  local ids
  ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  [[ -z ${ids// /} ]] && return 0
  log "cancelling jobs: $ids"
  # shellcheck disable=SC2086  # a list of numeric job ids
  scancel $ids 2>/dev/null || true
  wait_until "$TIMEOUT" no_jobs_left || log "jobs still present after ${TIMEOUT}s: $(squeue -h 2>&1)"
}

down() {
  if [[ -d $STATE ]]; then
    cancel_jobs
    stop_pidfile slurmd "$STATE/slurmd.pid"
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
    stop_pidfile munged "$MUNGE_DIR/munged.pid"
    rm -rf "$STATE"
  fi
  log "down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) healthy ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
