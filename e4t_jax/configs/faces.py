"""Faces: Stable Diffusion 1.5 + OpenCLIP ViT-H/14, masked loss on the face, 30k steps (the paper's).

  e4t pretrain --config configs/faces.py --workdir gs://bucket/e4t/faces \
      --config.model.base=/models/sd15 --config.model.image_encoder=/models/clip-vit-h-14 \
      --config.data.source=array_record --config.data.path='/data/ffhq/images-*.array_record'
"""
import ml_collections

from e4t_jax.configs import base
from e4t_jax.e4t.encoder import every_second_layer

FACE_TEMPLATES = base.COMMON_TEMPLATES + (
    'a portrait of {}',
    'a headshot of {}',
    'a close-up portrait of {}',
    'a photo of the face of {}',
)


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.base = 'models/stable-diffusion-v1-5'
  config.model.image_encoder = 'models/clip-vit-h-14'
  config.model.dtype = 'bfloat16'
  config.e4t.coarse_word = 'face'
  config.e4t.templates = FACE_TEMPLATES
  config.e4t.use_loss_mask = True
  config.encoder.clip_layers = every_second_layer(32)  # of ViT-H/14
  config.data.source = 'array_record'
  config.data.path = 'data/faces/*.array_record'
  config.data.resolution = 512
  config.train.num_steps = 30_000
  config.mesh.frozen_sharding = 'fsdp'
  return config
