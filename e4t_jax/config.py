"""Run configs: ml_collections `get_config()` files, command-line overrides, and typed builders.

    config = load_config('configs/faces.py', ['--config.optimizer.learning_rate=1e-5'])
    e4t = e4t_config(config); optimizer = optimizer_config(config); mesh = make_mesh_from_config(config)

A config file is a Python module with `get_config() -> ConfigDict`. It is looked up as a path, then
by name in the repository's `configs/` folder ('tiny' -> configs/tiny.py). The returned config is
locked: overrides may change existing fields (type-checked against the current value) but never
add new ones, so a typo fails loudly instead of being ignored.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.model import E4TConfig
from e4t_jax.e4t.offsets import OffsetsConfig
from e4t_jax.errors import ConfigError
from e4t_jax.train.step import OptimizerConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / 'configs'
DTYPES = ('float32', 'bfloat16')
FROZEN_SHARDINGS = ('replicated', 'fsdp')


# ----------------------------------------------------------------------------- loading
def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
  """'configs/faces.py', '/abs/my.py' or a bare name ('faces') -> the config file."""
  path = Path(name_or_path)
  if path.is_file():
    return path.resolve()
  by_name = CONFIGS_DIR / f'{path.name.removesuffix(".py")}.py'
  if path.parent == Path('.') or path.parent.name == 'configs':
    if by_name.is_file():
      return by_name
  known = sorted(p.stem for p in CONFIGS_DIR.glob('*.py') if not p.stem.startswith('_'))
  raise ConfigError(f'config {str(name_or_path)!r} not found; pass a .py file with get_config() or one of {known}.')


def _import_config_module(path: Path):
  # Config files import their siblings (`from configs import base`): put their parent on sys.path.
  root = str(path.parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f'_e4t_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ConfigError(f'{path}: cannot be imported ({type(e).__name__}: {e}).') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'{path}: defines no get_config() function.')
  return module


def load_config(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file, applies `--config.a.b=value` overrides, validates, and locks it."""
  path = resolve_config_path(name_or_path)
  config = _import_config_module(path).get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}.')
  config.lock()
  apply_overrides(config, overrides)
  validate(config)
  return config


# ----------------------------------------------------------------------------- overrides
def _parse_value(text: str, current: Any, key: str) -> Any:
  """Parses an override's text as the type of the field's current value."""
  def fail(expected: str):
    raise ConfigError(f'--config.{key}={text!r}: expected {expected} (the field is {current!r}).')

  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ('true', '1', 'yes'):
      return True
    if lowered in ('false', '0', 'no'):
      return False
    fail('true or false')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      try:  # 3e4 -> 30000, but 1.5 is refused
        as_float = float(text)
      except ValueError:
        fail('an integer')
      if not as_float.is_integer():
        fail('an integer')
      return int(as_float)
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      fail('a number')
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(part.strip() for part in text.split(',') if part.strip())  # a,b,c
    if not isinstance(value, (tuple, list)):
      value = (value,)
    if current and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in current):
      if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        fail('a list of numbers')
    return type(current)(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  fail(type(current).__name__)


def set_field(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets config.<key> (a dotted path to an existing field) from an override's text."""
  parts = key.split('.')
  node = config
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      prefix = '.'.join(parts[:depth])
      choices = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      where = f'config.{prefix}' if prefix else 'config'
      raise ConfigError(f'unknown config key --config.{key}: {where} has no field {part!r} '
                        f'(fields: {", ".join(choices)}).')
    if depth < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f'--config.{key} is a group of fields ({", ".join(sorted(current.keys()))}); set one of them.')
  value = _parse_value(text, current, key)
  try:
    with node.ignore_type():
      node[parts[-1]] = value
  except (TypeError, ValueError, AttributeError) as e:
    raise ConfigError(f'--config.{key}={text!r}: {e}.') from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ['--config.a.b=1', 'config.c=x', ...] in order."""
  for override in overrides:
    text = override.removeprefix('--')
    if not text.startswith('config.') or '=' not in text:
      raise ConfigError(f'override {override!r} must look like --config.optimizer.learning_rate=1e-5.')
    key, value = text[len('config.'):].split('=', 1)
    set_field(config, key.strip(), value)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks cross-field rules the dataclass builders do not see."""
  if config.model.dtype not in DTYPES:
    raise ConfigError(f'model.dtype {config.model.dtype!r} is not one of {DTYPES}.')
  from e4t_jax.models.unet import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  if config.model.get('remat_policy', '') not in ('', *REMAT_POLICIES):
    raise ConfigError(f'model.remat_policy {config.model.remat_policy!r} is not one of {["", *REMAT_POLICIES]}.')
  if config.mesh.frozen_sharding not in FROZEN_SHARDINGS:
    raise ConfigError(f'mesh.frozen_sharding {config.mesh.frozen_sharding!r} is not one of {FROZEN_SHARDINGS}.')
  if not config.e4t.templates or any('{}' not in t for t in config.e4t.templates):
    raise ConfigError('e4t.templates must be a non-empty list of prompts, each with "{}" for the placeholder.')
  for name in ('num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if config.train[name] < 1:
      raise ConfigError(f'train.{name} must be >= 1, got {config.train[name]}.')
  if config.model.base != 'tiny' and not config.model.image_encoder:
    raise ConfigError('model.image_encoder must name a CLIP vision folder when model.base is not "tiny".')
  e4t_config(config)
  optimizer_config(config)


def to_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (stored with every checkpoint)."""
  return json.loads(config.to_json())


# ----------------------------------------------------------------------------- builders
def e4t_config(config: ml_collections.ConfigDict) -> E4TConfig:
  e4t = config.e4t
  return E4TConfig(
      coarse_word=e4t.coarse_word, placeholder=e4t.placeholder, embedding_scale=e4t.embedding_scale,
      lambda_embedding=e4t.lambda_embedding, lambda_offsets=e4t.lambda_offsets, coarse_prompt=e4t.coarse_prompt,
      encoder=EncoderConfig(**config.encoder.to_dict()),
      offsets=OffsetsConfig(**dict(config.offsets.to_dict(), targets=tuple(config.offsets.targets))),
      trainable_patterns=tuple(e4t.trainable_patterns), use_loss_mask=e4t.use_loss_mask)


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
  values = config.optimizer.to_dict()
  values.pop('global_batch_size')
  if values['decay'] == 'cosine' and not values['total_steps']:
    values['total_steps'] = config.train.num_steps
  return OptimizerConfig(**values)


def logical_axis_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  rules = []
  for rule in config.mesh.logical_axis_rules:
    if len(rule) != 2:
      raise ConfigError(f'mesh.logical_axis_rules entry {rule!r} must be (logical_name, mesh_axis_or_None).')
    name, axis = rule
    rules.append((name, tuple(axis) if isinstance(axis, (list, tuple)) else axis))
  return tuple(rules)


def mesh_shape(config: ml_collections.ConfigDict) -> dict[str, int]:
  return {'data': config.mesh.data, 'fsdp': config.mesh.fsdp, 'tensor': config.mesh.tensor}


def make_mesh_from_config(config: ml_collections.ConfigDict, devices=None):
  """The (data, fsdp, tensor) mesh over all devices, or the first `mesh.num_devices` (single process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from e4t_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  if devices is None and config.mesh.num_devices:
    if jax.process_count() > 1:
      raise ConfigError('mesh.num_devices works in single-process runs only; leave it 0.')
    if not 0 < config.mesh.num_devices <= jax.device_count():
      raise ConfigError(f'mesh.num_devices={config.mesh.num_devices}, but {jax.device_count()} devices exist.')
    devices = jax.devices()[:config.mesh.num_devices]
  return make_mesh(mesh_shape(config), devices)
