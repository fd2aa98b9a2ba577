"""Personalization benchmark: compile cost, per-concept latency, memory, and a PyTorch baseline.

    from e4t_jax.bench import personalize as bench
    result = bench.run_personalize_bench('tiny', baseline='torch', json_out='bench.json')
    print(bench.format_table(result))

(CLI: `e4t bench personalize --config tiny [--baseline torch] [--abstract] --json OUT`.)

Two modes. CONCRETE (`abstract=False`, config 'tiny': a random tiny E4T model, real execution) and
ABSTRACT (`abstract=True`, any config; 'sd15' is the full-size Stable Diffusion 1.5 + OpenCLIP ViT-H/14
model at 512 px): the personalization program is lowered and compiled from ShapeDtypeStruct params,
nothing is executed, and no weights are needed.

The JSON schema ('e4t-bench-personalize/1', every key) is in `docs/performance.md`.

Every program here is built by `personalize.tuning_program`, the function `make_personalize_fn` and
`personalize_many` compile, so the benchmark measures the shipped code, not a copy of it.
"""
from __future__ import annotations

import argparse
import datetime
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e4t_jax import personalize as personalize_lib
from e4t_jax import runtime
from e4t_jax.bench import harness
from e4t_jax.e4t import concept as concept_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import prompts as prompts_lib
from e4t_jax.e4t.encoder import EncoderConfig, every_second_layer
from e4t_jax.e4t.offsets import OffsetsConfig
from e4t_jax.errors import ConfigError

SCHEMA = 'e4t-bench-personalize/1'
WORKER_MODULE = 'e4t_jax.bench.personalize'  # `python -m` runs its worker stages
CONFIGS = ('tiny', 'sd15', 'sdxl')
BASELINES = (None, 'torch')
# Variants of the abstract analysis: compute dtype, and '+remat' = the U-Net rematerialized per block
# with the 'nothing_saveable' policy (memory for recompute). ABSTRACT_DTYPES run by default.
ABSTRACT_DTYPES = ('float32', 'bfloat16', 'float32+remat', 'bfloat16+remat')
# Further modifier: '+unrolled' = the CLIP towers' layers unrolled (one traced copy per layer) instead of
# scanned, the layout before issue 19, for compile-time comparisons (e.g. 'float32+unrolled').
VARIANT_MODIFIERS = ('remat', 'unrolled')


def parse_variant(name: str) -> tuple[str, frozenset[str]]:
  """'bfloat16+remat+unrolled' -> ('bfloat16', {'remat', 'unrolled'}); ConfigError naming the grammar."""
  base, *modifiers = name.split('+')
  if base not in ('float32', 'bfloat16') or not set(modifiers) <= set(VARIANT_MODIFIERS) or len(set(modifiers)) < len(
      modifiers):
    raise ConfigError(f'unknown abstract variant {name!r}: float32 or bfloat16, then optionally '
                      f'{" / ".join("+" + m for m in VARIANT_MODIFIERS)}.')
  return base, frozenset(modifiers)

_MISSING_ALWAYS = (
    'GPU/TPU numbers: measured on a CPU-only machine; no accelerator figures.',
)


# ----------------------------------------------------------------------------- configs
def tiny_e4t_config() -> model_lib.E4TConfig:
  """The demo's E4T settings on the tiny architecture (random weights; timing does not depend on values)."""
  return model_lib.E4TConfig(coarse_word='face', encoder=EncoderConfig(hidden_dim=64, clip_layers=(-1, -2)),
                             offsets=OffsetsConfig(rank=4))


def full_size_e4t_config() -> model_lib.E4TConfig:
  """The reference's encoder on ViT-H/14: width 1280, every second CLIP layer."""
  return model_lib.E4TConfig(encoder=EncoderConfig(hidden_dim=1280, clip_layers=every_second_layer(32)))


def check_config(config_name: str) -> None:
  if config_name not in CONFIGS:
    raise ConfigError(f'unknown benchmark config {config_name!r}; known: {list(CONFIGS)}.')


def build_model(config_name: str, seed: int = 0) -> model_lib.E4TModel:
  """A concrete (random-weight) model; only 'tiny' fits a CPU benchmark."""
  check_config(config_name)
  if config_name != 'tiny':
    raise ConfigError(f'config {config_name!r} is full size: without weights and an accelerator it can only be '
                      'analysed abstractly (pass abstract=True / --abstract).')
  return model_lib.init_tiny(jax.random.key(seed), tiny_e4t_config())


def build_abstract_model(config_name: str, dtype: Any = jnp.float32, scan_layers: bool = True) -> model_lib.E4TModel:
  """The model of `config_name` with ShapeDtypeStruct params and `dtype` compute (`scan_layers`: the CLIP
  towers' layer layout)."""
  from e4t_jax.models import presets
  from e4t_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
  from e4t_jax.models.unet import UNetConfig
  from e4t_jax.models.vae import VAEConfig
  check_config(config_name)
  if config_name == 'tiny':
    return model_lib.abstract_model(tiny_e4t_config(), UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny(),
                                    CLIPVisionConfig.tiny(), dtype=dtype, scan_layers=scan_layers)
  if config_name == 'sdxl':
    unet, vae, text, text_2 = presets.sdxl()
    return model_lib.abstract_model(full_size_e4t_config(), unet, vae, text, presets.clip_vit_h14(), dtype=dtype,
                                    scan_layers=scan_layers, text_2=text_2)
  unet, vae, text = presets.sd15()
  return model_lib.abstract_model(full_size_e4t_config(), unet, vae, text, presets.clip_vit_h14(), dtype=dtype,
                                  scan_layers=scan_layers)


# ----------------------------------------------------------------------------- subprocess workers


def _warm_compile_worker(config_name: str, num_steps: int, cache_dir: str, mode: str = 'lite',
                         micro_batch: int | None = None) -> None:
  """Second-process half of the compile measurement: same model shapes, same cache directory."""
  started = time.perf_counter()
  model = build_model(config_name)
  init_s = time.perf_counter() - started
  with harness.JaxEvents() as events:
    t0 = time.perf_counter()
    tuning = personalize_lib.TuningConfig(mode=mode, micro_batch=micro_batch)
    personalize_lib.make_personalize_fn(model, num_steps, tuning=tuning,
                                        cache_dir=cache_dir)
    compile_s = time.perf_counter() - t0
  seconds = lambda event: float(events.seconds[event])
  harness.emit({'stage': 'warm_compile', 'compile_s': compile_s, 'init_s': init_s,
                'backend_s': seconds(harness.BACKEND_COMPILE_EVENT), 'trace_s': seconds(harness.TRACE_EVENT),
                'lower_s': seconds(harness.LOWER_EVENT), 'cache_hits': events.counts[harness.CACHE_HIT_EVENT],
                'cache_misses': events.counts[harness.CACHE_MISS_EVENT]})


def step_cost(modules: model_lib.E4TModules, params: Any, tuning: personalize_lib.TuningConfig) -> dict:
  """FLOPs / bytes / transcendentals of ONE tuning step of `tuning_program`, either mode: XLA's cost
  analysis counts a loop body once whatever the trip count, so this lowers the program unrolled for 2 steps
  and for 1 and takes the difference (the image features and the read-out cancel out)."""
  size = modules.image_size
  args = (params, jax.ShapeDtypeStruct((size, size, 3), jnp.float32), jax.eval_shape(lambda: jax.random.key(0)),
          jax.ShapeDtypeStruct((), jnp.int32))
  costs = [runtime.cost_stats(jax.jit(personalize_lib.tuning_program(
      modules, dataclasses.replace(tuning, num_steps=steps), unroll=True)).lower(*args)) for steps in (1, 2)]
  return {k: None if costs[0][k] is None or costs[1][k] is None else costs[1][k] - costs[0][k] for k in costs[0]}


def abstract_analysis(config_name: str, dtype_name: str, num_steps: int, compile_program: bool,
                      emit: Callable[[dict], None], mode: str = 'lite', micro_batch: int | None = None,
                      views: int | None = None) -> None:
  """Lowers (and compiles) the personalization program of `config_name` from abstract params.

  Calls `emit` with a 'lowered' record, then (when `compile_program`) a 'compiled' record; the
  benchmark runs this in a worker process (`--abstract-worker`) that prints each record at once.
  """
  base_dtype, modifiers = parse_variant(dtype_name)
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[base_dtype]
  model = build_abstract_model(config_name, dtype, scan_layers='unrolled' not in modifiers)
  if 'remat' in modifiers:
    model = model_lib.E4TModel(
        dataclasses.replace(model.modules, unet=model.modules.unet.clone(remat_policy='nothing_saveable')),
        model.params)
  modules, params = model.modules, model.params
  tuning = personalize_lib.TuningConfig(num_steps=num_steps, mode=mode, micro_batch=micro_batch,
                                        **({} if views is None else {'batch_size': views}))
  size = modules.image_size
  image = jax.ShapeDtypeStruct((size, size, 3), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))

  lower = lambda m, p: jax.jit(personalize_lib.tuning_program(m, tuning)).lower(
      p, image, key, jax.ShapeDtypeStruct((), jnp.int32))
  t0 = time.perf_counter()
  lowered = lower(modules, params)
  lower_s = time.perf_counter() - t0
  # FLOPs from the twin with unrolled CLIP layers: the cost analysis counts a scanned layer once.
  counted = model_lib.unrolled_clip(model_lib.E4TModel(modules, params))
  program_cost = runtime.cost_stats(lower(counted.modules, counted.params) if counted.modules is not modules
                                    else lowered)

  one_step = step_cost(counted.modules, counted.params, tuning)
  estimate = None
  if program_cost['flops'] is not None and one_step['flops'] is not None:
    estimate = program_cost['flops'] + (num_steps - 1) * one_step['flops']
  emit({'stage': 'lowered', 'lower_s': lower_s, 'lowered_program': program_cost, 'lowered_step': one_step,
        'stablehlo': runtime.program_size(lowered),
         'flops_total_estimate': estimate,
         'lowered_components': _component_costs(counted.modules, counted.params, tuning)})

  if compile_program:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    emit({'stage': 'compiled', 'compile_s': compile_s, 'memory': runtime.memory_stats(compiled),
          'hlo': runtime.program_size(compiled),
           'cost': runtime.cost_stats(compiled)})


def _component_costs(modules: model_lib.E4TModules, params: dict, tuning: personalize_lib.TuningConfig
                     ) -> dict[str, dict[str, float | None]]:
  """Forward-pass cost of each network at the shapes one tuning step feeds it (lowered, unfused):
  shows where a step's FLOPs go, and how much of it does not change from step to step (the VAE
  encoder's moments, CLIP on the fixed image, the coarse prompt)."""
  from e4t_jax.models.clip import clip_preprocess
  from e4t_jax.models.vae import AutoencoderKL
  batch, size = tuning.batch_size, modules.image_size
  unet_cfg, vision_size = modules.unet.config, modules.image_encoder.config.image_size
  side = unet_cfg.sample_size
  sds = jax.ShapeDtypeStruct
  images = sds((batch, size, size, 3), jnp.float32)
  latents = sds((batch, side, side, unet_cfg.in_channels), jnp.float32)
  timesteps = sds((batch,), jnp.int32)
  ids = sds((batch, modules.coarse_prompt_ids.shape[1]), jnp.int32)
  text_params = prompts_lib.text_params_of(params)
  encode = lambda p, i: prompts_lib.text_condition(modules, p, i)  # SDXL: both encoders, an SDXLContext
  context = jax.eval_shape(encode, text_params, ids)
  unet, vae = modules.unet, modules.vae
  programs = {
      'vae_encoder': (lambda p, x: vae.apply({'params': p}, x, method=AutoencoderKL.encode).mean,
                      params['vae'], images),
      'clip_vision': (lambda p, x: modules.image_encoder.apply({'params': p}, clip_preprocess(x, vision_size)),
                      params['image_encoder'], images),
      'text_encoder': (encode, text_params, ids),
      'unet_contracting_path': (lambda p, x, t, c: unet.apply({'params': p}, x, t, c, features_only=True),
                                params['unet'], latents, timesteps, context),
      'unet_forward': (lambda p, x, t, c: unet.apply({'params': p}, x, t, c), params['unet'], latents, timesteps,
                       context),
  }
  return {name: runtime.cost_stats(jax.jit(fn).lower(*args)) for name, (fn, *args) in programs.items()}


def _worker_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m e4t_jax.bench.personalize', description='benchmark worker processes')
  stage = parser.add_mutually_exclusive_group(required=True)
  stage.add_argument('--warm-compile', action='store_true')
  stage.add_argument('--abstract-worker', action='store_true')
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--num-steps', type=int, default=5)
  parser.add_argument('--cache-dir')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--no-compile', action='store_true')
  parser.add_argument('--mode', default='lite', choices=personalize_lib.TUNING_MODES)
  parser.add_argument('--micro-batch', type=int, default=None)
  args = parser.parse_args(argv)
  if args.warm_compile:
    if not args.cache_dir:
      parser.error('--warm-compile needs --cache-dir')
    _warm_compile_worker(args.config, args.num_steps, args.cache_dir, args.mode, args.micro_batch)
  else:
    abstract_analysis(args.config, args.dtype, args.num_steps, not args.no_compile, harness.emit, args.mode,
                      args.micro_batch)
  return 0


# ----------------------------------------------------------------------------- the benchmark
def run_personalize_bench(config_name: str = 'tiny', *, num_steps: int = 5, num_concepts: int = 20, batch: int = 8,
                          baseline: str | None = None, abstract: bool = False,
                          json_out: str | os.PathLike | None = None, seed: int = 0, batched_repeats: int = 2,
                          torch_warmup: int = 2, torch_threads: Sequence[int] | None = None,
                          compile_timeout_s: float = 1800.0,
                          rss_limit_bytes: int | None = 16 * 2**30, mode: str = 'lite', micro_batch: int | None = None,
                          fused_repeats: int = 3, variants: Sequence[str] = ABSTRACT_DTYPES) -> dict:
  """Measures personalization and returns (and optionally writes) the result dict (keys: module docstring).

  Args:
    config_name: 'tiny' (concrete or abstract) or 'sd15' (full size; abstract only).
    num_steps: tuning steps per concept (the compiled maximum, all of them run).
    num_concepts: concepts timed one by one (20 or more for stable percentiles; fewer for smoke tests).
    batch: concepts per `personalize_many` call for the batched throughput; 0 skips that section
      (`batched` is then null), which saves its two compiles of the batched program.
    baseline: None, or 'torch': the same tuning in PyTorch eager, in this process.
    abstract: lower and compile from abstract params (no execution; float32 and bfloat16 compute).
    json_out: where to write the JSON (parent folders are created).
    seed: model init, images and PRNG keys.
    batched_repeats: executions of the compiled batched program for its steady-state time.
    torch_warmup: untimed torch runs before the timed ones (per thread count).
    torch_threads: torch intra-op thread counts to time; None: torch's default and 1 (on a small or
      shared CPU, OpenMP's spinning barriers can make the default far slower than one thread).
    compile_timeout_s, rss_limit_bytes: limits of each abstract compile worker process (it is killed
      beyond them and the lowering-only figures are reported).
    mode: the tuning mode measured, 'lite' or 'paper' (`TuningConfig.mode`).
    micro_batch: `TuningConfig.micro_batch` (views per gradient pass; None: all at once).
    fused_repeats: concrete mode: timed runs of `personalize_and_generate` and of personalize-then-generate
      (0 skips that section).
    variants: abstract mode: the variants compiled, one worker each (`parse_variant`); with a variant and
      its '+unrolled' twin, `clip_scan` reports the compile seconds of both and their ratio.
  Raises:
    ConfigError: unknown config or baseline, or a full-size config without `abstract`.
  """
  check_config(config_name)
  if mode not in personalize_lib.TUNING_MODES:
    raise ConfigError(f'unknown tuning mode {mode!r}; known: {list(personalize_lib.TUNING_MODES)}.')
  if baseline == 'torch' and micro_batch is not None:
    raise ConfigError('the PyTorch baseline tunes on the whole batch at once; run it without micro_batch.')
  if baseline not in BASELINES:
    raise ConfigError(f'unknown baseline {baseline!r}; known: {[b for b in BASELINES if b]}.')
  for name in variants:
    parse_variant(name)
  if abstract:
    if baseline is not None:
      raise ConfigError('the torch baseline needs real weights and execution; it does not combine with abstract=True.')
    result = _abstract_bench(config_name, num_steps, compile_timeout_s, rss_limit_bytes, mode, micro_batch,
                             tuple(variants))
  else:
    if num_concepts < 1 or batch < 0 or num_steps < 1:
      raise ConfigError('num_concepts and num_steps must be >= 1, batch >= 0.')
    result = _concrete_bench(config_name, num_steps=num_steps, num_concepts=num_concepts, batch=batch,
                             baseline=baseline, seed=seed, batched_repeats=batched_repeats, torch_warmup=torch_warmup,
                             torch_threads=torch_threads, mode=mode, fused_repeats=fused_repeats,
                             micro_batch=micro_batch)
  result['machine']['load_average_end'] = harness.load_average()
  if json_out is not None:
    harness.write_json(json_out, result)  # atomic: an interrupted run never leaves half a file
  return result


def _header(config_name: str, mode: str) -> dict:
  return {'schema': SCHEMA, 'mode': mode, 'config': config_name,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'machine': harness.machine_info(), 'missing': list(_MISSING_ALWAYS)}


def _concrete_bench(config_name: str, *, num_steps: int, num_concepts: int, batch: int, baseline: str | None,
                    seed: int, batched_repeats: int, torch_warmup: int, torch_threads: Sequence[int] | None,
                    mode: str = 'lite', fused_repeats: int = 3, micro_batch: int | None = None) -> dict:
  result = _header(config_name, 'concrete')
  model = build_model(config_name, seed)
  tuning = personalize_lib.TuningConfig(num_steps=num_steps, mode=mode, micro_batch=micro_batch)
  size = model.modules.image_size
  result['settings'] = {
      'mode': mode, 'num_steps': num_steps, 'num_concepts': num_concepts, 'batch': batch, 'seed': seed,
      'learning_rate': tuning.learning_rate, 'tuning_batch_size': tuning.batch_size,
      'micro_batch': tuning.micro_batch, 'image_size': size,
      'parameters': {name: model_lib.count_params(tree) for name, tree in model.params.items()}}
  images = harness.synthetic_images(max(num_concepts, batch) + 1, size, seed)
  keys = list(jax.random.split(jax.random.key(seed + 1), num_concepts + 1))

  with tempfile.TemporaryDirectory(prefix='e4t-bench-') as tmp:
    tmp = Path(tmp)
    cache_dir = tmp / 'xla-cache'
    with harness.scoped_persistent_cache(cache_dir):
      # Cold: nothing in the (fresh) persistent cache, and a new program object, so nothing in memory either.
      with harness.JaxEvents() as events:
        t0 = time.perf_counter()
        personalize_fn = personalize_lib.make_personalize_fn(model, num_steps, tuning=tuning)
        cold_s = time.perf_counter() - t0
      compile_stats = {'cold_s': cold_s, 'cold_trace_s': float(events.seconds[harness.TRACE_EVENT]),
                       'cold_lower_s': float(events.seconds[harness.LOWER_EVENT]),
                       'cold_backend_s': float(events.seconds[harness.BACKEND_COMPILE_EVENT]),
                       'cold_cache_misses': events.counts[harness.CACHE_MISS_EVENT],
                       'hlo': runtime.program_size(personalize_fn.compiled)}
      # Warm: a second process with the same shapes reads the executable from the shared cache.
      records, info = harness.run_worker(WORKER_MODULE, ['--warm-compile', '--config', config_name, '--num-steps',
                                                         str(num_steps), '--cache-dir', str(cache_dir),
                                                         '--mode', mode] + _micro_arg(micro_batch), timeout_s=900)
      warm = next((r for r in records if r.get('stage') == 'warm_compile'), None)
      if warm is None:
        raise RuntimeError(f'the warm-compile worker failed: {info}')
      compile_stats.update({'warm_s': warm['compile_s'], 'warm_backend_s': warm['backend_s'],
                            'warm_trace_s': warm['trace_s'], 'warm_lower_s': warm['lower_s'],
                            'warm_cache_hits': warm['cache_hits'], 'warm_cache_misses': warm['cache_misses'],
                            'warm_process_s': info['wall_s'], 'warm_speedup': cold_s / max(warm['compile_s'], 1e-9),
                            'cache_bytes': harness.directory_bytes(cache_dir)})
      result['compile'] = compile_stats

      # Per-concept latency. One untimed call first: the first execution of an executable pays one-time
      # allocation/thread-pool start-up that no later concept sees.
      jax.block_until_ready(personalize_fn(model.params, images[-1], keys[-1]))
      seconds, concepts, compilations = harness.timed_calls(
          personalize_fn, [(model.params, image, key) for image, key in zip(images[:num_concepts], keys[:num_concepts])])
      latency = harness.latency_stats(seconds)
      latency['concepts_per_s'] = 1.0 / latency['p50_s']
      latency['compilations'] = compilations
      result['latency'] = latency
      result['loss_trace_first'] = [float(x) for x in np.asarray(concepts[0].loss_trace)]
      result['concept_file_bytes'] = concepts[0].save(tmp / 'concept.e4t.safetensors').stat().st_size

      result['fused'] = _fused_bench(model, tuning, personalize_fn, images, keys, fused_repeats) if fused_repeats \
          else None
      result['batched'], batched_memory = None, None
      if batch:
        result['batched'], batched_memory = _batched_bench(model, tuning, images[:batch], seed, batched_repeats)
      else:
        result['missing'].append('batched throughput: skipped (batch=0).')
    result['memory'] = {'compiled': runtime.memory_stats(personalize_fn.compiled), 'compiled_batched': batched_memory,
                        'peak_rss_bytes': harness.peak_rss_bytes()}

    result['baseline'] = None
    if baseline == 'torch':
      result['baseline'] = _torch_baseline(model, tuning, images[:num_concepts], keys[:num_concepts], latency,
                                           concepts[0], tmp / 'torch', torch_warmup, torch_threads)
      result['memory']['peak_rss_bytes_after_baseline'] = harness.peak_rss_bytes()
  return result


def _batched_bench(model: model_lib.E4TModel, tuning: personalize_lib.TuningConfig, images: Sequence[np.ndarray],
                   seed: int, repeats: int) -> tuple[dict, dict | None]:
  """`personalize_many` end to end, then the same vmapped program compiled once and re-executed."""
  count = len(images)
  with harness.JaxEvents() as events:
    t0 = time.perf_counter()
    jax.block_until_ready(personalize_lib.personalize_many(model, images, num_steps=tuning.num_steps,
                                                           tuning=tuning, seed=seed))
    many_s = time.perf_counter() - t0
  stats = {'batch': count, 'personalize_many_s': many_s, 'personalize_many_concepts_per_s': count / many_s,
           'personalize_many_compilations': events.compilations,
           'personalize_many_compile_s': events.compile_seconds()}
  # Its steady state is measured on the identical program (`batched_program`, personalize_many's arguments)
  # compiled ahead of time here: the persistent cache written by the call above turns that compile into a load.
  size = model.modules.image_size
  pixels = np.stack([personalize_lib.prepare_image(image, size) for image in images])
  keys = jax.random.split(jax.random.key(seed), count)
  steps = np.full((count,), tuning.num_steps, np.int32)
  ids = np.stack([personalize_lib.tuning_ids(model.modules, tuning)] * count)
  args = (model.params, pixels, keys, steps, ids, None, personalize_lib.tuning_rates(tuning))
  with harness.JaxEvents() as events:
    compiled = personalize_lib.batched_program(model.modules, tuning, None).lower(*args).compile()
  stats['steady_compile_cache_hits'] = events.counts[harness.CACHE_HIT_EVENT]
  jax.block_until_ready(compiled(*args))  # untimed first execution
  seconds, _, compilations = harness.timed_calls(compiled, [args] * max(repeats, 1))
  stats.update({'steady_s': float(np.median(seconds)), 'steady_repeats': len(seconds),
                'steady_concepts_per_s': count / float(np.median(seconds)), 'steady_compilations': compilations})
  return stats, runtime.memory_stats(compiled)


def _micro_arg(micro_batch: int | None) -> list[str]:
  return [] if micro_batch is None else ['--micro-batch', str(micro_batch)]


def _abstract_bench(config_name: str, num_steps: int, compile_timeout_s: float, rss_limit_bytes: int | None,
                    mode: str = 'lite', micro_batch: int | None = None,
                    variants: Sequence[str] = ABSTRACT_DTYPES) -> dict:
  result = _header(config_name, 'abstract')
  model = build_abstract_model(config_name)
  encoder = model.modules.config.encoder
  trainable, _ = model_lib.split_params(model.params, model.modules.config.trainable_patterns)
  tuning = personalize_lib.TuningConfig(num_steps=num_steps, mode=mode, micro_batch=micro_batch)
  if mode == 'paper':  # the tuned U-Net kernels train too
    flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(model.params['unet']).items()}
    tuned = personalize_lib.tuned_unet_kernels(model.params['unet'], tuning)
    trainable = dict(trainable, unet=[flat[f'{p}/kernel'] for p in tuned])
  result['settings'] = {
      'mode': mode, 'num_steps': num_steps, 'learning_rate': tuning.learning_rate, 'tuning_batch_size': tuning.batch_size,
      'micro_batch': tuning.micro_batch,
      'image_size': model.modules.image_size,
      'parameters': {name: model_lib.count_params(tree) for name, tree in model.params.items()},
      'encoder': {'hidden_dim': encoder.hidden_dim, 'clip_layers': list(encoder.clip_layers)},
      'compile_timeout_s': compile_timeout_s, 'rss_limit_bytes': rss_limit_bytes}
  result['trainable_parameters'] = model_lib.count_params(trainable)
  result['parameter_bytes_float32'] = 4 * model_lib.count_params(model.params)
  result['adam_state_bytes'] = 2 * 4 * result['trainable_parameters']  # mu and nu, float32
  frozen_shapes = [leaf.shape for part in concept_lib.frozen_parts(model) for leaf in jax.tree.leaves(model.params[part])]
  result['fingerprint'] = {'frozen_bytes_float32': 4 * sum(int(np.prod(s)) for s in frozen_shapes),
                           'seconds': concept_lib.fingerprint_seconds(frozen_shapes),
                           'threads': min(8, os.cpu_count() or 1)}
  result['dtypes'] = {}
  for dtype_name in variants:
    # One process per dtype: a compile that runs out of time or memory is killed without taking the
    # benchmark with it, and each peak RSS is the compile's own.
    records, info = harness.run_worker(WORKER_MODULE, ['--abstract-worker', '--config', config_name, '--dtype',
                                                       dtype_name, '--num-steps', str(num_steps), '--mode', mode]
                                       + _micro_arg(micro_batch),
                                       timeout_s=compile_timeout_s, rss_limit_bytes=rss_limit_bytes)
    by_stage = {r['stage']: r for r in records}
    lowered, compiled = by_stage.get('lowered'), by_stage.get('compiled')
    lowered_keys = ('lower_s', 'lowered_program', 'lowered_step', 'flops_total_estimate', 'lowered_components',
                    'stablehlo')
    entry = dict.fromkeys(lowered_keys)
    entry.update({'compiled': None, 'worker': info})
    if lowered:
      entry.update({k: lowered[k] for k in lowered_keys})
    if compiled:
      entry['compiled'] = {k: compiled.get(k) for k in ('compile_s', 'memory', 'cost', 'hlo')}
    else:
      why = ('timed out' if info['timed_out'] else 'exceeded the memory limit' if info['killed_for_memory']
             else f'failed ({info["error"]})')
      result['missing'].append(f'{dtype_name}: the compile {why}; only lowering figures are reported.')
    result['dtypes'][dtype_name] = entry
  result['clip_scan'] = _clip_scan_comparison(result['dtypes'])
  return result


def _clip_scan_comparison(entries: dict) -> dict:
  """For each variant measured both ways: lowering (trace included) and compile seconds with the CLIP
  layers unrolled and scanned, the HLO sizes, and unrolled / scanned ratios (> 1: scanning is faster)."""
  out = {}
  for name, unrolled in entries.items():
    base, modifiers = parse_variant(name)
    if 'unrolled' not in modifiers:
      continue
    scanned_name = '+'.join([base] + [m for m in VARIANT_MODIFIERS if m in modifiers and m != 'unrolled'])
    scanned = entries.get(scanned_name)
    if scanned is None:
      continue
    row = {}
    for label, entry in (('unrolled', unrolled), ('scanned', scanned)):
      compiled = entry.get('compiled') or {}
      row[label] = {'lower_s': entry.get('lower_s'), 'compile_s': compiled.get('compile_s'),
                    'stablehlo_bytes': (entry.get('stablehlo') or {}).get('text_bytes'),
                    'hlo_bytes': (compiled.get('hlo') or {}).get('text_bytes')}
    for key in ('lower_s', 'compile_s', 'stablehlo_bytes', 'hlo_bytes'):
      a, b = row['unrolled'][key], row['scanned'][key]
      row[f'{key}_ratio'] = a / b if a and b else None
    out[scanned_name] = row
  return out


def _fused_bench(model: model_lib.E4TModel, tuning: personalize_lib.TuningConfig,
                 personalize_fn: personalize_lib.PersonalizeFn, images: Sequence[np.ndarray], keys: Sequence[jax.Array],
                 repeats: int, prompts: Sequence[str] = ('a photo of *', 'a painting of *'), sampling_steps: int = 25
                 ) -> dict:
  """`personalize_and_generate` (one program) against `personalize_fn` then `generate` (two), same keys,
  each warmed up first: seconds per image set, their ratio (< 1: the fused program is faster)."""
  import warnings  # pylint: disable=g-import-not-at-top
  from e4t_jax import generation  # pylint: disable=g-import-not-at-top
  sampling = dict(num_steps=sampling_steps, seed=0)
  fused = lambda image, key: generation.personalize_and_generate(
      model, image, list(prompts), tuning=tuning, num_tuning_steps=tuning.num_steps, rng=key, **sampling)
  separate = lambda image, key: generation.generate(model, personalize_fn(model.params, image, key), list(prompts),
                                                    **sampling)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', generation.GenerationWarning)
    jax.block_until_ready(fused(images[-1], keys[-1]))
    jax.block_until_ready(separate(images[-1], keys[-1]))
    arguments = list(zip(images[:repeats], keys[:repeats]))
    fused_s, _, fused_compilations = harness.timed_calls(fused, arguments)
    separate_s, _, separate_compilations = harness.timed_calls(separate, arguments)
  fused_stats, separate_stats = harness.latency_stats(fused_s), harness.latency_stats(separate_s)
  return {'prompts': len(prompts), 'sampling_steps': sampling_steps, 'personalize_and_generate': fused_stats,
          'personalize_then_generate': separate_stats, 'compilations': fused_compilations + separate_compilations,
          'fused_over_separate_p50': fused_stats['p50_s'] / separate_stats['p50_s']}


# ----------------------------------------------------------------------------- the PyTorch baseline
def _jax_draws(modules: model_lib.E4TModules, tuning: personalize_lib.TuningConfig, rng: jax.Array,
               image: np.ndarray | None = None) -> dict:
  """The random numbers the compiled tuning program draws from `rng`, re-derived outside it (same
  fold_in/split order as `tuning_program` and `draw_noise`), as NHWC numpy arrays; with `image` ([S, S, 3]
  in [0, 1]) and augmented views, the views too."""
  from e4t_jax.e4t.objective import draw_noise
  side = modules.unet.config.sample_size
  shape = (tuning.batch_size, side, side, modules.unet.config.in_channels)
  steps = []
  for i in range(tuning.num_steps):
    draws = draw_noise(modules, jax.random.fold_in(rng, i), jax.ShapeDtypeStruct(shape, jnp.float32))
    steps.append({name: np.asarray(getattr(draws, name)) for name in ('vae_eps', 'noise', 'timesteps')})
  k_vae, k_noise = jax.random.split(jax.random.fold_in(rng, tuning.num_steps))
  readout_shape = (len(tuning.readout_timesteps),) + shape[1:]
  readout = {'vae_eps': np.asarray(jax.random.normal(k_vae, (1,) + shape[1:], jnp.float32)),
             'noise': np.asarray(jax.random.normal(k_noise, readout_shape, jnp.float32))}
  result = {'steps': steps, 'readout': readout}
  if image is not None and tuning.augment:
    result['views'] = np.asarray(personalize_lib.make_views(
        jnp.asarray(image) * 2.0 - 1.0, jax.random.fold_in(rng, tuning.num_steps + 1), tuning.batch_size, True))
  return result


def _torch_baseline(model: model_lib.E4TModel, tuning: personalize_lib.TuningConfig, images: Sequence[np.ndarray],
                    keys: Sequence[jax.Array], jax_latency: dict, jax_first_concept, work_dir: Path,
                    warmup: int, threads: Sequence[int] | None) -> dict:
  import diffusers
  import torch
  import transformers
  t0 = time.perf_counter()
  from e4t_jax.bench.torch_reference import TorchE4T  # pylint: disable=g-import-not-at-top
  tuner = TorchE4T(model, work_dir)
  convert_s = time.perf_counter() - t0
  size = model.modules.image_size
  pixels = [personalize_lib.prepare_image(image, size) for image in images]

  # Parity: the first concept again, with the JAX program's own random draws.
  parity_draws = _jax_draws(model.modules, tuning, keys[0], pixels[0])
  torch_trace, torch_embedding = tuner.personalize(pixels[0], tuning, draws=parity_draws)
  jax_trace = np.asarray(jax_first_concept.loss_trace, np.float64)
  rel = np.abs(np.asarray(torch_trace) - jax_trace) / np.maximum(np.abs(jax_trace), 1e-12)
  parity = {'jax_loss_trace': [float(x) for x in jax_trace], 'torch_loss_trace': [float(x) for x in torch_trace],
            'first_step_rel_diff': float(rel[0]), 'max_rel_diff': float(rel.max()),
            'embedding_max_abs_diff': float(np.abs(np.asarray(torch_embedding) -
                                                   np.asarray(jax_first_concept.embedding)).max())}

  default_threads = torch.get_num_threads()
  thread_counts = list(dict.fromkeys(threads or (default_threads, 1)))
  by_threads = {}
  try:
    for count in thread_counts:
      torch.set_num_threads(count)
      for i in range(warmup):
        tuner.personalize(pixels[i % len(pixels)], tuning, generator=torch.Generator().manual_seed(10_000 + i))
      seconds = []
      for i, image in enumerate(images):
        t0 = time.perf_counter()
        # Host image preparation is inside the timed region, as it is inside `personalize_fn`.
        tuner.personalize(personalize_lib.prepare_image(image, size), tuning,
                          generator=torch.Generator().manual_seed(i))
        seconds.append(time.perf_counter() - t0)
      by_threads[str(count)] = harness.latency_stats(seconds)
  finally:
    torch.set_num_threads(default_threads)
  # The headline is the first thread count (torch's default unless `threads` says otherwise).
  stats = dict(by_threads[str(thread_counts[0])])
  best = min(by_threads.values(), key=lambda entry: entry['p50_s'])
  device = jax.devices()[0]
  stats.update({
      'framework': 'torch', 'mode': 'eager, float32, autograd; frozen passes under no_grad',
      'torch': torch.__version__, 'diffusers': diffusers.__version__, 'transformers': transformers.__version__,
      'torch_num_threads': thread_counts[0], 'torch_default_num_threads': default_threads,
      'by_threads': by_threads, 'jax_device': f'{device.platform}:{device.device_kind}',
      'convert_s': convert_s, 'warmup': warmup, 'jax_over_torch_p50': jax_latency['p50_s'] / stats['p50_s'],
      'jax_over_best_torch_p50': jax_latency['p50_s'] / best['p50_s'], 'parity': parity})
  return stats


# ----------------------------------------------------------------------------- reporting


def format_table(result: dict) -> str:
  """A short human-readable table of a `run_personalize_bench` result."""
  rows: list[tuple[str, str]] = []
  settings, machine = result['settings'], result['machine']
  rows.append(('config', f"{result['config']} ({result['mode']}, {settings.get('mode', 'lite')} tuning), "
                         f"{settings['num_steps']} steps, {settings['image_size']} px"))
  rows.append(('machine', f"{machine['cpu_model']}, {machine['cpu_count']} cores, {', '.join(machine['jax_devices'])}"))
  if result['mode'] == 'concrete':
    c, lat, b, mem = result['compile'], result['latency'], result['batched'], result['memory']
    rows += [
        ('compile, cold (this process)', harness.fmt_seconds(c['cold_s'])),
        ('compile, warm cache (2nd process)', f"{harness.fmt_seconds(c['warm_s'])} ({c['warm_speedup']:.1f}x faster, "
                                              f"{c['warm_cache_hits']} cache hit(s))"),
        (f"latency per concept (n={lat['n']})", f"p50 {harness.fmt_seconds(lat['p50_s'])}, p95 {harness.fmt_seconds(lat['p95_s'])}"),
        ('compilations during the loop', str(lat['compilations'])),
        ('concepts/s, one at a time', f"{lat['concepts_per_s']:.2f}"),
    ]
    if b:
      rows += [
          (f"concepts/s, batched x{b['batch']} (steady)", f"{b['steady_concepts_per_s']:.2f}"),
          (f"personalize_many x{b['batch']}, end to end", f"{harness.fmt_seconds(b['personalize_many_s'])} "
                                                          f"({b['personalize_many_compilations']} compilation(s))"),
      ]
    fused = result.get('fused')
    if fused:
      rows += [
          (f"personalize_and_generate ({fused['prompts']} images, {fused['sampling_steps']} sampling steps)",
           f"p50 {harness.fmt_seconds(fused['personalize_and_generate']['p50_s'])}"),
          ('personalize, then generate', f"p50 {harness.fmt_seconds(fused['personalize_then_generate']['p50_s'])} "
                                         f"(fused / separate {fused['fused_over_separate_p50']:.2f})"),
      ]
    rows += [
        ('compiled memory: args / temp / output',
         ' / '.join(harness.fmt_bytes((mem['compiled'] or {}).get(k)) for k in
                    ('argument_size_in_bytes', 'temp_size_in_bytes', 'output_size_in_bytes'))),
        ('peak RSS (process)', harness.fmt_bytes(mem['peak_rss_bytes'])),
        ('concept file', harness.fmt_bytes(result['concept_file_bytes'])),
    ]
    base = result.get('baseline')
    if base:
      for threads, entry in base['by_threads'].items():
        rows.append((f"torch eager latency (n={entry['n']}, {threads} thread(s))",
                     f"p50 {harness.fmt_seconds(entry['p50_s'])}, p95 {harness.fmt_seconds(entry['p95_s'])}"))
      rows += [
          (f"jax / torch p50 ({base['torch_num_threads']} thread(s); best)",
           f"{base['jax_over_torch_p50']:.2f}; {base['jax_over_best_torch_p50']:.2f}"),
          ('parity: step-1 loss rel. diff', f"{base['parity']['first_step_rel_diff']:.2e}"),
      ]
  else:
    rows.append(('trainable parameters', f"{result['trainable_parameters']:,}"))
    for dtype_name, entry in result['dtypes'].items():
      step = entry['lowered_step'] or {}
      rows.append((f'{dtype_name}: FLOPs per tuning step', harness.fmt_flops(step.get('flops'))))
      rows.append((f'{dtype_name}: bytes accessed per step (unfused)', harness.fmt_bytes(step.get('bytes_accessed'))))
      compiled = entry['compiled']
      if compiled:
        memory = compiled['memory'] or {}
        rows.append((f'{dtype_name}: compile', f"{harness.fmt_seconds(compiled['compile_s'])}, peak RSS "
                                               f"{harness.fmt_bytes(entry['worker']['peak_rss_bytes'])}"))
        rows.append((f'{dtype_name}: args / temp', f"{harness.fmt_bytes(memory.get('argument_size_in_bytes'))} / "
                                                   f"{harness.fmt_bytes(memory.get('temp_size_in_bytes'))}"))
      else:
        rows.append((f'{dtype_name}: compile', 'not completed (lowering figures only)'))
    for name, row in (result.get('clip_scan') or {}).items():
      ratio = lambda key: 'n/a' if row[f'{key}_ratio'] is None else f"{row[f'{key}_ratio']:.2f}x"
      rows.append((f'{name}: CLIP layers scanned vs unrolled',
                   f"lower {harness.fmt_seconds(row['scanned']['lower_s'])} vs "
                   f"{harness.fmt_seconds(row['unrolled']['lower_s'])} ({ratio('lower_s')}), compile "
                   f"{harness.fmt_seconds(row['scanned']['compile_s'])} vs "
                   f"{harness.fmt_seconds(row['unrolled']['compile_s'])} ({ratio('compile_s')})"))
  width = max(len(label) for label, _ in rows)
  lines = [f'{label.ljust(width)}  {value}' for label, value in rows]
  lines += [f'missing: {item}' for item in result.get('missing', [])]
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(_worker_main(sys.argv[1:]))
