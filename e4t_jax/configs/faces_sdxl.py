"""Faces on Stable Diffusion XL base 1.0 (1024 px) + OpenCLIP ViT-H/14: the faces domain of `faces.py` on SDXL.

  e4t pretrain --config e4t_jax/configs/faces_sdxl.py --workdir gs://bucket/e4t/faces-sdxl \
      --config.model.base=/models/stable-diffusion-xl-base-1.0 --config.model.image_encoder=/models/clip-vit-h-14 \
      --config.data.path='/data/ffhq/images-*.array_record'

The placeholder lives in both SDXL vocabularies; the encoder predicts one offset spanning both text
encoders (768 + 1280 wide), so w* enters both encoders and the pooled embedding (`e4t.prompts`). The
U-Net is remat'd per block (2.6B parameters at 1024 px) and the frozen towers are sharded over fsdp.
"""
import ml_collections

from e4t_jax.configs import faces


def get_config() -> ml_collections.ConfigDict:
  config = faces.get_config()
  config.model.base = 'models/stable-diffusion-xl-base-1.0'
  config.model.remat_policy = 'nothing_saveable'
  config.encoder.hidden_dim = 1280
  config.data.resolution = 1024
  return config
