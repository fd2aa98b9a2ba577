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

  # A rerun skips every finished stage (and, the E4T stage's model being saved, loads none of them).
  capsys.readouterr()
  assert cli.main(['demo-train', '--workdir', str(workdir), '--smoke']) == 0
  err = capsys.readouterr().err
  assert 'done before' not in err and 'render pool' not in err and 'model folder' in err
  seconds = json.loads((model_dir / 'training.json').read_text())['stage_seconds']
  assert set(seconds) == set(demo_train.STAGES), seconds  # the earlier invocation's timings are kept
  assert not list((workdir / 'stages').glob('*.state.npz'))  # mid-stage checkpoints go when a stage ends

  # The ablation retrains only the E4T stage, without weight offsets.
  assert cli.main(['demo-train', '--workdir', str(workdir), '--smoke', '--ablation', 'no_offsets']) == 0
  err = capsys.readouterr().err
  for stage in ('vae', 'vision', 't2i'):
    assert f'{stage}: done before' in err
  ablated = e4t_jax.load(workdir / 'model-no_offsets')
  assert ablated.params['weight_offsets'] == {}
  assert ablated.modules.config.offsets.targets == ()
  summary = json.loads((workdir / 'model-no_offsets' / 'training.json').read_text())
  assert summary['bytes'] > 0

  # A variant: the E4T stage again with other settings (the paper's plain, unmasked loss), the base stages reused.
  assert model.config.min_snr_gamma == 1.0 and model.config.use_loss_mask  # the demo's recipe
  assert cli.main(['demo-train', '--workdir', str(workdir), '--smoke', '--variant', 'plain', '--e4t-set',
                   'min_snr_gamma=0', '--e4t-set', 'loss_mask=false', '--e4t-set', 'lambda_embedding=0.01']) == 0
  assert 't2i: done before' in capsys.readouterr().err
  variant = e4t_jax.load(workdir / 'model-plain')
  assert variant.config.min_snr_gamma == 0.0 and not variant.config.use_loss_mask
  assert variant.config.lambda_embedding == 0.01
  summary = json.loads((workdir / 'model-plain' / 'training.json').read_text())
  assert summary['config']['e4t_min_snr_gamma'] == 0.0 and summary['config']['e4t_loss_mask'] is False

  # A continuation round (issue 17): seeded from the model folder, only the round and the E4T stage train...
  seeded = tmp_path / 'seeded'
  assert cli.main(['demo-train', '--workdir', str(seeded), '--smoke', '--base-from', str(model_dir),
                   '--t2i-round', '2:1e-3:1']) == 0
  err = capsys.readouterr().err
  assert 'text-to-image round 1' in err and 'train read-out' not in err and 'train VAE' not in err
  summary = json.loads((seeded / 'model' / 'training.json').read_text())
  assert summary['config']['t2i_rounds'] == [{'steps': 2, 'lr': 1e-3, 'min_snr_gamma': 1.0,
                                              'cpu_attention': 'xla_deferred'}]
  base_platforms = json.loads((model_dir / 'training.json').read_text())['stage_platform']
  assert 't2i-round1' in summary['stage_seconds']
  assert summary['stage_platform']['vae'] == f"{base_platforms['vae']}; seeded from {model_dir}"  # where it ran
  assert summary['stage_platform']['readout'].startswith(base_platforms['readout'])
  # A model whose vision stage had other settings is continued too: that stage trains again (it feeds E4T only).
  other_vision = demo_train.DemoTrainConfig.smoke(vision_steps=4, t2i_rounds=(demo_train.T2IRound(2, 1e-3, 1.0),))
  assert demo_train.seed_stages(tmp_path / 'revision', model_dir, other_vision) == ['vae', 't2i']
  assert not (tmp_path / 'revision' / 'stages' / 'vision.json').exists()
  # ...and train the same bits as the round after this run's own (float32) stages, i.e. from scratch.
  scratch = tmp_path / 'scratch'
  (scratch / 'stages').mkdir(parents=True)
  for path in (workdir / 'stages').glob('*'):
    if path.name.split('.')[0] in ('pool', 'vae', 'vision', 't2i'):
      (scratch / 'stages' / path.name).write_bytes(path.read_bytes())
  assert cli.main(['demo-train', '--workdir', str(scratch), '--smoke', '--t2i-round', '2:1e-3:1',
                   '--readout-from', str(model_dir / 'readout.safetensors')]) == 0
  from e4t_jax.fileio import read_safetensors
  for name in ('base/unet/diffusion_pytorch_model.safetensors', 'base/text_encoder/model.safetensors',
               'trainable.safetensors'):
    ours, theirs = read_safetensors(seeded / 'model' / name), read_safetensors(scratch / 'model' / name)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours), name
  before = read_safetensors(model_dir / 'base/unet/diffusion_pytorch_model.safetensors')
  after = read_safetensors(seeded / 'model' / 'base/unet/diffusion_pytorch_model.safetensors')
  assert not all(np.array_equal(before[k], after[k]) for k in before)  # the round trained


def test_demo_train_refuses_bad_flags_before_any_work(tmp_path, capsys):
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--ablation', 'no_offsets', '--install'])
  assert code == 2 and 'ships the main model only' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--variant', 'v', '--install'])
  assert code == 2 and 'ships the main model only' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--e4t-set', 'steps=10'])
  assert code == 2 and '--variant NAME' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--e4t-set', 'depth=3', '--variant', 'v'])
  assert code == 2 and 'NAME one of' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--e4t-set', 'steps=0', '--variant', 'v'])
  assert code == 2 and 'steps, batch >= 1' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--variant', 'a/b'])
  assert code == 2 and 'names folders' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--reserve', '60'])
  assert code == 2 and 'give --time-limit too' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--readout-from', str(tmp_path / 'judge.safetensors')])
  assert code == 2 and 'judge.safetensors: no such file' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--t2i-round', '500'])
  assert code == 2 and 'STEPS:LR' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--base-from', str(tmp_path / 'nomodel')])
  assert code == 2 and 'no training.json' in capsys.readouterr().err
  import e4t_jax
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--base-from', str(e4t_jax.DEMO_MODEL_DIR)])
  assert code == 2 and 'adds at least one' in capsys.readouterr().err
  code = cli.main(['demo-train', '--workdir', str(tmp_path), '--smoke', '--base-from', str(e4t_jax.DEMO_MODEL_DIR),
                   '--t2i-round', '2:1e-3'])
  assert code == 2 and 'the same settings are needed' in capsys.readouterr().err  # smoke sizes != the shipped
  assert not (tmp_path / 'stages').exists()  # refused before any work


def test_e4t_config_rejects_unknown_ablation():
  from e4t_jax.errors import ConfigError
  with pytest.raises(ConfigError, match='ablation'):
    demo_train.e4t_config('no_encoder')
  base = demo_train.e4t_config()
  assert demo_train.e4t_config('no_embedding_reg').lambda_embedding == 0.0
  assert demo_train.e4t_config('weak_embedding_reg').lambda_embedding == pytest.approx(base.lambda_embedding / 10)
  assert demo_train.e4t_config('no_offsets').offsets.targets == () and base.offsets.targets


def test_overrides_parse_each_fields_type_and_validate():
  from e4t_jax.errors import ConfigError
  config = demo_train.with_overrides(demo_train.DemoTrainConfig(), [
      'vision_steps=7', 'e4t_loss_mask=false', 'cpu_attention=xla_deferred', 'vae_lr=1e-4'])
  assert (config.vision_steps, config.e4t_loss_mask, config.cpu_attention, config.vae_lr) == (
      7, False, 'xla_deferred', 1e-4)
  assert demo_train.with_e4t_settings(config, ['e4t_steps=9', 'lr=0.5']).e4t_steps == 9
  for bad, message in (('t2i_rounds=2', 'NAME one of'), ('vision_steps=many', "is not a int"),
                       ('e4t_loss_mask=maybe', 'is not a bool'), ('cpu_attention=fast', 'cpu_attention'),
                       ('e4t_batch=0', 'steps, batch >= 1')):
    with pytest.raises(ConfigError, match=message):
      demo_train.with_overrides(demo_train.DemoTrainConfig(), [bad])
  with pytest.raises(ConfigError, match='NAME one of'):  # --e4t-set reaches the E4T fields only
    demo_train.with_e4t_settings(config, ['vision_steps=3'])


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


def _quadratic_problem():
  import jax
  import jax.numpy as jnp
  target = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)

  def loss_fn(params, batch, key):
    noise = 0.1 * jax.random.normal(key, (batch['x'].shape[0], 4))
    return jnp.mean((batch['x'] @ params['w'] + noise - batch['x'] @ target) ** 2)

  batches = lambda step: {'x': np.random.default_rng(step).normal(size=(8, 3)).astype(np.float32)}
  return loss_fn, batches


def test_a_passed_deadline_checkpoints_the_stage_and_a_rerun_resumes_bit_equal(tmp_path):
  loss_fn, batches = _quadratic_problem()
  run = lambda checkpoint=None, deadline=None: demo_train.fit(
      loss_fn, {'w': np.zeros((3, 4), np.float32)}, batches, steps=6, lr=0.1, seed=0, desc='t', ema_decay=0.9,
      checkpoint=checkpoint, checkpoint_every=100, deadline=deadline)
  expected, expected_losses = run()
  path = tmp_path / 'stage.state.npz'
  with pytest.raises(demo_train.DeadlineReached, match='at step 1 of 6'):
    run(path, deadline=0.0)  # long passed: the first step's end stops the run
  with np.load(path) as stored:
    assert int(stored['step']) == 1  # saved although checkpoint_every is 100
  resumed, losses = run(path)
  np.testing.assert_array_equal(np.asarray(resumed['w']), np.asarray(expected['w']))
  assert losses == expected_losses


def test_a_time_boxed_constant_schedule_run_is_the_run_of_the_steps_it_ran():
  from e4t_jax.errors import ConfigError
  loss_fn, batches = _quadratic_problem()
  run = lambda steps, **kw: demo_train.fit(loss_fn, {'w': np.zeros((3, 4), np.float32)}, batches, steps=steps, lr=0.1,
                                           seed=0, desc='t', ema_decay=0.9, **kw)
  cut, losses = run(50, schedule='constant', stop_at=0.0)  # passed: ends after the first step
  assert losses[-1][0] + 1 == 1
  whole, _ = run(1, schedule='constant')
  np.testing.assert_array_equal(np.asarray(cut['w']), np.asarray(whole['w']))
  longer, _ = run(50, schedule='constant')
  assert not np.array_equal(np.asarray(longer['w']), np.asarray(whole['w']))
  with pytest.raises(ConfigError, match="schedule='constant'"):
    run(50, stop_at=0.0)  # a cosine schedule depends on the step count


def test_accelerator_preset_and_bad_settings():
  from e4t_jax.errors import ConfigError
  gpu = demo_train.DemoTrainConfig.accelerator()
  assert gpu.t2i_schedule == 'constant' and gpu.t2i_dtype == 'bfloat16' and gpu.pool_size > demo_train.DemoTrainConfig().pool_size
  assert demo_train.architecture(gpu) == demo_train.architecture(demo_train.DemoTrainConfig())  # the same networks
  for field, value in (('t2i_schedule', 'linear'), ('t2i_dtype', 'float16'), ('checkpoint_every', 0),
                       ('t2i_min_snr_gamma', -1.0)):
    with pytest.raises(ConfigError, match=field):
      demo_train.DemoTrainConfig.smoke(**{field: value}).validate()


def test_min_snr_gamma_reweights_the_text_to_image_loss():
  """gamma > 0 cuts the low-noise steps' weight (a smaller loss on the same batch); a gamma above every
  step's SNR weighs all steps 1, i.e. the plain loss."""
  import jax
  pool = demo_train.render_pool(16, seed=0)
  rng = np.random.default_rng(0)
  means = rng.normal(size=(16, 16, 16, 4)).astype(np.float32)
  latents = (means, np.full_like(means, 0.1))

  def loss(gamma):
    config = demo_train.DemoTrainConfig.smoke(t2i_batch=8, t2i_min_snr_gamma=gamma)
    unet_config, _, text_config, _ = demo_train.architecture(config)
    loss_fn, params, batches = demo_train.t2i_problem(config, unet_config, text_config, latents, pool, 0.5)
    return float(loss_fn(params, batches(0), jax.random.key(3)))

  plain = loss(0.0)
  assert loss(5.0) < plain
  assert loss(1e9) == pytest.approx(plain, rel=1e-5)
