#!/usr/bin/env bash
# E4T pretraining on a Cloud TPU pod slice: one process per TPU VM host, all started at once.
#
# Usage:
#   TPU=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/e4t/faces \
#     launch/tpu_pod.sh [configs/faces.py] [--config.x=y ...]
#
# Every host must have this repository at ~/e4t-jax with its .venv (e.g. a prior
# `--worker=all --command "git clone ... && cd e4t-jax && python -m venv .venv && .venv/bin/pip install -e ."`),
# and the base model / image encoder folders at the paths the config names (or on a mounted disk).
# JAX finds the other hosts itself (`initialize_from_env` sees TPU_WORKER_HOSTNAMES); checkpoints
# and metrics go to WORKDIR (use gs:// so every host can reach it). Rerunning resumes.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
: "${WORKDIR:?set WORKDIR, e.g. gs://bucket/e4t/run1}"
CONFIG="${1:-configs/faces.py}"
shift || true
printf -v OVERRIDES ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/e4t-jax && .venv/bin/e4t pretrain --config $CONFIG --workdir $WORKDIR$OVERRIDES"
