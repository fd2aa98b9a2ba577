"""Run configs: ml_collections `get_config()` files and command-line overrides, turned into one typed
`RunConfig` at the entry point of a run.

    run = load_run_config('faces', ['--config.optimizer.learning_rate=1e-5'])
    run.e4t, run.optimizer, run.data, run.train, run.mesh.make_mesh()

A config file is a Python module with `get_config() -> ConfigDict`. It is looked up as a path, then
by name in the package's `e4t_jax/configs/` ('tiny' and 'configs/tiny.py' -> e4t_jax/configs/tiny.py).
The ConfigDict is locked: overrides may change existing fields (type-checked against the current value)
but never add new ones, so a typo fails loudly instead of being ignored. `run_config` then checks every
field and the rules between them, once; the code below the entry point sees only typed objects.
"""
from __future__ import annotations

import ast
import math
import dataclasses
import importlib.util
import json
import os
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
DATA_SOURCES = ('synthetic', 'synthetic_faces', 'folder', 'array_record', 'tfds')


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
  # A config file starts from a packaged one with `from e4t_jax.configs import base`.
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
  """Loads a config file, locks it and applies `--config.a.b=value` overrides (each type-checked).

  The cross-field checks run when the typed `RunConfig` is built from it (`run_config`)."""
  path = resolve_config_path(name_or_path)
  config = _import_config_module(path).get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}.')
  config.lock()
  apply_overrides(config, overrides)
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
      value = float(text)
    except ValueError:
      fail('a number')
    if not math.isfinite(value):
      fail('a finite number')
    return value
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


def to_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (stored with every checkpoint)."""
  return json.loads(config.to_json())


# ----------------------------------------------------------------------------- the typed run config
@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where the domain model comes from and how it computes."""
  base: str = 'tiny'           # a diffusers Stable Diffusion folder, or 'tiny' (random, CPU)
  image_encoder: str = ''      # a transformers CLIP vision folder (unused for 'tiny')
  dtype: str = 'float32'       # compute dtype; params stay float32
  remat_policy: str = ''       # '' or a `models.unet.REMAT_POLICIES` name

  def __post_init__(self):
    from e4t_jax.models.unet import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
    if self.dtype not in DTYPES:
      raise ConfigError(f'model.dtype {self.dtype!r} is not one of {DTYPES}.')
    if self.remat_policy not in ('', *REMAT_POLICIES):
      raise ConfigError(f'model.remat_policy {self.remat_policy!r} is not one of {["", *REMAT_POLICIES]}.')
    if self.base != 'tiny' and not self.image_encoder:
      raise ConfigError('model.image_encoder must name a CLIP vision folder when model.base is not "tiny".')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The pretraining data (see e4t_jax/configs/base.py for what each field means)."""
  source: str = 'synthetic'
  path: str = ''
  mask_path: str = ''
  tfds_split: str = 'train'
  tfds_data_dir: str = ''
  tfds_mask_key: str = ''
  synthetic_records: int = 256
  resolution: int = 0
  shuffle_seed: int = 0
  random_flip: bool = True
  workers: int = 0

  def __post_init__(self):
    if self.source not in DATA_SOURCES:
      raise ConfigError(f'data.source {self.source!r} is not one of {", ".join(DATA_SOURCES)}.')


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The loop around the train step: length, logging, checkpoints, the final model folder."""
  num_steps: int = 30_000
  log_every: int = 50
  checkpoint_every: int = 1_000
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  seed: int = 0
  peak_tflops_per_device: float = 0.0  # for MFU; 0: `runtime.peak_tflops` of the device kind
  progress_bar: bool = True
  save_model: bool = True

  def __post_init__(self):
    for name in ('num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
      if getattr(self, name) < 1:
        raise ConfigError(f'train.{name} must be >= 1, got {getattr(self, name)}.')


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The (data, fsdp, tensor) device mesh and the logical-axis sharding rules."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  num_devices: int = 0
  logical_axis_rules: tuple[tuple[str, Any], ...] = ()
  frozen_sharding: str = 'replicated'

  def __post_init__(self):
    rules = []
    for rule in self.logical_axis_rules:
      if len(rule) != 2:
        raise ConfigError(f'mesh.logical_axis_rules entry {rule!r} must be (logical_name, mesh_axis_or_None).')
      name, axis = rule
      rules.append((name, tuple(axis) if isinstance(axis, (list, tuple)) else axis))
    object.__setattr__(self, 'logical_axis_rules', tuple(rules))
    if self.frozen_sharding not in FROZEN_SHARDINGS:
      raise ConfigError(f'mesh.frozen_sharding {self.frozen_sharding!r} is not one of {FROZEN_SHARDINGS}.')

  @property
  def shape(self) -> dict[str, int]:
    return {'data': self.data, 'fsdp': self.fsdp, 'tensor': self.tensor}

  def make_mesh(self, devices=None):
    """The mesh over all devices, or over the first `num_devices` (single process)."""
    import jax  # pylint: disable=g-import-not-at-top
    from e4t_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
    if devices is None and self.num_devices:
      if jax.process_count() > 1:
        raise ConfigError('mesh.num_devices works in single-process runs only; leave it 0.')
      if not 0 < self.num_devices <= jax.device_count():
        raise ConfigError(f'mesh.num_devices={self.num_devices}, but {jax.device_count()} devices exist.')
      devices = jax.devices()[:self.num_devices]
    return make_mesh(self.shape, devices)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole pretraining run, typed and checked: what `train_and_evaluate` runs."""
  model: ModelSource
  e4t: E4TConfig
  templates: tuple[str, ...]   # training prompts, '{}' = the placeholder (data without captions)
  optimizer: OptimizerConfig
  global_batch_size: int
  data: DataConfig
  train: LoopConfig
  mesh: MeshConfig
  as_json: str = '{}'          # the ConfigDict it was built from (stored with every checkpoint)

  def __post_init__(self):
    if not self.templates or any('{}' not in t for t in self.templates):
      raise ConfigError('e4t.templates must be a non-empty list of prompts, each with "{}" for the placeholder.')
    if self.global_batch_size < 1:
      raise ConfigError(f'optimizer.global_batch_size must be >= 1, got {self.global_batch_size}.')


def run_config(config: ml_collections.ConfigDict) -> RunConfig:
  """The typed run config of a ConfigDict: every field checked, once."""
  e4t = config.e4t
  optimizer = config.optimizer.to_dict()
  global_batch_size = optimizer.pop('global_batch_size')
  if optimizer['decay'] == 'cosine' and not optimizer['total_steps']:
    optimizer['total_steps'] = config.train.num_steps
  return RunConfig(
      model=ModelSource(**config.model.to_dict()),
      e4t=E4TConfig(
          coarse_word=e4t.coarse_word, placeholder=e4t.placeholder, embedding_scale=e4t.embedding_scale,
          lambda_embedding=e4t.lambda_embedding, lambda_offsets=e4t.lambda_offsets, coarse_prompt=e4t.coarse_prompt,
          encoder=EncoderConfig(**config.encoder.to_dict()),
          offsets=OffsetsConfig(**dict(config.offsets.to_dict(), targets=tuple(config.offsets.targets))),
          trainable_patterns=tuple(e4t.trainable_patterns), use_loss_mask=e4t.use_loss_mask,
          min_snr_gamma=e4t.get('min_snr_gamma', 0.0)),
      templates=tuple(e4t.templates), optimizer=OptimizerConfig(**optimizer), global_batch_size=global_batch_size,
      data=DataConfig(**config.data.to_dict()), train=LoopConfig(**config.train.to_dict()),
      mesh=MeshConfig(**config.mesh.to_dict()), as_json=config.to_json())


def load_run_config(name_or_path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
  """`run_config(load_config(...))`: the usual entry point of a run."""
  return run_config(load_config(name_or_path, overrides))
