"""Strict, torch-free conversion between PyTorch state dicts on disk and our Flax param pytrees.

Our parameter names mirror the reference (see `models/layers.py`): the torch key of a Flax leaf is
its path joined with '.', where a list-container segment `name_N` becomes `name.N`, and the leaf
name maps `kernel`/`scale`/`embedding` -> `weight`. Kernels change layout (Linear [out, in] ->
[in, out]; Conv2d OIHW -> HWIO). Everything is checked: a missing, unexpected or mis-shaped tensor
raises `ConversionError` naming the key and the file.

Safetensors themselves are read and written by `e4t_jax.fileio`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import jax
import numpy as np
from flax import traverse_util

from e4t_jax.errors import ConfigError, ConversionError
from e4t_jax.fileio import atomic_write_bytes, read_json, read_safetensors, write_safetensors

# Module names under which the reference keeps `nn.ModuleList`s: `down_blocks.0` <-> `down_blocks_0`.
LIST_CONTAINERS = frozenset({
    'down_blocks', 'up_blocks', 'resnets', 'attentions', 'transformer_blocks', 'upsamplers',
    'downsamplers', 'to_out', 'net', 'layers',
})
T = TypeVar('T')
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}


# ----------------------------------------------------------------------------- model directories
def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
  """`model_dir/config.json` as a dict (ConversionError naming the file when missing or not a JSON object)."""
  model_dir = Path(model_dir)
  if not model_dir.is_dir():
    raise ConversionError(f'{model_dir}: no such model directory.')
  return read_json(model_dir / 'config.json', what='a diffusers/transformers model directory',
                   error=ConversionError)


def parse_config(model_dir: str | os.PathLike, parse: Callable[[dict], T], what: str) -> T:
  """`parse(config.json)`, where any error from a field of the wrong kind or value is one ConfigError naming
  the file (the config dataclasses trip over wrong types with TypeError/ValueError/KeyError)."""
  raw = read_config(model_dir)
  path = Path(model_dir) / 'config.json'
  try:
    return parse(raw)
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from None
  except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
    detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise ConfigError(f'{path}: invalid {what} config ({type(e).__name__}: {detail}); restore the file.') from None


def variant_name(weights_name: str, variant: str | None) -> str:
  """diffusers' file name of a weights variant: 'x.safetensors' -> 'x.fp16.safetensors',
  'x.safetensors.index.json' -> 'x.safetensors.index.fp16.json'."""
  if not variant:
    return weights_name
  stem, suffix = weights_name.rsplit('.', 1)
  return f'{stem}.{variant}.{suffix}'


def _variants_present(model_dir: Path, weights_name: str) -> list[str]:
  stem, suffix = weights_name.rsplit('.', 1)
  found = {p.name[len(stem) + 1:-len(suffix) - 1] for p in model_dir.glob(f'{stem}.*.{suffix}')}
  found |= {p.name[len(weights_name) + 7:-5] for p in model_dir.glob(f'{weights_name}.index.*.json')}
  return sorted(v for v in found if v and '.' not in v and '-' not in v)


def read_weights(model_dir: str | os.PathLike, weights_name: str, variant: str | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Reads `weights_name` (e.g. 'model.safetensors') or its sharded `<name>.index.json` in `model_dir`.

  `variant` (e.g. 'fp16') reads diffusers' variant files instead (`<stem>.fp16.safetensors`, or the
  index `<name>.index.fp16.json`). Without one, a folder that holds a single variant and no plain
  weights (a download with `variant='fp16'`) reads that variant. Returns (state_dict, key -> file).
  """
  model_dir = Path(model_dir)
  if variant is None and not (model_dir / weights_name).is_file() and not (
      model_dir / f'{weights_name}.index.json').is_file():
    present = _variants_present(model_dir, weights_name)
    if len(present) == 1:
      variant = present[0]
  single = model_dir / variant_name(weights_name, variant)
  index = model_dir / variant_name(f'{weights_name}.index.json', variant)
  files: list[Path]
  if single.is_file():
    files = [single]
  elif index.is_file():
    weight_map = read_json(index, what='a sharded checkpoint', error=ConversionError,
                           required={'weight_map': dict})['weight_map']
    if not all(isinstance(v, str) and '/' not in v and v not in ('', '.', '..') for v in weight_map.values()):
      raise ConversionError(f'{index}: its weight_map must name safetensors files in {model_dir}.')
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
  else:
    bins = sorted(p.name for p in model_dir.glob('*.bin'))
    hint = f' (found {bins}: convert them to safetensors first, we never unpickle)' if bins else ''
    present = _variants_present(model_dir, weights_name)
    if present and not hint:
      hint = f' (variants present: {present}; pass variant=...)'
    raise ConversionError(f'{model_dir}: no {single.name} or {index.name}{hint}.')
  state, origin = {}, {}
  for file in files:
    if not file.is_file():
      raise ConversionError(f'{file}: listed in {index.name} but missing.')
    for key, value in read_safetensors(file).items():
      state[key] = value
      origin[key] = str(file)
  return state, origin


def write_model_dir(model_dir: str | os.PathLike, state_dict: Mapping[str, Any], config: Mapping[str, Any],
                    weights_name: str) -> None:
  model_dir = Path(model_dir)
  model_dir.mkdir(parents=True, exist_ok=True)
  write_safetensors(model_dir / weights_name, state_dict, metadata={'format': 'pt'})
  atomic_write_bytes(model_dir / 'config.json', [json.dumps(dict(config), indent=2, sort_keys=True).encode()])


# ----------------------------------------------------------------------------- name + layout mapping
_LIST_SEGMENT = re.compile(r'^(?P<name>.+)_(?P<index>\d+)$')


def torch_key(path: tuple[str, ...], prefix: str = '') -> str:
  """Flax param path -> PyTorch state-dict key, e.g. ('down_blocks_0', 'resnets_1', 'conv1', 'kernel')."""
  parts = []
  for segment in path[:-1]:
    m = _LIST_SEGMENT.match(segment)
    if m and m['name'] in LIST_CONTAINERS:
      parts += [m['name'], m['index']]
    else:
      parts.append(segment)
  parts.append(_LEAF_TO_TORCH.get(path[-1], path[-1]))
  return prefix + '.'.join(parts)


def to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':
    if value.ndim == 2:  # Dense [in, out] -> Linear [out, in]
      return value.T
    if value.ndim == 4:  # Conv HWIO -> OIHW
      return value.transpose(3, 2, 0, 1)
  return value


def from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:  # OIHW -> HWIO
      return value.transpose(2, 3, 1, 0)
  return value


def _shape_of(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, 'shape', ()))


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params: Any, *, source: str,
                         prefix: str = '', ignore: Iterable[str] = (), origin: Mapping[str, str] | None = None,
                         dtype: Any = np.float32) -> dict:
  """Builds our (unboxed) params tree from a PyTorch state dict, strictly.

  Args:
    state_dict: torch key -> array (torch layout).
    abstract_params: our params tree (arrays or ShapeDtypeStructs; boxes are unwrapped) defining the
      expected keys and shapes.
    source: the directory/file named in errors.
    prefix: prepended to every torch key (e.g. 'text_model.').
    ignore: regexes of torch keys that are allowed but unused (buffers such as `position_ids`).
    origin: torch key -> file, for error messages.
  """
  origin = origin or {}
  flat = traverse_util.flatten_dict(unbox(abstract_params))
  ignore_res = [re.compile(p) for p in ignore]
  expected = {torch_key(path, prefix): path for path in flat}
  missing = sorted(k for k in expected if k not in state_dict)
  unexpected = sorted(k for k in state_dict if k not in expected and not any(r.search(k) for r in ignore_res))
  problems = []
  if missing:
    problems.append(f'missing {len(missing)} tensor(s): {", ".join(missing[:8])}' + (' …' if len(missing) > 8 else ''))
  if unexpected:
    problems.append(f'unexpected {len(unexpected)} tensor(s): {", ".join(unexpected[:8])}' +
                    (' …' if len(unexpected) > 8 else ''))
  out = {}
  for key, path in expected.items():
    if key not in state_dict:
      continue
    value = from_torch_layout(path, np.asarray(state_dict[key]))
    want = _shape_of(flat[path])
    if tuple(value.shape) != want:
      where = origin.get(key, source)
      problems.append(f'tensor {key!r} in {where} has shape {tuple(state_dict[key].shape)}, '
                      f'expected {to_torch_layout(path, np.empty(want, np.int8)).shape} for this config')
      continue
    out[path] = np.asarray(value, dtype=dtype)
  if problems:
    raise ConversionError(f'{source}: weights do not match the model config: ' + '; '.join(problems) +
                          '. Check that config.json belongs to these weights.')
  return traverse_util.unflatten_dict(out)


def params_to_state_dict(params: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """Our params tree -> PyTorch state dict (numpy, torch layout)."""
  flat = traverse_util.flatten_dict(unbox(params))
  return {torch_key(path, prefix): np.ascontiguousarray(to_torch_layout(path, np.asarray(jax.device_get(v))))
          for path, v in flat.items()}


def unbox(tree: Any) -> dict:
  """Plain nested dict of a params tree: boxes (nn.Partitioned) removed, `{'params': ...}` unwrapped."""
  import flax.linen as nn
  tree = nn.meta.unbox(tree)
  if hasattr(tree, 'unfreeze'):
    tree = tree.unfreeze()
  tree = dict(tree)
  return dict(tree['params']) if set(tree) == {'params'} else tree



def check_params_match(params: Any, abstract_params: Any, *, where: str, what: str, prefix: str = '') -> None:
  """Raises ConversionError unless `params` has exactly the leaves and shapes of `abstract_params`
  (checked before a save, so a mismatched params/config pair is never written). Names torch keys."""
  expected = traverse_util.flatten_dict(unbox(abstract_params))
  given = traverse_util.flatten_dict(unbox(params))
  problems = [f'missing {torch_key(p, prefix)}' for p in sorted(set(expected) - set(given))]
  problems += [f'unexpected {torch_key(p, prefix)}' for p in sorted(set(given) - set(expected))]
  problems += [f'{torch_key(p, prefix)} has shape {tuple(given[p].shape)}, expected {tuple(expected[p].shape)}'
               for p in sorted(set(given) & set(expected)) if tuple(given[p].shape) != tuple(expected[p].shape)]
  if problems:
    raise ConversionError(f'{where}: params do not match the {what} config: ' + '; '.join(problems[:8]) +
                          (' …' if len(problems) > 8 else ''))
