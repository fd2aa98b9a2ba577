"""Linear probe (issue 17): which identity attributes do the E4T encoder's CLIP inputs carry?

The E4T encoder reads the demo CLIP vision tower's hidden states (class token + mean patch token of the layers
in `e4t_config().encoder.clip_layers`). A ridge-regression probe on those features, fitted on train-split
renders and scored on held-out identities, bounds what any encoder on top of them can read: an attribute at
chance here cannot reach w*. A measurement, not a training path:

  python scripts/vision_probe.py OUT.json                     # the shipped model's tower
  python scripts/vision_probe.py OUT.json --model DIR         # another demo-train model folder
  python scripts/vision_probe.py OUT.json --train STEPS [--pool POOL.npz] [FIELD=VALUE ...]
      # a tower trained from scratch by demo-train's vision stage with vision_steps=STEPS (DemoTrainConfig
      # overrides as FIELD=VALUE), saved beside OUT.json as OUT.safetensors; POOL: a work folder's
      # stages/pool.npz (else the pool is rendered)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import e4t_jax
from e4t_jax.data import synthetic
from e4t_jax.e4t.encoder import pooled_clip_features
from e4t_jax.lab import demo_train as D
from e4t_jax.models.clip import CLIPVisionTransformer, clip_preprocess


def probe(tower: CLIPVisionTransformer, params, clip_layers, train_records=3000, heldout_records=600) -> dict:
  @jax.jit
  def features(images):
    pixels = clip_preprocess((images + 1.0) / 2.0, tower.config.image_size)
    hidden = tower.apply({'params': params}, pixels).hidden_states
    return jnp.concatenate(pooled_clip_features(hidden, clip_layers), -1)

  def data(split, n, seed):
    arrays = synthetic.SyntheticFaces(n, seed=seed, split=split).render_all()
    x = np.concatenate([np.asarray(features(jnp.asarray(D._to_unit(arrays['images'][i:i + 100]))))
                        for i in range(0, n, 100)])
    return x, arrays['identity']

  x_train, y_train = data('train', train_records, 1)
  x_test, y_test = data('heldout', heldout_records, 2)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  a = np.c_[(x_train - mean) / std, np.ones(len(x_train))]
  b = np.c_[(x_test - mean) / std, np.ones(len(x_test))]
  gram = a.T @ a + 10.0 * np.eye(a.shape[1])
  out = {}
  for j, (name, choices) in enumerate(synthetic.IDENTITY_ATTRIBUTES.items()):
    weights = np.linalg.solve(gram, a.T @ np.eye(len(choices))[y_train[:, j]])
    out[name] = round(float(np.mean((b @ weights).argmax(1) == y_test[:, j])), 3)
  out['mean'] = round(float(np.mean(list(out.values()))), 3)
  return out


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('out')
  parser.add_argument('--model', default=None)
  parser.add_argument('--train', type=int, default=None, metavar='STEPS')
  parser.add_argument('--pool', default=None)
  parser.add_argument('overrides', nargs='*', metavar='FIELD=VALUE')
  args = parser.parse_intermixed_args(argv)
  clip_layers = D.e4t_config().encoder.clip_layers
  result = {'clip_layers': list(clip_layers)}
  if args.train is None:
    model = e4t_jax.load(args.model) if args.model else e4t_jax.load_demo()
    result['model'] = args.model or 'e4t_jax/assets/demo_model'
    tower, params = model.modules.image_encoder, model.params['image_encoder']
  else:
    config = D.with_overrides(D.DemoTrainConfig(vision_steps=args.train), args.overrides)
    _, _, _, vision_config = D.architecture(config)
    pool = D.load_pool(Path(args.pool)) if args.pool else D.render_pool(config.pool_size, config.seed)
    start = time.time()
    params, summary = D.train_vision(config, vision_config, pool)
    result.update(vision_steps=args.train, overrides=args.overrides, seconds=round(time.time() - start, 1),
                  final_loss=float(np.mean([v for _, v in summary['losses'][-50:]])))
    D.write_params(Path(args.out).with_suffix('.safetensors'), params)
    tower = CLIPVisionTransformer(vision_config, with_projection=False, scan_layers=False)
  result['probe'] = probe(tower, params, clip_layers)
  Path(args.out).write_text(json.dumps(result, indent=2))
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main(sys.argv[1:])
