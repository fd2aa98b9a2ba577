"""The E4T model: frozen Stable Diffusion + CLIP image encoder, and the trainable domain encoder and
weight offsets, as one params pytree with a clean trainable / frozen split.

    params = {'unet', 'vae', 'text_encoder', 'image_encoder',   # frozen (pretrained)
              'encoder', 'weight_offsets'}                       # trainable
Parts of the image encoder can be made trainable by name patterns (`E4TConfig.trainable_patterns`);
`split_params` returns the two subtrees, so gradients and optimizer state exist only for the
trainable one. The CLIP towers scan their layers (stacked params, `models.clip`) unless the patterns
train some layers of the image encoder and not others; `image_encoder_scans` decides.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from e4t_jax.convert.pipeline import StableDiffusion, init_stable_diffusion
from e4t_jax.diffusion.schedule import NoiseSchedule
from e4t_jax.e4t.encoder import E4TEncoder, EncoderConfig
from e4t_jax.e4t.offsets import OffsetsConfig, init_offsets
from e4t_jax.errors import ConfigError
from e4t_jax.models import clip as clip_lib
from e4t_jax.models import unet as unet_lib
from e4t_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from e4t_jax.models.layers import abstract_init, host_init, memoized_shapes
from e4t_jax.models.unet import UNet, UNetConfig, UNetFeatures
from e4t_jax.models.vae import AutoencoderKL, VAEConfig
from e4t_jax.models.clip import CLIPTextConfig, CLIPTextTransformer
from e4t_jax.models.tokenizer import CLIPTokenizer

FROZEN = ('unet', 'vae', 'text_encoder', 'image_encoder')
TRAINABLE = ('encoder', 'weight_offsets')


@dataclasses.dataclass(frozen=True)
class E4TConfig:
  """The method's settings (paper / reference defaults)."""
  coarse_word: str = 'face'
  placeholder: str = '*'
  embedding_scale: float = 0.1        # s in w* = w_coarse + s * f
  lambda_embedding: float = 0.01      # λ_emb on ‖f‖² (the offset, not w*)
  lambda_offsets: float = 1e-4        # λ_w on Σ‖ΔW‖²
  # Prompt of the first, frozen U-Net pass whose contracting-path features the encoder reads.
  coarse_prompt: str = 'a photo of a {coarse}'
  encoder: EncoderConfig = EncoderConfig()
  offsets: OffsetsConfig = OffsetsConfig()
  # Regexes over 'image_encoder/...' param paths that are trained too (e.g. r'encoder/layers_3[01]/').
  trainable_patterns: Sequence[str] = ()
  use_loss_mask: bool = False
  # Min-SNR-γ weighting of the diffusion loss (`schedule.min_snr_weight`); 0: the paper's plain MSE.
  min_snr_gamma: float = 0.0
  # Personalization's default prompt ('{}' = the placeholder), in the domain's caption style.
  tuning_prompt: str = 'a photo of {}'

  def __post_init__(self):
    object.__setattr__(self, 'trainable_patterns', tuple(self.trainable_patterns))
    if not self.coarse_word.strip():
      raise ConfigError('e4t.coarse_word must name the domain, e.g. "face", "cat" or "painting".')
    if self.embedding_scale <= 0:
      raise ConfigError(f'e4t.embedding_scale must be > 0, got {self.embedding_scale}.')
    if self.lambda_embedding < 0 or self.lambda_offsets < 0:
      raise ConfigError('e4t regularization weights must be >= 0.')
    if self.min_snr_gamma < 0:
      raise ConfigError(f'e4t.min_snr_gamma must be >= 0 (0: the plain loss), got {self.min_snr_gamma}.')


@dataclasses.dataclass(frozen=True)
class E4TModules:
  """Everything static about an E4T model: the modules, the tokenizer and the token ids (hashable
  by identity, so it can be closed over by jitted functions)."""
  config: E4TConfig
  unet: UNet
  vae: AutoencoderKL
  text_encoder: CLIPTextTransformer
  image_encoder: CLIPVisionTransformer
  encoder: E4TEncoder
  tokenizer: CLIPTokenizer          # with the placeholder added
  schedule: NoiseSchedule
  placeholder_id: int
  coarse_token_id: int
  coarse_prompt_ids: np.ndarray      # [1, tokens] int32
  base_tokenizer: CLIPTokenizer | None = dataclasses.field(default=None, hash=False, compare=False)  # no placeholder
  # The base model's diffusers scheduler_config.json (samplers read their settings from it).
  scheduler_config: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
  # SDXL: the second text encoder (with its projection) and its tokenizer (no placeholder); w* spans both encoders.
  text_encoder_2: CLIPTextTransformer | None = None
  base_tokenizer_2: CLIPTokenizer | None = dataclasses.field(default=None, hash=False, compare=False)

  @property
  def pad_id_2(self) -> int:
    """The second tokenizer's pad id (SDXL's folder: '!', id 0)."""
    return self.base_tokenizer_2.pad_id

  @property
  def image_size(self) -> int:
    return self.unet.config.sample_size * self.vae.config.downsample_factor

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return np.asarray(self.tokenizer(list(prompts)), np.int32)


@dataclasses.dataclass(frozen=True)
class E4TModel:
  modules: E4TModules
  params: dict

  @property
  def config(self) -> E4TConfig:
    return self.modules.config

  def base_pipeline(self) -> StableDiffusion:
    """The frozen text-to-image model this E4T model sits on (tokenizers without the placeholder)."""
    m = self.modules
    names = ('unet', 'vae', 'text_encoder') + (('text_encoder_2',) if m.text_encoder_2 is not None else ())
    return StableDiffusion(m.unet, m.vae, m.text_encoder, m.base_tokenizer or CLIPTokenizer.default(),
                           dict(m.scheduler_config), {k: self.params[k] for k in names},
                           text_encoder_2=m.text_encoder_2, tokenizer_2=m.base_tokenizer_2)


def coarse_token_id(tokenizer: CLIPTokenizer, coarse_word: str) -> int:
  ids = tokenizer.encode(coarse_word)
  if len(ids) != 1:
    raise ConfigError(f'coarse word {coarse_word!r} is {len(ids)} tokens for the CLIP tokenizer; '
                      'E4T needs a single-token word (e.g. "face", "cat", "painting").')
  return ids[0]


def build_modules(config: E4TConfig, sd: StableDiffusion, image_encoder: CLIPVisionTransformer,
                  dtype: Any = jnp.float32) -> E4TModules:
  tokenizer, placeholder_id = sd.tokenizer.with_placeholder(config.placeholder)
  if sd.is_xl and sd.tokenizer_2.with_placeholder(config.placeholder)[1] != placeholder_id:
    raise ConfigError('the two SDXL tokenizers give the placeholder different ids (their vocabularies differ in '
                      'size); E4T needs one id in both.')
  coarse_id = coarse_token_id(tokenizer, config.coarse_word)
  coarse_prompt = config.coarse_prompt.format(coarse=config.coarse_word)
  width = sd.text_encoder.config.hidden_size + (sd.text_encoder_2.config.hidden_size if sd.is_xl else 0)
  encoder = E4TEncoder(config.encoder, out_dim=width, dtype=dtype)
  return E4TModules(
      config=config, unet=sd.unet, vae=sd.vae, text_encoder=sd.text_encoder, image_encoder=image_encoder,
      encoder=encoder, tokenizer=tokenizer, schedule=NoiseSchedule.from_config(sd.scheduler_config),
      scheduler_config=dict(sd.scheduler_config), base_tokenizer=sd.tokenizer,
      placeholder_id=placeholder_id, coarse_token_id=coarse_id,
      coarse_prompt_ids=np.asarray(tokenizer([coarse_prompt]), np.int32),
      text_encoder_2=sd.text_encoder_2, base_tokenizer_2=sd.tokenizer_2)


def encoder_init_inputs(modules: E4TModules, batch: int = 1) -> tuple[tuple[jax.Array, ...], UNetFeatures]:
  """Example inputs of the E4T encoder (zeros shaped as CLIP's hidden states and the U-Net's features);
  the shapes are traced once per image encoder, U-Net and batch (`memoized_shapes`)."""
  image_encoder, unet = modules.image_encoder, modules.unet

  def shapes():
    vision = image_encoder.config
    pixels = jnp.zeros((batch, vision.image_size, vision.image_size, 3))
    clip_out = jax.eval_shape(lambda: image_encoder.apply(image_encoder.init(jax.random.key(0), pixels), pixels))
    unet_cfg = unet.config
    latents = jnp.zeros((batch, unet_cfg.sample_size, unet_cfg.sample_size, unet_cfg.in_channels))
    t, context = jnp.zeros((batch,)), jnp.zeros((batch, 1, unet_cfg.cross_attention_dims()[0]))
    added = unet_lib.init_added_cond(unet_cfg, batch)
    features = jax.eval_shape(lambda: unet.apply(unet_lib.init_variables(unet, jax.random.key(0), batch),
                                                 latents, t, context, added_cond_kwargs=added, features_only=True))
    return clip_out.hidden_states, features

  clip_states, features = memoized_shapes(('encoder inputs', image_encoder, unet, batch), shapes)
  as_zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  return as_zeros(clip_states), as_zeros(features)


def init_trainable(key: jax.Array, modules: E4TModules, unet_params: Any, boxed: bool = False) -> dict:
  """Fresh encoder params (zero output layer) and zero-effect weight offsets."""
  k_enc, k_off = jax.random.split(key)
  clip_states, features = encoder_init_inputs(modules)
  encoder_params = modules.encoder.init(k_enc, clip_states, features)['params']
  if not boxed:
    encoder_params = nn.meta.unbox(encoder_params)
  return {'encoder': encoder_params,
          'weight_offsets': init_offsets(k_off, unet_params, modules.config.offsets)}


def init_e4t(key: jax.Array, config: E4TConfig, sd: StableDiffusion, image_encoder: CLIPVisionTransformer,
             image_encoder_params: Any) -> E4TModel:
  """An E4T model on top of a (converted or random) Stable Diffusion and CLIP image encoder (either layer
  layout: it is changed where `config.trainable_patterns` need it, see `image_encoder_scans`)."""
  image_encoder, image_encoder_params = fit_image_encoder_layout(config, image_encoder, image_encoder_params)
  modules = build_modules(config, sd, image_encoder)
  params = dict(sd.params)
  params['image_encoder'] = image_encoder_params
  unet_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sd.params['unet'])
  params.update(jax.jit(lambda k: init_trainable(k, modules, unet_shapes))(key))
  return E4TModel(modules, params)


def init_tiny(key: jax.Array, config: E4TConfig = E4TConfig(), *, unet: UNetConfig | None = None,
              vae: VAEConfig | None = None, text: CLIPTextConfig | None = None,
              vision: CLIPVisionConfig | None = None, text_2: CLIPTextConfig | None = None) -> E4TModel:
  """A randomly initialized tiny E4T model (tests, CPU experiments); `text_2`: SDXL-shaped (the U-Net
  then needs 'text_time' conditioning)."""
  k_sd, k_vision, k_e4t = jax.random.split(key, 3)
  sd = init_stable_diffusion(k_sd, unet or UNetConfig.tiny(), vae or VAEConfig.tiny(), text or CLIPTextConfig.tiny(),
                             text_config_2=text_2)
  vision = vision or CLIPVisionConfig.tiny()
  per_layer = CLIPVisionTransformer(vision, with_projection=False, scan_layers=False)
  pixels = jnp.zeros((1, vision.image_size, vision.image_size, 3))
  # Drawn per layer (init_e4t stacks them where the layers scan): the values do not depend on the layout.
  vision_params = host_init(abstract_init(per_layer, pixels)['params'],
                            seed=int(jax.random.randint(k_vision, (), 0, 2**31 - 1)))
  return init_e4t(k_e4t, config, sd, per_layer, vision_params)


# ----------------------------------------------------------------------------- trainable / frozen split
def is_trainable_path(path: tuple[str, ...], patterns: Sequence[str] = ()) -> bool:
  if path[0] in TRAINABLE:
    return True
  if path[0] == 'image_encoder' and patterns:
    joined = '/'.join(path)
    return any(re.search(p, joined) for p in patterns)
  return False


def _layer_picks(path: tuple[str, ...], leaf: Any, patterns: Sequence[str]
                 ) -> tuple[list[tuple[str, ...]], list[bool]] | None:
  """For a stacked leaf of a scanned image encoder: its per-layer paths (the names patterns are matched
  against) and whether the patterns pick each; None for any other leaf."""
  if path[0] != 'image_encoder' or not patterns:
    return None
  expanded = clip_lib.per_layer_paths(path[1:], np.shape(leaf)[0])
  if expanded is None:
    return None
  expanded = [('image_encoder',) + p for p in expanded]
  return expanded, [is_trainable_path(p, patterns) for p in expanded]


def _trainable_leaf(path: tuple[str, ...], leaf: Any, patterns: Sequence[str]) -> bool:
  """Like `is_trainable_path`, for stacked leaves too: trainable when the patterns pick the leaf in every
  layer; picking it in some layers only needs the per-layer layout (ConfigError)."""
  layers = _layer_picks(path, leaf, patterns)
  if layers is None:
    return is_trainable_path(path, patterns)
  expanded, picked = layers
  if any(picked) and not all(picked):
    raise ConfigError(f'e4t.trainable_patterns {list(patterns)} train {"/".join(expanded[picked.index(True)])} but '
                      'not the same parameter of every layer, and this image encoder stacks its layers '
                      '(scan_layers=True); build it with scan_layers=False (`image_encoder_scans` decides it '
                      'from the config when the model is built or loaded).')
  return all(picked)


def image_encoder_scans(config: E4TConfig, vision: CLIPVisionConfig) -> bool:
  """Whether the image encoder can scan its layers (stacked params): yes unless `trainable_patterns`
  train a parameter in some layers but not in all of them (e.g. r'encoder/layers_3[01]/')."""
  if not config.trainable_patterns:
    return True
  abstract = nn.meta.unbox(clip_lib.abstract_params(CLIPVisionTransformer(vision, with_projection=False)))
  for path, leaf in traverse_util.flatten_dict({'image_encoder': abstract}).items():
    layers = _layer_picks(path, leaf, config.trainable_patterns)
    if layers is not None and any(layers[1]) and not all(layers[1]):
      return False
  return True


def fit_image_encoder_layout(config: E4TConfig, image_encoder: CLIPVisionTransformer,
                             params: Any) -> tuple[CLIPVisionTransformer, Any]:
  """The image encoder and its params in the layer layout `config` needs (`image_encoder_scans`)."""
  scan = image_encoder_scans(config, image_encoder.config)
  if scan == image_encoder.scan_layers:
    return image_encoder, params
  return image_encoder.clone(scan_layers=scan), clip_lib.to_layout(params, scan)


def unrolled_clip(model: E4TModel) -> E4TModel:
  """The same model with both CLIP towers unrolled (per-layer params; values unchanged, ShapeDtypeStructs
  too). For FLOP counts: XLA's cost analysis counts a loop body once whatever its trip count, so a program
  with scanned CLIP layers reports one layer's FLOPs per tower; benchmarks count on this twin instead."""
  m = model.modules
  if not (m.text_encoder.scan_layers or m.image_encoder.scan_layers):
    return model
  towers = ('text_encoder', 'image_encoder') + (('text_encoder_2',) if m.text_encoder_2 is not None else ())
  modules = dataclasses.replace(m, **{name: getattr(m, name).clone(scan_layers=False) for name in towers})
  params = dict(model.params, **{name: clip_lib.unstack_layers(model.params[name]) for name in towers})
  return E4TModel(modules, params)


def split_params(params: dict, patterns: Sequence[str] = ()) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts holding disjoint leaves of `params`."""
  flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)  # e.g. no weight offsets: {} stays
  picked = {p: _trainable_leaf(p, v, patterns) for p, v in flat.items()}
  trainable = {p: v for p, v in flat.items() if picked[p]}
  frozen = {p: v for p, v in flat.items() if not picked[p]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
  flat = traverse_util.flatten_dict(frozen, keep_empty_nodes=True)
  flat.update(traverse_util.flatten_dict(trainable, keep_empty_nodes=True))
  return traverse_util.unflatten_dict(flat)


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def abstract_model(config: E4TConfig, unet: UNetConfig, vae: VAEConfig, text: CLIPTextConfig,
                   vision: CLIPVisionConfig, dtype: Any = jnp.float32, *, scan_layers: bool = True,
                   text_2: CLIPTextConfig | None = None) -> E4TModel:
  """An E4T model whose params are `jax.ShapeDtypeStruct`s: for parameter counts, AOT lowering and
  memory/FLOP analysis of full-size configs (e.g. `presets.sd15()` + `presets.clip_vit_h14()`) on a
  CPU, without any weights. `scan_layers=False` unrolls the CLIP towers (compile-time comparisons);
  `text_2`: SDXL's second text encoder (`presets.sdxl()`)."""
  from e4t_jax.convert.pipeline import SD1_SCHEDULER_CONFIG
  unet_module, vae_module = UNet(unet, dtype=dtype), AutoencoderKL(vae, dtype=dtype)
  text_module = CLIPTextTransformer(text, dtype=dtype, scan_layers=scan_layers)
  vision_module = CLIPVisionTransformer(vision, with_projection=False, dtype=dtype,
                                        scan_layers=scan_layers and image_encoder_scans(config, vision))
  key = jax.random.key(0)
  side = vae.downsample_factor
  shapes = lambda module, *inputs: nn.meta.unbox(abstract_init(module, *inputs)['params'])
  params = {
      'unet': nn.meta.unbox(unet_lib.abstract_params(unet_module)),
      'vae': shapes(vae_module, jnp.zeros((1, side, side, vae.in_channels))),
      'text_encoder': shapes(text_module, jnp.zeros((1, 1), jnp.int32)),
      'image_encoder': shapes(vision_module, jnp.zeros((1, vision.image_size, vision.image_size, 3))),
  }
  text_module_2 = tokenizer_2 = None
  if text_2 is not None:
    text_module_2 = CLIPTextTransformer(text_2, dtype=dtype, scan_layers=scan_layers, with_projection=True)
    params['text_encoder_2'] = shapes(text_module_2, jnp.zeros((1, 1), jnp.int32))
    tokenizer_2 = CLIPTokenizer.default().with_pad_token('!')
  sd = StableDiffusion(unet_module, vae_module, text_module, CLIPTokenizer.default(), dict(SD1_SCHEDULER_CONFIG),
                       params, text_encoder_2=text_module_2, tokenizer_2=tokenizer_2)
  modules = build_modules(config, sd, vision_module, dtype=dtype)
  params.update(jax.eval_shape(lambda k: init_trainable(k, modules, params['unet']), key))
  return E4TModel(modules, params)
