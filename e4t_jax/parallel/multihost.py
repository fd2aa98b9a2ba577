"""Multi-process start-up: `jax.distributed.initialize` from whatever launched this process.

Call `initialize_from_env()` first thing in a program, before any JAX computation. It recognises
  * explicit variables (any launcher, e.g. launch/local_multiprocess.sh):
      E4T_COORDINATOR_ADDRESS=host:port  E4T_NUM_PROCESSES=N  E4T_PROCESS_ID=i  [E4T_LOCAL_DEVICE_IDS=0,1]
  * Slurm (srun, launch/slurm_gpu.sbatch): SLURM_NTASKS > 1; JAX reads SLURM_* itself
  * Cloud TPU pods (launch/tpu_pod.sh): TPU_WORKER_HOSTNAMES with several hosts; JAX asks the TPU metadata
and does nothing for a single process. Every process then sees all devices (`jax.devices()`) and
its own (`jax.local_devices()`), and `make_mesh` spans them all.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax

from e4t_jax.errors import ConfigError


def _int_var(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except KeyError:
    raise ConfigError(f'{name} is not set; E4T_COORDINATOR_ADDRESS needs E4T_NUM_PROCESSES and E4T_PROCESS_ID '
                      'too.') from None
  except ValueError:
    raise ConfigError(f'{name}={env[name]!r} must be an integer.') from None


def detect_cluster(env: Mapping[str, str] | None = None) -> str:
  """'explicit', 'slurm', 'tpu' or 'single' (what `initialize_from_env` would do)."""
  env = os.environ if env is None else env
  if env.get('E4T_COORDINATOR_ADDRESS'):
    return 'explicit'
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1')) or 1) > 1:
    return 'slurm'
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'tpu'
  return 'single'


def _use_cpu_collectives_if_cpu() -> None:
  """CPU-only multi-process runs (tests, laptops) need a cross-process collectives backend."""
  platforms = os.environ.get('JAX_PLATFORMS', '') or str(jax.config.jax_platforms or '')
  if platforms.split(',')[0].strip() == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def initialize_from_env(env: Mapping[str, str] | None = None, *, initialization_timeout: int = 300) -> str:
  """Initializes JAX's distributed runtime from the environment; returns `detect_cluster`'s answer.

  Raises:
    ConfigError: inconsistent E4T_* variables.
  """
  env = os.environ if env is None else env
  kind = detect_cluster(env)
  if kind == 'single':
    return kind
  if _already_initialized():
    return kind
  _use_cpu_collectives_if_cpu()
  if kind == 'explicit':
    num_processes, process_id = _int_var(env, 'E4T_NUM_PROCESSES'), _int_var(env, 'E4T_PROCESS_ID')
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'E4T_PROCESS_ID={process_id} must be in [0, E4T_NUM_PROCESSES={num_processes}).')
    local_ids = env.get('E4T_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        coordinator_address=env['E4T_COORDINATOR_ADDRESS'], num_processes=num_processes, process_id=process_id,
        local_device_ids=[int(i) for i in local_ids.split(',')] if local_ids else None,
        initialization_timeout=initialization_timeout)
  else:  # Slurm and TPU pods: JAX's cluster detection reads their environment.
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  return kind


def _already_initialized() -> bool:
  is_initialized = getattr(jax.distributed, 'is_initialized', None)
  return bool(is_initialized()) if is_initialized else False
