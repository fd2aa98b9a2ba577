"""Load / save a diffusers `AutoencoderKL` folder (config.json + safetensors) as our Flax VAE; torch-free."""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax.convert.common import (check_params_match, params_to_state_dict, parse_config, read_weights,
                                    state_dict_to_params,
                                    write_model_dir)
from e4t_jax.errors import ConversionError
from e4t_jax.models.vae import AutoencoderKL, VAEConfig, abstract_params

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'

# Older diffusers VAE checkpoints (e.g. the original SD 1.x VAEs) name the mid-block attention
# projections query/key/value/proj_attn; diffusers renames them on load, and so do we.
_LEGACY_ATTENTION = re.compile(
    r'^(?P<block>(?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(?P<name>query|key|value|proj_attn)\.'
    r'(?P<leaf>weight|bias)$')
_LEGACY_TO_CURRENT = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _rename_legacy_attention(state_dict: dict[str, np.ndarray], origin: dict[str, str]) -> None:
  for key in [k for k in state_dict if _LEGACY_ATTENTION.match(k)]:
    m = _LEGACY_ATTENTION.match(key)
    new_key = f'{m["block"]}.{_LEGACY_TO_CURRENT[m["name"]]}.{m["leaf"]}'
    if new_key in state_dict:
      raise ConversionError(f'{origin.get(key, "weights")}: holds both {key!r} and {new_key!r}.')
    state_dict[new_key] = state_dict.pop(key)
    if key in origin:
      origin[new_key] = origin.pop(key)


def load_vae(model_dir: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict]:
  """Reads a diffusers `vae/` folder.

  Args:
    model_dir: folder with config.json and diffusion_pytorch_model.safetensors (or its sharded
      .index.json).
    dtype: compute dtype of the returned module; parameters are float32 whatever the stored dtype.
  Returns:
    (module, params) with params the unboxed tree for `module.apply({'params': params}, ...)`,
    placed on the default device.
  Raises:
    ConversionError: missing/unexpected/mis-shaped tensor, unreadable files.
    ConfigError: a config option this port does not implement.
  """
  config = parse_config(model_dir, VAEConfig.from_diffusers, 'VAE')
  vae = AutoencoderKL(config, dtype=dtype)
  state_dict, origin = read_weights(model_dir, WEIGHTS_NAME)
  _rename_legacy_attention(state_dict, origin)
  params = state_dict_to_params(state_dict, abstract_params(vae), source=str(model_dir), origin=origin,
                                dtype=np.float32)
  return vae, jax.device_put(params)


def save_vae(model_dir: str | os.PathLike, config: VAEConfig, params: Any) -> None:
  """Writes a folder `diffusers.AutoencoderKL.from_pretrained` loads (config.json + safetensors).

  The params tree is checked against `config` first, so a mismatched pair is never written.
  """
  check_params_match(params, abstract_params(AutoencoderKL(config)), where=str(model_dir), what='VAE')
  write_model_dir(model_dir, params_to_state_dict(params), config.to_diffusers(), WEIGHTS_NAME)

