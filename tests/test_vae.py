"""AutoencoderKL: config handling, posterior, strict conversion, and parity with diffusers (torch).

Tests that need torch/diffusers skip without them; the rest run torch-free on our own random weights.
"""
import functools
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from e4t_jax import fileio
from e4t_jax.convert import common
from e4t_jax.convert.vae import WEIGHTS_NAME, load_vae, save_vae
from e4t_jax.errors import ConfigError, ConversionError, InputError
from e4t_jax.models.vae import (AutoencoderKL, DiagonalGaussian, VAEConfig, abstract_params, decode_latents,
                                encode_to_latents, scale_latents, unscale_latents)

F32_TOLERANCE = 1e-4
# bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 per op); ~20 conv/norm layers deep that
# accumulates to a few percent. Stated relative to the largest reference magnitude.
BF16_RELATIVE_TOLERANCE = 0.05
BATCH, SIDE = 2, 32

# The Stable Diffusion 1.x / 2.x vae/config.json.
SD_VAE_CONFIG = {
    '_class_name': 'AutoencoderKL', '_diffusers_version': '0.6.0', 'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4, 'up_block_types': ['UpDecoderBlock2D'] * 4,
    'in_channels': 3, 'latent_channels': 4, 'layers_per_block': 2, 'norm_num_groups': 32,
    'out_channels': 3, 'sample_size': 512,
}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def config():
  return VAEConfig.tiny()


@pytest.fixture(scope='module')
def own_vae_dir(tmp_path_factory, config):
  """A folder written by `save_vae` from random params of the right shapes (torch-free).

  numpy fills the abstract shapes: compiling flax's truncated-normal initialisers costs ~20 s on CPU.
  """
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.normal(0.0, 0.05, leaf.shape).astype(np.float32),
                        nn.meta.unbox(abstract_params(AutoencoderKL(config))))
  path = tmp_path_factory.mktemp('own_vae')
  save_vae(path, config, params)
  return path, params


@pytest.fixture(scope='module')
def torch_vae(tmp_path_factory, config):
  """A diffusers AutoencoderKL with every parameter perturbed, saved as safetensors: (model, folder)."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  torch.manual_seed(0)
  kwargs = {k: v for k, v in config.to_diffusers().items() if not k.startswith('_')}
  model = diffusers.AutoencoderKL(**kwargs).eval()
  with torch.no_grad():
    # Norm scales start at 1 and biases at 0: noise makes a swapped or dropped one visible.
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  path = tmp_path_factory.mktemp('torch_vae')
  model.save_pretrained(path, safe_serialization=True)
  return model, path


@pytest.fixture(scope='module')
def images():
  return np.random.RandomState(0).uniform(-1, 1, (BATCH, SIDE, SIDE, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def latents(config):
  side = SIDE // config.downsample_factor
  return np.random.RandomState(1).randn(BATCH, side, side, config.latent_channels).astype(np.float32)


@pytest.fixture(scope='module')
def torch_reference(torch_vae, images, latents):
  """diffusers' posterior mean/logvar for `images` and decoding of `latents`, as NHWC numpy."""
  import torch
  model, _ = torch_vae
  to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  with torch.no_grad():
    posterior = model.encode(to_nchw(images)).latent_dist
    decoded = model.decode(to_nchw(latents)).sample
  return {'mean': to_nhwc(posterior.mean), 'logvar': to_nhwc(posterior.logvar), 'decoded': to_nhwc(decoded)}


@functools.lru_cache(maxsize=None)
def _jitted(vae: AutoencoderKL, method_name: str):
  return jax.jit(functools.partial(vae.apply, method=getattr(AutoencoderKL, method_name)))


@pytest.fixture(scope='module')
def loaded(torch_vae):
  return load_vae(torch_vae[1])


# ----------------------------------------------------------------------------- config
def test_config_reads_sd_vae_config_and_round_trips():
  config = VAEConfig.from_diffusers(SD_VAE_CONFIG)
  assert config.block_out_channels == (128, 256, 512, 512) and config.layers_per_block == 2
  assert config.downsample_factor == 8
  assert config.scaling_factor == 0.18215 and config.shift_factor is None  # diffusers defaults
  assert VAEConfig.from_diffusers(config.to_diffusers()) == config
  assert VAEConfig.from_diffusers(json.loads(json.dumps(VAEConfig.tiny().to_diffusers()))) == VAEConfig.tiny()


@pytest.mark.parametrize('change, message', [
    ({'act_fn': 'gelu'}, 'act_fn'),
    ({'down_block_types': ['AttnDownEncoderBlock2D'] * 4}, 'AttnDownEncoderBlock2D'),
    ({'up_block_types': ['UpDecoderBlock2D'] * 3}, 'same length'),
    ({'norm_num_groups': 48}, 'norm_num_groups'),
    ({'latents_mean': [0.0] * 4}, 'latents_mean'),
    ({'use_tiling_magic': True}, 'use_tiling_magic'),
    ({'_class_name': 'AutoencoderTiny'}, 'AutoencoderTiny'),
])
def test_config_rejects_unsupported_options(change, message):
  with pytest.raises(ConfigError, match=message):
    VAEConfig.from_diffusers({**SD_VAE_CONFIG, **change})


def test_tiny_config_widths_are_even(config):
  assert all(c % 2 == 0 for c in (*config.block_out_channels, config.latent_channels, config.norm_num_groups))


def test_every_param_is_annotated_with_logical_axes(config):
  flat = traverse_util.flatten_dict(abstract_params(AutoencoderKL(config)))
  assert flat
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.Partitioned), path
    assert len(leaf.names) == len(leaf.value.shape), path
  names = {'/'.join(p) for p in flat}
  # Spot-check that the tree mirrors diffusers' module names.
  for expected in ['encoder/down_blocks_0/resnets_0/norm1/scale',
                   'encoder/down_blocks_0/downsamplers_0/conv/kernel',
                   'encoder/down_blocks_1/resnets_0/conv_shortcut/kernel',
                   'encoder/mid_block/attentions_0/group_norm/bias',
                   'encoder/mid_block/attentions_0/to_out_0/kernel',
                   'decoder/up_blocks_0/upsamplers_0/conv/bias',
                   'quant_conv/kernel', 'post_quant_conv/bias', 'decoder/conv_norm_out/scale']:
    assert expected in names


def test_bfloat16_compute_keeps_float32_params(config):
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(AutoencoderKL(config, dtype=jnp.bfloat16))))
  assert {leaf.dtype for leaf in flat.values()} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------- posterior + scaling
def test_posterior_sample_statistics_and_determinism():
  shape = (4, 64, 64, 4)
  posterior = DiagonalGaussian(mean=jnp.full(shape, 1.5), logvar=jnp.full(shape, 2 * np.log(0.3)))
  draw = posterior.sample(jax.random.key(7))
  assert abs(float(draw.mean()) - 1.5) < 0.01  # 65536 draws: standard error of the mean ~0.0012
  assert abs(float(draw.std()) - 0.3) < 0.01
  np.testing.assert_array_equal(draw, posterior.sample(jax.random.key(7)))
  assert not np.allclose(draw, posterior.sample(jax.random.key(8)))
  np.testing.assert_array_equal(posterior.mode(), posterior.mean)


def test_posterior_clamps_logvar_like_diffusers():
  moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 2), 100.0),
                             jnp.full((1, 2, 2, 2), -100.0)], axis=-1)
  posterior = DiagonalGaussian.from_moments(moments)
  assert posterior.mean.shape == (1, 2, 2, 4)
  np.testing.assert_array_equal(posterior.logvar[..., :2], 20.0)
  np.testing.assert_array_equal(posterior.logvar[..., 2:], -30.0)
  assert np.isfinite(posterior.std).all()


def test_scale_and_unscale_latents_are_inverse():
  config = VAEConfig.tiny(scaling_factor=0.5, shift_factor=0.25)
  sample = jnp.arange(6.0)
  np.testing.assert_allclose(scale_latents(config, sample), (sample - 0.25) * 0.5)
  np.testing.assert_allclose(unscale_latents(config, scale_latents(config, sample)), sample, rtol=1e-6)


def test_reconstruction_shapes_and_dtypes(own_vae_dir, config):
  vae = AutoencoderKL(config)
  reconstruct = jax.jit(functools.partial(vae.apply, sample_posterior=True))
  images = jnp.zeros((1, 16, 16, 3))
  out = reconstruct({'params': own_vae_dir[1]}, images, jax.random.key(0))
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert np.isfinite(out).all()


def test_sampling_posterior_without_key_is_an_input_error(config):
  with pytest.raises(InputError, match='PRNG key'):
    AutoencoderKL(config).init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)), sample_posterior=True)


# ----------------------------------------------------------------------------- conversion (torch-free)
def test_save_then_load_is_exact(own_vae_dir, config):
  path, params = own_vae_dir
  vae, loaded = load_vae(path)
  assert vae.config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _rewrite_weights(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = {k: np.array(v) for k, v in fileio.read_safetensors(dst / WEIGHTS_NAME).items()}
  edit(tensors)
  fileio.write_safetensors(dst / WEIGHTS_NAME, tensors)
  return dst


def test_load_names_a_missing_tensor(own_vae_dir, tmp_path):
  key = 'encoder.mid_block.attentions.0.to_k.weight'
  path = _rewrite_weights(own_vae_dir[0], tmp_path / 'vae', lambda t: t.pop(key))
  with pytest.raises(ConversionError, match=f'missing 1 tensor.*{key}'):
    load_vae(path)


def test_load_names_a_misshaped_tensor(own_vae_dir, tmp_path):
  key = 'decoder.up_blocks.0.upsamplers.0.conv.weight'
  def shrink(tensors):
    tensors[key] = tensors[key][:-1]
  path = _rewrite_weights(own_vae_dir[0], tmp_path / 'vae', shrink)
  with pytest.raises(ConversionError, match=f"{key}.*has shape"):
    load_vae(path)


def test_load_names_an_unexpected_tensor(own_vae_dir, tmp_path):
  def add(tensors):
    tensors['encoder.mid_block.attentions.1.to_q.weight'] = np.zeros((64, 64), np.float32)
  path = _rewrite_weights(own_vae_dir[0], tmp_path / 'vae', add)
  with pytest.raises(ConversionError, match='unexpected 1 tensor.*attentions.1.to_q.weight'):
    load_vae(path)


def test_load_accepts_legacy_attention_names(own_vae_dir, tmp_path):
  legacy = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  def rename(tensors):
    for key in list(tensors):
      for new, old in legacy.items():
        current = f'.mid_block.attentions.0.{new}.'
        if current in key:
          tensors[key.replace(current, f'.mid_block.attentions.0.{old}.')] = tensors.pop(key)
  path = _rewrite_weights(own_vae_dir[0], tmp_path / 'vae', rename)
  assert 'encoder.mid_block.attentions.0.proj_attn.bias' in fileio.read_safetensors(path / WEIGHTS_NAME)
  _, loaded = load_vae(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, own_vae_dir[1])


def test_save_rejects_params_of_another_config(own_vae_dir, tmp_path):
  with pytest.raises(ConversionError, match='shape'):
    save_vae(tmp_path / 'vae', VAEConfig.tiny(latent_channels=8), own_vae_dir[1])
  assert not (tmp_path / 'vae').exists()


def test_load_reports_unsupported_config(own_vae_dir, tmp_path):
  shutil.copytree(own_vae_dir[0], tmp_path / 'vae')
  config = json.loads((tmp_path / 'vae' / 'config.json').read_text())
  (tmp_path / 'vae' / 'config.json').write_text(json.dumps({**config, 'act_fn': 'mish'}))
  with pytest.raises(ConfigError, match='config.json.*mish'):
    load_vae(tmp_path / 'vae')


# ----------------------------------------------------------------------------- parity with diffusers
def test_param_names_are_exactly_diffusers_state_dict(torch_vae, loaded):
  model, _ = torch_vae
  assert set(common.params_to_state_dict(loaded[1])) == set(model.state_dict())


def test_encode_matches_diffusers_float32(loaded, images, torch_reference):
  vae, params = loaded
  posterior = _jitted(vae, 'encode')({'params': params}, images)
  assert posterior.mean.dtype == jnp.float32
  mean_err = float(np.abs(np.asarray(posterior.mean) - torch_reference['mean']).max())
  logvar_err = float(np.abs(np.asarray(posterior.logvar) - torch_reference['logvar']).max())
  print(f'\nencode float32 max abs diff: mean {mean_err:.2e}, logvar {logvar_err:.2e}')
  assert mean_err <= F32_TOLERANCE and logvar_err <= F32_TOLERANCE


def test_decode_matches_diffusers_float32(loaded, latents, torch_reference):
  vae, params = loaded
  decoded = _jitted(vae, 'decode')({'params': params}, latents)
  assert decoded.shape == (BATCH, SIDE, SIDE, 3) and decoded.dtype == jnp.float32
  err = float(np.abs(np.asarray(decoded) - torch_reference['decoded']).max())
  print(f'\ndecode float32 max abs diff: {err:.2e}')
  assert err <= F32_TOLERANCE


def test_bfloat16_compute_is_close_to_diffusers(torch_vae, images, latents, torch_reference):
  vae, params = load_vae(torch_vae[1], dtype=jnp.bfloat16)
  posterior = _jitted(vae, 'encode')({'params': params}, images)
  decoded = _jitted(vae, 'decode')({'params': params}, latents)
  assert decoded.dtype == jnp.float32
  for name, ours in [('mean', posterior.mean), ('logvar', posterior.logvar), ('decoded', decoded)]:
    ref = torch_reference[name]
    err = float(np.abs(np.asarray(ours) - ref).max())
    scale = float(np.abs(ref).max())
    print(f'\nbfloat16 {name}: max abs diff {err:.3f} (reference max |x| {scale:.2f}, {err / scale:.1%})')
    assert err <= BF16_RELATIVE_TOLERANCE * scale


def test_encoded_posterior_sample_is_deterministic_with_right_statistics(loaded, images):
  vae, params = loaded
  posterior = _jitted(vae, 'encode')({'params': params}, images)
  draw = posterior.sample(jax.random.key(3))
  np.testing.assert_array_equal(draw, posterior.sample(jax.random.key(3)))
  noise = (np.asarray(draw) - np.asarray(posterior.mean)) / np.asarray(posterior.std)  # must be N(0, 1)
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1.0) < 0.1  # 2048 draws: standard errors ~0.02


def test_latent_helpers_apply_scaling_explicitly(loaded, images, latents):
  vae, params = loaded
  posterior = _jitted(vae, 'encode')({'params': params}, images)
  encode = jax.jit(functools.partial(encode_to_latents, vae))
  scaled = encode(params, images)  # no key: the posterior mean
  np.testing.assert_allclose(scaled, posterior.mean * vae.config.scaling_factor, rtol=1e-5, atol=1e-6)
  key = jax.random.key(5)
  np.testing.assert_allclose(encode(params, images, key), posterior.sample(key) * vae.config.scaling_factor,
                             rtol=1e-5, atol=1e-5)
  decoded = _jitted(vae, 'decode')({'params': params}, latents)
  decode = jax.jit(functools.partial(decode_latents, vae))
  np.testing.assert_allclose(decode(params, latents * vae.config.scaling_factor), decoded, rtol=1e-4, atol=1e-4)


def test_save_vae_loads_in_diffusers(torch_vae, loaded, images, tmp_path):
  import diffusers
  import torch
  model, _ = torch_vae
  vae, params = loaded
  save_vae(tmp_path / 'vae', vae.config, params)
  reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / 'vae').eval()
  original = model.state_dict()
  for key, tensor in reloaded.state_dict().items():
    torch.testing.assert_close(tensor, original[key], rtol=0, atol=0, msg=key)
  assert VAEConfig.from_diffusers(dict(reloaded.config)) == vae.config
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    torch.testing.assert_close(reloaded(x).sample, model(x).sample, rtol=0, atol=0)
