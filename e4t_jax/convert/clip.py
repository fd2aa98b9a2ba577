"""Load / save transformers CLIP text and vision folders (config.json + safetensors) as our Flax models; torch-free.

Accepted layouts, all strict (a missing, unexpected or mis-shaped tensor raises `ConversionError`
naming the key and the file):
  text encoder:  `CLIPTextModel` (keys `text_model.*` as on the Hub and in Stable Diffusion's
                 `text_encoder/`, or unprefixed as transformers >= 5 saves them),
                 `CLIPTextModelWithProjection` (its `text_projection` is read with `with_projection=True`,
                 as SDXL's `text_encoder_2` needs, and ignored otherwise) and a full `CLIPModel`.
  image encoder: `CLIPVisionModelWithProjection` (`vision_model.*` + `visual_projection`),
                 `CLIPVisionModel` (`vision_model.*`, or unprefixed as transformers >= 5 saves it) and a
                 full `CLIPModel` (its text tower, `text_projection` and `logit_scale` are ignored).
Non-persistent buffers that old checkpoints still hold (`*.embeddings.position_ids`) are ignored.

Files hold one tensor per layer (`text_model.encoder.layers.{i}.…`); the modules we return scan their
layers by default (`scan_layers=True`), and their params are stacked on load and unstacked on save
(`models.clip.stack_layers`), so either layout saves to the same files.

We always save the prefixed layout (`text_model.*`, `vision_model.*`): every transformers version
loads it (transformers >= 5 strips the prefix on load), and it is what diffusers pipelines ship.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax.convert.common import (check_params_match, params_to_state_dict, unbox, parse_config, read_config, read_weights, state_dict_to_params,
                                    write_model_dir)
from e4t_jax.models.clip import (CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig, CLIPVisionTransformer,
                                 abstract_params, to_layout, unstack_layers)

WEIGHTS_NAME = 'model.safetensors'
TEXT_PREFIX = 'text_model.'
VISION_PREFIX = 'vision_model.'
PROJECTION = 'visual_projection'
TEXT_PROJECTION = 'text_projection'

# Registered buffers (not parameters) that checkpoints written by transformers < 4.31 still contain.
_BUFFERS = (r'(^|\.)embeddings\.position_ids$',)
# What a full CLIPModel holds beyond each tower.
_FULL_MODEL_NON_TEXT = (r'^vision_model\.', r'^visual_projection\.weight$', r'^text_projection\.weight$',
                        r'^logit_scale$')
_FULL_MODEL_NON_VISION = (r'^text_model\.', r'^text_projection\.weight$', r'^logit_scale$')


def _is_full_clip(raw_config: dict[str, Any]) -> bool:
  return raw_config.get('model_type') == 'clip' or 'text_config' in raw_config or 'vision_config' in raw_config


def _read_config(model_dir: str | os.PathLike, from_transformers) -> tuple[Any, dict[str, Any]]:
  raw = read_config(model_dir)
  return parse_config(model_dir, from_transformers, 'CLIP'), raw


def _split(tree: dict[str, Any], body: str, projection: str) -> dict[str, Any]:
  """Our flat tree -> transformers' nesting: {body: the tower, projection: ... (if there)}."""
  nested: dict[str, Any] = {body: {k: v for k, v in tree.items() if k != projection}}
  if projection in tree:
    nested[projection] = tree[projection]
  return nested


def _merge(nested: dict[str, Any], body: str, projection: str) -> dict[str, Any]:
  """Inverse of `_split`."""
  tree = dict(nested[body])
  if projection in nested:
    tree[projection] = nested[projection]
  return tree


_split_vision = functools.partial(_split, body='vision_model', projection=PROJECTION)
_merge_vision = functools.partial(_merge, body='vision_model', projection=PROJECTION)
_split_text = functools.partial(_split, body='text_model', projection=TEXT_PROJECTION)
_merge_text = functools.partial(_merge, body='text_model', projection=TEXT_PROJECTION)


def _check_params(params: Any, abstract: Any, where: str, what: str) -> None:
  check_params_match(params, abstract, where=where, what=what)


# ----------------------------------------------------------------------------- text
def load_text_encoder(model_dir: str | os.PathLike, dtype: Any = jnp.float32, *, scan_layers: bool = True,
                      with_projection: bool = False) -> tuple[CLIPTextTransformer, dict]:
  """Reads a transformers CLIP text folder (Stable Diffusion's `text_encoder/`).

  Args:
    model_dir: folder with config.json and model.safetensors (or model.safetensors.index.json shards).
    dtype: compute dtype of the returned module; parameters are float32 whatever the stored dtype.
    scan_layers: the module scans its layers and the params are stacked (see `models.clip`);
      False: one module and one params subtree per layer, as in the file.
    with_projection: read `text_projection.weight` too (a `CLIPTextModelWithProjection`, e.g. SDXL's
      `text_encoder_2`) and return a module whose output has `text_embeds`; required to be there.
  Returns:
    (module, params), params the unboxed tree for `module.apply({'params': params}, input_ids)`,
    placed on the default device.
  Raises:
    ConversionError: missing/unexpected/mis-shaped tensor, unreadable files.
    ConfigError: a config option this port does not implement.
  """
  config, raw = _read_config(model_dir, CLIPTextConfig.from_transformers)
  per_layer = CLIPTextTransformer(config, dtype=dtype, scan_layers=False, with_projection=with_projection)
  state_dict, origin = read_weights(model_dir, WEIGHTS_NAME)
  ignore: list[str] = list(_BUFFERS)
  if _is_full_clip(raw):
    ignore += [p for p in _FULL_MODEL_NON_TEXT if not (with_projection and TEXT_PROJECTION in p)]
  elif not with_projection and 'CLIPTextModelWithProjection' in (raw.get('architectures') or ()):
    ignore.append(r'^text_projection\.weight$')
  # transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix.
  nested = any(k.startswith(TEXT_PREFIX) for k in state_dict)
  abstract = abstract_params(per_layer)
  params = state_dict_to_params(state_dict, _split_text(abstract) if nested else abstract, source=str(model_dir),
                                ignore=ignore, origin=origin, dtype=np.float32)
  if nested:
    params = _merge_text(params)
  return per_layer.clone(scan_layers=scan_layers), jax.device_put(to_layout(params, scan_layers))


def save_text_encoder(model_dir: str | os.PathLike, config: CLIPTextConfig, params: Any) -> None:
  """Writes a folder transformers loads (config.json + model.safetensors): a `CLIPTextModelWithProjection`
  when `params` holds `text_projection`, else a `CLIPTextModel`.

  The params tree is checked against `config` first, so a mismatched pair is never written.
  """
  params = unstack_layers(unbox(params))  # accepts {'params': ...} and either layer layout
  with_projection = TEXT_PROJECTION in params
  abstract = abstract_params(CLIPTextTransformer(config, scan_layers=False, with_projection=with_projection))
  _check_params(params, abstract, str(model_dir), 'CLIP text')
  write_model_dir(model_dir, params_to_state_dict(_split_text(params)),
                  config.to_transformers(with_projection=with_projection), WEIGHTS_NAME)


# ----------------------------------------------------------------------------- vision
def load_image_encoder(model_dir: str | os.PathLike, dtype: Any = jnp.float32, *, with_projection: bool | None = None,
                       scan_layers: bool = True) -> tuple[CLIPVisionTransformer, dict]:
  """Reads a transformers CLIP vision folder (`CLIPVisionModel[WithProjection]`) or a full `CLIPModel` folder.

  Args:
    model_dir: folder with config.json and model.safetensors (or model.safetensors.index.json shards).
    dtype: compute dtype of the returned module; parameters are float32 whatever the stored dtype.
    with_projection: build `visual_projection` (image_embeds). None: exactly when the folder has
      `visual_projection.weight`; True: require it; False: skip it even if present.
    scan_layers: as for `load_text_encoder`.
  Returns:
    (module, params), params the unboxed tree for `module.apply({'params': params}, pixel_values)`,
    placed on the default device.
  Raises:
    ConversionError: missing/unexpected/mis-shaped tensor, unreadable files.
    ConfigError: a config option this port does not implement.
  """
  config, raw = _read_config(model_dir, CLIPVisionConfig.from_transformers)
  state_dict, origin = read_weights(model_dir, WEIGHTS_NAME)
  projection_key = f'{PROJECTION}.weight'
  if with_projection is None:
    with_projection = projection_key in state_dict
  model = CLIPVisionTransformer(config, with_projection=with_projection, dtype=dtype, scan_layers=False)
  ignore: list[str] = list(_BUFFERS)
  if _is_full_clip(raw):
    ignore += _FULL_MODEL_NON_VISION
  if not with_projection:
    ignore.append(rf'^{PROJECTION}\.weight$')
  abstract = abstract_params(model)
  # transformers keeps the tower under `vision_model.` and the projection at the top level; a bare
  # CLIPVisionModel saved by transformers >= 5 has no prefix at all.
  nested = any(k.startswith(VISION_PREFIX) for k in state_dict)
  params = state_dict_to_params(state_dict, _split_vision(abstract) if nested else abstract,
                                source=str(model_dir), ignore=ignore, origin=origin, dtype=np.float32)
  if nested:
    params = _merge_vision(params)
  return model.clone(scan_layers=scan_layers), jax.device_put(to_layout(params, scan_layers))


def save_image_encoder(model_dir: str | os.PathLike, config: CLIPVisionConfig, params: Any) -> None:
  """Writes a folder transformers loads: a `CLIPVisionModelWithProjection` when `params` holds
  `visual_projection`, else a `CLIPVisionModel`.

  The params tree is checked against `config` first, so a mismatched pair is never written.
  """
  params = unstack_layers(unbox(params))  # accepts {'params': ...} and either layer layout
  with_projection = PROJECTION in params
  abstract = abstract_params(CLIPVisionTransformer(config, with_projection=with_projection, scan_layers=False))
  _check_params(params, abstract, str(model_dir), 'CLIP vision')
  write_model_dir(model_dir, params_to_state_dict(_split_vision(params)),
                  config.to_transformers(with_projection=with_projection), WEIGHTS_NAME)

