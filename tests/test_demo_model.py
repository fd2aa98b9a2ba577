"""The shipped demo model (`e4t_jax.load_demo()`, trained by `e4t demo-train`): it loads, personalizes a
held-out identity from one image, and `e4t demo` writes its outputs."""
import json

import jax
import numpy as np
import pytest

import e4t_jax
from e4t_jax.lab import evaluate
from e4t_jax.data import synthetic

pytestmark = pytest.mark.skipif(not (e4t_jax.DEMO_MODEL_DIR / 'e4t.json').is_file(),
                                reason='the trained demo model is not installed')


@pytest.fixture(scope='module')
def demo_model():
  return e4t_jax.load_demo()


def test_demo_model_is_small_and_trained_on_the_synthetic_domain(demo_model):
  size = sum(p.stat().st_size for p in e4t_jax.DEMO_MODEL_DIR.rglob('*') if p.is_file())
  assert size <= 30e6, size
  assert demo_model.config.coarse_word == synthetic.COARSE_WORD
  assert demo_model.modules.image_size == synthetic.IMAGE_SIZE


def test_shipped_readout_recognizes_unseen_identities():
  readout = evaluate.ReadoutModel.load(e4t_jax.DEMO_MODEL_DIR / 'readout.safetensors')
  identities = synthetic.heldout_identities(16, seed=123)
  contexts = [synthetic.Context(background=i % 6, accessory=i % 4, size=i % 2) for i in range(16)]
  images = np.stack([synthetic.render(i, c) for i, c in zip(identities, contexts)])
  true = evaluate.identity_scores(readout, images, identities).mean()
  shuffled = evaluate.identity_scores(readout, images, identities[1:] + identities[:1]).mean()
  assert true >= 0.9 and shuffled <= 0.5, (true, shuffled)


def test_demo_model_personalizes_one_held_out_identity(demo_model):
  from e4t_jax import personalize
  identity = synthetic.heldout_identities(1, seed=7)[0]
  context = synthetic.Context.from_names('red')
  fn = personalize.make_personalize_fn(demo_model, num_steps=2)
  concept = fn(demo_model.params, synthetic.render(identity, context), jax.random.key(0), prompt=context.template())
  trace = np.asarray(concept.loss_trace)
  assert np.all(np.isfinite(trace)) and int(concept.steps) == 2
  coarse = demo_model.params['text_encoder']['embeddings']['token_embedding']['embedding'][
      demo_model.modules.coarse_token_id]
  assert np.linalg.norm(np.asarray(concept.embedding) - np.asarray(coarse)) > 0  # w* moved off the coarse word


def test_e4t_demo_writes_inputs_grid_concepts_and_metrics(tmp_path):
  from e4t_jax.lab import demo
  metrics = demo.run(tmp_path, num_identities=1, tuning_steps=2)
  assert (tmp_path / 'grid.png').is_file() and (tmp_path / 'input_0.png').is_file()
  assert (tmp_path / 'concepts' / 'identity_0.e4t.safetensors').is_file()
  stored = json.loads((tmp_path / 'metrics.json').read_text())
  assert stored['e4t']['identity']['n'] == len(demo.DEMO_CONTEXTS) == metrics['e4t']['identity']['n']
  assert 0.0 <= stored['e4t']['prompt_fidelity']['mean'] <= 1.0
