"""Torch-free conversion between diffusers / transformers folders (safetensors) and our Flax params.

    from e4t_jax import convert
    sd = convert.load_stable_diffusion('stable-diffusion-v1-5/')
    unet, unet_params = convert.load_unet('stable-diffusion-v1-5/unet')

The names below are imported lazily (on first attribute access), so `import e4t_jax.convert.common`
does not build every model module.
"""
from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule that defines it.
_EXPORTS = {
    'load_unet': 'unet', 'save_unet': 'unet',
    'load_vae': 'vae', 'save_vae': 'vae',
    'load_text_encoder': 'clip', 'save_text_encoder': 'clip',
    'load_image_encoder': 'clip', 'save_image_encoder': 'clip',
    'StableDiffusion': 'pipeline', 'load_stable_diffusion': 'pipeline', 'save_stable_diffusion': 'pipeline',
    'init_stable_diffusion': 'pipeline',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  globals()[name] = value  # later look-ups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
