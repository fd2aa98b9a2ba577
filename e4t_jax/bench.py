"""Personalization benchmark: compile cost, per-concept latency, memory, and a PyTorch baseline.

    from e4t_jax import bench
    result = bench.run_personalize_bench('tiny', baseline='torch', json_out='bench.json')
    print(bench.format_table(result))

(CLI: `e4t bench personalize --config tiny [--baseline torch] [--abstract] --json OUT`.)

Two modes. CONCRETE (`abstract=False`, config 'tiny': a random tiny E4T model, real execution) and
ABSTRACT (`abstract=True`, any config; 'sd15' is the full-size Stable Diffusion 1.5 + OpenCLIP ViT-H/14
model at 512 px): the personalization program is lowered and compiled from ShapeDtypeStruct params,
nothing is executed, and no weights are needed.

JSON keys, both modes:
  schema            'e4t-bench-personalize/1'
  mode              'concrete' | 'abstract'
  config            the config name
  date              UTC time of the run (ISO 8601)
  machine           platform, cpu_model, cpu_count (usable cores), memory_bytes, python, jax, jaxlib,
                    jax_backend, jax_devices, xla_flags, load_average_start, load_average_end (1/5/15-min
                    load at the start and end of the run: other processes skew every timing)
  settings          num_steps, learning_rate, tuning_batch_size (noise draws per step), image_size,
                    parameters {component: count}, ... (mode-specific additions below)
  missing           list of strings: what was not measured, and why (e.g. remat, GPU/TPU numbers)

CONCRETE mode adds:
  settings          + num_concepts, batch, seed
  compile           cold_s: `make_personalize_fn` in this process, persistent cache empty (includes
                      writing the entry to that cache); cold_trace_s, cold_lower_s, cold_backend_s:
                      its phases (jax.monitoring); cold_cache_misses;
                    warm_s: `make_personalize_fn` in a SECOND process sharing that cache directory;
                      warm_backend_s (the cache read), warm_cache_hits, warm_process_s (the second
                      process's whole life: imports, model init, compile); warm_speedup = cold_s / warm_s;
                      cache_bytes (size of the cache directory)
  latency           per-concept `personalize_fn(params, image, key)` + block_until_ready, over
                    num_concepts different images and keys after one warm-up call: n, p50_s, p95_s,
                    mean_s, min_s, max_s, concepts_per_s (1 / p50_s), compilations (XLA backend
                    compilations observed during the loop; must be 0)
  batched           null when batch=0; else: batch; personalize_many_s (one `personalize_many` call
                    of `batch` images, its compile included), personalize_many_compilations,
                    personalize_many_compile_s (trace + lower + backend compile inside that call),
                    personalize_many_concepts_per_s; steady_compile_cache_hits; steady_s (median of
                    `batched_repeats` executions of the same vmapped program, compiled once),
                    steady_concepts_per_s, steady_repeats, steady_compilations (during them: 0)
  memory            compiled: XLA memory analysis of the single-concept program (argument/output/
                      alias/temp/generated-code bytes, host and device); compiled_batched: same for the
                      batched program; peak_rss_bytes: this process's peak resident set (getrusage),
                      measured before the baseline (peak_rss_bytes_after_baseline: after it)
  concept_file_bytes  size of one saved concept (.safetensors)
  loss_trace_first  the first concept's loss trace (float per step)
  baseline          null, or for 'torch': framework, mode, torch/diffusers/transformers versions,
                    jax_device, convert_s (our savers -> from_pretrained), warmup (untimed runs per
                    thread count); by_threads {'N': {n, p50_s, p95_s, mean_s, min_s, max_s}} for each
                    torch thread count timed; the headline n/p50_s/p95_s/mean_s/min_s/max_s are those
                    of torch_num_threads (the first count timed, torch's default unless chosen;
                    torch_default_num_threads says what the default was); jax_over_torch_p50 (JAX p50 /
                    torch p50: < 1 means JAX is faster), jax_over_best_torch_p50 (against the fastest
                    thread count); parity {jax_loss_trace, torch_loss_trace, first_step_rel_diff,
                    max_rel_diff, embedding_max_abs_diff}: the first concept re-run in torch with the
                    JAX program's own noise, timesteps and VAE-posterior draws

ABSTRACT mode adds:
  settings          + encoder {hidden_dim, clip_layers}, compile_timeout_s, rss_limit_bytes
  dtypes            {'float32': {...}, 'bfloat16': {...}} (the compute dtype of every module;
                    parameters stay float32), each with:
                      lower_s, lowered_program {flops, bytes_accessed, transcendentals}: XLA's cost
                        analysis of the whole lowered program, in which a while loop (the lax.scan over
                        steps) counts ONCE whatever its trip count;
                      lowered_step {flops, bytes_accessed, transcendentals}: one tuning step (E4T loss,
                        its gradient and the Adam update) lowered on its own: the per-step figures;
                      flops_total_estimate: lowered_program.flops + (num_steps - 1) * lowered_step.flops;
                      lowered_components {vae_encoder, clip_vision, text_encoder, unet_contracting_path,
                        unet_forward}: {flops, bytes_accessed, transcendentals} of one forward pass of
                        each network at the shapes one step feeds it (where a step's FLOPs go);
                      compiled: null, or {compile_s, memory {..._in_bytes}, cost {flops, bytes_accessed}
                        (post-optimization, while loop counted once)};
                      worker {wall_s, peak_rss_bytes, returncode, timed_out, killed_for_memory, error}
  trainable_parameters, parameter_bytes_float32, adam_state_bytes

Every program here is built by `personalize._tuning_program`, the function `make_personalize_fn` and
`personalize_many` compile, so the benchmark measures the shipped code, not a copy of it.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e4t_jax import personalize as personalize_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.objective import e4t_loss, image_features
from e4t_jax.e4t.offsets import OffsetsConfig
from e4t_jax.errors import ConfigError

SCHEMA = 'e4t-bench-personalize/1'
CONFIGS = ('tiny', 'sd15')
BASELINES = (None, 'torch')
# Variants of the abstract analysis: compute dtype, and '+remat' = the U-Net rematerialized per block
# with the 'nothing_saveable' policy (memory for recompute).
ABSTRACT_DTYPES = ('float32', 'bfloat16', 'float32+remat', 'bfloat16+remat')

# jax.monitoring event names (jax/_src/dispatch.py, compiler.py).
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
TRACE_EVENT = '/jax/core/compile/jaxpr_trace_duration'
LOWER_EVENT = '/jax/core/compile/jaxpr_to_mlir_module_duration'
CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'
CACHE_MISS_EVENT = '/jax/compilation_cache/cache_misses'

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_MISSING_ALWAYS = (
    'GPU/TPU numbers: measured on a CPU-only machine; no accelerator figures.',
)


# ----------------------------------------------------------------------------- configs
def tiny_e4t_config() -> model_lib.E4TConfig:
  """The demo's E4T settings on the tiny architecture (random weights; timing does not depend on values)."""
  return model_lib.E4TConfig(coarse_word='face', encoder=EncoderConfig(hidden_dim=64, clip_layers=(-1, -2)),
                             offsets=OffsetsConfig(rank=4))


def full_size_e4t_config() -> model_lib.E4TConfig:
  """The reference's encoder on ViT-H/14: width 1280, every second CLIP layer (2, 4, ..., 32)."""
  return model_lib.E4TConfig(encoder=EncoderConfig(hidden_dim=1280, clip_layers=tuple(range(2, 33, 2))))


def build_model(config_name: str, seed: int = 0) -> model_lib.E4TModel:
  """A concrete (random-weight) model; only 'tiny' fits a CPU benchmark."""
  _check_config(config_name)
  if config_name != 'tiny':
    raise ConfigError(f'config {config_name!r} is full size: without weights and an accelerator it can only be '
                      'analysed abstractly (pass abstract=True / --abstract).')
  return model_lib.init_tiny(jax.random.key(seed), tiny_e4t_config())


def build_abstract_model(config_name: str, dtype: Any = jnp.float32) -> model_lib.E4TModel:
  """The model of `config_name` with ShapeDtypeStruct params and `dtype` compute."""
  from e4t_jax import presets
  from e4t_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
  from e4t_jax.models.unet import UNetConfig
  from e4t_jax.models.vae import VAEConfig
  _check_config(config_name)
  if config_name == 'tiny':
    return model_lib.abstract_model(tiny_e4t_config(), UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny(),
                                    CLIPVisionConfig.tiny(), dtype=dtype)
  unet, vae, text = presets.sd15()
  return model_lib.abstract_model(full_size_e4t_config(), unet, vae, text, presets.clip_vit_h14(), dtype=dtype)


def _check_config(config_name: str) -> None:
  if config_name not in CONFIGS:
    raise ConfigError(f'unknown benchmark config {config_name!r}; known: {list(CONFIGS)}.')


# ----------------------------------------------------------------------------- measuring helpers
class _JaxEvents:
  """Counts jax.monitoring events and sums their durations while the context is open."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()
    self.seconds: collections.Counter = collections.Counter()

  def _on_event(self, event: str, **kwargs) -> None:
    self.counts[event] += 1

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    self.counts[event] += 1
    self.seconds[event] += duration

  def __enter__(self) -> '_JaxEvents':
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    return self

  def __exit__(self, *exc) -> None:
    for name, listener in (('unregister_event_listener', self._on_event),
                           ('unregister_event_duration_listener', self._on_duration)):
      unregister = getattr(jax.monitoring, name, None)  # private-ish API: absent in some versions
      if unregister is not None:
        unregister(listener)

  @property
  def compilations(self) -> int:
    # Also recorded on a persistent-cache hit (the executable is then loaded, not compiled).
    return self.counts[BACKEND_COMPILE_EVENT]

  def compile_seconds(self) -> float:
    return float(self.seconds[TRACE_EVENT] + self.seconds[LOWER_EVENT] + self.seconds[BACKEND_COMPILE_EVENT])


@contextlib.contextmanager
def _scoped_persistent_cache(cache_dir: Path):
  """Points JAX's persistent compilation cache at `cache_dir` for the block, then restores the
  caller's settings (the cache is process-wide state; a test process must not keep a deleted dir)."""
  from jax.experimental.compilation_cache import compilation_cache
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  personalize_lib.enable_compilation_cache(cache_dir)
  compilation_cache.reset_cache()  # the cache object binds its directory on first use
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def _timed_calls(fn: Callable, arg_lists: Sequence[Sequence[Any]], stop: Callable[[], bool] | None = None
                 ) -> tuple[list[float], list[Any], int]:
  """Times `fn(*args)` to `block_until_ready` for each entry of `arg_lists` (the caller warms up first),
  until `stop()` says so: (seconds, results, XLA compilations seen meanwhile)."""
  seconds, results = [], []
  with _JaxEvents() as events:
    for args in arg_lists:
      if stop is not None and stop():
        break
      t0 = time.perf_counter()
      results.append(jax.block_until_ready(fn(*args)))
      seconds.append(time.perf_counter() - t0)
  return seconds, results, events.compilations


def _latency_stats(seconds: Sequence[float]) -> dict[str, float]:
  values = np.asarray(seconds, np.float64)
  return {'n': int(values.size), 'p50_s': float(np.percentile(values, 50)), 'p95_s': float(np.percentile(values, 95)),
          'mean_s': float(values.mean()), 'min_s': float(values.min()), 'max_s': float(values.max())}


def _memory_stats(compiled) -> dict[str, int] | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return {name: int(getattr(stats, name)) for name in dir(stats) if name.endswith('_in_bytes')}


def _cost_stats(analysis: Any) -> dict[str, float | None]:
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})
  get = lambda key: float(analysis[key]) if key in analysis else None
  return {'flops': get('flops'), 'bytes_accessed': get('bytes accessed'), 'transcendentals': get('transcendentals')}


def _peak_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _directory_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file())


def _machine_info() -> dict[str, Any]:
  import jaxlib
  cpu_model = platform.processor() or None
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu_model = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  try:
    memory_bytes = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    memory_bytes = None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  devices = jax.devices()
  return {'platform': platform.platform(), 'cpu_model': cpu_model, 'cpu_count': cores, 'memory_bytes': memory_bytes,
          'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
          'jax_backend': jax.default_backend(), 'jax_devices': [f'{d.platform}:{d.device_kind}' for d in devices],
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'load_average_start': _load_average()}


def _load_average() -> list[float] | None:
  """1/5/15-minute load averages: other processes on a shared machine skew every timing here."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _synthetic_images(count: int, size: int, seed: int) -> list[np.ndarray]:
  """Smooth random RGB images (uint8, size x size): each concept gets a different one."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(count):
    coarse = rng.uniform(0, 255, (4, 4, 3))
    image = np.kron(coarse, np.ones((-(-size // 4), -(-size // 4), 1)))[:size, :size]
    image = image + rng.normal(0, 12, image.shape)
    images.append(np.clip(image, 0, 255).astype(np.uint8))
  return images


# ----------------------------------------------------------------------------- subprocess workers
def _run_worker(args: Sequence[str], *, timeout_s: float, rss_limit_bytes: int | None = None,
                module: str = 'e4t_jax.bench') -> tuple[list[dict], dict]:
  """Runs `python -m <module> <args>`; returns its JSON records (one per stdout line) and how it ran.

  The worker is killed past `timeout_s` or once its resident set exceeds `rss_limit_bytes`; records
  printed before that are kept (a worker prints each stage as soon as it is measured).
  """
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([str(_PACKAGE_ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, '-m', module, *args], stdout=out, stderr=err, env=env,
                            cwd=str(_PACKAGE_ROOT))
    peak_rss, timed_out, killed_for_memory = 0, False, False
    while proc.poll() is None:
      rss, hwm = _proc_rss(proc.pid)
      peak_rss = max(peak_rss, hwm)
      if rss_limit_bytes is not None and rss > rss_limit_bytes:
        killed_for_memory = True
        proc.kill()
      elif time.perf_counter() - started > timeout_s:
        timed_out = True
        proc.kill()
      time.sleep(0.25)
    proc.wait()
    wall = time.perf_counter() - started
    out.seek(0)
    err.seek(0)
    records = []
    for line in out.read().splitlines():
      if line.startswith('{'):
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          pass
    stderr_tail = err.read()[-2000:]
  for record in records:
    peak_rss = max(peak_rss, int(record.get('peak_rss_bytes') or 0))
  info = {'wall_s': wall, 'peak_rss_bytes': peak_rss or None, 'returncode': proc.returncode, 'timed_out': timed_out,
          'killed_for_memory': killed_for_memory,
          'error': None if proc.returncode == 0 else stderr_tail.strip().splitlines()[-1:] or ['(no stderr)'],
          'stderr_tail': None if proc.returncode == 0 else stderr_tail[-1500:]}
  return records, info


def _proc_rss(pid: int) -> tuple[int, int]:
  """(current, peak) resident set of a process in bytes, from /proc (0, 0 where unavailable)."""
  try:
    fields = dict(line.split(':', 1) for line in Path(f'/proc/{pid}/status').read_text().splitlines() if ':' in line)
    as_bytes = lambda key: int(fields[key].split()[0]) * 1024 if key in fields else 0
    return as_bytes('VmRSS'), as_bytes('VmHWM')
  except (OSError, ValueError):
    return 0, 0


def _emit(record: dict) -> None:
  record['peak_rss_bytes'] = _peak_rss_bytes()
  print(json.dumps(record), flush=True)


def _warm_compile_worker(config_name: str, num_steps: int, cache_dir: str) -> None:
  """Second-process half of the compile measurement: same model shapes, same cache directory."""
  started = time.perf_counter()
  model = build_model(config_name)
  init_s = time.perf_counter() - started
  with _JaxEvents() as events:
    t0 = time.perf_counter()
    personalize_lib.make_personalize_fn(model, num_steps, tuning=personalize_lib.TuningConfig(), cache_dir=cache_dir)
    compile_s = time.perf_counter() - t0
  _emit({'stage': 'warm_compile', 'compile_s': compile_s, 'init_s': init_s,
         'backend_s': float(events.seconds[BACKEND_COMPILE_EVENT]), 'trace_s': float(events.seconds[TRACE_EVENT]),
         'lower_s': float(events.seconds[LOWER_EVENT]), 'cache_hits': events.counts[CACHE_HIT_EVENT],
         'cache_misses': events.counts[CACHE_MISS_EVENT]})


def _one_step_program(modules: model_lib.E4TModules, tuning: personalize_lib.TuningConfig
                      ) -> tuple[Callable, optax.GradientTransformation]:
  """One tuning step exactly as `personalize._tuning_program`'s scan body runs it (E4T loss, its
  gradient, the Adam update), outside any loop: XLA's cost analysis counts a while-loop body once
  whatever the trip count, so per-step FLOPs must come from a program without the loop."""
  config = modules.config
  prompt_ids = modules.tokenize([personalize_lib.tuning_prompt(modules, tuning).format(config.placeholder)]
                               * tuning.batch_size)
  optimizer = optax.adam(tuning.learning_rate)

  def step(params, opt_state, image, key, features=None):
    # `features`: the image-only features the real program computes once before its loop (None:
    # compute them here, as when parts of CLIP are trainable).
    trainable, frozen = model_lib.split_params(params, config.trainable_patterns)
    images = jnp.broadcast_to(image[None] * 2.0 - 1.0, (tuning.batch_size,) + image.shape)
    batch = {'images': images, 'input_ids': jnp.asarray(prompt_ids)}
    if features is not None:
      features = features.repeat(tuning.batch_size)
    loss_fn = lambda t: e4t_loss(modules, model_lib.merge_params(t, frozen), batch, key, features)[0]
    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step, optimizer


def abstract_analysis(config_name: str, dtype_name: str, num_steps: int, compile_program: bool,
                      emit: Callable[[dict], None]) -> None:
  """Lowers (and compiles) the personalization program of `config_name` from abstract params.

  Calls `emit` with a 'lowered' record, then (when `compile_program`) a 'compiled' record; the
  benchmark runs this in a worker process (`--abstract-worker`) that prints each record at once.
  """
  base_dtype, _, remat = dtype_name.partition('+')
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[base_dtype]
  model = build_abstract_model(config_name, dtype)
  if remat:
    model = model_lib.E4TModel(
        dataclasses.replace(model.modules, unet=model.modules.unet.clone(remat_policy='nothing_saveable')),
        model.params)
  modules, params = model.modules, model.params
  tuning = personalize_lib.TuningConfig(num_steps=num_steps)
  size = modules.image_size
  image = jax.ShapeDtypeStruct((size, size, 3), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))

  t0 = time.perf_counter()
  lowered = jax.jit(personalize_lib._tuning_program(modules, tuning)).lower(
      params, image, key, jax.ShapeDtypeStruct((), jnp.int32))
  lower_s = time.perf_counter() - t0
  program_cost = _cost_stats(lowered.cost_analysis())

  step, optimizer = _one_step_program(modules, tuning)
  trainable, _ = model_lib.split_params(params, modules.config.trainable_patterns)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  features = None
  if not modules.config.trainable_patterns:  # as in the real program: hoisted out of the step loop
    features = jax.eval_shape(lambda p, im: image_features(modules, p, im[None] * 2.0 - 1.0), params, image)
  step_cost = _cost_stats(jax.jit(step).lower(params, opt_state, image, key, features).cost_analysis())
  estimate = None
  if program_cost['flops'] is not None and step_cost['flops'] is not None:
    estimate = program_cost['flops'] + (num_steps - 1) * step_cost['flops']
  emit({'stage': 'lowered', 'lower_s': lower_s, 'lowered_program': program_cost, 'lowered_step': step_cost,
         'flops_total_estimate': estimate, 'lowered_components': _component_costs(modules, params, tuning)})

  if compile_program:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    emit({'stage': 'compiled', 'compile_s': compile_s, 'memory': _memory_stats(compiled),
           'cost': _cost_stats(compiled.cost_analysis())})


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
  context = sds((batch, modules.coarse_prompt_ids.shape[1], unet_cfg.cross_attention_dims()[0]), jnp.float32)
  unet, vae = modules.unet, modules.vae
  programs = {
      'vae_encoder': (lambda p, x: vae.apply({'params': p}, x, method=AutoencoderKL.encode).mean,
                      params['vae'], images),
      'clip_vision': (lambda p, x: modules.image_encoder.apply({'params': p}, clip_preprocess(x, vision_size)),
                      params['image_encoder'], images),
      'text_encoder': (lambda p, i: modules.text_encoder.apply({'params': p}, i).last_hidden_state,
                       params['text_encoder'], ids),
      'unet_contracting_path': (lambda p, x, t, c: unet.apply({'params': p}, x, t, c, features_only=True),
                                params['unet'], latents, timesteps, context),
      'unet_forward': (lambda p, x, t, c: unet.apply({'params': p}, x, t, c), params['unet'], latents, timesteps,
                       context),
  }
  return {name: _cost_stats(jax.jit(fn).lower(*args).cost_analysis()) for name, (fn, *args) in programs.items()}


def _worker_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m e4t_jax.bench', description='benchmark worker processes')
  stage = parser.add_mutually_exclusive_group(required=True)
  stage.add_argument('--warm-compile', action='store_true')
  stage.add_argument('--abstract-worker', action='store_true')
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--num-steps', type=int, default=5)
  parser.add_argument('--cache-dir')
  parser.add_argument('--dtype', default='float32', choices=ABSTRACT_DTYPES)
  parser.add_argument('--no-compile', action='store_true')
  args = parser.parse_args(argv)
  if args.warm_compile:
    if not args.cache_dir:
      parser.error('--warm-compile needs --cache-dir')
    _warm_compile_worker(args.config, args.num_steps, args.cache_dir)
  else:
    abstract_analysis(args.config, args.dtype, args.num_steps, not args.no_compile, _emit)
  return 0


# ----------------------------------------------------------------------------- the benchmark
def run_personalize_bench(config_name: str = 'tiny', *, num_steps: int = 5, num_concepts: int = 20, batch: int = 8,
                          baseline: str | None = None, abstract: bool = False,
                          json_out: str | os.PathLike | None = None, seed: int = 0, batched_repeats: int = 2,
                          torch_warmup: int = 2, torch_threads: Sequence[int] | None = None,
                          compile_timeout_s: float = 1800.0,
                          rss_limit_bytes: int | None = 16 * 2**30) -> dict:
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
  Raises:
    ConfigError: unknown config or baseline, or a full-size config without `abstract`.
  """
  _check_config(config_name)
  if baseline not in BASELINES:
    raise ConfigError(f'unknown baseline {baseline!r}; known: {[b for b in BASELINES if b]}.')
  if abstract:
    if baseline is not None:
      raise ConfigError('the torch baseline needs real weights and execution; it does not combine with abstract=True.')
    result = _abstract_bench(config_name, num_steps, compile_timeout_s, rss_limit_bytes)
  else:
    if num_concepts < 1 or batch < 0 or num_steps < 1:
      raise ConfigError('num_concepts and num_steps must be >= 1, batch >= 0.')
    result = _concrete_bench(config_name, num_steps=num_steps, num_concepts=num_concepts, batch=batch,
                             baseline=baseline, seed=seed, batched_repeats=batched_repeats, torch_warmup=torch_warmup,
                             torch_threads=torch_threads)
  result['machine']['load_average_end'] = _load_average()
  if json_out is not None:
    path = Path(json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + '\n')
  return result


def _header(config_name: str, mode: str) -> dict:
  return {'schema': SCHEMA, 'mode': mode, 'config': config_name,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'machine': _machine_info(), 'missing': list(_MISSING_ALWAYS)}


def _concrete_bench(config_name: str, *, num_steps: int, num_concepts: int, batch: int, baseline: str | None,
                    seed: int, batched_repeats: int, torch_warmup: int, torch_threads: Sequence[int] | None) -> dict:
  result = _header(config_name, 'concrete')
  model = build_model(config_name, seed)
  tuning = personalize_lib.TuningConfig(num_steps=num_steps)
  size = model.modules.image_size
  result['settings'] = {
      'num_steps': num_steps, 'num_concepts': num_concepts, 'batch': batch, 'seed': seed,
      'learning_rate': tuning.learning_rate, 'tuning_batch_size': tuning.batch_size, 'image_size': size,
      'parameters': {name: model_lib.count_params(tree) for name, tree in model.params.items()}}
  images = _synthetic_images(max(num_concepts, batch) + 1, size, seed)
  keys = list(jax.random.split(jax.random.key(seed + 1), num_concepts + 1))

  with tempfile.TemporaryDirectory(prefix='e4t-bench-') as tmp:
    tmp = Path(tmp)
    cache_dir = tmp / 'xla-cache'
    with _scoped_persistent_cache(cache_dir):
      # Cold: nothing in the (fresh) persistent cache, and a new program object, so nothing in memory either.
      with _JaxEvents() as events:
        t0 = time.perf_counter()
        personalize_fn = personalize_lib.make_personalize_fn(model, num_steps, tuning=tuning)
        cold_s = time.perf_counter() - t0
      compile_stats = {'cold_s': cold_s, 'cold_trace_s': float(events.seconds[TRACE_EVENT]),
                       'cold_lower_s': float(events.seconds[LOWER_EVENT]),
                       'cold_backend_s': float(events.seconds[BACKEND_COMPILE_EVENT]),
                       'cold_cache_misses': events.counts[CACHE_MISS_EVENT]}
      # Warm: a second process with the same shapes reads the executable from the shared cache.
      records, info = _run_worker(['--warm-compile', '--config', config_name, '--num-steps', str(num_steps),
                                   '--cache-dir', str(cache_dir)], timeout_s=900)
      warm = next((r for r in records if r.get('stage') == 'warm_compile'), None)
      if warm is None:
        raise RuntimeError(f'the warm-compile worker failed: {info}')
      compile_stats.update({'warm_s': warm['compile_s'], 'warm_backend_s': warm['backend_s'],
                            'warm_trace_s': warm['trace_s'], 'warm_lower_s': warm['lower_s'],
                            'warm_cache_hits': warm['cache_hits'], 'warm_cache_misses': warm['cache_misses'],
                            'warm_process_s': info['wall_s'], 'warm_speedup': cold_s / max(warm['compile_s'], 1e-9),
                            'cache_bytes': _directory_bytes(cache_dir)})
      result['compile'] = compile_stats

      # Per-concept latency. One untimed call first: the first execution of an executable pays one-time
      # allocation/thread-pool start-up that no later concept sees.
      jax.block_until_ready(personalize_fn(model.params, images[-1], keys[-1]))
      seconds, concepts, compilations = _timed_calls(
          personalize_fn, [(model.params, image, key) for image, key in zip(images[:num_concepts], keys[:num_concepts])])
      latency = _latency_stats(seconds)
      latency['concepts_per_s'] = 1.0 / latency['p50_s']
      latency['compilations'] = compilations
      result['latency'] = latency
      result['loss_trace_first'] = [float(x) for x in np.asarray(concepts[0].loss_trace)]
      result['concept_file_bytes'] = concepts[0].save(tmp / 'concept.e4t.safetensors').stat().st_size

      result['batched'], batched_memory = None, None
      if batch:
        result['batched'], batched_memory = _batched_bench(model, tuning, images[:batch], seed, batched_repeats)
      else:
        result['missing'].append('batched throughput: skipped (batch=0).')
    result['memory'] = {'compiled': _memory_stats(personalize_fn.compiled), 'compiled_batched': batched_memory,
                        'peak_rss_bytes': _peak_rss_bytes()}

    result['baseline'] = None
    if baseline == 'torch':
      result['baseline'] = _torch_baseline(model, tuning, images[:num_concepts], keys[:num_concepts], latency,
                                           concepts[0], tmp / 'torch', torch_warmup, torch_threads)
      result['memory']['peak_rss_bytes_after_baseline'] = _peak_rss_bytes()
  return result


def _batched_bench(model: model_lib.E4TModel, tuning: personalize_lib.TuningConfig, images: Sequence[np.ndarray],
                   seed: int, repeats: int) -> tuple[dict, dict | None]:
  """`personalize_many` end to end, then the same vmapped program compiled once and re-executed."""
  count = len(images)
  with _JaxEvents() as events:
    t0 = time.perf_counter()
    jax.block_until_ready(personalize_lib.personalize_many(model, images, num_steps=tuning.num_steps,
                                                           tuning=tuning, seed=seed))
    many_s = time.perf_counter() - t0
  stats = {'batch': count, 'personalize_many_s': many_s, 'personalize_many_concepts_per_s': count / many_s,
           'personalize_many_compilations': events.compilations,
           'personalize_many_compile_s': events.compile_seconds()}
  # personalize_many builds a fresh jitted function per call, so it compiles every call; its steady
  # state is measured on the identical program (same construction and arguments), compiled once here:
  # the persistent cache written by the call above turns that compile into a load.
  size = model.modules.image_size
  pixels = np.stack([personalize_lib.prepare_image(image, size) for image in images])
  keys = jax.random.split(jax.random.key(seed), count)
  steps = np.full((count,), tuning.num_steps, np.int32)
  program = jax.jit(jax.vmap(personalize_lib._tuning_program(model.modules, tuning), in_axes=(None, 0, 0, 0)))
  with _JaxEvents() as events:
    compiled = program.lower(model.params, pixels, keys, steps).compile()
  stats['steady_compile_cache_hits'] = events.counts[CACHE_HIT_EVENT]
  jax.block_until_ready(compiled(model.params, pixels, keys, steps))  # untimed first execution
  seconds, _, compilations = _timed_calls(compiled, [(model.params, pixels, keys, steps)] * max(repeats, 1))
  stats.update({'steady_s': float(np.median(seconds)), 'steady_repeats': len(seconds),
                'steady_concepts_per_s': count / float(np.median(seconds)), 'steady_compilations': compilations})
  return stats, _memory_stats(compiled)


def _abstract_bench(config_name: str, num_steps: int, compile_timeout_s: float, rss_limit_bytes: int | None) -> dict:
  result = _header(config_name, 'abstract')
  model = build_abstract_model(config_name)
  encoder = model.modules.config.encoder
  trainable, _ = model_lib.split_params(model.params, model.modules.config.trainable_patterns)
  tuning = personalize_lib.TuningConfig(num_steps=num_steps)
  result['settings'] = {
      'num_steps': num_steps, 'learning_rate': tuning.learning_rate, 'tuning_batch_size': tuning.batch_size,
      'image_size': model.modules.image_size,
      'parameters': {name: model_lib.count_params(tree) for name, tree in model.params.items()},
      'encoder': {'hidden_dim': encoder.hidden_dim, 'clip_layers': list(encoder.clip_layers)},
      'compile_timeout_s': compile_timeout_s, 'rss_limit_bytes': rss_limit_bytes}
  result['trainable_parameters'] = model_lib.count_params(trainable)
  result['parameter_bytes_float32'] = 4 * model_lib.count_params(model.params)
  result['adam_state_bytes'] = 2 * 4 * result['trainable_parameters']  # mu and nu, float32
  result['dtypes'] = {}
  for dtype_name in ABSTRACT_DTYPES:
    # One process per dtype: a compile that runs out of time or memory is killed without taking the
    # benchmark with it, and each peak RSS is the compile's own.
    records, info = _run_worker(['--abstract-worker', '--config', config_name, '--dtype', dtype_name,
                                 '--num-steps', str(num_steps)], timeout_s=compile_timeout_s,
                                rss_limit_bytes=rss_limit_bytes)
    by_stage = {r['stage']: r for r in records}
    lowered, compiled = by_stage.get('lowered'), by_stage.get('compiled')
    lowered_keys = ('lower_s', 'lowered_program', 'lowered_step', 'flops_total_estimate', 'lowered_components')
    entry = dict.fromkeys(lowered_keys)
    entry.update({'compiled': None, 'worker': info})
    if lowered:
      entry.update({k: lowered[k] for k in lowered_keys})
    if compiled:
      entry['compiled'] = {k: compiled[k] for k in ('compile_s', 'memory', 'cost')}
    else:
      why = ('timed out' if info['timed_out'] else 'exceeded the memory limit' if info['killed_for_memory']
             else f'failed ({info["error"]})')
      result['missing'].append(f'{dtype_name}: the compile {why}; only lowering figures are reported.')
    result['dtypes'][dtype_name] = entry
  return result


# ----------------------------------------------------------------------------- the PyTorch baseline
def _jax_draws(modules: model_lib.E4TModules, tuning: personalize_lib.TuningConfig, rng: jax.Array) -> dict:
  """The random numbers the compiled tuning program draws from `rng`, re-derived outside it (same
  fold_in/split order as `_tuning_program` and `e4t_loss`), as NHWC numpy arrays."""
  from e4t_jax.diffusion import schedule as schedule_lib
  side = modules.unet.config.sample_size
  shape = (tuning.batch_size, side, side, modules.unet.config.in_channels)
  steps = []
  for i in range(tuning.num_steps):
    k_vae, k_noise, k_t = jax.random.split(jax.random.fold_in(rng, i), 3)
    steps.append({'vae_eps': np.asarray(jax.random.normal(k_vae, shape, jnp.float32)),
                  'noise': np.asarray(jax.random.normal(k_noise, shape, jnp.float32)),
                  'timesteps': np.asarray(schedule_lib.sample_timesteps(k_t, shape[0], modules.schedule))})
  k_vae, k_noise = jax.random.split(jax.random.fold_in(rng, tuning.num_steps))
  readout_shape = (len(tuning.readout_timesteps),) + shape[1:]
  readout = {'vae_eps': np.asarray(jax.random.normal(k_vae, (1,) + shape[1:], jnp.float32)),
             'noise': np.asarray(jax.random.normal(k_noise, readout_shape, jnp.float32))}
  return {'steps': steps, 'readout': readout}


def _torch_baseline(model: model_lib.E4TModel, tuning: personalize_lib.TuningConfig, images: Sequence[np.ndarray],
                    keys: Sequence[jax.Array], jax_latency: dict, jax_first_concept, work_dir: Path,
                    warmup: int, threads: Sequence[int] | None) -> dict:
  import diffusers
  import torch
  import transformers
  t0 = time.perf_counter()
  tuner = TorchE4T(model, work_dir)
  convert_s = time.perf_counter() - t0
  size = model.modules.image_size
  pixels = [personalize_lib.prepare_image(image, size) for image in images]

  # Parity: the first concept again, with the JAX program's own random draws.
  parity_draws = _jax_draws(model.modules, tuning, keys[0])
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
      by_threads[str(count)] = _latency_stats(seconds)
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


class TorchE4T:
  """Our E4T tuning re-implemented in PyTorch eager, on our tiny model's weights.

  The frozen networks are the real diffusers / transformers modules, loaded with `from_pretrained`
  from the folders our savers write (U-Net, VAE, CLIP text, CLIP vision); the E4T encoder is
  re-implemented layer for layer (`e4t/encoder.py`) with our weights copied in; the low-rank offsets
  are merged functionally, W' = W + (down @ up)^T in torch's [out, in] layout, through
  `torch.func.functional_call`. The loss, the Adam update and the w* read-out follow
  `_tuning_program` / `e4t_loss` step for step; passes the JAX program does not differentiate (VAE,
  CLIP, the coarse prompt, U-Net pass 1) run under `torch.no_grad`, as `stop_gradient` / closure
  constants make XLA skip their gradients.
  """

  def __init__(self, model: model_lib.E4TModel, work_dir: str | os.PathLike):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModel
    from e4t_jax.convert import common as convert_common
    from e4t_jax.convert.clip import save_image_encoder, save_text_encoder
    from e4t_jax.convert.unet import save_unet
    from e4t_jax.convert.vae import save_vae
    self.torch = torch
    modules, params = model.modules, model.params
    self.modules = modules
    work_dir = Path(work_dir)
    save_unet(work_dir / 'unet', modules.unet.config, params['unet'])
    save_vae(work_dir / 'vae', modules.vae.config, params['vae'])
    save_text_encoder(work_dir / 'text_encoder', modules.text_encoder.config, params['text_encoder'])
    save_image_encoder(work_dir / 'image_encoder', modules.image_encoder.config, params['image_encoder'])
    load = dict(torch_dtype=torch.float32)
    with _quiet_hf_loading():
      self.unet = UNet2DConditionModel.from_pretrained(work_dir / 'unet', **load)
      self.vae = AutoencoderKL.from_pretrained(work_dir / 'vae', **load)
      self.text = CLIPTextModel.from_pretrained(work_dir / 'text_encoder', **load)
      self.vision = CLIPVisionModel.from_pretrained(work_dir / 'image_encoder', **load)
    for module in (self.unet, self.vae, self.text, self.vision):
      module.eval().requires_grad_(False)

    config = modules.config
    if config.trainable_patterns:
      raise ConfigError('the torch baseline trains the encoder and offsets only (no image-encoder patterns).')
    if config.offsets.mode != 'additive':
      raise ConfigError('the torch baseline implements additive weight offsets only.')
    if modules.schedule.prediction_type != 'epsilon':
      raise ConfigError('the torch baseline implements epsilon prediction only.')
    self.config = config
    self.encoder = _torch_encoder(config.encoder, params['encoder'])
    self.initial_encoder_state = {k: v.clone() for k, v in self.encoder.state_dict().items()}
    # Offsets: torch weight key -> initial (down [in, r], up [r, out]).
    self.initial_offsets = {
        convert_common.torch_key(tuple(path.split('/')) + ('kernel',)):
            (torch.tensor(np.asarray(pair['down'])), torch.tensor(np.asarray(pair['up'])))
        for path, pair in params['weight_offsets'].items()}
    unet_weights = dict(self.unet.named_parameters())
    missing = [k for k in self.initial_offsets if k not in unet_weights]
    if missing:
      raise ConfigError(f'offset targets {missing[:3]} are not diffusers U-Net weights.')
    self.alphas_cumprod = torch.tensor(np.asarray(modules.schedule.alphas_cumprod))
    self.coarse_embedding = torch.tensor(np.asarray(
        params['text_encoder']['embeddings']['token_embedding']['embedding'][modules.coarse_token_id], np.float32))
    self.coarse_prompt_ids = torch.tensor(modules.coarse_prompt_ids, dtype=torch.long)
    self.vae_scaling = float(modules.vae.config.scaling_factor)
    self.vae_shift = modules.vae.config.shift_factor
    # The placeholder's embedding is swapped in at the token-table output, as `encode_prompt` does.
    self._substitution = None
    self.text.get_input_embeddings().register_forward_hook(self._substitute_placeholder)

  # --------------------------------------------------------------------------- pieces
  def _substitute_placeholder(self, module, inputs, output):
    if self._substitution is None:
      return output
    mask, w_star = self._substitution
    return self.torch.where(mask[..., None], w_star[:, None, :].to(output.dtype), output)

  def _encode_prompt(self, input_ids, w_star):
    torch = self.torch
    mask = input_ids == self.modules.placeholder_id
    safe_ids = torch.where(mask, torch.full_like(input_ids, self.modules.coarse_token_id), input_ids)
    self._substitution = (mask, w_star)
    try:
      return self.text(input_ids=safe_ids).last_hidden_state
    finally:
      self._substitution = None

  def _latents(self, images, vae_eps):
    posterior = self.vae.encode(images).latent_dist
    sample = posterior.mean + posterior.std * vae_eps
    if self.vae_shift is not None:
      sample = sample - self.vae_shift
    return sample * self.vae_scaling

  def _add_noise(self, latents, noise, timesteps):
    alpha_bar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise

  def _unet_features(self, sample, timesteps, context):
    """diffusers' contracting path only (conv_in, down blocks, mid block), as `features_only=True`."""
    unet = self.unet
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for block in unet.down_blocks:
      if getattr(block, 'has_cross_attention', False):
        hidden, block_skips = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
      else:
        hidden, block_skips = block(hidden_states=hidden, temb=emb)
      skips.extend(block_skips)
    mid = unet.mid_block(hidden, emb, encoder_hidden_states=context)
    return skips, mid

  def _clip_pixels(self, images):
    """`clip_preprocess` of images in [-1, 1] (NCHW)."""
    torch = self.torch
    from e4t_jax.models.clip import CLIP_MEAN, CLIP_STD
    pixels = (images + 1.0) / 2.0
    target = self.modules.image_encoder.config.image_size
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(target * long / short)
    new_size = (target, new_long) if height <= width else (new_long, target)
    if tuple(new_size) != (height, width):
      pixels = torch.nn.functional.interpolate(pixels, size=new_size, mode='bicubic', antialias=True,
                                               align_corners=False).clamp(0.0, 1.0)
    top, left = (new_size[0] - target) // 2, (new_size[1] - target) // 2
    pixels = pixels[..., top:top + target, left:left + target]
    mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    return (pixels - mean) / std

  def _predict_offset(self, images, noisy, timesteps):
    """The encoder's f [batch, width]; everything before the encoder is frozen (no graph)."""
    torch = self.torch
    with torch.no_grad():
      coarse_context = self.text(input_ids=self.coarse_prompt_ids.expand(images.shape[0], -1)).last_hidden_state
      down, mid = self._unet_features(noisy, timesteps, coarse_context)
      clip_states = self.vision(pixel_values=self._clip_pixels(images), output_hidden_states=True).hidden_states
    return self.encoder(clip_states, down, mid)

  def loss(self, offsets, images, prompt_ids, vae_eps, noise, timesteps):
    """`e4t_loss` (epsilon target, no mask) for trainable encoder + offsets {key: (down, up)}."""
    torch = self.torch
    with torch.no_grad():
      latents = self._latents(images, vae_eps)
      noisy = self._add_noise(latents, noise, timesteps)
    offset = self._predict_offset(images, noisy, timesteps)
    w_star = self.coarse_embedding[None, :] + self.config.embedding_scale * offset
    context = self._encode_prompt(prompt_ids, w_star)
    weights = dict(self.unet.named_parameters())
    merged = {key: weights[key] + (down @ up).T for key, (down, up) in offsets.items()}
    prediction = torch.func.functional_call(self.unet, merged, (noisy, timesteps),
                                            {'encoder_hidden_states': context}).sample
    diffusion_loss = torch.mean(torch.square(prediction - noise))
    embedding_reg = torch.mean(torch.sum(torch.square(offset), dim=-1))
    offsets_reg = sum(torch.sum((down.T @ down) * (up @ up.T)) for down, up in offsets.values())
    return (diffusion_loss + self.config.lambda_embedding * embedding_reg
            + self.config.lambda_offsets * offsets_reg)

  # --------------------------------------------------------------------------- tuning
  def personalize(self, image: np.ndarray, tuning: personalize_lib.TuningConfig, *, draws: dict | None = None,
                  generator=None) -> tuple[list[float], np.ndarray]:
    """Tunes a fresh copy of the encoder and offsets on `image` ([S, S, 3] float in [0, 1]).

    Random numbers come from `draws` (`_jax_draws`: the JAX program's own) or, when None, from the
    torch `generator`. Returns (loss trace, w*).
    """
    torch = self.torch
    self.encoder.load_state_dict(self.initial_encoder_state)
    offsets = {key: (down.clone().requires_grad_(True), up.clone().requires_grad_(True))
               for key, (down, up) in self.initial_offsets.items()}
    trainable = list(self.encoder.parameters()) + [t for pair in offsets.values() for t in pair]
    optimizer = torch.optim.Adam(trainable, lr=tuning.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    batch = tuning.batch_size
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None] * 2.0 - 1.0
    images = image_t.expand(batch, -1, -1, -1)
    prompt = personalize_lib.tuning_prompt(self.modules, tuning)
    prompt_ids = torch.tensor(self.modules.tokenize([prompt.format(self.config.placeholder)] * batch),
                              dtype=torch.long)
    side = self.modules.unet.config.sample_size
    latent_shape = (batch, self.modules.unet.config.in_channels, side, side)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    num_timesteps = self.alphas_cumprod.shape[0]
    losses = []
    for i in range(tuning.num_steps):
      if draws is not None:
        step = draws['steps'][i]
        vae_eps, noise = nchw(step['vae_eps']), nchw(step['noise'])
        timesteps = torch.from_numpy(np.asarray(step['timesteps'], np.int64))
      else:
        vae_eps = torch.randn(latent_shape, generator=generator)
        noise = torch.randn(latent_shape, generator=generator)
        timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator)
      optimizer.zero_grad(set_to_none=True)
      loss = self.loss(offsets, images, prompt_ids, vae_eps, noise, timesteps)
      loss.backward()
      optimizer.step()
      losses.append(float(loss.detach()))

    # Read-out of w*: the encoder's prediction averaged over fixed timesteps and noise draws.
    readout_t = torch.tensor(list(tuning.readout_timesteps), dtype=torch.long)
    count = len(readout_t)
    with torch.no_grad():
      if draws is not None:
        vae_eps, noise = nchw(draws['readout']['vae_eps']), nchw(draws['readout']['noise'])
      else:
        vae_eps = torch.randn((1,) + latent_shape[1:], generator=generator)
        noise = torch.randn((count,) + latent_shape[1:], generator=generator)
      latents = self._latents(images[:1], vae_eps).expand(count, -1, -1, -1)
      noisy = self._add_noise(latents, noise, readout_t)
      offset = self._predict_offset(images[:1].expand(count, -1, -1, -1), noisy, readout_t)
      w_star = self.coarse_embedding + self.config.embedding_scale * offset.mean(dim=0)
    return losses, w_star.numpy()


@contextlib.contextmanager
def _quiet_hf_loading():
  """Silences diffusers' / transformers' load-time advice and progress bars (benchmark output is a table)."""
  from diffusers.utils import logging as diffusers_logging
  from transformers.utils import logging as transformers_logging
  saved = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
           transformers_logging.is_progress_bar_enabled())
  diffusers_logging.set_verbosity_error()
  transformers_logging.set_verbosity_error()
  transformers_logging.disable_progress_bar()
  try:
    yield
  finally:
    diffusers_logging.set_verbosity(saved[0])
    transformers_logging.set_verbosity(saved[1])
    if saved[2]:
      transformers_logging.enable_progress_bar()


def _torch_encoder(config: EncoderConfig, params: dict):
  """`E4TEncoder` in torch with our weights (Dense kernel [in, out] -> Linear weight [out, in])."""
  import torch
  from torch import nn

  class TorchE4TEncoder(nn.Module):
    def __init__(self):
      super().__init__()
      clip_names = [f'clip_proj_{i}' for i in range(len(config.clip_layers))]
      unet_count = sum(1 for name in params if name.startswith('unet_proj_'))
      self.source_names = clip_names + [f'unet_proj_{i}' for i in range(unet_count)]
      linear = lambda name: nn.Linear(*np.shape(params[name]['kernel']))
      self.projections = nn.ModuleDict({name: linear(name) for name in self.source_names})
      self.mlp = nn.ModuleList([linear(f'mlp_{i}') for i in range(config.mlp_depth)])
      self.out = linear('out')
      with torch.no_grad():
        layers = [(self.projections[n], n) for n in self.source_names]
        layers += [(m, f'mlp_{i}') for i, m in enumerate(self.mlp)] + [(self.out, 'out')]
        for layer, name in layers:
          layer.weight.copy_(torch.tensor(np.asarray(params[name]['kernel']).T))
          layer.bias.copy_(torch.tensor(np.asarray(params[name]['bias'])))

    def forward(self, clip_hidden_states, unet_down, unet_mid):
      sources = []
      for index in config.clip_layers:  # [class token ; mean of patch tokens]
        tokens = clip_hidden_states[index]
        sources.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1))
      tensors = []
      if config.unet_features in ('down+mid', 'down'):
        tensors += list(unet_down)
      if config.unet_features in ('down+mid', 'mid'):
        tensors.append(unet_mid)
      sources += [t.mean(dim=(2, 3)) for t in tensors]  # spatial means (NCHW)
      joint = sum(self.projections[name](x) for name, x in zip(self.source_names, sources))
      hidden = nn.functional.leaky_relu(joint, config.leaky_relu_slope)
      for layer in self.mlp:
        hidden = nn.functional.leaky_relu(layer(hidden), config.leaky_relu_slope)
      return self.out(hidden)

  return TorchE4TEncoder()


# ----------------------------------------------------------------------------- reporting
def _fmt_seconds(value: float | None) -> str:
  if value is None:
    return '-'
  return f'{value * 1e3:.1f} ms' if value < 1 else f'{value:.2f} s'


def _fmt_bytes(value: float | None) -> str:
  if value is None:
    return '-'
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {unit}'
  return f'{int(value)} B'


def _fmt_flops(value: float | None) -> str:
  if value is None:
    return '-'
  for unit, scale in (('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {unit}'
  return f'{value:.0f} FLOP'


def format_table(result: dict) -> str:
  """A short human-readable table of a `run_personalize_bench` result."""
  rows: list[tuple[str, str]] = []
  settings, machine = result['settings'], result['machine']
  rows.append(('config', f"{result['config']} ({result['mode']}), {settings['num_steps']} steps, "
                         f"{settings['image_size']} px"))
  rows.append(('machine', f"{machine['cpu_model']}, {machine['cpu_count']} cores, {', '.join(machine['jax_devices'])}"))
  if result['mode'] == 'concrete':
    c, lat, b, mem = result['compile'], result['latency'], result['batched'], result['memory']
    rows += [
        ('compile, cold (this process)', _fmt_seconds(c['cold_s'])),
        ('compile, warm cache (2nd process)', f"{_fmt_seconds(c['warm_s'])} ({c['warm_speedup']:.1f}x faster, "
                                              f"{c['warm_cache_hits']} cache hit(s))"),
        (f"latency per concept (n={lat['n']})", f"p50 {_fmt_seconds(lat['p50_s'])}, p95 {_fmt_seconds(lat['p95_s'])}"),
        ('compilations during the loop', str(lat['compilations'])),
        ('concepts/s, one at a time', f"{lat['concepts_per_s']:.2f}"),
    ]
    if b:
      rows += [
          (f"concepts/s, batched x{b['batch']} (steady)", f"{b['steady_concepts_per_s']:.2f}"),
          (f"personalize_many x{b['batch']}, end to end", f"{_fmt_seconds(b['personalize_many_s'])} "
                                                          f"({b['personalize_many_compilations']} compilation(s))"),
      ]
    rows += [
        ('compiled memory: args / temp / output',
         ' / '.join(_fmt_bytes((mem['compiled'] or {}).get(k)) for k in
                    ('argument_size_in_bytes', 'temp_size_in_bytes', 'output_size_in_bytes'))),
        ('peak RSS (process)', _fmt_bytes(mem['peak_rss_bytes'])),
        ('concept file', _fmt_bytes(result['concept_file_bytes'])),
    ]
    base = result.get('baseline')
    if base:
      for threads, entry in base['by_threads'].items():
        rows.append((f"torch eager latency (n={entry['n']}, {threads} thread(s))",
                     f"p50 {_fmt_seconds(entry['p50_s'])}, p95 {_fmt_seconds(entry['p95_s'])}"))
      rows += [
          (f"jax / torch p50 ({base['torch_num_threads']} thread(s); best)",
           f"{base['jax_over_torch_p50']:.2f}; {base['jax_over_best_torch_p50']:.2f}"),
          ('parity: step-1 loss rel. diff', f"{base['parity']['first_step_rel_diff']:.2e}"),
      ]
  else:
    rows.append(('trainable parameters', f"{result['trainable_parameters']:,}"))
    for dtype_name, entry in result['dtypes'].items():
      step = entry['lowered_step'] or {}
      rows.append((f'{dtype_name}: FLOPs per tuning step', _fmt_flops(step.get('flops'))))
      rows.append((f'{dtype_name}: bytes accessed per step (unfused)', _fmt_bytes(step.get('bytes_accessed'))))
      compiled = entry['compiled']
      if compiled:
        memory = compiled['memory'] or {}
        rows.append((f'{dtype_name}: compile', f"{_fmt_seconds(compiled['compile_s'])}, peak RSS "
                                               f"{_fmt_bytes(entry['worker']['peak_rss_bytes'])}"))
        rows.append((f'{dtype_name}: args / temp', f"{_fmt_bytes(memory.get('argument_size_in_bytes'))} / "
                                                   f"{_fmt_bytes(memory.get('temp_size_in_bytes'))}"))
      else:
        rows.append((f'{dtype_name}: compile', 'not completed (lowering figures only)'))
  width = max(len(label) for label, _ in rows)
  lines = [f'{label.ljust(width)}  {value}' for label, value in rows]
  lines += [f'missing: {item}' for item in result.get('missing', [])]
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(_worker_main(sys.argv[1:]))
