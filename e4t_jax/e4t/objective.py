"""The E4T training objective (Gal et al. 2023, Sec. 3.3), shared by domain pretraining and per-concept
tuning:

  z0 = VAE(image) ;  z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε
  features = U-Net_W(z_t, t, text("a photo of a <coarse>"))[contracting path]   (pass 1, frozen)
  f = Encoder(CLIP(image), features) ;  w* = w_coarse + s f
  ε̂ = U-Net_{W+ΔW}(z_t, t, text(prompt with w*))                               (pass 2)
  loss = ‖ε̂ − target‖² (· mask)  +  λ_emb ‖f‖²  +  λ_w Σ‖ΔW‖²

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
from e4t_jax.e4t.prompts import encode_prompt, token_embedding
from e4t_jax.models.clip import clip_preprocess
from e4t_jax.models.vae import encode_to_latents


def latent_mask(mask: jax.Array, latent_size: int) -> jax.Array:
  """[batch, H, W] pixel mask in [0, 1] -> [batch, h, w, 1] by area averaging (H = h * factor)."""
  batch, height, width = mask.shape
  factor = height // latent_size
  mask = mask.astype(jnp.float32).reshape(batch, latent_size, factor, width // factor, factor)
  return jnp.mean(mask, axis=(2, 4))[..., None]


def masked_mse(prediction: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Mean squared error over the positions the weights keep ([batch, h, w, 1] in [0, 1], or None)."""
  squared_error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  if weights is None:
    return jnp.mean(squared_error)
  weights = jnp.broadcast_to(weights, squared_error.shape)
  return jnp.sum(squared_error * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def predict_offset(modules, params: Mapping[str, Any], images: jax.Array, noisy_latents: jax.Array,
                   timesteps: jax.Array) -> jax.Array:
  """The encoder's embedding offset f [batch, width] for images in [-1, 1] and their noised latents."""
  batch = images.shape[0]
  coarse_ids = jnp.broadcast_to(jnp.asarray(modules.coarse_prompt_ids), (batch, modules.coarse_prompt_ids.shape[1]))
  coarse_context = encode_prompt(modules.text_encoder, params['text_encoder'], coarse_ids)
  # Pass 1: the pretrained U-Net (no offsets), contracting path only; nothing trains through it.
  features = modules.unet.apply({'params': params['unet']}, noisy_latents, timesteps, coarse_context,
                                features_only=True)
  features = jax.lax.stop_gradient(features)
  pixels = clip_preprocess((images + 1.0) / 2.0, modules.image_encoder.config.image_size)
  clip_out = modules.image_encoder.apply({'params': params['image_encoder']}, pixels)
  return modules.encoder.apply({'params': params['encoder']}, clip_out.hidden_states, features)


def e4t_loss(modules, params: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The E4T objective on one batch.

  Args:
    modules: `E4TModules`.
    params: the merged params tree (frozen + trainable).
    batch: 'images' [batch, H, W, 3] in [-1, 1]; 'input_ids' [batch, tokens] prompts containing the
      placeholder; optional 'mask' [batch, H, W] in [0, 1] (used when config.use_loss_mask).
    rng: a PRNG key; the VAE sample, noise and timesteps are drawn from it.
  Returns:
    (loss, metrics) with metrics 'loss', 'diffusion_loss', 'embedding_reg', 'offsets_reg', 'offset_norm'.
  """
  config = modules.config
  images = batch['images']
  k_vae, k_noise, k_t = jax.random.split(rng, 3)
  latents = jax.lax.stop_gradient(encode_to_latents(modules.vae, params['vae'], images, k_vae))
  noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
  timesteps = schedule_lib.sample_timesteps(k_t, latents.shape[0], modules.schedule)
  noisy = schedule_lib.add_noise(modules.schedule, latents, noise, timesteps)

  offset = predict_offset(modules, params, images, noisy, timesteps)  # f: [batch, width]
  w_star = placeholder_embedding(token_embedding(params['text_encoder'], modules.coarse_token_id), offset,
                                 config.embedding_scale)
  context = encode_prompt(modules.text_encoder, params['text_encoder'], batch['input_ids'],
                          placeholder_id=modules.placeholder_id, placeholder_embedding=w_star,
                          substitute_id=modules.coarse_token_id)
  # Pass 2: the U-Net with the weight offsets folded in, conditioned on the prompt with w*.
  unet_params = offsets_lib.merge_offsets(params['unet'], params['weight_offsets'], config.offsets.mode)
  prediction = modules.unet.apply({'params': unet_params}, noisy, timesteps, context).astype(jnp.float32)
  target = schedule_lib.training_target(modules.schedule, latents, noise, timesteps)

  mask = batch.get('mask') if config.use_loss_mask else None
  diffusion_loss = masked_mse(prediction, target, None if mask is None else latent_mask(mask, latents.shape[1]))
  embedding_reg = jnp.mean(jnp.sum(jnp.square(offset), axis=-1))
  offsets_reg = offsets_lib.offsets_l2(params['weight_offsets'])
  loss = diffusion_loss + config.lambda_embedding * embedding_reg + config.lambda_offsets * offsets_reg
  metrics = {'loss': loss, 'diffusion_loss': diffusion_loss, 'embedding_reg': embedding_reg,
             'offsets_reg': offsets_reg, 'offset_norm': jnp.mean(jnp.linalg.norm(offset, axis=-1))}
  return loss, metrics
