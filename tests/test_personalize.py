"""Compile-once personalization, concept files and batched concepts on a tiny random E4T model."""
import jax
import numpy as np
import pytest

from e4t_jax import personalize as personalize_lib
from e4t_jax.e4t.concept import Concept
from e4t_jax.errors import CheckpointError, InputError



@pytest.fixture(scope='module')
def tiny(tiny_e4t):
  return tiny_e4t


@pytest.fixture(scope='module')
def personalize_fn(tiny):
  return personalize_lib.make_personalize_fn(tiny, num_steps=3,
                                             tuning=personalize_lib.TuningConfig(learning_rate=1e-3))



def test_personalize_compiles_once(random_image, tiny, personalize_fn, compile_counter):
  with compile_counter as counter:
    concepts = [personalize_fn(tiny.params, random_image(i), jax.random.key(i)) for i in range(5)]
  assert counter.count == 0, f'{counter.count} compilations for 5 concepts'
  embeddings = np.stack([np.asarray(c.embedding) for c in concepts])
  assert len({e.tobytes() for e in embeddings}) == 5  # different images/keys -> different concepts
  assert all(int(c.steps) == 3 for c in concepts)


def test_a_learning_rate_sweep_runs_on_one_executable(random_image, tiny, personalize_fn, compile_counter):
  image, key = random_image(4), jax.random.key(4)
  with compile_counter as counter:
    default = personalize_fn(tiny.params, image, key)
    same = personalize_fn(tiny.params, image, key, learning_rate=1e-3)
    sweep = {lr: personalize_fn(tiny.params, image, key, learning_rate=lr) for lr in (1e-4, 1e-2)}
  assert counter.count == 0, f'{counter.count} compilations for a learning-rate sweep'
  np.testing.assert_array_equal(same.embedding, default.embedding)  # the config's rate, passed explicitly
  moved = {lr: float(np.abs(np.asarray(c.embedding) - np.asarray(default.embedding)).max()) for lr, c in sweep.items()}
  assert all(m > 0 for m in moved.values()), moved
  assert sweep[1e-2].info['learning_rate'] == '0.01' and default.info['learning_rate'] == '0.001'
  with pytest.raises(InputError, match='finite'):
    personalize_fn(tiny.params, image, key, learning_rate=float('nan'))


def test_configs_that_differ_only_in_learning_rates_share_compiled_programs():
  key = personalize_lib.compile_key
  lite = personalize_lib.TuningConfig(learning_rate=1e-3)
  assert key(lite) == key(personalize_lib.TuningConfig(learning_rate=3e-2, unet_learning_rate=1.0))
  assert key(lite) != key(personalize_lib.TuningConfig(learning_rate=1e-3, num_steps=4))
  assert personalize_lib.tuning_rates(lite, unet_learning_rate=2e-5) == {
      'learning_rate': np.float32(1e-3), 'unet_learning_rate': np.float32(2e-5)}


def test_tuning_moves_the_encoder_prediction_and_offsets(random_image, tiny, personalize_fn):
  concept = personalize_fn(tiny.params, random_image(0))
  coarse = np.asarray(tiny.params['text_encoder']['embeddings']['token_embedding']['embedding'][tiny.modules.coarse_token_id])
  assert not np.allclose(np.asarray(concept.embedding), coarse)  # the encoder's output layer learned
  assert any(np.abs(np.asarray(p['up'])).max() > 0 for p in concept.weight_offsets.values())
  assert np.isfinite(np.asarray(concept.loss_trace)).all()


def test_same_image_and_key_give_identical_concepts(random_image, tiny, personalize_fn):
  a = personalize_fn(tiny.params, random_image(1), jax.random.key(5))
  b = personalize_fn(tiny.params, random_image(1), jax.random.key(5))
  np.testing.assert_array_equal(a.embedding, b.embedding)


def test_fewer_steps_per_call_within_the_compiled_maximum(random_image, tiny, personalize_fn):
  concept = personalize_fn(tiny.params, random_image(2), num_steps=1)
  trace = np.asarray(concept.loss_trace)
  assert int(concept.steps) == 1 and np.isfinite(trace[0]) and np.isnan(trace[1:]).all()
  zero = personalize_fn(tiny.params, random_image(2), num_steps=0)  # the encoder alone
  assert int(zero.steps) == 0
  with pytest.raises(InputError, match='at most 3'):
    personalize_fn(tiny.params, random_image(2), num_steps=4)


def test_concept_save_load_round_trip_and_compatibility(random_image, tiny, personalize_fn, tmp_path):
  concept = personalize_fn(tiny.params, random_image(3))
  path = concept.save(tmp_path / 'me.e4t.safetensors')
  loaded = Concept.load(path)
  np.testing.assert_array_equal(loaded.embedding, concept.embedding)
  for key, pair in concept.weight_offsets.items():
    np.testing.assert_array_equal(loaded.weight_offsets[key]['up'], pair['up'])
  assert loaded.info['coarse_word'] == 'face' and loaded.info['steps'] == '3'
  loaded.check_compatible(tiny, personalize_fn.fingerprint)
  with pytest.raises(CheckpointError, match='base model'):
    loaded.check_compatible(tiny, 'f' * 64)
  assert loaded.source == str(path)
  assert path.stat().st_size < 200_000
  assert not list(tmp_path.glob('.*.tmp'))  # atomic write left nothing behind


def test_the_fingerprint_sees_every_frozen_weight_and_is_hashed_once(tiny, monkeypatch):
  import jax
  from e4t_jax.e4t import concept as concept_lib
  from e4t_jax.e4t.model import E4TModel
  base = concept_lib.model_fingerprint(tiny)
  calls = []
  monkeypatch.setattr(concept_lib, '_leaf_digest', lambda leaf: calls.append(1) or b'')
  assert concept_lib.model_fingerprint(tiny) == base and not calls  # cached for the same arrays
  monkeypatch.undo()
  for part in concept_lib.FROZEN_PARTS:  # one element of the last tensor of each frozen part
    leaves, treedef = jax.tree.flatten(tiny.params[part])
    changed = np.array(leaves[-1]).copy()
    changed.reshape(-1)[-1] += 1e-6 * max(1.0, abs(float(changed.reshape(-1)[-1])))
    tree = jax.tree.unflatten(treedef, leaves[:-1] + [jax.numpy.asarray(changed)])
    other = E4TModel(tiny.modules, dict(tiny.params, **{part: tree}))
    assert concept_lib.model_fingerprint(other) != base, part
  trainable_changed = E4TModel(tiny.modules, dict(tiny.params, encoder=jax.tree.map(lambda x: x + 1,
                                                                                    tiny.params['encoder'])))
  assert concept_lib.model_fingerprint(trainable_changed) == base  # the domain encoder is not frozen


def test_corrupt_concept_file_is_a_clear_error(tmp_path):
  bad = tmp_path / 'bad.e4t.safetensors'
  bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"not": json')
  with pytest.raises(CheckpointError, match='bad.e4t.safetensors'):
    Concept.load(bad)
  with pytest.raises(InputError, match='no such concept'):
    Concept.load(tmp_path / 'missing.safetensors')


def test_bad_images_are_clear_errors(tiny, personalize_fn):
  with pytest.raises(InputError, match='HxWx3'):
    personalize_fn(tiny.params, np.zeros((4, 4, 4, 3), np.uint8))
  with pytest.raises(InputError, match=r'\[0, 1\]'):
    personalize_fn(tiny.params, np.full((32, 32, 3), 7.0, np.float32))


def test_personalize_many_matches_shapes_and_shards_over_data(random_image, tiny, compile_counter):
  from e4t_jax.parallel.mesh import make_mesh
  mesh = make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:2])
  concepts = personalize_lib.personalize_many(tiny, [random_image(i) for i in range(3)], num_steps=2, mesh=mesh)
  assert len(concepts) == 3
  assert len({np.asarray(c.embedding).tobytes() for c in concepts}) == 3
  assert all(int(c.steps) == 2 for c in concepts)
  with compile_counter as counter:  # the batched program is cached: new images, no compilation
    personalize_lib.personalize_many(tiny, [random_image(i + 5) for i in range(3)], num_steps=2, mesh=mesh, seed=1)
  assert counter.count == 0


def test_non_finite_loss_stops_tuning_with_a_clear_error(random_image, tiny, personalize_fn):
  params = dict(tiny.params)
  encoder = dict(params['encoder'])
  encoder['out'] = dict(encoder['out'], bias=np.full(np.shape(encoder['out']['bias']), np.nan, np.float32))
  params['encoder'] = encoder
  with pytest.raises(InputError, match='non-finite'):
    personalize_fn(params, random_image(4))


def test_persistent_compilation_cache_directory_is_populated(tiny, tmp_path):
  from e4t_jax.bench import harness
  # scoped: later tests in this process go back to the session's cache, not into a deleted temp dir
  with harness.scoped_persistent_cache(tmp_path / 'unused'):
    personalize_lib.make_personalize_fn(tiny, num_steps=1, cache_dir=tmp_path / 'xla-cache')
    assert any((tmp_path / 'xla-cache').iterdir()), 'the compiled program was not written to the cache'
