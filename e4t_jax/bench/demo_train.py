"""Where `e4t demo-train`'s CPU time goes, and what makes it go further: `e4t bench demo-train`.

    e4t bench demo-train [--variants baseline,batch48,...] [--seconds 30] [--json OUT] [--smoke]

The text-to-image stage (the U-Net and text encoder trained from scratch) is ~60% of the demo model's
training time on XLA:CPU. This benchmark times that stage's own training step (`demo_train.fit_step` on
`demo_train.t2i_problem`: the same loss, optimizer, EMA and host batches as `fit`) under variants, one
worker process each (XLA flags are per process; a worker's timings do not share the machine with
another's):

  baseline      the shipped run: float32, batch 24, XLA:CPU's defaults.
  batch48/96    a larger batch: examples per second (the per-step cost is amortized over more images).
  bfloat16      the U-Net's compute in bfloat16 (params, optimizer and the loss stay float32).
  2-devices     the batch split over 2 CPU devices (data parallel, params replicated): XLA:CPU runs the
                devices' programs concurrently, so two small convolutions can use the 2 cores where
                one does not split well.
  xla-deferred  the U-Net's attention as `layers.deferred_softmax_attention` (heads-major layout, the
                softmax's division after the value matmul) instead of jax.nn's XLA attention.
  eigen-convs   convolutions by Eigen instead of YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=
                -individual_convolution`).
  no-xnnpack    `--xla_cpu_use_xnnpack=false`.
  onednn-dots   matrix multiplications by oneDNN (`--xla_cpu_experimental_onednn_fusion_type=dot`).
  fast-math     `--xla_cpu_enable_fast_math=true`.
  wider         "fewer but wider": U-Net channels (64, 128) instead of (48, 96): how the achieved
                FLOP rate scales with the width (a different model, so its step time is not a ratio).
  combined      xla-deferred + 2-devices + eigen-convs together.
  profile       the baseline step under the profiler (`--xla_cpu_enable_xprof_traceme=true`): the time
                of every XLA:CPU thunk, summed over threads, in categories: convolution forward /
                input gradient / weight gradient, matrix multiplications, element-wise and reduction
                fusions, copies and transposes, other.

Per variant: compile seconds, FLOPs per step (XLA's cost analysis), step time (p50 over a time budget,
after two warm-up steps; the host batch is part of the step, as in `fit`), examples/s, achieved GFLOP/s,
the XLA compilations seen while timing (must be 0), and `vs_baseline` (examples/s ratio to the
baseline of the same run). JSON schema 'e4t-bench-demo-train/1'.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from e4t_jax.bench import harness
from e4t_jax.errors import ConfigError

WORKER_MODULE = 'e4t_jax.bench.demo_train'
SCHEMA = 'e4t-bench-demo-train/1'


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  batch: int | None = None  # None: the config's t2i_batch
  dtype: str = 'float32'  # the U-Net's compute dtype
  xla_flags: str = ''
  devices: int = 1  # data parallel over this many CPU devices
  channels: tuple[int, int] | None = None  # U-Net block_out_channels; None: the config's
  attention: str | None = None  # the U-Net's `attention_implementation`
  profile: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant('baseline'),
    Variant('batch48', batch=48),
    Variant('batch96', batch=96),
    Variant('bfloat16', dtype='bfloat16'),
    Variant('2-devices', devices=2),
    Variant('xla-deferred', attention='xla_deferred'),
    Variant('eigen-convs', xla_flags='--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'),
    Variant('no-xnnpack', xla_flags='--xla_cpu_use_xnnpack=false'),
    Variant('onednn-dots', xla_flags='--xla_cpu_experimental_onednn_fusion_type=dot'),
    Variant('fast-math', xla_flags='--xla_cpu_enable_fast_math=true'),
    Variant('wider', channels=(64, 128)),
    Variant('combined', attention='xla_deferred', devices=2,
            xla_flags='--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'),
    Variant('profile', xla_flags='--xla_cpu_enable_xprof_traceme=true', profile=True),
)}
DEFAULT_VARIANTS = tuple(VARIANTS)


def parse_variants(text: str | None) -> tuple[str, ...]:
  """'a,b' -> ('a', 'b'), checked against VARIANTS (ConfigError naming the known ones)."""
  if text is None:
    return DEFAULT_VARIANTS
  names = tuple(v.strip() for v in text.split(',') if v.strip())
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or not names:
    raise ConfigError(f'--variants: unknown {", ".join(unknown) or "(none given)"}; choose from {", ".join(VARIANTS)}.')
  return names


def worker_env(variant: Variant) -> dict[str, str]:
  """The worker's XLA_FLAGS: the variant's flags and its device count (nothing inherited)."""
  return {'XLA_FLAGS': f'{variant.xla_flags} --xla_force_host_platform_device_count={variant.devices}'.strip(),
          'JAX_PLATFORMS': 'cpu'}


# ----------------------------------------------------------------------------- worker
def _problem(variant: Variant, smoke: bool, pool_size: int = 256):
  """(step function, initial state, batches, config) of the demo's text-to-image stage for `variant`."""
  import jax.numpy as jnp
  from e4t_jax.lab import demo_train
  config = demo_train.DemoTrainConfig.smoke() if smoke else demo_train.DemoTrainConfig()
  config = dataclasses.replace(config, t2i_batch=variant.batch or config.t2i_batch,
                               unet_channels=variant.channels or config.unet_channels)
  unet_config, _, text_config, _ = demo_train.architecture(config)
  pool = demo_train.render_pool(pool_size, config.seed)
  # Latent statistics: random (the step's cost does not depend on their values; no VAE needed).
  size = unet_config.sample_size
  rng = np.random.default_rng(0)
  means = rng.normal(size=(pool_size, size, size, unet_config.in_channels)).astype(np.float32)
  stds = np.abs(rng.normal(0.1, 0.02, means.shape)).astype(np.float32)
  loss_fn, params, batches = demo_train.t2i_problem(config, unet_config, text_config, (means, stds), pool, 0.2,
                                                    dtype=jnp.dtype(variant.dtype), attention=variant.attention)
  optimizer = demo_train._adamw(config.t2i_lr, config.t2i_steps)  # pylint: disable=protected-access
  step = demo_train.fit_step(loss_fn, optimizer, config.ema_decay)
  return step, (params, params, optimizer.init(params)), batches, config


def run_variant(variant: Variant, seconds: float, smoke: bool) -> dict:
  """Compiles and times the step of `variant` in this process (whose XLA flags are the variant's), with the
  CPU attention `e4t demo-train` uses (`DemoTrainConfig.cpu_attention`) wherever the variant sets none."""
  from e4t_jax.lab import demo_train
  from e4t_jax.models import layers
  with layers.auto_cpu_attention(demo_train.DemoTrainConfig().cpu_attention):
    return _run_variant(variant, seconds, smoke)


def _run_variant(variant: Variant, seconds: float, smoke: bool) -> dict:
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  step, state, batches, config = _problem(variant, smoke)
  if len(jax.devices()) < variant.devices:
    raise ConfigError(f'variant {variant.name} needs {variant.devices} devices; this process has {len(jax.devices())}.')
  put = lambda batch: batch
  if variant.devices > 1:
    mesh = Mesh(np.asarray(jax.devices()[:variant.devices]), ('data',))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    put = lambda batch: jax.device_put(batch, NamedSharding(mesh, PartitionSpec('data')))
  jitted = jax.jit(step)
  key, t = jax.random.key(config.seed), np.float32(0)
  args = (*state, put(batches(0)), key, t)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA counts one device's program: the data-parallel variants do `devices` times that.
  flops = float(cost.get('flops', 0.0)) * variant.devices if cost else None

  def one(i: int, state):
    out = jitted(*state, put(batches(i)), jax.random.fold_in(key, i), np.float32(i))
    return jax.block_until_ready(out)[:3]

  for i in range(2):  # warm-up (first-call allocations, thread-pool start-up)
    state = one(i, state)
  seconds_per_step = []
  started = time.perf_counter()
  with harness.JaxEvents() as events:
    i = 2
    while len(seconds_per_step) < 3 or (time.perf_counter() - started < seconds and len(seconds_per_step) < 1000):
      s0 = time.perf_counter()
      state = one(i, state)
      seconds_per_step.append(time.perf_counter() - s0)
      i += 1
  stats = harness.latency_stats(seconds_per_step)
  record = {'variant': variant.name, 'settings': dataclasses.asdict(variant), 'batch': config.t2i_batch,
            'unet_channels': list(config.unet_channels), 'compile_s': compile_s, 'flops_per_step': flops,
            'step': stats, 'examples_per_s': config.t2i_batch / stats['p50_s'],
            'gflops_per_s': None if not flops else flops / stats['p50_s'] / 1e9,
            'compilations_while_timing': events.compilations}
  if variant.profile:
    kernel_shapes = {tuple(sorted(x.shape)) for x in jax.tree.leaves(state[0]) if x.ndim == 4}
    record['profile'] = profile_step(lambda s, i: one(i, s), state, hlo_text(compiled), kernel_shapes, steps=3)
  return record


# ----------------------------------------------------------------------------- profile
_INSTRUCTION = re.compile(r'^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, list[str]]]:
  """Compiled HLO text -> ({instruction: {opcode, shape, calls, op_name}}, {computation: [instructions]})."""
  instructions: dict[str, dict] = {}
  computations: dict[str, list[str]] = collections.defaultdict(list)
  current = None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):  # a computation's header
      header = line[len('ENTRY '):] if line.startswith('ENTRY ') else line
      current = header.split()[0].lstrip('%')
      continue
    if line.startswith('}'):
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      name, shape, opcode = match.groups()
      op_name = _OP_NAME.search(line)
      instructions[name] = {'opcode': opcode, 'shape': shape, 'calls': _CALLS.findall(line),
                            'op_name': op_name.group(1) if op_name else ''}
      computations[current].append(name)
  return instructions, dict(computations)


def hlo_text(compiled) -> str:
  """The optimized HLO of a compiled program, with metadata (op names tell forward from backward)."""
  try:
    from jaxlib import _hlo  # pylint: disable=g-import-not-at-top
    options = _hlo.HloPrintOptions.short_parsable()
    options.print_metadata = True
    return '\n'.join(m.to_string(options) for m in compiled.runtime_executable().hlo_modules())
  except (ImportError, AttributeError):  # private API moved: names and shapes still classify most thunks
    return compiled.as_text()


def _dims(shape: str) -> tuple[int, ...] | None:
  match = re.match(r'\w+\[([\d,]*)\]', shape)
  return tuple(int(d) for d in match.group(1).split(',') if d) if match else None


def classify(name: str, instructions: dict[str, dict], computations: dict[str, list[str]],
             kernel_shapes: set[tuple[int, ...]]) -> str:
  """The category of the thunk running HLO instruction `name` (see the module docstring)."""
  info = instructions.get(name)
  if info is None:
    return 'other'
  inner, stack, seen = [], [name], set()
  while stack:  # every instruction this one runs, through fused/called computations
    current = stack.pop()
    if current in seen:
      continue
    seen.add(current)
    inner.append(current)
    for called in instructions.get(current, {}).get('calls', []):
      stack.extend(computations.get(called, []))
  ops = [instructions[n] for n in inner if n in instructions]
  convs = [op for op in ops if op['opcode'] == 'convolution']
  if convs:
    # The weight gradient's output is the kernel, in some dimension order; it carries no op name.
    dims = _dims(convs[0]['shape'])
    if dims is not None and tuple(sorted(dims)) in kernel_shapes:
      return 'conv weight gradient'
    return 'conv input gradient' if 'transpose(' in convs[0]['op_name'] else 'conv forward'
  if any(op['opcode'] == 'dot' for op in ops):
    return 'matmul'
  opcodes = {op['opcode'] for op in ops}
  if opcodes <= {'copy', 'transpose', 'bitcast', 'parameter', 'fusion'} and opcodes & {'copy', 'transpose'}:
    return 'copy/transpose'
  if 'reduce' in opcodes:
    return 'reduction fusion'
  if info['opcode'] == 'fusion' or opcodes - {'parameter'}:
    return 'element-wise fusion'
  return 'other'


def profile_step(run_step, state, hlo_text: str, kernel_shapes: set, steps: int = 3) -> dict:
  """Thunk times of `steps` calls of `run_step(state, i)` under the profiler, by category (per step)."""
  import jax
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
  instructions, computations = parse_hlo(hlo_text)
  with tempfile.TemporaryDirectory(prefix='e4t-profile-') as trace_dir:
    jax.profiler.start_trace(trace_dir)
    started = time.perf_counter()
    for i in range(steps):
      state = run_step(state, 100 + i)
    wall = (time.perf_counter() - started) / steps
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
    if not files:
      return {'error': 'the profiler wrote no trace'}
    data = _profile_data.ProfileData.from_file(files[0])
  by_thunk: collections.Counter = collections.Counter()
  for plane in data.planes:
    if not plane.name.startswith('/host:CPU'):
      continue
    for line in plane.lines:
      if line.name == 'python' or line.name.startswith('python'):
        continue
      for event in line.events:
        if event.name in instructions:
          by_thunk[event.name] += event.duration_ns
  categories: collections.Counter = collections.Counter()
  for thunk, ns in by_thunk.items():
    categories[classify(thunk, instructions, computations, kernel_shapes)] += ns
  total = sum(categories.values())
  per_step = lambda ns: ns / steps / 1e9
  return {'wall_s_per_step': wall, 'thunk_s_per_step': per_step(total),
          'categories': {k: {'s_per_step': per_step(v), 'share': v / total if total else None}
                         for k, v in categories.most_common()},
          'top_thunks': [{'name': k, 'category': classify(k, instructions, computations, kernel_shapes),
                          's_per_step': per_step(v)} for k, v in by_thunk.most_common(12)]}


def _worker_main(argv: Sequence[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--worker', required=True)
  parser.add_argument('--seconds', type=float, default=30.0)
  parser.add_argument('--smoke', action='store_true')
  args = parser.parse_args(argv)
  harness.emit(run_variant(VARIANTS[args.worker], args.seconds, args.smoke))
  return 0


# ----------------------------------------------------------------------------- driver
def run_demo_train_bench(variants: Sequence[str] = DEFAULT_VARIANTS, *, seconds: float = 30.0, smoke: bool = False,
                         json_out: str | os.PathLike | None = None, timeout_s: float = 900.0, log=None) -> dict:
  """One worker per variant, in order; the baseline first (it is what the ratios divide by)."""
  names = list(dict.fromkeys(['baseline', *variants]))
  result: dict[str, Any] = {'schema': SCHEMA, 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(),
                            'machine': harness.machine_info(), 'smoke': smoke, 'seconds_per_variant': seconds,
                            'variants': {}, 'errors': []}
  for name in names:
    if log:
      log(f'[bench demo-train] {name}…')
    records, info = harness.run_worker(WORKER_MODULE, ['--worker', name, '--seconds', str(seconds)] +
                                       (['--smoke'] if smoke else []), timeout_s=timeout_s,
                                       env_overrides=worker_env(VARIANTS[name]))
    if records:
      result['variants'][name] = dict(records[-1], worker={k: info[k] for k in ('wall_s', 'peak_rss_bytes')})
    else:
      result['errors'].append(f'{name}: {info["error"]}')
  base = result['variants'].get('baseline')
  for name, entry in result['variants'].items():
    entry['vs_baseline'] = (entry['examples_per_s'] / base['examples_per_s']
                            if base and entry['unet_channels'] == base['unet_channels'] else None)
    entry['gflops_vs_baseline'] = (entry['gflops_per_s'] / base['gflops_per_s']
                                   if base and entry.get('gflops_per_s') and base.get('gflops_per_s') else None)
  result['load_average_end'] = harness.load_average()
  if json_out is not None:
    harness.write_json(json_out, result)
  return result


def format_table(result: dict) -> str:
  lines = ['variant        batch  compile   step p50   examples/s  GFLOP/s   vs baseline',
           '-------------  -----  --------  ---------  ----------  --------  -----------']
  for name, e in result['variants'].items():
    ratio = '-' if e.get('vs_baseline') is None else f'x{e["vs_baseline"]:.2f}'
    gflops = '-' if e.get('gflops_per_s') is None else f'{e["gflops_per_s"]:.1f}'
    lines.append(f'{name:<13}  {e["batch"]:>5}  {harness.fmt_seconds(e["compile_s"]):>8}  '
                 f'{harness.fmt_seconds(e["step"]["p50_s"]):>9}  {e["examples_per_s"]:>10.1f}  {gflops:>8}  {ratio:>11}')
  profile = result['variants'].get('profile', {}).get('profile')
  if profile and 'categories' in profile:
    lines.append(f'profile (thunk time per step {harness.fmt_seconds(profile["thunk_s_per_step"])}, '
                 f'wall {harness.fmt_seconds(profile["wall_s_per_step"])}):')
    for category, c in profile['categories'].items():
      lines.append(f'  {category:<22} {harness.fmt_seconds(c["s_per_step"]):>9}  {100 * c["share"]:5.1f}%')
  lines += [f'error: {e}' for e in result['errors']]
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(_worker_main(sys.argv[1:]))
