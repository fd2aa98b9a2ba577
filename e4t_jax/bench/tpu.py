"""Ahead-of-time compiles for Cloud TPU topologies from a machine without a TPU (issue 18, first part).

`libtpu` (the `tpu` extra) describes a TPU slice (`jax.experimental.topologies.get_topology_desc`) and runs the
real TPU compiler on it, so a program's per-chip memory, FLOPs and collectives are known before a pod is paid
for. Programs (abstract params: no weights):

- `personalize`: the lite tuning program on one chip (one concept per chip; concepts scale out by data
  parallelism);
- `pretrain`: the E4T train step on a (data, fsdp, tensor) mesh over every chip of the topology, shardings by
  the config's logical-axis rules (frozen weights fsdp-sharded).

    e4t bench tpu --topology v5e:2x2 --config tiny --program personalize --json out.json
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax import runtime
from e4t_jax.errors import ConfigError

# HBM per chip by `device_kind` (public Cloud TPU specs).
HBM_BYTES = {'TPU v4': 32 * 2**30, 'TPU v5 lite': 16 * 2**30, 'TPU v5': 95 * 2**30, 'TPU v6 lite': 32 * 2**30}
PROGRAMS = ('personalize', 'pretrain')
ATTENTION = ('auto', 'xla')
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'collective-permute', 'all-to-all')


def libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(name: str, slices: int = 1) -> list:
  """The devices of TPU topology `name` (e.g. 'v5e:2x2', 'v5p:2x2x2'), `slices` of it (multi-slice: the
  slices joined by the data-center network), described by libtpu on this host."""
  if slices < 1:
    raise ConfigError(f'--slices {slices}: at least 1.')
  if not libtpu_available():
    raise ConfigError('AOT compiles for TPU need libtpu: pip install "e4t-jax[tpu]" (or the lock\'s libtpu '
                      'wheel); nothing else changes for CPU/GPU use.')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # no metadata server off Cloud: do not wait for one
  # No chips are opened for a compile: several processes (test workers, parallel benches) may share libtpu,
  # which otherwise holds /tmp/libtpu_lockfile for the first one.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies
  try:
    kwargs = {'num_slices': slices} if slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu', **kwargs).devices)
  except Exception as e:  # libtpu's errors are RuntimeErrors/XlaRuntimeErrors with long traces
    raise ConfigError(f'--topology {name!r}: libtpu does not know it ({str(e).splitlines()[0][:160]}); '
                      'try e.g. v5e:2x2, v5e:4x4, v5p:2x2x2, v6e:2x2.') from None


def _program(config_name: str, program: str, devices: list, mesh_shape: dict[str, int], dtype: str,
             tuning=None, remat: str = 'none', batch: int | None = None, attention: str = 'auto',
             scan_clip: bool = True):
  """(lowered program) of `program` for `devices`; `tuning` (a TuningConfig) for 'personalize'. Trace it
  inside `tpu_attention.target_platform('tpu')` (as `compile_report` does), so attention='auto' takes the
  Pallas flash kernel where it applies."""
  from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
  from e4t_jax import personalize as personalize_lib
  from e4t_jax.bench import full as bench_full
  sds = jax.ShapeDtypeStruct
  if program == 'personalize':
    model = bench_full.job_modules(config_name, bench_full.Job('personalize', dtype=dtype, remat=remat,
                                                                attention=attention, scan_clip=scan_clip))
    one = SingleDeviceSharding(devices[0])
    on = lambda tree: jax.tree.map(lambda x: sds(x.shape, x.dtype, sharding=one), tree)
    m, tuning = model.modules, tuning or personalize_lib.TuningConfig(num_steps=5)
    ids, size, key = personalize_lib.tuning_ids(m, tuning), m.image_size, jax.eval_shape(lambda: jax.random.key(0))
    args = (on(model.params), sds((size, size, 3), jnp.float32, sharding=one), sds(key.shape, key.dtype, sharding=one),
            sds((), jnp.int32, sharding=one), sds(ids.shape, jnp.int32, sharding=one), None,
            on(personalize_lib.abstract_rates()))
    return jax.jit(personalize_lib.tuning_program(m, tuning)).lower(*args)
  import optax
  from e4t_jax.parallel import mesh as mesh_lib
  from e4t_jax.train import loop, step as step_lib
  mesh = mesh_lib.make_mesh(mesh_shape, devices=devices)
  batch = batch or mesh_shape.get('data', 1) * mesh_shape.get('fsdp', 1) * 2
  model = bench_full.job_modules(config_name, bench_full.Job('pretrain', dtype=dtype, batch=batch, remat=remat,
                                                                   attention=attention, scan_clip=scan_clip))
  step_fn, state, frozen = bench_full._pretrain_step(model)  # pylint: disable=protected-access
  rules = mesh_lib.DEFAULT_LOGICAL_AXIS_RULES
  trainable_shardings, frozen_shardings = loop.state_and_frozen_shardings(model, mesh, rules, 'fsdp')
  replicated = NamedSharding(mesh, P())
  optimizer = bench_full._pretrain_optimizer()  # pylint: disable=protected-access
  opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, trainable_shardings,
                                        transform_non_params=lambda _: replicated)
  put = lambda tree, shardings: jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s), tree, shardings)
  state = step_lib.TrainState(step=sds((), jnp.int32, sharding=replicated),
                              trainable=put(state.trainable, trainable_shardings),
                              opt_state=put(state.opt_state, opt_shardings))
  m, size = model.modules, model.modules.image_size
  over_batch = NamedSharding(mesh, P(('data', 'fsdp')))
  inputs = {'images': sds((batch, size, size, 3), jnp.float32, sharding=over_batch),
            'input_ids': sds((batch, m.coarse_prompt_ids.shape[1]), jnp.int32, sharding=over_batch)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  with mesh_lib.activation_sharding(mesh, rules):
    return jax.jit(step_fn, donate_argnums=0).lower(state, put(frozen, frozen_shardings), inputs,
                                                     sds(key.shape, key.dtype, sharding=replicated))


def compile_report(config_name: str, program: str, topology: str, mesh_shape: dict[str, int] | None = None,
                   dtype: str = 'bfloat16', tuning=None, remat: str = 'none', batch: int | None = None,
                   attention: str = 'auto', slices: int = 1, scan_clip: bool = True) -> dict[str, Any]:
  """AOT-compiles `program` for `topology` and reports per-chip memory against the chip's HBM, FLOPs, the
  collectives in the compiled HLO and the compile seconds.

  tuning: the `TuningConfig` of 'personalize' (None: lite mode, 5 steps); remat: the U-Net's remat
  policy ('none' or a `jax.checkpoint_policies` name, e.g. 'nothing_saveable'); batch: the pretraining
  step's global batch (None: 2 per data x fsdp device), a multiple of data x fsdp; attention: 'auto' (the
  Pallas TPU flash kernel where it applies, `models.tpu_attention`) or 'xla' (XLA's reference attention
  everywhere); slices: how many copies of `topology` joined by the data-center network (multi-slice; the
  pretraining mesh's data axis spans them, by default one data row per slice); scan_clip: the CLIP towers'
  layers scanned (default) or unrolled (compile-time comparisons)."""
  if attention not in ATTENTION:
    raise ConfigError(f'--attention {attention!r} is not one of {ATTENTION}.')
  if program not in PROGRAMS:
    raise ConfigError(f'--program {program!r} is not one of {PROGRAMS}.')
  devices = topology_devices(topology, slices)
  mesh_shape = dict(mesh_shape or {'data': slices, 'fsdp': len(devices) // slices, 'tensor': 1})
  if program == 'pretrain' and int(np.prod(list(mesh_shape.values()))) != len(devices):
    raise ConfigError(f'mesh {mesh_shape} has {int(np.prod(list(mesh_shape.values())))} devices, the topology '
                      f'{topology} has {len(devices)}.')
  shards = mesh_shape.get('data', 1) * mesh_shape.get('fsdp', 1)
  if program == 'pretrain' and batch is not None and (batch < 1 or batch % shards):
    raise ConfigError(f'--batch {batch} must be a positive multiple of data x fsdp = {shards} (the batch is '
                      'split over those axes).')
  from e4t_jax.models import tpu_attention
  start = time.perf_counter()
  with tpu_attention.target_platform('tpu'):
    lowered = _program(config_name, program, devices, mesh_shape, dtype, tuning, remat, batch, attention, scan_clip)
    factorization = None
    if program == 'personalize' and tuning is not None and tuning.mode == 'paper':
      from e4t_jax import personalize as personalize_lib  # pylint: disable=g-import-not-at-top
      factorization = personalize_lib.delta_factorization(tuning)  # how the stored delta factors were traced
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = runtime.memory_stats(compiled) or {}
  kind = devices[0].device_kind
  hbm = HBM_BYTES.get(kind)
  # Per chip: XLA's own peak where it reports one (TPU does), else what can be live at once at most.
  peak = memory.get('peak_memory_in_bytes') or ((memory['argument_size_in_bytes'] + memory['output_size_in_bytes']
                                                 + memory['temp_size_in_bytes'] - memory['alias_size_in_bytes'])
                                                if memory else None)
  text = compiled.as_text() or ''
  counted = lowered
  if scan_clip:  # the cost analysis counts a scanned layer once: count on the unrolled twin's lowering
    with tpu_attention.target_platform('tpu'):
      counted = _program(config_name, program, devices, mesh_shape, dtype, tuning, remat, batch, attention, False)
  flops = runtime.cost_stats(counted).get('flops') or runtime.cost_stats(compiled).get('flops')
  return {'config': config_name, 'program': program, 'topology': topology, 'slices': slices, 'device_kind': kind,
          'chips': len(devices) if program == 'pretrain' else 1, 'mesh': mesh_shape if program == 'pretrain' else None,
          'dtype': dtype, 'remat': remat, 'attention': attention,
          'clip_layers': 'scanned' if scan_clip else 'unrolled',
          'global_batch': (batch or shards * 2) if program == 'pretrain' else None,
          'tuning': None if program != 'personalize' or tuning is None else {
              'mode': tuning.mode, 'num_steps': tuning.num_steps, 'batch_size': tuning.batch_size,
              'micro_batch': tuning.micro_batch, 'factorization': factorization},
          'memory_per_chip': memory, 'peak_bytes_per_chip': peak, 'hbm_bytes': hbm,
          'fits': None if hbm is None or peak is None else bool(peak <= hbm),
          'flops': flops,
          'collectives': {op: text.count(f' {op}(') + text.count(f' {op}-start(') for op in COLLECTIVES},
          # Pallas kernels (the flash attention's forward and backward calls) in the compiled program
          'pallas_kernels': text.count('custom_call_target="tpu_custom_call"'),
          'stablehlo': runtime.program_size(lowered), 'hlo': runtime.program_size(compiled),
          'lower_s': round(lower_s, 2), 'compile_s': round(compile_s, 2)}
