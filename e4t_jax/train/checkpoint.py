"""Training checkpoints: the train state, the data position and the config, saved together by orbax.

One checkpoint step directory holds
    state/          TrainState (trainable params, optimizer state, step), sharded arrays
    data_iterator/  every process's grain iterator state (JSON), so the data resumes exactly
    config/         the run's config (JSON), for the record
    meta/           the frozen weights' fingerprint and the format version
The frozen base model (U-Net, VAE, text and image encoders) is not saved: it comes from the base
model folder. Its fingerprint is, and resuming onto another base model is refused.

Saves are asynchronous (the loop continues while orbax writes) and keep the last N. Restoring
takes the *target* shardings, so a run can resume on a different mesh shape or device count.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from e4t_jax.errors import CheckpointError

CHECKPOINT_FORMAT = 'e4t-train-checkpoint/1'
ITEMS = ('state', 'data_iterator', 'config', 'meta')
_FINGERPRINT_SAMPLES = 64


@dataclasses.dataclass
class Restored:
  step: int
  state: Any                # the TrainState, placed with the target's shardings
  data_iterator: bytes      # this process's iterator state (for `iterator_state_from_bytes`)
  config: dict
  frozen_fingerprint: str


def frozen_fingerprint(frozen: Any) -> str:
  """A hash of the frozen weights' paths, shapes, dtypes and a fixed sample of their values.

  The sample (`_FINGERPRINT_SAMPLES` strided elements per tensor) is gathered exactly, without any
  floating-point reduction, so it is identical on every mesh shape.
  """
  flat = traverse_util.flatten_dict(frozen, sep='/')
  names = sorted(flat)

  def sample(x):
    x = jnp.ravel(x)
    stride = max(x.size // _FINGERPRINT_SAMPLES, 1)
    return x[::stride][:_FINGERPRINT_SAMPLES].astype(jnp.float32)

  replicated = None
  leaves = [flat[n] for n in names]
  mesh = next((leaf.sharding.mesh for leaf in leaves if hasattr(getattr(leaf, 'sharding', None), 'mesh')), None)
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  samples = jax.jit(lambda xs: [sample(x) for x in xs], out_shardings=replicated)(leaves)
  digest = hashlib.sha256()
  for name, leaf, values in zip(names, leaves, jax.device_get(samples)):
    digest.update(f'{name}:{tuple(leaf.shape)}:{leaf.dtype};'.encode())
    digest.update(np.asarray(values, np.float32).tobytes())
  return digest.hexdigest()[:32]


def _gather_process_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (a no-op list for one process)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  lengths = multihost_utils.process_allgather(np.asarray([len(data)], np.int32))
  width = int(np.max(lengths))
  padded = np.zeros((width,), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), width)
  lengths = np.asarray(lengths).reshape(-1)
  return [gathered[i, :lengths[i]].tobytes() for i in range(jax.process_count())]


class TrainCheckpointer:
  """Saves and restores training checkpoints in `directory` (a local path or gs://...)."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000, async_save: bool = True):
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

  @property
  def directory(self):
    return self._manager.directory

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state: Any, data_iterator: bytes, config: dict, fingerprint: str) -> None:
    """Starts an (async) save of `step`. Every process must call it (orbax coordinates the writes)."""
    if step in self._manager.all_steps():
      return
    process_states = _gather_process_bytes(data_iterator)
    data = {'process_count': len(process_states), 'states': [s.decode() for s in process_states]}
    meta = {'format': CHECKPOINT_FORMAT, 'step': int(step), 'frozen_fingerprint': fingerprint}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data_iterator=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, *, step: int | None = None, fingerprint: str | None = None) -> Restored:
    """Restores `step` (default: the latest) onto `abstract_state`'s shapes and shardings.

    Args:
      abstract_state: a TrainState of `jax.ShapeDtypeStruct`s with `.sharding` (e.g. from
        `jax.eval_shape` plus the new mesh's shardings), or of real arrays (their shardings are used).
      step: which step; None: the latest.
      fingerprint: the current frozen weights' `frozen_fingerprint`; a different stored one raises.
    Raises:
      CheckpointError: no checkpoint, a different base model, a different process count, or
        mismatched shapes.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory}: holds no checkpoint to restore.')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if hasattr(x, 'sharding') else x,
        abstract_state)
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if meta.get('format') != CHECKPOINT_FORMAT:
      raise CheckpointError(f'{self.directory}/{step}: format {meta.get("format")!r}; expected {CHECKPOINT_FORMAT}.')
    if fingerprint is not None and meta['frozen_fingerprint'] != fingerprint:
      raise CheckpointError(f'{self.directory}/{step}: was trained on another base model (frozen weights '
                            f'fingerprint {meta["frozen_fingerprint"]} != {fingerprint}); use the same '
                            'model.base / model.image_encoder, or a fresh workdir.')
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data_iterator=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      reason = ' '.join(str(e).split())[:300]
      raise CheckpointError(f'{self.directory}/{step}: does not fit this model ({reason}); the model config '
                            'changed since it was saved, use a fresh workdir.') from None
    data = restored['data_iterator']
    if data['process_count'] != jax.process_count():
      raise CheckpointError(f'{self.directory}/{step}: saved by {data["process_count"]} processes, resumed by '
                            f'{jax.process_count()}; the data position cannot be split differently. Resume with '
                            f'{data["process_count"]} processes.')
    return Restored(step=step, state=restored['state'], data_iterator=data['states'][jax.process_index()].encode(),
                    config=restored['config'], frozen_fingerprint=meta['frozen_fingerprint'])

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
