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
from e4t_jax.fileio import atomic_write_bytes, read_json, read_safetensors, write_safetensors
from e4t_jax.convert.pipeline import load_stable_diffusion, save_stable_diffusion
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.offsets import flatten_offsets, unflatten_offsets
from e4t_jax.errors import CheckpointError, ConfigError, printable

MODEL_FORMAT = 'e4t-model/1'


def config_to_dict(config: model_lib.E4TConfig) -> dict[str, Any]:
  return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(values: dict[str, Any], where: str = 'E4T config') -> model_lib.E4TConfig:
  """E4TConfig from its JSON form, every field's type checked; any problem is one ConfigError naming `where`."""
  try:
    return _typed(model_lib.E4TConfig, values, '')
  except (ConfigError, TypeError, ValueError) as e:
    raise ConfigError(f'{where}: {str(e).rstrip(".")}.') from None


def _typed(cls, values: Any, prefix: str):
  """`cls(**values)` for a config dataclass whose fields' types are those of their defaults (nested
  dataclasses from objects, tuples from lists); a wrong type or an unknown key raises ValueError."""
  if not isinstance(values, dict):
    raise ValueError(f'{prefix.rstrip(".") or "config"} is {type(values).__name__}, expected an object')
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f'unknown field {prefix}{unknown[0]}')
  kwargs = {}
  for name, value in values.items():
    field = fields[name]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    where = f'{prefix}{name}'
    if dataclasses.is_dataclass(default):
      kwargs[name] = _typed(type(default), value, f'{where}.')
      continue
    if isinstance(default, (tuple, list)):
      if not isinstance(value, (list, tuple)) or any(isinstance(v, (dict, list)) for v in value):
        raise ValueError(f'{where} is {json.dumps(value)[:40]}, expected a list')
      value = tuple(value)
    elif isinstance(default, bool):
      ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
          isinstance(default, float) or isinstance(value, int)) and bool(np.isfinite(value))
    else:
      ok = isinstance(value, type(default))
    if not isinstance(default, (tuple, list)) and not ok:
      raise ValueError(f'{where} is {json.dumps(value)[:40]}, expected {type(default).__name__}')
    kwargs[name] = value
  return cls(**kwargs)


def save_model(model: model_lib.E4TModel, model_dir: str | os.PathLike) -> Path:
  """Writes an E4T model folder (see module docstring)."""
  model_dir = Path(model_dir)
  m = model.modules
  save_stable_diffusion(model_dir / 'base', model.base_pipeline())
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
  manifest = read_json(manifest_path, what='an e4t model folder', required={'format': str, 'config': dict})
  if manifest['format'] != MODEL_FORMAT:
    raise CheckpointError(f'{manifest_path}: format {printable(manifest["format"])!r}; this e4t-jax reads '
                          f'{MODEL_FORMAT}.')
  config = config_from_dict(manifest['config'], where=f'{manifest_path}: config')
  sd = load_stable_diffusion(model_dir / 'base')
  vision, vision_params = model_lib.fit_image_encoder_layout(config, *load_image_encoder(model_dir / 'image_encoder'))
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
