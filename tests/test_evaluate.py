"""The evaluation judge: attribute read-out, identity / prompt-fidelity metrics, summaries, file I/O."""
import json

import jax
import numpy as np
import pytest

from e4t_jax.lab import evaluate
from e4t_jax.data.synthetic import (CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, Context, Identity, heldout_identities,
                                    render)
from e4t_jax.errors import CheckpointError, InputError

# A quick read-out (~15 s on 2 busy cores): small network, small pool, no augmentation (the test images
# are clean renders). It reads the coarse attributes well and the fine ones (eyes, mouth, marking)
# only partly: identity scores of true identities come out ~0.62 (the default read-out: ~0.98).
_QUICK = dict(num_steps=300, batch_size=32, num_records=1000, widths=(16, 32, 64), dense=128,
              learning_rate=3e-3, augment=False, progress=False)


@pytest.fixture(scope='module')
def readout():
  return evaluate.train_readout(seed=0, **_QUICK)


@pytest.fixture(scope='module')
def heldout_renders():
  """Held-out identities, each drawn in a context of its own (new to the read-out), with small jitter."""
  rng = np.random.default_rng(11)
  identities = heldout_identities(48, seed=5)
  contexts = [Context(*(int(rng.integers(len(c))) for c in CONTEXT_ATTRIBUTES.values())) for _ in identities]
  images = np.stack([render(i, c, jitter=tuple(rng.uniform(-0.03, 0.03, 2))) for i, c in zip(identities, contexts)])
  return images, identities, contexts


def _random_identity(rng):
  return Identity(*(int(rng.integers(len(c))) for c in IDENTITY_ATTRIBUTES.values()))


def test_identity_score_separates_true_from_random_identity(readout, heldout_renders):
  images, identities, _ = heldout_renders
  true = evaluate.identity_scores(readout, images, identities)
  rng = np.random.default_rng(0)
  others = []
  for identity in identities:
    other = _random_identity(rng)
    while other == identity:
      other = _random_identity(rng)
    others.append(other)
  random = evaluate.identity_scores(readout, images, others)
  assert true.shape == (48,) and true.dtype == np.float64
  assert np.all((true >= 0) & (true <= 1))
  # Random identities score near chance; true identities far above it, on (almost) every image.
  assert abs(random.mean() - evaluate.chance_identity_score()) <= 0.1, random.mean()
  # (This quick read-out: true ~0.62, random ~0.25, true > random on ~94% of images.)
  assert true.mean() >= 0.5, true.mean()
  assert true.mean() - random.mean() >= 0.25, (true.mean(), random.mean())
  assert np.mean(true > random) >= 0.85


class _TableReadout:
  """Stands in for a read-out: 'reads' fixed identities, whatever the images."""

  def __init__(self, identities):
    self.rows = np.stack([i.to_array() for i in identities])

  def predict(self, images):
    assert len(images) == len(self.rows)
    return {name: self.rows[:, k] for k, name in enumerate(IDENTITY_ATTRIBUTES)}


def test_identity_score_counts_visible_attributes_and_chance_level():
  bald, spikes = Identity(0, 0, 0, 0, 0, 0, 0, 0, 0), Identity(0, 0, 0, 0, 0, 2, 0, 0, 0)
  images = np.zeros((2, 64, 64, 3), np.uint8)
  # A bald target: its (invisible) hair colour is not scored, 8 attributes count.
  read = [Identity(0, 0, 0, 0, 0, 0, 3, 0, 0), Identity(1, 0, 0, 0, 0, 2, 3, 0, 0)]
  scores = evaluate.identity_scores(_TableReadout(read), images, [bald, spikes])
  np.testing.assert_allclose(scores, [1.0, 7 / 9])
  per_attribute = evaluate.identity_attribute_accuracy(_TableReadout(read), images, [bald, spikes])
  assert per_attribute['head'] == 0.5 and per_attribute['skin'] == 1.0
  assert per_attribute['hair_color'] == 0.0  # only the spiky face shows hair colour, and it was misread
  assert evaluate.identity_visibility(np.stack([bald.to_array(), spikes.to_array()])).sum(axis=1).tolist() == [8, 9]
  # Monte Carlo check of the chance level: unrelated random identities read against random targets.
  rng = np.random.default_rng(0)
  n = 4000
  targets = [_random_identity(rng) for _ in range(n)]
  others = [_random_identity(rng) for _ in range(n)]
  blank = np.broadcast_to(np.zeros((1, 64, 64, 3), np.uint8), (n, 64, 64, 3))
  chance = evaluate.identity_scores(_TableReadout(others), blank, targets).mean()
  assert abs(chance - evaluate.chance_identity_score()) < 0.01
  assert 0.2 < evaluate.chance_identity_score() < 0.3


def test_background_is_measured_exactly_from_pixels(heldout_renders):
  images, _, contexts = heldout_renders
  measured = evaluate.background_from_pixels(images)
  assert measured.dtype == np.int32
  assert np.array_equal(measured, [c.background for c in contexts])
  identity = heldout_identities(1)[0]
  every = np.stack([render(identity, Context(b, a, s)) for b in range(6) for a in range(4) for s in range(2)])
  assert np.array_equal(evaluate.background_from_pixels(every), np.repeat(np.arange(6), 8))
  # The border median survives the blur and noise of a generated image.
  blurry = evaluate.degrade(images, blur_sigma=1.5, noise_sigma=0.1)
  assert np.array_equal(evaluate.background_from_pixels(blurry), [c.background for c in contexts])


def test_degrade(heldout_renders):
  images = heldout_renders[0][:4]
  assert np.array_equal(evaluate.degrade(images, 0.0, 0.0), images)
  blurred = evaluate.degrade(images, 1.0, 0.0)
  assert blurred.dtype == np.uint8 and blurred.shape == images.shape
  assert not np.array_equal(blurred, images)
  assert abs(blurred.astype(float).mean() - images.astype(float).mean()) < 1.0  # blur keeps the mean
  noisy = evaluate.degrade(images, 0.0, 0.05, seed=1)
  assert np.array_equal(noisy, evaluate.degrade(images, 0.0, 0.05, seed=1))
  assert 5 < np.abs(noisy.astype(float) - images).mean() < 15
  with pytest.raises(InputError, match='blur_sigma'):
    evaluate.degrade(images, -1.0)


def test_context_scores(readout, heldout_renders):
  images, _, contexts = heldout_renders
  scores = evaluate.context_scores(readout, images, contexts)
  assert set(scores) == {'background', 'accessory', 'size', 'prompt_fidelity'}
  assert all(v.shape == (48,) for v in scores.values())
  assert np.all(scores['background'] == 1.0)
  assert scores['size'].mean() >= 0.9 and scores['accessory'].mean() >= 0.6
  np.testing.assert_allclose(scores['prompt_fidelity'],
                             (scores['background'] + scores['accessory'] + scores['size']) / 3)
  # The same images judged against contexts they were not drawn in score lower.
  wrong = [Context((c.background + 1) % 6, (c.accessory + 1) % 4, 1 - c.size) for c in contexts]
  assert evaluate.context_scores(readout, images, wrong)['prompt_fidelity'].mean() <= 0.2


def test_evaluate_images_is_json_friendly(readout, heldout_renders):
  images, identities, contexts = heldout_renders
  result = evaluate.evaluate_images(readout, images[:8], identities[:8], contexts[:8])
  json.dumps(result)
  assert set(result) == {'identity', 'identity_attributes', 'background', 'accessory', 'size', 'prompt_fidelity',
                         'chance'}
  assert set(result['identity_attributes']) == set(IDENTITY_ATTRIBUTES)
  assert result['identity']['n'] == 8 and isinstance(result['identity']['mean'], float)
  assert result['chance']['size'] == 0.5


def test_summarize():
  values = np.r_[np.ones(60), np.zeros(40)]
  normal = evaluate.summarize(values)
  assert normal['mean'] == pytest.approx(0.6) and normal['n'] == 100
  assert normal['ci95'] == pytest.approx(1.96 * values.std(ddof=1) / 10)
  boot = evaluate.summarize(values, method='bootstrap', num_resamples=4000)
  assert boot['ci95'] == pytest.approx(normal['ci95'], rel=0.15)
  assert boot == evaluate.summarize(values, method='bootstrap', num_resamples=4000)  # seeded
  assert np.isnan(evaluate.summarize([0.5])['ci95'])
  assert all(type(v) in (float, int) for v in normal.values())
  with pytest.raises(InputError, match='at least one'):
    evaluate.summarize([])
  with pytest.raises(InputError, match='method'):
    evaluate.summarize(values, method='t')


def test_predict_any_batch_size(readout, heldout_renders):
  images, _, _ = heldout_renders
  full = readout.predict(images)
  assert set(full) == set(IDENTITY_ATTRIBUTES) | set(CONTEXT_ATTRIBUTES)
  assert all(v.shape == (48,) and v.dtype == np.int32 for v in full.values())
  chunked = readout.predict(images[:13], batch_size=5)
  single = readout.predict(images[3])
  for name in full:
    assert np.array_equal(chunked[name], full[name][:13])
    assert single[name].tolist() == [full[name][3]]
  assert all(v.shape == (0,) for v in readout.predict(np.zeros((0, 64, 64, 3), np.uint8)).values())


def test_bad_inputs(readout, heldout_renders):
  images, identities, contexts = heldout_renders
  with pytest.raises(InputError, match='uint8'):
    readout.predict(images.astype(np.float32))
  with pytest.raises(InputError, match=r'\[N, 64, 64, 3\]'):
    evaluate.background_from_pixels(images[:, :32])
  with pytest.raises(InputError, match='48 images but 47 identities'):
    evaluate.identity_scores(readout, images, identities[:-1])
  with pytest.raises(InputError, match='Context objects'):
    evaluate.context_scores(readout, images[:1], [identities[0]])
  with pytest.raises(InputError, match='num_steps'):
    evaluate.train_readout(num_steps=0, progress=False)


def test_save_load_round_trip(readout, heldout_renders, tmp_path):
  images, _, _ = heldout_renders
  path = tmp_path / 'judge' / 'readout.safetensors'
  readout.save(path)
  loaded = evaluate.ReadoutModel.load(path)
  assert loaded.module == readout.module
  for name, values in readout.predict(images).items():
    assert np.array_equal(loaded.predict(images)[name], values)
  assert evaluate.load_or_train_readout(path).module == readout.module  # loads, does not train
  assert not list(path.parent.glob('*.tmp'))


def test_corrupt_or_missing_file(readout, tmp_path):
  missing = tmp_path / 'nothing.safetensors'
  with pytest.raises(InputError, match='nothing.safetensors'):
    evaluate.ReadoutModel.load(missing)
  path = tmp_path / 'readout.safetensors'
  readout.save(path)
  data = path.read_bytes()
  for name, content in [('truncated', data[:len(data) // 2]), ('garbage', b'not a safetensors file at all'),
                        ('empty', b'')]:
    bad = tmp_path / f'{name}.safetensors'
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=f'{name}.safetensors') as info:
      evaluate.ReadoutModel.load(bad)
    assert '\n' not in str(info.value)


def test_foreign_safetensors_file_is_rejected(tmp_path):
  from e4t_jax.fileio import write_safetensors
  path = tmp_path / 'other.safetensors'
  write_safetensors(path, {'w': np.zeros(3, np.float32)}, metadata={'format': 'something-else'})
  with pytest.raises(CheckpointError, match='not an e4t read-out file'):
    evaluate.ReadoutModel.load(path)


def test_train_readout_is_deterministic(heldout_renders):
  settings = dict(num_steps=5, batch_size=8, num_records=16, widths=(8, 8), dense=16, augment=False, progress=False)
  first = evaluate.train_readout(seed=3, **settings)
  second = evaluate.train_readout(seed=3, **settings)
  other = evaluate.train_readout(seed=4, **settings)
  same = jax.tree_util.tree_map(np.array_equal, first.params, second.params)
  assert all(jax.tree_util.tree_leaves(same))
  assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, first.params, other.params)))
  # The augmentation draws from the step key only.
  images = jax.numpy.asarray(heldout_renders[0][:8])
  augment = jax.jit(evaluate.augment_images)
  a, b = augment(jax.random.key(0), images), augment(jax.random.key(0), images)
  assert np.array_equal(np.asarray(a), np.asarray(b)) and a.shape == images.shape
  assert not np.array_equal(np.asarray(a), np.asarray(augment(jax.random.key(1), images)))
  assert float(a.min()) >= 0.0 and float(a.max()) <= 255.0
