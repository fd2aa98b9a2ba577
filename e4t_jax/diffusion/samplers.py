"""Few-step samplers (DDIM, DPM-Solver++ 2M) and classifier-free guidance, written to compile once.

The split follows what is static and what is traced:
  make_timesteps(schedule, num_steps, config)   host-side numpy; depends only on num_steps and the config
  ddim_step / dpmpp_2m_step                     pure per-step updates (jnp), usable on their own
  sample(denoise_fn, schedule, latents, timesteps, sampler, key, eta)
                                                the whole loop as ONE `jax.lax.scan`; every piece of
                                                state (DPM-Solver++'s previous x̂0) rides in the carry
Wrap `sample` in `jax.jit` once, passing latents, keys, timesteps and model params as arguments: new
noise, prompts, keys or seeds then reuse the same executable; only a new `num_steps` (the scan length)
or a new sampler config recompiles.

Both samplers reproduce diffusers' `DDIMScheduler` and `DPMSolverMultistepScheduler` (timesteps
exactly, latents to float32 rounding) given the same scheduler config and the same model outputs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule, alphas_cumprod_at
from e4t_jax.errors import ConfigError

SAMPLERS = ('ddim', 'dpmpp_2m')
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
FINAL_SIGMAS_TYPES = ('zero', 'sigma_min')
# diffusers' default spacing differs between the two schedulers.
_DEFAULT_SPACING = {'ddim': 'leading', 'dpmpp_2m': 'linspace'}
# diffusers substitutes this ᾱ for an exact zero (a zero-terminal-SNR schedule) so σ = √((1-ᾱ)/ᾱ) stays finite.
_DPM_MIN_ALPHA_CUMPROD = 2.0 ** -24

# (x_t [batch, H, W, C], t int32 []) -> model output (ε, v or x0 by the schedule's prediction_type).
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Which sampler, and the diffusers scheduler settings it honours; defaults are diffusers' class defaults.

  Build it from a model's scheduler_config.json with `from_scheduler_config`, as a diffusers pipeline
  does with `DDIMScheduler.from_config(...)`: Stable Diffusion's config sets clip_sample=False,
  set_alpha_to_one=False and steps_offset=1, which the bare defaults below (made for pixel-space
  DDPMs) do not.
  """
  name: str = 'ddim'
  # None: the scheduler's own default ('leading' for DDIM, 'linspace' for DPM-Solver++).
  timestep_spacing: str | None = None
  steps_offset: int = 0
  # DDIM only.
  set_alpha_to_one: bool = True
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  # DPM-Solver++ only.
  solver_order: int = 2
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = 'zero'
  lambda_min_clipped: float = -math.inf

  def __post_init__(self):
    if self.name not in SAMPLERS:
      raise ConfigError(f'sampler {self.name!r} is not one of {SAMPLERS}.')
    if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ConfigError(f'timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}.')
    if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
      raise ConfigError(f'final_sigmas_type {self.final_sigmas_type!r} is not one of {FINAL_SIGMAS_TYPES}.')
    if self.solver_order not in (1, 2):
      raise ConfigError(f'DPM-Solver++ solver_order must be 1 or 2 (2M), got {self.solver_order}.')

  @property
  def spacing(self) -> str:
    return self.timestep_spacing or _DEFAULT_SPACING[self.name]

  @classmethod
  def from_scheduler_config(cls, name: str, scheduler_config: Mapping[str, Any], **overrides) -> SamplerConfig:
    """The sampler `name` configured by a diffusers scheduler_config.json dict, then `overrides`.

    Keys the sampler does not use are ignored (as `from_config` does); settings of the chosen
    diffusers scheduler that this port does not implement raise ConfigError instead of being
    silently dropped.
    """
    if name not in SAMPLERS:
      raise ConfigError(f'sampler {name!r} is not one of {SAMPLERS}.')
    config = {k: v for k, v in {**scheduler_config, **overrides}.items() if v is not None}
    if config.get('thresholding', False):
      raise ConfigError('scheduler thresholding=True (dynamic thresholding) is not supported.')
    if name == 'dpmpp_2m':
      _check_dpm_solver_supported(config)
    fields = {f.name for f in dataclasses.fields(cls)} - {'name'}
    return cls(name=name, **{k: v for k, v in config.items() if k in fields})


def _check_dpm_solver_supported(config: Mapping[str, Any]) -> None:
  # Values diffusers maps onto what we implement (configs of DEIS / UniPC schedulers reused for DPM-Solver).
  algorithm = config.get('algorithm_type', 'dpmsolver++')
  if algorithm not in ('dpmsolver++', 'deis'):
    raise ConfigError(f"DPM-Solver++ algorithm_type={algorithm!r} is not supported (only 'dpmsolver++').")
  solver_type = config.get('solver_type', 'midpoint')
  if solver_type not in ('midpoint', 'logrho', 'bh1', 'bh2'):
    raise ConfigError(f"DPM-Solver++ solver_type={solver_type!r} is not supported (only 'midpoint').")
  if config.get('variance_type') in ('learned', 'learned_range'):
    raise ConfigError('DPM-Solver++ with a learned-variance model (variance_type learned*) is not supported.')
  for flag in ('use_karras_sigmas', 'use_exponential_sigmas', 'use_beta_sigmas', 'use_lu_lambdas',
               'use_flow_sigmas', 'use_dynamic_shifting'):
    if config.get(flag, False):
      raise ConfigError(f'DPM-Solver++ {flag}=True is not supported (only the plain timestep sigmas).')


def _as_config(sampler: str | SamplerConfig) -> SamplerConfig:
  return sampler if isinstance(sampler, SamplerConfig) else SamplerConfig(name=sampler)


def make_timesteps(schedule: NoiseSchedule, num_steps: int, sampler: str | SamplerConfig) -> np.ndarray:
  """The descending int64 timesteps [num_steps] diffusers' `set_timesteps(num_steps)` produces.

  Host-side and static per (num_steps, config); `schedule` must be concrete (it is only read for
  T and, for DPM-Solver++'s `lambda_min_clipped`, ᾱ).
  """
  config = _as_config(sampler)
  num_train = schedule.num_train_timesteps
  if not 1 <= num_steps <= num_train:
    raise ConfigError(f'num_steps must be in [1, {num_train}] (the training timesteps), got {num_steps}.')
  spacing = config.spacing
  if config.name == 'ddim':
    if spacing == 'linspace':
      timesteps = np.linspace(0, num_train - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif spacing == 'leading':
      step_ratio = num_train // num_steps
      timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
      timesteps += config.steps_offset
    else:  # trailing
      step_ratio = num_train / num_steps
      timesteps = np.round(np.arange(num_train, 0, -step_ratio)).astype(np.int64) - 1
    return _checked(timesteps, num_train)
  # DPM-Solver++: num_steps + 1 points with the last (t = 0) dropped, below an optional λ floor.
  last_timestep = num_train - _num_clipped_timesteps(schedule, config.lambda_min_clipped)
  if spacing == 'linspace':
    timesteps = np.linspace(0, last_timestep - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
  elif spacing == 'leading':
    step_ratio = last_timestep // (num_steps + 1)
    timesteps = (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
    timesteps += config.steps_offset
  else:  # trailing
    step_ratio = num_train / num_steps
    timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1
  return _checked(timesteps, num_train)


def _checked(timesteps: np.ndarray, num_train: int) -> np.ndarray:
  # diffusers would fail with an IndexError mid-loop; an out-of-range gather under jit would silently give NaN.
  if timesteps.min() < 0 or timesteps.max() >= num_train:
    raise ConfigError(f'timesteps {timesteps.min()}..{timesteps.max()} fall outside [0, {num_train}); '
                      'lower steps_offset or num_steps.')
  return timesteps


def _num_clipped_timesteps(schedule: NoiseSchedule, lambda_min_clipped: float) -> int:
  """How many of the noisiest timesteps have log-SNR/2 below `lambda_min_clipped` (diffusers' searchsorted)."""
  if lambda_min_clipped == -math.inf:
    return 0
  alpha_bar = np.asarray(schedule.alphas_cumprod, np.float32)
  alpha_bar = np.where(alpha_bar == 0, np.float32(_DPM_MIN_ALPHA_CUMPROD), alpha_bar)
  half_log_snr = np.log(np.sqrt(alpha_bar)) - np.log(np.sqrt(1 - alpha_bar))  # [T], decreasing in t
  return int(np.searchsorted(half_log_snr[::-1], lambda_min_clipped))


# ---------------------------------------------------------------------------------------------- DDIM


def ddim_step(schedule: NoiseSchedule, config: SamplerConfig, model_output: jax.Array, x_t: jax.Array,
              t: jax.Array, prev_t: jax.Array, eta: float | jax.Array = 0.0,
              noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One DDIM update x_t -> x_{prev_t} (Song et al. 2021, eq. 12) as diffusers' `DDIMScheduler.step`.

  Args:
    model_output, x_t: [batch, H, W, C].
    t, prev_t: int32 scalars; prev_t < 0 means "past the end" (ᾱ = 1 or ᾱ_0 by set_alpha_to_one).
    eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral sampling.
    noise: N(0, 1) like x_t, required when eta may be > 0.

  Returns:
    (x_prev, x̂0), float32.
  """
  alpha_bar = alphas_cumprod_at(schedule, t, 0)
  final_alpha_bar = jnp.float32(1.0) if config.set_alpha_to_one else schedule.alphas_cumprod[0]
  alpha_bar_prev = jnp.where(prev_t >= 0, alphas_cumprod_at(schedule, jnp.maximum(prev_t, 0), 0), final_alpha_bar)
  beta_bar = 1 - alpha_bar
  out, x_t = model_output.astype(jnp.float32), x_t.astype(jnp.float32)
  # The same expressions, in the same order, as diffusers: this is what keeps the loops within float32 rounding.
  signal, noise_level = jnp.sqrt(alpha_bar), jnp.sqrt(beta_bar)
  if schedule.prediction_type == 'epsilon':
    x0, eps = (x_t - noise_level * out) / signal, out
  elif schedule.prediction_type == 'sample':
    x0 = out
    eps = (x_t - signal * x0) / noise_level
  elif schedule.prediction_type == 'v_prediction':
    x0 = signal * x_t - noise_level * out
    eps = signal * out + noise_level * x_t
  else:
    raise ConfigError(f'prediction_type {schedule.prediction_type!r} is not one of {PREDICTION_TYPES}.')
  if config.clip_sample:
    x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
  variance = ((1 - alpha_bar_prev) / beta_bar) * (1 - alpha_bar / alpha_bar_prev)
  std_dev = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(1 - alpha_bar_prev - std_dev ** 2) * eps
  x_prev = jnp.sqrt(alpha_bar_prev) * x0 + direction
  if noise is not None:
    x_prev = x_prev + std_dev * noise.astype(jnp.float32)
  return x_prev, x0


# ---------------------------------------------------------------------------------------------- DPM-Solver++


def dpm_sigmas(schedule: NoiseSchedule, timesteps: jax.Array, config: SamplerConfig) -> jax.Array:
  """σ = √((1-ᾱ)/ᾱ) at each timestep, then the final σ ('zero' or 'sigma_min'): float32 [num_steps + 1]."""
  alpha_bar = schedule.alphas_cumprod
  alpha_bar = jnp.where(alpha_bar == 0, jnp.float32(_DPM_MIN_ALPHA_CUMPROD), alpha_bar)
  sigmas = jnp.sqrt((1 - alpha_bar) / alpha_bar)  # [T]
  final = jnp.zeros((), jnp.float32) if config.final_sigmas_type == 'zero' else sigmas[0]
  return jnp.concatenate([jnp.take(sigmas, jnp.asarray(timesteps, jnp.int32)), final[None]])


def dpm_second_order_mask(num_steps: int, config: SamplerConfig) -> np.ndarray:
  """Which steps take the second-order multistep update: bool [num_steps] (host-side, static).

  Step 0 has no previous x̂0; the last step drops to first order (diffusers' `lower_order_final`):
  always with final σ = 0 (the second-order correction would divide by an infinite log-SNR step),
  and with fewer than 15 steps, where it is known to stabilize the end of the trajectory.
  """
  mask = np.full((num_steps,), config.solver_order == 2)
  mask[0] = False
  lower_order_final = (config.euler_at_final or config.final_sigmas_type == 'zero'
                       or (config.lower_order_final and num_steps < 15))
  if lower_order_final:
    mask[-1] = False
  return mask


def dpmpp_2m_step(prediction_type: str, model_output: jax.Array, x_t: jax.Array, prev_x0: jax.Array,
                  sigma_prev: jax.Array, sigma: jax.Array, sigma_next: jax.Array,
                  second_order: jax.Array | bool) -> tuple[jax.Array, jax.Array]:
  """One DPM-Solver++(2M) update (Lu et al. 2022, midpoint form) as diffusers' multistep `step`.

  Args:
    prediction_type: what `model_output` is ('epsilon', 'v_prediction' or 'sample').
    model_output, x_t: [batch, H, W, C] at σ = `sigma`.
    prev_x0: x̂0 of the previous step (ignored, may be anything finite, when not `second_order`).
    sigma_prev, sigma, sigma_next: the previous, current and next σ (float32 scalars).
    second_order: bool scalar; False takes the first-order (DDIM-equivalent) update.

  Returns:
    (x_next, x̂0), float32; x̂0 is the next step's `prev_x0`.
  """
  def alpha_sigma(s):  # σ -> (α_t, σ_t) of the variance-preserving process
    alpha = 1 / jnp.sqrt(s ** 2 + 1)
    return alpha, s * alpha

  alpha_t, sigma_t = alpha_sigma(sigma_next)
  alpha_s0, sigma_s0 = alpha_sigma(sigma)
  alpha_s1, sigma_s1 = alpha_sigma(sigma_prev)
  out, x_t = model_output.astype(jnp.float32), x_t.astype(jnp.float32)
  if prediction_type == 'epsilon':
    x0 = (x_t - sigma_s0 * out) / alpha_s0
  elif prediction_type == 'v_prediction':
    x0 = alpha_s0 * x_t - sigma_s0 * out
  elif prediction_type == 'sample':
    x0 = out
  else:
    raise ConfigError(f'prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}.')
  # λ = log(α/σ), half the log-SNR; with σ_next = 0 it is +inf, h = inf and exp(-h) = 0 (x_next = x̂0).
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
  lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
  lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
  h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
  # D1 = (x̂0 - x̂0_prev) / r0 with r0 = h_0 / h. Selecting its weight (not the result) keeps a first-order
  # step free of the inf/NaN that 1/r0 produces on the first (no h_0) and last (h = inf) steps.
  r0 = jnp.where(second_order, h_0, 1.0) / jnp.where(second_order, h, 1.0)
  d1 = jnp.where(second_order, 1.0 / r0, 0.0) * (x0 - prev_x0.astype(jnp.float32))
  phi = alpha_t * (jnp.exp(-h) - 1.0)
  x_next = (sigma_t / sigma_s0) * x_t - phi * x0 - 0.5 * phi * d1
  return x_next, x0


# ---------------------------------------------------------------------------------------------- the loop


def sample(denoise_fn: DenoiseFn, schedule: NoiseSchedule, latents: jax.Array, timesteps: np.ndarray | jax.Array,
           sampler: str | SamplerConfig = 'ddim', key: jax.Array | None = None,
           eta: float | jax.Array = 0.0) -> jax.Array:
  """Runs the whole reverse process from `latents` (x_T ~ N(0, I)) as one `lax.scan`.

  Args:
    denoise_fn: (x_t [batch, H, W, C] in latents.dtype, t int32 []) -> model output like x_t; traced once.
    schedule: the training schedule (its prediction_type says what denoise_fn returns).
    latents: [batch, H, W, C] initial noise (both samplers have init_noise_sigma = 1).
    timesteps: int [num_steps] from `make_timesteps` with the same sampler config (may be traced; only
      its length is static).
    sampler: 'ddim' | 'dpmpp_2m', or a SamplerConfig.
    key: PRNG key for DDIM's eta > 0 noise; unused otherwise.
    eta: DDIM's noise weight; a Python 0 compiles the deterministic loop, anything else draws noise
      per step from `key` (a traced eta of 0 then gives the deterministic result).

  Returns:
    x_0 [batch, H, W, C] in latents.dtype.
  """
  config = _as_config(sampler)
  timesteps = jnp.asarray(timesteps, jnp.int32)
  if timesteps.ndim != 1 or timesteps.shape[0] < 1:
    raise ConfigError(f'timesteps must be a non-empty 1-D int array, got shape {timesteps.shape}.')
  num_steps = timesteps.shape[0]
  x = latents.astype(jnp.float32)  # carried in float32 between steps, fed to the model in latents.dtype

  def model(x_t, t):
    return denoise_fn(x_t.astype(latents.dtype), t)

  if config.name == 'ddim':
    deterministic = isinstance(eta, (int, float)) and eta == 0
    if not deterministic and key is None:
      raise ConfigError('DDIM with eta > 0 needs a PRNG key for its per-step noise.')
    # diffusers steps to t - T // num_steps whatever the spacing (so 'linspace' may skip a listed step).
    prev_timesteps = timesteps - schedule.num_train_timesteps // num_steps
    step_keys = jax.random.split(key, num_steps) if not deterministic else jnp.zeros((num_steps,), jnp.uint32)

    def ddim_body(x_t, step):
      t, prev_t, step_key = step
      noise = None if deterministic else jax.random.normal(step_key, x_t.shape, jnp.float32)
      x_prev, _ = ddim_step(schedule, config, model(x_t, t), x_t, t, prev_t, eta, noise)
      return x_prev, None

    x, _ = jax.lax.scan(ddim_body, x, (timesteps, prev_timesteps, step_keys))
    return x.astype(latents.dtype)

  sigmas = dpm_sigmas(schedule, timesteps, config)  # [num_steps + 1]
  # σ of the previous step; step 0 has none (its value is unused: step 0 is first order).
  sigmas_prev = jnp.concatenate([sigmas[:1], sigmas[:-2]])
  second_order = jnp.asarray(dpm_second_order_mask(num_steps, config))

  def dpm_body(carry, step):
    x_t, prev_x0 = carry
    t, sigma_prev, sigma, sigma_next, use_second_order = step
    x_next, x0 = dpmpp_2m_step(schedule.prediction_type, model(x_t, t), x_t, prev_x0,
                               sigma_prev, sigma, sigma_next, use_second_order)
    return (x_next, x0), None

  (x, _), _ = jax.lax.scan(dpm_body, (x, jnp.zeros_like(x)),
                           (timesteps, sigmas_prev, sigmas[:-1], sigmas[1:], second_order))
  return x.astype(latents.dtype)


# ---------------------------------------------------------------------------------------------- guidance


def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, guidance_scale: float | jax.Array) -> jax.Array:
  """uncond + s (cond - uncond) (Ho & Salimans 2022), written so that s = 1 returns `cond` exactly."""
  return cond + (guidance_scale - 1) * (cond - uncond)


def rescale_guidance(guided: jax.Array, cond: jax.Array, guidance_rescale: float | jax.Array) -> jax.Array:
  """Lin et al. 2023 (Sec. 3.4): pull the guided output's per-sample std back to the conditional one's.

  The ratio of standard deviations is the same with or without Bessel's correction, so this matches
  diffusers' `rescale_noise_cfg` (torch's unbiased std).
  """
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True)
  std_guided = jnp.std(guided, axis=axes, keepdims=True)
  rescaled = guided * (std_cond / std_guided)
  return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def guided_denoise_fn(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond_context: Any,
                      uncond_context: Any, guidance_scale: float | jax.Array,
                      guidance_rescale: float = 0.0) -> DenoiseFn:
  """A `denoise_fn` doing classifier-free guidance with ONE model call on the doubled batch.

  Args:
    model_fn: (x [n, H, W, C], t, context) -> output [n, H, W, C], e.g. a U-Net apply closed over its params.
    cond_context, uncond_context: pytrees of [batch, ...] arrays (the unconditional leaves may have
      batch 1, e.g. one empty-prompt embedding, and are broadcast).
    guidance_scale: s; a Python 1.0 (and no rescale) skips the unconditional half altogether.
    guidance_rescale: φ of Lin et al. 2023; 0 disables it (a Python float: it is static).

  As diffusers' pipelines do: x and the contexts are concatenated [uncond; cond] along the batch,
  and the output is split in the same order.
  """
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0 and not guidance_rescale:
    return lambda x_t, t: model_fn(x_t, t, cond_context)

  def batch_contexts(uncond, cond):
    uncond = jnp.broadcast_to(uncond, cond.shape).astype(cond.dtype)
    return jnp.concatenate([uncond, cond], axis=0)

  both_contexts = jax.tree.map(batch_contexts, uncond_context, cond_context)

  def denoise(x_t, t):
    batch = x_t.shape[0]
    out = model_fn(jnp.concatenate([x_t, x_t], axis=0), t, both_contexts)  # [2 * batch, H, W, C]
    uncond_out, cond_out = out[:batch], out[batch:]
    guided = classifier_free_guidance(uncond_out, cond_out, guidance_scale)
    if guidance_rescale:
      guided = rescale_guidance(guided, cond_out, guidance_rescale)
    return guided

  return denoise
