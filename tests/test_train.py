"""Pretraining loop, checkpoints and configs on the tiny model (8 fake CPU devices, tests/conftest.py).

Compiling the tiny train step takes ~30 s on a 2-core CPU, so the runs share work: a persistent
compilation cache (a temp dir, this module only) lets identical programs compile once, and one
4-step run on the data=8 mesh serves the smoke, resume, mesh-restore and single-device checks.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from e4t_jax.train import config as config_lib
from e4t_jax.fileio import read_safetensors
from e4t_jax.errors import CheckpointError, ConfigError
from e4t_jax.train import checkpoint as checkpoint_lib
from e4t_jax.train import loop
from e4t_jax.train import step as step_lib

NUM_STEPS = 4
REPO = Path(__file__).resolve().parent.parent
SHARDED_VS_SINGLE_TOLERANCE = 1e-5


def tiny_config(*overrides: str):
  return config_lib.load_config('tiny', [
      f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every=1', '--config.train.checkpoint_every=2',
      '--config.train.keep_checkpoints=5', '--config.train.progress_bar=false', *overrides])


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  previous = {name: getattr(jax.config, name) for name in names}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield
  for name, value in previous.items():
    jax.config.update(name, value)


class BatchRecorder:
  """A step hook remembering every step's host batch."""

  def __init__(self, stop_at: int | None = None):
    self.batches: dict[int, dict[str, np.ndarray]] = {}
    self.stop_at = stop_at

  def __call__(self, step, host_batch, metrics):
    self.batches[step] = {k: np.array(v) for k, v in host_batch.items()}
    if step == self.stop_at:
      os.kill(os.getpid(), signal.SIGTERM)  # preemption: the loop saves this step and returns


def trained_weights(workdir) -> dict[str, np.ndarray]:
  return read_safetensors(os.path.join(workdir, 'model', 'trainable.safetensors'))


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, tiny_e4t):
  """4 uninterrupted steps on the data=8 mesh."""
  workdir = tmp_path_factory.mktemp('straight')
  recorder = BatchRecorder()
  summary = loop.train_and_evaluate(tiny_config(), workdir, step_hooks=[recorder], model=tiny_e4t)
  return workdir, summary, recorder


def test_train_and_evaluate_smoke(straight_run, tiny_e4t):
  workdir, summary, _ = straight_run
  assert config_lib.run_config(tiny_config()).e4t == tiny_e4t.config  # configs/tiny.py is the shared fixture
  assert summary['step'] == NUM_STEPS and not summary['preempted']
  assert np.isfinite(summary['loss']) and summary['grad_norm'] > 0 and summary['step_flops'] > 0
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines] == list(range(1, NUM_STEPS + 1))
  assert {'loss', 'diffusion_loss', 'grad_norm', 'learning_rate', 'images_per_s', 'tflops_per_s'} <= set(lines[-1])
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 4]
  from e4t_jax.e4t import io as io_lib
  model = io_lib.load_model(workdir / 'model')
  assert model.config.coarse_word == 'face'


def test_a_prebuilt_model_must_have_the_runs_e4t_settings(tmp_path, tiny_e4t):
  # The loss follows the model's E4T config, the data (masks) the run's: a mismatch is refused before any work.
  with pytest.raises(ConfigError, match='use_loss_mask'):
    loop.train_and_evaluate(tiny_config('--config.e4t.use_loss_mask=true'), tmp_path / 'run', model=tiny_e4t)
  assert not (tmp_path / 'run').exists()


def test_preempt_and_resume_is_bit_exact(straight_run, tmp_path, tiny_e4t):
  straight_dir, _, straight = straight_run
  first = BatchRecorder(stop_at=2)
  summary = loop.train_and_evaluate(tiny_config(), tmp_path, step_hooks=[first], model=tiny_e4t)
  assert summary['preempted'] and summary['step'] == 2
  assert not (tmp_path / 'model').exists()
  second = BatchRecorder()
  summary = loop.train_and_evaluate(tiny_config(), tmp_path, step_hooks=[second], model=tiny_e4t)
  assert summary['step'] == NUM_STEPS and sorted(second.batches) == [3, 4]

  resumed = {**first.batches, **second.batches}
  for step in range(1, NUM_STEPS + 1):
    for key in straight.batches[step]:
      np.testing.assert_array_equal(resumed[step][key], straight.batches[step][key], err_msg=f'step {step} {key}')
  expected, actual = trained_weights(straight_dir), trained_weights(tmp_path)
  assert sorted(expected) == sorted(actual)
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def _pretrain_process(workdir) -> subprocess.Popen:
  """`e4t pretrain` of `tiny_config()` in a subprocess sharing this module's compilation cache (so it reuses
  the step `straight_run` compiled), stdout line-buffered for the kill points to read."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir, PYTHONUNBUFFERED='1',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  overrides = [f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every=1',
               '--config.train.checkpoint_every=2', '--config.train.keep_checkpoints=5',
               '--config.train.progress_bar=false',
               # Synchronous saves: at the line of step 3, checkpoint 2 is complete (an async save may not
               # be, and a SIGKILL then loses it; the rerun starts over, correctly but untested here).
               '--config.train.async_checkpoints=false']
  return subprocess.Popen([sys.executable, '-m', 'e4t_jax.cli', 'pretrain', '--config', 'tiny', '--workdir',
                           str(workdir), *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _kill_at(process: subprocess.Popen, ready) -> str:
  """Reads the run's output until `ready(line)`, then SIGKILLs it; returns the output."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    if ready(line):
      break
  process.kill()
  process.wait(timeout=60)
  return ''.join(lines)


def test_sigkill_at_three_points_resumes_bit_equal(straight_run, tmp_path):
  """`e4t pretrain` SIGKILLed (no handler can run) at start-up, just after checkpoint 2, and as step 4 ends (its
  checkpoint or the model folder being written); each rerun resumes from the last complete checkpoint and the
  finished run is bit-equal to the uninterrupted one."""
  straight_dir, _, _ = straight_run
  outputs = [_kill_at(_pretrain_process(tmp_path), ready) for ready in (
      lambda line: True, lambda line: 'step 3:' in line, lambda line: 'step 4:' in line)]
  assert not (tmp_path / 'model' / 'e4t.json').exists() or 'wrote the E4T model folder' in outputs[-1]
  final = _pretrain_process(tmp_path)
  out, _ = final.communicate(timeout=600)
  assert final.returncode == 0, out[-3000:]
  assert 'resumed from step' in out, ''.join(outputs)[-2000:] + out[-2000:]
  expected, actual = trained_weights(straight_dir), trained_weights(tmp_path)
  assert sorted(expected) == sorted(actual)
  for name in expected:
    np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_sharded_run_matches_single_device(straight_run, tmp_path, tiny_e4t):
  straight_dir, _, _ = straight_run
  loop.train_and_evaluate(tiny_config('--config.mesh.num_devices=1', '--config.train.checkpoint_every=100'),
                          tmp_path, model=tiny_e4t)
  sharded, single = trained_weights(straight_dir), trained_weights(tmp_path)
  for name in sharded:
    np.testing.assert_allclose(sharded[name], single[name], atol=SHARDED_VS_SINGLE_TOLERANCE, rtol=0, err_msg=name)


def _abstract_state(config, model, mesh):
  """The TrainState's shapes with the shardings `mesh` gives them (nothing allocated)."""
  run = config_lib.run_config(config)
  trainable_shardings, _ = loop.state_and_frozen_shardings(model, mesh, run.mesh.logical_axis_rules,
                                                           run.mesh.frozen_sharding)
  optimizer = step_lib.make_optimizer(run.optimizer)
  trainable, _ = jax.eval_shape(lambda p: tuple(step_lib.model_lib.split_params(p)), model.params)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  moments_like = lambda x: next((s for s in [_find_sharding(x, trainable, trainable_shardings)] if s), replicated)
  return step_lib.TrainState(
      step=with_sharding(jax.ShapeDtypeStruct((), np.int32), replicated),
      trainable=jax.tree.map(with_sharding, trainable, trainable_shardings),
      opt_state=jax.tree.map(lambda x: with_sharding(x, moments_like(x)), opt_state))


def _find_sharding(leaf, trainable, shardings):
  """The sharding of the parameter an optimizer-moment leaf mirrors (matched by shape), else None."""
  for param, sharding in zip(jax.tree.leaves(trainable), jax.tree.leaves(shardings)):
    if param.shape == leaf.shape and leaf.shape:
      return sharding
  return None


def test_restore_onto_a_different_mesh(straight_run, tiny_e4t):
  from e4t_jax.parallel import mesh as mesh_lib
  workdir, _, _ = straight_run
  config = tiny_config()
  frozen = step_lib.model_lib.split_params(tiny_e4t.params)[1]
  fingerprint = checkpoint_lib.frozen_fingerprint(frozen)
  checkpointer = checkpoint_lib.TrainCheckpointer(str(workdir / 'checkpoints'))
  saved_mesh = mesh_lib.make_mesh({'data': 8})
  new_mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  as_saved = checkpointer.restore(_abstract_state(config, tiny_e4t, saved_mesh), step=4, fingerprint=fingerprint)
  reshaped = checkpointer.restore(_abstract_state(config, tiny_e4t, new_mesh), step=4, fingerprint=fingerprint)
  shardings = [leaf.sharding for leaf in jax.tree.leaves(reshaped.state)]
  assert all(s.mesh.shape == new_mesh.shape for s in shardings)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in shardings)  # really resharded, not replicated
  for a, b in zip(jax.tree.leaves(as_saved.state), jax.tree.leaves(reshaped.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert reshaped.data_iterator == as_saved.data_iterator and reshaped.config['train']['num_steps'] == NUM_STEPS
  with pytest.raises(CheckpointError, match='another base model'):
    checkpointer.restore(_abstract_state(config, tiny_e4t, new_mesh), step=4, fingerprint='0' * 32)
  checkpointer.close()


def test_config_overrides_parse_and_check_types():
  config = config_lib.load_config('configs/tiny.py', [
      '--config.optimizer.learning_rate=3e-4', '--config.train.num_steps=1e3', '--config.e4t.use_loss_mask=true',
      '--config.encoder.clip_layers=-1,-3', '--config.model.dtype=bfloat16', '--config.data.path=/data/x'])
  assert config.optimizer.learning_rate == 3e-4 and config.train.num_steps == 1000
  assert config.e4t.use_loss_mask is True and tuple(config.encoder.clip_layers) == (-1, -3)
  run = config_lib.run_config(config)
  assert run.e4t.encoder.clip_layers == (-1, -3) and run.optimizer.learning_rate == 3e-4
  assert run.model.dtype == 'bfloat16' and run.data.path == '/data/x'
  for name in ('faces', 'cats', 'art', 'faces_sdxl'):
    assert config_lib.load_config(name).train.num_steps in (30_000, 60_000, 100_000)
  with pytest.raises(AttributeError):
    config.new_field = 1  # locked


@pytest.mark.parametrize('override, message', [
    ('--config.optimizer.lr=1', 'unknown config key'),
    ('--config.nope.x=1', 'unknown config key'),
    ('--config.train.num_steps=ten', 'expected an integer'),
    ('--config.train.num_steps=2.5', 'expected an integer'),
    ('--config.optimizer.learning_rate=fast', 'expected a number'),
    ('--config.e4t.use_loss_mask=maybe', 'true or false'),
    ('--config.model.dtype=float8', 'model.dtype'),
    ('--config.optimizer.decay=linear', 'optimizer.decay'),
    ('optimizer.learning_rate=1', 'must look like'),
])
def test_config_rejects_bad_overrides(override, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.load_run_config('tiny', [override])


def test_unknown_config_file_is_a_config_error():
  with pytest.raises(ConfigError, match='not found'):
    config_lib.load_config('no_such_config')
