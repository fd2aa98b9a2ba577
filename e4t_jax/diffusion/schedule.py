"""The DDPM forward process: the noise schedule and the closed forms built on it.

A schedule is the cumulative signal fraction ᾱ_t for the training timesteps t = 0..T-1:
  x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε          (add_noise)
  v   = √ᾱ_t ε  - √(1-ᾱ_t) x0         (velocity; Salimans & Ho 2022)
built from a diffusers `scheduler_config.json` dict exactly as diffusers builds it (float32 betas, a
cumulative product accumulated in float64 like torch's CPU kernel), so that our ᾱ_t equals diffusers'
bit for bit and the samplers in `samplers.py` see the same numbers as `DDIMScheduler` and friends.

Everything but `NoiseSchedule.from_config` is a pure jnp function, usable inside jit/scan/grad.
Images are NHWC; a timestep `t` is an int array [batch] (or a scalar, broadcast over the batch).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from e4t_jax.errors import ConfigError

BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')

# diffusers' defaults for the keys a scheduler_config.json may leave out (DDPMScheduler.__init__).
_DEFAULTS = {
    'num_train_timesteps': 1000, 'beta_start': 0.0001, 'beta_end': 0.02, 'beta_schedule': 'linear',
    'trained_betas': None, 'prediction_type': 'epsilon', 'rescale_betas_zero_snr': False,
}


@struct.dataclass
class NoiseSchedule:
  """ᾱ_t of the training process (a pytree leaf) and what the network was trained to predict (static)."""
  alphas_cumprod: jax.Array  # [T] float32
  prediction_type: str = struct.field(pytree_node=False, default='epsilon')
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)

  @classmethod
  def from_config(cls, scheduler_config: Mapping[str, Any]) -> NoiseSchedule:
    """Builds the schedule of a diffusers `scheduler_config.json` dict (missing keys take diffusers' defaults).

    Keys read: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
    rescale_betas_zero_snr, prediction_type; every other key (sampler settings, `_class_name`, ...)
    is ignored here.
    """
    # A JSON null (e.g. `"trained_betas": null`) means the default, as in diffusers.
    config = {**_DEFAULTS, **{k: v for k, v in scheduler_config.items() if v is not None}}
    prediction_type = config['prediction_type']
    if prediction_type not in PREDICTION_TYPES:
      raise ConfigError(f'scheduler prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}.')
    betas = _betas(config)
    if config['rescale_betas_zero_snr']:
      betas = _rescale_zero_terminal_snr(betas)
    # torch's CPU cumprod accumulates float32 inputs in float64 and rounds each partial product once;
    # doing the same makes ᾱ_t identical to diffusers' (a float32 running product drifts by ~1e-7).
    alphas = (np.float32(1.0) - betas).astype(np.float32)
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return cls(alphas_cumprod=jnp.asarray(alphas_cumprod), prediction_type=prediction_type,
               num_train_timesteps=int(len(alphas_cumprod)))


def _betas(config: Mapping[str, Any]) -> np.ndarray:
  """β_t [T] float32, as diffusers computes them for each `beta_schedule`."""
  if config['trained_betas'] is not None:
    betas = np.asarray(config['trained_betas'], np.float32)
    if betas.ndim != 1 or betas.size == 0:
      raise ConfigError(f'scheduler trained_betas must be a non-empty list of floats, got shape {betas.shape}.')
    return betas
  num_steps = int(config['num_train_timesteps'])
  if num_steps < 1:
    raise ConfigError(f'scheduler num_train_timesteps must be >= 1, got {num_steps}.')
  schedule = config['beta_schedule']
  if schedule == 'linear':
    return _torch_linspace_float32(config['beta_start'], config['beta_end'], num_steps)
  if schedule == 'scaled_linear':
    # Linear in √β (the latent-diffusion schedule); squared in float32 like `torch.linspace(...) ** 2`.
    root = _torch_linspace_float32(config['beta_start'] ** 0.5, config['beta_end'] ** 0.5, num_steps)
    return root * root
  if schedule == 'squaredcos_cap_v2':
    return _cosine_betas(num_steps)
  raise ConfigError(f'scheduler beta_schedule {schedule!r} is not supported; use one of {BETA_SCHEDULES} '
                    'or trained_betas.')


def _torch_linspace_float32(start: float, end: float, num: int) -> np.ndarray:
  """`torch.linspace(start, end, num, dtype=torch.float32)` bit for bit.

  torch steps from `start` for the first half and back from `end` for the second, with a float32 step
  and one rounding per element (a fused multiply-add); `np.linspace` in float64 differs by 1 ulp in
  ~20% of the entries, which is enough to move ᾱ_t off diffusers'.
  """
  if num == 1:
    return np.asarray([start], np.float32)
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float32((end32 - start32) / np.float32(num - 1))
  index = np.arange(num, dtype=np.float64)
  # float32 * (int < 2^29) is exact in float64, so each sum below is rounded to float32 exactly once.
  from_start = np.float64(start32) + np.float64(step) * index
  from_end = np.float64(end32) - np.float64(step) * (num - 1 - index)
  return np.where(index < num // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """The 'squaredcos_cap_v2' (Nichol & Dhariwal 2021) betas, in float64 then rounded, as diffusers does."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
  return np.asarray(betas, np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shifts and scales √ᾱ_t so the last timestep has zero SNR (Lin et al. 2023, Alg. 1), in float32."""
  alphas = (np.float32(1.0) - betas).astype(np.float32)
  sqrt_alphas_cumprod = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
  first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
  sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * np.float32(first / (first - last))
  alphas_cumprod = sqrt_alphas_cumprod * sqrt_alphas_cumprod
  alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod_at(schedule: NoiseSchedule, t: jax.Array, ndim: int) -> jax.Array:
  """ᾱ_t for int timesteps `t` ([batch] or scalar), shaped to broadcast against an `ndim`-d [batch, ...] array."""
  t = jnp.asarray(t)
  values = jnp.take(schedule.alphas_cumprod, t.astype(jnp.int32))  # [batch] or []
  return values.reshape(values.shape + (1,) * (ndim - values.ndim)) if values.ndim else values


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε  (diffusers `add_noise`); x0, noise [batch, H, W, C], t int [batch]."""
  alpha_bar = alphas_cumprod_at(schedule, t, x0.ndim)
  x_t = jnp.sqrt(alpha_bar) * x0.astype(jnp.float32) + jnp.sqrt(1 - alpha_bar) * noise.astype(jnp.float32)
  return x_t.astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v = √ᾱ_t ε - √(1-ᾱ_t) x0  (diffusers `get_velocity`)."""
  alpha_bar = alphas_cumprod_at(schedule, t, x0.ndim)
  v = jnp.sqrt(alpha_bar) * noise.astype(jnp.float32) - jnp.sqrt(1 - alpha_bar) * x0.astype(jnp.float32)
  return v.astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """What the network regresses at x_t: ε, v or x0, by `schedule.prediction_type`."""
  if schedule.prediction_type == 'epsilon':
    return noise
  if schedule.prediction_type == 'v_prediction':
    return velocity(schedule, x0, noise, t)
  if schedule.prediction_type == 'sample':
    return x0
  raise ConfigError(f'prediction_type {schedule.prediction_type!r} is not one of {PREDICTION_TYPES}.')


def predicted_x0_and_eps(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array,
                         t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x̂0, ε̂) implied by a model output at (x_t, t), whatever the network predicts; both float32."""
  alpha_bar = alphas_cumprod_at(schedule, t, x_t.ndim)
  signal, noise_level = jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar)
  out, x_t = model_output.astype(jnp.float32), x_t.astype(jnp.float32)
  if schedule.prediction_type == 'epsilon':
    return (x_t - noise_level * out) / signal, out
  if schedule.prediction_type == 'v_prediction':
    return signal * x_t - noise_level * out, signal * out + noise_level * x_t
  if schedule.prediction_type == 'sample':
    return out, (x_t - signal * out) / noise_level
  raise ConfigError(f'prediction_type {schedule.prediction_type!r} is not one of {PREDICTION_TYPES}.')


def sample_timesteps(key: jax.Array, batch: int, schedule: NoiseSchedule, min_t: int = 0,
                     max_t: int | None = None) -> jax.Array:
  """Training timesteps, uniform over [min_t, max_t) (max_t defaults to T): int32 [batch]."""
  max_t = schedule.num_train_timesteps if max_t is None else max_t
  if not 0 <= min_t < max_t <= schedule.num_train_timesteps:
    raise ConfigError(f'timestep range [{min_t}, {max_t}) must be non-empty and inside '
                      f'[0, {schedule.num_train_timesteps}).')
  return jax.random.randint(key, (batch,), min_t, max_t, dtype=jnp.int32)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t) at `t`, float32 with t's shape (0 at a zero-terminal-SNR end)."""
  alpha_bar = alphas_cumprod_at(schedule, t, jnp.ndim(t))
  return alpha_bar / (1 - alpha_bar)


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
  """Min-SNR-γ loss weight (Hang et al. 2023) for the MSE on `training_target`, float32 with t's shape.

  In x0 terms every prediction type's MSE is an x0 error weighted by SNR(t) (ε), SNR+1 (v) or 1 (x0):
  ε-prediction weighs the content stage (SNR ≪ 1: layout, colours) ~100x less than the clean-up stage
  (SNR ≫ 1). Min-SNR-γ caps the x0 weight at γ, i.e. multiplies the target's MSE by min(SNR, γ) / SNR (ε),
  min(SNR, γ) / (SNR + 1) (v) or min(SNR, γ) (x0). A zero-SNR step (zero terminal SNR) weighs 1 under ε.
  """
  ratio = snr(schedule, t)
  capped = jnp.minimum(ratio, gamma)
  if schedule.prediction_type == 'epsilon':
    return jnp.where(ratio > 0, capped / jnp.maximum(ratio, 1e-20), 1.0)
  if schedule.prediction_type == 'v_prediction':
    return capped / (ratio + 1.0)
  if schedule.prediction_type == 'sample':
    return capped
  raise ConfigError(f'prediction_type {schedule.prediction_type!r} is not one of {PREDICTION_TYPES}.')
