"""An E4T domain model on disk: a folder readable without torch and without pickles.

    model_dir/e4t.json                     E4TConfig + format version
    model_dir/base/                        the Stable Diffusion folder (diffusers layout)
    model_dir/image_encoder/               the CLIP vision tower (transformers layout)
    model_dir/trainable.safetensors        domain encoder + weight offsets ('encoder/...', 'weight_offsets/...')

Every file is written atomically; loading checks the format and names the file that is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from e4t_jax.convert.clip import load_image_encoder, save_image_encoder
from e4t_jax.fileio import atomic_write_bytes, read_safetensors, write_safetensors
from e4t_jax.convert.pipeline import StableDiffusion, load_stable_diffusion, save_stable_diffusion
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.offsets import OffsetsConfig, flatten_offsets, unflatten_offsets
from e4t_jax.errors import CheckpointError, ConfigError
from e4t_jax.models.tokenizer import CLIPTokenizer

MODEL_FORMAT = 'e4t-model/1'


def config_to_dict(config: model_lib.E4TConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(values: dict[str, Any]) -> model_lib.E4TConfig:
  values = dict(values)
  try:
    values['encoder'] = EncoderConfig(**values.get('encoder', {}))
    offsets = dict(values.get('offsets', {}))
    if 'targets' in offsets:
      offsets['targets'] = tuple(offsets['targets'])
    values['offsets'] = OffsetsConfig(**offsets)
    return model_lib.E4TConfig(**values)
  except TypeError as e:
    raise ConfigError(f'E4T config: {e}.') from e


def save_model(model: model_lib.E4TModel, model_dir: str | os.PathLike) -> Path:
  """Writes an E4T model folder (see module docstring)."""
  model_dir = Path(model_dir)
  m = model.modules
  base_tokenizer = m.base_tokenizer or CLIPTokenizer.default()
  sd = StableDiffusion(m.unet, m.vae, m.text_encoder, base_tokenizer, dict(m.scheduler_config),
                       {k: model.params[k] for k in ('unet', 'vae', 'text_encoder')})
  save_stable_diffusion(model_dir / 'base', sd)
  save_image_encoder(model_dir / 'image_encoder', m.image_encoder.config, model.params['image_encoder'])
  flat = traverse_util.flatten_dict({'encoder': model.params['encoder']}, sep='/')
  flat.update(flatten_offsets(model.params['weight_offsets']))
  write_safetensors(model_dir / 'trainable.safetensors', {k: np.asarray(jax.device_get(v), np.float32)
                                                          for k, v in flat.items()})
  manifest = {'format': MODEL_FORMAT, 'config': config_to_dict(m.config)}
  atomic_write_bytes(model_dir / 'e4t.json', [json.dumps(manifest, indent=2).encode()])
  return model_dir


def load_model(model_dir: str | os.PathLike) -> model_lib.E4TModel:
  """Reads an E4T model folder written by `save_model` (strict: shapes are checked)."""
  model_dir = Path(model_dir)
  manifest_path = model_dir / 'e4t.json'
  if not manifest_path.is_file():
    raise CheckpointError(f'{model_dir}: not an e4t model folder (no e4t.json). Pass a folder written by '
                          '`e4t pretrain` / `save_model`, or omit --model to use the embedded demo model.')
  try:
    manifest = json.loads(manifest_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{manifest_path}: invalid JSON ({e}).') from e
  if manifest.get('format') != MODEL_FORMAT:
    raise CheckpointError(f'{manifest_path}: format {manifest.get("format")!r}; this e4t-jax reads {MODEL_FORMAT}.')
  config = config_from_dict(manifest['config'])
  sd = load_stable_diffusion(model_dir / 'base')
  vision, vision_params = load_image_encoder(model_dir / 'image_encoder')
  modules = model_lib.build_modules(config, sd, vision)
  params = dict(sd.params, image_encoder=vision_params)
  unet_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.float32), sd.params['unet'])
  expected = jax.eval_shape(lambda k: model_lib.init_trainable(k, modules, unet_shapes), jax.random.key(0))
  stored = read_safetensors(model_dir / 'trainable.safetensors')
  flat_expected = traverse_util.flatten_dict({'encoder': expected['encoder']}, sep='/')
  flat_expected.update(flatten_offsets(expected['weight_offsets']))
  missing = sorted(set(flat_expected) - set(stored))
  unexpected = sorted(set(stored) - set(flat_expected))
  bad_shapes = [k for k in flat_expected if k in stored and tuple(stored[k].shape) != tuple(flat_expected[k].shape)]
  if missing or unexpected or bad_shapes:
    raise CheckpointError(f'{model_dir / "trainable.safetensors"}: does not match e4t.json (missing {missing[:3]}, '
                          f'unexpected {unexpected[:3]}, mis-shaped {bad_shapes[:3]}).')
  encoder = traverse_util.unflatten_dict({k: np.array(v) for k, v in stored.items() if k.startswith('encoder/')},
                                         sep='/')['encoder']
  params.update(encoder=jax.device_put(encoder), weight_offsets=jax.device_put(unflatten_offsets(stored)))
  return model_lib.E4TModel(modules, params)
