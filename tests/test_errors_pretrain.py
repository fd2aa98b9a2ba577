"""`e4t pretrain` with bad input (exit 2, one line, nothing written), and killed with SIGKILL at three points:
each rerun resumes from the last complete checkpoint and the run ends bit-equal to an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import badinput
from badinput import Case

T = ['pretrain', '--config', 'tiny']

CASES = [
    Case('workdir-is-a-file', lambda a: T + ['--workdir', a.file('w')], r'--workdir .*w: is a file'),
    Case('workdir-under-a-file', lambda a: T + ['--workdir', a.file('w') + '/run'], r'which is a file'),
    Case('workdir-in-proc', lambda a: T + ['--workdir', '/proc/e4t-run'], r'--workdir /proc/e4t-run: cannot write'),
    Case('lr-nan', lambda a: T + ['--workdir', 'run', '--config.optimizer.learning_rate=nan'], r'expected a finite number'),
    Case('lr-inf', lambda a: T + ['--workdir', 'run', '--config.optimizer.learning_rate=inf'], r'expected a finite number'),
    Case('steps-zero', lambda a: T + ['--workdir', a.folder('run'), '--config.train.num_steps=0'], r'train\.num_steps must be >= 1'),
    Case('steps-not-a-number', lambda a: T + ['--workdir', 'run', '--config.train.num_steps=many'], r'expected an integer'),
    Case('unknown-key', lambda a: T + ['--workdir', 'run', '--config.train.nope=1'], r'unknown config key'),
    Case('config-missing', lambda a: ['pretrain', '--config', a.path('nope.py'), '--workdir', 'run'], r'not found'),
    Case('config-not-python', lambda a: ['pretrain', '--config', a.file('bad.py', 'def get_config(:'), '--workdir', 'run'],
         r'bad\.py: cannot be imported'),
]


@pytest.mark.parametrize('case', badinput.params(CASES))
def test_bad_input(case, tmp_path, concept_bytes, capsys, monkeypatch):
  badinput.run(case, tmp_path, concept_bytes, capsys, monkeypatch)


# ----------------------------------------------------------------------------- SIGKILL at random points
REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 6, 2
OVERRIDES = [f'--config.train.num_steps={STEPS}', f'--config.train.checkpoint_every={EVERY}',
             '--config.train.log_every=1', '--config.train.progress_bar=false', '--config.train.async_checkpoints=false',
             '--config.train.keep_checkpoints=5']


def _pretrain(workdir: Path, cache: Path) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONUNBUFFERED='1',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.Popen([sys.executable, '-m', 'e4t_jax.cli', 'pretrain', '--config', 'tiny', '--workdir',
                           str(workdir), *OVERRIDES], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _kill_when(process: subprocess.Popen, ready, timeout_s: float = 300) -> str:
  """Reads the run's output until `ready(line)`, then SIGKILLs it; returns the output."""
  lines, deadline = [], time.monotonic() + timeout_s
  for line in process.stdout:
    lines.append(line)
    if ready(line) or time.monotonic() > deadline:
      break
  process.send_signal(signal.SIGKILL)
  process.wait()
  return ''.join(lines)


def _finished(workdir: Path) -> dict:
  from e4t_jax.fileio import read_safetensors
  return {k: np.array(v) for k, v in read_safetensors(workdir / 'model' / 'trainable.safetensors').items()}


def test_sigkill_at_three_points_resumes_bit_equal(tmp_path):
  cache = tmp_path / 'xla-cache'  # restarts reuse the compiled step
  straight = _pretrain(tmp_path / 'straight', cache)
  out, _ = straight.communicate(timeout=600)
  assert straight.returncode == 0, out[-3000:]

  workdir = tmp_path / 'killed'
  # 1. during start-up (at its first line of output); 2. right after the first checkpoint;
  # 3. mid-run, between checkpoints.
  points = [lambda line: True,
            lambda line: f'step {EVERY + 1}:' in line,
            lambda line: f'step {2 * EVERY + 1}:' in line]
  outputs = [_kill_when(_pretrain(workdir, cache), ready) for ready in points]
  assert not (workdir / 'model').exists(), 'a killed run must not have finished'
  final = _pretrain(workdir, cache)
  out, _ = final.communicate(timeout=600)
  assert final.returncode == 0, out[-3000:]
  assert 'resumed from step' in out, ''.join(outputs)[-2000:] + out[-2000:]
  expected, actual = _finished(tmp_path / 'straight'), _finished(workdir)
  assert sorted(expected) == sorted(actual)
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
