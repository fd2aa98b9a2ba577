"""The E4T training objective (Gal et al. 2023, Sec. 3.3), shared by domain pretraining and per-concept
tuning:

  z0 = VAE(image) ;  z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε
  features = U-Net_W(z_t, t, text("a photo of a <coarse>"))[contracting path]   (pass 1, frozen)
  f = Encoder(CLIP(image), features) ;  w* = w_coarse + s f
  ε̂ = U-Net_{W+ΔW}(z_t, t, text(prompt with w*))                               (pass 2)
  loss = ‖ε̂ − target‖² (· mask) (· min-SNR-γ weight)  +  λ_emb ‖f‖²  +  λ_w Σ‖ΔW‖²

The embedding regularizer is on the encoder's offset f, not on w* (the reference penalizes the whole
embedding, which pulls w* towards zero instead of towards the coarse word).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from e4t_jax.diffusion import schedule as schedule_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.encoder import placeholder_embedding
from e4t_jax.e4t.prompts import coarse_embedding, text_condition
from e4t_jax.models.clip import clip_preprocess
import flax

from e4t_jax.models.vae import AutoencoderKL, DiagonalGaussian, scale_latents


def latent_mask(mask: jax.Array, latent_size: int) -> jax.Array:
  """[batch, H, W] pixel mask in [0, 1] -> [batch, h, w, 1] by area averaging (H = h * factor)."""
  batch, height, width = mask.shape
  factor = height // latent_size
  mask = mask.astype(jnp.float32).reshape(batch, latent_size, factor, width // factor, factor)
  return jnp.mean(mask, axis=(2, 4))[..., None]


def masked_mse(prediction: jax.Array, target: jax.Array, weights: jax.Array | None = None,
               example_weights: jax.Array | None = None) -> jax.Array:
  """Mean squared error over the positions the weights keep ([batch, h, w, 1] in [0, 1], or None);
  example_weights ([batch], e.g. min-SNR-γ) scale each row's squared errors."""
  squared_error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  if example_weights is not None:
    squared_error = squared_error * example_weights.astype(jnp.float32).reshape((-1,) + (1,) * (squared_error.ndim - 1))
  if weights is None:
    return jnp.mean(squared_error)
  weights = jnp.broadcast_to(weights, squared_error.shape)
  return jnp.sum(squared_error * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


@flax.struct.dataclass
class ImageFeatures:
  """What the objective computes from the concept image alone, independent of the noise draw and of
  the trainable encoder/offsets. Per-concept tuning computes it once, outside the step loop (about 40%
  of a full-size tuning step); pretraining recomputes it for every new batch."""
  posterior: DiagonalGaussian                  # VAE posterior of the image latents
  clip_hidden_states: tuple[jax.Array, ...]    # CLIP vision hidden states of the clean image
  coarse_context: Any                          # [batch, tokens, width] text states of the coarse prompt
                                               # (SDXL: an SDXLContext)

  def repeat(self, batch: int) -> 'ImageFeatures':
    """The features of the first image, broadcast to `batch` copies."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x[:1], (batch,) + x.shape[1:]), self)


def image_features(modules, params: Mapping[str, Any], images: jax.Array) -> ImageFeatures:
  """Image-only features for images in [-1, 1] ([batch, H, W, 3])."""
  batch = images.shape[0]
  posterior = modules.vae.apply({'params': params['vae']}, images, method=AutoencoderKL.encode)
  pixels = clip_preprocess((images + 1.0) / 2.0, modules.image_encoder.config.image_size)
  clip_out = modules.image_encoder.apply({'params': params['image_encoder']}, pixels)
  coarse_ids = jnp.broadcast_to(jnp.asarray(modules.coarse_prompt_ids), (batch, modules.coarse_prompt_ids.shape[1]))
  coarse_context = text_condition(modules, params, coarse_ids)
  # The VAE and text encoder are frozen; CLIP may be partly trainable (E4TConfig.trainable_patterns).
  return ImageFeatures(posterior=jax.lax.stop_gradient(posterior), clip_hidden_states=clip_out.hidden_states,
                       coarse_context=jax.lax.stop_gradient(coarse_context))


@flax.struct.dataclass
class NoiseDraws:
  """The random numbers of one objective evaluation, per batch row. Drawing them for a whole batch and
  slicing (gradient accumulation over micro-batches) gives each row the draws it has in one pass."""
  vae_eps: jax.Array    # [batch, h, w, latent] standard normal: the VAE posterior's reparameterised sample
  noise: jax.Array      # [batch, h, w, latent] the diffusion noise epsilon
  timesteps: jax.Array  # [batch] int32

  def rows(self, start: int | jax.Array, size: int) -> 'NoiseDraws':
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), self)


def draw_noise(modules, rng: jax.Array, latent: jax.ShapeDtypeStruct | jax.Array) -> NoiseDraws:
  """The draws `e4t_loss` makes from `rng` for posterior means shaped like `latent` [batch, h, w, c]."""
  k_vae, k_noise, k_t = jax.random.split(rng, 3)
  vae_eps = jax.random.normal(k_vae, latent.shape, latent.dtype)
  noise = jax.random.normal(k_noise, latent.shape, latent.dtype)
  return NoiseDraws(vae_eps=vae_eps, noise=noise,
                    timesteps=schedule_lib.sample_timesteps(k_t, latent.shape[0], modules.schedule))


def predict_offset(modules, params: Mapping[str, Any], images: jax.Array, noisy_latents: jax.Array,
                   timesteps: jax.Array, features: ImageFeatures | None = None) -> jax.Array:
  """The encoder's embedding offset f [batch, width] for images in [-1, 1] and their noised latents."""
  if features is None:
    features = image_features(modules, params, images)
  # Pass 1: the pretrained U-Net (no offsets), contracting path only; nothing trains through it.
  unet_features = modules.unet.apply({'params': params['unet']}, noisy_latents, timesteps, features.coarse_context,
                                     features_only=True)
  unet_features = jax.lax.stop_gradient(unet_features)
  return modules.encoder.apply({'params': params['encoder']}, features.clip_hidden_states, unet_features)


def e4t_loss(modules, params: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array | None,
             features: ImageFeatures | None = None, draws: NoiseDraws | None = None,
             loss_mask: bool | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The E4T objective on one batch.

  Args:
    modules: `E4TModules`.
    params: the merged params tree (frozen + trainable).
    batch: 'images' [batch, H, W, 3] in [-1, 1]; 'input_ids' [batch, tokens] prompts containing the
      placeholder; optional 'mask' [batch, H, W] in [0, 1] (used when config.use_loss_mask).
    rng: a PRNG key; the VAE sample, noise and timesteps are drawn from it (`draw_noise`).
    features: `image_features` of batch['images'] when already computed (per-concept tuning).
    draws: the draws themselves instead of `rng` (rows of a larger batch's `draw_noise`).
    loss_mask: weight the diffusion loss by batch['mask'] (None: config.use_loss_mask).
  Returns:
    (loss, metrics) with metrics 'loss', 'diffusion_loss', 'embedding_reg', 'offsets_reg', 'offset_norm'.
  """
  config = modules.config
  images = batch['images']
  if features is None:
    features = image_features(modules, params, images)
  posterior = features.posterior
  if draws is None:
    draws = draw_noise(modules, rng, posterior.mean)
  # = posterior.sample(k_vae) for the key draw_noise splits off for it.
  latents = scale_latents(modules.vae.config, posterior.mean + posterior.std * draws.vae_eps)
  noise, timesteps = draws.noise.astype(latents.dtype), draws.timesteps
  noisy = schedule_lib.add_noise(modules.schedule, latents, noise, timesteps)

  offset = predict_offset(modules, params, images, noisy, timesteps, features)  # f: [batch, width]
  w_star = placeholder_embedding(coarse_embedding(modules, params), offset, config.embedding_scale)
  context = text_condition(modules, params, batch['input_ids'], w_star)
  # Pass 2: the U-Net with the weight offsets folded in, conditioned on the prompt with w*.
  unet_params = offsets_lib.merge_offsets(params['unet'], params['weight_offsets'], config.offsets.mode)
  prediction = modules.unet.apply({'params': unet_params}, noisy, timesteps, context).astype(jnp.float32)
  target = schedule_lib.training_target(modules.schedule, latents, noise, timesteps)

  mask = batch.get('mask') if (config.use_loss_mask if loss_mask is None else loss_mask) else None
  # Min-SNR-γ (config.min_snr_gamma > 0): the high-noise steps, where the identity is decided, are not
  # outweighed by the clean-up steps (`schedule.min_snr_weight`).
  example_weights = (schedule_lib.min_snr_weight(modules.schedule, timesteps, config.min_snr_gamma)
                     if config.min_snr_gamma > 0 else None)
  diffusion_loss = masked_mse(prediction, target, None if mask is None else latent_mask(mask, latents.shape[1]),
                              example_weights)
  embedding_reg = jnp.mean(jnp.sum(jnp.square(offset), axis=-1))
  offsets_reg = offsets_lib.offsets_l2(params['weight_offsets'])
  loss = diffusion_loss + config.lambda_embedding * embedding_reg + config.lambda_offsets * offsets_reg
  metrics = {'loss': loss, 'diffusion_loss': diffusion_loss, 'embedding_reg': embedding_reg,
             'offsets_reg': offsets_reg, 'offset_norm': jnp.mean(jnp.linalg.norm(offset, axis=-1))}
  return loss, metrics
