#!/usr/bin/env bash
# Ray on a SLURM allocation: start the cluster, run one driver command on the head node, tear down.
#
# Usage (inside an allocation: an sbatch script or salloc):
#   scripts/slurm/ray_cluster.sh DRIVER_CMD [ARGS...]
#   scripts/slurm/ray_cluster.sh --help
#
# What it does:
#   1. The head is the first node of the allocation: `srun --overlap --nodes=1 --ntasks=1 -w HEAD
#      ray start --head --block`; one such srun per other node runs `ray start --address HEAD --block`.
#   2. Waits until Ray reports every node and the expected CPUs and GPUs (HPT_RAY_START_TIMEOUT).
#   3. Writes $RUN_DIR/attach.sh: an interactive shell on the head node with RAY_ADDRESS set
#      (`$RUN_DIR/attach.sh` for a shell, `$RUN_DIR/attach.sh ray status` for one command).
#   4. Runs DRIVER_CMD on the head node with RAY_ADDRESS=HEAD_IP:PORT exported: in this shell when
#      it runs on the head (the batch script of an sbatch job does), else through srun.
#   5. Exits as soon as the driver exits (with the driver's exit code) or any Ray srun dies (exit 1,
#      naming the node and showing the end of its log). On exit (trap EXIT) it stops the driver
#      (TERM, then KILL after HPT_RAY_STOP_TIMEOUT), then every Ray srun (the same way).
#   Signals: USR1 and TERM are forwarded to the driver (the trainer checkpoints and exits 75). A
#   USR1 that arrives before the driver started makes the script exit 75 (nothing to save yet).
#
# Environment knobs (ports: unset = the default shown; set to "" = let Ray choose a free port):
#   RUN_DIR                        run directory: ray/ logs and attach.sh go here
#                                  (default $SLURM_SUBMIT_DIR/ray-$SLURM_JOB_ID)
#   HPT_RAY_NODES                  space-separated node names, head first (default: the allocation's
#                                  nodes, from SLURM_JOB_NODELIST)
#   HPT_NET_IFACE                  network interface whose IPv4 address Ray uses on every node
#                                  (default: the first address of `hostname -I`, Ray's choice on workers)
#   HPT_RAY_HEAD_IP                the head's address, overriding the interface lookup
#   HPT_RAY_PORT                   GCS port on the head (6379)
#   HPT_RAY_NODE_MANAGER_PORT      raylet port on every node (6380)
#   HPT_RAY_OBJECT_MANAGER_PORT    object manager port on every node (6381)
#   HPT_RAY_CLIENT_PORT            Ray client server port on the head (10001)
#   HPT_RAY_MIN_WORKER_PORT        lowest worker port (10002)
#   HPT_RAY_MAX_WORKER_PORT        highest worker port (19999; keep the fixed ports outside the range)
#   HPT_RAY_DASHBOARD_AGENT_PORT   dashboard agent HTTP port (52365; gRPC uses the next port)
#   HPT_RAY_RUNTIME_ENV_AGENT_PORT runtime-env agent port (52367)
#   HPT_RAY_METRICS_PORT           metrics export port (52368)
#   HPT_RAY_DASHBOARD              1: start the dashboard bound to 127.0.0.1 (default 0: off)
#   HPT_RAY_DASHBOARD_PORT         dashboard port when enabled (8265); reach it with an ssh tunnel
#   HPT_RAY_TMPDIR                 Ray's temp dir on every node; keep it short, Ray's socket paths
#                                  must stay under 107 bytes (default /tmp/ray-$SLURM_JOB_ID)
#   HPT_RAY_NUM_CPUS               CPUs Ray may use per node (default SLURM_CPUS_ON_NODE)
#   HPT_RAY_NUM_GPUS               GPUs per node (default the batch node's SLURM_GPUS_ON_NODE, else 0);
#                                  each Ray srun asks for them with --gres=gpu:N (an --exclusive job
#                                  holds every GPU of its nodes, but a step gets none unless it asks)
#   HPT_RAY_EXTRA_ARGS             extra `ray start` arguments for every node (split on spaces)
#   HPT_RAY_START_TIMEOUT          seconds to wait for the whole cluster (300)
#   HPT_RAY_STOP_TIMEOUT           seconds the driver and each srun get to exit on teardown (30)
#   HPT_RAY_POLL                   seconds between health checks while waiting (2)
#   HPT_RAY_AUTH                   1 (default): token authentication with a fresh random token per job
#                                  in $RUN_DIR/ray/auth_token (mode 600), shared by every node, the
#                                  readiness probe and the driver; 0: Ray's own default. A per-job token
#                                  also keeps a stale ~/.ray/auth_token (left by a local ray.init) from
#                                  locking the launcher out of its own cluster.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")

usage() { sed -n '2,/^set -euo pipefail/p' "$SELF" | sed -e '$d' -e '/^#SBATCH/!s/^# \{0,1\}//'; }
log() { echo "ray_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- pieces shared by the launcher and the per-node mode ------------------------------------------

iface_ip() {  # IPv4 address of interface $1
  local ip
  ip=$(ip -o -4 addr show dev "$1" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
  [[ -n $ip ]] || die "HPT_NET_IFACE=$1: no IPv4 address on this node ($(hostname -s))"
  echo "$ip"
}

local_ip() {
  if [[ -n ${HPT_NET_IFACE:-} ]]; then
    iface_ip "$HPT_NET_IFACE"
  else
    local ips
    read -ra ips <<<"$(hostname -I 2>/dev/null || true)"
    [[ ${#ips[@]} -gt 0 ]] || read -ra ips <<<"$(hostname -i)"
    echo "${ips[0]}"
  fi
}

node_args() {  # ray start arguments common to head and workers, one per line
  local agent_port=${HPT_RAY_DASHBOARD_AGENT_PORT-52365} port extra
  echo "--block"
  echo "--disable-usage-stats"
  echo "--temp-dir=$RAY_TMPDIR"
  echo "--num-cpus=${HPT_RAY_NUM_CPUS:-${SLURM_CPUS_ON_NODE:?SLURM_CPUS_ON_NODE is not set}}"
  echo "--num-gpus=$HPT_RAY_NUM_GPUS"
  for port in \
    "node-manager-port=${HPT_RAY_NODE_MANAGER_PORT-6380}" \
    "object-manager-port=${HPT_RAY_OBJECT_MANAGER_PORT-6381}" \
    "min-worker-port=${HPT_RAY_MIN_WORKER_PORT-10002}" \
    "max-worker-port=${HPT_RAY_MAX_WORKER_PORT-19999}" \
    "dashboard-agent-listen-port=$agent_port" \
    "dashboard-agent-grpc-port=${agent_port:+$((agent_port + 1))}" \
    "runtime-env-agent-port=${HPT_RAY_RUNTIME_ENV_AGENT_PORT-52367}" \
    "metrics-export-port=${HPT_RAY_METRICS_PORT-52368}"; do
    [[ -z ${port#*=} ]] || echo "--$port"  # empty: Ray picks the port
  done
  read -ra extra <<<"${HPT_RAY_EXTRA_ARGS:-}"
  if ((${#extra[@]})); then printf '%s\n' "${extra[@]}"; fi
}

# Per-node mode, run by srun on each node: `ray_cluster.sh --node head HEAD_IP` or
# `ray_cluster.sh --node worker HEAD_IP:PORT`. exec so that srun's signals reach ray directly.
run_node() {
  local role=$1 target=$2 args
  unset RAY_ADDRESS
  mapfile -t args < <(node_args)
  if [[ $role == worker ]]; then
    [[ -z ${HPT_NET_IFACE:-} ]] || args+=("--node-ip-address=$(iface_ip "$HPT_NET_IFACE")")
    exec ray start "--address=$target" "${args[@]}"
  fi
  local client_port=${HPT_RAY_CLIENT_PORT-10001}
  [[ -z $client_port ]] || args+=("--ray-client-server-port=$client_port")
  if [[ ${HPT_RAY_DASHBOARD:-0} == 1 ]]; then
    args+=(--include-dashboard=true --dashboard-host=127.0.0.1 "--dashboard-port=${HPT_RAY_DASHBOARD_PORT:-8265}")
  else
    args+=(--include-dashboard=false)
  fi
  exec ray start --head "--port=$RAY_PORT" "--node-ip-address=$target" "${args[@]}"
}

# --- the launcher ---------------------------------------------------------------------------------

alive() {  # a child pid that has not exited (zombies count as dead)
  local state
  state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

cpus_per_node() {  # "node cpus" lines from SLURM_JOB_NODELIST and SLURM_JOB_CPUS_PER_NODE ("8(x2),4")
  local nodes counts=() part n k i=0
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  IFS=, read -ra parts <<<"$SLURM_JOB_CPUS_PER_NODE"
  for part in "${parts[@]}"; do
    n=${part%%(*}
    k=1
    [[ $part == *"(x"* ]] && { k=${part#*(x}; k=${k%)}; }
    while ((k-- > 0)); do counts+=("$n"); done
  done
  for ((i = 0; i < ${#nodes[@]}; i++)); do echo "${nodes[i]} ${counts[i]}"; done
}

expected_cpus() {
  local node total=0 name n
  if [[ -n ${HPT_RAY_NUM_CPUS:-} ]]; then
    echo $((HPT_RAY_NUM_CPUS * ${#NODES[@]}))
    return
  fi
  declare -A per_node=()
  while read -r name n; do per_node[$name]=$n; done < <(cpus_per_node)
  for node in "${NODES[@]}"; do total=$((total + ${per_node[$node]:-0})); done
  echo "$total"
}

# "NODES CPUS GPUS" as `ray status` reports them; fails if the GCS does not answer.
ray_totals() {
  timeout 20 ray status --address="$RAY_ADDRESS" 2>/dev/null | awk '
    /^Active:/ {active = 1; next}
    /^Pending:/ {active = 0}
    active && /node_/ {nodes += $1}
    / CPU$/ {split($1, a, "/"); cpus = a[2]}
    / GPU$/ {split($1, a, "/"); gpus = a[2]}
    END {if (nodes == "") exit 1; printf "%d %d %d\n", nodes, cpus, gpus}'
}

check_sruns() {  # die naming the node whose Ray srun has exited
  local pid
  for pid in "${!ROLE[@]}"; do
    alive "$pid" || srun_died "$pid"
  done
}

srun_died() {
  local pid=$1 rc=0
  wait "$pid" || rc=$?
  local what=${ROLE[$pid]} log_file=${LOGS[$pid]}
  unset "ROLE[$pid]"
  log "ERROR: Ray $what exited (srun exit code $rc); last lines of $log_file:"
  tail -n 20 "$log_file" >&2 || true
  DIED="Ray $what died"
  exit 1
}

wait_for_cluster() {
  local deadline=$((SECONDS + ${HPT_RAY_START_TIMEOUT:-300})) want_nodes=${#NODES[@]}
  local want_cpus want_gpus totals="" nodes cpus gpus
  want_cpus=$(expected_cpus)
  want_gpus=$((HPT_RAY_NUM_GPUS * want_nodes))
  log "waiting for $want_nodes node(s), $want_cpus CPU(s), $want_gpus GPU(s) at $RAY_ADDRESS"
  while :; do
    check_sruns
    ((PREEMPTED == 0)) || exit 75
    if totals=$(ray_totals); then
      read -r nodes cpus gpus <<<"$totals"
      if ((nodes >= want_nodes && cpus >= want_cpus && gpus >= want_gpus)); then
        log "Ray is up: $nodes node(s), $cpus CPU(s), $gpus GPU(s)"
        return 0
      fi
    fi
    ((SECONDS < deadline)) ||
      die "Ray not ready after ${HPT_RAY_START_TIMEOUT:-300}s (nodes cpus gpus: ${totals:-no answer}; want $want_nodes $want_cpus $want_gpus); logs in $RUN_DIR/ray/"
    sleep "${HPT_RAY_POLL:-2}"
  done
}

start_node() {  # start_node ROLE NODE TARGET
  local log_file=$RUN_DIR/ray/$1-$2.log pid
  srun --overlap --nodes=1 --ntasks=1 -w "$2" --job-name="ray-$1" "--gres=$GRES" \
    bash "$SELF" --node "$1" "$3" </dev/null >>"$log_file" 2>&1 &
  pid=$!
  ROLE[$pid]="$1 on node $2"
  LOGS[$pid]=$log_file
}

write_attach() {
  local f=$RUN_DIR/attach.sh
  cat >"$f" <<EOF
#!/usr/bin/env bash
# Open a shell (or run one command) on the Ray head node $HEAD of job $SLURM_JOB_ID, RAY_ADDRESS set.
#   $f              interactive shell
#   $f ray status   one command
set -euo pipefail
if [[ \$# -eq 0 ]]; then set -- bash -i; pty=(--pty); else pty=(); fi
exec srun --jobid=$SLURM_JOB_ID --overlap --nodes=1 --ntasks=1 -w $HEAD "\${pty[@]}" \\
  --export=ALL,RAY_ADDRESS=$RAY_ADDRESS${RAY_AUTH_MODE:+,RAY_AUTH_MODE=$RAY_AUTH_MODE,RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH} "\$@"
EOF
  chmod +x "$f"
  log "attach to the head node with: $f"
}

any_alive() {
  local pid
  for pid in "$@"; do alive "$pid" && return 0; done
  return 1
}

# stop_pids PID...: SIGTERM to all, wait up to HPT_RAY_STOP_TIMEOUT for all, then SIGKILL the rest.
stop_pids() {
  local pid deadline=$((SECONDS + ${HPT_RAY_STOP_TIMEOUT:-30}))
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  while any_alive "$@" && ((SECONDS < deadline)); do sleep 0.2; done
  for pid in "$@"; do
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
}

teardown() {
  local rc=$? pid
  trap - EXIT
  trap '' USR1 TERM INT  # finish tearing down even if SLURM signals again
  if [[ -n ${DRIVER_PID:-} ]]; then
    log "stopping the driver"
    stop_pids "$DRIVER_PID"  # first, so that it can checkpoint while Ray is still up
  fi
  for pid in "${!ROLE[@]}"; do log "stopping Ray ${ROLE[$pid]}"; done
  stop_pids "${!ROLE[@]}"
  [[ -n $DIED ]] && log "exit $rc: $DIED"
  exit "$rc"
}

on_signal() {  # forward to the driver; before it starts, a preemption notice means: requeue now
  if [[ -n ${DRIVER_PID:-} ]]; then
    log "got SIG$1; forwarding it to the driver (pid $DRIVER_PID)"
    kill "-$1" "$DRIVER_PID" 2>/dev/null || true
  elif [[ $1 == USR1 ]]; then
    log "got SIGUSR1 before the driver started"
    PREEMPTED=1
  else
    log "got SIG$1 before the driver started"
    exit 143
  fi
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# The batch script of an sbatch job runs on the first node; an salloc shell usually does not.
on_head() { [[ ${SLURMD_NODENAME:-$(hostname -s)} == "$HEAD" ]]; }

run_driver() {
  local how=""
  if on_head; then
    "$@" &
  else
    srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" --export="ALL,RAY_ADDRESS=$RAY_ADDRESS" "$@" &
    how=" through srun"
  fi
  DRIVER_PID=$!
  log "driver (pid $DRIVER_PID) on $HEAD$how: $*"
  local done_pid rc
  while :; do
    rc=0
    unset done_pid
    wait -n -p done_pid "$DRIVER_PID" "${!ROLE[@]}" || rc=$?
    [[ -n ${done_pid:-} ]] || continue  # a trapped signal interrupted wait
    if [[ $done_pid == "$DRIVER_PID" ]]; then
      DRIVER_PID=""
      log "driver exited with code $rc"
      return "$rc"
    fi
    srun_died "$done_pid"
  done
}

launch() {
  [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM allocation (SLURM_JOB_ID is unset)"
  command -v ray >/dev/null || die "'ray' is not on PATH (activate the environment that has Ray)"
  RUN_DIR=${RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/ray-$SLURM_JOB_ID}
  mkdir -p "$RUN_DIR/ray"
  if [[ ${HPT_RAY_AUTH:-1} == 1 ]]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' >"$RUN_DIR/ray/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RUN_DIR/ray/auth_token
  fi
  if [[ -n ${HPT_RAY_NODES:-} ]]; then
    read -ra NODES <<<"$HPT_RAY_NODES"
  else
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  fi
  HEAD=${NODES[0]}
  local head_ip=${HPT_RAY_HEAD_IP:-}
  if [[ -z $head_ip ]] && on_head; then
    head_ip=$(local_ip)
  elif [[ -z $head_ip ]]; then
    head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" bash "$SELF" --print-ip) ||
      die "could not ask the head node $HEAD for its address with srun"
  fi
  export RAY_ADDRESS=$head_ip:$RAY_PORT
  export HPT_RAY_NUM_GPUS=${HPT_RAY_NUM_GPUS:-${SLURM_GPUS_ON_NODE:-0}}
  GRES=none
  ((HPT_RAY_NUM_GPUS == 0)) || GRES=gpu:$HPT_RAY_NUM_GPUS
  declare -gA ROLE=() LOGS=()  # pid of each Ray srun -> "head on node X" / its log file
  DRIVER_PID="" DIED="" PREEMPTED=0
  trap teardown EXIT
  trap 'on_signal USR1' USR1
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  log "job $SLURM_JOB_ID: head $HEAD ($RAY_ADDRESS), ${#NODES[@]} node(s), temp dir $RAY_TMPDIR"
  start_node head "$HEAD" "$head_ip"
  local deadline=$((SECONDS + ${HPT_RAY_START_TIMEOUT:-300}))
  until port_open "$head_ip" "$RAY_PORT"; do
    check_sruns
    ((PREEMPTED == 0)) || exit 75
    ((SECONDS < deadline)) || die "the Ray head's GCS ($RAY_ADDRESS) did not open; see $RUN_DIR/ray/"
    sleep 0.5
  done
  local node
  for node in "${NODES[@]:1}"; do start_node worker "$node" "$RAY_ADDRESS"; done
  wait_for_cluster
  write_attach
  run_driver "$@"
}

RAY_PORT=${HPT_RAY_PORT:-6379}
RAY_TMPDIR=${HPT_RAY_TMPDIR:-/tmp/ray-${SLURM_JOB_ID:-$$}}
case ${1:-} in
  -h | --help) usage ;;
  --node) run_node "$2" "$3" ;;
  --print-ip) local_ip ;;
  "") usage >&2; exit 2 ;;
  *) launch "$@" ;;
esac
