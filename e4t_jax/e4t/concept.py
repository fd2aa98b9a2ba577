"""The concept: what personalization produces and generation reads (w* + the tuned weight offsets).

A concept is kilobytes to a few MB (the placeholder's embedding and the low-rank offsets), not a copy of
the U-Net. It is stored as one format-tagged safetensors file and remembers the fingerprint of the domain
model it was made for, so a concept is never used with another model by mistake.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import flax
import jax
import numpy as np

from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.errors import CheckpointError
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
    return write_tagged_safetensors(path, tensors, CONCEPT_FORMAT, dict(self.metadata))

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'Concept':
    tensors, metadata = read_tagged_safetensors(path, CONCEPT_FORMAT, what='concept',
                                                missing_hint='make one with `e4t personalize IMAGE`')
    try:
      return cls(embedding=np.array(tensors['embedding']), weight_offsets=offsets_lib.unflatten_offsets(tensors),
                 loss_trace=np.array(tensors['loss_trace']), steps=np.array(tensors['steps']),
                 metadata=tuple(sorted(metadata.items())))
    except KeyError as e:
      raise CheckpointError(f'{path}: concept file lacks tensor {e}; it is corrupt, personalize the image again.'
                            ) from None

  def check_compatible(self, modules: model_lib.E4TModules, fingerprint: str, source: str = 'concept') -> None:
    """Raises CheckpointError when this concept was made for another model."""
    info = self.info
    if info.get('base_fingerprint') != fingerprint:
      raise CheckpointError(
          f'{source}: made for base model {info.get("base_fingerprint", "?")[:12]}, but this model is '
          f'{fingerprint[:12]}; personalize the image again with this model.')
    width = modules.text_encoder.config.hidden_size
    if tuple(np.shape(self.embedding)) != (width,):
      raise CheckpointError(f'{source}: embedding width {np.shape(self.embedding)} does not fit text width {width}.')


def model_fingerprint(model: model_lib.E4TModel) -> str:
  """A short hash identifying the domain model a concept belongs to (configs + a few weights)."""
  m = model.modules
  h = hashlib.sha256()
  for cfg in (m.unet.config, m.text_encoder.config, m.vae.config, m.image_encoder.config):
    h.update(repr(cfg).encode())
  h.update(repr((m.config.coarse_word, m.config.placeholder, m.config.offsets)).encode())
  for leaf in (model.params['unet']['conv_in']['kernel'],
               model.params['text_encoder']['embeddings']['token_embedding']['embedding'][m.coarse_token_id]):
    h.update(np.asarray(leaf, np.float32).tobytes())
  return h.hexdigest()
