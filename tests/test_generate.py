"""Generation (compile-once sampling with concepts), image files, and the diffusers export.

Uses the session's tiny random E4T model and hand-made concepts with random w* and random (non-zero)
weight offsets, so that both the embedding and the offsets visibly change the output. Two sampling
programs are compiled here: one concept group of 2 prompts (most tests) and 3 groups of 1.

The export test saves the tiny Stable Diffusion part as a diffusers folder, loads it with
`StableDiffusionPipeline` (skipped without torch/diffusers), loads the exported embedding with
`load_textual_inversion`, and the exported LoRA with `load_lora_weights` when peft is installed, else
by applying lora_B @ lora_A to the torch weights by hand (the file itself is parsed by diffusers'
own `lora_state_dict` either way).
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from e4t_jax import generation as generate_lib
from e4t_jax.e4t import export as export_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.prompts import encode_prompt
from e4t_jax.e4t.concept import Concept, fingerprint_info
from e4t_jax.errors import CheckpointError, InputError

STEPS = 2
PROMPTS = ['a photo of *', 'a painting of * in a hat']


def _random_concept(model, seed: int, mode: str = 'additive') -> Concept:
  rng = np.random.default_rng(seed)
  offsets = {path: {'down': rng.normal(0, 0.3, np.shape(pair['down'])).astype(np.float32),
                    'up': rng.normal(0, 0.3, np.shape(pair['up'])).astype(np.float32)}
             for path, pair in model.params['weight_offsets'].items()}
  width = model.modules.text_encoder.config.hidden_size
  metadata = {'placeholder': model.config.placeholder, 'offsets_mode': mode,
              **fingerprint_info(model)}
  return Concept(embedding=rng.normal(0, 1, (width,)).astype(np.float32), weight_offsets=offsets,
                 loss_trace=np.zeros((1,), np.float32), steps=np.int32(1), metadata=tuple(sorted(metadata.items())))


@pytest.fixture(scope='module')
def tiny(tiny_e4t):
  return tiny_e4t


@pytest.fixture(scope='module')
def concept(tiny):
  return _random_concept(tiny, 1)


@pytest.fixture(scope='module')
def other_concept(tiny):
  return _random_concept(tiny, 2)


@pytest.fixture(scope='module')
def first_images(tiny, concept):
  return generate_lib.generate(tiny, concept, PROMPTS, num_steps=STEPS, seed=0)


# ----------------------------------------------------------------------------- generation
def test_images_are_uint8_at_the_model_resolution(tiny, first_images):
  size = tiny.modules.image_size
  assert first_images.shape == (2, size, size, 3) and first_images.dtype == np.uint8
  assert first_images.std() > 1  # not a blank canvas
  assert not np.array_equal(first_images[0], first_images[1])


def test_same_seed_same_images_and_other_seed_other_images(tiny, concept, first_images):
  again = generate_lib.generate(tiny, concept, PROMPTS, num_steps=STEPS, seed=0)
  np.testing.assert_array_equal(again, first_images)
  other = generate_lib.generate(tiny, concept, PROMPTS, num_steps=STEPS, seed=7)
  assert not np.array_equal(other, first_images)


def test_new_prompts_seeds_guidance_and_concepts_do_not_recompile(tiny, concept, other_concept, first_images,
                                                                   compile_counter):
  with compile_counter as counter:
    a = generate_lib.generate(tiny, concept, ['a photo of * at the beach', 'a drawing of *'], num_steps=STEPS, seed=3)
    b = generate_lib.generate(tiny, concept, ['a photo of * at the beach', 'a drawing of *'], num_steps=STEPS, seed=3,
                              guidance_scale=np.float32(2.0), negative_prompts='blurry')
    c = generate_lib.generate(tiny, other_concept, PROMPTS, num_steps=STEPS, seed=0, guidance_scale=1.0)
  assert counter.count == 0, f'{counter.count} compilations for new prompts / seeds / guidance / concept'
  assert not np.array_equal(a, b) and not np.array_equal(c, first_images)


def test_the_concept_changes_the_image(tiny, concept, first_images):
  plain = generate_lib.generate(tiny, None, ['a photo of a face', 'a painting of a face in a hat'],
                                num_steps=STEPS, seed=0)
  assert not np.array_equal(plain, first_images)


def test_image_depends_only_on_its_prompt_seed_and_concept(tiny, concept):
  batch = generate_lib.generate(tiny, concept, PROMPTS, num_steps=STEPS, seed=10)
  alone = generate_lib.generate(tiny, concept, [PROMPTS[1], PROMPTS[1]], num_steps=STEPS, seed=[11, 11])
  assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1


def test_several_concepts_in_one_batch(tiny, concept, other_concept):
  prompts = ['a photo of *', 'a sketch of *', 'a photo of a face']
  mixed = generate_lib.generate(tiny, [concept, other_concept, None], prompts, num_steps=STEPS, seed=20)
  assert mixed.shape[0] == 3
  # Each image equals the same prompt/seed/concept generated alone (the 2-prompt program, no recompile).
  for i, c in enumerate([concept, other_concept, None]):
    alone = generate_lib.generate(tiny, c, [prompts[i]] * 2, num_steps=STEPS, seed=[20 + i] * 2)
    assert np.abs(mixed[i].astype(int) - alone[0].astype(int)).max() <= 1, f'image {i}'


def test_prompt_warnings(tiny, concept):
  with pytest.warns(generate_lib.GenerationWarning, match='no placeholder'):
    generate_lib.generate(tiny, concept, ['a photo of a dog', 'a photo of *'], num_steps=STEPS)
  generator = generate_lib.get_generator(tiny.modules)
  lines = generator.prompt_warnings(['a photo of * ' + 'very ' * 80 + 'long', 'a photo of *'], [concept, None])
  assert any('longer than' in line for line in lines)
  assert any('no concept' in line for line in lines)
  assert generator.prompt_warnings(['a photo of *'], [concept]) == []
  negative = generator.prompt_warnings(['a photo of *'], [concept], ['blurry ' * 100])
  assert len(negative) == 1 and negative[0].startswith('negative prompt 0')


def test_invalid_settings_raise_input_errors(tiny, concept):
  with pytest.raises(InputError, match='multiples'):
    generate_lib.generate(tiny, concept, PROMPTS, num_steps=STEPS, height=31)
  with pytest.raises(InputError, match='DDIM'):
    generate_lib.generate(tiny, concept, PROMPTS, num_steps=STEPS, eta=0.5)
  with pytest.raises(InputError, match='concepts for'):
    generate_lib.generate(tiny, [concept], PROMPTS, num_steps=STEPS)
  with pytest.raises(InputError, match='seed'):
    generate_lib.generate(tiny, concept, PROMPTS, num_steps=STEPS, seed=-1)
  with pytest.raises(InputError, match='no prompts'):
    generate_lib.generate(tiny, concept, [], num_steps=STEPS)
  wrong = concept.replace(embedding=np.zeros((7,), np.float32))
  with pytest.raises(CheckpointError, match='embedding'):
    generate_lib.generate(tiny, wrong, PROMPTS, num_steps=STEPS)
  foreign = concept.replace(metadata=tuple(sorted(dict(concept.info, base_fingerprint='0' * 64).items())))
  with pytest.raises(CheckpointError, match='another model|personalize'):
    generate_lib.generate(tiny, foreign, PROMPTS, num_steps=STEPS)


# ----------------------------------------------------------------------------- files
def test_save_images_writes_pngs_with_metadata_sidecars_and_a_grid(tmp_path, first_images):
  from PIL import Image
  settings = {'seed': 0, 'num_steps': STEPS, 'sampler': 'dpmpp_2m', 'guidance_scale': 7.5}
  paths = generate_lib.save_images(first_images, tmp_path / 'out', PROMPTS, settings,
                                   negative_prompts=['', 'blurry'])
  assert len(paths) == 3 and paths[-1].name == 'grid.png'
  for i, path in enumerate(paths[:2]):
    with Image.open(path) as image:
      image.load()
      assert image.size == (first_images.shape[2], first_images.shape[1])
      np.testing.assert_array_equal(np.asarray(image.convert('RGB')), first_images[i])
      assert image.text['prompt'] == PROMPTS[i]
      assert image.text['seed'] == str(i)  # image i starts from seed + i
      assert json.loads(image.text['settings']) == settings
    sidecar = json.loads(path.with_suffix('.json').read_text())
    assert sidecar['prompt'] == PROMPTS[i] and sidecar['seed'] == i and sidecar['settings'] == settings
    assert sidecar['negative_prompt'] == ['', 'blurry'][i]
  with Image.open(paths[-1]) as grid:
    scale = -(-128 // first_images.shape[2])  # small images are enlarged to >= 128 px tiles
    assert grid.size[0] == 2 * scale * first_images.shape[2] and grid.size[1] > scale * first_images.shape[1]
  assert not [p for p in (tmp_path / 'out').iterdir() if p.name.endswith('.tmp')]


def test_make_grid_layout():
  images = np.zeros((5, 160, 240, 3), np.uint8)
  grid = generate_lib.make_grid(images, [f'label {i}' for i in range(5)], columns=3)
  assert grid.dtype == np.uint8 and grid.shape[1] == 3 * 240 and grid.shape[0] > 2 * 160
  assert (grid[160:, :240] < 255).any()  # some label ink under the first image
  assert generate_lib.make_grid(images, None, columns=5).shape == (160, 5 * 240, 3)


def test_make_grid_enlarges_tiny_images_by_an_integer_factor():
  images = np.arange(2 * 32 * 32 * 3, dtype=np.uint32).astype(np.uint8).reshape(2, 32, 32, 3)
  grid = generate_lib.make_grid(images, None, columns=2)
  assert grid.shape == (128, 256, 3)
  np.testing.assert_array_equal(grid[::4, :128:4], images[0])  # nearest neighbour, exact


# ----------------------------------------------------------------------------- export
def test_export_rejects_multiplicative_offsets_and_vocabulary_tokens(tiny, tmp_path):
  with pytest.raises(InputError, match='additive'):
    export_lib.export_concept_to_diffusers(_random_concept(tiny, 3, 'multiplicative'), tiny, tmp_path)
  with pytest.raises(InputError, match='vocabulary'):
    export_lib.export_concept_to_diffusers(_random_concept(tiny, 3), tiny, tmp_path, token='cat')


def test_lora_keys_follow_the_diffusers_names(tiny, concept):
  tensors = export_lib.lora_state_dict(concept, tiny.params['unet'])
  path = 'down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q'
  name = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
  np.testing.assert_array_equal(tensors[f'{name}.lora_A.weight'], concept.weight_offsets[path]['down'].T)
  np.testing.assert_array_equal(tensors[f'{name}.lora_B.weight'], concept.weight_offsets[path]['up'].T)
  assert len(tensors) == 2 * len(concept.weight_offsets)


def _conv_and_dense_concept(model, seed: int) -> Concept:
  """A paper-mode-like concept: SVD factors of random deltas on conv kernels and on Dense kernels."""
  from e4t_jax import personalize as personalize_lib
  rng = np.random.default_rng(seed)
  flat = {'/'.join(k[:-1]): v for k, v in traverse_util.flatten_dict(model.params['unet']).items() if k[-1] == 'kernel'}
  paths = ['conv_in', next(p for p in sorted(flat) if p.endswith('resnets_0/conv1')),
           sorted(model.params['weight_offsets'])[0]]
  tuned = traverse_util.flatten_dict(model.params['unet'])
  for path in paths:
    key = tuple(path.split('/')) + ('kernel',)
    tuned[key] = tuned[key] + 0.1 * rng.normal(size=tuned[key].shape).astype(np.float32)
  factors = personalize_lib.unet_delta_factors(model.params['unet'], traverse_util.unflatten_dict(tuned), {},
                                               'additive', paths, rank=3)
  base = _random_concept(model, seed)
  return Concept(embedding=base.embedding, weight_offsets=jax.device_get(factors), loss_trace=base.loss_trace,
                 steps=base.steps, metadata=base.metadata)


@pytest.mark.parametrize('kind', ['offsets', 'conv_and_dense_factors'])
def test_export_matches_diffusers_text_encoder_and_lora_unet(tiny, concept, tmp_path, kind):
  torch = pytest.importorskip('torch')
  if kind == 'conv_and_dense_factors':
    concept = _conv_and_dense_concept(tiny, 7)
  diffusers = pytest.importorskip('diffusers')
  from e4t_jax.convert.pipeline import SD1_SCHEDULER_CONFIG, StableDiffusion, save_stable_diffusion
  from e4t_jax.models.tokenizer import CLIPTokenizer
  import lora_by_hand

  m = tiny.modules
  # The base model without the placeholder: diffusers adds the exported token itself.
  sd = StableDiffusion(m.unet, m.vae, m.text_encoder, CLIPTokenizer.default(), dict(SD1_SCHEDULER_CONFIG),
                       {name: tiny.params[name] for name in ('unet', 'vae', 'text_encoder')})
  root = save_stable_diffusion(tmp_path / 'sd', sd)
  exported = export_lib.export_concept_to_diffusers(concept, tiny, tmp_path / 'concept')
  assert exported.token == export_lib.DEFAULT_EXPORT_TOKEN  # '*' is a CLIP vocabulary string
  assert 'load_lora_weights' in exported.readme.read_text()

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
  pipe.load_textual_inversion(str(exported.embedding), token=exported.token)

  # (i) The text encoder with the loaded token == ours with w* at the placeholder.
  ours_prompt, their_prompt = 'a photo of * smiling', f'a photo of {exported.token} smiling'
  their_ids = pipe.tokenizer([their_prompt], padding='max_length', max_length=77, return_tensors='pt').input_ids
  our_ids = m.tokenize([ours_prompt])
  np.testing.assert_array_equal(their_ids.numpy(), our_ids)  # the added token gets the placeholder's id
  with torch.no_grad():
    theirs = pipe.text_encoder(their_ids)[0].numpy()
  encode = jax.jit(lambda params, ids, w_star: encode_prompt(
      m.text_encoder, params, ids, placeholder_id=m.placeholder_id, placeholder_embedding=w_star,
      substitute_id=m.coarse_token_id))
  ours = np.array(encode(tiny.params['text_encoder'], our_ids, concept.embedding))
  text_error = float(np.abs(theirs - ours).max())
  assert text_error <= 1e-4, text_error

  # (ii) The U-Net with the LoRA == ours with the offsets merged.
  lora, _ = diffusers.StableDiffusionPipeline.lora_state_dict(str(exported.lora.parent),
                                                             weight_name=exported.lora.name)
  assert set(lora) == set(export_lib.lora_state_dict(concept, tiny.params['unet']))
  lora_by_hand.load_lora(torch, pipe, lora, str(exported.lora.parent), exported.lora.name)
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(1, 16, 16, 4)).astype(np.float32)
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), 500,
                       torch.from_numpy(ours)).sample.numpy().transpose(0, 2, 3, 1)
  unet_apply = jax.jit(lambda params: m.unet.apply({'params': params}, latents, np.array([500]), ours))
  ours_out = np.asarray(unet_apply(offsets_lib.merge_offsets(tiny.params['unet'], concept.weight_offsets)))
  plain = np.asarray(unet_apply(tiny.params['unet']))  # same shapes: no second compile
  unet_error = float(np.abs(theirs - ours_out).max())
  assert np.abs(plain - ours_out).max() > 100 * max(unet_error, 1e-6)  # the LoRA matters at this tolerance
  assert unet_error <= 1e-4, unet_error
  print(f'export parity: text encoder {text_error:.2e}, LoRA U-Net {unet_error:.2e}')
