"""The procedural face domain: determinism, the held-out identity split, captions, and bad input."""
import dataclasses

import numpy as np
import pytest

from e4t_jax.data import synthetic
from e4t_jax.data.synthetic import (BACKGROUNDS, CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, Context, Identity,
                                    SyntheticFaces, heldout_identities, render, sample_identity)
from e4t_jax.errors import InputError


def _records_equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ('image', 'caption', 'identity', 'context'))


def test_records_are_deterministic_per_seed_and_split():
  first, second = SyntheticFaces(6, seed=3), SyntheticFaces(6, seed=3)
  for i in range(6):
    assert _records_equal(first[i], second[i])
  record = first[2]
  assert record['image'].shape == (64, 64, 3) and record['image'].dtype == np.uint8
  assert record['identity'].shape == (9,) and record['identity'].dtype == np.int32
  assert record['context'].shape == (3,) and record['context'].dtype == np.int32
  other_seed, other_split = SyntheticFaces(6, seed=4), SyntheticFaces(6, seed=3, split='heldout')
  assert any(not _records_equal(first[i], other_seed[i]) for i in range(6))
  assert any(not _records_equal(first[i], other_split[i]) for i in range(6))
  assert not np.array_equal(first[1]['image'], first[2]['image'])


def test_train_and_heldout_identities_are_disjoint():
  train = [Identity.from_array(SyntheticFaces(200, seed=0)[i]['identity']) for i in range(0, 200, 5)]
  rng = np.random.default_rng(0)
  train += [sample_identity(rng, 'train') for _ in range(300)]
  heldout = [sample_identity(rng, 'heldout') for _ in range(300)]
  heldout += [Identity.from_array(r) for r in
              (SyntheticFaces(40, seed=0, split='heldout').sample(i)[0].to_array() for i in range(40))]
  assert not any(i.is_heldout for i in train)
  assert all(i.is_heldout for i in heldout)
  assert not set(train) & set(heldout)


def test_heldout_fraction_is_about_one_eighth():
  rng = np.random.default_rng(1)
  identities = [Identity(*(int(rng.integers(len(c))) for c in IDENTITY_ATTRIBUTES.values())) for _ in range(4000)]
  fraction = np.mean([i.is_heldout for i in identities])
  assert 0.09 < fraction < 0.16


def test_heldout_identities_are_distinct_and_deterministic():
  first = heldout_identities(25, seed=2)
  assert first == heldout_identities(25, seed=2)
  assert len(set(first)) == 25 and all(i.is_heldout for i in first)
  assert first != heldout_identities(25, seed=3)
  assert heldout_identities(5, seed=2) == first[:5]  # a prefix: growing the count keeps earlier concepts


def test_captions_name_only_the_context():
  source = SyntheticFaces(40, seed=5)
  for i in range(40):
    identity, context, _ = source.sample(i)
    caption = source[i]['caption'].item().decode()
    assert caption == context.template()
    assert caption.count('{}') == 1
    assert context.caption() == caption.format('face')
    assert CONTEXT_ATTRIBUTES['background'][context.background] in caption


def test_identity_and_context_round_trip():
  identity = Identity(1, 2, 0, 3, 1, 2, 4, 0, 3)
  assert Identity.from_array(identity.to_array()) == identity
  context = Context.from_names('blue', 'hat', 'small')
  assert Context.from_array(context.to_array()) == context
  assert context.caption() == 'a small face on a blue background wearing a hat'
  assert 'hair=' in identity.describe()


def test_render_shapes_and_background():
  identity = heldout_identities(1)[0]
  for index, (name, rgb) in enumerate(BACKGROUNDS.items()):
    image = render(identity, Context(background=index))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[63, 0]) == rgb, name  # the corner is background
  assert render(identity, size=32).shape == (32, 32, 3)
  assert np.array_equal(render(identity, jitter=(0.02, -0.01)), render(identity, jitter=(0.02, -0.01)))
  assert not np.array_equal(render(identity), render(identity, jitter=(0.03, 0.0)))


@pytest.mark.parametrize('make, message', [
    (lambda: Identity(4, 0, 0, 0, 0, 0, 0, 0, 0), r'Identity.head=4'),
    (lambda: Identity(0, -1, 0, 0, 0, 0, 0, 0, 0), r'Identity.skin=-1'),
    (lambda: Identity(0, 0, 0.5, 0, 0, 0, 0, 0, 0), r'Identity.eyes=0.5'),
    (lambda: Identity(True, 0, 0, 0, 0, 0, 0, 0, 0), r'Identity.head=True'),
    (lambda: Context(background=6), r'Context.background=6'),
    (lambda: Context.from_names('teal'), 'unknown context'),
    (lambda: SyntheticFaces(0), 'num_records'),
    (lambda: SyntheticFaces(3, split='test'), 'split'),
    (lambda: sample_identity(np.random.default_rng(0), 'valid'), 'split'),
    (lambda: render(Identity(0, 0, 0, 0, 0, 0, 0, 0, 0), size=8), 'size'),
])
def test_bad_inputs_raise_input_error(make, message):
  with pytest.raises(InputError, match=message) as info:
    make()
  assert '\n' not in str(info.value)


def test_record_index_out_of_range():
  with pytest.raises(IndexError):
    SyntheticFaces(3)[3]


def test_identity_is_hashable_and_frozen():
  identity = Identity(0, 0, 0, 0, 0, 0, 0, 0, 0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    identity.head = 1  # type: ignore[misc]
  assert len({identity, Identity(0, 0, 0, 0, 0, 0, 0, 0, 0)}) == 1
  assert synthetic.COARSE_WORD == 'face'


def test_identity_words_name_every_attribute_and_tell_identities_apart():
  rng = np.random.default_rng(0)
  identities = {sample_identity(rng) for _ in range(400)}
  words = {i.words() for i in identities}
  assert len(words) == len(identities)  # injective: the base model's captions can say who it is
  identity = Identity(head=0, skin=6, eyes=1, eye_color=2, ears=2, hair=2, hair_color=4, mouth=0, marking=3)
  assert identity.words('face') == ('round lilac face with emerald oval eyes, pointy ears, navy spikes, a smile '
                                    'and freckles')
  plain = dataclasses.replace(identity, ears=0, hair=0, marking=0)
  assert plain.words('<e4t>') == 'round lilac <e4t> with emerald oval eyes, no hair and a smile'
  # Background colours are named once per caption: no identity word is a background colour.
  for identity in identities:
    assert not set(identity.words().replace(',', '').split()) & set(BACKGROUNDS)
  assert Context().caption(plain.words()).startswith('a round lilac face with ')


def test_render_all_matches_the_records():
  source = SyntheticFaces(6, size=32, seed=9)
  arrays = source.render_all()
  for i in range(6):
    record = source[i]
    assert np.array_equal(arrays['images'][i], record['image'])
    assert np.array_equal(arrays['identity'][i], record['identity'])
    assert np.array_equal(arrays['context'][i], record['context'])
  # Rendered by worker processes (in chunks), the arrays are the same.
  masked = SyntheticFaces(7, size=32, seed=9, with_mask=True)
  serial, parallel = masked.render_all(), masked.render_all(workers=2)
  assert serial.keys() == parallel.keys() == {'images', 'identity', 'context', 'masks'}
  assert all(np.array_equal(serial[k], parallel[k]) for k in serial)
  assert np.array_equal(parallel['images'][:6], arrays['images'])  # the same records, mask or not
  with pytest.raises(InputError, match='workers'):
    source.render_all(workers=-1)


def test_pretraining_reads_face_masks_when_the_loss_mask_is_on():
  from e4t_jax.train import config as config_lib
  from e4t_jax.train import loop
  data = config_lib.DataConfig(source='synthetic_faces', synthetic_records=3)
  masked, plain = loop.make_source(data, 64, with_mask=True), loop.make_source(data, 64, with_mask=False)
  assert 'mask' not in plain[0]
  record = masked[0]
  assert record['mask'].shape == (64, 64) and 0 < record['mask'].mean() < 1
  np.testing.assert_array_equal(record['image'], plain[0]['image'])
