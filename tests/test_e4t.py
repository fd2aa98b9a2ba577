"""The E4T method on a tiny random model: offsets, placeholder override, regularizers, gradients, overfit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import objective
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.prompts import encode_prompt, token_embedding
from e4t_jax.errors import ConfigError
from e4t_jax.train import step as step_lib



@pytest.fixture(scope='module')
def tiny(tiny_e4t):
  return tiny_e4t


@pytest.fixture(scope='module')
def loss_fn(tiny):
  return jax.jit(functools.partial(objective.e4t_loss, tiny.modules))


@pytest.fixture(scope='module')
def training(tiny):
  """(optimizer, jitted train step) shared by the tests, compiled once."""
  optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=3e-3, weight_decay=0.0))
  return optimizer, jax.jit(step_lib.make_train_step(tiny.modules, optimizer))


def _batch(model, batch_size=2, seed=0):
  size = model.modules.image_size
  images = jax.random.uniform(jax.random.key(seed), (batch_size, size, size, 3), minval=-1, maxval=1)
  ids = model.modules.tokenize(['a photo of *', 'a painting of * smiling'][:batch_size])
  return {'images': images, 'input_ids': jnp.asarray(ids)}


def _unet_out(modules, unet_params, seed=0):
  cfg = modules.unet.config
  latents = jax.random.normal(jax.random.key(seed), (1, cfg.sample_size, cfg.sample_size, cfg.in_channels))
  context = jax.random.normal(jax.random.key(seed + 1), (1, 5, cfg.cross_attention_dim))
  return modules.unet.apply({'params': unet_params}, latents, jnp.array([500]), context)


def test_zero_initialized_offsets_leave_unet_output_bit_identical(tiny):
  unet_params = tiny.params['unet']
  merged = offsets_lib.merge_offsets(unet_params, tiny.params['weight_offsets'], tiny.config.offsets.mode)
  np.testing.assert_array_equal(_unet_out(tiny.modules, unet_params), _unet_out(tiny.modules, merged))


def test_nonzero_offsets_change_only_targeted_layers(tiny):
  unet_params = tiny.params['unet']
  offsets = {path: {'down': pair['down'], 'up': pair['up'] + 0.05}
             for path, pair in tiny.params['weight_offsets'].items() if path.endswith('attn2/to_k')}
  assert offsets, 'the default targets include cross-attention keys'
  merged = offsets_lib.merge_offsets(unet_params, offsets)
  flat_before = dict(jax.tree_util.tree_flatten_with_path(unet_params)[0])
  for path, value in jax.tree_util.tree_flatten_with_path(merged)[0]:
    name = jax.tree_util.keystr(path)
    assert (not np.array_equal(value, flat_before[path])) == ("'attn2']['to_k']['kernel']" in name), name
  assert not np.allclose(_unet_out(tiny.modules, unet_params), _unet_out(tiny.modules, merged))


def test_placeholder_override_equals_coarse_word_when_w_star_is_w_coarse(tiny):
  m = tiny.modules
  text_params = tiny.params['text_encoder']
  with_placeholder = jnp.asarray(m.tokenize(['a photo of * smiling']))
  with_coarse = jnp.asarray(m.tokenize(['a photo of face smiling']))
  w_coarse = token_embedding(text_params, m.coarse_token_id)
  ours = encode_prompt(m.text_encoder, text_params, with_placeholder, placeholder_id=m.placeholder_id,
                       placeholder_embedding=w_coarse[None], substitute_id=m.coarse_token_id)
  reference = encode_prompt(m.text_encoder, text_params, with_coarse)
  np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_placeholder_override_changes_only_placeholder_positions_and_after(tiny):
  m = tiny.modules
  text_params = tiny.params['text_encoder']
  ids = jnp.asarray(m.tokenize(['a photo of * smiling']))
  position = int(np.argmax(np.asarray(ids[0]) == m.placeholder_id))
  width = m.text_encoder.config.hidden_size
  encode = functools.partial(encode_prompt, m.text_encoder, text_params, ids, placeholder_id=m.placeholder_id)
  a = encode(placeholder_embedding=jnp.zeros((1, width)))
  b = encode(placeholder_embedding=jnp.ones((1, width)))
  np.testing.assert_array_equal(a[:, :position], b[:, :position])  # causal: before it, nothing moves
  assert not np.allclose(a[:, position], b[:, position])


def test_embedding_regularizer_is_on_offset_not_on_w_star(tiny, loss_fn):
  batch = _batch(tiny)
  _, metrics = loss_fn(tiny.params, batch, jax.random.key(1))
  # A fresh encoder predicts f = 0 (zero output layer), so w* = w_coarse ≠ 0 but the penalty is 0.
  assert float(metrics['embedding_reg']) == 0.0
  assert float(jnp.linalg.norm(token_embedding(tiny.params['text_encoder'], tiny.modules.coarse_token_id))) > 0
  params = jax.tree.map(lambda x: x, tiny.params)
  bias = jnp.full_like(params['encoder']['out']['bias'], 0.5)
  params['encoder'] = dict(params['encoder'], out=dict(params['encoder']['out'], bias=bias))
  _, metrics = loss_fn(params, batch, jax.random.key(1))
  np.testing.assert_allclose(float(metrics['embedding_reg']), float(jnp.sum(bias ** 2)), rtol=1e-5)


def test_masked_loss_ignores_masked_out_positions():
  key = jax.random.key(0)
  prediction, target = jax.random.normal(key, (2, 4, 4, 4)), jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
  pixel_mask = jnp.zeros((2, 16, 16)).at[:, :8].set(1.0)  # top half kept
  weights = objective.latent_mask(pixel_mask, 4)
  assert weights.shape == (2, 4, 4, 1)
  changed = prediction.at[:, 2:].set(100.0)  # latent rows 2-3 are the masked-out bottom half
  np.testing.assert_allclose(objective.masked_mse(prediction, target, weights),
                             objective.masked_mse(changed, target, weights), rtol=1e-6)
  assert float(objective.masked_mse(changed, target)) > float(objective.masked_mse(prediction, target))


def test_min_snr_weighting_of_the_e4t_loss(tiny):
  """γ > 0 weighs each row's diffusion error by min(SNR, γ) / SNR (ε); γ above every SNR is the plain loss."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from e4t_jax.diffusion import schedule as schedule_lib  # pylint: disable=g-import-not-at-top
  batch, key = _batch(tiny), jax.random.key(5)

  def loss_with(gamma):
    modules = dataclasses.replace(tiny.modules, config=dataclasses.replace(tiny.config, min_snr_gamma=gamma))
    return objective.e4t_loss(modules, tiny.params, batch, key)[1]['diffusion_loss']

  plain = float(loss_with(0.0))
  draws = objective.draw_noise(tiny.modules, key, jnp.zeros((2, 1, 1, 1)))
  snr = schedule_lib.snr(tiny.modules.schedule, draws.timesteps)
  np.testing.assert_allclose(float(loss_with(float(jnp.max(snr)) * 2)), plain, rtol=1e-6)
  gamma = float(jnp.min(snr)) / 2  # below every row's SNR: every row is weighted by gamma / SNR < 1
  assert float(loss_with(gamma)) < plain
  prediction, target = jax.random.normal(key, (2, 4, 4, 4)), jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
  rows = jnp.mean(jnp.square(prediction - target), axis=(1, 2, 3))
  np.testing.assert_allclose(objective.masked_mse(prediction, target, example_weights=jnp.array([1.0, 0.25])),
                             (rows[0] + 0.25 * rows[1]) / 2, rtol=1e-6)
  with pytest.raises(ConfigError, match='min_snr_gamma'):
    dataclasses.replace(tiny.config, min_snr_gamma=-1.0)


def test_gradients_reach_only_trainable_params_and_optimizer_state_is_trainable_only(tiny, training):
  optimizer, train_step = training
  state, frozen = step_lib.create_train_state(tiny, optimizer)
  assert set(state.trainable) == {'encoder', 'weight_offsets'}
  assert set(frozen) == {'unet', 'vae', 'text_encoder', 'image_encoder'}
  trainable_size = model_lib.count_params(state.trainable)
  opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert opt_size <= 2 * trainable_size + 8  # Adam's two moments (+ counters), nothing frozen
  frozen_before = jax.tree.map(np.array, frozen)
  new_state, metrics = train_step(state, frozen, _batch(tiny), jax.random.key(3))
  assert float(metrics['grad_norm']) > 0
  # The output layer and every offset's `up` factor get a gradient on the very first step ...
  assert not np.allclose(new_state.trainable['encoder']['out']['kernel'], state.trainable['encoder']['out']['kernel'])
  for path, pair in new_state.trainable['weight_offsets'].items():
    assert not np.allclose(pair['up'], 0.0), path
  # ... and the frozen tree is an input only: untouched.
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)


def test_trainable_patterns_add_image_encoder_layers(tiny):
  patterns = (r'^image_encoder/encoder/layers_1/',)
  # The tiny model's towers scan their layers: one layer of a stacked tree cannot train alone.
  assert tiny.modules.image_encoder.scan_layers and set(tiny.params['image_encoder']['encoder']) == {'layers'}
  with pytest.raises(ConfigError, match='scan_layers=False'):
    model_lib.split_params(tiny.params, patterns)
  # Built with those patterns, the image encoder keeps one subtree per layer (same values).
  model = model_lib.init_tiny(jax.random.key(0), model_lib.E4TConfig(trainable_patterns=patterns))
  assert not model.modules.image_encoder.scan_layers and model.modules.text_encoder.scan_layers
  trainable, frozen = model_lib.split_params(model.params, patterns)
  assert 'layers_1' in trainable['image_encoder']['encoder']
  assert 'layers_1' not in frozen['image_encoder']['encoder'] and 'layers_0' in frozen['image_encoder']['encoder']
  merged = model_lib.merge_params(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(model.params)
  # Same key as the shared tiny model: the image encoder's values are the same, only the layout differs.
  np.testing.assert_array_equal(model.params['image_encoder']['encoder']['layers_1']['mlp']['fc1']['kernel'],
                                tiny.params['image_encoder']['encoder']['layers']['mlp']['fc1']['kernel'][1])
  # A pattern that picks a parameter in every layer keeps the scan and trains the whole stacked leaf.
  every_layer = (r'^image_encoder/encoder/layers_\d+/mlp/fc1/',)
  assert model_lib.image_encoder_scans(model_lib.E4TConfig(trainable_patterns=every_layer),
                                       tiny.modules.image_encoder.config)
  trainable, _ = model_lib.split_params(tiny.params, every_layer)
  assert set(trainable['image_encoder']['encoder']['layers']['mlp']) == {'fc1'}


def test_multi_token_coarse_word_is_a_clear_error(tiny):
  with pytest.raises(ConfigError, match='single-token'):
    model_lib.coarse_token_id(tiny.modules.tokenizer, 'xylophonist portrait')


def test_overfits_a_fixed_batch(tiny, training):
  optimizer, train_step = training
  state, frozen = step_lib.create_train_state(tiny, optimizer)
  batch, rng = _batch(tiny), jax.random.key(7)  # same noise and timesteps every step
  losses = []
  for _ in range(100):
    state, metrics = train_step(state, frozen, batch, rng)
    losses.append(float(metrics['diffusion_loss']))
  ratio = losses[-1] / losses[0]
  print(f'overfit: diffusion loss {losses[0]:.4f} -> {losses[-1]:.4f} (ratio {ratio:.3f})')
  assert np.isfinite(losses).all()
  assert ratio <= 0.5
