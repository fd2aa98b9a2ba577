"""Architecture presets: the configs of well-known checkpoints, so full-size programs can be built,
lowered and measured (`jax.eval_shape`, AOT compile) on a CPU without downloading any weights.

Values are those of the public config.json files (Stable Diffusion 1.5 / 2.1 / XL base 1.0, OpenCLIP ViT-H/14).
"""
from __future__ import annotations

from e4t_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from e4t_jax.models.unet import UNetConfig
from e4t_jax.models.vae import VAEConfig

_SD_VAE = dict(down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)


def sd15() -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
  """Stable Diffusion 1.5: 860M U-Net (8 heads), 84M VAE, CLIP ViT-L/14 text encoder (123M)."""
  return (UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
          VAEConfig(**_SD_VAE),
          CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                         num_attention_heads=12, eos_token_id=2))


def sd21() -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
  """Stable Diffusion 2.1 (768-v): linear projections, 64-wide heads, upcast attention, OpenCLIP-H text."""
  return (UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                     use_linear_projection=True, upcast_attention=True),
          VAEConfig(**dict(_SD_VAE, sample_size=768)),
          CLIPTextConfig(hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23,
                         num_attention_heads=16, hidden_act='gelu', eos_token_id=2))


def sdxl() -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, CLIPTextConfig]:
  """Stable Diffusion XL base 1.0 at 1024 px: the 2.6B U-Net (no attention at the first level, 1/2/10
  transformer layers, 64-wide heads, linear projections, text_time conditioning on the pooled text and 6
  size/crop ids), the SD VAE (scaling 0.13025), CLIP ViT-L/14 text (768) and OpenCLIP bigG/14 text with its
  projection (1280, 32 layers)."""
  unet = UNetConfig(
      sample_size=128, block_out_channels=(320, 640, 1280),
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
      use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=256,
      projection_class_embeddings_input_dim=2816)
  return (unet, VAEConfig(**dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025)),
          CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                         num_attention_heads=12, eos_token_id=2),
          CLIPTextConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                         num_attention_heads=20, hidden_act='gelu', eos_token_id=2))


def clip_vit_h14() -> CLIPVisionConfig:
  """OpenCLIP ViT-H/14 (laion2b) vision tower, the image encoder the E4T reference uses."""
  return CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
                          num_attention_heads=16, image_size=224, patch_size=14, hidden_act='gelu')


def clip_vit_l14() -> CLIPVisionConfig:
  """OpenAI CLIP ViT-L/14 vision tower (the reference's legacy encoder)."""
  return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                          num_attention_heads=16, image_size=224, patch_size=14, hidden_act='quick_gelu')
