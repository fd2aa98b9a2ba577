"""The Flax CLIP text/vision transformers against transformers (PyTorch), the converters, preprocessing.

Parity models are tiny random transformers models whose every parameter is perturbed with noise
(so unit LayerNorm scales or zero biases cannot hide a transposed or misnamed tensor), saved with
`save_pretrained` (safetensors) and read back with our torch-free converters.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from e4t_jax.models import clip as clip_lib
from e4t_jax.convert.clip import load_image_encoder, load_text_encoder, save_image_encoder, save_text_encoder
from e4t_jax.fileio import read_safetensors, write_safetensors
from e4t_jax.errors import ConfigError, ConversionError, InputError
from e4t_jax.models.clip import (CLIP_MEAN, CLIP_STD, CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig,
                                 CLIPVisionTransformer, abstract_params, clip_preprocess)

F32_TOL = 1e-4
# bfloat16 keeps 8 mantissa bits (relative step 2**-8 ~ 0.004); through 2 layers and LayerNorms whose
# outputs are O(1) the error stays well below this.
BF16_TOL = 0.1

BOS, EOS = 49406, 49407
# Hand-written BPE ids of short prompts ("a photo of a cat", "a painting of sks dog on the beach");
# the exact words do not matter, only that they are real CLIP vocabulary ids.
_PROMPTS = ([320, 1125, 539, 320, 2368], [320, 3086, 539, 48136, 1929, 525, 518, 2117])


def _padded(tokens: list[int], pad: int, length: int = 77) -> list[int]:
  ids = [BOS, *tokens, EOS]
  return ids + [pad] * (length - len(ids))


# SD 1.x pads with the eos id itself, SD 2.x (OpenCLIP) with id 0 ('!').
INPUT_IDS = np.array([_padded(_PROMPTS[0], pad=EOS), _padded(_PROMPTS[1], pad=0)], np.int32)  # [2, 77]

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, vocab_size=49408)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8)


def _max_diff(ours, theirs) -> float:
  theirs = theirs.detach().float().numpy() if hasattr(theirs, 'detach') else np.asarray(theirs)
  ours = np.asarray(jnp.asarray(ours, jnp.float32))
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)))


def _assert_close(name: str, ours, theirs, tol: float = F32_TOL) -> None:
  diff = _max_diff(ours, theirs)
  print(f'{name}: max abs diff {diff:.2e}')
  assert diff <= tol, f'{name}: max abs diff {diff} > {tol}'


@functools.lru_cache(maxsize=None)
def _jitted(model: nn.Module, method: str = '__call__'):
  # One compile per (module config, method): far cheaper on CPU than op-by-op eager dispatch.
  return jax.jit(functools.partial(model.apply, method=getattr(type(model), method)))


def _run(model: nn.Module, params, *args, method: str = '__call__', **kwargs):
  return _jitted(model, method)({'params': params}, *args, **kwargs)


def _random_params(model, seed: int):
  """Random params of the model's abstract shapes (host numpy: no init program to compile).

  LayerNorm scales sit around 1 and everything else around 0, but nothing is exactly 0 or 1.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(model)))
  return traverse_util.unflatten_dict({
      path: ((path[-1] == 'scale') + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
      for path, leaf in flat.items()})


def _perturb(torch_model, seed: int):
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in torch_model.parameters():
      param.add_(0.05 * torch.randn(param.shape, generator=generator))
  return torch_model.eval()


def _pixels(seed: int = 0, batch: int = 2, size: int = 32):
  import torch
  return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))  # NCHW


def _nhwc(pixel_values) -> jnp.ndarray:
  return jnp.asarray(pixel_values.numpy().transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module', params=[('quick_gelu', 2), ('gelu', EOS)],
                ids=['quick_gelu-legacy_eos', 'gelu-eos49407'])
def text_folder(request, tmp_path_factory):
  """A saved CLIPTextModel: SD 1.x style (quick_gelu, legacy eos_token_id 2) or SD 2.x style (gelu)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  hidden_act, eos_token_id = request.param
  torch.manual_seed(0)
  config = transformers.CLIPTextConfig(**TINY_TEXT, hidden_act=hidden_act, eos_token_id=eos_token_id,
                                       bos_token_id=0 if eos_token_id == 2 else BOS, pad_token_id=1)
  model = _perturb(transformers.CLIPTextModel(config), seed=1)
  folder = tmp_path_factory.mktemp(f'text_{hidden_act}')
  model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope='module')
def vision_folder(tmp_path_factory):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(**TINY_VISION)
  model = _perturb(transformers.CLIPVisionModelWithProjection(config), seed=2)
  folder = tmp_path_factory.mktemp('vision')
  model.save_pretrained(folder)
  return model, folder


def _torch_text(model, input_ids, **kwargs):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(input_ids, dtype=torch.long), output_hidden_states=True, **kwargs)


def _torch_vision(model, pixel_values):
  import torch
  with torch.no_grad():
    return model(pixel_values=pixel_values, output_hidden_states=True)


# ----------------------------------------------------------------------------- text parity
@pytest.mark.parametrize('scan', [True, False], ids=['scanned', 'per_layer'])
def test_text_parity(text_folder, scan):
  torch_model, folder = text_folder
  model, params = load_text_encoder(folder, scan_layers=scan)
  assert model.scan_layers == scan and clip_lib.is_scanned(params) == scan
  assert model.config.hidden_act == torch_model.config.hidden_act
  assert model.config.eos_token_id == torch_model.config.eos_token_id
  ours = _run(model, params, jnp.asarray(INPUT_IDS))
  theirs = _torch_text(torch_model, INPUT_IDS)
  act = model.config.hidden_act
  _assert_close(f'text[{act}] last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state)
  _assert_close(f'text[{act}] pooled_output', ours.pooled_output, theirs.pooler_output)
  assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
    _assert_close(f'text[{act}] hidden_states[{i}]', a, b)


def test_text_attention_mask_parity(text_folder):
  torch_model, folder = text_folder
  model, params = load_text_encoder(folder)
  mask = (np.arange(77)[None] < np.array([[8], [11]])).astype(np.int32)  # real tokens incl. bos/eos
  ours = _run(model, params, jnp.asarray(INPUT_IDS), attention_mask=jnp.asarray(mask))
  import torch
  theirs = _torch_text(torch_model, INPUT_IDS, attention_mask=torch.as_tensor(mask))
  _assert_close('text masked last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state)
  _assert_close('text masked pooled_output', ours.pooled_output, theirs.pooler_output)


def test_inputs_embeds_override():
  model = CLIPTextTransformer(CLIPTextConfig.tiny())
  params = _random_params(model, seed=8)
  ids = jnp.asarray(INPUT_IDS)
  reference = _run(model, params, ids)
  table = _run(model, params, ids, method='embed_tokens')  # [2, 77, 32]
  assert table.shape == (2, 77, model.config.hidden_size)
  np.testing.assert_array_equal(table, np.asarray(params['embeddings']['token_embedding']['embedding'])[INPUT_IDS])
  same = _run(model, params, ids, inputs_embeds=table)
  np.testing.assert_array_equal(same.last_hidden_state, reference.last_hidden_state)
  np.testing.assert_array_equal(same.pooled_output, reference.pooled_output)

  # Replace the embedding at one position (as E4T does for its placeholder token): causal attention
  # leaves every earlier position untouched and changes that one and every later one.
  position = 3
  new_vector = jax.random.normal(jax.random.key(0), (2, model.config.hidden_size))
  changed = _run(model, params, ids, inputs_embeds=table.at[:, position].set(new_vector))
  before = np.abs(np.asarray(changed.last_hidden_state - reference.last_hidden_state))  # [2, 77, 32]
  assert before[:, :position].max() <= 1e-6, before[:, :position].max()
  assert before[:, position:].max(axis=-1).min() > 1e-3  # every later position moves
  assert np.abs(np.asarray(changed.pooled_output - reference.pooled_output)).min(axis=-1).max() > 0


def test_text_input_errors():
  # Shapes are checked while tracing, so abstract evaluation is enough (nothing is computed).
  model = CLIPTextTransformer(CLIPTextConfig.tiny())
  variables = {'params': abstract_params(model)}
  with pytest.raises(InputError, match='max_position_embeddings'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 78), jnp.int32))
  with pytest.raises(InputError, match='inputs_embeds'):
    jax.eval_shape(functools.partial(model.apply, inputs_embeds=jnp.zeros((1, 4, 8))), variables,
                   jnp.zeros((1, 4), jnp.int32))


# ----------------------------------------------------------------------------- vision parity
@pytest.mark.parametrize('scan', [True, False], ids=['scanned', 'per_layer'])
def test_vision_parity(vision_folder, scan):
  torch_model, folder = vision_folder
  model, params = load_image_encoder(folder, scan_layers=scan)
  assert model.scan_layers == scan and clip_lib.is_scanned(params) == scan
  assert model.with_projection
  pixel_values = _pixels()
  ours = _run(model, params, _nhwc(pixel_values))
  theirs = _torch_vision(torch_model, pixel_values)
  pooled = torch_model.vision_model(pixel_values=pixel_values).pooler_output
  _assert_close('vision last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state)
  _assert_close('vision pooled_output', ours.pooled_output, pooled)
  _assert_close('vision image_embeds', ours.image_embeds, theirs.image_embeds)
  assert len(ours.hidden_states) == len(theirs.hidden_states) == model.config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
    _assert_close(f'vision hidden_states[{i}]', a, b)


def test_vision_without_projection(tmp_path):
  """A bare CLIPVisionModel (saved by transformers >= 5 without the `vision_model.` prefix)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  torch_model = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)), seed=3)
  torch_model.save_pretrained(tmp_path)
  model, params = load_image_encoder(tmp_path)
  assert not model.with_projection and 'visual_projection' not in params
  pixel_values = _pixels(seed=1, batch=1)
  ours = _run(model, params, _nhwc(pixel_values))
  theirs = _torch_vision(torch_model, pixel_values)
  assert ours.image_embeds is None
  _assert_close('vision (no projection) last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state)
  _assert_close('vision (no projection) pooled_output', ours.pooled_output, theirs.pooler_output)
  with pytest.raises(ConversionError, match=r'visual_projection\.weight'):
    load_image_encoder(tmp_path, with_projection=True)


def test_vision_input_errors():
  model = CLIPVisionTransformer(CLIPVisionConfig.tiny())
  with pytest.raises(InputError, match='NCHW'):
    jax.eval_shape(model.apply, {'params': abstract_params(model)}, jnp.zeros((1, 3, 32, 32)))


def test_full_clip_model_folder(tmp_path):
  """A full CLIPModel folder loads as image encoder (and as text encoder)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=24)
  clip = _perturb(transformers.CLIPModel(config), seed=4)
  clip.save_pretrained(tmp_path)

  model, params = load_image_encoder(tmp_path)
  assert model.with_projection and model.config.projection_dim == 24
  pixel_values = _pixels(seed=2)
  ours = _run(model, params, _nhwc(pixel_values))
  with torch.no_grad():
    vision = clip.vision_model(pixel_values=pixel_values)
    image_embeds = clip.visual_projection(vision.pooler_output)
  _assert_close('CLIPModel vision last_hidden_state', ours.last_hidden_state, vision.last_hidden_state)
  _assert_close('CLIPModel vision pooled_output', ours.pooled_output, vision.pooler_output)
  _assert_close('CLIPModel vision image_embeds', ours.image_embeds, image_embeds)

  text_model, text_params = load_text_encoder(tmp_path)
  ours_text = _run(text_model, text_params, jnp.asarray(INPUT_IDS))
  theirs_text = _torch_text(clip.text_model, INPUT_IDS)
  _assert_close('CLIPModel text last_hidden_state', ours_text.last_hidden_state, theirs_text.last_hidden_state)
  _assert_close('CLIPModel text pooled_output', ours_text.pooled_output, theirs_text.pooler_output)


# ----------------------------------------------------------------------------- bfloat16
def test_text_bfloat16(text_folder):
  torch_text, text_dir = text_folder
  model, params = load_text_encoder(text_dir, dtype=jnp.bfloat16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))  # params stay float32
  ours = _run(model, params, jnp.asarray(INPUT_IDS))
  assert ours.last_hidden_state.dtype == jnp.bfloat16
  theirs = _torch_text(torch_text, INPUT_IDS)
  _assert_close('bf16 text last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state, BF16_TOL)
  _assert_close('bf16 text pooled_output', ours.pooled_output, theirs.pooler_output, BF16_TOL)


def test_vision_bfloat16(vision_folder):
  torch_vision, vision_dir = vision_folder
  model, params = load_image_encoder(vision_dir, dtype=jnp.bfloat16)
  pixel_values = _pixels()
  ours = _run(model, params, _nhwc(pixel_values))
  theirs = _torch_vision(torch_vision, pixel_values)
  _assert_close('bf16 vision last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state, BF16_TOL)
  _assert_close('bf16 vision image_embeds', ours.image_embeds, theirs.image_embeds, BF16_TOL)


# ----------------------------------------------------------------------------- round trips
def test_text_round_trip_into_transformers(tmp_path):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = CLIPTextConfig.tiny(hidden_act='gelu')
  model = CLIPTextTransformer(config)
  params = _random_params(model, seed=5)
  save_text_encoder(tmp_path, config, params)
  torch_model, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  assert torch_model.config.hidden_act == 'gelu' and torch_model.config.num_hidden_layers == 2
  ours = _run(model, params, jnp.asarray(INPUT_IDS))
  theirs = _torch_text(torch_model.eval(), INPUT_IDS)
  _assert_close('round trip text last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state)
  _assert_close('round trip text pooled_output', ours.pooled_output, theirs.pooler_output)
  # ... and back: our loader reads what our saver wrote, bit for bit.
  _, reloaded = load_text_encoder(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)
  assert CLIPTextConfig.from_transformers(json.loads((tmp_path / 'config.json').read_text())) == config


def test_text_with_projection_parity_and_round_trip(tmp_path):
  """SDXL's text_encoder_2 (OpenCLIP bigG): a CLIPTextModelWithProjection, gelu, legacy eos id 2, padded with
  '!' (id 0); its projected pooled `text_embeds` and penultimate states condition SDXL's U-Net."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(3)
  config = transformers.CLIPTextConfig(**{**TINY_TEXT, 'projection_dim': 24}, hidden_act='gelu', eos_token_id=2,
                                       bos_token_id=0, pad_token_id=1)
  torch_model = _perturb(transformers.CLIPTextModelWithProjection(config), seed=4)
  torch_model.save_pretrained(tmp_path / 'theirs')
  model, params = load_text_encoder(tmp_path / 'theirs', with_projection=True)
  assert params['text_projection']['kernel'].shape == (32, 24) and clip_lib.is_scanned(params)
  ours = _run(model, params, jnp.asarray(INPUT_IDS))
  theirs = _torch_text(torch_model, INPUT_IDS)
  _assert_close('text_embeds', ours.text_embeds, theirs.text_embeds)
  _assert_close('penultimate hidden state', ours.hidden_states[-2], theirs.hidden_states[-2])
  _assert_close('last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state)
  # without with_projection the same folder loads as a plain text encoder (its projection ignored), as before
  plain, plain_params = load_text_encoder(tmp_path / 'theirs')
  assert 'text_projection' not in plain_params and not plain.with_projection
  save_text_encoder(tmp_path / 'ours', model.config, params)
  assert json.loads((tmp_path / 'ours' / 'config.json').read_text())['architectures'] == ['CLIPTextModelWithProjection']
  reloaded, info = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / 'ours', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  for key, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, torch_model.state_dict()[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize('with_projection', [True, False])
def test_vision_round_trip_into_transformers(tmp_path, with_projection):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = CLIPVisionConfig.tiny()
  model = CLIPVisionTransformer(config, with_projection=with_projection)
  params = _random_params(model, seed=6)
  save_image_encoder(tmp_path, config, params)
  cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
  torch_model, info = cls.from_pretrained(tmp_path, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys'], info
  pixel_values = _pixels(seed=3)
  ours = _run(model, params, _nhwc(pixel_values))
  theirs = _torch_vision(torch_model.eval(), pixel_values)
  _assert_close('round trip vision last_hidden_state', ours.last_hidden_state, theirs.last_hidden_state)
  if with_projection:
    _assert_close('round trip vision image_embeds', ours.image_embeds, theirs.image_embeds)
  else:
    _assert_close('round trip vision pooled_output', ours.pooled_output, theirs.pooler_output)
  _, reloaded = load_image_encoder(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_scanned_and_per_layer_layouts_hold_the_same_weights_and_save_the_same_files(vision_folder, tmp_path):
  """A per-layer transformers folder loads into the stacked layout and back; either layout saves the same
  tensors; the scanned tower computes what the unrolled one does."""
  _, folder = vision_folder
  model, stacked = load_image_encoder(folder)
  per_layer_model, per_layer = load_image_encoder(folder, scan_layers=False)
  assert set(stacked['encoder']) == {'layers'} and set(per_layer['encoder']) == {'layers_0', 'layers_1'}
  kernel = stacked['encoder']['layers']['self_attn']['q_proj']['kernel']
  assert kernel.shape == (2,) + per_layer['encoder']['layers_0']['self_attn']['q_proj']['kernel'].shape
  jax.tree.map(np.testing.assert_array_equal, clip_lib.unstack_layers(stacked), per_layer)
  jax.tree.map(np.testing.assert_array_equal, clip_lib.stack_layers(per_layer), stacked)
  # The abstract tree stacks like the values, with 'layers' as the first logical axis.
  boxed = abstract_params(model)['encoder']['layers']['self_attn']['q_proj']['kernel']
  assert boxed.names == ('layers', 'embed', 'heads') and boxed.value.shape == kernel.shape
  save_image_encoder(tmp_path / 'a', model.config, stacked)
  save_image_encoder(tmp_path / 'b', model.config, per_layer)
  a, b = (read_safetensors(tmp_path / d / 'model.safetensors') for d in 'ab')
  assert sorted(a) == sorted(b) and 'vision_model.encoder.layers.1.self_attn.q_proj.weight' in a
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  pixels = _nhwc(_pixels())
  scanned_out, unrolled_out = _run(model, stacked, pixels), _run(per_layer_model, per_layer, pixels)
  for x, y in zip(scanned_out.hidden_states, unrolled_out.hidden_states):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


def test_save_rejects_params_of_another_config(tmp_path):
  params = nn.meta.unbox(abstract_params(CLIPTextTransformer(CLIPTextConfig.tiny())))
  with pytest.raises(ConversionError, match=r'embeddings.position_embedding.weight has shape \(77, 32\), expected \(77, 64\)'):
    save_text_encoder(tmp_path, CLIPTextConfig.tiny(hidden_size=64, intermediate_size=128), params)
  assert not (tmp_path / 'model.safetensors').exists()


# ----------------------------------------------------------------------------- layouts + strictness
def test_legacy_prefixed_text_folder_with_buffer(text_folder, tmp_path):
  """Hub / Stable Diffusion `text_encoder/` layout: `text_model.*` keys plus the old position_ids buffer."""
  torch_model, folder = text_folder
  state = read_safetensors(Path(folder) / 'model.safetensors')
  legacy = {f'text_model.{k}': np.asarray(v) for k, v in state.items()}
  legacy['text_model.embeddings.position_ids'] = np.arange(77, dtype=np.int64)[None]
  write_safetensors(tmp_path / 'model.safetensors', legacy)
  (tmp_path / 'config.json').write_text((Path(folder) / 'config.json').read_text())
  model, params = load_text_encoder(tmp_path)
  _, reference = load_text_encoder(folder)
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_sharded_weights(tmp_path):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch_model = _perturb(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION)),
                         seed=7)
  torch_model.save_pretrained(tmp_path, max_shard_size='40KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  model, params = load_image_encoder(tmp_path)
  pixel_values = _pixels(seed=4, batch=1)
  ours = _run(model, params, _nhwc(pixel_values))
  _assert_close('sharded vision image_embeds', ours.image_embeds, _torch_vision(torch_model, pixel_values).image_embeds)


def _rewrite(folder: Path, out: Path, edit) -> Path:
  state = {k: np.asarray(v) for k, v in read_safetensors(folder / 'model.safetensors').items()}
  edit(state)
  write_safetensors(out / 'model.safetensors', state)
  (out / 'config.json').write_text((folder / 'config.json').read_text())
  return out


def test_strictness_names_the_key(vision_folder, tmp_path):
  _, folder = vision_folder
  folder = Path(folder)
  key = 'vision_model.encoder.layers.1.mlp.fc1.weight'

  missing = _rewrite(folder, tmp_path / 'missing', lambda s: s.pop(key))
  with pytest.raises(ConversionError, match=f'missing 1 tensor.*{key}'):
    load_image_encoder(missing)

  extra = 'vision_model.encoder.layers.2.mlp.fc1.weight'
  unexpected = _rewrite(folder, tmp_path / 'unexpected', lambda s: s.update({extra: s[key]}))
  with pytest.raises(ConversionError, match=f'unexpected 1 tensor.*{extra}'):
    load_image_encoder(unexpected)

  def transpose(state):
    state[key] = np.ascontiguousarray(state[key].T)
  bad_shape = _rewrite(folder, tmp_path / 'shape', transpose)
  with pytest.raises(ConversionError, match=f"{key}.* in {bad_shape / 'model.safetensors'} has shape"):
    load_image_encoder(bad_shape)


def test_text_strictness_and_wrong_config(text_folder, tmp_path):
  _, folder = text_folder
  folder = Path(folder)
  key = 'final_layer_norm.weight'  # transformers >= 5 writes the unprefixed layout
  with pytest.raises(ConversionError, match=key):
    load_text_encoder(_rewrite(folder, tmp_path / 'missing', lambda s: s.pop(key)))
  # A vision config.json with text weights is a config error that names the file.
  wrong = _rewrite(folder, tmp_path / 'wrong', lambda s: None)
  (wrong / 'config.json').write_text(json.dumps(CLIPVisionConfig.tiny().to_transformers()))
  with pytest.raises(ConfigError, match='config.json.*clip_vision_model'):
    load_text_encoder(wrong)


# ----------------------------------------------------------------------------- configs (torch-free)
def test_config_from_full_clip_config():
  full = {'model_type': 'clip', 'projection_dim': 768,
          'text_config': {'hidden_size': 768, 'hidden_act': 'quick_gelu', 'eos_token_id': 2, 'projection_dim': 512},
          'text_config_dict': {'hidden_size': 1024, 'intermediate_size': 4096},  # legacy, takes precedence
          'vision_config': {'hidden_size': 1024, 'patch_size': 14, 'image_size': 224, 'projection_dim': 512,
                            'num_attention_heads': 16, 'layer_norm_eps': None}}
  text = CLIPTextConfig.from_transformers(full)
  assert (text.hidden_size, text.intermediate_size, text.eos_token_id) == (1024, 4096, 2)
  vision = CLIPVisionConfig.from_transformers(full)
  assert (vision.hidden_size, vision.patch_size, vision.projection_dim) == (1024, 14, 768)
  assert vision.layer_norm_eps == 1e-5 and vision.num_positions == 257
  assert CLIPVisionConfig.from_transformers(vision.to_transformers()) == vision
  assert CLIPTextConfig.from_transformers(text.to_transformers()) == text
  assert CLIPVisionConfig(image_size=[224, 224]).image_size == 224


@pytest.mark.parametrize('bad, match', [
    (dict(hidden_act='relu'), 'hidden_act'),
    (dict(hidden_size=30), 'multiple of num_attention_heads'),
])
def test_config_errors(bad, match):
  with pytest.raises(ConfigError, match=match):
    CLIPTextConfig.tiny(**bad)
  with pytest.raises(ConfigError, match='model_type'):
    CLIPTextConfig.from_transformers({'model_type': 'clip_vision_model'})


def test_params_carry_logical_axes():
  text = abstract_params(CLIPTextTransformer(CLIPTextConfig.tiny()))
  vision = abstract_params(CLIPVisionTransformer(CLIPVisionConfig.tiny(), with_projection=True))
  for tree in (text, vision):
    boxed = traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
    for path, leaf in boxed.items():
      assert isinstance(leaf, nn.Partitioned), path
      assert len(leaf.names) == leaf.value.ndim, (path, leaf.names)
  assert text['embeddings']['token_embedding']['embedding'].names == ('vocab', 'embed')
  assert text['embeddings']['position_embedding']['embedding'].names == ('position', 'embed')
  assert vision['embeddings']['position_embedding']['embedding'].names == ('position', 'embed')
  assert vision['embeddings']['class_embedding'].names == ('embed',)
  # Every width of the tiny configs is even, so it shards over 2 devices (not the 77 / 17 position
  # rows nor the 3 RGB input channels of the patch conv, which are what they are in the real models).
  for tree in (text, vision):
    for path, leaf in traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)).items():
      widths = [d for d, name in zip(leaf.value.shape, leaf.names) if name not in ('position', 'conv_in')]
      assert all(d % 2 == 0 for d in widths), path


# ----------------------------------------------------------------------------- preprocessing
def test_clip_preprocess_shapes_and_constants():
  gray = jnp.full((2, 40, 64, 3), 0.5)
  out = jax.jit(clip_preprocess, static_argnums=1)(gray, 32)
  assert out.shape == (2, 32, 32, 3)
  expected = (0.5 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(expected, out.shape), atol=1e-5)
  with pytest.raises(InputError):
    clip_preprocess(jnp.zeros((2, 3, 32, 32)), 32)


@pytest.mark.parametrize('height, width', [(96, 128), (150, 100), (20, 24)])
def test_clip_preprocess_matches_transformers_pil(height, width):
  pytest.importorskip('PIL')
  pytest.importorskip('torch')
  image_processing = pytest.importorskip('transformers.models.clip.image_processing_pil_clip')
  processor = image_processing.CLIPImageProcessorPil(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
  rng = np.random.default_rng(0)
  # A smooth image plus noise, in 8-bit steps (what the PIL processor works on).
  yy, xx = np.mgrid[0:height, 0:width]
  smooth = 0.5 + 0.4 * np.sin(xx[..., None] / 7.0 + np.arange(3)) * np.cos(yy[..., None] / 5.0)
  image = np.clip(np.round((smooth + 0.05 * rng.standard_normal(smooth.shape)) * 255), 0, 255).astype(np.uint8)
  theirs = processor(images=[image], return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
  ours = np.asarray(clip_preprocess(jnp.asarray(image[None] / 255.0), 32))[0]
  diff = np.abs(ours - theirs)
  print(f'clip_preprocess {height}x{width} vs PIL: max {diff.max():.3f}, mean {diff.mean():.4f}')
  # One 8-bit level is 1/255/std ~ 0.015 after normalization; PIL rounds the resized image to 8 bits.
  assert diff.mean() < 0.01 and diff.max() < 0.03
