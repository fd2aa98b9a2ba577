"""Full-size execution benchmark, for an accelerator: `e4t bench full`.

    e4t bench full --config sd15 --json bench_full.json [--deadline-s 480] [--torch]

What `bench.personalize` measures abstractly on a CPU (FLOPs, compiled memory), this one executes: random
weights (timing does not depend on their values), the shipped programs, one process per measurement.

Phase 1, compile (in parallel, up to `parallel` worker processes sharing one persistent compilation
cache): each program below is lowered from abstract params and compiled ahead of time. Per program:
compile seconds, XLA's memory analysis (arguments / temporaries / outputs of the compiled program on
this backend) and its cost analysis (FLOPs). Remat-policy and attention variants are compiled here,
so their memory is tabulated even where there is no time left to execute them.

Phase 2, execute (one worker process at a time, so timings do not share the device): each worker
builds random params on the device, loads its programs from the cache (a hit: no second compile)
and times them. Everything checks a shared deadline, and a worker that overruns is killed; what was
measured before that is kept.

Programs ("jobs"; `Job.name`):
  personalize           the one-concept tuning program `make_personalize_fn` compiles (5 steps +
                        read-out). Timed: per-concept latency p50/p95 over different images and keys,
                        the XLA compilations seen during the loop (must be 0), device peak memory.
  personalize_batched   the vmapped program `personalize_many` runs, `batch` concepts per call:
                        concepts/s in steady state.
  pretrain              one E4T domain-pretraining step (`train.step.make_train_step`: encoder +
                        offsets trained, SD frozen; AdamW), `batch` images: step time, TFLOP/s, MFU.
  unet_step             a Stable Diffusion U-Net denoising train step (every U-Net weight trained,
                        AdamW): the reference design the PyTorch baseline runs too.
Variants: compute dtype ('bfloat16' / 'float32'; parameters stay float32 unless `frozen_dtype` is
'bfloat16'), U-Net rematerialization policy, attention ('auto': the fused cuDNN kernel where it
applies, see `layers.dot_product_attention`; 'xla': the reference attention everywhere), extra XLA flags for the job's processes (`xla_flags`: the
GPU autotuning level, compared in the summary's `xla_flags` section against the same job without them).

The PyTorch baseline (`--torch`): diffusers `UNet2DConditionModel` with the same architecture, the
same batch and resolution, float32 weights under bfloat16 autocast, AdamW, eager; in this run.

JSON keys: schema 'e4t-bench-full/1', config, date, machine (harness.machine_info + device memory),
settings, peak_tflops (dense bf16 peak of the device, for MFU), compile {job name: {compile_s,
memory, cost, worker}}, execute {job name: {...}}, attention {...}, torch {...}, errors [..].
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from concurrent import futures
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e4t_jax import personalize as personalize_lib
from e4t_jax import runtime
from e4t_jax.bench import harness
from e4t_jax.bench import personalize as bench
from e4t_jax.bench import torch_reference
from e4t_jax.e4t import model as model_lib
from e4t_jax.models import unet as unet_lib
from e4t_jax.errors import ConfigError, InputError

SCHEMA = 'e4t-bench-full/1'
WORKER_MODULE = 'e4t_jax.bench.full'  # `python -m` runs its worker stages
KINDS = ('personalize', 'personalize_batched', 'pretrain', 'unet_step')


@dataclasses.dataclass(frozen=True)
class Job:
  kind: str
  dtype: str = 'bfloat16'
  remat: str = 'none'
  batch: int = 1
  frozen_dtype: str = 'float32'
  attention: str = 'auto'
  # personalize: the tuning mode, its steps and views per pass (paper mode: 16 views a step)
  mode: str = 'lite'
  steps: int = 5
  micro_batch: int | None = None
  # the CLIP towers' layers scanned (the default, `models.clip`) or unrolled (the layout before issue 19)
  scan_clip: bool = True
  # XLA flags added to $XLA_FLAGS for this job's compile and execute processes (e.g. the GPU
  # autotuning level: what autotuning costs in compile seconds and buys in step time)
  xla_flags: str = ''

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f'unknown job kind {self.kind!r}; known: {KINDS}.')

  @property
  def name(self) -> str:
    parts = [self.kind, self.dtype]
    if self.remat != 'none':
      parts.append(f'remat={self.remat}')
    if self.batch != 1:
      parts.append(f'b{self.batch}')
    if self.frozen_dtype != 'float32':
      parts.append(f'frozen={self.frozen_dtype}')
    if self.attention != 'auto':
      parts.append(f'attention={self.attention}')
    if self.mode != 'lite':
      parts.append(self.mode)
    if self.steps != 5:
      parts.append(f'{self.steps}steps')
    if not self.scan_clip:
      parts.append('clip=unrolled')
    if self.micro_batch is not None:
      parts.append(f'micro{self.micro_batch}')
    if self.xla_flags:
      parts.append('xla=' + ','.join(flag.removeprefix('--xla_') for flag in self.xla_flags.split()))
    return '/'.join(parts)

  def env(self) -> dict[str, str]:
    """The environment overrides of this job's worker processes (none without `xla_flags`)."""
    if not self.xla_flags:
      return {}
    return {'XLA_FLAGS': ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''), self.xla_flags]))}

  @property
  def tuning(self) -> personalize_lib.TuningConfig:
    return personalize_lib.TuningConfig(num_steps=self.steps, mode=self.mode, micro_batch=self.micro_batch)

  def to_arg(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_arg(cls, text: str) -> 'Job':
    return cls(**json.loads(text))


# The paper-mode figure: 15 steps of 16 views, bfloat16, one view a pass (the variant that fits 40 GiB
# by the CPU compiler's measure, docs/performance.md).
PAPER_JOB = Job('personalize', mode='paper', steps=15, micro_batch=1)
# The lite program without XLA:GPU's autotuning (level 0: default algorithms, no timing of candidates):
# its compile seconds and step time against the default level 4 are what autotuning costs and buys.
NO_AUTOTUNE_JOB = Job('personalize', xla_flags='--xla_gpu_autotune_level=0')


def default_jobs(train_batch: int = 8, concepts_batch: int = 4, minimal: bool = False) -> dict[str, list[Job]]:
  """The jobs of each execute worker, in priority order (the compile phase compiles all of them);
  `minimal`: only the headline programs (bfloat16 personalization, pretraining at `train_batch` and twice
  that, the U-Net step, lite personalization without autotuning).
  A worker's jobs share its process, hence its XLA flags: a job with `xla_flags` gets a worker of its own."""
  if minimal:
    return {'personalize': [Job('personalize'), PAPER_JOB],
            'train': [Job('pretrain', batch=train_batch), Job('unet_step', batch=train_batch),
                      Job('pretrain', batch=2 * train_batch)],
            'no_autotune': [NO_AUTOTUNE_JOB]}
  return {
      'personalize': [Job('personalize'), PAPER_JOB, Job('personalize', mode='paper', steps=15, micro_batch=4),
                      Job('personalize_batched', batch=concepts_batch),
                      Job('personalize', attention='xla'), Job('personalize', frozen_dtype='bfloat16'),
                      Job('personalize', dtype='float32')],
      'train': [Job('pretrain', batch=train_batch), Job('unet_step', batch=train_batch),
                Job('pretrain', batch=2 * train_batch),
                Job('pretrain', batch=train_batch, remat='nothing_saveable'),
                Job('pretrain', batch=train_batch, remat='dots_saveable'),
                Job('unet_step', batch=train_batch, remat='nothing_saveable')],
      'no_autotune': [NO_AUTOTUNE_JOB],
  }


def worker_env(jobs: Sequence[Job]) -> dict[str, str]:
  """The one environment a worker process runs `jobs` in; ConfigError if their XLA flags differ."""
  flags = {job.xla_flags for job in jobs}
  if len(flags) > 1:
    raise ConfigError(f'jobs {[job.name for job in jobs]} need different XLA flags ({sorted(flags)}): '
                      'give each set of flags a worker of its own.')
  return jobs[0].env() if jobs else {}


# ----------------------------------------------------------------------------- programs
def job_modules(config_name: str, job: Job) -> model_lib.E4TModel:
  """The abstract model of `config_name` computing as the job says (params: ShapeDtypeStructs)."""
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[job.dtype]
  model = bench.build_abstract_model(config_name, dtype, scan_layers=job.scan_clip)
  m = model.modules
  m = dataclasses.replace(
      m, unet=m.unet.clone(remat_policy=None if job.remat == 'none' else job.remat, attention_implementation=job.attention),
      text_encoder=m.text_encoder.clone(attention_implementation=job.attention),
      image_encoder=m.image_encoder.clone(attention_implementation=job.attention),
      vae=m.vae.clone(attention_implementation=job.attention))
  params = model.params
  if job.frozen_dtype == 'bfloat16':
    trainable, frozen = model_lib.split_params(params, m.config.trainable_patterns)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), frozen)
    params = model_lib.merge_params(trainable, frozen)
  return model_lib.E4TModel(m, params)


def lower_job(model: model_lib.E4TModel, job: Job, num_steps: int = 5):
  """(lowered program, abstract arguments) of a job; the execute phase compiles the same lowering."""
  m, params = model.modules, model.params
  sds = jax.ShapeDtypeStruct
  key = jax.eval_shape(lambda: jax.random.key(0))
  tuning = job.tuning if job.kind == 'personalize' else personalize_lib.TuningConfig(num_steps=num_steps)
  size = m.image_size
  if job.kind == 'personalize':
    return personalize_lib.lower_personalize_program(m, params, tuning), None
  if job.kind == 'personalize_batched':
    ids = personalize_lib.tuning_ids(m, tuning)
    b = job.batch
    args = (params, sds((b, size, size, 3), jnp.float32), jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b)),
            sds((b,), jnp.int32), sds((b,) + ids.shape, jnp.int32), None, personalize_lib.abstract_rates())
    return personalize_lib.batched_program(m, tuning, None).lower(*args), args
  if job.kind == 'pretrain':
    step_fn, state, frozen = _pretrain_step(model)
    batch = {'images': sds((job.batch, size, size, 3), jnp.float32),
             'input_ids': sds((job.batch, m.coarse_prompt_ids.shape[1]), jnp.int32)}
    args = (state, frozen, batch, key)
    return jax.jit(step_fn, donate_argnums=0).lower(*args), args
  step_fn, state, inputs = _unet_step(model, job.batch)
  args = (state, inputs, key)
  return jax.jit(step_fn, donate_argnums=0).lower(*args), args


def _pretrain_optimizer() -> optax.GradientTransformation:
  from e4t_jax.train import step as step_lib
  return step_lib.make_optimizer(step_lib.OptimizerConfig())


def _unet_optimizer() -> optax.GradientTransformation:
  return optax.adamw(1e-5, weight_decay=1e-2)


def _pretrain_step(model: model_lib.E4TModel):
  from e4t_jax.train import step as step_lib
  optimizer = _pretrain_optimizer()
  state, frozen = jax.eval_shape(lambda p: step_lib.create_train_state(model_lib.E4TModel(model.modules, p), optimizer),
                                 model.params)
  train_step = step_lib.make_train_step(model.modules, optimizer)

  def step(state, frozen, batch, rng):
    return train_step(state, frozen, batch, jax.random.fold_in(rng, state.step))

  return step, state, frozen


def _unet_step(model: model_lib.E4TModel, batch: int):
  """A U-Net denoising step on random latents and text states, every U-Net weight trained (AdamW)."""
  from e4t_jax.diffusion import schedule as schedule_lib
  m = model.modules
  cfg = m.unet.config
  optimizer = _unet_optimizer()
  sds = jax.ShapeDtypeStruct
  unet_params = model.params['unet']
  state = {'params': unet_params, 'opt_state': jax.eval_shape(optimizer.init, unet_params),
           'step': sds((), jnp.int32)}
  context = sds((batch, m.coarse_prompt_ids.shape[1], cfg.cross_attention_dims()[0]), jnp.float32)
  if cfg.text_embeds_dim is not None:  # SDXL: the pooled embedding and size/crop ids too
    context = unet_lib.SDXLContext(states=context, text_embeds=sds((batch, cfg.text_embeds_dim), jnp.float32),
                                   time_ids=sds((batch, unet_lib.SDXL_TIME_IDS), jnp.float32))
  inputs = {'latents': sds((batch, cfg.sample_size, cfg.sample_size, cfg.in_channels), jnp.float32),
            'context': context}

  def step(state, inputs, rng):
    k_noise, k_t = jax.random.split(jax.random.fold_in(rng, state['step']))
    latents = inputs['latents']
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    timesteps = schedule_lib.sample_timesteps(k_t, latents.shape[0], m.schedule)
    noisy = schedule_lib.add_noise(m.schedule, latents, noise, timesteps)

    def loss_fn(params):
      prediction = m.unet.apply({'params': params}, noisy, timesteps, inputs['context'])
      return jnp.mean(jnp.square(prediction.astype(jnp.float32) - noise))

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
            'step': state['step'] + 1}, loss

  return step, state, inputs


def random_like(abstract: Any, seed: int = 0) -> Any:
  """Concrete arrays of the abstract tree on the default device: normal(0, 0.02) kernels and
  embeddings, ones for norm scales, zeros for biases. Values do not change a program's timing, so
  leaves of one (shape, dtype, kind) share one device buffer: the full-size model is built in
  seconds, with no per-shape compiles (a well-scaled random network keeps every loss finite)."""
  from flax import traverse_util
  if not isinstance(abstract, dict):
    raise TypeError('random_like takes a nested dict of ShapeDtypeStructs.')
  flat = traverse_util.flatten_dict(abstract, keep_empty_nodes=True)
  rng = np.random.default_rng(seed)
  made: dict[tuple, jax.Array] = {}

  def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    kind = path[-1] if path[-1] in ('scale', 'bias') else 'normal'
    key = (tuple(leaf.shape), jnp.dtype(leaf.dtype).name, kind)
    if key not in made:
      if kind == 'scale':
        value = np.ones(leaf.shape, np.float32)
      elif kind == 'bias' or jnp.issubdtype(leaf.dtype, jnp.integer):
        value = np.zeros(leaf.shape, np.float32)
      else:
        value = 0.02 * rng.standard_normal(leaf.shape, np.float32)
      made[key] = jax.device_put(value.astype(leaf.dtype))
    return made[key]

  out = {}
  for path, leaf in flat.items():
    if hasattr(leaf, 'shape'):
      out[path] = fill(path, leaf)
    elif not jax.tree.leaves(leaf):  # an empty node: kept as it is (unflatten_dict matches it by identity)
      out[path] = leaf
    else:  # a pytree that is not a dict (an SDXLContext): its array leaves filled alike
      out[path] = jax.tree.map(lambda x: fill(path, x) if hasattr(x, 'shape') else x, leaf)
  return traverse_util.unflatten_dict(out)


def model_cost(model: model_lib.E4TModel, job: Job, lowered) -> dict:
  """The lowered program's cost analysis, counted with the CLIP layers unrolled (a scanned layer would
  count once): `lowered` itself when the model has no scanned tower, else its unrolled twin's lowering."""
  counted = model_lib.unrolled_clip(model)
  if counted is model:
    return runtime.cost_stats(lowered)
  return runtime.cost_stats(lower_job(counted, job)[0])


# ----------------------------------------------------------------------------- worker: compile
def compile_worker(config_name: str, job: Job, cache_dir: str) -> None:
  runtime.enable_compilation_cache(cache_dir)
  t0 = time.perf_counter()
  model = job_modules(config_name, job)
  lowered, _ = lower_job(model, job)
  lower_s = time.perf_counter() - t0
  lowered_cost = model_cost(model, job, lowered)
  harness.emit({'stage': 'lowered', 'job': job.name, 'lower_s': lower_s, 'lowered_cost': lowered_cost,
                'stablehlo': runtime.program_size(lowered)})
  t0 = time.perf_counter()
  compiled = lowered.compile()
  harness.emit({'stage': 'compiled', 'job': job.name, 'lower_s': lower_s, 'compile_s': time.perf_counter() - t0,
               'memory': runtime.memory_stats(compiled), 'cost': runtime.cost_stats(compiled),
               'lowered_cost': lowered_cost, 'stablehlo': runtime.program_size(lowered),
               'hlo': runtime.program_size(compiled)})


# ----------------------------------------------------------------------------- worker: execute
def _device_memory() -> dict[str, int] | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ('bytes_in_use', 'peak_bytes_in_use', 'bytes_limit') if k in stats}


def execute_worker(config_name: str, jobs: Sequence[Job], cache_dir: str, deadline: float,
                   num_concepts: int, train_steps: int) -> None:
  """Times `jobs` in order (one device, this process) until `deadline` (a time.time() value)."""
  runtime.enable_compilation_cache(cache_dir)
  params_cache: dict[tuple, Any] = {}
  for index, job in enumerate(jobs):
    if index:  # the first program gets `num_concepts`; its variants 20 at most
      num_concepts = min(num_concepts, 20)
    if time.time() > deadline - 10:
      harness.emit({'stage': 'skipped', 'job': job.name, 'why': 'deadline'})
      continue
    try:
      record = execute_job(config_name, job, params_cache, deadline, num_concepts, train_steps)
    except Exception as e:  # pylint: disable=broad-except  (one failing job must not lose the others)
      record = {'stage': 'failed', 'job': job.name, 'error': f'{type(e).__name__}: {str(e)[:800]}'}
    harness.emit(record)


def execute_job(config_name: str, job: Job, params_cache: dict, deadline: float, num_concepts: int,
                 train_steps: int) -> dict:
  started = time.perf_counter()
  model = job_modules(config_name, job)
  cache_key = (job.frozen_dtype,)
  if cache_key not in params_cache:
    params_cache.clear()
    t0 = time.perf_counter()
    params_cache[cache_key] = jax.block_until_ready(random_like(model.params))
    init_s = time.perf_counter() - t0
  else:
    init_s = 0.0
  params = params_cache[cache_key]
  concrete = model_lib.E4TModel(model.modules, params)
  record: dict[str, Any] = {'stage': 'executed', 'job': job.name, 'init_s': init_s,
                            'memory_before': _device_memory()}
  with harness.JaxEvents() as events:
    t0 = time.perf_counter()
    if job.kind == 'personalize':
      fn = personalize_lib.make_personalize_fn(concrete, job.steps, tuning=job.tuning)
      compiled = fn.compiled
    else:
      lowered, args = lower_job(model, job)
      record['model_flops'] = model_cost(model, job, lowered)['flops']
      compiled = lowered.compile()
    record['load_s'] = time.perf_counter() - t0
  record['cache_hits'] = events.counts[harness.CACHE_HIT_EVENT]
  record['cache_misses'] = events.counts[harness.CACHE_MISS_EVENT]
  record['compile_events'] = events.compilations
  record['memory_analysis'] = runtime.memory_stats(compiled)
  record['flops'] = runtime.cost_stats(compiled)['flops']

  if job.kind == 'personalize':
    record.update(_time_personalize(fn, params, concrete.modules.image_size, deadline, num_concepts))
  elif job.kind == 'personalize_batched':
    record.update(_time_batched(compiled, concrete, args, job.batch, deadline))
  else:
    record.update(_time_train(compiled, job, concrete, args, deadline, train_steps))
  record['memory_after'] = _device_memory()
  record['wall_s'] = time.perf_counter() - started
  return record


def _time_personalize(fn: personalize_lib.PersonalizeFn, params: Any, size: int, deadline: float,
                      num_concepts: int) -> dict:
  images = harness.synthetic_images(num_concepts + 1, size, seed=0)
  keys = list(jax.random.split(jax.random.key(1), num_concepts + 1))  # a list: no slicing in the loop
  non_finite = 0

  def call(image, key):
    nonlocal non_finite
    try:
      concept = fn(params, image, key)
      jax.block_until_ready(concept.embedding)
      return concept
    except InputError:  # a non-finite loss on random weights: the work was still done
      non_finite += 1
      return None

  t0 = time.perf_counter()
  first = call(images[-1], keys[-1])
  first_s = time.perf_counter() - t0
  seconds, _, compilations = harness.timed_calls(call, list(zip(images[:num_concepts], keys[:num_concepts])),
                                                stop=lambda: time.time() > deadline - 5)
  out = {'first_call_s': first_s, 'compilations_during_loop': compilations, 'non_finite': non_finite,
         'loss_trace_first': None if first is None else [float(x) for x in np.asarray(first.loss_trace)]}
  if seconds:
    latency = harness.latency_stats(seconds)
    latency['concepts_per_s'] = 1.0 / latency['p50_s']
    out['latency'] = latency
  return out


def _time_batched(compiled, model: model_lib.E4TModel, args: Sequence[Any], batch: int, deadline: float) -> dict:
  m, params = model.modules, model.params
  size = m.image_size
  images = harness.synthetic_images(batch, size, seed=2)
  pixels = jnp.asarray(np.stack([personalize_lib.prepare_image(im, size) for im in images]))
  keys = jax.random.split(jax.random.key(3), batch)
  steps = jnp.full((batch,), 5, jnp.int32)
  ids = personalize_lib.tuning_ids(m, personalize_lib.TuningConfig())
  ids = jnp.asarray(np.broadcast_to(ids, args[4].shape))
  call = (params, pixels, keys, steps, ids, None, personalize_lib.tuning_rates(personalize_lib.TuningConfig()))
  jax.block_until_ready(compiled(*call))  # untimed first execution
  seconds, _, _ = harness.timed_calls(compiled, [call] * 5,
                                     stop=lambda: time.time() > deadline - 5)
  if not seconds:
    return {}
  median = float(np.median(seconds))
  return {'batch': batch, 'steady_s': median, 'repeats': len(seconds), 'concepts_per_s': batch / median}


def _time_train(compiled, job: Job, model: model_lib.E4TModel, args: Sequence[Any], deadline: float,
                steps: int) -> dict:
  if job.kind == 'pretrain':
    from e4t_jax.train import step as step_lib
    abstract_batch = args[2]
    state, frozen = step_lib.create_train_state(model, _pretrain_optimizer())
    state = jax.tree.map(jnp.copy, state)  # donated each step: keep the shared params intact
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, abstract_batch['images'].shape), jnp.float32)
    prompt = model.modules.config.tuning_prompt.replace('{}', model.modules.config.placeholder)
    ids = jnp.asarray(np.repeat(model.modules.tokenize([prompt]), job.batch, axis=0))
    batch = {'images': images, 'input_ids': ids}
    run = lambda s: compiled(s, frozen, batch, jax.random.key(0))
  else:
    abstract_inputs = args[1]
    unet = jax.tree.map(jnp.copy, model.params['unet'])
    state = {'params': unet, 'opt_state': _unet_optimizer().init(unet),
             'step': jnp.zeros((), jnp.int32)}
    inputs = random_like(abstract_inputs, seed=4)
    run = lambda s: compiled(s, inputs, jax.random.key(0))
  state, metrics = run(state)  # warm-up: first execution
  jax.block_until_ready(state)
  seconds = []
  for _ in range(steps):
    if time.time() > deadline - 5:
      break
    t0 = time.perf_counter()
    state, metrics = run(state)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - t0)
  loss = metrics['loss'] if isinstance(metrics, dict) else metrics
  out = {'batch': job.batch, 'final_loss': float(loss)}
  if seconds:
    out['step'] = harness.latency_stats(seconds)
  return out


# ----------------------------------------------------------------------------- attention
def attention_check(shapes: Sequence[tuple[int, int, int, int]] = ((2, 4096, 8, 40), (2, 1024, 8, 80)),
                    repeats: int = 20) -> dict:
  """The fused (cuDNN) and reference (XLA) attention at U-Net self-attention shapes [b, tokens, heads,
  head_dim], bfloat16: relative difference of outputs and gradients, and forward+backward time."""
  from e4t_jax.models.layers import dot_product_attention, fused_attention_applies
  results = []
  for b, t, h, d in shapes:
    k1, k2, k3 = jax.random.split(jax.random.key(t * d), 3)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk in (k1, k2, k3))
    entry: dict[str, Any] = {'shape': [b, t, h, d], 'fused_applies': bool(fused_attention_applies(q, k))}
    outs = {}
    for impl in ('xla', 'cudnn'):
      if impl == 'cudnn' and not entry['fused_applies']:
        continue
      loss = lambda q, k, v, impl=impl: jnp.sum(
          dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32) ** 2)
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      try:
        out = jax.block_until_ready(fn(q, k, v))
      except Exception as e:  # pylint: disable=broad-except
        entry[f'{impl}_error'] = f'{type(e).__name__}: {str(e)[:300]}'
        continue
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v))
        times.append(time.perf_counter() - t0)
      entry[f'{impl}_fwd_bwd_ms'] = 1e3 * float(np.median(times))
      outs[impl] = out
    if len(outs) == 2:
      ref = jax.tree.leaves(outs['xla'][1])
      fused = jax.tree.leaves(outs['cudnn'][1])
      entry['grad_rel_diff'] = max(float(jnp.linalg.norm((a.astype(jnp.float32) - r.astype(jnp.float32)).ravel())
                                         / jnp.linalg.norm(r.astype(jnp.float32).ravel())) for a, r in zip(fused, ref))
      o_ref = dot_product_attention(q, k, v, implementation='xla').astype(jnp.float32)
      o_fused = dot_product_attention(q, k, v, implementation='cudnn').astype(jnp.float32)
      entry['out_rel_diff'] = float(jnp.linalg.norm((o_fused - o_ref).ravel()) / jnp.linalg.norm(o_ref.ravel()))
    results.append(entry)
  return {'backend': jax.default_backend(), 'shapes': results}


# ----------------------------------------------------------------------------- torch baseline


# ----------------------------------------------------------------------------- orchestration
def _run(args: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[list[dict], dict]:
  return harness.run_worker(WORKER_MODULE, args, timeout_s=max(timeout_s, 1.0), env_overrides=env)


def _run_until(args: Sequence[str], deadline: float, env: dict[str, str] | None = None) -> tuple[list[dict], dict]:
  """A worker whose time limit counts from when it starts (queued workers start late)."""
  return _run(args, deadline - time.time(), env)


def run_full_bench(config_name: str = 'sd15', *, json_out: str | os.PathLike | None = None,
                   deadline_s: float = 480.0, parallel: int = 4, num_concepts: int = 100, train_steps: int = 10,
                   train_batch: int = 8, concepts_batch: int = 4, torch_baseline: bool = True,
                   jobs: dict[str, list[Job]] | None = None, minimal: bool = False, compile_share: float = 0.55,
                   log=print) -> dict:
  """Compiles every job in parallel, then executes them one worker at a time; see the module docstring."""
  bench.check_config(config_name)
  # Each process takes GPU memory as it needs it (not 75% up front): workers share the device, and
  # memory_stats' peak then says what a program really used.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  start = time.time()
  deadline = start + deadline_s
  jobs = jobs or default_jobs(train_batch, concepts_batch, minimal)
  envs = {worker: worker_env(worker_jobs) for worker, worker_jobs in jobs.items()}  # checked before any work
  result: dict[str, Any] = {
      'schema': SCHEMA, 'config': config_name,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': harness.machine_info(), 'device_memory': _device_memory(),
      'settings': {'deadline_s': deadline_s, 'parallel': parallel, 'num_concepts': num_concepts,
                   'train_steps': train_steps, 'train_batch': train_batch, 'concepts_batch': concepts_batch,
                   'num_steps': 5, 'jobs': {w: [j.name for j in js] for w, js in jobs.items()}},
      'peak_tflops': runtime.peak_tflops(), 'compile': {}, 'execute': {}, 'errors': []}

  def save():
    result['elapsed_s'] = time.time() - start
    if json_out is not None:
      harness.write_json(json_out, result)

  with tempfile.TemporaryDirectory(prefix='e4t-bench-full-') as cache_dir:
    # Phase 1: compile everything in parallel (CPU-bound; the persistent cache carries the executables).
    # Round-robin over the workers' lists, so each worker's first (most wanted) program compiles first.
    lists = list(jobs.values())
    all_jobs = [js[i] for i in range(max(map(len, lists))) for js in lists if i < len(js)]
    compile_budget = deadline_s * compile_share
    with futures.ThreadPoolExecutor(max(parallel, 1)) as pool:
      compile_args = lambda job: ['--compile', job.to_arg(), '--config', config_name, '--cache-dir', cache_dir]
      running = {pool.submit(_run_until, compile_args(job), start + compile_budget, job.env()): job
                 for job in all_jobs}
      for done in futures.as_completed(running):
        job = running[done]
        records, info = done.result()
        record = next((r for r in records if r.get('stage') == 'compiled'), None) or {}
        lowered = next((r for r in records if r.get('stage') == 'lowered'), None) or {}
        result['compile'][job.name] = dict(lowered, **record, worker=info)
        why = 'timed out' if info['timed_out'] else info['error']
        log(f'compiled {job.name}: ' + (f'{record["compile_s"]:.1f}s' if record else f'FAILED ({why})'))
        if not record and info.get('stderr_tail') and not info['timed_out']:
          log(info['stderr_tail'])
        save()
    # Phase 2: execute, one worker at a time.
    try:
      small = config_name == 'tiny' or jax.default_backend() == 'cpu'
      result['attention'] = attention_check(((2, 256, 4, 8),) if small else ((2, 4096, 8, 40), (2, 1024, 8, 80)),
                                            repeats=3 if small else 20)
    except Exception as e:  # pylint: disable=broad-except
      result['errors'].append(f'attention: {type(e).__name__}: {e}'[:500])
    save()
    # A program that did not compile in phase 1 would compile again inside its worker and eat the
    # time of the programs that did (an H200 run lost its one compiled U-Net step that way): skip it.
    for name, compiled in result['compile'].items():
      if 'compile_s' not in compiled:
        result['execute'][name] = {'stage': 'skipped', 'job': name, 'why': 'not compiled in the compile phase'}
    workers = [(w, [j for j in js if 'compile_s' in result['compile'].get(j.name, {})]) for w, js in jobs.items()]
    workers = [(w, js) for w, js in workers if js]
    for index, (worker, worker_jobs) in enumerate(workers):
      # Each worker gets an equal share of what is left (the torch baseline keeps ~45 s of it).
      remaining = deadline - time.time() - (45 if torch_baseline else 0)
      if remaining < 20:
        result['errors'].append(f'{worker}: not executed, deadline')
        continue
      worker_deadline = time.time() + remaining / (len(workers) - index)
      records, info = _run(['--execute', json.dumps([j.to_arg() for j in worker_jobs]), '--config', config_name,
                            '--cache-dir', cache_dir, '--deadline', str(worker_deadline),
                            '--num-concepts', str(num_concepts), '--train-steps', str(train_steps)],
                           worker_deadline - time.time() + 10, envs[worker])
      for record in records:
        result['execute'][record['job']] = record
        log(f'executed {record["job"]}: {record["stage"]}')
      if info['returncode'] != 0:
        result['errors'].append(f'{worker} worker: {info}')
      save()
  if torch_baseline:
    remaining = deadline - time.time()
    if remaining > 20:
      records, info = _run(['--torch', '--config', config_name, '--batch', str(train_batch),
                            '--train-steps', str(train_steps), '--deadline', str(deadline)], remaining + 5)
      result['torch'] = next((r for r in records if r.get('stage') == 'torch'), None)
      if result['torch'] is None:
        result['errors'].append(f'torch worker: {info}')
    else:
      result['errors'].append('torch baseline: not run, deadline')
  result['summary'] = summarize(result)
  save()
  return result


def summarize(result: dict) -> dict:
  """The headline figures: latency, memory, TFLOP/s and MFU of each executed job, JAX/torch ratio."""
  peak = result.get('peak_tflops')
  summary = {}
  for name, record in result.get('execute', {}).items():
    if record.get('stage') != 'executed':
      continue
    entry: dict[str, Any] = {}
    memory = record.get('memory_analysis') or {}
    entry['program_bytes'] = sum(memory.get(k, 0) for k in ('argument_size_in_bytes', 'temp_size_in_bytes',
                                                             'output_size_in_bytes')) - memory.get('alias_size_in_bytes', 0)
    entry['device_peak_bytes'] = (record.get('memory_after') or {}).get('peak_bytes_in_use')
    if 'latency' in record:
      entry.update(p50_s=record['latency']['p50_s'], p95_s=record['latency']['p95_s'], n=record['latency']['n'],
                   compilations_during_loop=record['compilations_during_loop'])
    if 'concepts_per_s' in record:
      entry['concepts_per_s'] = record['concepts_per_s']
    if 'step' in record and record.get('model_flops'):
      # MFU counts the model's FLOPs, from the LOWERED program: on a GPU the compiled program's cost
      # analysis leaves out the cuBLAS/cuDNN custom calls (most of the FLOPs). A remat variant's
      # recomputation is not useful work: its rate is taken against the step without remat.
      plain = '/'.join(p for p in name.split('/') if not p.startswith('remat='))
      plain_record = (result.get('execute') or {}).get(plain) or {}
      model_flops = plain_record.get('model_flops') or record['model_flops']
      step_s = record['step']['p50_s']
      entry.update(step_s=step_s, model_flops=model_flops, tflops_per_s=model_flops / step_s / 1e12)
      if peak:
        entry['mfu'] = entry['tflops_per_s'] / peak
    summary[name] = entry
  flagged = {}
  for name, compiled in (result.get('compile') or {}).items():
    parts = name.split('/')
    if not parts[-1].startswith('xla='):
      continue
    base = '/'.join(parts[:-1])
    pair = {'compile_s': [(result['compile'].get(base) or {}).get('compile_s'), compiled.get('compile_s')],
            'p50_s': [summary.get(base, {}).get('p50_s', summary.get(base, {}).get('step_s')),
                      summary.get(name, {}).get('p50_s', summary.get(name, {}).get('step_s'))]}
    flagged[name] = {'against': base, **{f'{k}_default_vs_flagged': v for k, v in pair.items()},
                     **{f'{k}_ratio': v[1] / v[0] for k, v in pair.items() if None not in v and v[0] > 0}}
  if flagged:
    summary['xla_flags'] = flagged
  torch_result = result.get('torch') or {}
  unet = next((e for n, e in summary.items() if _is_plain_bf16_unet_step(n) and 'step_s' in e), None)
  if torch_result.get('step'):
    if unet:
      summary['jax_over_torch_unet_step'] = unet['step_s'] / torch_result['step']['p50_s']
      flops = unet['model_flops']
    else:  # the same FLOPs, counted from the JAX program's lowering (compile phase)
      flops = next((c.get('lowered_cost', {}).get('flops') for n, c in (result.get('compile') or {}).items()
                    if _is_plain_bf16_unet_step(n) and c.get('lowered_cost')), None)
    if flops:
      summary['torch_unet_step'] = {'step_s': torch_result['step']['p50_s'],
                                    'tflops_per_s': flops / torch_result['step']['p50_s'] / 1e12}
      if peak:
        summary['torch_unet_step']['mfu'] = summary['torch_unet_step']['tflops_per_s'] / peak
  return summary


def _is_plain_bf16_unet_step(name: str) -> bool:
  """The JAX program the PyTorch baseline mirrors: the bfloat16 U-Net step, no remat, fused attention."""
  parts = name.split('/')
  return parts[:2] == ['unet_step', 'bfloat16'] and all(p.startswith('b') for p in parts[2:])


def format_table(result: dict) -> str:
  lines = [f'e4t bench full, {result["config"]}, {result["machine"]["jax_devices"]}, peak {result.get("peak_tflops")} '
           'TFLOP/s', '| job | compile s | program memory | device peak | p50 | p95 | other |', '|---|---|---|---|---|---|---|']
  for name, compiled in result['compile'].items():
    entry = result.get('summary', {}).get(name, {})
    memory = compiled.get('memory') or {}
    program = sum(memory.get(k, 0) for k in ('argument_size_in_bytes', 'temp_size_in_bytes', 'output_size_in_bytes'))
    p50 = entry.get('p50_s', entry.get('step_s'))
    other = []
    if 'concepts_per_s' in entry:
      other.append(f'{entry["concepts_per_s"]:.2f} concepts/s')
    if 'tflops_per_s' in entry:
      other.append(f'{entry["tflops_per_s"]:.3g} TFLOP/s' + (f', MFU {entry["mfu"]:.1%}' if 'mfu' in entry else ''))
    if 'compilations_during_loop' in entry:
      other.append(f'{entry["compilations_during_loop"]} compiles in {entry["n"]} concepts')
    lines.append(f'| {name} | {harness.fmt_seconds(compiled.get("compile_s"))} | {harness.fmt_bytes(program or None)} | '
                 f'{harness.fmt_bytes(entry.get("device_peak_bytes"))} | {harness.fmt_seconds(p50)} | '
                 f'{harness.fmt_seconds(entry.get("p95_s"))} | {"; ".join(other)} |')
  torch_result = result.get('torch') or {}
  if torch_result.get('step'):
    lines.append(f'torch U-Net step (b{torch_result["batch"]}, bf16 autocast, eager): '
                 f'{torch_result["step"]["p50_s"] * 1e3:.1f} ms; JAX/torch '
                 f'{result["summary"].get("jax_over_torch_unet_step", float("nan")):.2f}')
  for name, entry in (result.get('summary') or {}).get('xla_flags', {}).items():
    lines.append(f'{name} against {entry["against"]}: compile x{entry.get("compile_s_ratio", float("nan")):.2f}, '
                 f'p50 x{entry.get("p50_s_ratio", float("nan")):.2f}')
  for entry in (result.get('attention') or {}).get('shapes', []):
    lines.append(f'attention {entry["shape"]}: xla {entry.get("xla_fwd_bwd_ms", float("nan")):.2f} ms, cudnn '
                 f'{entry.get("cudnn_fwd_bwd_ms", float("nan")):.2f} ms, grad rel diff {entry.get("grad_rel_diff")}')
  lines.extend(f'error: {e}' for e in result.get('errors', []))
  return '\n'.join(lines)


def _worker_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m e4t_jax.bench.full')
  stage = parser.add_mutually_exclusive_group(required=True)
  stage.add_argument('--compile', metavar='JOB')
  stage.add_argument('--execute', metavar='JOBS')
  stage.add_argument('--torch', action='store_true')
  parser.add_argument('--config', default='sd15')
  parser.add_argument('--cache-dir')
  parser.add_argument('--deadline', type=float, default=float('inf'))
  parser.add_argument('--num-concepts', type=int, default=100)
  parser.add_argument('--train-steps', type=int, default=10)
  parser.add_argument('--batch', type=int, default=8)
  args = parser.parse_args(argv)
  if args.compile:
    compile_worker(args.config, Job.from_arg(args.compile), args.cache_dir)
  elif args.execute:
    execute_worker(args.config, [Job.from_arg(a) for a in json.loads(args.execute)], args.cache_dir, args.deadline,
                   args.num_concepts, args.train_steps)
  else:
    harness.emit(dict(stage='torch', **torch_reference.torch_unet_step(args.batch, args.config, args.train_steps, args.deadline)))
  return 0


if __name__ == '__main__':
  sys.exit(_worker_main(sys.argv[1:]))
