"""A whole Stable Diffusion pipeline folder (diffusers layout) <-> our modules and params; torch-free.

    root/model_index.json
    root/unet/          config.json + diffusion_pytorch_model.safetensors
    root/vae/           config.json + diffusion_pytorch_model.safetensors
    root/text_encoder/  config.json + model.safetensors
    root/tokenizer/     vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)
    root/scheduler/     scheduler_config.json
    SDXL also: root/text_encoder_2/ (a CLIPTextModelWithProjection) and root/tokenizer_2/

SDXL (`StableDiffusion.is_xl`): the U-Net's context is both text encoders' penultimate states side by
side (768 + 1280 = 2048 wide for SDXL base), and its `text_time` embedding takes the second encoder's
projected pooled output (`e4t.prompts.encode_prompt_xl`, `models.unet.sdxl_time_ids`).

`save_stable_diffusion` writes a folder that both `load_stable_diffusion` and
`diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None, feature_extractor=None,
requires_safety_checker=False)` (SDXL: `StableDiffusionXLPipeline.from_pretrained(root)`) load. Loading is strict (see the per-model converters) and also checks
that the parts fit together: the text encoder's width is the U-Net's `cross_attention_dim`, the VAE's
latent channels are the U-Net's input/output channels, and every tokenizer id has an embedding row.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax.convert.clip import load_text_encoder, save_text_encoder
from e4t_jax.diffusion.schedule import NoiseSchedule
from e4t_jax.fileio import atomic_write_bytes, read_json
from e4t_jax.convert.unet import load_unet, save_unet
from e4t_jax.convert.vae import load_vae, save_vae
from e4t_jax.errors import ConfigError, ConversionError, InputError, printable
from e4t_jax.models import unet as unet_lib
from e4t_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, to_layout
from e4t_jax.models.layers import abstract_init, host_init
from e4t_jax.models.unet import UNet, UNetConfig
from e4t_jax.models.vae import AutoencoderKL, VAEConfig
from e4t_jax.models.tokenizer import CLIPTokenizer

# Stable Diffusion 1.x's training schedule (scaled-linear betas, 1000 steps, epsilon prediction).
MAX_TRAIN_TIMESTEPS = 100_000  # diffusers' schedulers use 1,000
SD1_SCHEDULER_CONFIG = {
    '_class_name': 'DDIMScheduler', 'num_train_timesteps': 1000, 'beta_start': 0.00085, 'beta_end': 0.012,
    'beta_schedule': 'scaled_linear', 'prediction_type': 'epsilon', 'clip_sample': False,
    'set_alpha_to_one': False, 'steps_offset': 1, 'timestep_spacing': 'leading',
}
COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer')  # the sub-folders a pipeline folder must have


# eq=False: identity semantics (comparing params dicts of arrays has no single truth value) and hashable.
@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
  """The frozen text-to-image model: modules (static) and their params (a pytree, by component)."""
  unet: UNet
  vae: AutoencoderKL
  text_encoder: CLIPTextTransformer
  tokenizer: CLIPTokenizer
  scheduler_config: dict
  params: dict  # {'unet': ..., 'vae': ..., 'text_encoder': ...[, 'text_encoder_2': ...]}, unboxed
  # SDXL's second text encoder (OpenCLIP bigG with its projection) and tokenizer (pads with '!')
  text_encoder_2: CLIPTextTransformer | None = None
  tokenizer_2: CLIPTokenizer | None = None

  @property
  def is_xl(self) -> bool:
    return self.text_encoder_2 is not None


def _incompatibilities(unet_config: UNetConfig, vae_config: VAEConfig, text_config: CLIPTextConfig,
                       tokenizer: CLIPTokenizer | None, text_config_2: CLIPTextConfig | None = None,
                       tokenizer_2: CLIPTokenizer | None = None) -> list[str]:
  """Why these parts cannot run as one pipeline (empty when they can); `text_config_2`: SDXL's second encoder."""
  problems = []
  context_width = unet_config.cross_attention_dims()[0]
  if text_config_2 is None:
    if text_config.hidden_size != context_width:
      problems.append(f'the text encoder width (hidden_size={text_config.hidden_size}) is not the U-Net '
                      f'cross_attention_dim ({context_width})')
    if unet_config.addition_embed_type is not None:
      problems.append(f'the U-Net has addition_embed_type={unet_config.addition_embed_type!r} (SDXL) but there is '
                      'no second text encoder (text_encoder_2/) for its pooled embedding')
  else:
    widths = text_config.hidden_size + text_config_2.hidden_size
    if widths != context_width:
      problems.append(f'the two text encoders\' widths ({text_config.hidden_size} + {text_config_2.hidden_size}) '
                      f'do not add up to the U-Net cross_attention_dim ({context_width})')
    if unet_config.text_embeds_dim != text_config_2.projection_dim:
      problems.append(f'the second text encoder\'s projection_dim ({text_config_2.projection_dim}) is not the '
                      f'pooled width the U-Net\'s add_embedding takes ({unet_config.text_embeds_dim}; it needs '
                      "addition_embed_type='text_time')")
    if tokenizer_2 is not None and tokenizer_2.vocab_size > text_config_2.vocab_size:
      problems.append(f'tokenizer_2 has {tokenizer_2.vocab_size} ids but text_encoder_2 only '
                      f'{text_config_2.vocab_size} embedding rows')
  if vae_config.latent_channels != unet_config.in_channels:
    problems.append(f'the VAE latent_channels ({vae_config.latent_channels}) is not the U-Net in_channels '
                    f'({unet_config.in_channels})')
  if unet_config.out_channels != unet_config.in_channels:
    problems.append(f'the U-Net out_channels ({unet_config.out_channels}) is not its in_channels '
                    f'({unet_config.in_channels}); a denoiser predicts the latents\' own shape')
  if tokenizer is not None and tokenizer.vocab_size > text_config.vocab_size:
    problems.append(f'the tokenizer has {tokenizer.vocab_size} ids but the text encoder only '
                    f'{text_config.vocab_size} embedding rows')
  return problems


def load_stable_diffusion(root: str | os.PathLike, dtype: Any = jnp.float32, *,
                          scan_layers: bool = True) -> StableDiffusion:
  """Loads a local diffusers Stable Diffusion folder strictly (no torch, no hub).

  Args:
    root: the pipeline folder (unet/, vae/, text_encoder/, tokenizer/, optionally scheduler/; SDXL also
      text_encoder_2/ and tokenizer_2/).
    dtype: compute dtype of the modules; parameters are float32 whatever is on disk.
    scan_layers: the text encoder scans its layers, params stacked (`models.clip`).
  Returns:
    The pipeline; a missing scheduler/ means Stable Diffusion 1.x's schedule (`SD1_SCHEDULER_CONFIG`).
  Raises:
    ConversionError: not a directory, a missing sub-folder, unreadable or mismatched weights, a broken
      tokenizer or scheduler file, or parts that do not fit together.
    ConfigError: a model config option this port does not implement.
  """
  root = Path(root)
  if not root.is_dir():
    raise ConversionError(f'{root}: no such directory; expected a diffusers Stable Diffusion folder '
                          f'({", ".join(name + "/" for name in COMPONENTS)}, scheduler/).')
  missing = [name for name in COMPONENTS if not (root / name).is_dir()]
  if missing:
    raise ConversionError(f'{root}: missing sub-folder(s) {", ".join(name + "/" for name in missing)}; '
                          'expected a diffusers Stable Diffusion folder.')
  xl = (root / 'text_encoder_2').is_dir()
  if xl and not (root / 'tokenizer_2').is_dir():
    raise ConversionError(f'{root}: has text_encoder_2/ but no tokenizer_2/; an SDXL folder needs both.')
  unet, unet_params = load_unet(root / 'unet', dtype=dtype)
  vae, vae_params = load_vae(root / 'vae', dtype=dtype)
  text_encoder, text_params = load_text_encoder(root / 'text_encoder', dtype=dtype, scan_layers=scan_layers)
  tokenizer = _read_tokenizer(root / 'tokenizer')
  params = {'unet': unet_params, 'vae': vae_params, 'text_encoder': text_params}
  text_encoder_2 = tokenizer_2 = None
  if xl:
    text_encoder_2, params['text_encoder_2'] = load_text_encoder(root / 'text_encoder_2', dtype=dtype,
                                                                 scan_layers=scan_layers, with_projection=True)
    tokenizer_2 = _read_tokenizer(root / 'tokenizer_2')
  problems = _incompatibilities(unet.config, vae.config, text_encoder.config, tokenizer,
                                text_encoder_2 and text_encoder_2.config, tokenizer_2)
  if problems:
    raise ConversionError(f'{root}: the components do not fit together: ' + '; '.join(problems) + '.')
  return StableDiffusion(unet, vae, text_encoder, tokenizer, _read_scheduler_config(root), params,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def _read_tokenizer(folder: Path) -> CLIPTokenizer:
  try:
    return CLIPTokenizer.from_dir(folder)
  except InputError as e:
    raise ConversionError(str(e)) from e


def _read_scheduler_config(root: Path) -> dict:
  path = root / 'scheduler' / 'scheduler_config.json'
  if not path.is_file():
    return dict(SD1_SCHEDULER_CONFIG)
  config = read_json(path, what='a diffusers scheduler', error=ConversionError)
  steps = config.get('num_train_timesteps', 1000)
  if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_TRAIN_TIMESTEPS:
    raise ConversionError(f'{path}: num_train_timesteps is {printable(json.dumps(steps))[:40]}, expected an '
                          f'integer in 1..{MAX_TRAIN_TIMESTEPS}.')
  try:  # the schedule is built here once, so a bad value fails now, naming the file
    schedule = NoiseSchedule.from_config(config)
    finite = bool(np.isfinite(np.asarray(schedule.alphas_cumprod)).all())
  except (ConfigError, TypeError, ValueError, KeyError) as e:
    raise ConversionError(f'{path}: invalid scheduler config ({printable(str(e))[:200]}).') from None
  if not finite:
    raise ConversionError(f'{path}: its betas give a non-finite noise schedule; fix beta_start/beta_end.')
  return config


def save_stable_diffusion(root: str | os.PathLike, sd: StableDiffusion) -> Path:
  """Writes the diffusers folder layout (each file atomically) that `load_stable_diffusion` and
  `diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None, feature_extractor=None,
  requires_safety_checker=False)` read.

  Params may be on host or (sharded) on devices; each component is checked against its config before
  anything of it is written. Returns `root`.
  """
  root = Path(root)
  if root.exists() and not root.is_dir():
    raise ConversionError(f'{root}: exists and is not a directory; cannot write a pipeline folder there.')
  save_unet(root / 'unet', sd.unet.config, sd.params['unet'])
  save_vae(root / 'vae', sd.vae.config, sd.params['vae'])
  save_text_encoder(root / 'text_encoder', sd.text_encoder.config, sd.params['text_encoder'])
  sd.tokenizer.save(root / 'tokenizer')
  if sd.is_xl:
    save_text_encoder(root / 'text_encoder_2', sd.text_encoder_2.config, sd.params['text_encoder_2'])
    sd.tokenizer_2.save(root / 'tokenizer_2')
  atomic_write_bytes(root / 'scheduler' / 'scheduler_config.json',
                     [json.dumps(sd.scheduler_config, indent=2, sort_keys=True).encode()])
  model_index = {
      '_class_name': 'StableDiffusionPipeline', 'feature_extractor': [None, None], 'image_encoder': [None, None],
      'requires_safety_checker': False, 'safety_checker': [None, None],
      'scheduler': ['diffusers', sd.scheduler_config.get('_class_name', 'DDIMScheduler')],
      'text_encoder': ['transformers', 'CLIPTextModel'], 'tokenizer': ['transformers', 'CLIPTokenizer'],
      'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
  }
  if sd.is_xl:
    for key in ('requires_safety_checker', 'safety_checker', 'image_encoder'):
      model_index.pop(key)
    model_index.update({'_class_name': 'StableDiffusionXLPipeline', 'force_zeros_for_empty_prompt': True,
                        'text_encoder_2': ['transformers', 'CLIPTextModelWithProjection'],
                        'tokenizer_2': ['transformers', 'CLIPTokenizer']})
  atomic_write_bytes(root / 'model_index.json', [json.dumps(model_index, indent=2).encode()])
  return root


def init_stable_diffusion(key: jax.Array, unet_config: UNetConfig, vae_config: VAEConfig,
                          text_config: CLIPTextConfig, tokenizer: CLIPTokenizer | None = None,
                          scheduler_config: dict | None = None, dtype: Any = jnp.float32, *,
                          scan_layers: bool = True, text_config_2: CLIPTextConfig | None = None,
                          tokenizer_2: CLIPTokenizer | None = None) -> StableDiffusion:
  """A randomly initialized pipeline (tests, the demo's starting point).

  Parameters are drawn on the host (`layers.host_init`, same initializers as the modules' own) from
  abstract shapes: a jitted `init` would compile one RNG program per parameter (~25 s on CPU).

  Args:
    key: PRNG key; split into one key per model.
    unet_config, vae_config, text_config: the three networks; they must fit together (text width =
      cross_attention_dim, VAE latent channels = U-Net channels).
    tokenizer: defaults to the packaged OpenAI CLIP tokenizer.
    scheduler_config: a diffusers scheduler_config.json dict; defaults to `SD1_SCHEDULER_CONFIG`.
    dtype: compute dtype of the modules; parameters are float32.
    scan_layers: the text encoder's layer layout (`models.clip`); the drawn values are the same either way.
    text_config_2, tokenizer_2: SDXL's second text encoder (built with its projection) and tokenizer
      (default: the packaged one padding with '!'); the U-Net then needs 'text_time' conditioning.
  Raises:
    ConfigError: the configs (or tokenizer) do not fit together.
  """
  tokenizer = tokenizer or CLIPTokenizer.default()
  if text_config_2 is not None:
    tokenizer_2 = tokenizer_2 or CLIPTokenizer.default().with_pad_token('!')
  problems = _incompatibilities(unet_config, vae_config, text_config, tokenizer, text_config_2, tokenizer_2)
  if problems:
    raise ConfigError('init_stable_diffusion: the configs do not fit together: ' + '; '.join(problems) + '.')
  unet = UNet(unet_config, dtype=dtype)
  vae = AutoencoderKL(vae_config, dtype=dtype)
  text_encoder = CLIPTextTransformer(text_config, dtype=dtype, scan_layers=scan_layers)
  k_unet, k_vae, k_text = jax.random.split(key, 3)
  k_text_2 = jax.random.fold_in(key, 2)  # SDXL's second encoder; the first three keys stay those of SD 1.x/2.x
  # The smallest inputs that create every parameter (parameter shapes do not depend on input sizes).
  side = vae_config.downsample_factor
  images = jnp.zeros((1, side, side, vae_config.in_channels), jnp.float32)
  ids = jnp.zeros((1, 1), jnp.int32)
  seed = lambda k: int(jax.random.randint(k, (), 0, 2**31 - 1))
  random_params = lambda module, k, *inputs: jax.device_put(
      host_init(abstract_init(module, *inputs)['params'], seed=seed(k)))
  params = {
      'unet': jax.device_put(host_init(unet_lib.abstract_params(unet), seed=seed(k_unet))),
      'vae': random_params(vae, k_vae, images),
      # Drawn per layer, then stacked: the values do not depend on the layout.
      'text_encoder': to_layout(random_params(text_encoder.clone(scan_layers=False), k_text, ids), scan_layers),
  }
  text_encoder_2 = None
  if text_config_2 is not None:
    text_encoder_2 = CLIPTextTransformer(text_config_2, dtype=dtype, scan_layers=scan_layers, with_projection=True)
    params['text_encoder_2'] = to_layout(random_params(text_encoder_2.clone(scan_layers=False), k_text_2, ids),
                                         scan_layers)
  return StableDiffusion(unet, vae, text_encoder, tokenizer, dict(scheduler_config or SD1_SCHEDULER_CONFIG),
                         params, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def parameter_counts(sd: StableDiffusion) -> dict[str, int]:
  """Number of parameters of each component ('unet', 'vae', 'text_encoder'[, 'text_encoder_2'])."""
  return {name: int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))) for name, tree in sd.params.items()}
