"""Art: Stable Diffusion 1.5 + OpenCLIP ViT-H/14, coarse word 'painting', 100k steps."""
import ml_collections

from e4t_jax.configs import base
from e4t_jax.e4t.encoder import every_second_layer

ART_TEMPLATES = (
    'a painting of {}',
    'a painting in the style of {}',
    'an artwork of {}',
    'a picture of {}',
    'a rendering of {}',
    'a cropped painting of {}',
    'the painting {}',
    'a close-up of {}',
    'a famous painting, {}',
    'a canvas of {}',
    'a framed painting of {}',
)


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.base = 'models/stable-diffusion-v1-5'
  config.model.image_encoder = 'models/clip-vit-h-14'
  config.model.dtype = 'bfloat16'
  config.e4t.coarse_word = 'painting'
  config.e4t.templates = ART_TEMPLATES
  config.encoder.clip_layers = every_second_layer(32)  # of ViT-H/14
  config.data.source = 'array_record'
  config.data.path = 'data/art/*.array_record'
  config.data.resolution = 512
  config.data.random_flip = False  # paintings are not mirror-symmetric in style/composition
  config.train.num_steps = 100_000
  config.mesh.frozen_sharding = 'fsdp'
  return config
