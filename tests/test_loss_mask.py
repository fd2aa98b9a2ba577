"""Loss masks: the synthetic domain's face masks, and masked per-concept tuning (lite and paper mode)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax import personalize as personalize_lib
from e4t_jax.data import synthetic
from e4t_jax.errors import InputError


@pytest.fixture(scope='module')
def masked_fn(tiny_e4t):
  tuning = personalize_lib.TuningConfig(batch_size=2, loss_mask=True, learning_rate=1e-3)
  return personalize_lib.make_personalize_fn(tiny_e4t, num_steps=2, tuning=tuning)


@pytest.fixture(scope='module')
def unmasked_fn(tiny_e4t, masked_fn):
  # Its checks run before its program: none is compiled (the objective-level test below covers the math).
  return personalize_lib.PersonalizeFn(tiny_e4t, dataclasses.replace(masked_fn.tuning, loss_mask=False), None, '0')


def test_synthetic_mask_marks_the_face_and_not_the_context():
  identity = synthetic.Identity(*[0] * len(synthetic.IDENTITY_ATTRIBUTES))
  plain_image, plain = synthetic.render(identity, synthetic.Context(accessory=0), with_mask=True)
  np.testing.assert_array_equal(plain_image, synthetic.render(identity, synthetic.Context(accessory=0)))
  assert plain.shape == (64, 64) and plain.dtype == np.float32 and 0 <= plain.min() and plain.max() <= 1
  assert plain[0, 0] == 0 and plain[-1, -1] == 0  # background
  assert plain[36, 32] == 1  # the face's centre
  # Anti-aliased edges: fractional values where the head's outline crosses a pixel.
  assert ((plain > 0) & (plain < 1)).any()
  _, hat = synthetic.render(identity, synthetic.Context(accessory=1), with_mask=True)
  covered = (plain > 0) & (hat < plain)  # the hat hides part of the head: not part of the mask there
  assert covered.sum() > 10
  source = synthetic.SyntheticFaces(4, seed=1, with_mask=True)
  record = source[2]
  np.testing.assert_array_equal(record['image'], synthetic.SyntheticFaces(4, seed=1)[2]['image'])
  assert record['mask'].shape == (64, 64) and record['mask'].max() == 1
  assert source.render_all()['masks'].shape == (4, 64, 64)


def test_views_crop_the_mask_as_their_image():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32))
  with_mask = jnp.concatenate([image, image[..., :1]], axis=-1)  # a mask channel equal to channel 0
  views = personalize_lib.make_views(with_mask, jax.random.key(3), 6, augment=True)
  np.testing.assert_allclose(np.asarray(views[..., 3]), np.asarray(views[..., 0]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(views[..., :3]),
                             np.asarray(personalize_lib.make_views(image, jax.random.key(3), 6, augment=True)),
                             atol=1e-6)


def test_an_all_ones_mask_is_the_unmasked_loss(tiny_e4t, random_image):
  from e4t_jax.e4t.objective import e4t_loss, image_features
  images = jnp.asarray(np.stack([random_image(i, 32)[:32, :32] for i in range(2)]), jnp.float32) / 127.5 - 1
  ids = jnp.asarray(personalize_lib.tuning_ids(tiny_e4t.modules, personalize_lib.TuningConfig(batch_size=2,
                                                                                               templates=('a {}',))))
  half = jnp.zeros((2, 32, 32)).at[:, :, :16].set(1.0)

  @jax.jit
  def losses(params):
    features = image_features(tiny_e4t.modules, params, images)
    loss = lambda mask, on: e4t_loss(tiny_e4t.modules, params, {'images': images, 'input_ids': ids, 'mask': mask},
                                     jax.random.key(0), features, loss_mask=on)[0]
    return loss(half, False), loss(jnp.ones_like(half), True), loss(half, True)

  unmasked, ones, masked = losses(tiny_e4t.params)
  np.testing.assert_allclose(float(ones), float(unmasked), rtol=1e-6)  # a mask of ones weights nothing
  assert abs(float(masked) - float(unmasked)) > 1e-4 * abs(float(unmasked))  # loss_mask=False ignored the mask


def test_a_mask_changes_tuning_and_none_is_the_whole_image(tiny_e4t, random_image, masked_fn):
  image = random_image(4)
  ones = masked_fn(tiny_e4t.params, image)  # no mask given: the whole image
  assert ones.info['loss_mask'] == 'true'
  explicit = masked_fn(tiny_e4t.params, image, mask=np.ones(np.shape(image)[:2], np.float32))
  np.testing.assert_array_equal(np.asarray(explicit.loss_trace), np.asarray(ones.loss_trace))
  half = np.zeros(np.shape(image)[:2], np.uint8)
  half[:, : half.shape[1] // 2] = 255
  masked = masked_fn(tiny_e4t.params, image, mask=half)
  assert abs(float(masked.loss_trace[0]) - float(ones.loss_trace[0])) > 1e-4 * abs(float(ones.loss_trace[0]))
  assert np.isfinite(np.asarray(masked.embedding)).all()


def test_masks_are_checked(tiny_e4t, random_image, masked_fn, unmasked_fn):
  image = random_image(0)  # 40 x 40
  with pytest.raises(InputError, match='without a loss mask'):
    unmasked_fn(tiny_e4t.params, image, mask=np.ones((40, 40)))
  with pytest.raises(InputError, match='aspect ratio'):
    masked_fn(tiny_e4t.params, image, mask=np.ones((40, 80), np.uint8))
  with pytest.raises(InputError, match='empty'):
    masked_fn(tiny_e4t.params, image, mask=np.zeros((40, 40), bool))
  with pytest.raises(InputError, match='finite'):
    masked_fn(tiny_e4t.params, image, mask=np.full((40, 40), np.nan, np.float32))
  with pytest.raises(InputError, match='HxW mask'):
    masked_fn(tiny_e4t.params, image, mask=np.ones((2, 40, 40, 3)))


def test_personalize_and_generate_takes_the_mask(tiny_e4t, random_image, masked_fn):
  import e4t_jax
  image, key = random_image(5), jax.random.key(2)
  half = np.zeros(np.shape(image)[:2], bool)
  half[: half.shape[0] // 2] = True
  sampling = dict(num_steps=2, seed=1)
  fused = e4t_jax.personalize_and_generate(tiny_e4t, image, ['a photo of *'], tuning=masked_fn.tuning,
                                           num_tuning_steps=2, rng=key, mask=half, **sampling)
  separate = e4t_jax.generate(tiny_e4t, masked_fn(tiny_e4t.params, image, key, mask=half), ['a photo of *'],
                              **sampling)
  assert np.abs(fused.astype(int) - separate.astype(int)).max() <= 1  # float rounding between two programs
  with pytest.raises(InputError, match='no loss mask'):
    e4t_jax.personalize_and_generate(tiny_e4t, image, ['a photo of *'], num_tuning_steps=2, mask=half, **sampling)


def test_personalize_many_takes_one_mask_per_image(tiny_e4t, random_image, masked_fn):
  images = [random_image(6), random_image(7)]
  half = np.zeros(np.shape(images[0])[:2], np.uint8)
  half[:, ::2] = 255
  many = personalize_lib.personalize_many(tiny_e4t, images, num_steps=2, tuning=masked_fn.tuning, seed=3,
                                          masks=[half, None])
  keys = jax.random.split(jax.random.key(3), 2)
  for concept, image, mask, key in zip(many, images, [half, None], keys):
    alone = masked_fn(tiny_e4t.params, image, key, mask=mask)
    np.testing.assert_allclose(np.asarray(concept.loss_trace), np.asarray(alone.loss_trace), rtol=1e-4)
  with pytest.raises(InputError, match='1 masks for 2 images'):
    personalize_lib.personalize_many(tiny_e4t, images, num_steps=2, tuning=masked_fn.tuning, masks=[half])
