"""The concept: what personalization produces and generation reads (w* + the tuned weight offsets).

A concept is kilobytes to a few MB (the placeholder's embedding and the low-rank offsets), not a copy of
the U-Net. It is stored as one format-tagged safetensors file and remembers the fingerprint of the domain
model it was made for, so a concept is never used with another model by mistake.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
import time
import warnings
import weakref
from pathlib import Path

import flax
import jax
import numpy as np
from flax import traverse_util

from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t import prompts as prompts_lib
from e4t_jax.models import clip as clip_lib
from e4t_jax.errors import CheckpointError, E4TWarning, InputError, printable
from e4t_jax.fileio import read_tagged_safetensors, write_tagged_safetensors

CONCEPT_FORMAT = 'e4t-concept/1'


@flax.struct.dataclass
class TunedEncoder:
  """What reading the concept at every denoising step needs from its tuning run (the paper's generation,
  `generate(..., encoder='per_step')`): the tuned encoder, the U-Net its first pass reads (None: the
  model's own; the tuned one in paper mode) and the concept image's features. Held in memory only: a
  stored concept keeps the averaged w* (a textual-inversion vector)."""
  encoder: dict                        # the tuned E4T encoder's params
  unet: dict | None                    # pass-1 U-Net params, or None for the model's
  clip_hidden_states: tuple            # CLIP vision hidden states of the image, each [1, tokens, width]
  coarse_context: jax.Array            # [1, tokens, width] text states of the coarse prompt


@flax.struct.dataclass
class Concept:
  """A personalized concept: w* and the tuned weight offsets (+ how it was made)."""
  embedding: jax.Array                 # [width] the placeholder's token embedding w*
  weight_offsets: dict                 # U-Net kernel path -> {'down': [in, r], 'up': [r, out]}
  loss_trace: jax.Array                # [max_steps] float32, NaN for steps not run
  steps: jax.Array                     # int32 scalar, tuning steps actually run
  # Static, hashable metadata: (key, value) string pairs.
  metadata: tuple = flax.struct.field(pytree_node=False, default=())
  # Only from `TuningConfig(keep_encoder=True)`; never saved (see TunedEncoder).
  tuned_encoder: TunedEncoder | None = None
  # The file it was loaded from ('' when made in memory): errors about the concept name it.
  source: str = flax.struct.field(pytree_node=False, default='')

  @property
  def info(self) -> dict[str, str]:
    return dict(self.metadata)

  def save(self, path: str | os.PathLike) -> Path:
    """Writes `<path>` as safetensors (tensors) + JSON metadata in its header, atomically (w*, offsets and
    how it was made; not the in-memory `tuned_encoder`)."""
    tensors = {'embedding': np.asarray(self.embedding, np.float32),
               'loss_trace': np.asarray(self.loss_trace, np.float32),
               'steps': np.asarray(self.steps, np.int32).reshape(())}
    tensors.update({k: np.asarray(v, np.float32) for k, v in offsets_lib.flatten_offsets(self.weight_offsets).items()})
    bad = self.non_finite()
    if bad:
      raise InputError(f'{path}: not written: {bad} of the concept holds NaN or infinite values (the tuning '
                       'diverged); lower the learning rate or the number of steps.')
    return write_tagged_safetensors(path, tensors, CONCEPT_FORMAT, dict(self.metadata))

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Concept':
    """Reads a concept file, checking its structure and that every value is finite; any problem is one
    CheckpointError naming the file."""
    tensors, metadata = read_tagged_safetensors(path, CONCEPT_FORMAT, what='concept',
                                                missing_hint='make one with `e4t personalize IMAGE`')
    problem = _structure_problem(tensors, metadata)
    if problem:
      raise CheckpointError(f'{path}: {problem}; the file is corrupt or not a concept, personalize the image '
                            'again.')
    concept = cls(embedding=np.array(tensors['embedding']), weight_offsets=offsets_lib.unflatten_offsets(tensors),
                  loss_trace=np.array(tensors['loss_trace']), steps=np.array(tensors['steps']).reshape(()),
                  metadata=tuple(sorted(metadata.items())), source=str(path))
    bad = concept.non_finite()
    if bad:
      raise CheckpointError(f'{path}: {bad} holds NaN or infinite values; the concept is unusable, personalize '
                            'the image again.')
    return concept

  def non_finite(self) -> str | None:
    """The name of the first tensor (embedding or an offset) holding a NaN/inf, else None (a host check)."""
    if not np.isfinite(np.asarray(self.embedding, np.float32)).all():
      return 'the embedding'
    for path, pair in self.weight_offsets.items():
      for name, value in pair.items():
        if not np.isfinite(np.asarray(value, np.float32)).all():
          return f'weight offset {path}/{name}'
    return None

  def check_compatible(self, model: model_lib.E4TModel, fingerprint: str | None = None,
                       source: str | None = None) -> None:
    """Raises CheckpointError (naming the concept's file, else `source`) when this concept cannot be used
    with `model`: non-finite values, another base model's fingerprint, an embedding or offsets that do not
    fit. A concept made before every frozen weight was fingerprinted is accepted when what its fingerprint
    covered matches, with a `LegacyFingerprintWarning`."""
    source = self.source or source or 'concept'
    bad = self.non_finite()
    if bad:
      raise CheckpointError(f'{source}: {bad} holds NaN or infinite values; personalize the image again.')
    width = sum(prompts_lib.embedding_widths(model.modules))  # SDXL: both encoders' parts of w*
    if tuple(np.shape(self.embedding)) != (width,):
      raise CheckpointError(f'{source}: embedding shape {tuple(np.shape(self.embedding))}, this model needs '
                            f'({width},); it was made for another model.')
    info = self.info
    expected = info.get('base_fingerprint')
    if expected is not None:
      if info.get('fingerprint_scheme') == FINGERPRINT_SCHEME:
        fingerprint = fingerprint or model_fingerprint(model)
        if expected != fingerprint:
          raise CheckpointError(
              f'{source}: made for base model {printable(expected[:12])}, but this model is {fingerprint[:12]} '
              '(some frozen weight or config differs); personalize the image again with this model.')
      elif expected == legacy_fingerprint(model):
        warnings.warn(f'{source}: made before e4t-jax fingerprinted every frozen weight; the configs and the '
                      'weights its fingerprint covered match this model, the others cannot be checked. '
                      'Personalize again to refresh it.', LegacyFingerprintWarning, stacklevel=2)
      else:
        raise CheckpointError(f'{source}: made for base model {printable(expected[:12])}, not this one; '
                              'personalize the image again with this model.')
    flat = traverse_util.flatten_dict(model.params['unet'])
    for path, pair in self.weight_offsets.items():
      kernel = flat.get(tuple(path.split('/')) + ('kernel',))
      if kernel is None or not offsets_lib.fits_kernel(pair, np.shape(kernel)):
        shape = (np.shape(pair['down'])[0], np.shape(pair['up'])[-1])
        raise CheckpointError(f'{source}: weight offset {printable(path)!r} ({shape}) has no matching U-Net '
                              'kernel; it was made for another model.')


class LegacyFingerprintWarning(E4TWarning):
  """A concept from before full fingerprints: accepted on the weaker check its fingerprint allows."""


def _structure_problem(tensors: dict, metadata: dict) -> str | None:
  """What is wrong with a concept file's tensors and metadata, or None."""
  for key, shapes in (('embedding', 'vector'), ('loss_trace', 'vector'), ('steps', 'scalar')):
    if key not in tensors:
      return f'it lacks the {key!r} tensor'
    shape = np.shape(tensors[key])
    if (len(shape) != 1) if shapes == 'vector' else shape not in ((), (1,)):  # a stored scalar is [1]
      return f'its {key!r} tensor has shape {list(shape)}, expected a {shapes}'
  if not np.issubdtype(tensors['embedding'].dtype, np.floating) or tensors['embedding'].size == 0:
    return f"its 'embedding' tensor is {tensors['embedding'].dtype} of size {tensors['embedding'].size}"
  if not np.issubdtype(tensors['steps'].dtype, np.integer):
    return f"its 'steps' tensor is {tensors['steps'].dtype}, not an integer"
  if not 0 <= int(tensors['steps'].reshape(())) <= tensors['loss_trace'].shape[0]:
    return (f"its 'steps' tensor says {int(tensors['steps'].reshape(()))} steps, but its loss trace holds "
            f"{tensors['loss_trace'].shape[0]}")
  pairs: dict[str, set] = {}
  for key, value in tensors.items():
    if key in ('embedding', 'loss_trace', 'steps'):
      continue
    if not key.startswith(offsets_lib.OFFSETS_PREFIX) or key.count('/') < 2:
      return f'it holds an unexpected tensor {printable(key)!r}'
    path, name = key[len(offsets_lib.OFFSETS_PREFIX):].rsplit('/', 1)
    if name not in ('down', 'up') or np.ndim(value) != 2 or not np.issubdtype(value.dtype, np.floating):
      return f'weight offset tensor {printable(key)!r} ({value.dtype} {list(np.shape(value))}) is not a 2-D ' \
             'float down/up factor'
    pairs.setdefault(path, set()).add(name)
  for path, names in pairs.items():
    if names != {'down', 'up'}:
      return f'weight offset {printable(path)!r} lacks its {"up" if "down" in names else "down"} factor'
    if np.shape(tensors[f'{offsets_lib.OFFSETS_PREFIX}{path}/down'])[1] != \
        np.shape(tensors[f'{offsets_lib.OFFSETS_PREFIX}{path}/up'])[0]:
      return f'weight offset {printable(path)!r} has factors of different ranks'
  for key, value in metadata.items():
    if not isinstance(value, str):
      return f'its metadata {printable(key)!r} is {type(value).__name__}, not a string'
  return None


# ----------------------------------------------------------------------------- fingerprints
FINGERPRINT_SCHEME = 'frozen-sha256/2'  # every frozen tensor, as float32 bytes, with its path and shape
FROZEN_PARTS = ('unet', 'vae', 'text_encoder', 'image_encoder')
XL_PART = 'text_encoder_2'  # SDXL's second text encoder, fingerprinted where the model has one


def frozen_parts(model: model_lib.E4TModel) -> tuple[str, ...]:
  return FROZEN_PARTS + ((XL_PART,) if XL_PART in model.params else ())
_FINGERPRINTS: dict[tuple, tuple[list, str]] = {}  # leaf ids -> (weak references, digest)
_FINGERPRINTS_LOCK = threading.Lock()


def _config_digest(model: model_lib.E4TModel):
  m = model.modules
  h = hashlib.sha256()
  configs = (m.unet.config, m.text_encoder.config, m.vae.config, m.image_encoder.config)
  for cfg in configs + ((m.text_encoder_2.config,) if m.text_encoder_2 is not None else ()):
    h.update(repr(cfg).encode())
  h.update(repr((m.config.coarse_word, m.config.placeholder, m.config.offsets)).encode())
  return h


def _leaf_digest(leaf, stacked: bool = False) -> list[bytes]:
  """sha256 of the float32 bytes: one digest, or one per layer of a stacked (scanned CLIP) leaf."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # multi-host: gather what this host holds
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    leaf = multihost_utils.process_allgather(leaf, tiled=True)
  values = np.asarray(leaf, np.float32)
  digest = lambda v: hashlib.sha256(memoryview(np.ascontiguousarray(v)).cast('B')).digest()
  return [digest(v) for v in values] if stacked else [digest(values)]


def _per_layer_names(name: str, leaf) -> list[str] | None:
  """The per-layer names a stacked CLIP leaf stands for ('text_encoder/encoder/layers/x' ->
  'text_encoder/encoder/layers_0/x', …), None for any other leaf: the fingerprint hashes the per-layer
  view, so it does not depend on whether the towers scan their layers."""
  part, *rest = name.split('/')
  if part not in ('text_encoder', 'image_encoder', XL_PART):
    return None
  paths = clip_lib.per_layer_paths(tuple(rest), np.shape(leaf)[0] if np.ndim(leaf) else 0)
  return None if paths is None else ['/'.join((part,) + p) for p in paths]


def _map_threads(fn, items) -> list:
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(fn, items))  # hashlib releases the GIL on large buffers


def fingerprint_seconds(leaf_shapes) -> float:
  """Seconds `model_fingerprint`'s hashing takes for frozen tensors of these shapes on this machine
  (measured on zero buffers, for abstract models that have no values; the first, uncached call)."""
  sizes = [4 * int(np.prod(shape)) for shape in leaf_shapes]
  buffer = memoryview(np.zeros(max(sizes, default=0), np.uint8))
  start = time.perf_counter()
  _map_threads(lambda n: hashlib.sha256(buffer[:n]).digest(), sizes)
  return time.perf_counter() - start


def model_fingerprint(model: model_lib.E4TModel) -> str:
  """The hash identifying the frozen model a concept belongs to: the configs and every frozen tensor (U-Net,
  VAE, text and image encoders; path, shape and float32 value bytes), so any change to any of them shows.

  Streamed leaf by leaf (host memory: the largest tensor), hashed on a thread pool, and cached per set of
  loaded parameter arrays, so a model is hashed once per process however many concepts it serves.
  """
  flat = {}
  for part in frozen_parts(model):
    flat.update(traverse_util.flatten_dict({part: model.params[part]}, sep='/'))
  names = sorted(flat)
  leaves = [flat[n] for n in names]
  key = (id(model.modules),) + tuple(id(leaf) for leaf in leaves)
  with _FINGERPRINTS_LOCK:
    cached = _FINGERPRINTS.get(key)
  if cached and all(ref() is leaf for ref, leaf in zip(cached[0], leaves)):
    return cached[1]
  layer_names = [_per_layer_names(n, leaf) for n, leaf in zip(names, leaves)]
  digests = _map_threads(lambda item: _leaf_digest(item[0], stacked=item[1] is not None), zip(leaves, layer_names))
  entries = []  # (name, shape, digest), per layer for stacked leaves
  for name, leaf, per_layer, leaf_digests in zip(names, leaves, layer_names, digests):
    shape = tuple(np.shape(leaf))
    if per_layer is None:
      entries.append((name, shape, leaf_digests[0]))
    else:
      entries += [(n, shape[1:], d) for n, d in zip(per_layer, leaf_digests)]
  h = _config_digest(model)
  for name, shape, digest in sorted(entries):
    h.update(f'{name}:{shape}:'.encode() + digest)
  fingerprint = h.hexdigest()
  try:
    refs = [weakref.ref(leaf) for leaf in leaves]
  except TypeError:  # a leaf type without weak references (e.g. a Python scalar): do not cache
    return fingerprint
  with _FINGERPRINTS_LOCK:
    for stale in [k for k, (r, _) in _FINGERPRINTS.items() if any(ref() is None for ref in r)]:
      del _FINGERPRINTS[stale]
    _FINGERPRINTS[key] = (refs, fingerprint)
  return fingerprint


def fingerprint_info(model: model_lib.E4TModel, fingerprint: str | None = None) -> dict[str, str]:
  """The metadata that ties a concept to `model`: its fingerprint and the scheme that made it."""
  return {'base_fingerprint': fingerprint or model_fingerprint(model), 'fingerprint_scheme': FINGERPRINT_SCHEME}


def legacy_fingerprint(model: model_lib.E4TModel) -> str:
  """The fingerprint concepts carried before `FINGERPRINT_SCHEME` (configs, conv_in and the coarse token's
  embedding only); checked for those concepts alone."""
  m = model.modules
  h = _config_digest(model)
  for leaf in (model.params['unet']['conv_in']['kernel'],
               model.params['text_encoder']['embeddings']['token_embedding']['embedding'][m.coarse_token_id]):
    h.update(np.asarray(leaf, np.float32).tobytes())
  return h.hexdigest()
