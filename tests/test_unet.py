"""U-Net port: config handling, strict conversion, and numerical parity with diffusers.

Parity tests build tiny random `diffusers.UNet2DConditionModel`s in PyTorch (every weight perturbed,
so zero-initialised layers cannot hide a bug), save them as safetensors, load them with our
torch-free `load_unet` and compare outputs. They skip when torch/diffusers are not installed; the
config and strictness tests run without them.
"""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from e4t_jax import fileio
from e4t_jax.convert import common
from e4t_jax.convert.unet import WEIGHTS_NAME, load_unet, save_unet
from e4t_jax.errors import ConfigError, ConversionError
from e4t_jax.models.unet import UNet, UNetConfig, UNetFeatures, abstract_params

BATCH, SIZE, TEXT_TOKENS = 2, 16, 7
FP32_TOLERANCE = 1e-4
# bfloat16 keeps 8 mantissa bits (~0.4% per rounding); through ~50 layers the error stays at a few
# percent of the output's scale. Measured ~1-2%; 5% leaves room without hiding a real bug (those
# show up as O(100%) errors).
BF16_RELATIVE_TOLERANCE = 5e-2

SD1_STYLE = dict(  # conv proj_in/out, one int head count, the SD1 block layout (3 levels)
    sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    layers_per_block=1, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2)
SD2_STYLE = dict(  # linear proj_in/out, per-block head counts, upcast attention, 2 resnets per level
    sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    layers_per_block=2, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=[2, 4],
    use_linear_projection=True, upcast_attention=True,
    # Options SD leaves at their defaults, set here so their code paths are covered too.
    downsample_padding=0, mid_block_scale_factor=2.0, center_input_sample=True, freq_shift=1,
    flip_sin_to_cos=False)
SDXL_TIME_WIDTH, SDXL_POOLED = 8, 16
SDXL_STYLE = dict(  # SDXL base's layout: no attention at the first level, per-block transformer depths,
    # linear projections, per-block heads, and the text_time embedding of pooled text + 6 size/crop values
    sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    layers_per_block=1, transformer_layers_per_block=(1, 1, 2), norm_num_groups=8, cross_attention_dim=24,
    attention_head_dim=(2, 2, 4), use_linear_projection=True, addition_embed_type='text_time',
    addition_time_embed_dim=SDXL_TIME_WIDTH, projection_class_embeddings_input_dim=6 * SDXL_TIME_WIDTH + SDXL_POOLED)


# ----------------------------------------------------------------------------- helpers
def _inputs(config: dict, seed: int = 0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((BATCH, config['in_channels'], SIZE, SIZE)).astype(np.float32)  # NCHW
  timesteps = np.array([3, 500], np.int64)
  context = rng.standard_normal((BATCH, TEXT_TOKENS, config['cross_attention_dim'])).astype(np.float32)
  return sample, timesteps, context


def _nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def _jitted(config: UNetConfig, dtype, **flags):
  return jax.jit(functools.partial(UNet(config, dtype=dtype).apply, **flags))


def _sdxl_added(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1152, 32, 16, 1024, 1024]], np.float32)
  return {'text_embeds': rng.standard_normal((BATCH, SDXL_POOLED)).astype(np.float32), 'time_ids': time_ids}


def _run_ours(model: UNet, params, inputs, dtype=jnp.float32, added=None, **flags):
  sample, timesteps, context = inputs
  extra = {} if added is None else {'added_cond_kwargs': jax.tree.map(jnp.asarray, added)}
  out = _jitted(model.config, dtype, **flags)({'params': params}, jnp.asarray(_nhwc(sample)),
                                              jnp.asarray(timesteps), jnp.asarray(context), **extra)
  return jax.tree.map(lambda a: np.asarray(a.astype(jnp.float32)), out)


def _random_params(config: UNetConfig, seed: int = 0):
  """Random params of the right shapes without compiling `init` (slow on CPU)."""
  rng = np.random.default_rng(seed)
  abstract = nn.meta.unbox(abstract_params(UNet(config)))
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), abstract)


@pytest.fixture(scope='module')
def torch_lib():
  torch = pytest.importorskip('torch')
  pytest.importorskip('diffusers')
  return torch


def _make_torch_unet(torch, config: dict, seed: int):
  from diffusers import UNet2DConditionModel
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**config).eval()
  with torch.no_grad():
    for param in model.parameters():  # perturb everything: norms, biases, zero-init convs
      param.add_(0.1 * torch.randn_like(param))
  return model


def _torch_forward(torch, model, inputs, added=None):
  """Runs diffusers, capturing down_block_res_samples and the mid-block output via hooks."""
  sample, timesteps, context = inputs
  extra = {} if added is None else {'added_cond_kwargs': {k: torch.from_numpy(v) for k, v in added.items()}}
  captured = {'down': []}
  hooks = [model.conv_in.register_forward_hook(lambda m, i, o: captured['down'].append(o)),
           model.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__('mid', o))]
  hooks += [block.register_forward_hook(lambda m, i, o: captured['down'].extend(o[1]))
            for block in model.down_blocks]
  try:
    with torch.no_grad():
      out = model(torch.from_numpy(sample), torch.from_numpy(timesteps), torch.from_numpy(context), **extra).sample
  finally:
    for hook in hooks:
      hook.remove()
  return _nhwc(out), [_nhwc(f) for f in captured['down']], _nhwc(captured['mid'])


def _check_bf16(name, ours_bf16, reference):
  scale = np.abs(reference).max()
  rel = np.abs(ours_bf16 - reference).max() / scale
  print(f'{name}: bf16 max |diff| / max |ref| = {rel:.3e} (output scale {scale:.2f})')
  assert rel <= BF16_RELATIVE_TOLERANCE


def _check_fp32(name, ours, reference):
  diff = np.abs(ours - reference).max()
  print(f'{name}: fp32 max |diff| = {diff:.3e}')
  assert diff <= FP32_TOLERANCE


# ----------------------------------------------------------------------------- config (torch-free)
def test_config_diffusers_round_trip_and_head_semantics():
  config = UNetConfig.from_diffusers(json.loads(json.dumps({'_class_name': 'UNet2DConditionModel', **SD2_STYLE})))
  assert config.attention_head_dim == (2, 4) and config.use_linear_projection
  assert UNetConfig.from_diffusers(config.to_diffusers()) == config
  # diffusers' misnomer: attention_head_dim is the head COUNT; a head is channels // count wide.
  assert config.heads_per_block() == (2, 4)
  params = nn.meta.unbox(abstract_params(UNet(config)))
  attn = params['down_blocks_0']['attentions_0']['transformer_blocks_0']['attn1']
  assert attn['to_q']['kernel'].shape == (16, 16)
  assert params['down_blocks_0']['attentions_0']['proj_in']['kernel'].shape == (16, 16)  # Dense
  # num_attention_heads (rejected by diffusers' class) is written the way diffusers reads it.
  explicit = UNetConfig(**{**SD2_STYLE, 'num_attention_heads': (4, 8), 'attention_head_dim': 3})
  written = explicit.to_diffusers()
  assert written['attention_head_dim'] == [4, 8] and written['num_attention_heads'] is None
  assert UNetConfig.from_diffusers(written).heads_per_block() == (4, 8)


@pytest.mark.parametrize('option, value', [
    ('class_embed_type', 'timestep'), ('addition_embed_type', 'image'), ('time_cond_proj_dim', 256),
    ('dual_cross_attention', True), ('only_cross_attention', True), ('resnet_time_scale_shift', 'scale_shift'),
    ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'), ('some_future_option', 3),
])
def test_config_rejects_unsupported_options(option, value):
  with pytest.raises(ConfigError, match=option):
    UNetConfig.from_diffusers({**SD1_STYLE, option: value})


def test_config_accepts_real_sd_config_keys():
  sd15 = {'_class_name': 'UNet2DConditionModel', '_diffusers_version': '0.6.0', 'act_fn': 'silu',
          'attention_head_dim': 8, 'block_out_channels': [320, 640, 1280, 1280], 'center_input_sample': False,
          'cross_attention_dim': 768, 'down_block_types': list(UNetConfig().down_block_types),
          'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 4,
          'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32,
          'out_channels': 4, 'sample_size': 64, 'up_block_types': list(UNetConfig().up_block_types)}
  config = UNetConfig.from_diffusers(sd15)
  assert config.heads_per_block() == (8, 8, 8, 8) and config.num_down_features == 12
  # The E4T encoder pass: only the contracting path, 12 skips for SD.
  model = UNet(config)
  features = jax.eval_shape(functools.partial(model.apply, features_only=True),
                            {'params': nn.meta.unbox(abstract_params(model))},
                            jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768)))
  assert isinstance(features, UNetFeatures) and len(features.down) == 12
  assert [f.shape[1] for f in features.down] == [64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8]
  assert features.mid.shape == (1, 8, 8, 1280)


def test_tiny_config_is_even_everywhere():
  params = nn.meta.unbox(abstract_params(UNet(UNetConfig.tiny())))
  # Conv kernels' spatial axes (1x1, 3x3) are never sharded; every width axis must split in two.
  odd = [common.torch_key(p) for p, s in traverse_util.flatten_dict(params).items()
         if any(d % 2 for d in (s.shape[2:] if len(s.shape) == 4 else s.shape))]
  assert not odd, odd


# ----------------------------------------------------------------------------- strictness (torch-free)
@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tiny_unet')
  config = UNetConfig.tiny()
  save_unet(path, config, _random_params(config))
  return path


def test_save_load_round_trip_is_exact(tiny_dir):
  model, params = load_unet(tiny_dir)
  assert model.config == UNetConfig.tiny()
  expected = _random_params(UNetConfig.tiny())
  for path, value in traverse_util.flatten_dict(expected).items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(params)[path], value)


def _rewrite(src, dst, edit):
  state = {k: np.array(v) for k, v in fileio.read_safetensors(src / WEIGHTS_NAME).items()}
  edit(state)
  dst.mkdir()
  fileio.write_safetensors(dst / WEIGHTS_NAME, state)
  (dst / 'config.json').write_text((src / 'config.json').read_text())
  return dst


def test_missing_tensor_is_named(tiny_dir, tmp_path):
  key = 'down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight'
  bad = _rewrite(tiny_dir, tmp_path / 'missing', lambda s: s.pop(key))
  with pytest.raises(ConversionError, match=f'missing 1 tensor.*{key}'):
    load_unet(bad)


def test_misshaped_tensor_is_named(tiny_dir, tmp_path):
  key = 'mid_block.resnets.1.conv1.weight'
  bad = _rewrite(tiny_dir, tmp_path / 'misshaped', lambda s: s.__setitem__(key, s[key][:, :-2]))
  with pytest.raises(ConversionError, match=f"{key}.*shape"):
    load_unet(bad)


def test_unexpected_tensor_and_bad_config_are_rejected(tiny_dir, tmp_path):
  bad = _rewrite(tiny_dir, tmp_path / 'extra', lambda s: s.__setitem__('class_embedding.weight', np.zeros(2)))
  with pytest.raises(ConversionError, match='unexpected 1 tensor.*class_embedding.weight'):
    load_unet(bad)
  config = json.loads((tiny_dir / 'config.json').read_text())
  (bad / 'config.json').write_text(json.dumps({**config, 'addition_embed_type': 'text'}))
  with pytest.raises(ConfigError, match='config.json.*addition_embed_type'):
    load_unet(bad)


# ----------------------------------------------------------------------------- parity with diffusers
@pytest.fixture(scope='module')
def sd1(torch_lib, tmp_path_factory):
  """A random SD1-style diffusers U-Net saved to disk, loaded by us, and its reference outputs."""
  model = _make_torch_unet(torch_lib, SD1_STYLE, seed=0)
  path = tmp_path_factory.mktemp('sd1_unet')
  model.save_pretrained(path, safe_serialization=True)
  inputs = _inputs(SD1_STYLE)
  ours, params = load_unet(path)
  return dict(torch_model=model, path=path, inputs=inputs, ours=ours, params=params,
              reference=_torch_forward(torch_lib, model, inputs))


def test_sd1_style_parity_fp32_and_bf16(sd1):
  reference, _, _ = sd1['reference']
  # return_features=True shares its compilation with the features test below (CPU compiles are slow).
  prediction, _ = _run_ours(sd1['ours'], sd1['params'], sd1['inputs'], return_features=True)
  assert prediction.shape == (BATCH, SIZE, SIZE, 4)
  _check_fp32('SD1-style', prediction, reference)
  _check_bf16('SD1-style', _run_ours(sd1['ours'], sd1['params'], sd1['inputs'], dtype=jnp.bfloat16), reference)


def test_sd1_style_features_match_diffusers(sd1):
  _, reference_down, reference_mid = sd1['reference']
  _, features = _run_ours(sd1['ours'], sd1['params'], sd1['inputs'], return_features=True)
  assert len(features.down) == len(reference_down) == sd1['ours'].config.num_down_features
  for i, (ours, reference) in enumerate(zip(features.down, reference_down)):
    assert ours.shape == reference.shape
    _check_fp32(f'SD1-style down feature {i}', ours, reference)
  _check_fp32('SD1-style mid feature', features.mid, reference_mid)
  contracting_only = _run_ours(sd1['ours'], sd1['params'], sd1['inputs'], features_only=True)
  assert isinstance(contracting_only, UNetFeatures)
  for a, b in zip(contracting_only.down + (contracting_only.mid,), features.down + (features.mid,)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_sd2_style_parity_fp32_and_bf16(torch_lib, tmp_path):
  model = _make_torch_unet(torch_lib, SD2_STYLE, seed=1)
  model.save_pretrained(tmp_path, safe_serialization=True)
  inputs = _inputs(SD2_STYLE, seed=1)
  reference, _, _ = _torch_forward(torch_lib, model, inputs)
  ours, params = load_unet(tmp_path)
  assert ours.config.use_linear_projection and ours.config.upcast_attention
  _check_fp32('SD2-style', _run_ours(ours, params, inputs), reference)
  _check_bf16('SD2-style', _run_ours(ours, params, inputs, dtype=jnp.bfloat16), reference)


def test_sdxl_style_parity_from_sharded_fp16_variant_and_round_trip(torch_lib, tmp_path):
  """SDXL base's U-Net layout with text_time conditioning, read from diffusers' sharded fp16 variant files
  (the way SDXL checkpoints ship), equals diffusers run on the same fp16-rounded weights; and writes back."""
  from diffusers import UNet2DConditionModel
  torch = torch_lib
  model = _make_torch_unet(torch, SDXL_STYLE, seed=2).half()
  model.save_pretrained(tmp_path / 'fp16', variant='fp16', max_shard_size='40KB')
  assert (tmp_path / 'fp16' / 'diffusion_pytorch_model.safetensors.index.fp16.json').is_file()
  model = model.float()
  inputs, added = _inputs(SDXL_STYLE, seed=2), _sdxl_added(seed=2)
  reference, _, _ = _torch_forward(torch, model, inputs, added)
  ours, params = load_unet(tmp_path / 'fp16')  # the folder's only variant
  assert ours.config.addition_embed_type == 'text_time' and ours.config.text_embeds_dim == SDXL_POOLED
  assert params['add_embedding']['linear_1']['kernel'].shape == (6 * SDXL_TIME_WIDTH + SDXL_POOLED, 64)
  assert 'attentions_0' not in params['down_blocks_0']
  assert 'transformer_blocks_1' in params['mid_block']['attentions_0']
  _check_fp32('SDXL-style', _run_ours(ours, params, inputs, added=added), reference)
  _check_bf16('SDXL-style', _run_ours(ours, params, inputs, dtype=jnp.bfloat16, added=added), reference)
  with pytest.raises(ValueError, match="added_cond_kwargs must carry \\['text_embeds', 'time_ids'\\]"):
    _run_ours(ours, params, inputs)
  save_unet(tmp_path / 'ours', ours.config, params)
  reloaded = UNet2DConditionModel.from_pretrained(tmp_path / 'ours').eval()
  assert reloaded.config.addition_embed_type == 'text_time'
  assert reloaded.config.transformer_layers_per_block == [1, 1, 2]
  original = model.state_dict()
  assert set(reloaded.state_dict()) == set(original)
  for key, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)


def test_weights_variants_are_found_or_named(tiny_dir, tmp_path):
  state = dict(fileio.read_safetensors(tiny_dir / WEIGHTS_NAME))
  folder = tmp_path / 'variants'
  folder.mkdir()
  (folder / 'config.json').write_text((tiny_dir / 'config.json').read_text())
  fileio.write_safetensors(folder / 'diffusion_pytorch_model.fp16.safetensors',
                           {k: v.astype(np.float16) for k, v in state.items()})
  _, params = load_unet(folder)  # the only variant, read as float32
  assert params['conv_in']['kernel'].dtype == np.float32
  fileio.write_safetensors(folder / 'diffusion_pytorch_model.ema.safetensors', state)
  with pytest.raises(ConversionError, match=r"variants present: \['ema', 'fp16'\]; pass variant"):
    load_unet(folder)
  _, params = load_unet(folder, variant='ema')
  np.testing.assert_array_equal(params['conv_in']['kernel'], _random_params(UNetConfig.tiny())['conv_in']['kernel'])


def test_sdxl_config_is_checked():
  config = UNetConfig(**SDXL_STYLE)
  assert UNetConfig.from_diffusers(config.to_diffusers()) == config
  with pytest.raises(ConfigError, match='needs addition_time_embed_dim'):
    UNetConfig(**{**SDXL_STYLE, 'addition_time_embed_dim': None})
  with pytest.raises(ConfigError, match='leaves no room for the pooled text embedding'):
    UNetConfig(**{**SDXL_STYLE, 'projection_class_embeddings_input_dim': 6 * SDXL_TIME_WIDTH})


def test_round_trip_into_diffusers(torch_lib, sd1, tmp_path):
  """ours -> save_unet -> diffusers.from_pretrained gives the very same network."""
  from diffusers import UNet2DConditionModel
  torch = torch_lib
  save_unet(tmp_path, sd1['ours'].config, sd1['params'])
  reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
  original = sd1['torch_model'].state_dict()
  assert set(reloaded.state_dict()) == set(original)
  for key, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
  reference, _, _ = sd1['reference']
  np.testing.assert_array_equal(_torch_forward(torch, reloaded, sd1['inputs'])[0], reference)


def test_tiny_config_loads_in_diffusers(torch_lib, tiny_dir):
  """Our own config (UNetConfig.tiny().to_diffusers()) and params make a complete diffusers U-Net."""
  from diffusers import UNet2DConditionModel
  reloaded = UNet2DConditionModel.from_pretrained(tiny_dir)
  ours = fileio.read_safetensors(tiny_dir / WEIGHTS_NAME)
  assert set(reloaded.state_dict()) == set(ours)
  for key, value in reloaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), ours[key], err_msg=key)


def test_odd_sizes_upsample_like_torch(torch_lib):
  """Sizes not divisible by 2**levels: diffusers upsamples to each skip's size with torch 'nearest'."""
  import torch.nn.functional as F
  from e4t_jax.models.unet import nearest_resize
  x = np.random.default_rng(0).standard_normal((1, 2, 5, 7)).astype(np.float32)  # NCHW
  for size in [(9, 13), (10, 14), (5, 7), (11, 8)]:
    expected = _nhwc(F.interpolate(torch_lib.from_numpy(x), size=size, mode='nearest'))
    np.testing.assert_array_equal(np.asarray(nearest_resize(jnp.asarray(_nhwc(x)), *size)), expected)
  config = UNetConfig(**SD1_STYLE)
  model = UNet(config)
  out = jax.eval_shape(model.apply, {'params': nn.meta.unbox(abstract_params(model))},
                       jnp.zeros((1, 9, 10, 4)), jnp.zeros(()), jnp.zeros((1, 3, 24)))
  assert out.shape == (1, 9, 10, 4)


def test_abstract_params_are_traced_once_per_module_and_copied_per_call(monkeypatch):
  import dataclasses
  traces = []
  real = jax.eval_shape
  monkeypatch.setattr(jax, 'eval_shape', lambda *a, **k: traces.append(1) or real(*a, **k))
  config = dataclasses.replace(UNetConfig.tiny(), block_out_channels=(16, 48))  # an entry no other test made
  first = abstract_params(UNet(config))
  second = abstract_params(UNet(config))  # an equal module: the memo, no trace
  assert len(traces) == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), first) == jax.tree.map(lambda x: (x.shape, x.dtype), second)
  assert first is not second and first['conv_in'] is not second['conv_in']  # callers may edit their copy
  wider = abstract_params(UNet(dataclasses.replace(config, block_out_channels=(16, 64))))
  assert len(traces) == 2 and nn.meta.unbox(wider)['conv_out']['kernel'].shape[2] == 16
  assert nn.meta.unbox(wider)['down_blocks_1']['resnets_0']['conv1']['kernel'].shape[-1] == 64
