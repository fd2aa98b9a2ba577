"""Measuring identity preservation and prompt fidelity of generated synthetic faces.

    from e4t_jax.lab import evaluate
    readout = evaluate.load_or_train_readout('readout.safetensors')
    ident = evaluate.identity_scores(readout, images, identities)   # [N] fraction of 9 attributes kept
    ctx = evaluate.context_scores(readout, images, contexts)         # {'background', ..., 'prompt_fidelity'}
    print(evaluate.summarize(ident), evaluate.chance_identity_score())

The "judge" is a small CNN (`ReadoutNet`) that reads every generator attribute of the synthetic domain
(`e4t_jax.data.synthetic`) back out of a 64x64 image: the 9 identity attributes and the 3 context
attributes. It is trained on renders of the 'train' split with augmentation (mirror, pixel shifts,
colour jitter; gaussian blur and additive noise on half the images) so that it also reads the blurry,
noisy images a tiny diffusion model makes. The background colour is measured from pixels (median of
the outer border, nearest palette colour), not by the network. Train it once and keep the file
(`load_or_train_readout`): the default training takes ~10 min on 2 busy CPU cores.

Scores:
  identity score    per image: the fraction of the concept identity's visible attributes that the
                    read-out finds (1.0 = every attribute preserved). All 9 count, except the hair
                    colour of a bald identity (nothing shows it). `chance_identity_score()` is its
                    expectation for an unrelated identity drawn uniformly per attribute (~0.258).
  prompt fidelity   per image: the mean of background (pixels), accessory and size (read-out) matching
                    the prompt's context.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from e4t_jax.fileio import read_tagged_safetensors, write_tagged_safetensors
from e4t_jax.data.synthetic import (BACKGROUNDS, CONTEXT_ATTRIBUTES, IDENTITY_ATTRIBUTES, IMAGE_SIZE, Context,
                                    Identity, SyntheticFaces)
from e4t_jax.errors import CheckpointError, InputError
from e4t_jax.progress import progress_bar

FORMAT = 'e4t_jax.readout/2'  # /1 kept its metadata flat; /2 is a tagged file (e4t_jax.fileio)
#: Every attribute the read-out predicts, in head order: identity first, then context.
ATTRIBUTES: dict[str, tuple[str, ...]] = {**IDENTITY_ATTRIBUTES, **CONTEXT_ATTRIBUTES}
IDENTITY_NAMES: tuple[str, ...] = tuple(IDENTITY_ATTRIBUTES)
CONTEXT_NAMES: tuple[str, ...] = tuple(CONTEXT_ATTRIBUTES)
_BACKGROUND_RGB = np.asarray(list(BACKGROUNDS.values()), np.float32)  # order of CONTEXT_ATTRIBUTES['background']
_BORDER = 3  # pixels of the outer border that `background_from_pixels` reads
_HAIR = IDENTITY_NAMES.index('hair')
_HAIR_COLOR = IDENTITY_NAMES.index('hair_color')
_BALD = IDENTITY_ATTRIBUTES['hair'].index('bald')


def identity_visibility(identities: Any) -> np.ndarray:
  """Which identity attributes a render can show: bool [N, 9] for int identity arrays [N, 9].

  Every attribute is visible except the hair colour of a bald face (nothing is drawn in it).
  """
  identities = np.asarray(identities).reshape(-1, len(IDENTITY_NAMES))
  visible = np.ones(identities.shape, bool)
  visible[:, _HAIR_COLOR] = identities[:, _HAIR] != _BALD
  return visible


# ----------------------------------------------------------------------------- network
class ReadoutNet(nn.Module):
  """Stride-2 3x3 convs (GroupNorm, ReLU), flatten, a dense layer, one logit head per attribute.

  Input: uint8 (or float in [0, 255]) images [B, 64, 64, 3], mapped to [-1, 1] inside.
  Output: {attribute of `ATTRIBUTES`: logits [B, classes]}. With the default 4 convs the flattened
  map is 4x4: enough capacity to place features, little room to memorize training images.
  """
  widths: tuple[int, ...] = (32, 64, 128, 128)
  dense: int = 256

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    x = images.astype(jnp.float32) / 127.5 - 1.0
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), strides=(2, 2), name=f'conv_{i}')(x)
      x = nn.relu(nn.GroupNorm(num_groups=min(8, width), name=f'norm_{i}')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.dense, name='dense')(x))
    return {name: nn.Dense(len(choices), name=f'head_{name}')(x) for name, choices in ATTRIBUTES.items()}


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise InputError(f'images must be [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got shape {images.shape}.')
  if images.dtype != np.uint8:
    raise InputError(f'images must be uint8 (0..255), got dtype {images.dtype}.')
  return images


@dataclasses.dataclass
class ReadoutModel:
  """A trained read-out network: `module` (a `ReadoutNet`) and its `params`."""
  module: ReadoutNet
  params: Any
  _apply: Callable[..., Any] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

  def predict(self, images: Any, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Attribute indices the network reads from uint8 images [N, 64, 64, 3] (or one [64, 64, 3]).

    Returns {attribute name: int32 [N]} for every entry of `ATTRIBUTES`. Runs jitted in chunks of
    `batch_size` (the last chunk padded; small inputs padded to a power of two) so any N reuses a
    handful of compiled shapes.
    """
    images = _check_images(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise InputError(f'batch_size must be a positive integer, got {batch_size!r}.')
    if self._apply is None:
      module = self.module
      self._apply = jax.jit(lambda params, x: {k: jnp.argmax(v, -1).astype(jnp.int32)
                                               for k, v in module.apply({'params': params}, x).items()})
    n = images.shape[0]
    chunk = min(int(batch_size), 1 << max(0, (n - 1).bit_length()))
    out: dict[str, list[np.ndarray]] = {name: [] for name in ATTRIBUTES}
    for start in range(0, n, chunk):
      part = images[start:start + chunk]
      if part.shape[0] < chunk:
        part = np.concatenate([part, np.zeros((chunk - part.shape[0],) + part.shape[1:], np.uint8)])
      result = self._apply(self.params, part)
      for name in ATTRIBUTES:
        out[name].append(np.asarray(result[name])[:min(chunk, n - start)])
    return {name: (np.concatenate(v) if v else np.zeros((0,), np.int32)) for name, v in out.items()}

  def save(self, path: str | os.PathLike) -> None:
    """Writes one format-tagged .safetensors file (atomically); the architecture goes into its metadata."""
    flat = traverse_util.flatten_dict(jax.device_get(self.params), sep='/')
    write_tagged_safetensors(path, {k: np.asarray(v, np.float32) for k, v in flat.items()}, FORMAT,
                             {'widths': list(self.module.widths), 'dense': self.module.dense,
                              'attributes': ATTRIBUTES})

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'ReadoutModel':
    """Reads a file written by `save`. Raises InputError (missing) or CheckpointError (corrupt/foreign)."""
    tensors, metadata = read_tagged_safetensors(
        path, FORMAT, what='read-out', missing_hint='train one with evaluate.train_readout().save(path)')
    try:
      module = ReadoutNet(widths=tuple(int(w) for w in metadata['widths']), dense=int(metadata['dense']))
      attributes = {k: tuple(v) for k, v in metadata['attributes'].items()}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
      raise CheckpointError(f'{path}: read-out metadata is damaged ({e}).') from e
    if attributes != ATTRIBUTES:
      raise CheckpointError(f'{path}: read-out was trained for other attribute vocabularies; retrain it.')
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8))
    expected = traverse_util.flatten_dict(abstract['params'], sep='/')
    if set(expected) != set(tensors) or any(tuple(tensors[k].shape) != tuple(v.shape) for k, v in expected.items()):
      raise CheckpointError(f'{path}: tensors do not match the read-out architecture in its metadata (corrupt file).')
    params = traverse_util.unflatten_dict({k: jnp.asarray(np.array(tensors[k])) for k in expected}, sep='/')
    return cls(module, params)


# ----------------------------------------------------------------------------- training
def _blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
  """Gaussian blur of float images [B, H, W, C] with a per-image sigma [B] in pixels (radius 3 taps,
  edges clamped; sigma ~ 0 leaves an image unchanged), as one [H, H] matrix per image and axis."""
  radius, size = 3, x.shape[1]
  taps = jnp.arange(-radius, radius + 1)
  weights = jnp.exp(-0.5 * (taps[None].astype(jnp.float32) / jnp.maximum(sigma[:, None], 1e-3)) ** 2)
  weights = weights / weights.sum(-1, keepdims=True)  # [B, taps]
  source = jnp.clip(jnp.arange(size)[:, None] + taps[None], 0, size - 1)  # [H, taps]
  blur = jnp.einsum('bt,itj->bij', weights, jax.nn.one_hot(source, size, dtype=jnp.float32))
  x = jnp.einsum('bij,bjwc->biwc', blur, x)
  return jnp.einsum('bij,bhjc->bhic', blur, x)


def degrade(images: Any, blur_sigma: float = 1.0, noise_sigma: float = 0.05, seed: int = 0) -> np.ndarray:
  """Blurs (gaussian, `blur_sigma` px) and adds gaussian noise (`noise_sigma` of the 0..255 range) to
  uint8 images [N, 64, 64, 3]: a stand-in for a tiny diffusion model's output, for robustness checks."""
  images = _check_images(images)
  if not 0 <= blur_sigma <= 3 or not 0 <= noise_sigma <= 1:
    raise InputError(f'blur_sigma must be in [0, 3] and noise_sigma in [0, 1], got {blur_sigma}, {noise_sigma}.')
  x = _blur(jnp.asarray(images, jnp.float32), jnp.full((images.shape[0],), blur_sigma, jnp.float32))
  x = x + noise_sigma * 255.0 * jax.random.normal(jax.random.key(seed), x.shape)
  return np.asarray(jnp.clip(jnp.rint(x), 0, 255)).astype(np.uint8)


def augment_images(key: jax.Array, images: jax.Array, degrade_fraction: float = 0.5) -> jax.Array:
  """Random mirror, shift (0-2 px) and colour jitter of every image; gaussian blur (sigma 0-1.5 px) and
  additive noise (sigma 0-0.1 of the range) of a random `degrade_fraction` of them. uint8 in, float out."""
  b = images.shape[0]
  k_flip, k_shift, k_blur, k_gain, k_off, k_noise_s, k_noise, k_degrade = jax.random.split(key, 8)
  degrade = jax.random.bernoulli(k_degrade, degrade_fraction, (b,)).astype(jnp.float32)
  x = images.astype(jnp.float32) / 255.0
  # Mirror half the images: every attribute of the domain is left-right symmetric.
  x = jnp.where(jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1)), x[:, :, ::-1], x)
  # Shift by up to 2 px in each direction (edge padding, i.e. the background continues).
  pad = 2
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='edge')
  shifts = jax.random.randint(k_shift, (b, 2), 0, 2 * pad + 1)
  x = jax.vmap(lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), (IMAGE_SIZE, IMAGE_SIZE, 3)))(padded, shifts)
  # Separable gaussian blur with a per-image sigma (sigma ~ 0 is the identity).
  x = _blur(x, degrade * jax.random.uniform(k_blur, (b,), minval=0.0, maxval=1.5))
  # Colour jitter: per-channel gain and a brightness offset.
  x = x * jax.random.uniform(k_gain, (b, 1, 1, 3), minval=0.92, maxval=1.08)
  x = x + jax.random.uniform(k_off, (b, 1, 1, 1), minval=-0.05, maxval=0.05)
  # Additive gaussian noise of a per-image sigma (in units of the full 0..1 range).
  noise_sigma = degrade[:, None, None, None] * jax.random.uniform(k_noise_s, (b, 1, 1, 1), maxval=0.1)
  x = x + noise_sigma * jax.random.normal(k_noise, x.shape)
  return jnp.clip(x, 0.0, 1.0) * 255.0


def _render_pool(records: SyntheticFaces, progress: bool) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels [n, identity + context attributes])."""
  arrays = records.render_all(progress='render read-out pool' if progress else None)
  return arrays['images'], np.concatenate([arrays['identity'], arrays['context']], axis=1)


def _check_positive(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise InputError(f'{name} must be a positive integer, got {value!r}.')
  return int(value)


def _init_params(module: ReadoutNet, seed: int) -> Any:
  """Fresh parameters drawn with numpy (no XLA compile): LeCun-normal kernels truncated at 2 std (as
  flax's default), zero biases, unit GroupNorm scales."""
  example = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)
  shapes = jax.eval_shape(module.init, jax.random.key(0), example)
  rng = np.random.default_rng([seed, 0x1D])
  flat = {}
  for path, leaf in sorted(traverse_util.flatten_dict(shapes['params']).items()):
    if path[-1] == 'kernel':
      values = rng.standard_normal(leaf.shape)
      while (outside := np.abs(values) > 2.0).any():  # truncate by redrawing
        values[outside] = rng.standard_normal(int(outside.sum()))
      std = np.sqrt(1.0 / np.prod(leaf.shape[:-1])) / 0.87962566103423978  # unit variance after truncation
      flat[path] = values * std
    else:
      flat[path] = np.ones(leaf.shape) if path[-1] == 'scale' else np.zeros(leaf.shape)
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def _loss(module: ReadoutNet, params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over attributes of the softmax cross-entropy (labels: int [B, 12] in `ATTRIBUTES` order)."""
  logits = module.apply({'params': params}, images)
  # The hair colour of a bald face is invisible: no loss there (it would only teach a guess).
  has_hair = (labels[:, _HAIR] != _BALD).astype(jnp.float32)
  losses = []
  for i, name in enumerate(ATTRIBUTES):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[name], labels[:, i])
    if i == _HAIR_COLOR:
      loss = (loss * has_hair).sum() / jnp.maximum(has_hair.sum(), 1.0)
    losses.append(loss.mean())
  return sum(losses) / len(losses)


@functools.lru_cache(maxsize=8)
def _training_program(module: ReadoutNet, batch_size: int, learning_rate: float, num_steps: int,
                      augment: bool) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
  """The optimizer and the jitted step, cached so that repeated trainings of one setting compile once."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, max(1, num_steps // 10)),
                                                max(num_steps, 2), end_value=learning_rate * 0.02)
  optimizer = optax.adam(schedule)

  @jax.jit
  def train_step(params, opt_state, step, train_key, pool_images, pool_labels):
    k_idx, k_aug = jax.random.split(jax.random.fold_in(train_key, step))
    idx = jax.random.randint(k_idx, (batch_size,), 0, pool_images.shape[0])
    images, labels = pool_images[idx], pool_labels[idx]
    if augment:
      images = augment_images(k_aug, images)
    loss, grads = jax.value_and_grad(functools.partial(_loss, module))(params, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, train_step


def train_readout(num_steps: int = 3000, batch_size: int = 64, seed: int = 0, num_records: int = 16000, *,
                  learning_rate: float = 2e-3, widths: Sequence[int] = (32, 64, 128, 128), dense: int = 256,
                  augment: bool = True, progress: bool = True) -> ReadoutModel:
  """Trains the attribute read-out on a fixed pool of 'train'-split renders (deterministic per seed).

  The pool is `SyntheticFaces(num_records, seed=1000 + seed, split='train')`, rendered once up front
  (~5 ms an image); every step draws `batch_size` pool images at random and augments them.

  Args:
    num_steps: optimizer steps (adam, warmup + cosine decay of `learning_rate`).
    batch_size: images per step.
    seed: seeds the pool, the initialization, batch draws and augmentation.
    num_records: size of the rendered pool.
    learning_rate: peak learning rate.
    widths: channels of the stride-2 convolutions (at most 6); dense: width of the hidden dense layer.
    augment: mirror/shift/colour augmentation of every image, blur and noise of half of them (keep
      it on: generated images are blurry and noisy).
    progress: tqdm bars on stderr for rendering and training.

  Returns:
    The trained `ReadoutModel`.
  """
  num_steps = _check_positive('num_steps', num_steps)
  batch_size = _check_positive('batch_size', batch_size)
  num_records = _check_positive('num_records', num_records)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise InputError(f'seed must be a non-negative integer, got {seed!r}.')
  widths = tuple(_check_positive('widths entry', w) for w in widths)
  if not 1 <= len(widths) <= 6:
    raise InputError(f'widths must list 1 to 6 convolution widths, got {widths!r}.')
  module = ReadoutNet(widths=widths, dense=_check_positive('dense', dense))

  pool_images, pool_labels = _render_pool(SyntheticFaces(num_records, seed=1000 + int(seed), split='train'), progress)
  pool_images, pool_labels = jnp.asarray(pool_images), jnp.asarray(pool_labels)

  params = _init_params(module, int(seed))
  train_key = jax.random.key(int(seed))
  optimizer, train_step = _training_program(module, batch_size, float(learning_rate), num_steps, bool(augment))
  opt_state = optimizer.init(params)

  with progress_bar(num_steps, 'train read-out', enabled=progress) as bar:
    for step in range(num_steps):
      params, opt_state, loss = train_step(params, opt_state, jnp.int32(step), train_key, pool_images, pool_labels)
      bar.update(1)
      if progress and (step % 50 == 0 or step == num_steps - 1):
        bar.set_postfix(loss=f'{float(loss):.3f}')
  return ReadoutModel(module, jax.device_get(params))


def load_or_train_readout(path: str | os.PathLike, **train_kwargs: Any) -> ReadoutModel:
  """Loads the read-out at `path`, or trains one with `train_readout(**train_kwargs)` and saves it there."""
  path = Path(path)
  if path.exists():
    return ReadoutModel.load(path)
  readout = train_readout(**train_kwargs)
  readout.save(path)
  return readout


def readout_accuracy(readout: ReadoutModel, num_records: int = 1000, seed: int = 0,
                     split: str = 'heldout') -> dict[str, float]:
  """Per-attribute accuracy of the read-out on clean renders of `SyntheticFaces(num_records, seed, split)`.

  'hair_color' counts only faces with hair (a bald face shows no hair colour).
  """
  records = SyntheticFaces(_check_positive('num_records', num_records), seed=seed, split=split)
  images, labels = _render_pool(records, progress=False)
  predicted = readout.predict(images)
  visible = np.concatenate([identity_visibility(labels[:, :len(IDENTITY_NAMES)]),
                            np.ones((len(labels), len(CONTEXT_NAMES)), bool)], axis=1)
  return {name: float(np.mean((predicted[name] == labels[:, i])[visible[:, i]])) for i, name in enumerate(ATTRIBUTES)}


# ----------------------------------------------------------------------------- metrics
def _attribute_rows(values: Sequence[Any], cls: type, n: int, what: str) -> np.ndarray:
  if len(values) != n:
    raise InputError(f'got {n} images but {len(values)} {what}; pass one per image.')
  rows = []
  for value in values:
    if not isinstance(value, cls):
      raise InputError(f'{what} must be {cls.__name__} objects, got {type(value).__name__}.')
    rows.append(value.to_array())
  return np.stack(rows) if rows else np.zeros((0, len(dataclasses.fields(cls))), np.int32)


def identity_scores(readout: ReadoutModel, images: Any, identities: Sequence[Identity]) -> np.ndarray:
  """Per image: the fraction of identities[i]'s visible attributes the read-out finds in image i.

  All 9 identity attributes count, except hair colour when identities[i] is bald (then 8; see
  `identity_visibility`). Returns float64 [N] in [0, 1].
  """
  return _identity_fraction(*_identity_matches(readout, images, identities))


def _identity_fraction(matches: np.ndarray, visible: np.ndarray) -> np.ndarray:
  """Per image: found visible attributes / visible attributes (float64 [N])."""
  return matches.sum(axis=1) / np.maximum(visible.sum(axis=1), 1)


def identity_attribute_accuracy(readout: ReadoutModel, images: Any,
                                identities: Sequence[Identity]) -> dict[str, float]:
  """Per identity attribute: the fraction of images (where it is visible) in which the read-out finds it.

  Tells which parts of an identity a method transfers (skin colour, hair...) and which it loses.
  """
  return _attribute_accuracy(*_identity_matches(readout, images, identities))


def _attribute_accuracy(matches: np.ndarray, visible: np.ndarray) -> dict[str, float]:
  return {name: float(matches[:, k].sum() / max(visible[:, k].sum(), 1)) for k, name in enumerate(IDENTITY_NAMES)}


def _identity_matches(readout: ReadoutModel, images: Any, identities: Sequence[Identity]) -> tuple[np.ndarray, ...]:
  """(found and visible, visible): bool [N, 9] each."""
  images = _check_images(images)
  targets = _attribute_rows(identities, Identity, images.shape[0], 'identities')
  predicted = readout.predict(images)
  found = np.stack([predicted[name] for name in IDENTITY_NAMES], axis=1)
  visible = identity_visibility(targets)
  return (found == targets) & visible, visible


def background_from_pixels(images: Any) -> np.ndarray:
  """Per image: index (into CONTEXT_ATTRIBUTES['background']) of the palette colour nearest in RGB to
  the median colour of the outer 3-pixel border. Pure pixel measurement, no network. int32 [N]."""
  images = _check_images(images)
  b = _BORDER
  n = images.shape[0]
  border = np.concatenate([images[:, :b].reshape(n, -1, 3), images[:, -b:].reshape(n, -1, 3),
                           images[:, b:-b, :b].reshape(n, -1, 3), images[:, b:-b, -b:].reshape(n, -1, 3)], axis=1)
  median = np.median(border.astype(np.float32), axis=1)  # [N, 3]
  distance = ((median[:, None, :] - _BACKGROUND_RGB[None]) ** 2).sum(-1)
  return np.argmin(distance, axis=1).astype(np.int32)


def context_scores(readout: ReadoutModel, images: Any, contexts: Sequence[Context]) -> dict[str, np.ndarray]:
  """Per image, whether the prompt's context is visible: float64 [N] arrays

    'background'       the pixel-measured background equals contexts[i].background (0/1)
    'accessory', 'size'  the read-out's prediction equals the context's (0/1)
    'prompt_fidelity'  the mean of the three
  """
  images = _check_images(images)
  targets = _attribute_rows(contexts, Context, images.shape[0], 'contexts')
  predicted = readout.predict(images)
  scores = {'background': (background_from_pixels(images) == targets[:, 0]).astype(np.float64),
            'accessory': (predicted['accessory'] == targets[:, 1]).astype(np.float64),
            'size': (predicted['size'] == targets[:, 2]).astype(np.float64)}
  scores['prompt_fidelity'] = (scores['background'] + scores['accessory'] + scores['size']) / 3.0
  return scores


def summarize(values: Any, *, method: str = 'normal', num_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
  """Mean and 95% confidence half-width of per-image scores, as plain floats (JSON-friendly).

  method: 'normal' (1.96 * sample std / sqrt(n)) or 'bootstrap' (half the width of the 2.5-97.5
  percentile interval of `num_resamples` resampled means). Returns {'mean', 'ci95', 'n'}; ci95 is
  NaN for n < 2.
  """
  values = np.asarray(values, np.float64).reshape(-1)
  n = values.size
  if n == 0:
    raise InputError('summarize needs at least one value.')
  if method not in ('normal', 'bootstrap'):
    raise InputError(f"method must be 'normal' or 'bootstrap', got {method!r}.")
  mean = float(values.mean())
  if n < 2:
    half = float('nan')
  elif method == 'normal':
    half = float(1.96 * values.std(ddof=1) / np.sqrt(n))
  else:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(_check_positive('num_resamples', num_resamples), n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    half = float((high - low) / 2.0)
  return {'mean': mean, 'ci95': half, 'n': int(n)}


def chance_identity_score() -> float:
  """Expected identity score of an unrelated identity drawn uniformly per attribute (target too).

  Each attribute matches with probability 1/|choices|; the score averages over the target's visible
  attributes (hair colour left out for a bald target), so this is the mean of 1/|choices| over all
  9 attributes (hair present) or the other 8 (bald), weighted by the chance of baldness. ~0.255.
  """
  inverse = np.asarray([1.0 / len(choices) for choices in IDENTITY_ATTRIBUTES.values()])
  bald = 1.0 / len(IDENTITY_ATTRIBUTES['hair'])
  without_hair_color = np.delete(inverse, _HAIR_COLOR).mean()
  return float(bald * without_hair_color + (1.0 - bald) * inverse.mean())


def chance_context_scores() -> dict[str, float]:
  """Expected context scores for a context drawn uniformly per attribute (the prompt ignored)."""
  scores = {name: 1.0 / len(choices) for name, choices in CONTEXT_ATTRIBUTES.items()}
  scores['prompt_fidelity'] = float(np.mean(list(scores.values())))
  return scores


def evaluate_images(readout: ReadoutModel, images: Any, identities: Sequence[Identity],
                    contexts: Sequence[Context]) -> dict[str, Any]:
  """Every score of images[i] (made for identities[i] in contexts[i]), summarized, with chance levels.

  Returns {'identity': summary, 'background'|'accessory'|'size'|'prompt_fidelity': summary,
  'identity_attributes': {name: accuracy} (`identity_attribute_accuracy`),
  'chance': {'identity': float, ...context chance levels}}, each summary as `summarize` gives it.
  """
  matches, visible = _identity_matches(readout, images, identities)
  result: dict[str, Any] = {'identity': summarize(_identity_fraction(matches, visible))}
  result['identity_attributes'] = _attribute_accuracy(matches, visible)
  for name, values in context_scores(readout, images, contexts).items():
    result[name] = summarize(values)
  result['chance'] = {'identity': chance_identity_score(), **chance_context_scores()}
  return result


def _main() -> None:  # pragma: no cover - a manual measurement helper
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description='Train the attribute read-out and report held-out accuracy.')
  parser.add_argument('--out', default=None)
  parser.add_argument('--steps', type=int, default=3000)
  parser.add_argument('--records', type=int, default=16000)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  start = time.perf_counter()
  readout = train_readout(num_steps=args.steps, num_records=args.records, seed=args.seed)
  train_s = time.perf_counter() - start
  accuracy = readout_accuracy(readout, 1000, seed=7)
  print(json.dumps({'train_s': round(train_s, 1), 'accuracy': accuracy,
                    'min_accuracy': min(accuracy.values())}, indent=1))
  if args.out:
    readout.save(args.out)


if __name__ == '__main__':
  _main()
