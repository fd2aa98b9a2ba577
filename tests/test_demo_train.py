"""`e4t demo-train` end to end at smoke size: every stage runs, a rerun resumes, the model folder loads,
and the no-offsets ablation trains on the same base stages."""
import json

import numpy as np
import pytest

from e4t_jax import cli
from e4t_jax.lab import demo_train


def test_demo_train_smoke_every_stage_resume_and_ablation(tmp_path, capsys):
  workdir = tmp_path / 'run'
  assert cli.main(['demo-train', '--workdir', str(workdir), '--smoke']) == 0
  model_dir = workdir / 'model'
  for name in ('e4t.json', 'trainable.safetensors', 'readout.safetensors', 'training.json'):
    assert (model_dir / name).is_file(), name
  for stage in ('vae', 'vision', 't2i'):
    assert (workdir / 'stages' / f'{stage}.json').is_file()

  import e4t_jax
  model = e4t_jax.load(model_dir)
  assert model.config.tuning_prompt == 'a {}' and model.modules.image_size == 64
  unet_config, vae_config, text_config, _ = demo_train.architecture(demo_train.DemoTrainConfig.smoke())
  assert model.modules.unet.config == unet_config
  assert model.modules.text_encoder.config == text_config
  assert model.modules.tokenizer.model_max_length == demo_train.TEXT_LENGTH
  # The frozen networks are stored in float16, the trained part in float32.
  from e4t_jax.fileio import read_safetensors
  unet_file = read_safetensors(model_dir / 'base' / 'unet' / 'diffusion_pytorch_model.safetensors')
  assert {v.dtype for v in unet_file.values()} == {np.dtype(np.float16)}
  assert {v.dtype for v in read_safetensors(model_dir / 'trainable.safetensors').values()} == {np.dtype(np.float32)}

  # A rerun skips every finished stage.
  capsys.readouterr()
  assert cli.main(['demo-train', '--workdir', str(workdir), '--smoke']) == 0
  err = capsys.readouterr().err
  for stage in ('vae', 'vision', 't2i'):
    assert f'{stage}: done before' in err
  seconds = json.loads((model_dir / 'training.json').read_text())['stage_seconds']
  assert set(seconds) == set(demo_train.STAGES), seconds  # the earlier invocation's timings are kept
  assert not list((workdir / 'stages').glob('*.state.npz'))  # mid-stage checkpoints go when a stage ends

  # The ablation retrains only the E4T stage, without weight offsets.
  assert cli.main(['demo-train', '--workdir', str(workdir), '--smoke', '--ablation', 'no_offsets']) == 0
  ablated = e4t_jax.load(workdir / 'model-no_offsets')
  assert ablated.params['weight_offsets'] == {}
  assert ablated.modules.config.offsets.targets == ()
  summary = json.loads((workdir / 'model-no_offsets' / 'training.json').read_text())
  assert summary['bytes'] > 0


def test_demo_train_refuses_installing_an_ablation(tmp_path, capsys):
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--ablation', 'no_offsets', '--install'])
  assert code == 2 and 'ships the main model only' in capsys.readouterr().err


def test_e4t_config_rejects_unknown_ablation():
  from e4t_jax.errors import ConfigError
  with pytest.raises(ConfigError, match='ablation'):
    demo_train.e4t_config('no_encoder')
  base = demo_train.e4t_config()
  assert demo_train.e4t_config('no_embedding_reg').lambda_embedding == 0.0
  assert demo_train.e4t_config('weak_embedding_reg').lambda_embedding == pytest.approx(base.lambda_embedding / 10)
  assert demo_train.e4t_config('no_offsets').offsets.targets == () and base.offsets.targets


def test_a_training_stage_is_deterministic():
  config = demo_train.DemoTrainConfig.smoke(vision_steps=2)
  pool = demo_train.render_pool(16, seed=0)
  _, _, _, vision_config = demo_train.architecture(config)
  first, _ = demo_train.train_vision(config, vision_config, pool)
  second, _ = demo_train.train_vision(config, vision_config, pool)
  import jax
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_interrupted_stage_resumes_bit_equal_from_its_checkpoint(tmp_path):
  import jax
  import jax.numpy as jnp
  target = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)

  def loss_fn(params, batch, key):
    noise = 0.1 * jax.random.normal(key, (batch['x'].shape[0], 4))
    return jnp.mean((batch['x'] @ params['w'] + noise - batch['x'] @ target) ** 2)

  def batches(step, fail_at=None):
    if step == fail_at:
      raise KeyboardInterrupt
    return {'x': np.random.default_rng(step).normal(size=(8, 3)).astype(np.float32)}

  run = lambda batch_fn, checkpoint=None: demo_train.fit(
      loss_fn, {'w': np.zeros((3, 4), np.float32)}, batch_fn, steps=7, lr=0.1, seed=0, desc='t', ema_decay=0.9,
      checkpoint=checkpoint, checkpoint_every=2)
  expected, expected_losses = run(batches)
  path = tmp_path / 'stage.state.npz'
  with pytest.raises(KeyboardInterrupt):
    run(lambda i: batches(i, fail_at=5), path)
  with np.load(path) as stored:
    assert int(stored['step']) == 4
  resumed, losses = run(batches, path)
  np.testing.assert_array_equal(np.asarray(resumed['w']), np.asarray(expected['w']))
  assert losses == expected_losses
  assert not np.array_equal(np.asarray(expected['w']), np.zeros((3, 4)))
