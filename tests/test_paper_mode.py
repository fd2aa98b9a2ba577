"""Paper-mode tuning (the encoder, the offsets and the U-Net in tandem, on a batch of views) and its
compressed concepts, on the tiny random model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import e4t_jax
from e4t_jax import personalize as personalize_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.concept import Concept, fingerprint_info
from e4t_jax.errors import ConfigError, InputError

# Attention kernels and the first conv: enough to cover Dense and conv deltas, quick to compile.
PATTERNS = (r'attn[12]/to_', r'^conv_in$')
# Renders of an exact delta and of its full-rank SVD factors agree to float rounding: at most this many
# uint8 levels apart, anywhere.
FULL_RANK_RENDER_TOLERANCE = 1



@pytest.fixture(scope='module')
def tiny(tiny_e4t):
  return tiny_e4t


@pytest.fixture(scope='module')
def paper_tuning():
  return personalize_lib.TuningConfig(mode='paper', batch_size=3, learning_rate=1e-3, unet_learning_rate=1e-3,
                                      unet_patterns=PATTERNS, delta_rank=64)


@pytest.fixture(scope='module')
def paper_fn(tiny, paper_tuning):
  return personalize_lib.make_personalize_fn(tiny, num_steps=2, tuning=paper_tuning)


@pytest.fixture(scope='module')
def paper_concept(random_image, tiny, paper_fn):
  return paper_fn(tiny.params, random_image(0), jax.random.key(0))


def _kernel(params, path):
  return np.asarray(traverse_util.flatten_dict(params['unet'])[tuple(path.split('/')) + ('kernel',)])


def test_modes_resolve_their_own_defaults():
  lite, paper = personalize_lib.TuningConfig(), personalize_lib.TuningConfig(mode='paper')
  assert (lite.batch_size, lite.augment) == (1, False)
  assert (paper.batch_size, paper.augment) == (16, True)  # the references' batch of augmented copies
  with pytest.raises(InputError, match='tuning mode'):
    personalize_lib.TuningConfig(mode='full')


def test_paper_mode_tunes_unet_kernels_and_lite_mode_only_the_offsets(random_image, tiny, paper_concept):
  tuned = personalize_lib.tuned_unet_kernels(tiny.params['unet'], personalize_lib.TuningConfig(
      mode='paper', unet_patterns=PATTERNS))
  assert 'conv_in' in tuned and not set(tuned) <= set(tiny.params['weight_offsets'])
  # Paper mode: every tuned kernel has a delta, and kernels without weight offsets changed too.
  assert set(paper_concept.weight_offsets) == set(tuned) | set(tiny.params['weight_offsets'])
  for path in ('conv_in', next(p for p in tuned if p not in tiny.params['weight_offsets'])):
    pair = paper_concept.weight_offsets[path]
    assert np.abs(np.asarray(offsets_lib.offset_matrix(pair))).max() > 1e-6, path
  assert paper_concept.info['tuning_mode'] == 'paper' and paper_concept.info['offsets_mode'] == 'additive'
  # Lite mode: the offsets' own targets only; the U-Net's weights are not part of the concept.
  # (tests/test_personalize.py's settings: one program for both files through the session's XLA cache)
  lite = personalize_lib.make_personalize_fn(tiny, num_steps=3, tuning=personalize_lib.TuningConfig(
      learning_rate=1e-3))(tiny.params, random_image(0), num_steps=1)
  assert set(lite.weight_offsets) == set(tiny.params['weight_offsets'])
  assert lite.info['tuning_mode'] == 'lite'


def test_paper_mode_compiles_once_for_five_images(random_image, tiny, paper_fn, compile_counter):
  with compile_counter as counter:
    concepts = [paper_fn(tiny.params, random_image(i), jax.random.key(i)) for i in range(5)]
  assert counter.count == 0, f'{counter.count} compilations for 5 concepts'
  assert len({np.asarray(c.embedding).tobytes() for c in concepts}) == 5
  assert all(np.isfinite(np.asarray(c.loss_trace)).all() for c in concepts)


def test_paper_concept_round_trips_save_load_generate(tiny, paper_concept, tmp_path):
  path = paper_concept.save(tmp_path / 'paper.e4t.safetensors')
  loaded = Concept.load(path)
  assert loaded.info == paper_concept.info
  before = e4t_jax.generate(tiny, paper_concept, ['a photo of *'], num_steps=2, seed=3)
  after = e4t_jax.generate(tiny, loaded, ['a photo of *'], num_steps=2, seed=3)
  np.testing.assert_array_equal(before, after)
  plain = e4t_jax.generate(tiny, None, ['a photo of *'], num_steps=2, seed=3)
  assert np.abs(before.astype(int) - plain.astype(int)).max() > 0  # the concept changes the render


def test_low_rank_factors_are_exact_at_full_rank_and_the_svd_optimum_below():
  rng = np.random.default_rng(0)
  for shape in ((12, 7), (3, 3, 4, 6)):  # Dense [in, out] and conv [kh, kw, in, out]
    delta = rng.normal(size=shape).astype(np.float32)
    full = offsets_lib.low_rank_factors(jnp.asarray(delta), rank=64)
    np.testing.assert_allclose(np.asarray(offsets_lib.offset_matrix(full)).reshape(shape), delta, atol=1e-5)
    low = offsets_lib.low_rank_factors(jnp.asarray(delta), rank=2)
    assert np.shape(low['down'])[1] == 2
    singular = np.linalg.svd(delta.reshape(-1, shape[-1]), compute_uv=False)
    residual = np.linalg.norm(delta.reshape(-1, shape[-1]) - np.asarray(offsets_lib.offset_matrix(low)))
    np.testing.assert_allclose(residual, np.sqrt(np.sum(singular[2:] ** 2)), rtol=1e-4)  # Eckart-Young
    cut = offsets_lib.truncate_factors({'k': full}, 2)['k']  # a stored full-rank pair cut to rank 2
    np.testing.assert_allclose(np.asarray(offsets_lib.offset_matrix(cut)), np.asarray(offsets_lib.offset_matrix(low)),
                               atol=1e-5)


def _spectrum_matrix(rng, m, n, singular_values):
  u, _ = np.linalg.qr(rng.normal(size=(m, len(singular_values))))
  v, _ = np.linalg.qr(rng.normal(size=(n, len(singular_values))))
  return ((u * singular_values) @ v.T).astype(np.float32)


def test_randomized_factors_are_near_the_svd_optimum_and_exact_at_low_rank():
  rng = np.random.default_rng(0)
  m, n, k = 1024, 96, np.arange(1, 97)  # tall, as conv kernels [kh * kw * in, out] are
  cases = {'flat (gaussian)': rng.normal(size=(m, n)).astype(np.float32),
           'power law 1/i': _spectrum_matrix(rng, m, n, 1.0 / k),
           'power law 1/sqrt(i)': _spectrum_matrix(rng, m, n, k ** -0.5),
           'power law 1/i^2': _spectrum_matrix(rng, m, n, 1.0 / k ** 2),  # steep: sigma_16 / sigma_1 = 1/256
           'exponential': _spectrum_matrix(rng, m, n, np.exp(-k / 3.0)),
           'rank 6': _spectrum_matrix(rng, m, n, np.linspace(2.0, 0.5, 6)),
           'zero': np.zeros((m, n), np.float32)}
  down, up = jax.jit(offsets_lib.randomized_factors, static_argnums=1)(jnp.asarray(np.stack(list(cases.values()))), 16)
  assert down.shape == (len(cases), m, 16) and up.shape == (len(cases), 16, n)
  down, up = np.asarray(down, np.float64), np.asarray(up, np.float64)
  for i, (name, a) in enumerate(cases.items()):
    singular = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    for rank in (16, 8):  # SVD-ordered: the first 8 components are (near) the best rank-8 pair too
      optimum = np.sqrt(np.sum(singular[rank:] ** 2))  # Eckart-Young
      residual = np.linalg.norm(a - down[i, :, :rank] @ up[i, :rank])
      if name in ('rank 6', 'zero'):  # rank 6 <= both ranks: exact; zero: zero factors
        assert residual <= 1e-5 * max(1.0, singular[0]), name
      else:
        assert optimum * (1 - 1e-5) <= residual <= 1.02 * optimum, (name, rank)
  assert np.all(down[-1] == 0) and np.all(up[-1] == 0)  # no NaN from the zero matrix's zero eigenvalues
  with pytest.raises(ConfigError, match='factorization'):
    offsets_lib.low_rank_factors(jnp.asarray(cases['rank 6']), rank=8, method='qr')


def test_auto_factorization_is_randomized_only_when_tracing_for_a_tpu():
  from e4t_jax.models import tpu_attention
  tuning = personalize_lib.TuningConfig(mode='paper')
  assert personalize_lib.delta_factorization(tuning) == 'svd'  # this CPU
  with tpu_attention.target_platform('tpu'):
    assert personalize_lib.delta_factorization(tuning) == 'randomized'
    assert personalize_lib.delta_factorization(dataclasses.replace(tuning, factorization='svd')) == 'svd'
  assert personalize_lib.delta_factorization(dataclasses.replace(tuning, factorization='randomized')) == 'randomized'
  with pytest.raises(InputError, match='factorization'):
    personalize_lib.TuningConfig(mode='paper', factorization='qr')


def test_compressed_delta_renders_match_exact_delta_renders(tiny):
  rng = np.random.default_rng(1)
  paths = ['conv_in'] + sorted(tiny.params['weight_offsets'])[:2]
  flat = traverse_util.flatten_dict(tiny.params['unet'])
  tuned = dict(flat)
  for path in paths:
    key = tuple(path.split('/')) + ('kernel',)
    tuned[key] = flat[key] + 0.05 * rng.normal(size=flat[key].shape).astype(np.float32)
  tuned_unet = traverse_util.unflatten_dict(tuned)
  factors = personalize_lib.unet_delta_factors(tiny.params['unet'], tuned_unet, {}, 'additive', paths, rank=256)
  width = tiny.modules.text_encoder.config.hidden_size
  embedding = rng.normal(0, 1, (width,)).astype(np.float32)
  info = tuple(sorted(dict(fingerprint_info(tiny), offsets_mode='additive').items()))
  compressed = Concept(embedding=embedding, weight_offsets=factors, loss_trace=np.zeros(1, np.float32),
                       steps=np.int32(1), metadata=info)
  exact_model = model_lib.E4TModel(tiny.modules, dict(tiny.params, unet=tuned_unet))
  exact = Concept(embedding=embedding, weight_offsets={}, loss_trace=np.zeros(1, np.float32), steps=np.int32(1),
                  metadata=(('offsets_mode', 'additive'),))
  ours = e4t_jax.generate(tiny, compressed, ['a photo of *'], num_steps=2, seed=0)
  reference = e4t_jax.generate(exact_model, exact, ['a photo of *'], num_steps=2, seed=0)
  assert np.abs(ours.astype(int) - reference.astype(int)).max() <= FULL_RANK_RENDER_TOLERANCE
  without_delta = e4t_jax.generate(tiny, exact, ['a photo of *'], num_steps=2, seed=0)
  assert np.abs(without_delta.astype(int) - reference.astype(int)).max() > 10 * FULL_RANK_RENDER_TOLERANCE


def test_views_start_with_the_image_and_are_random_per_key():
  image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (16, 16, 3)).astype(np.float32))
  views = personalize_lib.make_views(image, jax.random.key(0), 8, augment=True)
  assert views.shape == (8, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(views[0]), np.asarray(image))
  assert all(np.abs(np.asarray(views[i] - image)).max() > 1e-3 for i in range(1, 8))
  again = personalize_lib.make_views(image, jax.random.key(0), 8, augment=True)
  np.testing.assert_array_equal(np.asarray(views), np.asarray(again))
  plain = personalize_lib.make_views(image, jax.random.key(0), 3, augment=False)
  assert all(np.array_equal(np.asarray(v), np.asarray(image)) for v in plain)


def test_templates_are_cycled_over_the_views(tiny):
  tuning = personalize_lib.TuningConfig(mode='paper', batch_size=4, templates=('a {}', 'a photo of {}'))
  assert personalize_lib.tuning_captions(tiny.modules, tuning) == ['a {}', 'a photo of {}'] * 2
  assert personalize_lib.tuning_captions(tiny.modules, tuning, 'x {}') == ['x {}'] * 4  # a call's prompt wins
  assert personalize_lib.tuning_ids(tiny.modules, tuning).shape[0] == 4
  lite = dataclasses.replace(tuning, mode='lite', batch_size=1)
  assert personalize_lib.tuning_captions(tiny.modules, lite, 'x {}') == ['x {}']


def test_micro_batched_gradient_equals_the_one_pass_gradient(tiny, random_image):
  from e4t_jax.e4t.objective import draw_noise, e4t_loss, image_features
  images = jnp.asarray(np.stack([random_image(i, 32)[:32, :32] for i in range(2)]), jnp.float32) / 127.5 - 1
  ids = jnp.asarray(personalize_lib.tuning_ids(tiny.modules, personalize_lib.TuningConfig(
      mode='paper', batch_size=2, templates=('a {}', 'a photo of {}'))))
  trainable, frozen = model_lib.split_params(tiny.params, ())
  loss_of = lambda t, rows, f, d: e4t_loss(tiny.modules, model_lib.merge_params(t, frozen), rows, None, f, d)[0]
  batch = {'images': images, 'input_ids': ids}

  @jax.jit
  def everything(trainable):
    features = image_features(tiny.modules, model_lib.merge_params(trainable, frozen), images)
    rows = (batch, features, draw_noise(tiny.modules, jax.random.key(1), features.posterior.mean))
    from_key = e4t_loss(tiny.modules, model_lib.merge_params(trainable, frozen), batch, jax.random.key(1),
                        features)[0]
    return (from_key, jax.value_and_grad(loss_of)(trainable, *rows),
            personalize_lib.accumulated_value_and_grad(loss_of, trainable, rows, 1))

  from_key, (one_loss, one_grads), (loss, grads) = everything(trainable)
  # Drawing from the key inside the loss is drawing first and passing the draws (draw_noise), bit for bit.
  np.testing.assert_array_equal(np.asarray(from_key), np.asarray(one_loss))
  np.testing.assert_allclose(float(loss), float(one_loss), rtol=1e-5)
  flat, one_flat = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(one_grads)
  scale = max(float(np.abs(np.asarray(g)).max()) for g in one_flat.values())
  for path, g in one_flat.items():
    np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(g), atol=1e-5 * scale, rtol=1e-4, err_msg=str(path))


def test_pytorch_paper_mode_follows_ours_step_by_step(random_image, tiny, paper_fn, paper_concept, tmp_path):
  for name in ('torch', 'diffusers', 'transformers'):
    pytest.importorskip(name)
  from e4t_jax.bench import personalize as bench
  from e4t_jax.bench.torch_reference import TorchE4T
  tuning = paper_fn.tuning
  pixels = personalize_lib.prepare_image(random_image(0), tiny.modules.image_size)
  draws = bench._jax_draws(tiny.modules, tuning, jax.random.key(0), pixels)  # pylint: disable=protected-access
  assert draws['views'].shape[0] == tuning.batch_size
  reference = TorchE4T(tiny, tmp_path)
  trace, embedding = reference.personalize(pixels, tuning, draws=draws)
  ours = np.asarray(paper_concept.loss_trace, np.float64)
  # Same weights, views and draws; the U-Net's kernels train in both (a second step would drift apart
  # if they did not): the loss trace agrees to float32 rounding.
  np.testing.assert_allclose(trace, ours, rtol=2e-5)
  np.testing.assert_allclose(embedding, np.asarray(paper_concept.embedding), atol=1e-4)
  again, _ = reference.personalize(pixels, tuning, draws=draws)  # a fresh copy of the U-Net each concept
  np.testing.assert_allclose(again, trace, rtol=1e-6)


def test_micro_batches_and_personalize_many_in_paper_mode_on_cpu(random_image, tiny, paper_tuning, paper_fn):
  # The vmapped paper-mode program hangs in XLA:CPU (docs/performance.md): on CPU each concept runs on one
  # single-concept executable, with the keys the batched program would use. Tuned here one view per pass:
  # the same concepts as the one-pass program's up to float rounding.
  micro = dataclasses.replace(paper_tuning, micro_batch=1)
  images = [random_image(0), random_image(1)]
  many = personalize_lib.personalize_many(tiny, images, num_steps=2, tuning=micro, seed=4)
  for concept, image, key in zip(many, images, jax.random.split(jax.random.key(4), 2)):
    alone = paper_fn(tiny.params, image, key)  # one pass of 3 views, 2 steps
    np.testing.assert_allclose(np.asarray(concept.loss_trace), np.asarray(alone.loss_trace), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(concept.embedding), np.asarray(alone.embedding), rtol=1e-3, atol=1e-4)
  assert many[0].info['micro_batch'] == '1' and 'micro_batch' not in paper_fn(tiny.params, images[0]).info
  with pytest.raises(InputError, match='micro_batch must divide'):
    dataclasses.replace(paper_tuning, micro_batch=2)  # batch 3
