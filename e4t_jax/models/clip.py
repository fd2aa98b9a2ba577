"""CLIP text and vision transformers (transformers `CLIPTextModel[WithProjection]` / `CLIPVisionModel[WithProjection]`)
in Flax linen.

The text transformer conditions the diffusion model (SD 1.x: OpenAI ViT-L/14, `quick_gelu`; SD 2.x:
OpenCLIP ViT-H/14, `gelu`; SDXL: both ViT-L and OpenCLIP bigG, the latter with its `text_projection`
giving the pooled `text_embeds`); E4T overrides the placeholder token's embedding through `inputs_embeds`.
The vision transformer feeds the E4T encoder with its per-layer hidden states.

Parameter names mirror transformers so `convert.common.torch_key` gives the state-dict key of every
leaf: the text tree maps under the prefix 'text_model.' (`embeddings/token_embedding/embedding` ->
`text_model.embeddings.token_embedding.weight`, `encoder/layers_0/self_attn/q_proj/kernel` ->
`text_model.encoder.layers.0.self_attn.q_proj.weight`), the vision tree under 'vision_model.' except
its top-level `visual_projection`, which transformers keeps outside `vision_model`
(`convert.clip` splits the tree accordingly); likewise the text tree's `text_projection`.

Layer layout (`scan_layers`, default True): the identical encoder layers run as one `nn.scan`, so a
32-layer ViT-H/14 is traced, lowered and compiled as one layer inside a loop rather than 32 copies
(compile time, issue 19). Its params are then stacked: `encoder/layers/self_attn/q_proj/kernel` is
[num_layers, in, out], its first logical axis 'layers' (replicated by the sharding rules). The
per-layer layout (`scan_layers=False`, `encoder/layers_{i}/...`) is the one transformers' key names
follow: the converters read and write it and stack on load (`stack_layers` / `unstack_layers` /
`to_layout` convert either way), so files on disk never change, and it stays available for code
that trains individual layers (E4T's `trainable_patterns` on image-encoder layers builds it).

Images are NHWC. Parameters are float32; `dtype` is the compute dtype (e.g. bfloat16).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax.errors import ConfigError, InputError
from e4t_jax.models.layers import Attention, abstract_init, conv, dense, embed, layer_norm

Dtype = Any

CLIP_PROJECTION_NAMES = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
# The scanned encoder's module name and the logical name of its stacking axis (sharding rules: replicated).
SCANNED_LAYERS = 'layers'
LAYER_AXIS = 'layers'

# OpenAI CLIP's per-channel RGB statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD); the
# OpenCLIP ViT-H of SD 2.x was trained with the same ones.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Before transformers PR #24773 CLIP text configs carried eos_token_id=2 (wrong, the real id is
# 49407); transformers keeps the old pooling rule (argmax of the ids) for such configs, and so do we.
_LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU (transformers' `QuickGELUActivation`)."""
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN entries that CLIP checkpoints use: 'gelu' is the exact erf GELU
# (`torch.nn.functional.gelu`), 'gelu_new' / 'gelu_pytorch_tanh' the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'quick_gelu': quick_gelu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
}


# ----------------------------------------------------------------------------- configs
def _sub_config(config: Mapping[str, Any], which: str, own_model_type: str) -> dict[str, Any]:
  """The text or vision part of a transformers config.json.

  Accepts the model's own config (model_type `own_model_type`) or a full `CLIPModel` config with
  `text_config` / `vision_config` sub-dicts (older files spell them `*_config_dict`, which take
  precedence exactly as in transformers' `CLIPConfig`).
  """
  config = dict(config)
  model_type = config.get('model_type')
  is_full = model_type == 'clip' or any(
      k in config for k in ('text_config', 'vision_config', 'text_config_dict', 'vision_config_dict'))
  if not is_full:
    if model_type not in (None, own_model_type):
      raise ConfigError(f'CLIP {which} config: model_type is {model_type!r}; expected {own_model_type!r} or a '
                        "full CLIPModel config ('clip').")
    return config
  sub = dict(config.get(f'{which}_config') or {})
  sub.update(config.get(f'{which}_config_dict') or {})
  if which == 'vision':
    # CLIPModel's visual_projection maps to the top-level projection_dim, not the sub-config's.
    sub['projection_dim'] = config.get('projection_dim', 512)
  return sub


def _known_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
  """The dataclass fields present in a config dict; `None` means "the default", as for transformers."""
  names = {f.name for f in dataclasses.fields(cls)}
  return {k: v for k, v in values.items() if k in names and v is not None}


def _square_size(value: Any, name: str) -> int:
  """transformers allows `image_size`/`patch_size` as [h, w]; only square ones are supported here."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConfigError(f'CLIP vision config: {name} {list(value)} is not square; only square sizes are supported.')
    value = value[0]
  return int(value)


def _validate_common(config: 'CLIPTextConfig | CLIPVisionConfig', which: str) -> None:
  if config.hidden_act not in ACTIVATIONS:
    raise ConfigError(f'CLIP {which} config: hidden_act {config.hidden_act!r} is not supported '
                      f'(only {sorted(ACTIVATIONS)}).')
  if min(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads) <= 0:
    raise ConfigError(f'CLIP {which} config: sizes and layer/head counts must be positive.')
  if config.hidden_size % config.num_attention_heads:
    raise ConfigError(f'CLIP {which} config: hidden_size {config.hidden_size} is not a multiple of '
                      f'num_attention_heads {config.num_attention_heads}.')


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyper-parameters of a `CLIPTextModel`; field names and defaults are transformers' own."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512  # the width of `text_projection` (`with_projection`); else only written back
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1

  def __post_init__(self):
    _validate_common(self, 'text')
    if not isinstance(self.eos_token_id, int):
      raise ConfigError(f'CLIP text config: eos_token_id must be one int, got {self.eos_token_id!r}.')
    if self.vocab_size <= 0 or self.max_position_embeddings <= 0:
      raise ConfigError('CLIP text config: vocab_size and max_position_embeddings must be positive.')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> 'CLIPTextConfig':
    """From a `CLIPTextModel[WithProjection]` config.json dict or a full `CLIPModel` one."""
    return cls(**_known_values(cls, _sub_config(config, 'text', 'clip_text_model')))

  def to_transformers(self, with_projection: bool = False) -> dict[str, Any]:
    """The config.json dict `transformers.CLIPTextModel[WithProjection].from_pretrained` expects."""
    architecture = 'CLIPTextModelWithProjection' if with_projection else 'CLIPTextModel'
    return {'architectures': [architecture], 'model_type': 'clip_text_model',
            'attention_dropout': 0.0, 'initializer_factor': 1.0, 'initializer_range': 0.02,
            **dataclasses.asdict(self)}

  @classmethod
  def tiny(cls, **overrides) -> 'CLIPTextConfig':
    """Two layers of width 32 for tests and demos; the real CLIP vocabulary so BPE ids are valid.

    Every width is even so each axis shards over 2 devices.
    """
    values = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                  num_attention_heads=4)
    values.update(overrides)
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hyper-parameters of a `CLIPVisionModel[WithProjection]`; field names and defaults are transformers' own."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    object.__setattr__(self, 'image_size', _square_size(self.image_size, 'image_size'))
    object.__setattr__(self, 'patch_size', _square_size(self.patch_size, 'patch_size'))
    _validate_common(self, 'vision')
    if not 0 < self.patch_size <= self.image_size:
      raise ConfigError(f'CLIP vision config: patch_size {self.patch_size} must be in [1, image_size '
                        f'{self.image_size}].')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1  # + the class token

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> 'CLIPVisionConfig':
    """From a `CLIPVisionModel[WithProjection]` config.json dict or a full `CLIPModel` one."""
    return cls(**_known_values(cls, _sub_config(config, 'vision', 'clip_vision_model')))

  def to_transformers(self, with_projection: bool = True) -> dict[str, Any]:
    """The config.json dict of a `CLIPVisionModelWithProjection` (or `CLIPVisionModel`)."""
    architecture = 'CLIPVisionModelWithProjection' if with_projection else 'CLIPVisionModel'
    return {'architectures': [architecture], 'model_type': 'clip_vision_model',
            'attention_dropout': 0.0, 'initializer_factor': 1.0, 'initializer_range': 0.02,
            **dataclasses.asdict(self)}

  @classmethod
  def tiny(cls, **overrides) -> 'CLIPVisionConfig':
    """32x32 images in 8x8 patches (16 + 1 tokens), two layers of width 32; every width even."""
    values = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    values.update(overrides)
    return cls(**values)


# ----------------------------------------------------------------------------- outputs
@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array  # [batch, tokens, width], after final_layer_norm
  pooled_output: jax.Array  # [batch, width], last_hidden_state at each sequence's end-of-text token
  # embeddings output, then each layer's output (the last one before final_layer_norm), as
  # transformers' `output_hidden_states=True`: num_hidden_layers + 1 arrays [batch, tokens, width].
  hidden_states: tuple[jax.Array, ...]
  text_embeds: jax.Array | None = None  # [batch, projection_dim]: text_projection(pooled_output), `with_projection`


@flax.struct.dataclass
class CLIPVisionOutput:
  last_hidden_state: jax.Array  # [batch, 1 + patches, width], the last layer's output (no final norm)
  pooled_output: jax.Array  # [batch, width], post_layernorm of the class token
  hidden_states: tuple[jax.Array, ...]  # pre_layrnorm output, then each layer's output
  image_embeds: jax.Array | None = None  # [batch, projection_dim] when the model has visual_projection


# ----------------------------------------------------------------------------- shared encoder
class CLIPMLP(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    # hidden: [batch, tokens, width] -> [batch, tokens, intermediate] -> [batch, tokens, width]
    hidden = dense(self.config.intermediate_size, ('embed', 'mlp'), name='fc1', dtype=self.dtype)(hidden)
    hidden = ACTIVATIONS[self.config.hidden_act](hidden)
    return dense(self.config.hidden_size, ('mlp', 'embed'), name='fc2', dtype=self.dtype)(hidden)


class CLIPEncoderLayer(nn.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, hidden: jax.Array, *, causal: bool = False, key_mask: jax.Array | None = None) -> jax.Array:
    # hidden: [batch, tokens, width]
    cfg = self.config
    norm = functools.partial(layer_norm, epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    attention = Attention(
        heads=cfg.num_attention_heads, head_dim=cfg.head_dim, qkv_bias=True, out_bias=True,
        projection_names=CLIP_PROJECTION_NAMES, implementation=self.attention_implementation,
        dtype=self.dtype, name='self_attn')
    hidden = hidden + attention(norm(name='layer_norm1')(hidden), causal=causal, key_mask=key_mask)
    return hidden + CLIPMLP(cfg, dtype=self.dtype, name='mlp')(norm(name='layer_norm2')(hidden))


class _ScanStep(CLIPEncoderLayer):
  """`CLIPEncoderLayer` as an `nn.scan` body: (hidden, key_mask) -> (hidden, hidden)."""
  causal: bool = False

  def __call__(self, hidden: jax.Array, key_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    hidden = super().__call__(hidden, causal=self.causal, key_mask=key_mask)
    return hidden, hidden


class CLIPEncoder(nn.Module):
  """The stack of identical layers, scanned or unrolled (`scan_layers`, see the module docstring)."""
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  scan_layers: bool = True

  @nn.compact
  def __call__(self, hidden: jax.Array, *, causal: bool = False,
               key_mask: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Returns (last layer's output, (input, each layer's output)), all [batch, tokens, width]."""
    num_layers = self.config.num_hidden_layers
    if self.scan_layers:
      # One traced layer whatever the depth: parameters stacked on a leading 'layers' axis.
      scanned = nn.scan(_ScanStep, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=(nn.broadcast,), length=num_layers, metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
      last, outputs = scanned(self.config, dtype=self.dtype, attention_implementation=self.attention_implementation,
                              causal=causal, name=SCANNED_LAYERS)(hidden, key_mask)
      return last, (hidden,) + tuple(outputs[i] for i in range(num_layers))
    all_hidden = [hidden]
    for i in range(num_layers):
      # `layers_{i}` maps to transformers' `encoder.layers.{i}` (a list container in convert.common).
      hidden = CLIPEncoderLayer(self.config, dtype=self.dtype,
                                attention_implementation=self.attention_implementation,
                                name=f'layers_{i}')(hidden, causal=causal, key_mask=key_mask)
      all_hidden.append(hidden)
    return hidden, tuple(all_hidden)


def is_scanned(params: Mapping[str, Any]) -> bool:
  """Whether a CLIP tower's params tree holds its layers stacked (`encoder/layers/...`)."""
  return SCANNED_LAYERS in params.get('encoder', {})


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Per-layer CLIP params (`encoder/layers_{i}/...`) -> the scanned layout (`encoder/layers/...`,
  each leaf [num_layers, ...]); a tree already scanned is returned as it is. Works on numpy arrays,
  jax arrays and ShapeDtypeStructs alike (the latter for abstract trees)."""
  params = dict(params)
  if is_scanned(params):
    return params
  encoder = params['encoder']
  count = len(encoder)
  names = [f'layers_{i}' for i in range(count)]
  if sorted(encoder) != sorted(names):
    raise ValueError(f'CLIP params: encoder holds {sorted(encoder)[:4]}…, expected layers_0…layers_{count - 1}.')

  def stack(*leaves):
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((count,) + tuple(leaves[0].shape), leaves[0].dtype)
    xp = np if all(isinstance(x, np.ndarray) for x in leaves) else jnp
    return xp.stack(leaves)

  params['encoder'] = {SCANNED_LAYERS: jax.tree.map(stack, *[encoder[n] for n in names])}
  return params


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `stack_layers`: the per-layer layout that transformers' key names follow."""
  params = dict(params)
  if not is_scanned(params):
    return params
  stacked = params['encoder'][SCANNED_LAYERS]
  count = jax.tree.leaves(stacked)[0].shape[0]

  def take(i):
    return lambda x: (jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype) if isinstance(x, jax.ShapeDtypeStruct)
                      else x[i])

  params['encoder'] = {f'layers_{i}': jax.tree.map(take(i), stacked) for i in range(count)}
  return params


def per_layer_paths(path: tuple[str, ...], count: int) -> list[tuple[str, ...]] | None:
  """The per-layer paths a stacked leaf stands for, within a tower's params tree: ('encoder', 'layers', *rest)
  -> [('encoder', 'layers_0', *rest), …] (the names files use); None for a leaf that is not stacked."""
  if tuple(path[:2]) != ('encoder', SCANNED_LAYERS):
    return None
  return [('encoder', f'layers_{i}') + tuple(path[2:]) for i in range(count)]


def to_layout(params: Mapping[str, Any], scan_layers: bool) -> dict[str, Any]:
  """`params` in the layout a module with `scan_layers` expects."""
  return stack_layers(params) if scan_layers else unstack_layers(params)


# ----------------------------------------------------------------------------- text
class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    # setup (not compact) so the token table can be reached on its own, through `embed_tokens`.
    cfg = self.config
    self.token_embedding = embed(cfg.vocab_size, cfg.hidden_size, ('vocab', 'embed'), name='token_embedding',
                                 dtype=self.dtype)
    self.position_embedding = embed(cfg.max_position_embeddings, cfg.hidden_size, ('position', 'embed'),
                                    name='position_embedding', dtype=self.dtype)

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    return self.token_embedding(input_ids)  # [batch, tokens] -> [batch, tokens, width]

  def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None) -> jax.Array:
    if inputs_embeds is None:
      inputs_embeds = self.embed_tokens(input_ids)
    tokens = inputs_embeds.shape[1]
    positions = self.position_embedding(jnp.arange(tokens))  # [tokens, width], positions 0..tokens-1
    return inputs_embeds.astype(self.dtype) + positions


class CLIPTextTransformer(nn.Module):
  """transformers' `CLIPTextModel`: causal transformer over BPE tokens, pooled at the end-of-text token;
  `CLIPTextModelWithProjection` when `with_projection` (params gain the top-level `text_projection`).

  Use: `model.apply({'params': params}, input_ids)`; the token table alone is
  `model.apply({'params': params}, input_ids, method=model.embed_tokens)`.
  """
  config: CLIPTextConfig
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None  # see layers.dot_product_attention
  scan_layers: bool = True  # stacked layer params, one traced layer (see the module docstring)

  def setup(self):
    cfg = self.config
    self.embeddings = CLIPTextEmbeddings(cfg, dtype=self.dtype)
    self.encoder = CLIPEncoder(cfg, dtype=self.dtype, attention_implementation=self.attention_implementation,
                               scan_layers=self.scan_layers)
    self.final_layer_norm = layer_norm(name='final_layer_norm', epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    if self.with_projection:
      self.text_projection = dense(cfg.projection_dim, ('embed', 'mlp'), name='text_projection', use_bias=False,
                                   dtype=self.dtype)

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    """The token-table lookup alone: [batch, tokens] int -> [batch, tokens, width] (no positions)."""
    return self.embeddings.embed_tokens(input_ids)

  def __call__(self, input_ids: jax.Array, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    """Encodes token ids.

    Args:
      input_ids: [batch, tokens] int token ids; always needed, they locate the end-of-text token
        whose hidden state is `pooled_output`.
      inputs_embeds: optional [batch, tokens, width] token embeddings used instead of the table lookup
        (E4T swaps in the placeholder token's predicted embedding); position embeddings are still added.
      attention_mask: optional [batch, tokens], 1 for real tokens and 0 for padding, applied on top of
        the causal mask. Stable Diffusion passes none.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise InputError(f'CLIP text: input_ids must be [batch, tokens], got shape {input_ids.shape}.')
    batch, tokens = input_ids.shape
    if tokens > cfg.max_position_embeddings:
      raise InputError(f'CLIP text: {tokens} tokens exceed max_position_embeddings '
                       f'{cfg.max_position_embeddings}; truncate the prompt.')
    if inputs_embeds is not None and inputs_embeds.shape != (batch, tokens, cfg.hidden_size):
      raise InputError(f'CLIP text: inputs_embeds has shape {inputs_embeds.shape}, expected '
                       f'{(batch, tokens, cfg.hidden_size)}.')
    if attention_mask is not None and attention_mask.shape != (batch, tokens):
      raise InputError(f'CLIP text: attention_mask has shape {attention_mask.shape}, expected {(batch, tokens)}.')

    hidden = self.embeddings(input_ids, inputs_embeds)  # [batch, tokens, width]
    key_mask = None if attention_mask is None else attention_mask.astype(bool)
    hidden, all_hidden = self.encoder(hidden, causal=True, key_mask=key_mask)
    last_hidden_state = self.final_layer_norm(hidden)

    if cfg.eos_token_id == _LEGACY_EOS_TOKEN_ID:
      # Legacy rule: end-of-text (49407) is the largest id in the vocabulary; argmax finds its first use.
      eos_position = jnp.argmax(input_ids, axis=-1)
    else:
      # First eos position (padding may reuse the eos id, so not the last one).
      eos_position = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled_output = last_hidden_state[jnp.arange(batch), eos_position]  # [batch, width]
    text_embeds = self.text_projection(pooled_output) if self.with_projection else None
    return CLIPTextOutput(last_hidden_state=last_hidden_state, pooled_output=pooled_output,
                          hidden_states=all_hidden, text_embeds=text_embeds)


# ----------------------------------------------------------------------------- vision
class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    # pixel_values: [batch, size, size, channels] -> [batch, 1 + patches, width]
    cfg = self.config
    class_embedding = self.param(
        'class_embedding',
        nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size ** -0.5), ('embed',)),
        (cfg.hidden_size,), jnp.float32)
    patches = conv(cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, padding=0, use_bias=False,
                   name='patch_embedding', dtype=self.dtype)(pixel_values.astype(self.dtype))
    batch = patches.shape[0]
    # [batch, grid, grid, width] -> [batch, grid * grid, width], row-major like torch's flatten(2).
    patches = patches.reshape(batch, -1, cfg.hidden_size)
    class_token = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
    tokens = jnp.concatenate([class_token, patches], axis=1)
    positions = embed(cfg.num_positions, cfg.hidden_size, ('position', 'embed'), name='position_embedding',
                      dtype=self.dtype)(jnp.arange(cfg.num_positions))
    return tokens + positions


class CLIPVisionTransformer(nn.Module):
  """transformers' `CLIPVisionModel` (or `CLIPVisionModelWithProjection` when `with_projection`).

  Params: {embeddings, pre_layrnorm, encoder, post_layernorm[, visual_projection]}; the first four
  correspond to transformers' `vision_model.*`, `visual_projection` to the top-level key.
  """
  config: CLIPVisionConfig
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  scan_layers: bool = True  # stacked layer params, one traced layer (see the module docstring)

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    """Encodes [batch, image_size, image_size, channels] NHWC images, already `clip_preprocess`ed."""
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      hint = ' (that looks NCHW; pass NHWC)' if pixel_values.ndim == 4 and pixel_values.shape[1] == cfg.num_channels \
          else ''
      raise InputError(f'CLIP vision: pixel_values has shape {pixel_values.shape}, expected [batch, '
                       f'{", ".join(map(str, want))}]{hint}; resize with clip_preprocess.')
    norm = functools.partial(layer_norm, epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    hidden = CLIPVisionEmbeddings(cfg, dtype=self.dtype, name='embeddings')(pixel_values)
    hidden = norm(name='pre_layrnorm')(hidden)  # (sic) transformers' spelling, kept for the key names
    hidden, all_hidden = CLIPEncoder(cfg, dtype=self.dtype, attention_implementation=self.attention_implementation,
                                     scan_layers=self.scan_layers, name='encoder')(hidden)
    pooled_output = norm(name='post_layernorm')(hidden[:, 0])  # [batch, width], the class token
    image_embeds = None
    if self.with_projection:
      image_embeds = dense(cfg.projection_dim, ('embed', 'mlp'), name='visual_projection', use_bias=False,
                           dtype=self.dtype)(pooled_output)  # [batch, projection_dim]
    return CLIPVisionOutput(last_hidden_state=hidden, pooled_output=pooled_output, hidden_states=all_hidden,
                            image_embeds=image_embeds)


def abstract_params(model: CLIPTextTransformer | CLIPVisionTransformer) -> Any:
  """The params tree as ShapeDtypeStructs, still boxed with logical axis names; allocates nothing."""
  if isinstance(model, CLIPTextTransformer):
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)  # the tables are full-size whatever the length
  elif isinstance(model, CLIPVisionTransformer):
    cfg = model.config
    dummy = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  else:
    raise TypeError(f'not a CLIP transformer: {type(model).__name__}')
  return abstract_init(model, dummy)['params']


# ----------------------------------------------------------------------------- preprocessing
def clip_preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """CLIP's image preprocessing as a pure, jittable function.

  Resizes the shortest side to `image_size` (bicubic, antialiased when shrinking; the longer side
  becomes floor(image_size * long / short) as in transformers), center-crops `image_size` square and
  normalizes with CLIP's mean/std.

  Differences from transformers' `CLIPImageProcessor` (PIL): PIL resizes 8-bit images and rounds the
  result to 8 bits, here everything stays float32 (we only clip the bicubic overshoot to [0, 1] as
  the 8-bit conversion does). Both use the Keys a=-0.5 cubic kernel widened by the shrink factor, so
  on 8-bit-representable inputs the outputs agree to within about one 8-bit level (~0.015 after
  normalization; see tests/test_clip.py).

  Args:
    images: [batch, height, width, 3] RGB in [0, 1].
    image_size: side of the square output (the vision config's `image_size`).
  Returns:
    [batch, image_size, image_size, 3] float32, ready for `CLIPVisionTransformer`.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise InputError(f'clip_preprocess: images must be [batch, height, width, 3] RGB, got shape {images.shape}.')
  batch, height, width, channels = images.shape
  short, long = min(height, width), max(height, width)
  new_long = int(image_size * long / short)
  new_height, new_width = (image_size, new_long) if height <= width else (new_long, image_size)
  images = images.astype(jnp.float32)
  if (new_height, new_width) != (height, width):
    images = jax.image.resize(images, (batch, new_height, new_width, channels), method='bicubic',
                              antialias=True)
    images = jnp.clip(images, 0.0, 1.0)
  top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
  images = images[:, top:top + image_size, left:left + image_size]
  return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
