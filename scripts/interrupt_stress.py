"""Sends SIGINT or SIGTERM to `e4t personalize` (or `generate`) at random moments and tallies the exit codes.

    python scripts/interrupt_stress.py SEED TRIALS [personalize|generate] [CHECKOUT]
"""
import collections
import os
import random
import signal
import subprocess
import sys
import time
REPO = sys.argv[4] if len(sys.argv) > 4 else str(__import__('pathlib').Path(__file__).resolve().parent.parent)
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
os.makedirs('/tmp/stress', exist_ok=True)
from PIL import Image; import numpy as np
Image.fromarray(np.random.default_rng(0).integers(0,256,(48,48,3),dtype=np.uint8)).save('/tmp/stress/me.png')
codes = collections.Counter()
for trial in range(int(sys.argv[2]) if len(sys.argv) > 2 else 12):
  out = f'/tmp/stress/out{trial}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  cmd = sys.argv[3] if len(sys.argv) > 3 else 'personalize'
  args = ['personalize', '/tmp/stress/me.png', '--out', out] if cmd == 'personalize' else ['generate', 'none', 'a face', '--out', out, '--steps', '2']
  p = subprocess.Popen([sys.executable, '-m', 'e4t_jax.cli', *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  delay = random.uniform(0.2, 9.0)
  sig = random.choice([signal.SIGINT, signal.SIGTERM])
  time.sleep(delay); p.send_signal(sig)
  outp, _ = p.communicate(timeout=200)
  tmp = [f for f in (os.listdir(out) if os.path.isdir(out) else []) if f.endswith('.tmp')]
  codes[(sig.name, p.returncode)] += 1
  print(trial, f'{delay:.1f}', sig.name, p.returncode, 'tmp' if tmp else '', outp.strip().splitlines()[-1][:100] if outp.strip() else '', flush=True)
print(dict(codes))
