"""Stable Diffusion pipeline folders: random init, save -> load round trip, diffusers interop, errors.

The tiny pipeline is `UNetConfig.tiny()`, `VAEConfig.tiny()` and `CLIPTextConfig.tiny()` as they are
(they fit together: 32-wide text states for a 32-wide cross-attention, 4 latent channels). Before it
is saved every parameter gets noise, so zero biases and unit norm scales cannot hide a swapped or
transposed tensor in the diffusers comparison. The diffusers tests load the saved folder with
`StableDiffusionPipeline.from_pretrained` (torch; they skip without torch/diffusers).

Cost: one jitted init of the three tiny models (~20 s on a 2-core CPU, mostly compiling the U-Net init).
"""
from __future__ import annotations

import dataclasses
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import e4t_jax.convert as convert
from e4t_jax.convert.pipeline import (SD1_SCHEDULER_CONFIG, StableDiffusion, init_stable_diffusion,
                                      load_stable_diffusion, parameter_counts, save_stable_diffusion)
from e4t_jax.errors import ConfigError, ConversionError
from e4t_jax.models import clip as clip_lib
from e4t_jax.models import unet as unet_lib
from e4t_jax.models import vae as vae_lib
from e4t_jax.models.clip import CLIPTextConfig
from e4t_jax.models.unet import UNetConfig
from e4t_jax.models.vae import VAEConfig, decode_latents
from e4t_jax.models.tokenizer import CLIPTokenizer

PROMPTS = ['a photo of a cat', 'A painting of a DOG on the beach, 4k!', 'sks face   close-up', '']
TOLERANCE = 1e-4
NOISE = 0.02
TIMESTEP = 500


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(nn.meta.unbox(dict(tree)))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def configs() -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
  return UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny()


@pytest.fixture(scope='module')
def sd(configs) -> StableDiffusion:
  return init_stable_diffusion(jax.random.key(0), *configs)


@pytest.fixture(scope='module')
def noisy_sd(sd) -> StableDiffusion:
  """`sd` with noise on every parameter (host float32 numpy)."""
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (np.asarray(x) + NOISE * rng.standard_normal(x.shape)).astype(np.float32),
                        sd.params)
  return dataclasses.replace(sd, params=params)


@pytest.fixture(scope='module')
def saved(tmp_path_factory, noisy_sd):
  return save_stable_diffusion(tmp_path_factory.mktemp('pipeline') / 'tiny-sd', noisy_sd)


@pytest.fixture(scope='module')
def loaded(saved) -> StableDiffusion:
  return load_stable_diffusion(saved)


@pytest.fixture(scope='module')
def diffusers_pipeline(saved):
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  return diffusers.StableDiffusionPipeline.from_pretrained(
      saved, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope='module')
def latents(configs) -> np.ndarray:
  """Fixed diffusion-space latents, NHWC [1, 16, 16, 4]."""
  unet_config = configs[0]
  size = unet_config.sample_size
  return np.random.default_rng(1).standard_normal((1, size, size, unet_config.in_channels)).astype(np.float32)


def _to_nchw(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _max_diff(ours, theirs) -> float:
  theirs = theirs.detach().float().numpy() if hasattr(theirs, 'detach') else np.asarray(theirs)
  ours = np.asarray(ours, np.float32)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)))


# ----------------------------------------------------------------------------- configs and init
def test_tiny_configs_fit_together_without_overrides(configs):
  unet_config, vae_config, text_config = configs
  assert unet_config.cross_attention_dims() == (text_config.hidden_size,) * len(unet_config.block_out_channels)
  assert vae_config.latent_channels == unet_config.in_channels == unet_config.out_channels
  assert unet_config.sample_size * vae_config.downsample_factor == vae_config.sample_size
  assert text_config.vocab_size == CLIPTokenizer.default().vocab_size


def test_init_creates_every_parameter_of_each_model_in_float32(sd):
  assert set(sd.params) == {'unet', 'vae', 'text_encoder'}
  expected = {'unet': unet_lib.abstract_params(sd.unet), 'vae': vae_lib.abstract_params(sd.vae),
              'text_encoder': clip_lib.abstract_params(sd.text_encoder)}
  for name, abstract in expected.items():
    want = {path: leaf.shape for path, leaf in _flat(abstract).items()}
    got = {path: leaf.shape for path, leaf in _flat(sd.params[name]).items()}
    assert got == want, name
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(sd.params[name])), name
  counts = parameter_counts(sd)
  assert counts == {name: sum(int(np.prod(s)) for s in
                              (leaf.shape for leaf in jax.tree.leaves(sd.params[name]))) for name in counts}
  assert all(count > 0 for count in counts.values())


def test_init_uses_the_packaged_tokenizer_and_the_sd1_schedule_by_default(sd):
  assert sd.tokenizer.vocab_size == 49408
  assert sd.scheduler_config == SD1_SCHEDULER_CONFIG
  assert sd.scheduler_config is not SD1_SCHEDULER_CONFIG  # a copy: callers may edit theirs


@pytest.mark.parametrize('override, message', [
    (dict(text=CLIPTextConfig.tiny(hidden_size=48)), 'cross_attention_dim'),
    (dict(vae=VAEConfig.tiny(latent_channels=8)), 'latent_channels'),
])
def test_init_rejects_configs_that_do_not_fit_together(configs, override, message):
  unet_config, vae_config, text_config = configs
  with pytest.raises(ConfigError, match=message):
    init_stable_diffusion(jax.random.key(0), unet_config, override.get('vae', vae_config),
                          override.get('text', text_config))


def test_init_rejects_a_tokenizer_with_more_ids_than_embedding_rows(configs, sd):
  tokenizer, _ = sd.tokenizer.with_placeholder('<e4t>')
  with pytest.raises(ConfigError, match='embedding rows'):
    init_stable_diffusion(jax.random.key(0), *configs, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- save -> load
def test_save_writes_the_diffusers_folder_layout(saved):
  for path in ('model_index.json', 'unet/config.json', 'unet/diffusion_pytorch_model.safetensors',
               'vae/config.json', 'vae/diffusion_pytorch_model.safetensors', 'text_encoder/config.json',
               'text_encoder/model.safetensors', 'tokenizer/vocab.json', 'tokenizer/merges.txt',
               'scheduler/scheduler_config.json'):
    assert (saved / path).is_file(), path
  assert not list(saved.rglob('*.tmp')), 'a temporary file was left behind'


def test_save_then_load_gives_bit_identical_params(noisy_sd, loaded):
  for name in ('unet', 'vae', 'text_encoder'):
    want, got = _flat(noisy_sd.params[name]), _flat(loaded.params[name])
    assert got.keys() == want.keys(), name
    for path in want:
      assert np.asarray(got[path]).dtype == np.float32
      np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=f'{name}/{path}')


def test_save_then_load_keeps_configs_scheduler_and_tokenizer_ids(noisy_sd, loaded):
  assert loaded.unet.config == noisy_sd.unet.config
  assert loaded.vae.config == noisy_sd.vae.config
  assert loaded.text_encoder.config == noisy_sd.text_encoder.config
  assert loaded.scheduler_config == noisy_sd.scheduler_config
  np.testing.assert_array_equal(loaded.tokenizer(PROMPTS), noisy_sd.tokenizer(PROMPTS))
  assert loaded.tokenizer.special_tokens == noisy_sd.tokenizer.special_tokens
  assert loaded.tokenizer.model_max_length == noisy_sd.tokenizer.model_max_length


def test_loaded_modules_use_the_requested_compute_dtype(saved):
  sd16 = load_stable_diffusion(saved, dtype=jnp.bfloat16)
  assert sd16.unet.dtype == sd16.vae.dtype == sd16.text_encoder.dtype == jnp.bfloat16
  assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(sd16.params))


def test_convert_package_exports_the_public_api():
  for name in ('load_unet', 'save_unet', 'load_vae', 'save_vae', 'load_text_encoder', 'save_text_encoder',
               'load_image_encoder', 'save_image_encoder', 'load_stable_diffusion', 'save_stable_diffusion',
               'init_stable_diffusion', 'StableDiffusion'):
    assert callable(getattr(convert, name)), name
    assert name in convert.__all__ and name in dir(convert)
  assert convert.load_stable_diffusion is load_stable_diffusion
  with pytest.raises(AttributeError):
    convert.no_such_function  # noqa: B018


# ----------------------------------------------------------------------------- errors
def test_load_rejects_a_path_that_does_not_exist(tmp_path):
  with pytest.raises(ConversionError, match='no such directory'):
    load_stable_diffusion(tmp_path / 'nowhere')


def test_load_rejects_a_file_instead_of_a_folder(tmp_path):
  path = tmp_path / 'model.safetensors'
  path.write_bytes(b'not a folder')
  with pytest.raises(ConversionError, match='no such directory'):
    load_stable_diffusion(path)


@pytest.mark.parametrize('component', ['unet', 'vae', 'text_encoder', 'tokenizer'])
def test_load_names_a_missing_sub_folder(saved, tmp_path, component):
  root = tmp_path / 'sd'
  shutil.copytree(saved, root)
  shutil.rmtree(root / component)
  with pytest.raises(ConversionError, match=rf'missing sub-folder\(s\) {component}/'):
    load_stable_diffusion(root)


def test_load_names_a_broken_tokenizer_folder(saved, tmp_path):
  root = tmp_path / 'sd'
  shutil.copytree(saved, root)
  (root / 'tokenizer' / 'merges.txt').unlink()
  with pytest.raises(ConversionError, match='merges.txt'):
    load_stable_diffusion(root)


def test_load_rejects_a_tokenizer_with_more_ids_than_the_text_encoder_has_rows(saved, tmp_path, noisy_sd):
  root = tmp_path / 'sd'
  shutil.copytree(saved, root)
  noisy_sd.tokenizer.with_placeholder('<e4t>')[0].save(root / 'tokenizer')
  with pytest.raises(ConversionError, match='49409 ids but the text encoder only 49408'):
    load_stable_diffusion(root)


def test_load_without_a_scheduler_folder_falls_back_to_the_sd1_schedule(saved, tmp_path):
  root = tmp_path / 'sd'
  shutil.copytree(saved, root)
  shutil.rmtree(root / 'scheduler')
  assert load_stable_diffusion(root).scheduler_config == SD1_SCHEDULER_CONFIG


def test_load_rejects_an_unreadable_scheduler_config(saved, tmp_path):
  root = tmp_path / 'sd'
  shutil.copytree(saved, root)
  (root / 'scheduler' / 'scheduler_config.json').write_text('{"num_train_timesteps": ')
  with pytest.raises(ConversionError, match='scheduler_config.json'):
    load_stable_diffusion(root)


def test_save_refuses_to_write_over_a_file(tmp_path, noisy_sd):
  path = tmp_path / 'occupied'
  path.write_text('')
  with pytest.raises(ConversionError, match='not a directory'):
    save_stable_diffusion(path, noisy_sd)


# ----------------------------------------------------------------------------- diffusers interop
def test_diffusers_loads_the_saved_folder_with_our_configs(diffusers_pipeline, noisy_sd):
  import torch
  pipe = diffusers_pipeline
  assert type(pipe).__name__ == 'StableDiffusionPipeline'
  assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
  assert pipe.unet.config.cross_attention_dim == noisy_sd.unet.config.cross_attention_dim
  assert tuple(pipe.vae.config.block_out_channels) == noisy_sd.vae.config.block_out_channels
  assert pipe.text_encoder.config.hidden_size == noisy_sd.text_encoder.config.hidden_size
  assert type(pipe.scheduler).__name__ == SD1_SCHEDULER_CONFIG['_class_name']
  assert pipe.scheduler.config.num_train_timesteps == SD1_SCHEDULER_CONFIG['num_train_timesteps']


def test_our_tokenizer_text_encoder_and_unet_match_the_diffusers_pipeline(diffusers_pipeline, loaded, latents):
  import torch
  pipe = diffusers_pipeline
  prompt = PROMPTS[0]
  ours_ids = loaded.tokenizer([prompt])
  theirs_ids = pipe.tokenizer(prompt, padding='max_length', max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors='pt').input_ids
  np.testing.assert_array_equal(ours_ids, theirs_ids.numpy())

  context = jax.jit(lambda p, ids: loaded.text_encoder.apply({'params': p}, ids).last_hidden_state)(
      loaded.params['text_encoder'], jnp.asarray(ours_ids))
  noise = jax.jit(lambda p, x, t, c: loaded.unet.apply({'params': p}, x, t, c))(
      loaded.params['unet'], jnp.asarray(latents), jnp.array([TIMESTEP]), context)
  with torch.no_grad():
    theirs_context = pipe.text_encoder(theirs_ids)[0]
    theirs_noise = pipe.unet(_to_nchw(latents), TIMESTEP, encoder_hidden_states=theirs_context).sample

  context_diff = _max_diff(context, theirs_context)
  noise_diff = _max_diff(np.transpose(np.asarray(noise), (0, 3, 1, 2)), theirs_noise)
  print(f'text encoder: max abs diff {context_diff:.2e}; U-Net: max abs diff {noise_diff:.2e} '
        f'(output scale {float(theirs_noise.abs().max()):.2f})')
  assert context_diff <= TOLERANCE
  assert noise_diff <= TOLERANCE


def test_our_vae_decode_matches_the_diffusers_pipeline(diffusers_pipeline, loaded, latents):
  import torch
  pipe = diffusers_pipeline
  images = jax.jit(lambda p, z: decode_latents(loaded.vae, p, z))(loaded.params['vae'], jnp.asarray(latents))
  with torch.no_grad():  # what the pipeline does to its final latents
    theirs = pipe.vae.decode(_to_nchw(latents) / pipe.vae.config.scaling_factor).sample
  diff = _max_diff(np.transpose(np.asarray(images), (0, 3, 1, 2)), theirs)
  print(f'VAE decode: max abs diff {diff:.2e} (output scale {float(theirs.abs().max()):.2f})')
  assert diff <= TOLERANCE
