"""The textual inversion and DreamBooth baselines on the session's tiny random E4T model.

Two tuning programs are compiled (one per method, 30 steps at large learning rates so that the tiny
model visibly overfits the one image), plus the fixed-noise evaluation and one generation program.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from e4t_jax.lab import baselines
from e4t_jax import generation as generate_lib
from e4t_jax.errors import CheckpointError, InputError
from e4t_jax.e4t.concept import Concept, model_fingerprint

STEPS = 30


def _image(seed: int, size: int = 40) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size, size + seed, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def tiny(tiny_e4t):
  return tiny_e4t


@pytest.fixture(scope='module')
def coarse(tiny):
  table = tiny.params['text_encoder']['embeddings']['token_embedding']['embedding']
  return np.asarray(table[tiny.modules.coarse_token_id], np.float32)


@pytest.fixture(scope='module')
def ti_fn(tiny):
  return baselines.make_textual_inversion_fn(
      tiny, STEPS, config=baselines.TextualInversionConfig(learning_rate=5e-2))


@pytest.fixture(scope='module')
def ti_concept(tiny, ti_fn):
  return ti_fn(tiny.params, _image(0), jax.random.key(0))


@pytest.fixture(scope='module')
def db_fn(tiny):
  return baselines.make_dreambooth_fn(tiny, STEPS, config=baselines.DreamBoothConfig(learning_rate=1e-3))


@pytest.fixture(scope='module')
def db_result(tiny, db_fn):
  return db_fn(tiny.params, _image(0), jax.random.key(0))


def _all_zero(tree) -> bool:
  return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- textual inversion
def test_textual_inversion_learns_only_the_embedding(tiny, ti_concept, coarse):
  assert isinstance(ti_concept, Concept)
  assert jax.tree.structure(ti_concept.weight_offsets) == jax.tree.structure(tiny.params['weight_offsets'])
  for got, want in zip(jax.tree.leaves(ti_concept.weight_offsets), jax.tree.leaves(tiny.params['weight_offsets'])):
    assert np.shape(got) == np.shape(want)
  assert _all_zero(ti_concept.weight_offsets)
  assert np.shape(ti_concept.embedding) == coarse.shape
  assert np.linalg.norm(np.asarray(ti_concept.embedding) - coarse) > 0.1
  trace = np.asarray(ti_concept.loss_trace)
  assert trace.shape == (STEPS,) and np.isfinite(trace).all() and int(ti_concept.steps) == STEPS
  info = ti_concept.info
  assert info['method'] == 'textual_inversion' and info['steps'] == str(STEPS)
  assert float(info['learning_rate']) == 5e-2 and info['prompt'] == 'a photo of *'
  assert info['base_fingerprint'] == model_fingerprint(tiny)


def test_textual_inversion_lowers_the_loss_at_fixed_noise(tiny, ti_concept, coarse):
  before = baselines.fixed_noise_loss(tiny, _image(0), coarse)
  after = baselines.fixed_noise_loss(tiny, _image(0), ti_concept)
  assert after < before - 0.02, (before, after)


def test_new_images_keys_steps_and_captions_do_not_recompile(tiny, ti_fn, ti_concept, compile_counter):
  with compile_counter as counter:
    other = ti_fn(tiny.params, _image(1), jax.random.key(1), num_steps=3, prompt='a painting of {}')
  assert counter.count == 0, f'{counter.count} compilations'
  assert not np.array_equal(np.asarray(other.embedding), np.asarray(ti_concept.embedding))
  trace = np.asarray(other.loss_trace)
  assert int(other.steps) == 3 and np.isfinite(trace[:3]).all() and np.isnan(trace[3:]).all()
  assert other.info['prompt'] == 'a painting of *' and other.info['steps'] == '3'


def test_bad_steps_captions_and_non_finite_losses_are_clear_errors(tiny, ti_fn):
  with pytest.raises(InputError, match=f'at most {STEPS}'):
    ti_fn(tiny.params, _image(0), num_steps=STEPS + 1)
  with pytest.raises(InputError, match='no placeholder'):
    ti_fn(tiny.params, _image(0), prompt='a photo of a face')
  with pytest.raises(InputError, match='one tuning caption'):
    ti_fn(tiny.params, _image(0), prompt=['a photo of {}', 'a painting of {}'])  # batch_size is 1
  params = dict(tiny.params)
  unet = dict(params['unet'])
  unet['conv_in'] = dict(unet['conv_in'], bias=np.full(np.shape(unet['conv_in']['bias']), np.nan, np.float32))
  params['unet'] = unet
  with pytest.raises(InputError, match='non-finite'):
    ti_fn(params, _image(0), num_steps=2)


# ----------------------------------------------------------------------------- DreamBooth
def test_dreambooth_tunes_the_unet_and_lowers_the_loss(tiny, db_result, coarse):
  unet, concept = db_result
  before, after = jax.tree.leaves(tiny.params['unet']), jax.tree.leaves(unet)
  assert [np.shape(x) for x in before] == [np.shape(x) for x in after]
  assert sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after)) > len(before) // 2
  assert _all_zero(concept.weight_offsets) and not np.allclose(np.asarray(concept.embedding), coarse)
  tuned = baselines.model_with_unet(tiny, unet)
  assert tuned.modules is tiny.modules and tuned.params['vae'] is tiny.params['vae']
  loss_before = baselines.fixed_noise_loss(tiny, _image(0), coarse)
  loss_after = baselines.fixed_noise_loss(tuned, _image(0), concept)
  assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
  info = concept.info
  assert info['method'] == 'dreambooth' and info['source_fingerprint'] == model_fingerprint(tiny)
  assert info['base_fingerprint'] == model_fingerprint(tuned) != model_fingerprint(tiny)


def test_dreambooth_second_image_does_not_recompile(tiny, db_fn, db_result, compile_counter):
  with compile_counter as counter:
    unet, concept = db_fn(tiny.params, _image(2), jax.random.key(3), num_steps=2)
  assert counter.count == 0, f'{counter.count} compilations'
  assert int(concept.steps) == 2
  first = jax.tree.leaves(db_result[0])[0]
  assert not np.array_equal(np.asarray(jax.tree.leaves(unet)[0]), np.asarray(first))


def test_model_with_unet_rejects_another_architecture(tiny):
  with pytest.raises(CheckpointError, match='do not fit'):
    baselines.model_with_unet(tiny, {'conv_in': tiny.params['unet']['conv_in']})


# ----------------------------------------------------------------------------- generation and size
def test_baseline_concepts_render_with_generate(tiny, ti_concept, db_result):
  size = tiny.modules.image_size
  images = generate_lib.generate(tiny, ti_concept, ['a photo of *'], num_steps=2, seed=0)
  assert images.shape == (1, size, size, 3) and images.dtype == np.uint8
  unet, concept = db_result
  tuned_images = generate_lib.generate(baselines.model_with_unet(tiny, unet), concept, ['a photo of *'],
                                       num_steps=2, seed=0)
  assert tuned_images.shape == (1, size, size, 3) and tuned_images.dtype == np.uint8
  assert not np.array_equal(images, tuned_images)
  with pytest.raises(CheckpointError, match='base model'):  # the DreamBooth concept needs its U-Net
    generate_lib.generate(tiny, concept, ['a photo of *'], num_steps=2, seed=0)


def test_concept_save_load_keeps_the_method(ti_concept, tmp_path):
  loaded = Concept.load(ti_concept.save(tmp_path / 'ti.e4t.safetensors'))
  np.testing.assert_array_equal(loaded.embedding, ti_concept.embedding)
  assert loaded.info['method'] == 'textual_inversion'


def test_concept_bytes(tiny):
  width = tiny.modules.text_encoder.config.hidden_size
  count = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))
  assert baselines.concept_bytes('textual_inversion', tiny) == 4 * width
  assert baselines.concept_bytes('e4t', tiny) == 4 * (width + count(tiny.params['weight_offsets']))
  assert baselines.concept_bytes('dreambooth', tiny) == 4 * (width + count(tiny.params['unet']))
  # The tiny model: width 32, 5,248 offset weights, 1,106,212 U-Net weights.
  assert baselines.concept_bytes('dreambooth', tiny) == 4 * (32 + 1_106_212)
  assert baselines.concept_bytes('e4t', tiny) == 4 * (32 + 5_248)
  with pytest.raises(InputError, match='not one of'):
    baselines.concept_bytes('lora', tiny)
