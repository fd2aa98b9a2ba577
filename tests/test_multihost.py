"""Two JAX processes on 127.0.0.1 (4 fake CPU devices each, gloo collectives) train together.

Each subprocess is started with the E4T_* variables `initialize_from_env` reads, builds the global
8-device mesh, runs a sharded reduction and one tiny train step (each process feeding its half of
the batch), and prints its results as one JSON line. Both must agree. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from e4t_jax.errors import ConfigError
from e4t_jax.parallel import multihost

REPO = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT_S = 420

WORKER = textwrap.dedent('''
    import json, sys
    from e4t_jax.parallel import multihost
    kind = multihost.initialize_from_env()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from e4t_jax.train import config as config_lib
    from e4t_jax.parallel.mesh import make_mesh
    from e4t_jax.train import loop

    mesh = make_mesh({'data': 8})
    local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()  # this process's rows
    rows = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(rows))

    config = config_lib.load_config('tiny', ['--config.train.num_steps=1', '--config.train.log_every=1',
                                             '--config.train.progress_bar=false', '--config.train.save_model=false'])
    summary = loop.train_and_evaluate(config, sys.argv[1])
    print('RESULT ' + json.dumps({'kind': kind, 'process': jax.process_index(), 'devices': jax.device_count(),
                                  'local_devices': jax.local_device_count(), 'total': total,
                                  'loss': summary['loss'], 'grad_norm': summary['grad_norm']}), flush=True)
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_detect_cluster():
  assert multihost.detect_cluster({}) == 'single'
  assert multihost.detect_cluster({'E4T_COORDINATOR_ADDRESS': 'h:1'}) == 'explicit'
  assert multihost.detect_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 'slurm'
  assert multihost.detect_cluster({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) == 'single'
  assert multihost.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'tpu'
  assert multihost.initialize_from_env({}) == 'single'  # a single process: nothing to do
  with pytest.raises(ConfigError, match='E4T_NUM_PROCESSES'):
    multihost.initialize_from_env({'E4T_COORDINATOR_ADDRESS': '127.0.0.1:1'})


def test_two_processes_train_together(tmp_path):
  port = _free_port()
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  processes = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4',
               PYTHONPATH=str(REPO), E4T_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', E4T_NUM_PROCESSES='2',
               E4T_PROCESS_ID=str(process_id))
    processes.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / 'workdir')], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=PROCESS_TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for process in processes:
      process.kill()
    pytest.fail(f'two-process run did not finish in {PROCESS_TIMEOUT_S}s')
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  unsupported = ('collectives', 'not implemented', 'UNIMPLEMENTED')
  if any(p.returncode for p in processes) and any(any(u in o for u in unsupported) for o in outputs):
    pytest.skip('this jaxlib cannot run multi-process CPU collectives: ' + outputs[0].strip().splitlines()[-1][:200])
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  results = [json.loads(line.removeprefix('RESULT ')) for output in outputs
             for line in output.splitlines() if line.startswith('RESULT ')]
  assert [r['process'] for r in results] == [0, 1]
  for r in results:
    assert r['kind'] == 'explicit' and r['devices'] == 8 and r['local_devices'] == 4
    assert r['total'] == sum(range(8))
  assert results[0]['loss'] == results[1]['loss'] and results[0]['grad_norm'] == results[1]['grad_norm']
  assert (tmp_path / 'workdir' / 'checkpoints' / '1').is_dir()
