"""The measuring harness of the benchmarks: XLA compile events, timed calls, latency statistics,
machine facts, subprocess workers with time and memory limits, and the table formatters.

Both benchmarks (`e4t_jax.bench.personalize`, `e4t_jax.bench.full`) measure with these, so their
numbers mean the same thing. A worker prints one JSON record per line (`emit`); `run_worker` collects
the records, and what the worker printed before a kill is kept.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from e4t_jax import runtime

# jax.monitoring event names (jax/_src/dispatch.py, compiler.py).
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
TRACE_EVENT = '/jax/core/compile/jaxpr_trace_duration'
LOWER_EVENT = '/jax/core/compile/jaxpr_to_mlir_module_duration'
CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'
CACHE_MISS_EVENT = '/jax/compilation_cache/cache_misses'

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class JaxEvents:
  """Counts jax.monitoring events and sums their durations while the context is open."""

  def __init__(self):
    self.counts: collections.Counter = collections.Counter()
    self.seconds: collections.Counter = collections.Counter()

  def _on_event(self, event: str, **kwargs) -> None:
    self.counts[event] += 1

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    self.counts[event] += 1
    self.seconds[event] += duration

  def __enter__(self) -> 'JaxEvents':
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
def scoped_persistent_cache(cache_dir: Path):
  """Points JAX's persistent compilation cache at `cache_dir` for the block, then restores the
  caller's settings (the cache is process-wide state; a test process must not keep a deleted dir)."""
  from jax.experimental.compilation_cache import compilation_cache
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {name: getattr(jax.config, name) for name in names}
  runtime.enable_compilation_cache(cache_dir)
  compilation_cache.reset_cache()  # the cache object binds its directory on first use
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def timed_calls(fn: Callable, arg_lists: Sequence[Sequence[Any]], stop: Callable[[], bool] | None = None
                 ) -> tuple[list[float], list[Any], int]:
  """Times `fn(*args)` to `block_until_ready` for each entry of `arg_lists` (the caller warms up first),
  until `stop()` says so: (seconds, results, XLA compilations seen meanwhile)."""
  seconds, results = [], []
  with JaxEvents() as events:
    for args in arg_lists:
      if stop is not None and stop():
        break
      t0 = time.perf_counter()
      results.append(jax.block_until_ready(fn(*args)))
      seconds.append(time.perf_counter() - t0)
  return seconds, results, events.compilations


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
  values = np.asarray(seconds, np.float64)
  return {'n': int(values.size), 'p50_s': float(np.percentile(values, 50)), 'p95_s': float(np.percentile(values, 95)),
          'mean_s': float(values.mean()), 'min_s': float(values.min()), 'max_s': float(values.max())}


def peak_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def directory_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file())


def machine_info() -> dict[str, Any]:
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
          'xla_flags': os.environ.get('XLA_FLAGS', ''), 'load_average_start': load_average()}


def load_average() -> list[float] | None:
  """1/5/15-minute load averages: other processes on a shared machine skew every timing here."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def synthetic_images(count: int, size: int, seed: int) -> list[np.ndarray]:
  """Smooth random RGB images (uint8, size x size): each concept gets a different one."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(count):
    coarse = rng.uniform(0, 255, (4, 4, 3))
    image = np.kron(coarse, np.ones((-(-size // 4), -(-size // 4), 1)))[:size, :size]
    image = image + rng.normal(0, 12, image.shape)
    images.append(np.clip(image, 0, 255).astype(np.uint8))
  return images


def run_worker(module: str, args: Sequence[str], *, timeout_s: float, rss_limit_bytes: int | None = None,
               env_overrides: Mapping[str, str] | None = None) -> tuple[list[dict], dict]:
  """Runs `python -m <module> <args>`; returns its JSON records (one per stdout line) and how it ran.

  The worker is killed past `timeout_s` or once its resident set exceeds `rss_limit_bytes`; records
  printed before that are kept (a worker prints each stage as soon as it is measured). `env_overrides`
  replace those variables of this process's environment in the worker's.
  """
  env = dict(os.environ, **(env_overrides or {}))
  env['PYTHONPATH'] = os.pathsep.join([str(_PACKAGE_ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, '-m', module, *args], stdout=out, stderr=err, env=env,
                            cwd=str(_PACKAGE_ROOT))
    peak_rss, timed_out, killed_for_memory = 0, False, False
    while proc.poll() is None:
      rss, hwm = proc_rss(proc.pid)
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


def proc_rss(pid: int) -> tuple[int, int]:
  """(current, peak) resident set of a process in bytes, from /proc (0, 0 where unavailable)."""
  try:
    fields = dict(line.split(':', 1) for line in Path(f'/proc/{pid}/status').read_text().splitlines() if ':' in line)
    as_bytes = lambda key: int(fields[key].split()[0]) * 1024 if key in fields else 0
    return as_bytes('VmRSS'), as_bytes('VmHWM')
  except (OSError, ValueError):
    return 0, 0


def write_json(path: str | os.PathLike, result: dict) -> None:
  """A benchmark's result as indented, key-sorted JSON, written atomically (parent folders made)."""
  from e4t_jax.fileio import atomic_write_bytes  # pylint: disable=g-import-not-at-top
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_bytes(path, [(json.dumps(result, indent=2, sort_keys=True) + '\n').encode()])


def emit(record: dict) -> None:
  record['peak_rss_bytes'] = peak_rss_bytes()
  print(json.dumps(record), flush=True)


def fmt_seconds(value: float | None) -> str:
  if value is None:
    return '-'
  return f'{value * 1e3:.1f} ms' if value < 1 else f'{value:.2f} s'


def fmt_bytes(value: float | None) -> str:
  if value is None:
    return '-'
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {unit}'
  return f'{int(value)} B'


def fmt_flops(value: float | None) -> str:
  if value is None:
    return '-'
  for unit, scale in (('TFLOP', 1e12), ('GFLOP', 1e9), ('MFLOP', 1e6)):
    if abs(value) >= scale:
      return f'{value / scale:.2f} {unit}'
  return f'{value:.0f} FLOP'
