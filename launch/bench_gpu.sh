#!/usr/bin/env bash
# `e4t bench full` on one GPU machine whose python3 already has jax[cuda], flax, optax, torch and
# transformers (e.g. the project's lent H100/H200 image). Pure-Python packages it lacks (diffusers,
# for the PyTorch baseline) can be carried as wheels in .whl/. Results: $OUT (default outputs/bench_full).
#   bash launch/bench_gpu.sh            # the headline programs, for a 10-minute command: lite and paper-mode
#                                       # personalization, pretraining at batch 8 and 16, the U-Net step vs PyTorch,
#                                       # lite personalization at --xla_gpu_autotune_level=0 (what autotuning costs)
#   MINIMAL=False DEADLINE=1500 bash launch/bench_gpu.sh   # every variant (remat, fp32, xla attention): ~25 min
set -uo pipefail
OUT=${OUT:-outputs/bench_full}
mkdir -p "$OUT"
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv \
  > "$OUT/nvidia-smi.csv" 2>&1
nproc >> "$OUT/nvidia-smi.csv"
python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())" \
  2>&1 | tee "$OUT/versions.txt"
python3 -c "
from e4t_jax.bench import full as b
r = b.run_full_bench('${CONFIG:-sd15}', json_out='$OUT/bench_full.json', deadline_s=${DEADLINE:-540},
                     parallel=${PARALLEL:-2}, minimal=${MINIMAL:-True}, compile_share=${COMPILE_SHARE:-0.6})
print(b.format_table(r))" 2>&1 | tee "$OUT/log.txt"
