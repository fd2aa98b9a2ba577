"""`e4t demo`: E4T end to end on the embedded demo model, in a few minutes on 2 CPU cores.

The demo model (`e4t_jax.load_demo()`) was trained by this project from scratch on a synthetic domain
of cartoon faces (`e4t demo-train`, see `e4t_jax.data.synthetic`). The demo takes 3 identities that
training never saw, personalizes the model to each from ONE image in 5 tuning steps, renders each
identity in 4 new contexts from prompts, and measures what came out:

  outputs/demo/input_<i>.png         the one image of each identity
  outputs/demo/concepts/             the concept files (w* + weight offsets, a few KB each)
  outputs/demo/generated/            every rendered image (PNG + JSON sidecar)
  outputs/demo/grid.png              rows: identities; columns: input, the 4 prompts, then the same
                                     prompts without the concept (the domain model alone)
  outputs/demo/metrics.json          identity and prompt-fidelity scores (`e4t_jax.evaluate`), timings
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from e4t_jax.fileio import atomic_write_bytes
from e4t_jax.errors import CheckpointError

# The 4 new contexts every identity is rendered in (none is the input's context).
DEMO_CONTEXTS = (('blue', 'hat', 'large'), ('yellow', 'glasses', 'large'), ('purple', 'bowtie', 'small'),
                 ('green', 'none', 'small'))
INPUT_BACKGROUNDS = ('red', 'black', 'red')
GUIDANCE_SCALE = 4.0
SAMPLING_STEPS = 25


def _log(message: str) -> None:
  print(f'[e4t demo] {message}', flush=True)


def run(out_dir: Path, seed: int = 0, tuning_steps: int = 5, num_identities: int = 3) -> dict:
  import e4t_jax
  from e4t_jax import personalize as personalize_lib
  from e4t_jax.lab import evaluate
  from e4t_jax import generation as generate_lib
  from e4t_jax.data import images as images_lib
  from e4t_jax.data import synthetic
  from e4t_jax.e4t import model as model_lib

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  if not (e4t_jax.DEMO_MODEL_DIR / 'e4t.json').is_file():
    raise CheckpointError(f'{e4t_jax.DEMO_MODEL_DIR}: the embedded demo model is missing; train it with '
                          '`e4t demo-train --workdir runs/demo --install` (about an hour on 2 CPU cores).')
  _log(f'loading the embedded demo model ({e4t_jax.DEMO_MODEL_DIR})')
  model = e4t_jax.load_demo()
  readout = evaluate.ReadoutModel.load(e4t_jax.DEMO_MODEL_DIR / 'readout.safetensors')
  metrics: dict = {'seed': seed, 'tuning_steps': tuning_steps,
                   'parameters': {name: model_lib.count_params(tree) for name, tree in model.params.items()}}

  identities = synthetic.heldout_identities(num_identities, seed=seed)
  input_contexts = [synthetic.Context.from_names(INPUT_BACKGROUNDS[i % len(INPUT_BACKGROUNDS)], 'none', 'large')
                    for i in range(num_identities)]
  inputs = [synthetic.render(identity, context) for identity, context in zip(identities, input_contexts)]
  for i, image in enumerate(inputs):
    atomic_write_bytes(out_dir / f'input_{i}.png', [images_lib.encode_png(image)])

  _log(f'compiling personalize_fn ({tuning_steps} tuning steps, ahead of time, once)')
  t0 = time.perf_counter()
  personalize_fn = personalize_lib.make_personalize_fn(model, num_steps=tuning_steps)
  metrics['personalize_compile_seconds'] = round(time.perf_counter() - t0, 2)

  concepts, latencies = [], []
  for i, (image, context) in enumerate(zip(inputs, input_contexts)):
    t0 = time.perf_counter()
    concept = personalize_fn(model.params, image, jax.random.key(seed * 1000 + i), prompt=context.template())
    jax.block_until_ready(concept.embedding)
    latencies.append(time.perf_counter() - t0)
    path = concept.save(out_dir / 'concepts' / f'identity_{i}.e4t.safetensors')
    concepts.append(concept)
    _log(f'identity {i}: one image, {tuning_steps} steps in {latencies[-1]:.2f} s -> {path} '
         f'({path.stat().st_size:,} bytes)')
  metrics['personalize_seconds_per_concept'] = [round(x, 3) for x in latencies]
  metrics['concept_bytes'] = (out_dir / 'concepts' / 'identity_0.e4t.safetensors').stat().st_size

  contexts = [synthetic.Context.from_names(*names) for names in DEMO_CONTEXTS]
  prompts = [c.template().format(model.config.placeholder) for c in contexts]
  plain_prompts = [c.caption(model.config.coarse_word) for c in contexts]
  all_prompts, all_concepts = [], []
  for concept in concepts:
    all_prompts += prompts + plain_prompts
    all_concepts += [concept] * len(prompts) + [None] * len(plain_prompts)
  _log(f'rendering {len(all_prompts)} images ({SAMPLING_STEPS} DPM-Solver++ steps, guidance {GUIDANCE_SCALE})')
  t0 = time.perf_counter()
  images = generate_lib.generate(model, all_concepts, all_prompts, num_steps=SAMPLING_STEPS,
                                 guidance_scale=GUIDANCE_SCALE, seed=seed)
  metrics['generate_seconds'] = round(time.perf_counter() - t0, 2)
  generate_lib.save_images(images, out_dir / 'generated', all_prompts,
                           {'seed': seed, 'steps': SAMPLING_STEPS, 'guidance_scale': GUIDANCE_SCALE})

  per = 2 * len(prompts)
  with_concept = np.concatenate([images[i * per:i * per + len(prompts)] for i in range(num_identities)])
  without = np.concatenate([images[i * per + len(prompts):(i + 1) * per] for i in range(num_identities)])
  truth = [identity for identity in identities for _ in prompts]
  metrics['e4t'] = evaluate.evaluate_images(readout, with_concept, truth, contexts * num_identities)
  metrics['no_concept'] = evaluate.evaluate_images(readout, without, truth, contexts * num_identities)

  tiles, labels = [], []
  for i in range(num_identities):
    tiles.append(inputs[i])
    labels.append(f'input {i} (one image)')
    tiles += list(images[i * per:(i + 1) * per])
    labels += prompts + [f'no concept: {p}' for p in plain_prompts]
  grid = generate_lib.make_grid(np.stack(tiles), labels, columns=1 + per)
  atomic_write_bytes(out_dir / 'grid.png', [images_lib.encode_png(grid)])

  metrics['total_seconds'] = round(time.perf_counter() - started, 1)
  atomic_write_bytes(out_dir / 'metrics.json', [json.dumps(metrics, indent=2).encode()])
  e4t, plain = metrics['e4t'], metrics['no_concept']
  _log(f'identity score {e4t["identity"]["mean"]:.2f} with the concept vs {plain["identity"]["mean"]:.2f} '
       f'without (chance {e4t["chance"]["identity"]:.2f}); prompt fidelity {e4t["prompt_fidelity"]["mean"]:.2f}')
  _log(f'done in {metrics["total_seconds"]} s; outputs in {out_dir}/')
  _log(f'the grid: {out_dir / "grid.png"}')
  return metrics
