#!/usr/bin/env bash
# `e4t demo-train --preset accelerator` on one GPU machine (issue 17, item 1): the demo model's stages
# with a 5x larger pool, larger batches, the U-Net in bfloat16 and a text-to-image stage that runs for
# as many steps as the time limit leaves; the same code as the CPU run. For one 10-minute command on the
# lent H200 (the image has jax[cuda], flax, optax, orbax; grain, array_record, portpicker, ml_collections
# and tensorboardX travel as wheels in .whl/: `bash launch/gpu_wheels.sh` fetches them here).
#
#   bash launch/gpu_wheels.sh                                    # here, once: the wheels into .whl/
#   bash launch/demo_train_gpu.sh                                # there (device run: carry ['.whl'])
#   SMOKE=1 PYTHON=.venv/bin/python bash launch/demo_train_gpu.sh     # here: the same script at smoke sizes
#
# What comes back in $OUT (at most 8 files of at most 15 MiB): machine.txt, log.txt, rc.txt and the work
# folder as workdir.tar.gz.0, .1, ... (the stages, mid-stage checkpoints, the E4T stage's model; not the
# data pool, which any rerun renders again, identically). Then, here:
#   mkdir -p runs/demo-gpu && cat OUT/workdir.tar.gz.* | tar xzf - -C runs/demo-gpu
#   e4t demo-train --workdir runs/demo-gpu --preset accelerator --install   # the model folder, no training
# A run stopped by its limit (rc 3) resumes: RESUME=folder-of-the-parts bash launch/demo_train_gpu.sh.
#
# Run from the repository root. Env: OUT (outputs/demo_train_gpu), WORK (/tmp/e4t-demo-train), LIMIT (seconds for demo-train, 510),
# RESERVE (seconds of LIMIT kept for the E4T stage and the model folder, 180), GRACE (45: after LIMIT + GRACE
# seconds demo-train is stopped, so that packing still happens inside the 10-minute command), RESUME, PYTHON (python3),
# T2I_STEPS (the text-to-image maximum; default the preset's).
set -uo pipefail
OUT=${OUT:-outputs/demo_train_gpu}
WORK=${WORK:-/tmp/e4t-demo-train}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
if ! "$PYTHON" -c 'import grain, array_record, ml_collections' 2> /dev/null && compgen -G '.whl/*.whl' > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-15}
if command -v nvidia-smi > /dev/null; then
  # Deterministic reductions: a rerun on the same GPU reproduces the model (issue 17's "deterministic on
  # the same backend").
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_deterministic_ops=true"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/machine.txt" 2>&1
fi
echo "cpus $(nproc)" >> "$OUT/machine.txt"
"$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, jax.devices())" >> "$OUT/machine.txt" 2>&1
if [ -n "${RESUME:-}" ]; then
  cat "$RESUME"/workdir.tar.gz.* | tar xzf - -C "$WORK" || exit 1
fi
SMOKE_FLAG=()
[ "${SMOKE:-0}" = 1 ] && SMOKE_FLAG=(--smoke)
STEPS_FLAG=()
[ -n "${T2I_STEPS:-}" ] && STEPS_FLAG=(--t2i-steps "$T2I_STEPS")
# `timeout`: a stage the limit does not stop (the E4T stage's loop) still leaves time to pack.
timeout --signal=TERM "$(( ${LIMIT:-510} + ${GRACE:-45} ))" \
  "$PYTHON" -m e4t_jax.cli demo-train --workdir "$WORK" --preset accelerator "${SMOKE_FLAG[@]}" "${STEPS_FLAG[@]}" \
  --time-limit "${LIMIT:-510}" --reserve "${RESERVE:-180}" --render-workers "$(nproc)" \
  --readout-from e4t_jax/assets/demo_model/readout.safetensors 2>&1 | tr '\r' '\n' | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "$rc" > "$OUT/rc.txt"
# The work folder, less what a rerun makes again: the pool, the model folder (built from the stages in
# seconds), and the E4T stage's checkpoints once its model is saved.
EXCLUDE=(--exclude=./stages/pool.npz --exclude=./model --exclude='*.tmp*')
[ -f "$WORK/e4t/model/e4t.json" ] && EXCLUDE+=(--exclude=./e4t/checkpoints)
rm -f "$OUT"/workdir.tar.gz.*
tar czf - -C "$WORK" "${EXCLUDE[@]}" . | split -b 15m -d -a 1 - "$OUT/workdir.tar.gz."
parts=$(ls "$OUT"/workdir.tar.gz.* | wc -l)
if [ "$parts" -gt 5 ]; then
  echo "the work folder needs $parts parts of 15 MiB: more than the 8 files that come back" | tee -a "$OUT/log.txt"
  exit 1
fi
exit "$rc"
