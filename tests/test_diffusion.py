"""Noise schedule and samplers: diffusers parity given the same model outputs, compile-once, guidance.

The sampler parity runs our `sample` (one lax.scan) and a PyTorch loop over diffusers'
`set_timesteps` + `step` on the same deterministic fake denoiser, implemented once for both
array libraries, and compares the final latents.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.diffusion import samplers
from e4t_jax.diffusion import schedule as schedule_lib
from e4t_jax.errors import ConfigError

# Stable Diffusion 1.x's scheduler_config.json (a PNDM config, which pipelines reuse for DDIM/DPM-Solver).
SD1_CONFIG = {
    '_class_name': 'PNDMScheduler', 'num_train_timesteps': 1000, 'beta_start': 0.00085, 'beta_end': 0.012,
    'beta_schedule': 'scaled_linear', 'clip_sample': False, 'set_alpha_to_one': False, 'steps_offset': 1,
    'skip_prk_steps': True, 'trained_betas': None,
}
SCHEDULE_CONFIGS = {
    'linear': {},
    'scaled_linear': SD1_CONFIG,
    'squaredcos_cap_v2': {'beta_schedule': 'squaredcos_cap_v2'},
}
# Whole-loop tolerance (max abs over latents of magnitude ~1, float32): the per-step difference is float32
# rounding (transcendentals of XLA vs torch), compounded over at most 25 steps; measured <= 2.3e-6 on CPU.
LOOP_TOLERANCE = 1e-5
# add_noise / get_velocity: one multiply-add of identical ᾱ_t.
FORWARD_TOLERANCE = 1e-6
LATENT_SHAPE = (2, 8, 8, 4)  # NHWC


def _latents(seed=0):
  return np.random.default_rng(seed).standard_normal(LATENT_SHAPE).astype(np.float32)


def fake_model_output(xp, x, t, alphas_cumprod, prediction_type):
  """A smooth, bounded "denoiser" of (x_t, t), written once for torch and jnp (`xp`).

  It guesses x̂0 = 1.5 tanh(1.3 √ᾱ x + 0.2 cos(x + t/300)) and returns the ε, v or x0 consistent
  with that guess, so the trajectories stay O(1) like a real model's (an arbitrary ε would blow x̂0
  up by 1/√ᾱ and measure nothing but the size of the numbers); |x̂0| > 1 exercises DDIM's clipping.
  """
  alpha_bar = alphas_cumprod[t]
  x0 = 1.5 * xp.tanh(1.3 * xp.sqrt(alpha_bar) * x + 0.2 * xp.cos(x + t / 300.0))
  eps = (x - xp.sqrt(alpha_bar) * x0) / xp.sqrt(1 - alpha_bar)
  return {'epsilon': eps, 'v_prediction': xp.sqrt(alpha_bar) * eps - xp.sqrt(1 - alpha_bar) * x0,
          'sample': x0}[prediction_type]


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize('name', list(SCHEDULE_CONFIGS) + ['trained_betas', 'zero_snr'])
def test_alphas_cumprod_match_diffusers(name):
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  if name == 'trained_betas':
    config = {'trained_betas': np.random.default_rng(0).uniform(1e-4, 0.02, 300).tolist()}
  elif name == 'zero_snr':
    config = {**SD1_CONFIG, 'rescale_betas_zero_snr': True}
  else:
    config = SCHEDULE_CONFIGS[name]
  ours = np.asarray(schedule_lib.NoiseSchedule.from_config(config).alphas_cumprod)
  reference = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.numpy()
  assert ours.dtype == np.float32 and ours.shape == reference.shape
  if name == 'zero_snr':
    # torch's vectorized float32 sqrt is not correctly rounded (1 ulp off numpy's/XLA's on ~1/3 of inputs).
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    assert ours[-1] == 0.0
  else:
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize('name', list(SCHEDULE_CONFIGS))
def test_add_noise_and_velocity_match_diffusers(name):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  config = SCHEDULE_CONFIGS[name]
  schedule = schedule_lib.NoiseSchedule.from_config(config)
  reference = diffusers.DDPMScheduler.from_config(config)
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
  noise = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 1, 250, 500, 998, 999])
  noisy = schedule_lib.add_noise(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  v = schedule_lib.velocity(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(noisy, reference.add_noise(*torch_args).numpy(), rtol=0, atol=FORWARD_TOLERANCE)
  np.testing.assert_allclose(v, reference.get_velocity(*torch_args).numpy(), rtol=0, atol=FORWARD_TOLERANCE)


@pytest.mark.parametrize('prediction_type', schedule_lib.PREDICTION_TYPES)
def test_training_target_inverts_to_x0_and_eps(prediction_type):
  schedule = schedule_lib.NoiseSchedule.from_config({**SD1_CONFIG, 'prediction_type': prediction_type})
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (4, 4, 4, 3))
  noise = jax.random.normal(k2, (4, 4, 4, 3))
  t = schedule_lib.sample_timesteps(k3, 4, schedule, min_t=1, max_t=999)
  x_t = schedule_lib.add_noise(schedule, x0, noise, t)
  target = schedule_lib.training_target(schedule, x0, noise, t)
  x0_hat, eps_hat = jax.jit(schedule_lib.predicted_x0_and_eps)(schedule, target, x_t, t)
  # 1/√ᾱ (up to ~15 at t=998) and 1/√(1-ᾱ) (~34 at t=1) amplify float32 rounding of x_t.
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=1e-4)


def test_sample_timesteps_and_snr():
  schedule = schedule_lib.NoiseSchedule.from_config(SD1_CONFIG)
  t = schedule_lib.sample_timesteps(jax.random.key(0), 4096, schedule, min_t=200, max_t=300)
  assert t.dtype == jnp.int32 and int(t.min()) == 200 and int(t.max()) == 299
  alpha_bar = np.asarray(schedule.alphas_cumprod)[[0, 999]]
  np.testing.assert_allclose(schedule_lib.snr(schedule, jnp.array([0, 999])), alpha_bar / (1 - alpha_bar), rtol=1e-6)
  with pytest.raises(ConfigError):
    schedule_lib.sample_timesteps(jax.random.key(0), 4, schedule, min_t=10, max_t=10)


@pytest.mark.parametrize('prediction_type', schedule_lib.PREDICTION_TYPES)
def test_min_snr_weight_caps_the_x0_weight_at_gamma(prediction_type):
  """Weighted target MSE == min(SNR, γ) × the x0 MSE of the same prediction, for every prediction type."""
  schedule = schedule_lib.NoiseSchedule.from_config({**SD1_CONFIG, 'prediction_type': prediction_type})
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x0, noise = jax.random.normal(k1, (6, 4, 4, 3)), jax.random.normal(k2, (6, 4, 4, 3))
  t = jnp.array([1, 60, 150, 400, 700, 998])  # SNR from ~1000 to ~0.005: both sides of gamma
  x_t = schedule_lib.add_noise(schedule, x0, noise, t)
  output = schedule_lib.training_target(schedule, x0, noise, t) + 0.1 * jax.random.normal(k3, x0.shape)
  x0_hat, _ = schedule_lib.predicted_x0_and_eps(schedule, output, x_t, t)
  target_mse = jnp.mean((output - schedule_lib.training_target(schedule, x0, noise, t)) ** 2, axis=(1, 2, 3))
  x0_mse = jnp.mean((x0_hat - x0) ** 2, axis=(1, 2, 3))
  gamma = 5.0
  weight = schedule_lib.min_snr_weight(schedule, t, gamma)
  ratio = schedule_lib.snr(schedule, t)
  np.testing.assert_allclose(weight * target_mse, jnp.minimum(ratio, gamma) * x0_mse, rtol=2e-3)
  if prediction_type == 'epsilon':  # high-noise steps keep their weight, low-noise ones are cut
    np.testing.assert_allclose(weight[3:], 1.0)
    assert float(weight[0]) < 0.01


@pytest.mark.parametrize('config', [
    {'beta_schedule': 'sigmoid'}, {'beta_schedule': 'cosine'}, {'prediction_type': 'flow_prediction'},
    {'num_train_timesteps': 0}])
def test_bad_schedule_config_raises(config):
  with pytest.raises(ConfigError):
    schedule_lib.NoiseSchedule.from_config(config)


# ---------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize('name', samplers.SAMPLERS)
@pytest.mark.parametrize('spacing', samplers.TIMESTEP_SPACINGS)
@pytest.mark.parametrize('num_steps', [1, 7, 10, 25, 50, 1000])
def test_timesteps_match_diffusers(name, spacing, num_steps):
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  scheduler_cls = {'ddim': diffusers.DDIMScheduler, 'dpmpp_2m': diffusers.DPMSolverMultistepScheduler}[name]
  config = {**SD1_CONFIG, 'timestep_spacing': spacing}
  reference = scheduler_cls.from_config(config)
  reference.set_timesteps(num_steps)
  reference = reference.timesteps.numpy()
  make = lambda: samplers.make_timesteps(schedule_lib.NoiseSchedule.from_config(config), num_steps,
                                         samplers.SamplerConfig.from_scheduler_config(name, config))
  if reference.max() >= config['num_train_timesteps']:  # 'leading' + steps_offset=1 at 1000 steps reaches t=1000
    with pytest.raises(ConfigError, match='steps_offset'):
      make()
    return
  ours = make()
  assert ours.dtype == np.int64
  np.testing.assert_array_equal(ours, reference)


def _torch_loop(scheduler, num_steps, latents, alphas_cumprod, prediction_type):
  import torch
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(latents.copy())
  table = torch.from_numpy(np.array(alphas_cumprod))
  for t in scheduler.timesteps:
    out = fake_model_output(torch, x, t, table, prediction_type)
    x = scheduler.step(out, t, x).prev_sample
  return scheduler.timesteps.numpy(), x.numpy()


# (sampler, scheduler_config, num_steps): DDIM and DPM-Solver++ 2M on SD's config for ε and v, 10 and 25
# steps, plus the corners: diffusers' bare DDIM defaults (x̂0 clipping, ᾱ_prev = 1 at the end, 'linspace'),
# a zero-terminal-SNR v model with trailing spacing, final σ = σ_min with a λ floor, first-order DPM.
LOOP_CASES = [
    *[(sampler, {**SD1_CONFIG, 'prediction_type': prediction_type, 'timestep_spacing': spacing}, num_steps)
      for sampler, spacings in (('ddim', ('leading', 'trailing')), ('dpmpp_2m', ('linspace',)))
      for spacing in spacings for prediction_type in ('epsilon', 'v_prediction') for num_steps in (10, 25)],
    ('ddim', {'timestep_spacing': 'linspace'}, 10),
    ('ddim', {**SD1_CONFIG, 'prediction_type': 'sample'}, 10),
    ('ddim', {**SD1_CONFIG, 'prediction_type': 'v_prediction', 'rescale_betas_zero_snr': True,
              'timestep_spacing': 'trailing'}, 10),
    ('dpmpp_2m', {**SD1_CONFIG, 'prediction_type': 'v_prediction', 'rescale_betas_zero_snr': True,
                  'timestep_spacing': 'trailing'}, 10),
    ('dpmpp_2m', {**SD1_CONFIG, 'final_sigmas_type': 'sigma_min', 'lambda_min_clipped': -5.1,
                  'timestep_spacing': 'leading'}, 20),
    ('dpmpp_2m', {**SD1_CONFIG, 'solver_order': 1, 'prediction_type': 'sample'}, 10),
]


@pytest.mark.parametrize('sampler,scheduler_config,num_steps', LOOP_CASES,
                         ids=[f'{s}-{c.get("prediction_type", "epsilon")}-{c.get("timestep_spacing", "default")}-{n}'
                              for s, c, n in LOOP_CASES])
def test_sampler_loop_matches_diffusers(sampler, scheduler_config, num_steps):
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  scheduler_cls = {'ddim': diffusers.DDIMScheduler, 'dpmpp_2m': diffusers.DPMSolverMultistepScheduler}[sampler]
  schedule = schedule_lib.NoiseSchedule.from_config(scheduler_config)
  config = samplers.SamplerConfig.from_scheduler_config(sampler, scheduler_config)
  timesteps = samplers.make_timesteps(schedule, num_steps, config)
  alphas_cumprod = np.asarray(schedule.alphas_cumprod)
  latents = _latents()

  def denoise(x, t):
    return fake_model_output(jnp, x, t, schedule.alphas_cumprod, schedule.prediction_type)

  ours = jax.jit(lambda x: samplers.sample(denoise, schedule, x, timesteps, config))(jnp.asarray(latents))
  reference_timesteps, reference = _torch_loop(scheduler_cls.from_config(scheduler_config), num_steps, latents,
                                               alphas_cumprod, schedule.prediction_type)
  np.testing.assert_array_equal(timesteps, reference_timesteps)
  assert np.all(np.isfinite(ours)) and np.abs(reference).max() < 10  # O(1) latents: an absolute bound is fair
  np.testing.assert_allclose(ours, reference, rtol=0, atol=LOOP_TOLERANCE)


def test_ddim_step_with_noise_matches_diffusers():
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  schedule = schedule_lib.NoiseSchedule.from_config(SD1_CONFIG)
  config = samplers.SamplerConfig.from_scheduler_config('ddim', SD1_CONFIG)
  reference = diffusers.DDIMScheduler.from_config(SD1_CONFIG)
  reference.set_timesteps(10)
  rng = np.random.default_rng(2)
  x, out, noise = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) for _ in range(3))
  for t in (901, 1):  # an ordinary step and the last one (prev_t < 0 -> ᾱ_0, set_alpha_to_one=False)
    expected = reference.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.7,
                              variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
    ours, _ = samplers.ddim_step(schedule, config, jnp.asarray(out), jnp.asarray(x), jnp.int32(t),
                                 jnp.int32(t - 100), 0.7, jnp.asarray(noise))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def _fake_denoise(schedule):
  return lambda x, t: fake_model_output(jnp, x, t, schedule.alphas_cumprod, schedule.prediction_type)


def test_ddim_eta_is_deterministic_per_key():
  schedule = schedule_lib.NoiseSchedule.from_config(SD1_CONFIG)
  config = samplers.SamplerConfig.from_scheduler_config('ddim', SD1_CONFIG)
  timesteps = samplers.make_timesteps(schedule, 10, config)
  run = jax.jit(lambda x, key, eta: samplers.sample(_fake_denoise(schedule), schedule, x, timesteps, config, key, eta))
  x = jnp.asarray(_latents())
  a, b = run(x, jax.random.key(1), 1.0), run(x, jax.random.key(1), 1.0)
  c = run(x, jax.random.key(2), 1.0)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-2
  # A traced eta of 0 draws the noise but scales it away: the deterministic loop's result.
  deterministic = samplers.sample(_fake_denoise(schedule), schedule, x, timesteps, config)
  np.testing.assert_allclose(run(x, jax.random.key(1), 0.0), deterministic, rtol=0, atol=1e-6)
  with pytest.raises(ConfigError, match='PRNG key'):
    samplers.sample(_fake_denoise(schedule), schedule, x, timesteps, config, None, 0.5)


@pytest.mark.parametrize('sampler', samplers.SAMPLERS)
def test_sample_compiles_once(sampler):
  schedule = schedule_lib.NoiseSchedule.from_config(SD1_CONFIG)
  config = samplers.SamplerConfig.from_scheduler_config(sampler, SD1_CONFIG)
  traces = []

  def denoise(x, t):
    traces.append(t.shape)  # runs at trace time only
    return fake_model_output(jnp, x, t, schedule.alphas_cumprod, schedule.prediction_type)

  # Schedule, latents, timesteps and key are all arguments: new values reuse the one executable.
  eta = 0.5 if sampler == 'ddim' else 0.0
  run = jax.jit(lambda sched, x, timesteps, key: samplers.sample(denoise, sched, x, timesteps, config, key, eta))
  outputs = []
  for seed, spacing in enumerate(('leading', 'trailing', 'linspace')):
    timesteps = samplers.make_timesteps(schedule, 10, dataclasses.replace(config, timestep_spacing=spacing))
    outputs.append(run(schedule, jnp.asarray(_latents(seed)), timesteps, jax.random.key(seed)))
  assert run._cache_size() == 1
  assert traces == [()]  # the model is traced once, inside the scan body, with a scalar timestep
  assert not np.allclose(outputs[0], outputs[1])


def test_bfloat16_latents_keep_their_dtype():
  schedule = schedule_lib.NoiseSchedule.from_config(SD1_CONFIG)
  timesteps = samplers.make_timesteps(schedule, 10, 'dpmpp_2m')
  latents = jnp.asarray(_latents())
  seen = []

  def denoise(x, t):
    seen.append(x.dtype)
    return _fake_denoise(schedule)(x, t).astype(x.dtype)

  low = samplers.sample(denoise, schedule, latents.astype(jnp.bfloat16), timesteps, 'dpmpp_2m')
  full = samplers.sample(_fake_denoise(schedule), schedule, latents, timesteps, 'dpmpp_2m')
  assert low.dtype == jnp.bfloat16 and seen == [jnp.bfloat16]
  np.testing.assert_allclose(low.astype(jnp.float32), full, atol=0.1)  # bfloat16 model: ~3 significant digits


@pytest.mark.parametrize('kwargs, match', [
    ({'name': 'euler'}, 'sampler'), ({'name': 'ddim', 'timestep_spacing': 'karras'}, 'timestep_spacing'),
    ({'name': 'dpmpp_2m', 'solver_order': 3}, 'solver_order'),
    ({'name': 'dpmpp_2m', 'final_sigmas_type': 'one'}, 'final_sigmas_type')])
def test_bad_sampler_config_raises(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    samplers.SamplerConfig(**kwargs)


@pytest.mark.parametrize('sampler, extra', [
    ('euler_a', {}), ('dpmpp_2m', {'use_karras_sigmas': True}), ('dpmpp_2m', {'algorithm_type': 'sde-dpmsolver++'}),
    ('dpmpp_2m', {'solver_type': 'heun'}), ('ddim', {'thresholding': True})])
def test_unsupported_scheduler_settings_raise(sampler, extra):
  with pytest.raises(ConfigError):
    samplers.SamplerConfig.from_scheduler_config(sampler, {**SD1_CONFIG, **extra})


def test_unknown_sampler_name_and_bad_steps_raise():
  schedule = schedule_lib.NoiseSchedule.from_config(SD1_CONFIG)
  with pytest.raises(ConfigError, match='sampler'):
    samplers.sample(_fake_denoise(schedule), schedule, jnp.zeros(LATENT_SHAPE), np.array([999]), 'heun')
  with pytest.raises(ConfigError, match='num_steps'):
    samplers.make_timesteps(schedule, 0, 'ddim')
  with pytest.raises(ConfigError, match='num_steps'):
    samplers.make_timesteps(schedule, 1001, 'dpmpp_2m')
  # Settings of the other sampler in the same scheduler_config are ignored, not rejected, and a UniPC or
  # DDPM config reused for DPM-Solver++ maps as in diffusers.
  assert samplers.SamplerConfig.from_scheduler_config('ddim', {'use_karras_sigmas': True}).name == 'ddim'
  samplers.SamplerConfig.from_scheduler_config('dpmpp_2m', {'solver_type': 'bh2', 'variance_type': 'fixed_small'})


# ---------------------------------------------------------------------------------------------- guidance


def _fake_unet(calls):
  def model_fn(x, t, context):  # context: {'text': [n, L, D]}
    calls.append(x.shape[0])
    return jnp.tanh(x * jnp.mean(context['text'], axis=(1, 2))[:, None, None, None] + t / 1000.0)
  return model_fn


def test_guidance_scale_one_is_the_conditional_output():
  cond, uncond = jnp.linspace(-2, 2, 24).reshape(2, 3, 2, 2), jnp.cos(jnp.arange(24.0)).reshape(2, 3, 2, 2)
  np.testing.assert_array_equal(samplers.classifier_free_guidance(uncond, cond, 1.0), cond)
  np.testing.assert_array_equal(samplers.classifier_free_guidance(uncond, cond, jnp.float32(1.0)), cond)
  np.testing.assert_allclose(samplers.classifier_free_guidance(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond),
                             rtol=1e-6)


@pytest.mark.parametrize('guidance_rescale', [0.0, 0.7])
def test_batched_guidance_equals_separate_calls(guidance_rescale):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, LATENT_SHAPE)
  cond = {'text': jax.random.normal(k2, (2, 5, 8))}
  uncond = {'text': jax.random.normal(k3, (1, 5, 8))}  # one empty-prompt embedding, broadcast over the batch
  calls = []
  model_fn = _fake_unet(calls)
  guided = samplers.guided_denoise_fn(model_fn, cond, uncond, 7.5, guidance_rescale)(x, jnp.int32(500))
  assert calls == [4]  # one model call on [uncond; cond]
  cond_out = model_fn(x, jnp.int32(500), cond)
  uncond_out = model_fn(x, jnp.int32(500), {'text': jnp.broadcast_to(uncond['text'], (2, 5, 8))})
  expected = samplers.classifier_free_guidance(uncond_out, cond_out, 7.5)
  if guidance_rescale:
    expected = samplers.rescale_guidance(expected, cond_out, guidance_rescale)
  np.testing.assert_allclose(guided, expected, rtol=0, atol=1e-6)
  calls.clear()
  np.testing.assert_array_equal(samplers.guided_denoise_fn(model_fn, cond, uncond, 1.0)(x, 500), cond_out)
  assert calls == [2]  # scale 1 skips the unconditional half


def test_guidance_rescale_matches_diffusers():
  torch = pytest.importorskip('torch')
  pytest.importorskip('diffusers')
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
  rng = np.random.default_rng(3)
  guided, cond = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) * s for s in (3.0, 1.0))
  expected = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale=0.7).numpy()
  np.testing.assert_allclose(samplers.rescale_guidance(jnp.asarray(guided), jnp.asarray(cond), 0.7), expected,
                             rtol=0, atol=1e-6)
