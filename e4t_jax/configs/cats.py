"""Cats: Stable Diffusion 1.5 + OpenCLIP ViT-H/14, coarse word 'cat', 60k steps."""
import ml_collections

from e4t_jax.configs import base

CAT_TEMPLATES = base.COMMON_TEMPLATES + (
    'a photo of a cute {}',
    'a photo of {} sitting',
    'a photo of {} lying down',
)


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.base = 'models/stable-diffusion-v1-5'
  config.model.image_encoder = 'models/clip-vit-h-14'
  config.model.dtype = 'bfloat16'
  config.e4t.coarse_word = 'cat'
  config.e4t.templates = CAT_TEMPLATES
  config.encoder.clip_layers = tuple(range(-1, -33, -2))
  config.data.source = 'array_record'
  config.data.path = 'data/cats/*.array_record'
  config.data.resolution = 512
  config.train.num_steps = 60_000
  config.mesh.frozen_sharding = 'fsdp'
  return config
