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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e4t_jax import runtime
from e4t_jax.diffusion import schedule as schedule_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.concept import Concept, model_fingerprint
from e4t_jax.e4t.encoder import placeholder_embedding
from e4t_jax.e4t.objective import e4t_loss, image_features, predict_offset
from e4t_jax.e4t.prompts import token_embedding
from e4t_jax.errors import InputError
from e4t_jax.models.vae import scale_latents


# ----------------------------------------------------------------------------- tuning program
@dataclasses.dataclass(frozen=True)
class TuningConfig:
  num_steps: int = 5                  # the compiled maximum; a call may run fewer
  learning_rate: float = 1e-4
  batch_size: int = 1                 # noise/timestep draws of the one image per step
  prompt: str | None = None           # '{}' = the concept; None: the model's `E4TConfig.tuning_prompt`
  # Timesteps at which the final w* is read out (averaged); spread over the training range.
  readout_timesteps: Sequence[int] = (100, 300, 500, 700, 900)


def tuning_program(modules: model_lib.E4TModules, tuning: TuningConfig) -> Callable:
  """The pure function compiled by `make_personalize_fn` (one concept)."""
  config = modules.config
  prompt_ids = modules.tokenize([tuning_prompt(modules, tuning).replace('{}', config.placeholder)]
                               * tuning.batch_size)
  optimizer = optax.adam(tuning.learning_rate)
  readout_t = np.asarray(tuning.readout_timesteps, np.int32)

  def program(params, image, rng, num_steps, input_ids=None):
    # image: [S, S, 3] float32 in [0, 1] (already at the model resolution); input_ids: [1, tokens]
    # int32, the tuning prompt with the placeholder (None: tuning.prompt, baked in).
    trainable, frozen = model_lib.split_params(params, config.trainable_patterns)
    images = jnp.broadcast_to(image[None] * 2.0 - 1.0, (tuning.batch_size,) + image.shape)
    ids = jnp.asarray(prompt_ids) if input_ids is None else jnp.broadcast_to(
        input_ids, (tuning.batch_size, input_ids.shape[-1]))
    batch = {'images': images, 'input_ids': ids}
    # The image's VAE posterior, CLIP features and the coarse prompt do not change between steps:
    # compute them once, outside the loop (unless parts of CLIP train, config.trainable_patterns).
    cached = None
    if not config.trainable_patterns:
      cached = image_features(modules, params, images[:1])

    def loss_fn(trainable, key):
      features = None if cached is None else cached.repeat(tuning.batch_size)
      return e4t_loss(modules, model_lib.merge_params(trainable, frozen), batch, key, features)

    def step(carry, i):
      trainable, opt_state, healthy = carry
      key = jax.random.fold_in(rng, i)

      def update(operand):
        trainable, opt_state = operand
        loss, grads = jax.value_and_grad(lambda t: loss_fn(t, key)[0])(trainable)
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
    (trainable, _, healthy), losses = jax.lax.scan(step, init, jnp.arange(tuning.num_steps))

    # Read out w*: the encoder's prediction averaged over fixed timesteps and noise draws.
    merged = model_lib.merge_params(trainable, frozen)
    k_vae, k_noise = jax.random.split(jax.random.fold_in(rng, tuning.num_steps))
    features = image_features(modules, merged, images[:1]) if cached is None else cached
    latents = scale_latents(modules.vae.config, features.posterior.sample(k_vae))
    latents = jnp.broadcast_to(latents, (len(readout_t),) + latents.shape[1:])
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    noisy = schedule_lib.add_noise(modules.schedule, latents, noise, jnp.asarray(readout_t))
    readout_images = jnp.broadcast_to(images[:1], (len(readout_t),) + images.shape[1:])
    offset = predict_offset(modules, merged, readout_images, noisy, jnp.asarray(readout_t),
                            features.repeat(len(readout_t)))
    w_star = placeholder_embedding(token_embedding(merged['text_encoder'], modules.coarse_token_id),
                                   jnp.mean(offset, axis=0, keepdims=True), config.embedding_scale)[0]
    return w_star, trainable['weight_offsets'], losses, jnp.minimum(num_steps, tuning.num_steps), healthy

  return program


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
    if not np.any(row == modules.placeholder_id):
      raise InputError(f'tuning prompt {text[:60]!r} has no placeholder (write {{}} where the concept goes, '
                       f'e.g. "a photo of {{}}", or {placeholder!r}), or it was cut off at the text encoder\'s '
                       'context length.')
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


def concept_metadata(model: model_lib.E4TModel, tuning: TuningConfig, fingerprint: str) -> tuple:
  """The static (key, value) metadata every concept of `model` tuned with `tuning` carries."""
  m = model.modules
  return tuple(sorted({
      'placeholder': m.config.placeholder, 'coarse_word': m.config.coarse_word,
      'base_fingerprint': fingerprint, 'offsets_mode': m.config.offsets.mode,
      'max_steps': str(tuning.num_steps), 'learning_rate': repr(tuning.learning_rate),
  }.items()))


class PersonalizeFn:
  """The compiled personalization function (see `make_personalize_fn`)."""

  def __init__(self, model: model_lib.E4TModel, tuning: TuningConfig, compiled, fingerprint: str):
    self.model, self.tuning, self.compiled, self.fingerprint = model, tuning, compiled, fingerprint
    self._default_key = jax.random.key(0)
    self._metadata = concept_metadata(model, tuning, fingerprint)

  def __call__(self, params: Any, image: Any, rng: jax.Array | None = None, num_steps: int | None = None,
               prompt: str | None = None) -> Concept:
    """Tunes on one image. `prompt` describes the image, '{}' = the concept (e.g. 'a {} on a red
    background'; default: the tuning config's, else the model's); every prompt runs on one executable."""
    steps = self.tuning.num_steps if num_steps is None else int(num_steps)
    if not 0 <= steps <= self.tuning.num_steps:
      raise InputError(f'num_steps={steps}: this function was compiled for at most {self.tuning.num_steps} steps.')
    pixels = prepare_image(image, self.model.modules.image_size)
    key = self._default_key if rng is None else rng
    ids = tuning_prompt_ids(self.model.modules, tuning_prompt(self.model.modules, self.tuning) if prompt is None
                            else prompt)
    w_star, offsets, losses, steps_run, healthy = self.compiled(params, pixels, key, np.int32(steps), ids)
    if not bool(healthy):
      raise InputError('tuning produced a non-finite loss (NaN/inf); lower the learning rate or check the '
                       'model weights. The concept was not saved.')
    return Concept(embedding=w_star, weight_offsets=offsets, loss_trace=losses, steps=steps_run,
                   metadata=self._metadata + (('steps', str(steps)),))

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
  ids = tuning_prompt_ids(modules, tuning_prompt(modules, tuning))
  return jax.jit(tuning_program(modules, tuning)).lower(
      abstract_params, jax.ShapeDtypeStruct((size, size, 3), jnp.float32),
      jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct(ids.shape, jnp.int32))


_BATCHED_PROGRAMS: dict[tuple, tuple[Any, Any]] = {}


def batched_program(modules: model_lib.E4TModules, tuning: TuningConfig, mesh) -> Callable:
  """The vmapped tuning program, jitted once per (modules, tuning, mesh) and reused across calls."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  key = (id(modules), tuning, None if mesh is None else (id(mesh), tuple(mesh.shape.items())))
  cached = _BATCHED_PROGRAMS.get(key)
  if cached is not None and cached[0] is modules:  # the entry keeps `modules` alive: ids cannot be reused
    return cached[1]
  batched = jax.vmap(tuning_program(modules, tuning), in_axes=(None, 0, 0, 0, 0))
  if mesh is not None:
    over_data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
    batched = jax.jit(batched, in_shardings=(replicated, over_data, over_data, over_data, over_data),
                      out_shardings=over_data)
  else:
    batched = jax.jit(batched)
  if len(_BATCHED_PROGRAMS) >= 4:
    _BATCHED_PROGRAMS.pop(next(iter(_BATCHED_PROGRAMS)))
  _BATCHED_PROGRAMS[key] = (modules, batched)
  return batched


def personalize_many(model: model_lib.E4TModel, images: Sequence[Any], *, num_steps: int = 5,
                     tuning: TuningConfig | None = None, seed: int = 0, mesh=None,
                     prompts: Sequence[str] | None = None) -> list[Concept]:
  """Personalizes N images at once: the tuning program vmapped over concepts, the concept axis
  sharded over the mesh's data axis (N is padded to a multiple of the data-axis size). The batched
  program is compiled once per (model, tuning, mesh, N) and reused by later calls. `prompts`: one
  tuning prompt per image ('{}' for the concept), default `tuning_prompt(...)` for all."""
  tuning = dataclasses.replace(tuning or TuningConfig(), num_steps=num_steps)
  size = model.modules.image_size
  pixels = np.stack([prepare_image(image, size, f'image {i}') for i, image in enumerate(images)])
  count = len(pixels)
  shards = 1 if mesh is None else mesh.shape['data']
  padded = -(-count // shards) * shards
  pixels = np.concatenate([pixels, np.repeat(pixels[:1], padded - count, axis=0)])
  keys = jax.random.split(jax.random.key(seed), padded)
  steps = np.full((padded,), num_steps, np.int32)
  prompts = [tuning_prompt(model.modules, tuning)] * count if prompts is None else list(prompts)
  if len(prompts) != count:
    raise InputError(f'{len(prompts)} prompts for {count} images; pass one tuning prompt per image.')
  ids = np.stack([tuning_prompt_ids(model.modules, p) for p in prompts + prompts[:1] * (padded - count)])
  batched = batched_program(model.modules, tuning, mesh)
  w_star, offsets, losses, steps_run, healthy = batched(model.params, pixels, keys, steps, ids)
  fingerprint = model_fingerprint(model)
  metadata = concept_metadata(model, tuning, fingerprint) + (('steps', str(num_steps)),)
  concepts = []
  for i in range(count):
    if not bool(healthy[i]):
      raise InputError(f'image {i}: tuning produced a non-finite loss (NaN/inf).')
    concepts.append(Concept(embedding=w_star[i], weight_offsets=jax.tree.map(lambda x: x[i], offsets),
                            loss_trace=losses[i], steps=steps_run[i], metadata=metadata))
  return concepts
