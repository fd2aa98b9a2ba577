#!/usr/bin/env bash
# N JAX processes on this machine, talking over 127.0.0.1 (multi-host code paths without a cluster).
#
# Usage:
#   launch/local_multiprocess.sh NUM_PROCESSES WORKDIR [CONFIG] [--config.x=y ...]
#   e.g. launch/local_multiprocess.sh 2 /tmp/e4t_mp configs/tiny.py --config.train.num_steps=20
#
# Each process gets E4T_COORDINATOR_ADDRESS / E4T_NUM_PROCESSES / E4T_PROCESS_ID (read by
# `initialize_from_env`). On CPU every process gets DEVICES_PER_PROCESS fake devices (default 4) and
# gloo collectives. On a multi-GPU machine set E4T_GPUS_PER_PROCESS to split the GPUs between them.
# Process 0 prints the logs; the others write to WORKDIR/process_<i>.log. Ctrl-C stops them all.
set -euo pipefail
NUM_PROCESSES="${1:?usage: launch/local_multiprocess.sh NUM_PROCESSES WORKDIR [CONFIG] [--config.x=y ...]}"
WORKDIR="${2:?usage: launch/local_multiprocess.sh NUM_PROCESSES WORKDIR [CONFIG] [--config.x=y ...]}"
CONFIG="${3:-configs/tiny.py}"
shift $(( $# >= 3 ? 3 : $# ))
PORT="${PORT:-$(( 20000 + RANDOM % 20000 ))}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
cd "$(dirname "$0")/.."
mkdir -p "$WORKDIR"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for (( i = 0; i < NUM_PROCESSES; i++ )); do
  env_vars=(E4T_COORDINATOR_ADDRESS="127.0.0.1:$PORT" E4T_NUM_PROCESSES="$NUM_PROCESSES" E4T_PROCESS_ID="$i")
  if [[ -n "${E4T_GPUS_PER_PROCESS:-}" ]]; then
    first=$(( i * E4T_GPUS_PER_PROCESS ))
    ids=$(seq -s, "$first" $(( first + E4T_GPUS_PER_PROCESS - 1 )))
    env_vars+=(E4T_LOCAL_DEVICE_IDS="$ids")
  else
    env_vars+=(JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  fi
  if (( i == 0 )); then
    env "${env_vars[@]}" .venv/bin/e4t pretrain --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  else
    env "${env_vars[@]}" .venv/bin/e4t pretrain --config "$CONFIG" --workdir "$WORKDIR" "$@" \
      > "$WORKDIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
