"""launch/demo_train_gpu.sh (issue 17's GPU path for `e4t demo-train --preset accelerator`), run on CPU at
smoke size: stop at the limit, resume from the parts, pack, unpack and install without training. Its own
file so that the test runner can put it beside test_demo_train.py's end-to-end run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from e4t_jax import cli


def test_the_gpu_launch_script_at_smoke_size_stops_resumes_packs_and_unpacks(tmp_path, capsys):
  """launch/demo_train_gpu.sh on CPU (SMOKE=1): a run stopped by its limit comes back as parts that a
  second run resumes from; the finished run's parts are few and small enough for the device tool, and
  unpacked here they give the model folder without training anything."""
  root = Path(__file__).resolve().parents[1]

  def script(out, work, **env):
    env = dict(os.environ, SMOKE='1', PYTHON=sys.executable, OUT=str(out), WORK=str(work), **env)
    done = subprocess.run(['bash', str(root / 'launch' / 'demo_train_gpu.sh')], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout + done.stderr

  first, second = tmp_path / 'out1', tmp_path / 'out2'
  code, log = script(first, tmp_path / 'work1', LIMIT='1')  # the VAE stage's first step is past it
  assert code == 3, log[-3000:]
  assert 'run the same command again to resume' in log and (first / 'rc.txt').read_text().strip() == '3'
  # The second run: a fresh machine (a new work folder), the parts carried; the text-to-image stage is
  # time-boxed (a constant schedule: it ends after its first step, the reserve being all of the limit).
  code, log = script(second, tmp_path / 'work2', RESUME=str(first), LIMIT='600', RESERVE='599', T2I_STEPS='1000')
  assert code == 0, log[-3000:]
  assert 'vae: resuming at step 1' in log
  assert 'the time limit ends the run at step 1 of 1000' in log
  files = sorted(p for p in second.iterdir())
  assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files), [(p.name, p.stat().st_size) for p in files]
  summary = json.loads((tmp_path / 'work2' / 'model' / 'training.json').read_text())
  assert summary['config']['t2i_steps'] == 1 and summary['config']['t2i_schedule'] == 'constant'
  assert summary['stage_platform']['t2i'].startswith('cpu') and 'copied from' in summary['stage_platform']['readout']

  # Here: the parts unpacked, the same command builds the model folder and trains nothing.
  work3 = tmp_path / 'work3'
  work3.mkdir()
  parts = b''.join(p.read_bytes() for p in sorted(second.glob('workdir.tar.gz.*')))
  subprocess.run(['tar', 'xzf', '-', '-C', str(work3)], input=parts, check=True)
  assert not (work3 / 'stages' / 'pool.npz').exists() and not (work3 / 'e4t' / 'checkpoints').exists()
  capsys.readouterr()
  assert cli.main(['demo-train', '--workdir', str(work3), '--preset', 'accelerator', '--smoke']) == 0
  err = capsys.readouterr().err
  assert 'render pool' not in err and 'done before' not in err and 'e4t pretrain' not in err
  rebuilt = json.loads((work3 / 'model' / 'training.json').read_text())
  assert rebuilt['config'] == summary['config'] and rebuilt['stage_platform'] == summary['stage_platform']
  from e4t_jax.fileio import read_safetensors
  for name in ('trainable.safetensors', 'base/unet/diffusion_pytorch_model.safetensors'):
    ours, theirs = read_safetensors(work3 / 'model' / name), read_safetensors(tmp_path / 'work2' / 'model' / name)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
