"""The baselines E4T is compared against, tuned on the same model: textual inversion and DreamBooth.

Both are compile-once programs like `make_personalize_fn`: one AOT-compiled executable per model and
settings, with the image, the PRNG key, the step count (up to the compiled maximum) and the tuning
prompt's token ids as array arguments, so every concept (and caption) reuses it.

Textual inversion (Gal et al. 2022), one image: only the placeholder's token embedding w* is optimized
(initialized to the coarse word's embedding) with the plain diffusion loss
  ‖ε̂(z_t, t, text(prompt with w*)) − ε‖²
through the frozen base U-Net (no weight offsets). The result is a `Concept` with zero weight offsets,
so `generate` renders it unchanged. Adam without weight decay by default (the reference
implementations use torch's AdamW default of 1e-2, which at 5e-3 over 3000 steps shrinks w* by about
14% towards zero; `TextualInversionConfig.weight_decay` turns it on).

DreamBooth-like fine-tuning (Ruiz et al. 2023), one image: every U-Net weight and, jointly, w* (as
"DreamBooth + TI", initialized to the coarse word) are tuned with the same loss; the U-Net and the
embedding have their own Adam learning rates. Known simplification: no prior-preservation loss (no
class images are generated or used), so the fine-tuned U-Net drifts towards the one image more than
the paper's. The text encoder stays frozen. `model_with_unet` puts the tuned U-Net into the model for
`generate`; such a concept's `base_fingerprint` is that of the tuned model.

Both methods, as personalize: the VAE posterior of the image is computed once, outside the step loop;
each step draws `batch_size` (VAE sample, noise, timestep) triples of the one image; a non-finite loss
stops tuning and the host raises `InputError`. The steps are a `lax.while_loop` that runs exactly the
requested number (no masked-out steps, no per-step select over the tuned weights: with a whole U-Net
and its Adam state in the loop, those selects would copy three U-Nets per step).

Bytes per concept (`concept_bytes`, float32): E4T stores w* and the low-rank offsets, textual
inversion w* only, DreamBooth a whole U-Net plus w*.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from e4t_jax.diffusion import schedule as schedule_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.objective import masked_mse
from e4t_jax.e4t import prompts as prompts_lib
from e4t_jax.errors import CheckpointError, DivergenceError, InputError
from e4t_jax.models.vae import AutoencoderKL, scale_latents
from e4t_jax.e4t.concept import Concept, fingerprint_info, model_fingerprint
from e4t_jax.personalize import prepare_image, tuning_prompt_ids
from e4t_jax.runtime import cost_stats, enable_compilation_cache

METHODS = ('e4t', 'textual_inversion', 'dreambooth')
_BYTES_PER_FLOAT32 = 4


# ----------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class TextualInversionConfig:
  """Textual inversion settings.

  Attributes:
    num_steps: the compiled maximum of tuning steps (a call may run fewer). 3000 as diffusers'
      textual-inversion example (the paper: 5000 at batch 4).
    learning_rate: Adam's step size for w*; 5e-3, the original implementation's base rate for the
      embedding (which it further scales by batch size and GPU count; diffusers' example: 2e-3).
    weight_decay: AdamW's decoupled weight decay on w* (0: plain Adam; the references: 1e-2).
    batch_size: (VAE sample, noise, timestep) draws of the one image per step.
    prompt: the default tuning caption ('{}' = the placeholder); None: the model's
      `E4TConfig.tuning_prompt`, as personalize.
  """
  num_steps: int = 3000
  learning_rate: float = 5e-3
  weight_decay: float = 0.0
  batch_size: int = 1
  prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class DreamBoothConfig:
  """DreamBooth-like fine-tuning settings.

  Attributes:
    num_steps: the compiled maximum of tuning steps (a call may run fewer). 400 as diffusers'
      DreamBooth example for one subject.
    learning_rate: Adam's step size for the U-Net. 5e-5, within the range used for small U-Nets
      (a smaller model tolerates a larger rate); for a full Stable Diffusion 1.x U-Net use diffusers'
      5e-6 (larger rates overfit the one image within a few hundred steps and, without prior
      preservation, forget the domain).
    embedding_learning_rate: Adam's step size for w* (jointly tuned, as "DreamBooth + TI"); textual
      inversion's 5e-3. 0 keeps w* at the coarse word's embedding (DreamBooth with the class noun).
    batch_size: (VAE sample, noise, timestep) draws of the one image per step.
    prompt: the default tuning caption ('{}' = the placeholder); None: the model's
      `E4TConfig.tuning_prompt`, as personalize.
  """
  num_steps: int = 400
  learning_rate: float = 5e-5
  embedding_learning_rate: float = 5e-3
  batch_size: int = 1
  prompt: str | None = None


def _check_config(config: TextualInversionConfig | DreamBoothConfig) -> None:
  if config.num_steps < 0:
    raise InputError(f'num_steps must be >= 0, got {config.num_steps}.')
  if config.batch_size < 1:
    raise InputError(f'batch_size must be >= 1, got {config.batch_size}.')
  rates = [config.learning_rate, getattr(config, 'embedding_learning_rate', 0.0),
           getattr(config, 'weight_decay', 0.0)]
  if not all(np.isfinite(r) and r >= 0 for r in rates):
    raise InputError(f'learning rates and weight decay must be finite and >= 0, got {rates}.')


# ----------------------------------------------------------------------------- the loss
def denoising_loss(modules: model_lib.E4TModules, unet_params: Any, text_params: Any, mean: jax.Array,
                   std: jax.Array, input_ids: jax.Array, w_star: jax.Array, key: jax.Array,
                   timesteps: jax.Array | None = None) -> jax.Array:
  """The standard diffusion loss of one image under a prompt with w* at the placeholder.

  Args:
    modules: the model's static parts.
    unet_params: the U-Net params (offsets already folded in, if any).
    text_params: the frozen text encoders' params (`prompts.text_params_of`: both for SDXL).
    mean, std: the image's VAE posterior, [1, h, w, c] (VAE latent space, before scaling).
    input_ids: [batch, tokens] int32 prompts containing the placeholder.
    w_star: [width] the placeholder's embedding (SDXL: both encoders' parts, side by side).
    key: draws the VAE samples, the noise and (unless given) the timesteps, one per prompt row.
    timesteps: int32 [batch] fixed timesteps (evaluation), or None to sample them uniformly.
  Returns:
    The mean squared error between the U-Net's output and its training target (ε for ε-models).
  """
  batch = input_ids.shape[0]
  k_vae, k_noise, k_t = jax.random.split(key, 3)
  shape = (batch,) + mean.shape[1:]
  sample = mean + std * jax.random.normal(k_vae, shape, mean.dtype)
  latents = scale_latents(modules.vae.config, sample)
  noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
  if timesteps is None:
    timesteps = schedule_lib.sample_timesteps(k_t, batch, modules.schedule)
  noisy = schedule_lib.add_noise(modules.schedule, latents, noise, timesteps)
  context = prompts_lib.text_condition(modules, text_params, input_ids, w_star)
  prediction = modules.unet.apply({'params': unet_params}, noisy, timesteps, context)
  return masked_mse(prediction, schedule_lib.training_target(modules.schedule, latents, noise, timesteps))


def _posterior(modules: model_lib.E4TModules, vae_params: Any, image: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[S, S, 3] image in [0, 1] -> the VAE posterior's (mean, std), [1, h, w, c], without gradients."""
  posterior = modules.vae.apply({'params': vae_params}, image[None] * 2.0 - 1.0, method=AutoencoderKL.encode)
  return jax.lax.stop_gradient(posterior.mean), jax.lax.stop_gradient(posterior.std)


# ----------------------------------------------------------------------------- the tuning program
def _tuning_program(modules: model_lib.E4TModules, max_steps: int,
                    make_optimizer: Callable[[dict], optax.GradientTransformation], train_unet: bool) -> Callable:
  """The pure function compiled by `make_textual_inversion_fn` / `make_dreambooth_fn` (one concept).

  Args of the returned function: params {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']}, image [S, S, 3] in [0, 1],
  rng (a PRNG key), num_steps (int32 [], <= max_steps), prompt_ids [batch, tokens] int32, rates (the
  optimizer's hyperparameters as float32 scalars, `make_optimizer`'s argument: run-time values, so every
  learning rate runs on one executable).
  Returns: (trainable {'embedding'[, 'unet']}, losses [max_steps] (NaN where not run), steps run,
  healthy (False when a non-finite loss stopped tuning)).
  """

  def program(params, image, rng, num_steps, prompt_ids, rates):
    optimizer = make_optimizer(rates)
    mean, std = _posterior(modules, params['vae'], image)  # once, outside the step loop
    trainable = {'embedding': prompts_lib.coarse_embedding(modules, params)}
    if train_unet:
      trainable['unet'] = params['unet']

    def loss_fn(trainable, key):
      unet_params = trainable['unet'] if train_unet else params['unet']
      return denoising_loss(modules, unet_params, prompts_lib.text_params_of(params), mean, std, prompt_ids,
                            trainable['embedding'], key)

    def run(state):
      i, trainable, opt_state, losses, _ = state
      loss, grads = jax.value_and_grad(loss_fn)(trainable, jax.random.fold_in(rng, i))
      updates, opt_state = optimizer.update(grads, opt_state, trainable)
      loss = loss.astype(jnp.float32)
      return i + 1, optax.apply_updates(trainable, updates), opt_state, losses.at[i].set(loss), jnp.isfinite(loss)

    # Runs exactly `num_steps` steps, or stops after the first non-finite loss; the host then raises
    # (the state after that step is never returned as a concept, so it is not rolled back).
    steps = jnp.minimum(num_steps, max_steps)
    init = (jnp.int32(0), trainable, optimizer.init(trainable), jnp.full((max_steps,), jnp.nan, jnp.float32),
            jnp.array(True))
    _, trainable, _, losses, healthy = jax.lax.while_loop(lambda s: jnp.logical_and(s[0] < steps, s[4]), run, init)
    return trainable, losses, steps, healthy

  return program


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def _sd_params(params: dict) -> dict:
  return {'unet': params['unet'], 'vae': params['vae'], **prompts_lib.text_params_of(params)}


def _rates(config: Any, fields: Sequence[str]) -> dict[str, np.ndarray]:
  """The program's `rates` argument: `config`'s optimizer hyperparameters `fields` as float32 scalars."""
  return {name: np.float32(getattr(config, name)) for name in fields}


def _compile(model: model_lib.E4TModel, program: Callable, batch_size: int, rate_fields: Sequence[str]) -> Any:
  size = model.modules.image_size
  tokens = model.modules.tokenize(['']).shape[1]
  return jax.jit(program).lower(
      _abstract(_sd_params(model.params)), jax.ShapeDtypeStruct((size, size, 3), jnp.float32),
      jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct((batch_size, tokens), jnp.int32),
      {name: jax.ShapeDtypeStruct((), jnp.float32) for name in rate_fields}).compile()


# ----------------------------------------------------------------------------- host side
def default_caption(modules: model_lib.E4TModules) -> str:
  """The model's default tuning caption (`E4TConfig.tuning_prompt`, as personalize uses)."""
  return getattr(modules.config, 'tuning_prompt', None) or 'a photo of {}'


def zero_offsets(model: model_lib.E4TModel) -> dict:
  """Weight offsets shaped like the model's, all zero: with them the U-Net is exactly the base one."""
  return jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), model.params['weight_offsets'])


def model_with_unet(model: model_lib.E4TModel, unet_params: Any) -> model_lib.E4TModel:
  """The same model with another U-Net (a DreamBooth-tuned one), for `generate`.

  Raises CheckpointError when `unet_params` does not have the model's U-Net's tree and shapes.
  """
  expected, given = _abstract(model.params['unet']), _abstract(unet_params)
  if jax.tree.structure(expected) != jax.tree.structure(given) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(given))):
    raise CheckpointError('the U-Net params do not fit this model (another architecture?); tune them with '
                          'this model.')
  return model_lib.E4TModel(model.modules, dict(model.params, unet=unet_params))


def concept_bytes(method: str, model: model_lib.E4TModel) -> int:
  """Bytes a concept of `method` takes for `model`, as float32 tensors (metadata and loss trace aside).

  'e4t': w* + the low-rank weight offsets; 'textual_inversion': w*; 'dreambooth': every U-Net weight
  + w*. `model` may be an `abstract_model` (shapes only).
  """
  if method not in METHODS:
    raise InputError(f'method {method!r} is not one of {METHODS}.')
  count = lambda tree: sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
  embedding = model.modules.text_encoder.config.hidden_size
  extra = {'e4t': count(model.params['weight_offsets']), 'textual_inversion': 0,
           'dreambooth': count(model.params['unet'])}[method]
  return (embedding + extra) * _BYTES_PER_FLOAT32


class _BaselineFn:
  """The shared host side of a compiled baseline (see `make_textual_inversion_fn`)."""
  method = ''
  rate_fields: tuple[str, ...] = ()  # the config's optimizer hyperparameters, passed at run time

  def __init__(self, model: model_lib.E4TModel, config: Any, compiled: Any):
    self.model, self.config, self.compiled = model, config, compiled
    self.fingerprint = model_fingerprint(model)
    self._zero_offsets = zero_offsets(model)
    self._default_key = jax.random.key(0)

  def _run(self, params: Any, image: Any, rng: jax.Array | None, num_steps: int | None,
           prompt: str | Sequence[str] | None) -> tuple[dict, Any, Any, dict[str, str]]:
    steps = self.config.num_steps if num_steps is None else int(num_steps)
    if not 0 <= steps <= self.config.num_steps:
      raise InputError(f'num_steps={steps}: this function was compiled for at most {self.config.num_steps} steps.')
    if prompt is None:
      prompt = default_caption(self.model.modules) if self.config.prompt is None else self.config.prompt
    ids = tuning_prompt_ids(self.model.modules, prompt, self.config.batch_size)
    pixels = prepare_image(image, self.model.modules.image_size)
    key = self._default_key if rng is None else rng
    trainable, losses, steps_run, healthy = self.compiled(_sd_params(params), pixels, key, np.int32(steps), ids,
                                                          _rates(self.config, self.rate_fields))
    if not bool(healthy):
      raise DivergenceError(f'{self.method} produced a non-finite loss (NaN/inf); lower the learning rate or check '
                       'the model weights. The concept was not saved.')
    m = self.model.modules
    caption = prompt if isinstance(prompt, str) else prompt[0]
    metadata = {
        'method': self.method, 'placeholder': m.config.placeholder, 'coarse_word': m.config.coarse_word,
        **fingerprint_info(self.model, self.fingerprint), 'offsets_mode': m.config.offsets.mode, 'max_steps': str(self.config.num_steps), 'steps': str(steps),
        'learning_rate': repr(self.config.learning_rate), 'batch_size': str(self.config.batch_size),
        'prompt': caption.replace('{}', m.config.placeholder),
    }
    if getattr(self.config, 'weight_decay', 0.0):
      metadata['weight_decay'] = repr(self.config.weight_decay)
    return trainable, losses, steps_run, metadata

  def cost_analysis(self) -> dict:
    return cost_stats(self.compiled)

  def memory_analysis(self) -> Any:
    return self.compiled.memory_analysis()


class TextualInversionFn(_BaselineFn):
  """The compiled textual inversion (see `make_textual_inversion_fn`)."""
  method = 'textual_inversion'
  rate_fields = ('learning_rate', 'weight_decay')

  def __call__(self, params: Any, image: Any, rng: jax.Array | None = None, num_steps: int | None = None,
               prompt: str | Sequence[str] | None = None) -> Concept:
    """Learns w* for `image` (HxWx3 uint8 / float in [0, 1], or a path).

    Args:
      params: the model's params (only 'unet', 'vae' and 'text_encoder' are read).
      image: the concept image.
      rng: PRNG key of the noise draws (default key 0).
      num_steps: steps to run, at most the compiled maximum (default: the maximum).
      prompt: the tuning caption(s) ('{}' = the placeholder); default the config's, else the model's.
    Returns:
      A `Concept` with the learned w*, zero weight offsets and metadata method='textual_inversion'.
    Raises:
      InputError: a bad image, step count or caption, or a non-finite loss.
    """
    trainable, losses, steps_run, metadata = self._run(params, image, rng, num_steps, prompt)
    return Concept(embedding=trainable['embedding'], weight_offsets=self._zero_offsets, loss_trace=losses,
                   steps=steps_run, metadata=tuple(sorted(metadata.items())))


class DreamBoothFn(_BaselineFn):
  """The compiled DreamBooth-like fine-tuning (see `make_dreambooth_fn`)."""
  method = 'dreambooth'
  rate_fields = ('learning_rate', 'embedding_learning_rate')

  def __call__(self, params: Any, image: Any, rng: jax.Array | None = None, num_steps: int | None = None,
               prompt: str | Sequence[str] | None = None) -> tuple[dict, Concept]:
    """Fine-tunes the U-Net and w* on `image`; arguments as `TextualInversionFn.__call__`.

    Returns:
      (unet_params, concept): the tuned U-Net params and a `Concept` with the learned w* and zero
      weight offsets, whose base_fingerprint is the tuned model's (render it with
      `generate(model_with_unet(model, unet_params), concept, prompts)`); 'source_fingerprint' names
      the model it was tuned from.
    """
    trainable, losses, steps_run, metadata = self._run(params, image, rng, num_steps, prompt)
    unet_params = trainable['unet']
    metadata.update(source_fingerprint=metadata['base_fingerprint'],
                    base_fingerprint=model_fingerprint(model_with_unet(self.model, unet_params)),
                    embedding_learning_rate=repr(self.config.embedding_learning_rate))
    concept = Concept(embedding=trainable['embedding'], weight_offsets=self._zero_offsets, loss_trace=losses,
                      steps=steps_run, metadata=tuple(sorted(metadata.items())))
    return unet_params, concept


def make_textual_inversion_fn(model: model_lib.E4TModel, num_steps: int | None = None, *,
                              config: TextualInversionConfig | None = None,
                              cache_dir: str | os.PathLike | None = None) -> TextualInversionFn:
  """Lowers and compiles textual inversion once (AOT) for `model`'s shapes.

  Args:
    model: the E4T model; its base U-Net (without weight offsets) and text encoder are used.
    num_steps: the compiled maximum of steps (default `config.num_steps`); a call may run fewer.
    config: learning rate, draws per step and default caption (`TextualInversionConfig`).
    cache_dir: a persistent XLA compilation cache folder (process-wide), as `make_personalize_fn`.
  Returns:
    `ti_fn(params, image, rng=None, num_steps=None, prompt=None) -> Concept`; new images, keys, step
    counts and captions never compile again.
  """
  config = _prepare(config or TextualInversionConfig(), num_steps, cache_dir)
  program = _tuning_program(model.modules, config.num_steps,
                            lambda r: optax.adamw(r['learning_rate'], weight_decay=r['weight_decay']), train_unet=False)
  return TextualInversionFn(model, config, _compile(model, program, config.batch_size, TextualInversionFn.rate_fields))


def _prepare(config, num_steps: int | None, cache_dir: str | os.PathLike | None):
  """The baseline config with `num_steps` applied and checked; the compilation cache switched on."""
  if num_steps is not None:
    config = dataclasses.replace(config, num_steps=int(num_steps))
  _check_config(config)
  if cache_dir is not None:
    enable_compilation_cache(cache_dir)
  return config


def make_dreambooth_fn(model: model_lib.E4TModel, num_steps: int | None = None, *,
                       config: DreamBoothConfig | None = None,
                       cache_dir: str | os.PathLike | None = None) -> DreamBoothFn:
  """Lowers and compiles DreamBooth-like fine-tuning once (AOT) for `model`'s shapes.

  Args:
    model: the E4T model; its base U-Net (without weight offsets) is fine-tuned, whole.
    num_steps: the compiled maximum of steps (default `config.num_steps`); a call may run fewer.
    config: learning rates, draws per step and default caption (`DreamBoothConfig`).
    cache_dir: a persistent XLA compilation cache folder (process-wide), as `make_personalize_fn`.
  Returns:
    `db_fn(params, image, rng=None, num_steps=None, prompt=None) -> (unet_params, Concept)`; new
    images, keys, step counts and captions never compile again.
  """
  config = _prepare(config or DreamBoothConfig(), num_steps, cache_dir)
  program = _tuning_program(model.modules, config.num_steps, lambda r: optax.multi_transform(
      {'embedding': optax.adam(r['embedding_learning_rate']), 'unet': optax.adam(r['learning_rate'])},
      {'embedding': 'embedding', 'unet': 'unet'}), train_unet=True)
  return DreamBoothFn(model, config, _compile(model, program, config.batch_size, DreamBoothFn.rate_fields))


# ----------------------------------------------------------------------------- evaluation
_EVAL_PROGRAMS: dict[int, tuple[Any, Any]] = {}


def _eval_program(modules: model_lib.E4TModules) -> Any:
  cached = _EVAL_PROGRAMS.get(id(modules))
  if cached is not None and cached[0] is modules:  # the entry keeps `modules` alive: ids cannot be reused
    return cached[1]

  def program(params, offsets, image, ids, w_star, key, timesteps):
    mean, std = _posterior(modules, params['vae'], image)
    unet_params = offsets_lib.merge_offsets(params['unet'], offsets, modules.config.offsets.mode)
    return denoising_loss(modules, unet_params, prompts_lib.text_params_of(params), mean, std, ids, w_star, key,
                          timesteps)

  fn = jax.jit(program)
  if len(_EVAL_PROGRAMS) >= 4:
    _EVAL_PROGRAMS.pop(next(iter(_EVAL_PROGRAMS)))
  _EVAL_PROGRAMS[id(modules)] = (modules, fn)
  return fn


def fixed_noise_loss(model: model_lib.E4TModel, image: Any, concept: Concept | np.ndarray | jax.Array, *,
                     prompt: str | None = None, seed: int = 0, num_draws: int = 8) -> float:
  """The diffusion loss of `image` with `concept` at fixed noise: comparable across methods and runs.

  Args:
    model: the model (for DreamBooth, `model_with_unet(model, unet_params)`).
    image: the concept image (as personalize takes it).
    concept: a `Concept` (its w* and weight offsets, merged in the model's offsets mode), or a bare
      [width] embedding (no offsets).
    prompt: the caption ('{}' = the placeholder); default the model's `E4TConfig.tuning_prompt`.
    seed: seeds the VAE samples and the noise.
    num_draws: draws at timesteps spread evenly over the schedule, (i + 0.5) T / num_draws.
  Returns:
    The mean squared error, a float.
  """
  if num_draws < 1:
    raise InputError(f'num_draws must be >= 1, got {num_draws}.')
  m = model.modules
  if isinstance(concept, Concept):
    embedding = concept.embedding
    mode = concept.info.get('offsets_mode', m.config.offsets.mode)
    if mode != m.config.offsets.mode:
      raise InputError(f'the concept\'s offsets mode {mode!r} is not the model\'s {m.config.offsets.mode!r}.')
    offsets = concept.weight_offsets
  else:
    embedding, offsets = concept, zero_offsets(model)
  width = m.text_encoder.config.hidden_size
  if tuple(np.shape(embedding)) != (width,):
    raise InputError(f'embedding shape {tuple(np.shape(embedding))}, this model needs ({width},).')
  flat = traverse_util.flatten_dict(model.params['unet'])
  if any(tuple(path.split('/')) + ('kernel',) not in flat for path in offsets):
    raise CheckpointError('the concept\'s weight offsets do not fit this model\'s U-Net.')
  total = m.schedule.num_train_timesteps
  timesteps = ((np.arange(num_draws) + 0.5) * total / num_draws).astype(np.int32)
  ids = tuning_prompt_ids(m, default_caption(m) if prompt is None else prompt, num_draws)
  pixels = prepare_image(image, m.image_size)
  loss = _eval_program(m)(_sd_params(model.params), offsets, pixels, ids, jnp.asarray(embedding, jnp.float32),
                          jax.random.key(seed), timesteps)
  return float(loss)
