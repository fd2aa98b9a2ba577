"""Interrupting `e4t personalize` / `e4t generate` at any point: a clean exit (130 for SIGINT, 143 for
SIGTERM; never a crash), no partial file, earlier outputs intact, and temporary files a SIGKILLed run left
are removed by the next write into the folder."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e4t_jax import fileio

REPO = Path(__file__).resolve().parent.parent


def _command(*args) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen([sys.executable, '-m', 'e4t_jax.cli', *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _signal_after(process: subprocess.Popen, marker: str, signum: int, delay_s: float) -> tuple[int, str]:
  """Sends `signum` `delay_s` after the line containing `marker`; returns (exit code, output)."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    if marker in line:
      time.sleep(delay_s)
      process.send_signal(signum)
      break
  rest, _ = process.communicate(timeout=120)
  return process.returncode, ''.join(lines) + rest


def _image(path: Path) -> Path:
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
  return path


@pytest.mark.parametrize('marker, signum, delay_s, code', [
    ('using the embedded demo model', signal.SIGINT, 0.0, 130),  # while the model loads
    ('compiling the', signal.SIGTERM, 0.5, 143),                  # inside the XLA compile (C++, no GIL)
])
def test_personalize_interrupted_exits_cleanly_and_leaves_no_partial_file(tmp_path, marker, signum, delay_s, code):
  out = tmp_path / 'concepts'
  out.mkdir()
  earlier = out / 'earlier.e4t.safetensors'
  earlier.write_bytes(b'an earlier output')
  returncode, output = _signal_after(_command('personalize', str(_image(tmp_path / 'me.png')), '--out', str(out)),
                                     marker, signum, delay_s)
  assert returncode == code, output[-3000:]
  assert f'e4t: interrupted by {signal.Signals(signum).name}' in output and 'Traceback' not in output
  assert sorted(p.name for p in out.iterdir()) == ['earlier.e4t.safetensors']  # nothing partial, nothing new
  assert earlier.read_bytes() == b'an earlier output'


def test_generate_interrupted_while_compiling_exits_130(tmp_path):
  out = tmp_path / 'renders'
  process = _command('generate', 'none', 'a photo of a face', '--out', str(out), '--steps', '2')
  returncode, output = _signal_after(process, 'using the embedded demo model', signal.SIGINT, 1.5)
  assert returncode == 130, output[-3000:]
  assert 'e4t: interrupted by SIGINT' in output
  assert not out.exists() or not [p for p in out.iterdir() if p.name.endswith('.tmp')]


def test_stale_temporary_files_of_dead_processes_are_swept(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  dead_pid = int(dead.stdout)
  host = fileio._HOST
  stale = tmp_path / f'.me.e4t.safetensors.e4t-{host}-{dead_pid}.abc123.tmp'     # a SIGKILLed writer's
  live = tmp_path / f'.me.e4t.safetensors.e4t-{host}-{os.getppid()}.def456.tmp'  # a live process's
  remote = tmp_path / f'.me.e4t.safetensors.e4t-otherhost-{dead_pid}.ghi789.tmp'  # another machine's
  foreign = tmp_path / '.me.e4t.safetensors.tmp'                                  # not ours at all
  for path in (stale, live, remote, foreign):
    path.write_bytes(b'partial')
  fileio.atomic_write_bytes(tmp_path / 'me.e4t.safetensors', [b'whole'])
  assert (tmp_path / 'me.e4t.safetensors').read_bytes() == b'whole'
  assert not stale.exists() and live.exists() and remote.exists() and foreign.exists()
  assert fileio.sweep_stale_temp_files(tmp_path) == []
  assert oct((tmp_path / 'me.e4t.safetensors').stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's 0600


def test_the_signal_handler_removes_in_flight_temporary_files(tmp_path):
  """A SIGTERM while a file is being written: the handler deletes the temporary file before exiting."""
  script = f'''
import os, signal, sys, time
sys.path.insert(0, {str(REPO)!r})
from e4t_jax import fileio, interrupts
interrupts.install()
def chunks():
  yield b"half"
  print("writing", flush=True)
  time.sleep(30)
  yield b"never"
fileio.atomic_write_bytes({str(tmp_path / "slow.bin")!r}, chunks())
'''
  process = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  returncode, output = _signal_after(process, 'writing', signal.SIGTERM, 0.2)
  assert returncode == 143, output
  assert list(tmp_path.iterdir()) == [], output
