"""The E4T domain encoder (Gal et al. 2023, Sec. 3.1): image -> offset `f` of the coarse word embedding.

It reads two feature sources of one concept image:
  (a) CLIP vision hidden states of the clean image (configurable layers; per layer the class token and
      the mean of the patch tokens), and
  (b) the U-Net's contracting-path features from a first, frozen pass on the noised latent z_t at the
      same timestep, prompted with the coarse word (spatial mean of each skip tensor and of the mid block).
Each source gets its own linear projection into a joint width; the projections are summed (equal to
a linear layer on their concatenation, without materializing it), then an MLP with LeakyReLU maps to
the text encoder's token width. The last layer starts at zero, so an untrained encoder predicts
f = 0 and the placeholder starts as the coarse word itself: w* = w_coarse + s * f.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from e4t_jax.errors import ConfigError
from e4t_jax.models import layers
from e4t_jax.models.unet import UNetFeatures

UNET_FEATURE_SETS = ('down+mid', 'down', 'mid', 'none')


def every_second_layer(num_layers: int) -> tuple[int, ...]:
  """`clip_layers` of the reference encoder: every second layer of a `num_layers`-layer CLIP tower,
  the last first ((-1, -3, ..., -31) for ViT-H/14's 32)."""
  return tuple(range(-1, -num_layers - 1, -2))


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  hidden_dim: int = 1024
  # Indices into CLIP's `hidden_states` (0 = embeddings, -1 = last layer); the reference reads every
  # second layer of ViT-H/14 (`every_second_layer(32)`). Empty: do not use CLIP features.
  clip_layers: Sequence[int] = (-1,)
  unet_features: str = 'down+mid'
  mlp_depth: int = 2  # hidden layers of the final MLP (each Dense + LeakyReLU), then the output layer
  leaky_relu_slope: float = 0.01

  def __post_init__(self):
    object.__setattr__(self, 'clip_layers', tuple(int(i) for i in self.clip_layers))
    if self.unet_features not in UNET_FEATURE_SETS:
      raise ConfigError(f'encoder.unet_features {self.unet_features!r} is not one of {UNET_FEATURE_SETS}.')
    if not self.clip_layers and self.unet_features == 'none':
      raise ConfigError('the E4T encoder needs at least one feature source (clip_layers or unet_features).')
    if self.hidden_dim < 1 or self.mlp_depth < 0:
      raise ConfigError('encoder.hidden_dim must be >= 1 and encoder.mlp_depth >= 0.')


def pooled_unet_features(features: UNetFeatures, which: str) -> list[jax.Array]:
  """Spatial means of the selected contracting-path tensors: a list of [batch, channels], float32."""
  tensors = []
  if which in ('down+mid', 'down'):
    tensors += list(features.down)
  if which in ('down+mid', 'mid'):
    tensors.append(features.mid)
  return [jnp.mean(t.astype(jnp.float32), axis=(1, 2)) for t in tensors]


def pooled_clip_features(hidden_states: Sequence[jax.Array], clip_layers: Sequence[int]) -> list[jax.Array]:
  """For each selected layer: [class token ; mean of patch tokens] -> [batch, 2 * width], float32."""
  out = []
  for index in clip_layers:
    tokens = hidden_states[index].astype(jnp.float32)  # [batch, 1 + patches, width]
    out.append(jnp.concatenate([tokens[:, 0], jnp.mean(tokens[:, 1:], axis=1)], axis=-1))
  return out


class E4TEncoder(nn.Module):
  """Predicts the embedding offset f [batch, out_dim] from CLIP and U-Net features."""
  config: EncoderConfig
  out_dim: int  # the text encoder's token-embedding width
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, clip_hidden_states: Sequence[jax.Array], unet_features: UNetFeatures) -> jax.Array:
    cfg = self.config
    sources = [(f'clip_proj_{i}', x) for i, x in enumerate(pooled_clip_features(clip_hidden_states, cfg.clip_layers))]
    sources += [(f'unet_proj_{i}', x) for i, x in enumerate(pooled_unet_features(unet_features, cfg.unet_features))]
    joint = sum(layers.dense(cfg.hidden_dim, ('embed', 'mlp'), name=name, dtype=self.dtype)(x.astype(self.dtype))
                for name, x in sources)
    hidden = nn.leaky_relu(joint, cfg.leaky_relu_slope)
    for i in range(cfg.mlp_depth):
      hidden = layers.dense(cfg.hidden_dim, ('embed', 'mlp'), name=f'mlp_{i}', dtype=self.dtype)(hidden)
      hidden = nn.leaky_relu(hidden, cfg.leaky_relu_slope)
    offset = layers.dense(self.out_dim, ('mlp', 'embed'), name='out', dtype=self.dtype,
                          kernel_init=nn.initializers.zeros_init())(hidden)
    return offset.astype(jnp.float32)


def placeholder_embedding(coarse_embedding: jax.Array, offset: jax.Array, scale: float) -> jax.Array:
  """w* = w_coarse + s * f  (coarse_embedding: [width]; offset: [batch, width])."""
  return coarse_embedding[None, :].astype(jnp.float32) + scale * offset
