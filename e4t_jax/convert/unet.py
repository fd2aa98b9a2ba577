"""diffusers U-Net folder (config.json + diffusion_pytorch_model[.fp16].safetensors[.index.json]) <-> our `UNet` params.

Torch-free: safetensors are read/written with numpy (`convert.common`). Loading is strict: every
tensor the config implies must be present with the right shape, and nothing else may be there.
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from e4t_jax.convert import common
from e4t_jax.models.unet import UNet, UNetConfig, abstract_params

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'


def load_config(model_dir: str | os.PathLike) -> UNetConfig:
  """Reads `model_dir/config.json` as a `UNetConfig` (ConfigError names the file on failure)."""
  return common.parse_config(model_dir, UNetConfig.from_diffusers, 'U-Net')


def load_unet(model_dir: str | os.PathLike, dtype: Any = jnp.float32, variant: str | None = None
              ) -> tuple[UNet, dict]:
  """Loads a diffusers `UNet2DConditionModel` folder (e.g. `<sd-checkpoint>/unet`).

  Args:
    model_dir: folder with config.json and diffusion_pytorch_model.safetensors (or its sharded
      `.index.json`).
    dtype: compute dtype of the returned module; parameters are float32 whatever is on disk.
    variant: diffusers' weights variant to read (e.g. 'fp16': `diffusion_pytorch_model.fp16.safetensors`);
      None reads the plain weights, or the folder's only variant where there are no plain weights.
  Returns:
    (module, params): params is the plain (unboxed) tree of host numpy float32 arrays, for
    `module.apply({'params': params}, ...)`; place it on devices with `jax.device_put` or the
    sharding helpers.
  """
  config = load_config(model_dir)
  model = UNet(config, dtype=dtype)
  state, origin = common.read_weights(model_dir, WEIGHTS_NAME, variant)
  params = common.state_dict_to_params(state, abstract_params(model), source=str(model_dir), origin=origin)
  return model, params


def save_unet(model_dir: str | os.PathLike, config: UNetConfig, params: Any) -> None:
  """Writes a folder `diffusers.UNet2DConditionModel.from_pretrained` loads (safetensors + config.json).

  `params` may be boxed or unboxed, wrapped in {'params': ...} or not, on host or (sharded) on
  devices; tensors keep their dtype. They are checked against `config` before anything is written.
  """
  params = common.unbox(params)
  common.check_params_match(params, abstract_params(UNet(config)), where=str(model_dir), what='U-Net')
  common.write_model_dir(model_dir, common.params_to_state_dict(params), config.to_diffusers(), WEIGHTS_NAME)
