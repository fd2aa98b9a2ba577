#!/usr/bin/env bash
# Downloads, into .whl/, the wheels the lent GPU image lacks for e4t-jax's training code (Python 3.12,
# x86-64; the versions of requirements/lock.txt). The device tool carries .whl when a run names it;
# launch/demo_train_gpu.sh and launch/bench_gpu.sh install them there with --no-index --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
mkdir -p .whl
for name in grain array_record portpicker ml_collections tensorboardX; do
  pin=$(grep -i -E "^${name}==" requirements/lock.txt)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$pin"
done
ls -l .whl
