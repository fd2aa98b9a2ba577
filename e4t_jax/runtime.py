"""What XLA and the devices tell us: the persistent compilation cache, a program's cost and memory
analysis as plain dicts, and each device kind's peak FLOP/s (for MFU).

One home for these facts, used by personalization, training and the benchmarks alike.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

# Dense bfloat16 peak TFLOP/s per chip (datasheets), for MFU. A device kind takes the entry of the
# longest name it contains ('NVIDIA H100 PCIe' -> 'H100 PCIe', 'TPU v5 lite' -> 'TPU v5 lite', not 'TPU v5').
PEAK_TFLOPS_BY_DEVICE_KIND = {
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v5': 459.0,
    'TPU v6 lite': 918.0, 'TPU v6e': 918.0,
    'H100 PCIe': 756.0, 'H100': 989.0, 'H200': 989.0, 'A100': 312.0,
}


def peak_tflops(device_kind: str | None = None) -> float | None:
  """Dense bf16 peak TFLOP/s of one device of this kind (default: this process's first device), or None."""
  kind = jax.devices()[0].device_kind if device_kind is None else device_kind
  matches = [name for name in PEAK_TFLOPS_BY_DEVICE_KIND if name in kind]
  return PEAK_TFLOPS_BY_DEVICE_KIND[max(matches, key=len)] if matches else None


def cost_stats(program: Any) -> dict[str, float | None]:
  """{flops, bytes_accessed, transcendentals} of a lowered or compiled program (None where XLA is silent).

  Count FLOPs on the LOWERED program: after GPU compilation, matmuls and convolutions become cuBLAS/cuDNN
  custom calls that XLA's cost analysis does not count (an SD U-Net step measured 0.71 of its 18.9 TFLOP
  on an H200), which would understate MFU by 25x.
  """
  try:
    analysis = program.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    analysis = None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  analysis = analysis or {}
  get = lambda key: float(analysis[key]) if key in analysis else None
  return {'flops': get('flops'), 'bytes_accessed': get('bytes accessed'), 'transcendentals': get('transcendentals')}


def program_size(stage: Any) -> dict[str, int] | None:
  """The size of a lowered (StableHLO) or compiled (optimized HLO) program's text: bytes and lines, a proxy
  for how much the compiler has to chew on (compile time grows with it)."""
  try:
    text = stage.as_text()
  except Exception:  # pylint: disable=broad-except  (some backends cannot print a compiled program)
    return None
  if not text:
    return None
  return {'text_bytes': len(text.encode()), 'lines': text.count('\n') + 1}


def memory_stats(compiled: Any) -> dict[str, int] | None:
  """The compiled program's memory analysis as {argument_size_in_bytes: .., temp_size_in_bytes: .., ...}."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return {name: int(getattr(stats, name)) for name in dir(stats) if name.endswith('_in_bytes')}


CACHE_DIR_ENV = 'E4T_CACHE_DIR'
DEFAULT_CACHE_MAX_BYTES = 4 * 2**30  # the default cache evicts least-recently-used entries beyond this
_CACHE_OFF = ('', 'none', 'off', '0', 'false')


def default_cache_dir() -> Path | None:
  """Where the `e4t` command keeps its persistent compilation cache: $E4T_CACHE_DIR ('off' or 'none':
  no cache), else $XDG_CACHE_HOME/e4t-jax/xla, else ~/.cache/e4t-jax/xla."""
  value = os.environ.get(CACHE_DIR_ENV)
  if value is not None:
    return None if value.strip().lower() in _CACHE_OFF else Path(value).expanduser()
  base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
  return Path(base) / 'e4t-jax' / 'xla'


def cache_disabled(value: str | None) -> bool:
  """Whether a --cache-dir value asks for no cache ('none' / 'off')."""
  return value is not None and value.strip().lower() in _CACHE_OFF


def enable_compilation_cache(cache_dir: str | os.PathLike, max_bytes: int | None = None) -> None:
  """Persistent XLA compilation cache: a new process skips most of the compile (process-wide).
  `max_bytes`: evict least-recently-used entries beyond this size (None: unbounded)."""
  Path(cache_dir).mkdir(parents=True, exist_ok=True)
  changed = jax.config.jax_compilation_cache_dir != str(cache_dir)
  jax.config.update('jax_compilation_cache_dir', str(cache_dir))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  jax.config.update('jax_compilation_cache_max_size', -1 if max_bytes is None else int(max_bytes))
  if changed:
    # JAX initializes its cache once per process, at the first compile: without a reset, a directory
    # set after that (or changed) would be ignored silently.
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.reset_cache()
