"""The training input pipeline: a deterministic, shuffled, per-process-sharded, resumable grain loader.

Each JAX process reads its own disjoint slice of the source (equal sizes, so every host runs the
same number of steps) and yields its share of the global batch:
  {'images': float32 [B, S, S, 3] in [-1, 1], 'mask': float32 [B, S, S] in [0, 1] (if the source has masks),
   'caption': bytes [B] (if the source has captions: prompt templates with '{}' for the placeholder)}
with B = global_batch_size // process_count. The order depends only on (seed, process_index,
process_count); random flips are drawn from grain's per-record generator, so they are reproducible.

Resuming: `iterator_state_to_bytes(iterator)` after step N, and `iterator_state_from_bytes(fresh_iterator,
state)` before step N + 1 make the fresh iterator yield exactly the batches the old one would have.
The state is small JSON (last index read per worker, plus the sampler and source descriptions
grain checks on restore); store one per process.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import grain
import numpy as np

from e4t_jax.errors import CheckpointError, ConfigError, InputError


_SPATIAL_KEYS = ('image', 'mask')


@dataclasses.dataclass(frozen=True)
class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors the image (and its mask) left-right with probability `probability`."""

  probability: float = 0.5

  def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() >= self.probability:
      return element
    # [:, ::-1] mirrors the width axis of both [S, S, 3] images and [S, S] masks.
    return {key: np.ascontiguousarray(value[:, ::-1]) if key in _SPATIAL_KEYS else value
            for key, value in element.items()}


@dataclasses.dataclass(frozen=True)
class ToModelBatch(grain.transforms.Map):
  """Batched uint8 records -> the model's batch: 'images' float32 in [-1, 1], 'mask' kept as is."""

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {'images': batch['image'].astype(np.float32) / 127.5 - 1.0}
    if 'mask' in batch:
      out['mask'] = batch['mask'].astype(np.float32)
    if 'caption' in batch:  # bytes [B]: a per-image prompt template with '{}' for the placeholder
      out['caption'] = batch['caption']
    return out


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, (int, np.integer)) \
      or global_batch_size < 1:
    raise ConfigError(f'global_batch_size must be a positive integer, got {global_batch_size!r}.')
  if global_batch_size % process_count:
    raise ConfigError(f'global_batch_size={global_batch_size} is not divisible by the {process_count} JAX processes; '
                      f'use a multiple of {process_count}.')
  return int(global_batch_size) // process_count


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if (process_index is None) != (process_count is None):
    raise ConfigError('pass both process_index and process_count, or neither (then JAX\'s are used).')
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ConfigError(f'process_index={process_index} must be in [0, process_count={process_count}).')
  return int(process_index), int(process_count)


def make_loader(source: Any, *, global_batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, process_index: int | None = None,
                process_count: int | None = None, worker_count: int = 0, random_flip: bool = False,
                transforms: Sequence[grain.transforms.Transformation] = (),
                worker_buffer_size: int = 1) -> grain.DataLoader:
  """A grain DataLoader over `source` yielding this process's part of each global batch.

  Args:
    source: a random-access source of {'image': uint8 [S, S, 3], optional 'mask'} records (see
      `e4t_jax.data.sources`).
    global_batch_size: the batch across all processes; must be divisible by process_count.
    seed: shuffling and augmentation seed, an integer in [0, 2**32).
    shuffle: reshuffle every epoch (False: sequential, e.g. for evaluation).
    num_epochs: stop after this many passes; None repeats forever. A last partial batch is dropped.
    process_index, process_count: this process's data shard; default: JAX's. Pass both to simulate
      several hosts in one process (tests).
    worker_count: grain worker processes for decoding (0: in this process, with grain's reader
      threads). The source must be picklable when > 0. Each worker batches its own slice of the
      records, so the batches depend on worker_count, and a saved iterator state restores only
      into a loader with the same worker_count.
    random_flip: mirror each image (and mask) left-right with probability 1/2.
    transforms: extra per-record grain transforms, applied after the flip and before batching.
    worker_buffer_size: batches each worker prepares in advance.

  Returns:
    A `grain.DataLoader`; `iter(loader)` gives a `grain.DataLoaderIterator` with get/set_state.
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  batch_size = per_process_batch_size(global_batch_size, process_count)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ConfigError(f'seed must be an integer in [0, 2**32), got {seed!r}.')
  if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
    raise ConfigError(f'num_epochs must be a positive integer or None (repeat forever), got {num_epochs!r}.')
  num_records = len(source)
  records_per_process = num_records // process_count
  if records_per_process < 1:
    raise InputError(f'{source!r}: {num_records} records cannot be split over {process_count} processes; '
                     'add data or use fewer hosts.')
  if num_epochs is not None and records_per_process * num_epochs < batch_size:
    raise InputError(f'{source!r}: {records_per_process} records per process x {num_epochs} epochs never fill '
                     f'a batch of {batch_size}; lower the batch size or raise num_epochs.')

  # drop_remainder: every process gets the same number of records (a host that ran out first would
  # leave the others waiting in a collective). At most process_count - 1 records go unused.
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=num_records, shard_options=shard_options, shuffle=shuffle, num_epochs=num_epochs,
      seed=int(seed))
  operations: list[grain.transforms.Transformation] = []
  if random_flip:
    operations.append(RandomHorizontalFlip())
  operations += list(transforms)
  operations += [grain.transforms.Batch(batch_size=batch_size, drop_remainder=True), ToModelBatch()]
  if worker_count:
    _mark_absl_flags_parsed()
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations, worker_count=worker_count,
      worker_buffer_size=worker_buffer_size, shard_options=shard_options)


def _mark_absl_flags_parsed() -> None:
  """Workaround for grain 0.2.18 (google/grain#1355, fixed upstream by #1361): its worker pool reads an
  absl flag, which raises UnparsedFlagAccessError in programs not started by `absl.app.run`. Marking
  the (still default) flags as parsed makes grain use their defaults; `absl.app` still parses argv."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def iterator_state_to_bytes(iterator: grain.DataLoaderIterator) -> bytes:
  """The iterator's position as UTF-8 JSON bytes (store it beside the model checkpoint)."""
  state = iterator.get_state()
  if isinstance(state, str):
    state = state.encode()
  if not isinstance(state, bytes):  # Newer grain versions return a dict.
    state = json.dumps(state).encode()
  return state


def iterator_state_from_bytes(iterator: grain.DataLoaderIterator, state: bytes) -> None:
  """Restores a position saved by `iterator_state_to_bytes` into a fresh iterator of an identical loader."""
  try:
    parsed = json.loads(state.decode() if isinstance(state, (bytes, bytearray)) else state)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'data iterator state is not valid JSON ({e}); the checkpoint is corrupt.') from None
  try:
    iterator.set_state(json.dumps(parsed).encode())
  except (ValueError, KeyError) as e:
    # Grain refuses a state from another sampler/source/worker count; say which, on one line.
    reason = ' '.join(str(e).split())
    raise CheckpointError(f'data iterator state does not match this loader ({reason}); resume with the same '
                          'dataset, seed, batch size, process count and worker count.') from None
