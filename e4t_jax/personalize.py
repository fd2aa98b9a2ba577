"""Compile-once personalization: `personalize_fn(params, image) -> Concept` (E4T, Sec. 3.4).

`make_personalize_fn` lowers and compiles ONE program for given shapes: image scaling, VAE encoding,
a `lax.scan` over the tuning steps (fresh noise and timestep each step, the E4T objective, an Adam
update of the encoder and the weight offsets on a copy of the domain state), and the final concept.
Per-concept values — the image, the PRNG key, the step count (up to the compiled maximum) — are array
arguments, so every concept reuses the same executable.

A `Concept` (`e4t_jax.e4t.concept`) is the placeholder embedding w* plus the tuned low-rank weight
offsets (kilobytes to a few MB), not a copy of the U-Net. Because w* is a single vector (exportable as a textual-inversion
embedding), it is the tuned encoder's prediction averaged over a fixed set of timesteps and noise
draws; the reference instead keeps the encoder in the sampling loop, which needs the whole encoder
(and the image) at generation time.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from e4t_jax import runtime
from e4t_jax.diffusion import schedule as schedule_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.concept import Concept, TunedEncoder, fingerprint_info, model_fingerprint
from e4t_jax.e4t.encoder import placeholder_embedding
from e4t_jax.e4t.objective import draw_noise, e4t_loss, image_features, predict_offset
from e4t_jax.e4t.prompts import coarse_embedding
from e4t_jax.errors import DivergenceError, InputError, printable
from e4t_jax.models.vae import scale_latents


# ----------------------------------------------------------------------------- tuning program
TUNING_MODES = ('lite', 'paper')


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """How one concept is tuned. Two modes, each compiled once and reused for every concept:

  lite   the encoder and the low-rank weight offsets, one image, `batch_size` noise draws per step
         (default 1): kilobyte concepts, the cheapest.
  paper  the paper's tuning stage (Sec. 3.4: "the encoder and text-to-image models must be tuned in
         tandem"): the encoder, the offsets AND the U-Net's kernels (`unet_patterns`), on a batch of
         `batch_size` views of the image (default 16, as the references; view 0 is the image itself, the
         others flipped / zoomed at random, each with its own noise and timestep; the views are drawn once
         per concept and reused by every step, so their VAE and CLIP features are computed once, where the
         reference re-augments every step). The encoder and offsets keep `learning_rate` (the reference
         trains everything at the U-Net's 1.6e-5). The tuned U-Net delta
         is stored per kernel as a truncated SVD of rank `delta_rank`, so a concept stays MB-sized and
         exports as a LoRA.
  """
  num_steps: int = 5                  # the compiled maximum; a call may run fewer
  learning_rate: float = 1e-4         # the encoder and the weight offsets (Adam)
  batch_size: int | None = None       # draws (lite) or views (paper) per step; None: 1 (lite), 16 (paper)
  prompt: str | None = None           # '{}' = the concept; None: the model's `E4TConfig.tuning_prompt`
  # Timesteps at which the final w* is read out (averaged); spread over the training range.
  readout_timesteps: Sequence[int] = (100, 300, 500, 700, 900)
  mode: str = 'lite'
  # paper mode: the U-Net's own learning rate (mkshing/e4t-diffusion's README: 1e-6 scaled by batch 16);
  # regexes (re.search) over kernel module paths ('' = every Dense and conv kernel; biases and norms stay
  # frozen, so the whole delta is low-rank compressible); captions cycled over the views (None: `prompt`);
  # the SVD rank of each stored kernel delta (capped at the kernel's own rank: then exact).
  unet_learning_rate: float = 1.6e-5
  unet_patterns: Sequence[str] = ('',)
  templates: Sequence[str] | None = None
  delta_rank: int = 16
  # How paper mode factors each delta (offsets.low_rank_factors_many): 'svd' (exact), 'randomized' (a
  # randomized range finder, within ~0.6% of the exact truncation's error), or 'auto': randomized when tracing
  # for a TPU (where an SVD op's compile grows with the matrix: SD 1.5's did not compile), else svd.
  factorization: str = 'auto'
  augment: bool | None = None         # random flip + zoom views; None: on in paper mode, off in lite
  # Rows (views / draws) per gradient pass; None: the whole batch in one pass. Smaller trades time for
  # memory: a step accumulates the gradient over batch_size / micro_batch passes (a lax.scan), which
  # equals the one-pass gradient up to float rounding (each row keeps its own draws). With a loss mask,
  # each pass normalizes by its own rows' mask area.
  micro_batch: int | None = None
  # Weight the diffusion loss by a mask of the subject ([S, S] in [0, 1], passed per call with the image,
  # transformed with each view; no mask given = the whole image). None: the model's E4TConfig.use_loss_mask.
  loss_mask: bool | None = None
  # Also return what per-step generation needs (`Concept.tuned_encoder`: the tuned encoder, the image's
  # features, paper mode's pass-1 U-Net), for `generate(..., encoder='per_step')`; held in memory only.
  keep_encoder: bool = False

  def __post_init__(self):
    if self.mode not in TUNING_MODES:
      raise InputError(f'tuning mode {self.mode!r} is not one of {TUNING_MODES}.')
    paper = self.mode == 'paper'
    if self.batch_size is None:
      object.__setattr__(self, 'batch_size', 16 if paper else 1)
    if self.augment is None:
      object.__setattr__(self, 'augment', paper)
    object.__setattr__(self, 'unet_patterns', tuple(self.unet_patterns))
    object.__setattr__(self, 'readout_timesteps', tuple(int(t) for t in self.readout_timesteps))
    if self.templates is not None:
      object.__setattr__(self, 'templates', tuple(self.templates))
      if not self.templates:
        raise InputError('tuning templates must list at least one caption (or be None).')
    if self.factorization not in ('auto',) + offsets_lib.FACTORIZATIONS:
      raise InputError(f"tuning factorization {self.factorization!r} is not 'auto' or one of "
                       f'{offsets_lib.FACTORIZATIONS}.')
    if self.batch_size < 1 or self.delta_rank < 1:
      raise InputError(f'tuning batch_size and delta_rank must be >= 1, got {self.batch_size}, {self.delta_rank}.')
    if self.micro_batch is not None and (not 1 <= self.micro_batch <= self.batch_size
                                         or self.batch_size % self.micro_batch):
      raise InputError(f'tuning micro_batch must divide the batch of {self.batch_size} views/draws, '
                       f'got {self.micro_batch}.')
    if not (np.isfinite(self.learning_rate) and np.isfinite(self.unet_learning_rate)):
      raise InputError('tuning learning rates must be finite numbers.')


def uses_loss_mask(modules: model_lib.E4TModules, tuning: TuningConfig) -> bool:
  """Whether `tuning` weights the loss by a mask (the program then takes one as an argument)."""
  return bool(modules.config.use_loss_mask if tuning.loss_mask is None else tuning.loss_mask)


RATE_FIELDS = ('learning_rate', 'unet_learning_rate')


def tuning_rates(tuning: TuningConfig, **overrides: float | None) -> dict[str, np.ndarray]:
  """The `rates` argument of the tuning program: the learning rates (`RATE_FIELDS`; `overrides` replace
  the config's where not None) as float32 scalars. They are run-time values: every rate runs on one
  executable, so a learning-rate sweep compiles once. Raises InputError for a non-finite rate."""
  unknown = set(overrides) - set(RATE_FIELDS)
  if unknown:
    raise TypeError(f'unknown learning rates {sorted(unknown)}; the tuning program takes {list(RATE_FIELDS)}.')
  rates = {name: getattr(tuning, name) if overrides.get(name) is None else overrides[name] for name in RATE_FIELDS}
  bad = {name: rate for name, rate in rates.items() if not np.isfinite(float(rate))}
  if bad:
    raise InputError(f'tuning learning rates must be finite numbers, got {bad}.')
  return {name: np.float32(rate) for name, rate in rates.items()}


def compile_key(tuning: TuningConfig) -> TuningConfig:
  """`tuning` less what the tuning program takes at run time (the learning rates): configs with equal keys
  compile to the same program, so caches of compiled programs key on this."""
  return dataclasses.replace(tuning, **{name: getattr(TuningConfig, name) for name in RATE_FIELDS})


def tuned_unet_kernels(unet_params: Any, tuning: TuningConfig) -> list[str]:
  """Module paths of the U-Net kernels paper mode tunes (none in lite mode), in a stable order."""
  if tuning.mode != 'paper':
    return []
  patterns = [re.compile(p) for p in tuning.unet_patterns]
  paths = sorted('/'.join(path[:-1]) for path in traverse_util.flatten_dict(dict(unet_params))
                 if path[-1] == 'kernel' and any(p.search('/'.join(path[:-1])) for p in patterns))
  if not paths:
    raise InputError(f'tuning unet_patterns {list(tuning.unet_patterns)} match no U-Net kernel.')
  return paths


def tuning_captions(modules: model_lib.E4TModules, tuning: TuningConfig, prompt: str | None = None) -> list[str]:
  """The caption of each row of a tuning step: one per view in paper mode or with templates (cycled over
  the rows; a call's `prompt` replaces them), else one row that every draw shares."""
  rows = tuning.batch_size if tuning.mode == 'paper' or tuning.templates is not None else 1
  if prompt is not None or tuning.templates is None:
    return [tuning_prompt(modules, tuning) if prompt is None else prompt] * rows
  return [tuning.templates[i % len(tuning.templates)] for i in range(rows)]


def tuning_ids(modules: model_lib.E4TModules, tuning: TuningConfig, prompt: str | None = None) -> np.ndarray:
  """The `input_ids` argument of the tuning program: [rows, tokens] int32 (`tuning_captions`)."""
  captions = tuning_captions(modules, tuning, prompt)
  return tuning_prompt_ids(modules, captions, len(captions))


def make_views(image: jax.Array, key: jax.Array, count: int, augment: bool, max_zoom: float = 1.15) -> jax.Array:
  """`count` views of one image [S, S, 3]: view 0 is the image; with `augment` the others are mirrored
  with probability 1/2 and zoomed in by a factor in [1, max_zoom] around a random point (bilinear)."""
  views = jnp.broadcast_to(image, (count,) + image.shape)
  if not augment or count == 1:
    return views
  size = image.shape[0]
  k_flip, k_zoom, k_shift = jax.random.split(key, 3)
  flip = jax.random.bernoulli(k_flip, 0.5, (count,)).at[0].set(False)
  zoom = jax.random.uniform(k_zoom, (count,), minval=1.0, maxval=max_zoom).at[0].set(1.0)
  # Output pixel y reads input (y - shift) / zoom: shifts in [size (1 - zoom), 0] stay inside the image.
  shift = jax.random.uniform(k_shift, (count, 2)) * (size * (1.0 - zoom))[:, None]

  def view(image, flip, zoom, shift):
    image = jnp.where(flip, image[:, ::-1], image)
    return jax.image.scale_and_translate(image, image.shape, (0, 1), jnp.stack([zoom, zoom]), shift, 'linear')

  return jax.vmap(view)(views, flip, zoom, shift)


def tuning_program(modules: model_lib.E4TModules, tuning: TuningConfig, unroll: bool = False) -> Callable:
  """The pure function compiled by `make_personalize_fn` (one concept).

  `unroll`: unroll the step loop and the micro-batch loop (for cost analysis only: XLA counts a loop body
  once whatever its trip count, so per-step FLOPs are the difference of unrolled programs of 2 and 1 steps).

  Returns (w*, concept offsets, loss trace, steps run, healthy). The concept offsets are the tuned weight
  offsets (lite), or (paper) per kernel the truncated-SVD pair of everything tuning changed in it: the U-Net
  delta plus the weight offsets, as one additive delta.
  """
  config = modules.config
  paper = tuning.mode == 'paper'
  prompt_ids = modules.tokenize([c.replace('{}', config.placeholder) for c in tuning_captions(modules, tuning)])
  # One optimizer, a learning rate per group in paper mode: the U-Net's own kernels, and everything else.
  label = lambda tree: {name: jax.tree.map(lambda _, n=name: 'unet' if n == 'unet' else 'e4t', sub)
                        for name, sub in tree.items()}

  def make_optimizer(rates):  # the rates are traced arguments: one executable serves every rate
    if paper:
      return optax.multi_transform({'e4t': optax.adam(rates['learning_rate']),
                                    'unet': optax.adam(rates['unet_learning_rate'])}, label)
    return optax.adam(rates['learning_rate'])

  readout_t = np.asarray(tuning.readout_timesteps, np.int32)
  masked = uses_loss_mask(modules, tuning)

  def program(params, image, rng, num_steps, input_ids=None, mask=None, rates=None):
    # image: [S, S, 3] float32 in [0, 1] (already at the model resolution); input_ids: [rows, tokens]
    # int32, the tuning captions with the placeholder (1 row in lite mode, one per view in paper mode;
    # None: the config's, baked in); mask: [S, S] float32 in [0, 1] when `masked` (None: all ones);
    # rates: `tuning_rates(...)`, the learning rates as float32 scalars (None: the config's, baked in).
    optimizer = make_optimizer(tuning_rates(tuning) if rates is None else rates)
    trainable, frozen = model_lib.split_params(params, config.trainable_patterns)
    tuned_kernels = tuned_unet_kernels(params['unet'], tuning)
    if paper:  # the selected U-Net kernels move to the trainable side
      tuned = {tuple(p.split('/')) + ('kernel',) for p in tuned_kernels}
      flat_unet = traverse_util.flatten_dict(frozen['unet'])
      trainable = dict(trainable, unet=traverse_util.unflatten_dict({k: v for k, v in flat_unet.items()
                                                                     if k in tuned}))
      frozen = dict(frozen, unet=traverse_util.unflatten_dict({k: v for k, v in flat_unet.items()
                                                               if k not in tuned}))
    # Keys: fold_in(rng, i) for step i, num_steps for the read-out, num_steps + 1 for the views.
    pixels = image * 2.0 - 1.0
    if masked:  # the mask rides along as a 4th channel, so that every view crops it as its image
      mask = jnp.ones(image.shape[:2], image.dtype) if mask is None else mask
      pixels = jnp.concatenate([pixels, mask[..., None].astype(image.dtype)], axis=-1)
    views = make_views(pixels, jax.random.fold_in(rng, tuning.num_steps + 1), tuning.batch_size, tuning.augment)
    images = views[..., :3]
    ids = jnp.asarray(prompt_ids) if input_ids is None else input_ids
    ids = jnp.broadcast_to(ids, (tuning.batch_size, ids.shape[-1]))  # one row serves every draw
    batch = {'images': images, 'input_ids': ids}
    if masked:
      batch['mask'] = views[..., 3]
    # The image's VAE posterior, CLIP features and the coarse prompt do not change between steps:
    # compute them once, outside the loop (unless parts of CLIP train, config.trainable_patterns).
    # Lite mode's rows are copies of one image; paper mode's views each have their own.
    cached = None
    if not config.trainable_patterns:
      cached = image_features(modules, params, images if paper else images[:1])

    def loss_and_grads(trainable, key):
      loss_of = lambda t, rows, features, draws: e4t_loss(modules, model_lib.merge_params(t, frozen), rows, key,
                                                          features, draws, loss_mask=masked)[0]
      features = None if cached is None else (cached if paper else cached.repeat(tuning.batch_size))
      if tuning.micro_batch in (None, tuning.batch_size):
        return jax.value_and_grad(loss_of)(trainable, batch, features, None)
      # The whole batch's draws, sliced per pass: each row is drawn as in one pass.
      posterior_mean = jax.eval_shape(lambda: image_features(modules, params, images[:1]).posterior.mean)
      draws = draw_noise(modules, key, jax.ShapeDtypeStruct((tuning.batch_size,) + posterior_mean.shape[1:],
                                                            posterior_mean.dtype))
      return accumulated_value_and_grad(loss_of, trainable, (batch, features, draws), tuning.micro_batch, unroll)

    def step(carry, i):
      trainable, opt_state, healthy = carry
      key = jax.random.fold_in(rng, i)

      def update(operand):
        trainable, opt_state = operand
        loss, grads = loss_and_grads(trainable, key)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), new_opt_state, loss

      def skip(operand):
        return operand[0], operand[1], jnp.array(jnp.nan, jnp.float32)

      active = jnp.logical_and(i < num_steps, healthy)
      new_trainable, new_opt_state, loss = jax.lax.cond(active, update, skip, (trainable, opt_state))
      # A non-finite loss stops tuning: keep the last finite state and report it to the host.
      apply = jnp.logical_and(active, jnp.isfinite(loss))
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
      healthy = jnp.logical_and(healthy, jnp.logical_or(~active, jnp.isfinite(loss)))
      return (keep(new_trainable, trainable), keep(new_opt_state, opt_state), healthy), loss

    init = (trainable, optimizer.init(trainable), jnp.array(True))
    (trainable, _, healthy), losses = jax.lax.scan(step, init, jnp.arange(tuning.num_steps), unroll=unroll)

    # Read out w*: the encoder's prediction averaged over fixed timesteps and noise draws.
    merged = model_lib.merge_params(trainable, frozen)
    k_vae, k_noise = jax.random.split(jax.random.fold_in(rng, tuning.num_steps))
    # From the image itself (view 0), not an augmented view.
    features = image_features(modules, merged, images[:1]) if cached is None else jax.tree.map(lambda x: x[:1], cached)
    latents = scale_latents(modules.vae.config, features.posterior.sample(k_vae))
    latents = jnp.broadcast_to(latents, (len(readout_t),) + latents.shape[1:])
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    noisy = schedule_lib.add_noise(modules.schedule, latents, noise, jnp.asarray(readout_t))
    readout_images = jnp.broadcast_to(images[:1], (len(readout_t),) + images.shape[1:])
    offset = predict_offset(modules, merged, readout_images, noisy, jnp.asarray(readout_t),
                            features.repeat(len(readout_t)))
    w_star = placeholder_embedding(coarse_embedding(modules, merged), jnp.mean(offset, axis=0, keepdims=True),
                                   config.embedding_scale)[0]
    concept_offsets = trainable['weight_offsets']
    if paper:
      concept_offsets = unet_delta_factors(params['unet'], merged['unet'], trainable['weight_offsets'],
                                           config.offsets.mode, tuned_kernels, tuning.delta_rank,
                                           delta_factorization(tuning))
    outputs = (w_star, concept_offsets, losses, jnp.minimum(num_steps, tuning.num_steps), healthy)
    if tuning.keep_encoder:
      outputs += (TunedEncoder(encoder=trainable['encoder'], unet=merged['unet'] if paper else None,
                               clip_hidden_states=tuple(features.clip_hidden_states),
                               coarse_context=features.coarse_context),)
    return outputs

  return program


def accumulated_value_and_grad(loss_of: Callable, trainable: Any, rows: Any, micro_batch: int,
                               unroll: bool = False) -> tuple[jax.Array, Any]:
  """`value_and_grad(loss_of)(trainable, *rows)` as the mean over passes of `micro_batch` rows each.

  rows: a tuple of pytrees whose leaves share the leading batch axis (None leaves: absent), e.g.
  (batch, features, draws). For a loss that is a mean over rows plus row-independent terms, this equals
  the one-pass value and gradient up to float rounding; only one pass's activations are live at a time.
  """
  batch_size = jax.tree.leaves(rows)[0].shape[0]
  passes = batch_size // micro_batch

  def one_pass(total, start):
    sliced = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, micro_batch), rows)
    value = jax.value_and_grad(loss_of)(trainable, *sliced)
    return jax.tree.map(jnp.add, total, value), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
  total, _ = jax.lax.scan(one_pass, zeros, jnp.arange(passes) * micro_batch, unroll=unroll)
  return jax.tree.map(lambda x: x / passes, total)


def delta_factorization(tuning: TuningConfig) -> str:
  """The factorization paper mode traces: `tuning.factorization`, with 'auto' read at trace time as
  'randomized' for a TPU (the platform `tpu_attention.platform()` traces for: the default backend, or
  `target_platform`'s for an AOT compile from another host) and 'svd' elsewhere."""
  if tuning.factorization != 'auto':
    return tuning.factorization
  from e4t_jax.models import tpu_attention  # pylint: disable=g-import-not-at-top
  return 'randomized' if tpu_attention.platform() == 'tpu' else 'svd'


def unet_delta_factors(original_unet: Any, tuned_unet: Any, weight_offsets: dict, offsets_mode: str,
                       tuned_kernels: Sequence[str], rank: int,
                       factorization: str = 'svd') -> dict[str, dict[str, jax.Array]]:
  """Per changed kernel (the tuned ones and the offsets' targets), the rank-`rank` additive pair of
  (tuned U-Net with its offsets merged) - original: what a paper-mode concept stores, and what generation
  and the LoRA export apply as W + down @ up."""
  final = traverse_util.flatten_dict(offsets_lib.merge_offsets(tuned_unet, weight_offsets, offsets_mode))
  original = traverse_util.flatten_dict(dict(original_unet))
  deltas = {}
  for path in sorted(set(tuned_kernels) | set(weight_offsets)):
    key = tuple(path.split('/')) + ('kernel',)
    deltas[path] = final[key] - original[key]
  return offsets_lib.low_rank_factors_many(deltas, rank, factorization)


def tuning_prompt(modules: model_lib.E4TModules, tuning: TuningConfig) -> str:
  """The tuning prompt: the tuning config's, else the model's default."""
  return modules.config.tuning_prompt if tuning.prompt is None else tuning.prompt


def tuning_prompt_ids(modules: model_lib.E4TModules, prompt: str | Sequence[str], batch_size: int = 1) -> np.ndarray:
  """Tuning captions -> [batch_size, tokens] int32 ids; '{}' becomes the placeholder.

  'a {} on a red background' (or the placeholder itself written out) serves every row; a sequence gives
  one caption per row. Raises InputError for a caption with no place for the concept, or with the
  placeholder cut off at the text encoder's context length: tuning w* through it would learn nothing.
  """
  if isinstance(prompt, str):
    prompts = [prompt] * batch_size
  elif isinstance(prompt, (list, tuple)):
    prompts = list(prompt)
  else:
    prompts = []
  if len(prompts) != batch_size or not all(isinstance(p, str) for p in prompts):
    raise InputError(f'pass one tuning caption or {batch_size} (one per draw of a step), got {prompt!r}.')
  placeholder = modules.config.placeholder
  for p in prompts:
    if p.count('{}') > 1:
      raise InputError(f'tuning prompt {p!r} must contain "{{}}" once, where the concept goes '
                       '(e.g. "a photo of {}").')
  texts = [p.replace('{}', placeholder) for p in prompts]
  ids = modules.tokenize(texts)
  for text, row in zip(texts, ids):
    if modules.tokenizer.is_truncated(text):
      raise InputError(f'tuning prompt {printable(text[:60])!r}... is longer than the text encoder\'s '
                       f'{ids.shape[1]} tokens and would be cut; shorten it.')
    count = int(np.sum(row == modules.placeholder_id))
    if count != 1:
      raise InputError(f'tuning prompt {printable(text[:60])!r} has {count or "no"} placeholder{"s" * (count != 1)}; write '
                       f'{{}} (or {placeholder!r}) exactly once where the concept goes, e.g. "a photo of {{}}".')
  return ids


def prepare_image(image: Any, size: int, source: str = 'image') -> np.ndarray:
  """User image (HxWx3 uint8, or float in [0, 1]; a path is loaded) -> float32 [size, size, 3] in [0, 1].

  Non-square images are center-cropped; the resize happens on the host so that one compiled program
  serves images of every size.
  """
  from e4t_jax.data import images as images_lib  # PIL-based; imported lazily
  if isinstance(image, (str, os.PathLike)):
    source = str(image)
    image = images_lib.load_image(image)
  array = np.asarray(image)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise InputError(f'{source}: expected an HxWx3 image, got shape {array.shape}.')
  array = array[..., :3]
  if array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.floating):
      raise InputError(f'{source}: pixel type {array.dtype}; pass uint8 or float in [0, 1].')
    if not np.isfinite(array).all() or array.min() < -1e-3 or array.max() > 1 + 1e-3:
      raise InputError(f'{source}: float pixels must be finite and in [0, 1] '
                       f'(got [{np.nanmin(array):.3g}, {np.nanmax(array):.3g}]).')
    array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
  array = images_lib.center_crop_resize(array, size)
  return array.astype(np.float32) / 255.0


def prepare_mask(mask: Any, size: int, image: Any = None, source: str = 'mask') -> np.ndarray:
  """A subject mask (HxW or HxWxC: the first channel; a path is loaded; None: all ones) -> float32
  [size, size] in [0, 1], center-cropped like its image (which must have the mask's aspect ratio)."""
  from e4t_jax.data import images as images_lib  # PIL-based; imported lazily
  if mask is None:
    return np.ones((size, size), np.float32)
  if isinstance(mask, (str, os.PathLike)):
    source = str(mask)
    mask = images_lib.load_mask_array(mask)
  array = np.asarray(mask)
  if array.ndim == 3:
    array = array[..., 0]
  if array.ndim != 2:
    raise InputError(f'{source}: expected an HxW mask, got shape {array.shape}.')
  if image is not None and not isinstance(image, (str, os.PathLike)):
    from e4t_jax.data import sources  # the rule `e4t prepare --masks` applies
    sources._check_mask_aspect(np.asarray(image), array, 'image', source)  # pylint: disable=protected-access
  if array.dtype == bool:
    array = array.astype(np.uint8) * 255
  elif array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.floating):
      raise InputError(f'{source}: mask type {array.dtype}; pass uint8, bool or float in [0, 1].')
    if not np.isfinite(array).all() or array.min() < -1e-3 or array.max() > 1 + 1e-3:
      raise InputError(f'{source}: float mask values must be finite and in [0, 1].')
    if array.shape == (size, size):  # already at the model resolution: kept as it is
      return _nonempty(np.clip(array, 0, 1).astype(np.float32), source)
    array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
  return _nonempty(images_lib.center_crop_resize(array, size).astype(np.float32) / 255.0, source)


def _nonempty(mask: np.ndarray, source: str) -> np.ndarray:
  if not mask.any():
    raise InputError(f'{source}: the mask is empty (all background); it must mark the subject.')
  return mask


def concept_metadata(model: model_lib.E4TModel, tuning: TuningConfig, fingerprint: str) -> tuple:
  """The static (key, value) metadata every concept of `model` tuned with `tuning` carries."""
  m = model.modules
  info = {'placeholder': m.config.placeholder, 'coarse_word': m.config.coarse_word,
          **fingerprint_info(model, fingerprint), 'offsets_mode': m.config.offsets.mode, 'max_steps': str(tuning.num_steps), 'learning_rate': repr(tuning.learning_rate),
          'tuning_mode': tuning.mode}
  if tuning.mode == 'paper':  # the stored offsets are additive SVD pairs of the whole tuned delta
    info.update(offsets_mode='additive', delta_rank=str(tuning.delta_rank), views=str(tuning.batch_size),
                unet_learning_rate=repr(tuning.unet_learning_rate), factorization=delta_factorization(tuning))
  if uses_loss_mask(m, tuning):
    info['loss_mask'] = 'true'
  if tuning.micro_batch not in (None, tuning.batch_size):
    info['micro_batch'] = str(tuning.micro_batch)
  return tuple(sorted(info.items()))


class PersonalizeFn:
  """The compiled personalization function (see `make_personalize_fn`)."""

  def __init__(self, model: model_lib.E4TModel, tuning: TuningConfig, compiled, fingerprint: str):
    self.model, self.tuning, self.compiled, self.fingerprint = model, tuning, compiled, fingerprint
    self._default_key = jax.random.key(0)
    self._metadata = concept_metadata(model, tuning, fingerprint)

  def __call__(self, params: Any, image: Any, rng: jax.Array | None = None, num_steps: int | None = None,
               prompt: str | None = None, mask: Any = None, learning_rate: float | None = None,
               unet_learning_rate: float | None = None) -> Concept:
    """Tunes on one image. `prompt` describes the image, '{}' = the concept (e.g. 'a {} on a red
    background'; default: the tuning config's, else the model's); every prompt runs on one executable.
    `mask`: where the subject is (HxW, 1 = subject; a path, uint8 0..255, bool or float in [0, 1]), for a
    function made with a loss mask (`TuningConfig.loss_mask`); None there weights the whole image.
    `learning_rate` / `unet_learning_rate` (paper mode): replace the tuning config's for this call, on
    the same executable (a sweep compiles nothing); the concept's metadata records the rates used."""
    overrides = {'learning_rate': learning_rate, 'unet_learning_rate': unet_learning_rate}
    rates = tuning_rates(self.tuning, **overrides)
    steps = self.tuning.num_steps if num_steps is None else int(num_steps)
    if not 0 <= steps <= self.tuning.num_steps:
      raise InputError(f'num_steps={steps}: this function was compiled for at most {self.tuning.num_steps} steps.')
    size = self.model.modules.image_size
    masked = uses_loss_mask(self.model.modules, self.tuning)
    if mask is not None and not masked:
      raise InputError('a mask was given but this personalize function was made without a loss mask; '
                       'make it with TuningConfig(loss_mask=True).')
    source = 'image'
    if isinstance(image, (str, os.PathLike)):  # loaded here, so that the mask is checked against it
      from e4t_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
      source, image = str(image), images_lib.load_image(image)
    pixels = prepare_image(image, size, source)
    key = self._default_key if rng is None else rng
    ids = tuning_ids(self.model.modules, self.tuning, prompt)
    loss_mask = prepare_mask(mask, size, image) if masked else None
    w_star, offsets, losses, steps_run, healthy, *tuned = self.compiled(params, pixels, key, np.int32(steps), ids,
                                                                        loss_mask, rates)
    if not bool(healthy):
      raise DivergenceError('tuning produced a non-finite loss (NaN/inf); lower the learning rate or check the '
                       'model weights. The concept was not saved.')
    used = {name: value for name, value in overrides.items() if value is not None}
    metadata = self._metadata if not used else concept_metadata(
        self.model, dataclasses.replace(self.tuning, **used), self.fingerprint)
    return Concept(embedding=w_star, weight_offsets=offsets, loss_trace=losses, steps=steps_run,
                   metadata=metadata + (('steps', str(steps)),), tuned_encoder=tuned[0] if tuned else None)

  def cost_analysis(self) -> dict:
    """FLOPs and bytes of the compiled program (`e4t_jax.runtime.cost_stats`)."""
    return runtime.cost_stats(self.compiled)

  def memory_analysis(self) -> Any:
    return self.compiled.memory_analysis()


def make_personalize_fn(model: model_lib.E4TModel, num_steps: int = 5, *, tuning: TuningConfig | None = None,
                        cache_dir: str | os.PathLike | None = None) -> PersonalizeFn:
  """Lowers and compiles the tuning program once (AOT) for `model`'s shapes.

  Returns `personalize_fn(params, image, rng=None, num_steps=None) -> Concept`; calling it with
  params of the same shapes and any image never compiles again.
  """
  tuning = dataclasses.replace(tuning or TuningConfig(), num_steps=num_steps)
  if num_steps < 0:
    raise InputError(f'num_steps must be >= 0, got {num_steps}.')
  if cache_dir is not None:
    runtime.enable_compilation_cache(cache_dir)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), model.params)
  compiled = lower_personalize_program(model.modules, abstract, tuning).compile()
  return PersonalizeFn(model, tuning, compiled, model_fingerprint(model))


def lower_personalize_program(modules: model_lib.E4TModules, abstract_params: Any, tuning: TuningConfig):
  """The jitted tuning program lowered for params of these shapes/dtypes (`jax.ShapeDtypeStruct`s):
  what `make_personalize_fn` compiles; `e4t_jax.bench.full` compiles the same lowering ahead of time."""
  size = modules.image_size
  ids = tuning_ids(modules, tuning)
  mask = jax.ShapeDtypeStruct((size, size), jnp.float32) if uses_loss_mask(modules, tuning) else None
  return jax.jit(tuning_program(modules, tuning)).lower(
      abstract_params, jax.ShapeDtypeStruct((size, size, 3), jnp.float32),
      jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct(ids.shape, jnp.int32), mask, abstract_rates())


def abstract_rates() -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of `tuning_rates(...)`, for lowering the tuning program."""
  return {name: jax.ShapeDtypeStruct((), jnp.float32) for name in RATE_FIELDS}


_BATCHED_PROGRAMS: dict[tuple, tuple[Any, Any]] = {}


def batched_program(modules: model_lib.E4TModules, tuning: TuningConfig, mesh) -> Callable:
  """The vmapped tuning program, jitted once per (modules, `compile_key(tuning)`, mesh) and reused across
  calls (the learning rates are arguments)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  tuning = compile_key(tuning)
  key = (id(modules), tuning, None if mesh is None else (id(mesh), tuple(mesh.shape.items())))
  cached = _BATCHED_PROGRAMS.get(key)
  if cached is not None and cached[0] is modules:  # the entry keeps `modules` alive: ids cannot be reused
    return cached[1]
  # Arguments: params (shared), image, key, steps, ids, mask (None without a loss mask), one per concept;
  # rates (`tuning_rates`, shared).
  batched = jax.vmap(tuning_program(modules, tuning), in_axes=(None, 0, 0, 0, 0, 0, None))
  if mesh is not None:
    over_data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
    batched = jax.jit(batched, in_shardings=(replicated,) + (over_data,) * 5 + (replicated,),
                      out_shardings=over_data)
  else:
    batched = jax.jit(batched)
  if len(_BATCHED_PROGRAMS) >= 4:
    _BATCHED_PROGRAMS.pop(next(iter(_BATCHED_PROGRAMS)))
  _BATCHED_PROGRAMS[key] = (modules, batched)
  return batched


_SEQUENTIAL_FNS: dict[tuple, tuple[Any, 'PersonalizeFn']] = {}


def _sequential_fn(model: model_lib.E4TModel, tuning: TuningConfig) -> 'PersonalizeFn':
  """`make_personalize_fn(model, tuning)`, compiled once per (modules, `compile_key(tuning)`) and reused;
  call it with `tuning`'s learning rates (`PersonalizeFn.__call__`'s overrides)."""
  key = (id(model.modules), compile_key(tuning))
  cached = _SEQUENTIAL_FNS.get(key)
  if cached is not None and cached[0] is model.modules:
    return cached[1]
  fn = make_personalize_fn(model, tuning.num_steps, tuning=tuning)
  if len(_SEQUENTIAL_FNS) >= 4:
    _SEQUENTIAL_FNS.pop(next(iter(_SEQUENTIAL_FNS)))
  _SEQUENTIAL_FNS[key] = (model.modules, fn)
  return fn


def personalize_many(model: model_lib.E4TModel, images: Sequence[Any], *, num_steps: int = 5,
                     tuning: TuningConfig | None = None, seed: int = 0, mesh=None,
                     prompts: Sequence[str] | None = None, masks: Sequence[Any] | None = None) -> list[Concept]:
  """Personalizes N images at once: the tuning program vmapped over concepts, the concept axis
  sharded over the mesh's data axis (N is padded to a multiple of the data-axis size). The batched
  program is compiled once per (model, tuning, mesh, N) and reused by later calls. `prompts`: one
  tuning prompt per image ('{}' for the concept), default `tuning_prompt(...)` for all. `masks`: one loss
  mask (or None: the whole image) per image, for a tuning with `loss_mask` (`personalize_fn`'s `mask`).
  Paper mode on CPU tunes the concepts one at a time instead (same keys and results; XLA:CPU hangs
  executing the vmapped paper program)."""
  tuning = dataclasses.replace(tuning or TuningConfig(), num_steps=num_steps)
  masked = uses_loss_mask(model.modules, tuning)
  if masks is not None and not masked:
    raise InputError('masks were given but the tuning has no loss mask; pass TuningConfig(loss_mask=True).')
  size = model.modules.image_size
  pixels = np.stack([prepare_image(image, size, f'image {i}') for i, image in enumerate(images)])
  count = len(pixels)
  masks = [None] * count if masks is None else list(masks)
  if len(masks) != count:
    raise InputError(f'{len(masks)} masks for {count} images; pass one mask (or None) per image.')
  shards = 1 if mesh is None else mesh.shape['data']
  padded = -(-count // shards) * shards
  pixels = np.concatenate([pixels, np.repeat(pixels[:1], padded - count, axis=0)])
  keys = jax.random.split(jax.random.key(seed), padded)
  steps = np.full((padded,), num_steps, np.int32)
  prompts = [None] * count if prompts is None else list(prompts)
  if len(prompts) != count:
    raise InputError(f'{len(prompts)} prompts for {count} images; pass one tuning prompt per image.')
  ids = np.stack([tuning_ids(model.modules, tuning, p) for p in prompts + prompts[:1] * (padded - count)])
  platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
  if tuning.mode == 'paper' and platform == 'cpu':
    # XLA:CPU deadlocks executing the vmapped paper-mode program once it tunes the U-Net's convolutions
    # (every thread idle, the result never ready; docs/performance.md). On CPU, vmapping gains little
    # anyway: tune one concept at a time on one executable, with the keys the batched program would use.
    fn = _sequential_fn(model, tuning)
    rates = {name: getattr(tuning, name) for name in RATE_FIELDS}
    return [fn(model.params, images[i], keys[i], num_steps, prompts[i], mask=masks[i] if masked else None, **rates)
            for i in range(count)]
  batched = batched_program(model.modules, tuning, mesh)
  stacked = None
  if masked:
    stacked = np.stack([prepare_mask(m, size, image, f'mask {i}') for i, (m, image) in enumerate(zip(masks, images))])
    stacked = np.concatenate([stacked, np.repeat(stacked[:1], padded - count, axis=0)])
  w_star, offsets, losses, steps_run, healthy, *tuned = batched(model.params, pixels, keys, steps, ids, stacked,
                                                                tuning_rates(tuning))
  fingerprint = model_fingerprint(model)
  metadata = concept_metadata(model, tuning, fingerprint) + (('steps', str(num_steps)),)
  concepts = []
  for i in range(count):
    if not bool(healthy[i]):
      raise DivergenceError(f'image {i}: tuning produced a non-finite loss (NaN/inf).')
    concepts.append(Concept(embedding=w_star[i], weight_offsets=jax.tree.map(lambda x: x[i], offsets),
                            loss_trace=losses[i], steps=steps_run[i], metadata=metadata,
                            tuned_encoder=jax.tree.map(lambda x: x[i], tuned[0]) if tuned else None))
  return concepts
