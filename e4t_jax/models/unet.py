"""Flax port of diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x, 2.x and XL (NHWC).

Module and parameter names mirror diffusers (`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q`,
`mid_block/resnets_1/conv2`, `conv_norm_out`, ...), so `convert.common.torch_key` maps every leaf to
its exact diffusers state-dict key and one generic converter (`convert.unet`) loads real checkpoints.

Each block is its own module class (resnet, transformer, down/mid/up block) so rematerialization or
other per-block transforms can be applied without touching the math.

The contracting path (conv_in, down blocks, mid block) can be run alone with `features_only=True`:
E4T's encoder reads those features from a frozen U-Net pass and never needs the expanding path.

SDXL's extra conditioning (`addition_embed_type='text_time'`): the pooled text embedding and six
size/crop values (`time_ids`) enter the time embedding through `add_embedding`, as in diffusers;
pass them as `added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}`, or pass one `SDXLContext` (all
three, a pytree) as `encoder_hidden_states`: code that carries "the context" around then needs no change.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from e4t_jax.errors import ConfigError
from e4t_jax.models import layers

Dtype = Any

CROSS_ATTN_DOWN = 'CrossAttnDownBlock2D'
PLAIN_DOWN = 'DownBlock2D'
CROSS_ATTN_UP = 'CrossAttnUpBlock2D'
PLAIN_UP = 'UpBlock2D'
CROSS_ATTN_MID = 'UNetMidBlock2DCrossAttn'
_DOWN_TYPES = (CROSS_ATTN_DOWN, PLAIN_DOWN)
_UP_TYPES = (CROSS_ATTN_UP, PLAIN_UP)
_ACTIVATIONS = ('silu', 'swish')  # the same function; diffusers accepts both spellings

# diffusers UNet2DConditionModel options this port does not implement, with the value that means
# "feature off". A config that sets one of them to anything else is rejected (ConfigError) rather
# than silently loaded into a network that computes something different.
_UNSUPPORTED_OPTIONS: dict[str, Any] = {
    'class_embed_type': None,
    'num_class_embeds': None,
    'class_embeddings_concat': False,
    'encoder_hid_dim': None,
    'encoder_hid_dim_type': None,
    'time_cond_proj_dim': None,
    'time_embedding_type': 'positional',
    'time_embedding_dim': None,
    'time_embedding_act_fn': None,
    'timestep_post_act': None,
    'resnet_time_scale_shift': 'default',
    'attention_type': 'default',
    'reverse_transformer_layers_per_block': None,
    'dropout': 0.0,  # we implement no dropout; SD trains and samples with 0.0
}
# diffusers options that only affect block types we reject anyway (Simple*/Resnet*/KDownBlock...):
# any value is accepted and ignored, so real configs that carry them load unchanged.
_INERT_OPTIONS = frozenset({
    'resnet_skip_time_act', 'resnet_out_scale_factor', 'mid_block_only_cross_attention',
    'cross_attention_norm', 'addition_embed_type_num_heads',
})
TEXT_TIME = 'text_time'  # SDXL: pooled text embedding + size/crop conditioning, added to the time embedding
SDXL_TIME_IDS = 6  # (original height, width, crop top, left, target height, width)


def _as_tuple(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The subset of diffusers' `UNet2DConditionModel` config used by Stable Diffusion 1.x / 2.x / XL.

  Field names and defaults are diffusers', so a key missing from a config.json means the same thing
  here as there.

  Head-count semantics follow diffusers exactly: `attention_head_dim` is, despite its name, the
  NUMBER of heads of each block's transformers whenever `num_attention_heads` is None (the historical
  misnomer diffusers keeps for compatibility); the width of one head is then
  `block_channels // num_heads`. SD 1.x: attention_head_dim=8 (8 heads of 40/80/160); SD 2.x:
  attention_head_dim=(5, 10, 20, 20) (heads of 64).
  """
  sample_size: int | tuple[int, int] | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
  mid_block_type: str = CROSS_ATTN_MID
  up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
  only_cross_attention: bool | tuple[bool, ...] = False
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = 'silu'
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  dual_cross_attention: bool = False
  use_linear_projection: bool = False
  upcast_attention: bool = False
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  # SDXL: 'text_time' adds add_embedding(concat(text_embeds, sinusoidal(time_ids))) to the time embedding.
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None  # width of each time id's sinusoidal features (SDXL: 256)
  projection_class_embeddings_input_dim: int | None = None  # add_embedding's input width (SDXL: 2816)

  def __post_init__(self):
    # JSON gives lists; tuples keep the config hashable (it is a flax module attribute).
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name, _as_tuple(getattr(self, field.name)))
    self._validate()

  # --------------------------------------------------------------------------- validation
  def _validate(self) -> None:
    num_blocks = len(self.block_out_channels)

    def fail(message: str):
      raise ConfigError(f'UNet config: {message}')

    if num_blocks == 0:
      fail('block_out_channels is empty.')
    if len(self.down_block_types) != num_blocks or len(self.up_block_types) != num_blocks:
      fail(f'down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) '
           f'and block_out_channels ({num_blocks}) must have the same length.')
    for kind, allowed in ((self.down_block_types, _DOWN_TYPES), (self.up_block_types, _UP_TYPES)):
      for block_type in kind:
        if block_type not in allowed:
          fail(f'block type {block_type!r} is not supported (Stable Diffusion 1.x/2.x use {allowed}).')
    if self.mid_block_type != CROSS_ATTN_MID:
      fail(f'mid_block_type {self.mid_block_type!r} is not supported; only {CROSS_ATTN_MID!r}.')
    if self.dual_cross_attention:
      fail('dual_cross_attention=True (versatile diffusion) is not supported.')
    if any(np.atleast_1d(self.only_cross_attention)):
      fail('only_cross_attention=True is not supported (Stable Diffusion uses self- and cross-attention).')
    if self.act_fn not in _ACTIVATIONS:
      fail(f'act_fn {self.act_fn!r} is not supported; only "silu".')
    if not isinstance(self.norm_num_groups, int) or self.norm_num_groups <= 0:
      fail(f'norm_num_groups must be a positive integer, got {self.norm_num_groups!r}.')
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        fail(f'block_out_channels {self.block_out_channels} must all be divisible by '
             f'norm_num_groups={self.norm_num_groups}.')
    if isinstance(self.transformer_layers_per_block, tuple) and any(
        isinstance(n, (list, tuple)) for n in self.transformer_layers_per_block):
      fail('nested transformer_layers_per_block (asymmetric SDXL-style U-Nets) is not supported.')
    for name in ('layers_per_block', 'cross_attention_dim', 'transformer_layers_per_block',
                 'attention_head_dim', 'num_attention_heads'):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != num_blocks:
        fail(f'{name} has {len(value)} entries, one per block ({num_blocks}) expected.')
    if len(set(self.cross_attention_dims())) != 1:
      fail(f'per-block cross_attention_dim {self.cross_attention_dim} with different widths is not supported.')
    for heads, channels in zip(self.heads_per_block(), self.block_out_channels):
      if not isinstance(heads, int) or not 0 < heads <= channels:
        fail(f'{heads!r} attention heads cannot split a block of {channels} channels.')
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      fail('conv_in_kernel and conv_out_kernel must be odd (same-size convolutions).')
    if self.addition_embed_type not in (None, TEXT_TIME):
      fail(f'addition_embed_type {self.addition_embed_type!r} is not supported; only None or {TEXT_TIME!r} (SDXL).')
    if self.addition_embed_type == TEXT_TIME:
      for name in ('addition_time_embed_dim', 'projection_class_embeddings_input_dim'):
        value = getattr(self, name)
        if not isinstance(value, int) or value <= 0:
          fail(f'addition_embed_type={TEXT_TIME!r} needs {name} (a positive int), got {value!r}.')
      if self.addition_time_embed_dim % 2:
        fail(f'addition_time_embed_dim must be even (sin and cos halves), got {self.addition_time_embed_dim}.')
      if self.text_embeds_dim <= 0:
        fail(f'projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} leaves no '
             f'room for the pooled text embedding next to {SDXL_TIME_IDS} x {self.addition_time_embed_dim} '
             'time-id features.')

  # --------------------------------------------------------------------------- per-block values
  def _per_block(self, value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

  def heads_per_block(self) -> tuple[int, ...]:
    """Number of attention heads of each down block (diffusers: num_attention_heads or attention_head_dim)."""
    return self._per_block(self.num_attention_heads if self.num_attention_heads is not None
                           else self.attention_head_dim)

  def layers_per_block_list(self) -> tuple[int, ...]:
    return self._per_block(self.layers_per_block)

  def cross_attention_dims(self) -> tuple[int, ...]:
    return self._per_block(self.cross_attention_dim)

  def transformer_layers_list(self) -> tuple[int, ...]:
    return self._per_block(self.transformer_layers_per_block)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def text_embeds_dim(self) -> int | None:
    """Width of the pooled text embedding a 'text_time' U-Net takes (SDXL: 1280); None without one."""
    if self.addition_embed_type != TEXT_TIME:
      return None
    return self.projection_class_embeddings_input_dim - SDXL_TIME_IDS * self.addition_time_embed_dim

  @property
  def num_upsamplers(self) -> int:
    return len(self.block_out_channels) - 1

  @property
  def num_down_features(self) -> int:
    """Number of skip tensors the contracting path yields (12 for SD)."""
    return 1 + sum(self.layers_per_block_list()) + len(self.block_out_channels) - 1

  # --------------------------------------------------------------------------- diffusers config.json
  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
    """Reads a diffusers `UNet2DConditionModel` config dict (config.json), strictly.

    Raises ConfigError for options this port does not implement (class/addition embeddings,
    time-conditioning projections, SDXL-style asymmetric transformers, ...) and for unknown keys
    that are set to anything but null.
    """
    if config.get('_class_name', 'UNet2DConditionModel') != 'UNet2DConditionModel':
      raise ConfigError(f'config describes a {config["_class_name"]}, not a UNet2DConditionModel.')
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in config.items():
      if key.startswith('_'):  # _class_name, _diffusers_version, _name_or_path
        continue
      if key in fields:
        kwargs[key] = value
      elif key in _UNSUPPORTED_OPTIONS:
        off = _UNSUPPORTED_OPTIONS[key]
        if value != off:
          raise ConfigError(f'UNet config option {key}={value!r} is not supported by e4t-jax (only Stable '
                            f'Diffusion 1.x/2.x U-Nets); it must be {off!r} or absent.')
      elif key in _INERT_OPTIONS:
        continue
      elif value is not None:
        raise ConfigError(f'UNet config option {key}={value!r} is unknown to e4t-jax; remove it or set it '
                          'to null if the model does not use it.')
    return cls(**kwargs)

  def to_diffusers(self) -> dict[str, Any]:
    """A config.json dict that `diffusers.UNet2DConditionModel.from_pretrained` loads as this network."""
    out: dict[str, Any] = {'_class_name': 'UNet2DConditionModel'}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = list(value) if isinstance(value, tuple) else value
    if self.num_attention_heads is not None:
      # diffusers refuses `num_attention_heads` in this class and reads the head count from
      # `attention_head_dim` instead (see the class docstring): write it the way diffusers reads it.
      out['attention_head_dim'] = out.pop('num_attention_heads')
      out['num_attention_heads'] = None
    out.update(_UNSUPPORTED_OPTIONS)
    return out

  @classmethod
  def tiny(cls) -> UNetConfig:
    """A tiny SD1-style U-Net for tests and demos (every width even, so it shards over 2 devices)."""
    return cls(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN),
        up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )


# ----------------------------------------------------------------------------- helpers
def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep features, as diffusers' `get_timestep_embedding` (computed in float32).

  Args:
    timesteps: [batch] (integer or fractional).
  Returns:
    [batch, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [batch, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of `torch.nn.functional.interpolate(mode='nearest', size=out_size)` along one axis."""
  if out_size == 2 * in_size:
    return np.arange(out_size) // 2
  # PyTorch: src = min(floor(dst * (float)in / out), in - 1), in float32 arithmetic.
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def nearest_resize(x: jax.Array, height: int, width: int) -> jax.Array:
  """Nearest-neighbour resize of [batch, h, w, c] exactly as PyTorch's 'nearest' (not 'nearest-exact')."""
  in_h, in_w = x.shape[1:3]
  if (height, width) == (2 * in_h, 2 * in_w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  x = jnp.take(x, _torch_nearest_indices(in_h, height), axis=1)
  return jnp.take(x, _torch_nearest_indices(in_w, width), axis=2)


# ----------------------------------------------------------------------------- building blocks
class TimestepEmbedding(nn.Module):
  """MLP on the sinusoidal timestep features: linear_1 -> SiLU -> linear_2."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_features: jax.Array) -> jax.Array:
    # t_features: [batch, block_out_channels[0]]
    x = layers.dense(self.features, ('embed', 'mlp'), name='linear_1', dtype=self.dtype)(t_features)
    x = nn.silu(x)
    return layers.dense(self.features, ('mlp', 'embed'), name='linear_2', dtype=self.dtype)(x)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-Conv twice, with the timestep embedding added in between, plus a skip."""
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    # x: [batch, h, w, c_in]; temb: [batch, time_embed_dim]
    kw = dict(dtype=self.dtype)
    h = layers.group_norm(self.groups, epsilon=self.eps, name='norm1', **kw)(x)
    h = layers.conv(self.out_channels, 3, name='conv1', **kw)(nn.silu(h))
    t = layers.dense(self.out_channels, ('embed', 'mlp'), name='time_emb_proj', **kw)(nn.silu(temb))
    h = h + t[:, None, None, :]  # [batch, h, w, c_out]
    h = layers.group_norm(self.groups, epsilon=self.eps, name='norm2', **kw)(h)
    h = layers.conv(self.out_channels, 3, name='conv2', **kw)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name='conv_shortcut', **kw)(x)
    out = x + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class GEGLU(nn.Module):
  """Gated GELU: one projection to twice the width, halves multiplied as value * gelu(gate)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.dense(2 * self.features, ('embed', 'mlp'), name='proj', dtype=self.dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)  # exact erf GELU, as torch's F.gelu default


class FeedForward(nn.Module):
  """diffusers FeedForward with GEGLU: net_0 (GEGLU) -> net_1 (dropout, absent) -> net_2 (Linear)."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = GEGLU(width * self.mult, dtype=self.dtype, name='net_0')(x)
    return layers.dense(width, ('mlp', 'embed'), name='net_2', dtype=self.dtype)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention on the text tokens, and a GEGLU feed-forward."""
  heads: int
  head_dim: int
  upcast_attention: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    # x: [batch, tokens, width]; context: [batch, text_tokens, cross_attention_dim]
    attention = lambda name: layers.Attention(
        heads=self.heads, head_dim=self.head_dim, upcast=self.upcast_attention,
        implementation=self.attention_implementation, dtype=self.dtype, name=name)
    x = x + attention('attn1')(layers.layer_norm(name='norm1', dtype=self.dtype)(x))
    x = x + attention('attn2')(layers.layer_norm(name='norm2', dtype=self.dtype)(x), context)
    return x + FeedForward(dtype=self.dtype, name='ff')(layers.layer_norm(name='norm3', dtype=self.dtype)(x))


class Transformer2DModel(nn.Module):
  """Spatial transformer: GroupNorm, proj_in, transformer blocks over h*w tokens, proj_out, residual.

  proj_in/proj_out are 1x1 convolutions (SD 1.x) or Dense layers (SD 2.x, `use_linear_projection`);
  the two are the same map, but their weights have different shapes on disk.
  """
  heads: int
  head_dim: int
  num_layers: int
  groups: int
  use_linear_projection: bool = False
  upcast_attention: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype)
    # diffusers hard-codes eps=1e-6 here, whatever the U-Net's norm_eps.
    h = layers.group_norm(self.groups, epsilon=1e-6, name='norm', **kw)(x)
    if self.use_linear_projection:
      h = layers.dense(inner, ('embed', 'mlp'), name='proj_in', **kw)(h.reshape(batch, height * width, channels))
    else:
      h = layers.conv(inner, 1, name='proj_in', **kw)(h).reshape(batch, height * width, inner)
    # h: [batch, h*w, inner]
    for i in range(self.num_layers):
      h = BasicTransformerBlock(self.heads, self.head_dim, self.upcast_attention,
                                self.attention_implementation, dtype=self.dtype,
                                name=f'transformer_blocks_{i}')(h, context)
    if self.use_linear_projection:
      h = layers.dense(channels, ('mlp', 'embed'), name='proj_out', **kw)(h).reshape(batch, height, width, channels)
    else:
      h = layers.conv(channels, 1, name='proj_out', **kw)(h.reshape(batch, height, width, inner))
    return h + x


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv; padding 0 means diffusers' asymmetric (0, 1) right/bottom pad."""
  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return layers.conv(self.channels, 3, stride=2, padding=pad, name='conv', dtype=self.dtype)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling to the skip tensor's size (2x unless the input was odd), 3x3 conv."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
    x = nearest_resize(x, *size)
    return layers.conv(self.channels, 3, name='conv', dtype=self.dtype)(x)


class _BlockSettings(nn.Module):
  """Fields shared by the down/mid/up blocks, and the resnet/transformer factories they all use."""
  out_channels: int
  num_layers: int
  groups: int
  eps: float
  heads: int = 1
  transformer_layers: int = 1
  use_linear_projection: bool = False
  upcast_attention: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32

  def resnet(self, i: int, output_scale_factor: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(self.out_channels, self.groups, self.eps, output_scale_factor,
                         dtype=self.dtype, name=f'resnets_{i}')

  def transformer(self, i: int) -> Transformer2DModel:
    return Transformer2DModel(
        heads=self.heads, head_dim=self.out_channels // self.heads, num_layers=self.transformer_layers,
        groups=self.groups, use_linear_projection=self.use_linear_projection,
        upcast_attention=self.upcast_attention, attention_implementation=self.attention_implementation,
        dtype=self.dtype, name=f'attentions_{i}')


class DownBlock2D(_BlockSettings):
  """`num_layers` resnets (each followed by a spatial transformer if `cross_attention`), then a downsampler.

  Returns (output, skips): every resnet/transformer output and the downsampler output, in diffusers'
  `res_samples` order.
  """
  cross_attention: bool = False
  add_downsample: bool = True
  downsample_padding: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    skips = []
    for i in range(self.num_layers):
      x = self.resnet(i)(x, temb)
      if self.cross_attention:
        x = self.transformer(i)(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, tuple(skips)


class UNetMidBlock2DCrossAttn(_BlockSettings):
  """resnet, then (transformer, resnet) x num_layers, at the lowest resolution."""
  output_scale_factor: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
    x = self.resnet(0, self.output_scale_factor)(x, temb)
    for i in range(self.num_layers):
      x = self.transformer(i)(x, context)
      x = self.resnet(i + 1, self.output_scale_factor)(x, temb)
    return x


class UpBlock2D(_BlockSettings):
  """`num_layers` x (concat the next skip, resnet, [transformer]), then upsample to `upsample_size`."""
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
               context: jax.Array | None = None, upsample_size: tuple[int, int] | None = None) -> jax.Array:
    # skips are consumed last-first, as the contracting path produced them in reverse.
    assert len(skips) == self.num_layers
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)  # [batch, h, w, c + c_skip]
      x = self.resnet(i)(x, temb)
      if self.cross_attention:
        x = self.transformer(i)(x, context)
    if upsample_size is not None:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name='upsamplers_0')(x, upsample_size)
    return x


@struct.dataclass
class SDXLContext:
  """An SDXL U-Net's whole conditioning, one pytree whose leaves all lead with the batch axis."""
  states: jax.Array       # [batch, tokens, cross_attention_dim]: both text encoders' states side by side
  text_embeds: jax.Array  # [batch, text_embeds_dim]: the second encoder's projected pooled output
  time_ids: jax.Array     # [batch, 6]: `sdxl_time_ids`


@struct.dataclass
class UNetFeatures:
  """Contracting-path activations, NHWC.

  down: diffusers' `down_block_res_samples`: conv_in output, then every resnet/transformer output and
    every downsampler output of each down block (12 tensors for SD).
  mid: the mid block's output.
  """
  down: tuple[jax.Array, ...]
  mid: jax.Array


# ----------------------------------------------------------------------------- the U-Net
# What a rematerialized block keeps from its forward pass (the rest is recomputed in the backward):
# nothing, only matmul/conv results, or everything (remat off in effect, for A/B measurements).
REMAT_POLICIES = {
    'nothing_saveable': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'everything_saveable': jax.checkpoint_policies.everything_saveable,
}


class UNet(nn.Module):
  """diffusers `UNet2DConditionModel` (SD 1.x/2.x), NHWC.

  Attributes:
    config: the architecture.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32. GroupNorm/LayerNorm
      statistics, the timestep features and `upcast_attention` softmax are computed in float32.
    attention_implementation: passed to `layers.dot_product_attention` (None, 'xla', 'cudnn').
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  # Rematerialization per down/mid/up block (`nn.remat`): None (off) or a name in REMAT_POLICIES.
  remat_policy: str | None = None

  def _block_class(self, cls: type, static_argnums: tuple[int, ...] = ()) -> type:
    """`cls`, or `nn.remat(cls)` with the configured policy (parameter paths are unchanged)."""
    if self.remat_policy in (None, 'none'):
      return cls
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'remat_policy {self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}.')
    return nn.remat(cls, policy=REMAT_POLICIES[self.remat_policy], static_argnums=static_argnums)

  def _block_kwargs(self, out_channels: int, num_layers: int, *, heads: int,
                    transformer_layers: int) -> dict[str, Any]:
    cfg = self.config
    return dict(out_channels=out_channels, num_layers=num_layers, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                heads=heads, transformer_layers=transformer_layers, use_linear_projection=cfg.use_linear_projection,
                upcast_attention=cfg.upcast_attention, attention_implementation=self.attention_implementation,
                dtype=self.dtype)

  def _added_embedding(self, added_cond_kwargs: Mapping[str, jax.Array] | None, batch: int) -> jax.Array | None:
    """SDXL's add_embedding(concat(text_embeds, sinusoidal(time_ids))), [batch, time_embed_dim]; None for
    a U-Net without 'text_time' conditioning."""
    cfg = self.config
    if cfg.addition_embed_type is None:
      if added_cond_kwargs:
        raise ValueError(f'added_cond_kwargs {sorted(added_cond_kwargs)} given to a U-Net without '
                         'addition_embed_type.')
      return None
    missing = {'text_embeds', 'time_ids'} - set(added_cond_kwargs or {})
    if missing:
      raise ValueError(f'this U-Net has addition_embed_type={TEXT_TIME!r} (SDXL): added_cond_kwargs must carry '
                       f'{sorted(missing)}.')
    text_embeds, time_ids = added_cond_kwargs['text_embeds'], added_cond_kwargs['time_ids']
    if text_embeds.shape != (batch, cfg.text_embeds_dim) or time_ids.shape != (batch, SDXL_TIME_IDS):
      raise ValueError(f'text_embeds {text_embeds.shape} / time_ids {time_ids.shape}: expected '
                       f'({batch}, {cfg.text_embeds_dim}) / ({batch}, {SDXL_TIME_IDS}).')
    time_features = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                       flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    features = jnp.concatenate([text_embeds.astype(jnp.float32), time_features.reshape(batch, -1)], axis=-1)
    return TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name='add_embedding')(features.astype(self.dtype))

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int, encoder_hidden_states: jax.Array, *,
               added_cond_kwargs: Mapping[str, jax.Array] | None = None,
               return_features: bool = False, features_only: bool = False) -> Any:
    """Predicts the noise (or v) for `sample`.

    Args:
      sample: [batch, h, w, in_channels] noisy latents.
      timesteps: [batch] or a scalar (broadcast over the batch).
      encoder_hidden_states: [batch, text_tokens, cross_attention_dim] text encoder states (SDXL: or an
        `SDXLContext`, which carries `added_cond_kwargs` too).
      added_cond_kwargs: SDXL ('text_time' U-Nets only): {'text_embeds': [batch, text_embeds_dim] pooled
        text embedding, 'time_ids': [batch, 6] original size, crop top-left, target size}.
      return_features: also return the contracting-path `UNetFeatures`.
      features_only: run only the contracting path and return only `UNetFeatures`.
    Returns:
      prediction [batch, h, w, out_channels] in `dtype`; or (prediction, UNetFeatures);
      or UNetFeatures alone when `features_only`.
    """
    cfg = self.config
    batch = sample.shape[0]
    if isinstance(encoder_hidden_states, SDXLContext):
      if added_cond_kwargs is not None:
        raise ValueError('pass the SDXL conditioning once: an SDXLContext or added_cond_kwargs, not both.')
      added_cond_kwargs = {'text_embeds': encoder_hidden_states.text_embeds,
                           'time_ids': encoder_hidden_states.time_ids}
      encoder_hidden_states = encoder_hidden_states.states
    heads = cfg.heads_per_block()
    layers_per_block = cfg.layers_per_block_list()
    transformer_layers = cfg.transformer_layers_list()
    channels = cfg.block_out_channels
    # The attn2 K/V kernels take their input width from the context, so check it against the config
    # here rather than let init silently build a different network.
    if encoder_hidden_states.shape[-1] != cfg.cross_attention_dims()[0]:
      raise ValueError(f'encoder_hidden_states width {encoder_hidden_states.shape[-1]} does not match '
                       f'cross_attention_dim={cfg.cross_attention_dim}.')

    if cfg.center_input_sample:
      sample = 2 * sample - 1.0

    # Time embedding: [batch, time_embed_dim]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    t_features = timestep_embedding(timesteps, channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                    freq_shift=cfg.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name='time_embedding')(t_features)
    added = self._added_embedding(added_cond_kwargs, batch)
    if added is not None:
      temb = temb + added
    context = encoder_hidden_states.astype(self.dtype)

    # Contracting path.
    x = layers.conv(channels[0], cfg.conv_in_kernel, name='conv_in', dtype=self.dtype)(sample)
    skips: list[jax.Array] = [x]
    for i, block_type in enumerate(cfg.down_block_types):
      block = self._block_class(DownBlock2D)(
          **self._block_kwargs(channels[i], layers_per_block[i], heads=heads[i],
                               transformer_layers=transformer_layers[i]),
          cross_attention=block_type == CROSS_ATTN_DOWN, add_downsample=i < len(channels) - 1,
          downsample_padding=cfg.downsample_padding, name=f'down_blocks_{i}')
      x, block_skips = block(x, temb, context)
      skips.extend(block_skips)

    x = self._block_class(UNetMidBlock2DCrossAttn)(
        **self._block_kwargs(channels[-1], 1, heads=heads[-1], transformer_layers=transformer_layers[-1]),
        output_scale_factor=cfg.mid_block_scale_factor, name='mid_block')(x, temb, context)
    features = UNetFeatures(down=tuple(skips), mid=x)
    if features_only:
      return features

    # Expanding path: each up block eats layers+1 skips and upsamples to the next skip's size.
    reversed_channels = channels[::-1]
    for i, block_type in enumerate(cfg.up_block_types):
      num_layers = layers_per_block[::-1][i] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      is_final = i == len(channels) - 1
      # upsample_size is a static shape: argument 5 of the lifted call (self is 0).
      block = self._block_class(UpBlock2D, static_argnums=(5,))(
          **self._block_kwargs(reversed_channels[i], num_layers, heads=heads[::-1][i],
                               transformer_layers=transformer_layers[::-1][i]),
          cross_attention=block_type == CROSS_ATTN_UP, name=f'up_blocks_{i}')
      x = block(x, tuple(block_skips), temb, context, None if is_final else tuple(skips[-1].shape[1:3]))

    x = layers.group_norm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name='conv_norm_out', dtype=self.dtype)(x)
    x = layers.conv(cfg.out_channels, cfg.conv_out_kernel, name='conv_out', dtype=self.dtype)(nn.silu(x))
    return (x, features) if return_features else x


def init_inputs(config: UNetConfig, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Smallest inputs that trace every parameter: (sample, timesteps, encoder_hidden_states); a
  'text_time' U-Net also needs `init_added_cond(config, batch)`."""
  size = 2 ** config.num_upsamplers
  return (jnp.zeros((batch, size, size, config.in_channels), jnp.float32),
          jnp.zeros((batch,), jnp.int32),
          jnp.zeros((batch, 1, config.cross_attention_dims()[0]), jnp.float32))


def sdxl_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int] = (0, 0),
                  target_size: tuple[int, int] | None = None, batch: int = 1) -> np.ndarray:
  """SDXL's six conditioning values, [batch, 6] float32 (host numpy: static values): original (height,
  width), crop (top, left), target (height, width), as diffusers' `_get_add_time_ids`; `target_size`
  defaults to `original_size`."""
  target_size = original_size if target_size is None else target_size
  values = tuple(original_size) + tuple(crops_coords_top_left) + tuple(target_size)
  if len(values) != SDXL_TIME_IDS:
    raise ValueError(f'sizes and crop must be (height, width) / (top, left) pairs, got {values}.')
  return np.tile(np.asarray(values, np.float32), (batch, 1))


def init_added_cond(config: UNetConfig, batch: int = 1) -> dict[str, jax.Array] | None:
  """Zero `added_cond_kwargs` for a 'text_time' (SDXL) U-Net; None for the others."""
  if config.addition_embed_type != TEXT_TIME:
    return None
  return {'text_embeds': jnp.zeros((batch, config.text_embeds_dim), jnp.float32),
          'time_ids': jnp.zeros((batch, SDXL_TIME_IDS), jnp.float32)}


def init_variables(model: UNet, key: jax.Array, batch: int = 1) -> Any:
  """`model.init` on the smallest inputs that trace every parameter (SDXL conditioning included)."""
  return model.init(key, *init_inputs(model.config, batch), added_cond_kwargs=init_added_cond(model.config, batch))


def abstract_params(model: UNet) -> Any:
  """The model's params as boxed `ShapeDtypeStruct`s (logical axes kept), without allocating weights."""
  return layers.abstract_init(model, *init_inputs(model.config), added_cond_kwargs=init_added_cond(model.config))['params']
