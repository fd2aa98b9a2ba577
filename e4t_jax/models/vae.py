"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax linen, NHWC.

Images are NHWC in [-1, 1]; latents are NHWC with `latent_channels` channels at 1 / 2**(len(blocks)-1)
of the image resolution. Module and parameter names mirror diffusers (`encoder/down_blocks_0/resnets_0/
norm1`, `encoder/mid_block/attentions_0/to_q`, `quant_conv`, ...), so `convert.common.torch_key` maps
each leaf to its diffusers state-dict key with no per-model table.

Scaling: `encode`/`decode` work in the VAE's own latent space, exactly like diffusers. The diffusion
model works on *scaled* latents, `(sample - shift_factor) * scaling_factor`; that conversion happens
only in `scale_latents`/`unscale_latents` (used by `encode_to_latents`/`decode_latents`), never
inside the network.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from e4t_jax.errors import ConfigError, InputError
from e4t_jax.models.layers import Attention, abstract_init, conv, group_norm

Dtype = Any

# diffusers builds every VAE norm (resnets, attention, conv_norm_out) with eps=1e-6, not the
# torch GroupNorm default 1e-5.
_NORM_EPS = 1e-6
# diffusers clamps the log-variance before exponentiating so exp() can neither overflow nor give 0.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0

_SUPPORTED_DOWN_BLOCKS = ('DownEncoderBlock2D',)
_SUPPORTED_UP_BLOCKS = ('UpDecoderBlock2D',)
_SUPPORTED_ACTIVATIONS = ('silu', 'swish')  # the same function under two names in diffusers


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Hyper-parameters of an `AutoencoderKL`; field names and defaults are diffusers' own."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ('DownEncoderBlock2D',)
  up_block_types: tuple[str, ...] = ('UpDecoderBlock2D',)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  force_upcast: bool = True  # kept only so a round trip writes the same config.json; unused here
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    # Normalise JSON lists to tuples so configs compare equal and stay hashable.
    for name in ('down_block_types', 'up_block_types', 'block_out_channels'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if isinstance(self.sample_size, list):
      object.__setattr__(self, 'sample_size', tuple(self.sample_size))
    self._validate()

  def _validate(self) -> None:
    def fail(message: str):
      raise ConfigError(f'VAE config: {message}')

    blocks = len(self.block_out_channels)
    if blocks == 0:
      fail('block_out_channels is empty.')
    unsupported = sorted(set(self.down_block_types) - set(_SUPPORTED_DOWN_BLOCKS))
    if unsupported:
      fail(f'down_block_types {unsupported} are not supported (only {list(_SUPPORTED_DOWN_BLOCKS)}).')
    unsupported = sorted(set(self.up_block_types) - set(_SUPPORTED_UP_BLOCKS))
    if unsupported:
      fail(f'up_block_types {unsupported} are not supported (only {list(_SUPPORTED_UP_BLOCKS)}).')
    if len(self.down_block_types) != blocks or len(self.up_block_types) != blocks:
      fail(f'{len(self.down_block_types)} down and {len(self.up_block_types)} up block types for '
           f'{blocks} block_out_channels; all three must have the same length.')
    if self.act_fn not in _SUPPORTED_ACTIVATIONS:
      fail(f'act_fn {self.act_fn!r} is not supported (only {list(_SUPPORTED_ACTIVATIONS)}).')
    bad = [c for c in self.block_out_channels if c <= 0 or c % self.norm_num_groups]
    if self.norm_num_groups <= 0 or bad:
      fail(f'block_out_channels {list(self.block_out_channels)} must be positive multiples of '
           f'norm_num_groups={self.norm_num_groups}.')
    if min(self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block) <= 0:
      fail('in_channels, out_channels, latent_channels and layers_per_block must be positive.')
    if not self.scaling_factor or self.scaling_factor <= 0:
      fail(f'scaling_factor must be positive, got {self.scaling_factor}.')

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for Stable Diffusion)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> 'VAEConfig':
    """Builds a config from a diffusers `AutoencoderKL` config.json dict.

    Raises:
      ConfigError: for another model class, an unknown key, or an option this port does not implement.
    """
    config = dict(config)
    class_name = config.get('_class_name', 'AutoencoderKL')
    if class_name != 'AutoencoderKL':
      raise ConfigError(f'VAE config: _class_name is {class_name!r}; only AutoencoderKL is supported.')
    values = {k: v for k, v in config.items() if not k.startswith('_')}
    # Per-channel latent statistics change how a pipeline scales latents; silently ignoring them
    # would feed the diffusion model wrongly scaled latents.
    for key in ('latents_mean', 'latents_std'):
      if values.pop(key, None) is not None:
        raise ConfigError(f'VAE config: {key} is set; per-channel latent normalisation is not supported.')
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f'VAE config: unsupported option(s) {unknown}; this AutoencoderKL port does not '
                        'implement them.')
    return cls(**values)

  def to_diffusers(self) -> dict[str, Any]:
    """The config.json dict `diffusers.AutoencoderKL.from_pretrained` expects."""
    out: dict[str, Any] = {'_class_name': 'AutoencoderKL'}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    out['latents_mean'] = None
    out['latents_std'] = None
    return out

  @classmethod
  def tiny(cls, **overrides) -> 'VAEConfig':
    """A two-level VAE for tests and demos (every width even, so it shards over 2 devices).

    Two levels exercise every block kind: a downsampler, an upsampler, 1x1 shortcut convs
    (32 -> 64 in the encoder, 64 -> 32 in the decoder) and the mid-block attention. The image
    channels stay 3 (RGB).
    """
    values = dict(
        down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=32)
    values.update(overrides)
    return cls(**values)


# ----------------------------------------------------------------------------- posterior
@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)), per latent element; arrays [batch, h, w, latent]."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> 'DiagonalGaussian':
    """Splits [..., 2 * latent] (mean first, as torch.chunk does) and clamps the log-variance."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """A reparameterised draw; the same key always gives the same sample."""
    noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
    return self.mean + self.std * noise

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(self || N(0, 1)) summed over each example's latent elements: [batch]."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- blocks
class ResnetBlock2D(nn.Module):
  """norm -> silu -> conv3x3, twice, plus a (1x1-projected when widths differ) skip connection."""
  out_channels: int
  norm_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [batch, h, w, in_channels] -> [batch, h, w, out_channels]
    kw = dict(dtype=self.dtype)
    hidden = group_norm(self.norm_groups, name='norm1', epsilon=_NORM_EPS, **kw)(x)
    hidden = conv(self.out_channels, 3, name='conv1', **kw)(nn.silu(hidden))
    hidden = group_norm(self.norm_groups, name='norm2', epsilon=_NORM_EPS, **kw)(hidden)
    # (dropout is 0 in every VAE config, so it is omitted)
    hidden = conv(self.out_channels, 3, name='conv2', **kw)(nn.silu(hidden))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name='conv_shortcut', **kw)(x)
    return x + hidden


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv, padded by one pixel on the bottom/right only (diffusers `padding=0`)."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [batch, h, w, c] -> [batch, h/2, w/2, out_channels]. diffusers zero-pads (0, 1, 0, 1) and then
    # convolves unpadded; letting the conv do that asymmetric zero padding is the same computation.
    return conv(self.out_channels, 3, name='conv', stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [batch, h, w, c] -> [batch, 2h, 2w, out_channels]. Repeating each pixel is exactly torch's
    # `interpolate(scale_factor=2, mode='nearest')` (output i reads input floor(i / 2)).
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.out_channels, 3, name='conv', dtype=self.dtype)(x)


class VAEAttentionBlock(nn.Module):
  """Single-head self-attention over all pixels with a pre-GroupNorm and a residual connection.

  diffusers keeps `group_norm` inside its `Attention`, so the shared `layers.Attention` borrows this
  module's scope (`nn.share_scope`): its `to_q`/`to_k`/`to_v`/`to_out_0` sit next to `group_norm`
  exactly as in the diffusers state dict.
  """
  norm_groups: int
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None  # see layers.dot_product_attention

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # x: [batch, h, w, channels]
    batch, height, width, channels = x.shape
    hidden = group_norm(self.norm_groups, name='group_norm', epsilon=_NORM_EPS, dtype=self.dtype)(x)
    hidden = hidden.reshape(batch, height * width, channels)  # row-major pixels = diffusers' token order
    # upcast: diffusers builds this attention with upcast_softmax; in bfloat16 the 4096-token softmax
    # of a 512x512 image needs float32.
    attention = Attention(heads=1, head_dim=channels, qkv_bias=True, out_bias=True, upcast=True,
                          implementation=self.attention_implementation, dtype=self.dtype)
    nn.share_scope(self, attention)
    hidden = attention(hidden)  # [batch, h * w, channels]
    return x + hidden.reshape(batch, height, width, channels)


class DownEncoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  norm_groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.norm_groups, self.dtype, name=f'resnets_{i}')(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.dtype, name='downsamplers_0')(x)
    return x


class UpDecoderBlock2D(nn.Module):
  out_channels: int
  num_layers: int
  norm_groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.norm_groups, self.dtype, name=f'resnets_{i}')(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name='upsamplers_0')(x)
    return x


class UNetMidBlock2D(nn.Module):
  """resnet -> (attention) -> resnet at the lowest resolution, width unchanged."""
  norm_groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = ResnetBlock2D(channels, self.norm_groups, self.dtype, name='resnets_0')(x)
    if self.add_attention:
      x = VAEAttentionBlock(self.norm_groups, self.dtype, self.attention_implementation, name='attentions_0')(x)
    return ResnetBlock2D(channels, self.norm_groups, self.dtype, name='resnets_1')(x)


class Encoder(nn.Module):
  """Images [batch, H, W, in_channels] -> posterior moments [batch, H/f, W/f, 2 * latent_channels]."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype)
    widths = cfg.block_out_channels
    x = conv(widths[0], 3, name='conv_in', **kw)(images)
    for i, width in enumerate(widths):
      x = DownEncoderBlock2D(width, cfg.layers_per_block, cfg.norm_num_groups,
                             add_downsample=i < len(widths) - 1, name=f'down_blocks_{i}', **kw)(x)
    x = UNetMidBlock2D(cfg.norm_num_groups, cfg.mid_block_add_attention, name='mid_block',
                       attention_implementation=self.attention_implementation, **kw)(x)
    x = group_norm(cfg.norm_num_groups, name='conv_norm_out', epsilon=_NORM_EPS, **kw)(x)
    # 2 * latent: mean and log-variance (diffusers' double_z=True)
    return conv(2 * cfg.latent_channels, 3, name='conv_out', **kw)(nn.silu(x))


class Decoder(nn.Module):
  """Latents [batch, h, w, latent_channels] -> images [batch, h*f, w*f, out_channels]."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    cfg, kw = self.config, dict(dtype=self.dtype)
    widths = tuple(reversed(cfg.block_out_channels))
    x = conv(widths[0], 3, name='conv_in', **kw)(latents)
    x = UNetMidBlock2D(cfg.norm_num_groups, cfg.mid_block_add_attention, name='mid_block',
                       attention_implementation=self.attention_implementation, **kw)(x)
    for i, width in enumerate(widths):
      # one more resnet per level than the encoder, as in diffusers
      x = UpDecoderBlock2D(width, cfg.layers_per_block + 1, cfg.norm_num_groups,
                           add_upsample=i < len(widths) - 1, name=f'up_blocks_{i}', **kw)(x)
    x = group_norm(cfg.norm_num_groups, name='conv_norm_out', epsilon=_NORM_EPS, **kw)(x)
    return conv(cfg.out_channels, 3, name='conv_out', **kw)(nn.silu(x))


# ----------------------------------------------------------------------------- the autoencoder
class AutoencoderKL(nn.Module):
  """diffusers' `AutoencoderKL`, NHWC.

  `dtype` is the compute dtype (e.g. jnp.bfloat16); parameters stay float32. The posterior and the
  decoded images are returned in float32 whatever the compute dtype, so callers never see bf16
  statistics or pixels.
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None  # the mid blocks' attention, see layers.dot_product_attention

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention_implementation)
    self.decoder = Decoder(cfg, self.dtype, self.attention_implementation)
    # name=None: inside setup flax names a submodule after the attribute it is assigned to.
    if cfg.use_quant_conv:
      self.quant_conv = conv(2 * cfg.latent_channels, 1, name=None, dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(cfg.latent_channels, 1, name=None, dtype=self.dtype)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """Images [batch, H, W, in_channels] in [-1, 1] -> posterior over unscaled latents [batch, H/f, W/f, latent]."""
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents [batch, h, w, latent] -> images [batch, h*f, w*f, out_channels] (about [-1, 1])."""
    if self.config.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents).astype(jnp.float32)

  def __call__(self, images: jax.Array, key: jax.Array | None = None,
               sample_posterior: bool = False) -> jax.Array:
    """Reconstruction (encode then decode); also what `init` traces to create every parameter."""
    if sample_posterior and key is None:
      raise InputError('AutoencoderKL: sample_posterior=True needs a PRNG key.')
    posterior = self.encode(images)
    latents = posterior.sample(key) if sample_posterior else posterior.mode()
    return self.decode(latents)

  def encode_to_latents(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Images -> *scaled* latents for the diffusion model: a posterior sample (its mean if key is None)."""
    posterior = self.encode(images)
    sample = posterior.mode() if key is None else posterior.sample(key)
    return scale_latents(self.config, sample)

  def decode_latents(self, latents: jax.Array) -> jax.Array:
    """*Scaled* latents from the diffusion model -> images."""
    return self.decode(unscale_latents(self.config, latents))


def scale_latents(config: VAEConfig, sample: jax.Array) -> jax.Array:
  """VAE latent space -> diffusion latent space: (sample - shift_factor) * scaling_factor."""
  if config.shift_factor is not None:
    sample = sample - config.shift_factor
  return sample * config.scaling_factor


def unscale_latents(config: VAEConfig, latents: jax.Array) -> jax.Array:
  """Inverse of `scale_latents`: latents / scaling_factor + shift_factor."""
  sample = latents / config.scaling_factor
  if config.shift_factor is not None:
    sample = sample + config.shift_factor
  return sample


def encode_to_latents(vae: AutoencoderKL, params: Any, images: jax.Array,
                      key: jax.Array | None = None) -> jax.Array:
  """Functional form of `AutoencoderKL.encode_to_latents`: images -> scaled latents."""
  return vae.apply({'params': params}, images, key, method=AutoencoderKL.encode_to_latents)


def decode_latents(vae: AutoencoderKL, params: Any, latents: jax.Array) -> jax.Array:
  """Functional form of `AutoencoderKL.decode_latents`: scaled latents -> images."""
  return vae.apply({'params': params}, latents, method=AutoencoderKL.decode_latents)


def abstract_params(vae: AutoencoderKL) -> Any:
  """The params tree as ShapeDtypeStructs, still boxed with logical axis names; allocates nothing."""
  side = vae.config.downsample_factor  # smallest image that survives every downsampling
  images = jax.ShapeDtypeStruct((1, side, side, vae.config.in_channels), jnp.float32)
  return abstract_init(vae, images)['params']
