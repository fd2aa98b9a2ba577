"""Stable Diffusion XL (issue 20): a tiny SDXL-shaped pipeline against diffusers' `StableDiffusionXLPipeline`.

Our random tiny SDXL (text_time U-Net, ViT-L-style + bigG-style text encoders, the second one with its
projection and a '!'-padding tokenizer) is saved in diffusers' layout and loaded by diffusers; the whole
text conditioning (`encode_prompt`: both tokenizers, penultimate states side by side, the pooled
projection) and the U-Net's output with the size/crop ids must match. Skips without torch/diffusers,
except the torch-free checks.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from e4t_jax.convert.pipeline import (StableDiffusion, init_stable_diffusion, load_stable_diffusion,
                                      save_stable_diffusion)
from e4t_jax.e4t import prompts
from e4t_jax.errors import ConfigError, ConversionError
from e4t_jax.models.clip import CLIPTextConfig
from e4t_jax.models.tokenizer import CLIPTokenizer
from e4t_jax.models.unet import UNetConfig, sdxl_time_ids
from e4t_jax.models.vae import VAEConfig

TOLERANCE = 1e-4
NOISE = 0.05
PROMPT = 'a photo of a cat on the beach!'  # the '!' is the second tokenizer's pad token
TIMESTEP = 321
TIME_WIDTH, POOLED = 8, 24

UNET = UNetConfig(  # SDXL base's layout in miniature
    sample_size=16, block_out_channels=(32, 64), down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), layers_per_block=1, transformer_layers_per_block=(1, 2),
    norm_num_groups=8, cross_attention_dim=32 + 48, attention_head_dim=(2, 4), use_linear_projection=True,
    addition_embed_type='text_time', addition_time_embed_dim=TIME_WIDTH,
    projection_class_embeddings_input_dim=6 * TIME_WIDTH + POOLED)
TEXT = CLIPTextConfig.tiny()  # width 32, quick_gelu (OpenAI ViT-L style)
TEXT_2 = CLIPTextConfig.tiny(hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act='gelu',
                             projection_dim=POOLED, num_hidden_layers=3)  # OpenCLIP bigG style


def _assert_same_params(ours, theirs) -> None:
  """The same leaves at the same paths, bit for bit."""
  flat = lambda tree: traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))
  ours, theirs = flat(ours), flat(theirs)
  assert ours.keys() == theirs.keys()
  for path in ours:
    np.testing.assert_array_equal(ours[path], theirs[path], err_msg=str(path))


@pytest.fixture(scope='module')
def sdxl() -> StableDiffusion:
  sd = init_stable_diffusion(jax.random.key(0), UNET, VAEConfig.tiny(), TEXT, text_config_2=TEXT_2)
  rng = np.random.default_rng(0)  # noise everywhere: zero biases and unit norms would hide a misnamed tensor
  params = jax.tree.map(lambda x: (np.asarray(x) + NOISE * rng.standard_normal(x.shape)).astype(np.float32),
                        sd.params)
  return dataclasses.replace(sd, params=params)


@pytest.fixture(scope='module')
def saved(sdxl, tmp_path_factory):
  return save_stable_diffusion(tmp_path_factory.mktemp('sdxl') / 'tiny-sdxl', sdxl)


def test_load_gives_back_the_saved_pipeline(sdxl, saved):
  loaded = load_stable_diffusion(saved)
  assert loaded.is_xl and loaded.text_encoder_2.with_projection
  assert loaded.tokenizer_2.special_tokens['pad_token'] == '!' and loaded.tokenizer.special_tokens['pad_token'] != '!'
  assert set(loaded.params) == {'unet', 'vae', 'text_encoder', 'text_encoder_2'}
  _assert_same_params(loaded.params, sdxl.params)


def test_parts_that_do_not_fit_are_named(saved, tmp_path):
  with pytest.raises(ConfigError, match='do not add up to the U-Net cross_attention_dim'):
    init_stable_diffusion(jax.random.key(0), UNET, VAEConfig.tiny(), TEXT, text_config_2=TEXT_2.__class__(
        **{**dataclasses.asdict(TEXT_2), 'hidden_size': 64, 'intermediate_size': 128}))
  with pytest.raises(ConfigError, match='no second text encoder'):
    init_stable_diffusion(jax.random.key(0), UNET, VAEConfig.tiny(), TEXT)
  import shutil
  broken = shutil.copytree(saved, tmp_path / 'broken')
  shutil.rmtree(broken / 'tokenizer_2')
  with pytest.raises(ConversionError, match='text_encoder_2/ but no tokenizer_2/'):
    load_stable_diffusion(broken)


def test_text_conditioning_and_unet_match_the_diffusers_sdxl_pipeline(sdxl, saved):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(saved)
  assert pipe.tokenizer_2.pad_token == '!'
  ids = (sdxl.tokenizer([PROMPT]), sdxl.tokenizer_2([PROMPT]))
  for ours, tokenizer in zip(ids, (pipe.tokenizer, pipe.tokenizer_2)):
    theirs = tokenizer(PROMPT, padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors='np').input_ids
    np.testing.assert_array_equal(ours, theirs)
  assert not np.array_equal(ids[0], ids[1])  # the pads differ

  encode = jax.jit(lambda p1, p2, i1, i2: prompts.encode_prompt_xl(
      (sdxl.text_encoder, sdxl.text_encoder_2), (p1, p2), (i1, i2)))
  states, pooled = encode(sdxl.params['text_encoder'], sdxl.params['text_encoder_2'], *map(jnp.asarray, ids))
  with torch.no_grad():
    their_states, _, their_pooled, _ = pipe.encode_prompt(PROMPT, device='cpu', do_classifier_free_guidance=False)
  assert states.shape == (1, 77, 32 + 48) and pooled.shape == (1, POOLED)
  np.testing.assert_allclose(np.asarray(states), their_states.numpy(), rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(np.asarray(pooled), their_pooled.numpy(), rtol=0, atol=TOLERANCE)

  size, crop = (128, 96), (8, 4)
  time_ids = sdxl_time_ids(size, crop, (128, 128))
  their_time_ids = pipe._get_add_time_ids(size, crop, (128, 128), torch.float32,  # pylint: disable=protected-access
                                          text_encoder_projection_dim=POOLED)
  np.testing.assert_array_equal(np.asarray(time_ids), their_time_ids.numpy())
  latents = np.random.default_rng(1).standard_normal((1, 16, 16, 4)).astype(np.float32)
  noise = jax.jit(lambda p, x, c, t, i: sdxl.unet.apply({'params': p}, x, TIMESTEP, c,
                                                         added_cond_kwargs={'text_embeds': t, 'time_ids': i}))(
      sdxl.params['unet'], jnp.asarray(latents), states, pooled, time_ids)
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), TIMESTEP, encoder_hidden_states=their_states,
                       added_cond_kwargs={'text_embeds': their_pooled, 'time_ids': their_time_ids}).sample
  diff = float(np.abs(np.asarray(noise).transpose(0, 3, 1, 2) - theirs.numpy()).max())
  print(f'SDXL U-Net: max abs diff {diff:.2e} (output scale {float(theirs.abs().max()):.2f})')
  assert diff <= TOLERANCE


# ----------------------------------------------------------------------------- E4T on two text encoders
@pytest.fixture(scope='module')
def tiny_xl():
  from e4t_jax.e4t import model as model_lib
  return model_lib.init_tiny(jax.random.key(1), unet=UNET, text=TEXT, text_2=TEXT_2)


def test_an_e4t_pretraining_step_trains_the_placeholder_in_both_encoders(tiny_xl):
  from e4t_jax.e4t import prompts as prompts_lib
  from e4t_jax.models.unet import SDXLContext
  from e4t_jax.train import step as step_lib
  m = tiny_xl.modules
  assert prompts_lib.embedding_widths(m) == (32, 48) and m.encoder.out_dim == 80
  texts = ['a photo of *', 'a painting of * smiling']
  ids = jnp.asarray(m.tokenize(texts))
  # the second tokenizer's ids, derived from the first's, are what it gives itself (it pads with '!')
  tokenizer_2 = CLIPTokenizer.default().with_pad_token('!').with_placeholder(m.config.placeholder)[0]
  np.testing.assert_array_equal(np.asarray(prompts_lib.second_tokenizer_ids(m, ids)), tokenizer_2(texts))
  context = prompts_lib.text_condition(m, tiny_xl.params, ids)
  assert isinstance(context, SDXLContext) and context.states.shape == (2, 77, 80)
  assert context.text_embeds.shape == (2, POOLED)
  np.testing.assert_array_equal(np.asarray(context.time_ids[0]), [m.image_size, m.image_size, 0, 0] + [m.image_size] * 2)

  optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-3, weight_decay=0.0))
  state, frozen = step_lib.create_train_state(tiny_xl, optimizer)
  assert 'text_encoder_2' in frozen
  size = m.image_size
  batch = {'images': jax.random.uniform(jax.random.key(2), (2, size, size, 3), minval=-1, maxval=1), 'input_ids': ids}
  new_state, metrics = jax.jit(step_lib.make_train_step(m, optimizer))(state, frozen, batch, jax.random.key(3))
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  # the zero-initialized output layer gets a gradient for both encoders' parts of w* on the first step
  moved = np.abs(np.asarray(new_state.trainable['encoder']['out']['kernel'])).max(axis=0)  # per output unit
  assert moved[:32].max() > 0 and moved[32:].max() > 0


@pytest.fixture(scope='module')
def xl_personalize_fn(tiny_xl):
  from e4t_jax import personalize as personalize_lib
  return personalize_lib.make_personalize_fn(tiny_xl, num_steps=2,
                                             tuning=personalize_lib.TuningConfig(learning_rate=1e-2))


def test_compile_once_personalization_on_a_tiny_sdxl(tiny_xl, xl_personalize_fn, random_image, compile_counter):
  fn = xl_personalize_fn
  with compile_counter as counter:
    concepts = [fn(tiny_xl.params, random_image(i), jax.random.key(i)) for i in range(5)]
  assert counter.count == 0, f'{counter.count} compilations for 5 concepts'
  assert all(c.embedding.shape == (80,) for c in concepts)  # w*: 32 (ViT-L part) + 48 (bigG part)
  assert len({np.asarray(c.embedding).tobytes() for c in concepts}) == 5


def test_sdxl_generation_zeroes_empty_negatives_and_takes_the_size_conditioning_as_an_argument(
    tiny_xl, tiny_e4t, xl_personalize_fn, random_image, compile_counter):
  from e4t_jax import generation
  from e4t_jax.e4t import prompts as prompts_lib
  from e4t_jax.errors import InputError
  m = tiny_xl.modules
  ids = jnp.asarray(m.tokenize(['', 'a photo of a face']))
  context = prompts_lib.zero_empty_negatives(m, prompts_lib.text_condition(m, tiny_xl.params, ids), ids)
  assert not np.any(np.asarray(context.states[0])) and not np.any(np.asarray(context.text_embeds[0]))
  assert np.all(np.asarray(context.states[1]).any(axis=-1)) and np.asarray(context.time_ids[0]).any()
  # a concept's w* in both encoders, one program for every call below
  concept = xl_personalize_fn(tiny_xl.params, random_image(0), jax.random.key(0))
  prompts = ['a photo of *', 'a painting of *']
  plain = generation.generate(tiny_xl, concept, prompts, num_steps=2, guidance_scale=3.0, seed=[0, 1])
  assert plain.shape == (2, m.image_size, m.image_size, 3) and plain.dtype == np.uint8
  assert not np.array_equal(plain[0], plain[1])
  with compile_counter as counter:
    cropped = generation.generate(tiny_xl, concept, prompts, num_steps=2, guidance_scale=3.0, seed=[0, 1],
                                  original_size=(2048, 1536), crops_coords_top_left=(128, 64))
  assert counter.count == 0  # the six values are an argument of the one program
  assert not np.array_equal(plain, cropped)
  with pytest.raises(InputError, match='crops_coords_top_left must be two integers'):
    generation.generate(tiny_xl, None, ['a face'], num_steps=2, crops_coords_top_left=(1.5, 0))
  with pytest.raises(InputError, match="SDXL's size conditioning; this model is Stable Diffusion 1.x/2.x"):
    generation.generate(tiny_e4t, None, ['a face'], num_steps=2, original_size=(512, 512))


def test_an_exported_sdxl_concept_loads_in_diffusers_and_matches_ours(tiny_xl, xl_personalize_fn, random_image,
                                                                      tmp_path):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  from safetensors.torch import load_file
  import lora_by_hand
  from e4t_jax.e4t import export as export_lib
  from e4t_jax.e4t import offsets as offsets_lib
  from e4t_jax.e4t import prompts as prompts_lib
  m = tiny_xl.modules
  concept = xl_personalize_fn(tiny_xl.params, random_image(7), jax.random.key(7))
  # the base model without the placeholder (diffusers adds the exported token to both tokenizers itself)
  base = StableDiffusion(m.unet, m.vae, m.text_encoder, CLIPTokenizer.default(), dict(m.scheduler_config),
                         {name: tiny_xl.params[name] for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2')},
                         text_encoder_2=m.text_encoder_2, tokenizer_2=CLIPTokenizer.default().with_pad_token('!'))
  root = save_stable_diffusion(tmp_path / 'sdxl', base)
  exported = export_lib.export_concept_to_diffusers(concept, tiny_xl, tmp_path / 'concept')
  state = load_file(str(exported.embedding))
  assert {k: tuple(v.shape) for k, v in state.items()} == {'clip_l': (1, 32), 'clip_g': (1, 48)}
  assert 'text_encoder=pipe.text_encoder_2' in exported.readme.read_text()

  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(root)
  token = exported.token
  pipe.load_textual_inversion(state['clip_l'], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
  pipe.load_textual_inversion(state['clip_g'], token=token, text_encoder=pipe.text_encoder_2,
                              tokenizer=pipe.tokenizer_2)
  with torch.no_grad():
    their_states, _, their_pooled, _ = pipe.encode_prompt(f'a photo of {token} smiling', device='cpu',
                                                          do_classifier_free_guidance=False)
  ids = jnp.asarray(m.tokenize(['a photo of * smiling']))
  ours = jax.jit(lambda p, i, w: prompts_lib.text_condition(m, p, i, w))(
      prompts_lib.text_params_of(tiny_xl.params), ids, jnp.asarray(concept.embedding)[None])
  np.testing.assert_allclose(np.asarray(ours.states), their_states.numpy(), rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(np.asarray(ours.text_embeds), their_pooled.numpy(), rtol=0, atol=TOLERANCE)

  lora, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(exported.lora.parent),
                                                               weight_name=exported.lora.name)
  lora_by_hand.load_lora(torch, pipe, lora, str(exported.lora.parent), exported.lora.name)
  latents = np.random.default_rng(2).standard_normal((1, 16, 16, 4)).astype(np.float32)
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), 500, encoder_hidden_states=their_states,
                       added_cond_kwargs={'text_embeds': their_pooled,
                                          'time_ids': torch.from_numpy(np.asarray(ours.time_ids))}).sample
  unet_apply = jax.jit(lambda params: m.unet.apply({'params': params}, latents, np.array([500]), ours))
  tuned = np.asarray(unet_apply(offsets_lib.merge_offsets(tiny_xl.params['unet'], concept.weight_offsets)))
  plain = np.asarray(unet_apply(tiny_xl.params['unet']))
  error = float(np.abs(tuned.transpose(0, 3, 1, 2) - theirs.numpy()).max())
  assert np.abs(plain - tuned).max() > 10 * max(error, 1e-6)  # the LoRA matters at this tolerance
  assert error <= TOLERANCE, error


def test_an_sdxl_e4t_model_saves_and_loads(tiny_xl, tmp_path):
  from e4t_jax.e4t import io as model_io
  model_io.save_model(tiny_xl, tmp_path / 'model')
  assert (tmp_path / 'model' / 'base' / 'text_encoder_2').is_dir()
  loaded = model_io.load_model(tmp_path / 'model')
  m = loaded.modules
  assert m.text_encoder_2 is not None and m.pad_id_2 == 0 and m.encoder.out_dim == 80
  _assert_same_params(loaded.params, tiny_xl.params)


def test_textual_inversion_baseline_on_a_tiny_sdxl_tunes_both_parts(tiny_xl, random_image):
  from e4t_jax.e4t import prompts as prompts_lib
  from e4t_jax.lab import baselines
  concept = baselines.make_textual_inversion_fn(tiny_xl, num_steps=2)(tiny_xl.params, random_image(3))
  coarse = np.asarray(prompts_lib.coarse_embedding(tiny_xl.modules, tiny_xl.params))
  moved = np.abs(np.asarray(concept.embedding) - coarse)
  assert concept.embedding.shape == (80,) and moved[:32].max() > 0 and moved[32:].max() > 0
