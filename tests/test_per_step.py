"""The concept read at every denoising step (`generate(..., encoder='per_step')`, the paper's generation) and
personalization + sampling in one compiled program (`personalize_and_generate`), on the tiny random model."""
import warnings

import jax
import numpy as np
import pytest

import e4t_jax
from e4t_jax import generation
from e4t_jax import personalize as personalize_lib
from e4t_jax.errors import InputError

PROMPTS = ['a photo of *', 'a painting of *']
SAMPLING = dict(num_steps=2, seed=0)
# One fused program against two programs: XLA may order float operations differently, so renders may
# differ by rounding; at most this many uint8 levels, anywhere.
FUSED_TOLERANCE = 2



@pytest.fixture(scope='module')
def tiny(tiny_e4t):
  return tiny_e4t


@pytest.fixture(scope='module')
def tuning():
  return personalize_lib.TuningConfig(learning_rate=3e-2, keep_encoder=True)


@pytest.fixture(scope='module')
def personalize_fn(tiny, tuning):
  return personalize_lib.make_personalize_fn(tiny, num_steps=2, tuning=tuning)


def _quiet_generate(*args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', generation.GenerationWarning)
    return e4t_jax.generate(*args, **kwargs)


def test_per_step_with_an_untrained_encoder_equals_averaged(random_image, tiny, personalize_fn):
  concept = personalize_fn(tiny.params, random_image(0), num_steps=0)  # the zero-initialized output layer: f = 0
  assert concept.tuned_encoder is not None
  averaged = _quiet_generate(tiny, concept, PROMPTS, **SAMPLING)
  per_step = _quiet_generate(tiny, concept, PROMPTS, encoder='per_step', **SAMPLING)
  assert np.abs(averaged.astype(int) - per_step.astype(int)).max() <= 1


def test_per_step_with_a_tuned_encoder_reads_the_current_generation(random_image, tiny, personalize_fn):
  concept = personalize_fn(tiny.params, random_image(1), jax.random.key(3))
  averaged = _quiet_generate(tiny, concept, PROMPTS, **SAMPLING)
  per_step = _quiet_generate(tiny, concept, PROMPTS, encoder='per_step', **SAMPLING)
  assert np.abs(averaged.astype(int) - per_step.astype(int)).max() > 2  # w*(t) is not the average


def test_per_step_needs_the_tuned_encoder(random_image, tiny, personalize_fn, tmp_path):
  concept = personalize_fn(tiny.params, random_image(0))
  stored = e4t_jax.Concept.load(concept.save(tmp_path / 'c.e4t.safetensors'))
  assert stored.tuned_encoder is None  # never written
  with pytest.raises(InputError, match='per_step'):
    _quiet_generate(tiny, stored, PROMPTS, encoder='per_step', **SAMPLING)
  with pytest.raises(InputError, match='encoder'):
    _quiet_generate(tiny, concept, PROMPTS, encoder='sometimes', **SAMPLING)


@pytest.mark.parametrize('encoder', ['averaged', 'per_step'])
def test_personalize_and_generate_equals_personalize_then_generate(random_image, tiny, tuning, personalize_fn, encoder):
  key = jax.random.key(7)
  fused = e4t_jax.personalize_and_generate(tiny, random_image(2), PROMPTS, tuning=tuning, num_tuning_steps=2, rng=key,
                                           encoder=encoder, **SAMPLING)
  concept = personalize_fn(tiny.params, random_image(2), key)
  separate = _quiet_generate(tiny, concept, PROMPTS, encoder=encoder, **SAMPLING)
  assert fused.shape == separate.shape == (2, tiny.modules.image_size, tiny.modules.image_size, 3)
  assert np.abs(fused.astype(int) - separate.astype(int)).max() <= FUSED_TOLERANCE


def test_personalize_and_generate_compiles_once(random_image, tiny, tuning, compile_counter):
  run = lambda i: e4t_jax.personalize_and_generate(tiny, random_image(i), ['a photo of * at dusk', 'a * in the rain'],
                                                   tuning=tuning, num_tuning_steps=2, rng=jax.random.key(i),
                                                   **SAMPLING)
  run(0)
  with compile_counter as counter:
    outputs = [run(i) for i in range(1, 4)]
  assert counter.count == 0, f'{counter.count} compilations for 3 new images'
  assert len({o.tobytes() for o in outputs}) == 3


def test_personalize_and_generate_checks_its_input_before_work(random_image, tiny):
  with pytest.raises(InputError, match='num_tuning_steps'):
    e4t_jax.personalize_and_generate(tiny, random_image(0), PROMPTS, num_tuning_steps=-1)
  with pytest.raises(InputError, match='HxWx3'):
    e4t_jax.personalize_and_generate(tiny, np.zeros((4, 4, 5)), PROMPTS, num_tuning_steps=1)
  with pytest.raises(InputError, match='no prompts'):
    e4t_jax.personalize_and_generate(tiny, random_image(0), [], num_tuning_steps=1)
