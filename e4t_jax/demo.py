"""`e4t demo`: the whole system end to end on the embedded tiny model, in about a minute on 2 CPU cores.

Until the trained demo model ships (it is trained by the project on a synthetic domain), the tiny
model has random weights: the demo then proves the machinery — domain pretraining steps, compile-once
personalization, concept files, generation, the diffusers on-disk layout — not image quality.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from e4t_jax.convert.common import atomic_write_bytes


def _log(message: str) -> None:
  print(f'[e4t demo] {message}', flush=True)


def run(out_dir: Path, seed: int = 0, pretrain_steps: int = 10, tuning_steps: int = 5) -> dict:
  from e4t_jax import personalize as personalize_lib
  from e4t_jax.convert import pipeline
  from e4t_jax.data import images as images_lib
  from e4t_jax.data.loader import make_loader
  from e4t_jax.data.sources import SyntheticSource
  from e4t_jax.e4t import model as model_lib
  from e4t_jax.train import step as step_lib

  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  metrics: dict = {'seed': seed, 'weights': 'random (the trained demo model is not shipped yet)'}
  started = time.perf_counter()

  _log('building the tiny E4T model (SD-architecture U-Net, VAE, CLIP text + vision; random weights)')
  import e4t_jax
  model = e4t_jax.load_demo()
  metrics['parameters'] = {name: model_lib.count_params(tree) for name, tree in model.params.items()}

  _log('round-tripping the base model through the diffusers/transformers folder layout')
  sd = pipeline.StableDiffusion(model.modules.unet, model.modules.vae, model.modules.text_encoder,
                                pipeline.CLIPTokenizer.default(), dict(pipeline.SD1_SCHEDULER_CONFIG),
                                {k: model.params[k] for k in ('unet', 'vae', 'text_encoder')})
  pipeline.save_stable_diffusion(out_dir / 'base_model', sd)
  reloaded = pipeline.load_stable_diffusion(out_dir / 'base_model')
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sd.params), jax.tree.leaves(reloaded.params)))
  metrics['diffusers_round_trip_bit_exact'] = bool(same)

  size = model.modules.image_size
  _log(f'domain pretraining: {pretrain_steps} steps on a synthetic domain ({size}x{size})')
  optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=2))
  state, frozen = step_lib.create_train_state(model, optimizer)
  train_step = jax.jit(step_lib.make_train_step(model.modules, optimizer), donate_argnums=0)
  loader = iter(make_loader(SyntheticSource(256, size, seed=seed), global_batch_size=4, seed=seed))
  prompt_ids = model.modules.tokenize(['a photo of *'] * 4)
  losses = []
  for step in range(pretrain_steps):
    batch = next(loader)
    state, step_metrics = train_step(state, frozen, {'images': batch['images'], 'input_ids': prompt_ids},
                                     jax.random.fold_in(jax.random.key(seed), step))
    losses.append(float(step_metrics['loss']))
  metrics['pretrain_losses'] = losses
  params = model_lib.merge_params(state.trainable, frozen)
  model = model_lib.E4TModel(model.modules, params)

  _log(f'compiling personalize_fn ({tuning_steps} tuning steps, ahead of time)')
  t0 = time.perf_counter()
  personalize_fn = personalize_lib.make_personalize_fn(model, num_steps=tuning_steps)
  metrics['personalize_compile_seconds'] = round(time.perf_counter() - t0, 2)

  source = SyntheticSource(16, size * 2, seed=seed + 1)
  concept_dir = out_dir / 'concepts'
  latencies = []
  for index in range(3):
    image = source[index]['image']
    atomic_write_bytes(out_dir / f'input_{index}.png', [images_lib.encode_png(image)])
    t0 = time.perf_counter()
    concept = personalize_fn(model.params, image, jax.random.key(index))
    jax.block_until_ready(concept.embedding)
    latencies.append(time.perf_counter() - t0)
    path = concept.save(concept_dir / f'concept_{index}.e4t.safetensors')
    _log(f'concept {index}: {tuning_steps} steps in {latencies[-1]:.2f} s, loss trace '
         f'[{", ".join(f"{x:.3f}" for x in np.asarray(concept.loss_trace))}] -> {path} ({path.stat().st_size} bytes)')
  metrics['personalize_seconds_per_concept'] = [round(x, 3) for x in latencies]
  metrics['concept_bytes'] = (concept_dir / 'concept_0.e4t.safetensors').stat().st_size

  try:
    from e4t_jax import generate as generate_lib
  except ImportError:  # generation lands with its own issue
    generate_lib = None
  if generate_lib is not None:
    prompts = ['a photo of *', 'a painting of *', 'a photo of * on the beach', 'a drawing of a face']
    concept = personalize_lib.Concept.load(concept_dir / 'concept_0.e4t.safetensors')
    # Several concepts (or none) in one batch: the last prompt renders the plain domain model.
    images = generate_lib.generate(model, [concept, concept, concept, None], prompts, num_steps=10, seed=seed)
    paths = generate_lib.save_images(images, out_dir / 'generated', prompts, {'seed': seed, 'steps': 10})
    metrics['generated'] = [str(p) for p in paths]

  metrics['total_seconds'] = round(time.perf_counter() - started, 1)
  atomic_write_bytes(out_dir / 'metrics.json', [json.dumps(metrics, indent=2).encode()])
  _log(f'done in {metrics["total_seconds"]} s; outputs in {out_dir}/ (metrics.json, concepts/, input_*.png'
       + (', generated/' if generate_lib is not None else '') + ')')
  if generate_lib is not None:
    _log(f'the grid: {out_dir / "generated" / "grid.png"}')
  return metrics
