"""Text-to-image generation with personalized concepts, compiled once per shape.

    images = generate(model, concept, ['a photo of * as a knight', 'a watercolor of *'], seed=0)
    paths = save_images(images, 'out/', prompts, {'seed': 0, 'num_steps': 25})

One jitted program does everything between token ids and pixels: the text encoder with w* swapped in
at the placeholder (for the prompts and the negative prompts), the weight offsets folded into the
U-Net once, the sampler loop as one `lax.scan` with classifier-free guidance, the VAE decode and the
conversion to uint8. Everything that changes from call to call (params, concept embeddings and
offsets, prompt ids, seeds, guidance scale, DDIM's eta) is an array argument, so a new prompt, seed,
concept or guidance scale reuses the executable; only a new batch layout, resolution, step count or
sampler compiles again.

Several concepts in one batch: prompts are grouped by concept (C groups, padded to the largest group
B), each group gets its own w* and its own offsets, and the U-Net is `jax.vmap`-ed over the groups
with only the offset-targeted kernels batched ([C, in, out]); every other weight is shared. Prompts
without a concept get zero offsets and the coarse word's embedding, so they share the same program.

Noise is per image: with `seed=s`, image i starts from `jax.random.key(s + i)`, so an image can be
reproduced on its own (`seed=s + i`, one prompt) whatever batch it was made in (DDIM with eta > 0
adds per-step noise drawn for the whole batch, so there only the batch as a whole is reproducible).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e4t_jax.data import images as images_lib
from e4t_jax.diffusion import samplers as samplers_lib
from e4t_jax.diffusion.schedule import NoiseSchedule
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.concept import Concept
from e4t_jax.e4t.encoder import placeholder_embedding
from e4t_jax.e4t import prompts as prompts_lib
from e4t_jax.errors import ConfigError, DivergenceError, E4TWarning, InputError
from e4t_jax.fileio import atomic_write_bytes
from e4t_jax.limits import MAX_SEED
from e4t_jax.models import unet as unet_lib
from e4t_jax.models.vae import decode_latents

# Generators kept alive per (modules, scheduler config); each holds its compiled programs.
_MAX_CACHED_GENERATORS = 4


class GenerationWarning(E4TWarning):
  """A prompt that will not render as the user probably meant (no placeholder, truncated)."""


# ----------------------------------------------------------------------------- the program
@dataclasses.dataclass(frozen=True)
class _ProgramKey:
  """What one compiled program is specialized on besides array shapes (jit handles those)."""
  latent_height: int
  latent_width: int
  num_steps: int
  sampler: samplers_lib.SamplerConfig
  stochastic: bool          # DDIM with eta != 0: per-step noise (eta becomes an array argument)
  offsets_mode: str
  per_step: bool = False    # the concept read at every denoising step (one concept group; `tuned` argument)


ENCODER_MODES = ('averaged', 'per_step')


def _sampling_program(modules: model_lib.E4TModules, key: _ProgramKey, timesteps: np.ndarray):
  """The pure function `Generator` jits: token ids + concepts -> uint8 images.

  Args of the returned function:
    unet_params, vae_params, text_params: the frozen Stable Diffusion params (text_params:
      `prompts.text_params_of`, both encoders' for SDXL).
    embeddings: [C, width] w* of each concept group (the coarse word's embedding for no concept).
    offsets: {kernel path: {'down': [C, in, r], 'up': [C, r, out]}} (zeros for a group without a concept).
    prompt_ids, negative_ids: [C, B, tokens] int32.
    seeds: [C, B] uint32, the initial noise seed of each slot.
    guidance_scale: float32 [].
    eta: float32 [] (DDIM only; ignored unless `key.stochastic`).
    tuned: a `TunedEncoder` when `key.per_step` (C = 1): at every step the encoder reads the image's CLIP
      features and the pass-1 U-Net's contracting path on the current noisy latents, and its w*(t) goes
      into the conditional prompts (the paper's generation); the unconditional half keeps `embeddings`.
  Returns:
    uint8 [C, B, H, W, 3].
  """
  unet, vae = modules.unet, modules.vae
  latent_shape = (key.latent_height, key.latent_width, unet.config.in_channels)
  image_size = (key.latent_height * vae.config.downsample_factor, key.latent_width * vae.config.downsample_factor)

  def program(unet_params, vae_params, text_params, embeddings, offsets, prompt_ids, negative_ids, seeds,
              guidance_scale, eta, tuned=None, time_ids=None):
    num_groups, group_size, num_tokens = prompt_ids.shape

    # Text states for both CFG halves, with each group's w* at its placeholder positions.
    w_star = jnp.repeat(embeddings, group_size, axis=0)  # [C * B, width]

    def encode(ids, negative=False):  # [C, B, T] -> [C, B, T, D] (SDXL: an SDXLContext of [C, B, ...] leaves)
      flat_ids = ids.reshape(-1, num_tokens)
      context = prompts_lib.text_condition(modules, text_params, flat_ids, w_star, image_size, time_ids)
      if negative:
        context = prompts_lib.zero_empty_negatives(modules, context, flat_ids)
      return jax.tree.map(lambda x: x.reshape(num_groups, group_size, *x.shape[1:]), context)

    cond_context, uncond_context = encode(prompt_ids), encode(negative_ids, negative=True)
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)

    # Fold each group's offsets into its copies of the targeted kernels, once, outside the loop.
    flat_unet = traverse_util.flatten_dict(unet_params)
    kernel_key = lambda path: tuple(path.split('/')) + ('kernel',)
    targets = traverse_util.unflatten_dict({kernel_key(path): flat_unet[kernel_key(path)] for path in offsets})
    merged = {}  # {kernel key: [C, in, out]}
    if offsets:
      merged = jax.vmap(lambda group_offsets: traverse_util.flatten_dict(
          offsets_lib.merge_offsets(targets, group_offsets, key.offsets_mode)))(offsets)

    def group_denoise(group_kernels, x_t, t, cond, uncond):
      flat = dict(flat_unet)
      flat.update(group_kernels)
      params = traverse_util.unflatten_dict(flat)
      model_fn = lambda x, step, context: unet.apply({'params': params}, x, step, context)
      return samplers_lib.guided_denoise_fn(model_fn, cond, uncond, guidance_scale)(x_t, t)

    def per_step_context(x_t, t):  # x_t: [B, h, w, c] of the one group -> its text states with w*(t)
      batch = x_t.shape[0]
      timesteps = jnp.broadcast_to(jnp.asarray(t), (batch,))
      coarse = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:]), tuned.coarse_context)
      pass1 = unet_params if tuned.unet is None else tuned.unet
      features = unet.apply({'params': pass1}, x_t, timesteps, coarse, features_only=True)
      clip_states = tuple(jnp.broadcast_to(h, (batch,) + h.shape[1:]) for h in tuned.clip_hidden_states)
      offset = modules.encoder.apply({'params': tuned.encoder}, clip_states, features)  # f(t): [B, width]
      w_t = placeholder_embedding(prompts_lib.coarse_embedding(modules, text_params), offset,
                                  modules.config.embedding_scale)
      return prompts_lib.text_condition(modules, text_params, prompt_ids[0], w_t, image_size, time_ids)

    def denoise(x_t, t):  # x_t: [C * B, h, w, c]
      grouped = x_t.reshape(num_groups, group_size, *x_t.shape[1:])
      if num_groups == 1:  # the common case (and always per_step's): no vmap, plain [B, ...] U-Net calls
        cond = per_step_context(grouped[0], t) if key.per_step else first(cond_context)
        out = group_denoise(first(merged), grouped[0], t, cond, first(uncond_context))[None]
      else:
        out = jax.vmap(group_denoise, in_axes=(0, 0, None, 0, 0))(merged, grouped, t, cond_context, uncond_context)
      return out.reshape(x_t.shape)

    flat_seeds = seeds.reshape(-1)
    latents = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), latent_shape, jnp.float32))(flat_seeds)
    if key.stochastic:
      # DDIM's per-step noise: one stream for the whole batch, seeded by its first image.
      latents = samplers_lib.sample(denoise, modules.schedule, latents, timesteps, key.sampler,
                                    jax.random.fold_in(jax.random.key(flat_seeds[0]), 1), eta)
    else:
      latents = samplers_lib.sample(denoise, modules.schedule, latents, timesteps, key.sampler)
    images = decode_latents(vae, vae_params, latents)  # [C * B, H, W, 3] about [-1, 1]
    # As diffusers' postprocessing: [-1, 1] -> [0, 1], clamp, * 255, round.
    pixels = jnp.round(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    return pixels.reshape(num_groups, group_size, *pixels.shape[1:])

  return program


def _tune_and_sample_program(modules: model_lib.E4TModules, tuning: Any, key: _ProgramKey, timesteps: np.ndarray):
  """Personalization and sampling as ONE pure function (`personalize_and_generate`): nothing leaves the
  device between them, and nothing is written."""
  from e4t_jax import personalize as personalize_lib  # pylint: disable=g-import-not-at-top
  tune = personalize_lib.tuning_program(modules, tuning)
  sample = _sampling_program(modules, key, timesteps)

  def program(params, image, rng, num_tuning_steps, tune_ids, prompt_ids, negative_ids, seeds, guidance_scale,
              eta, mask=None, time_ids=None, rates=None):
    w_star, offsets, _, _, healthy, *tuned = tune(params, image, rng, num_tuning_steps, tune_ids, mask, rates)
    images = sample(params['unet'], params['vae'], prompts_lib.text_params_of(params), w_star[None],
                    jax.tree.map(lambda x: x[None], offsets), prompt_ids, negative_ids, seeds, guidance_scale, eta,
                    tuned[0] if tuned else None, time_ids=time_ids)
    return images, healthy

  return program


# ----------------------------------------------------------------------------- the generator
def image_seeds(seed: int | Sequence[int], count: int) -> list[int]:
  """The initial-noise seed of each image: `seed + i` for an int, or the given per-image seeds."""
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    seeds = [int(seed) + i for i in range(count)]
  else:
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
      raise InputError(f'{len(seeds)} seeds for {count} prompts; pass one seed or one per prompt.')
  bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
  if bad:
    raise InputError(f'seed {bad[0]} is outside [0, 2**32 - 1]; pick a smaller non-negative seed.')
  return seeds


def _as_list(value: str | Sequence[str], name: str) -> list[str]:
  values = [value] if isinstance(value, str) else list(value)
  for v in values:
    if not isinstance(v, str):
      raise InputError(f'{name} must be strings, got {type(v).__name__}.')
  return values


def _concept_mode(concept: Concept, default: str) -> str:
  return concept.info.get('offsets_mode', default)


class Generator:
  """Compiled generation programs of one model (see the module docstring); `generate` uses one.

  Args:
    modules: the model's static parts.
    scheduler_config: the diffusers scheduler_config.json dict the samplers read their settings from;
      defaults to Stable Diffusion 1.x's. Its noise schedule must be the model's.
  """

  def __init__(self, modules: model_lib.E4TModules, scheduler_config: Mapping[str, Any] | None = None):
    self.modules = modules
    self.scheduler_config = dict(modules.scheduler_config if scheduler_config is None else scheduler_config)
    given = NoiseSchedule.from_config(self.scheduler_config)
    if (given.num_train_timesteps != modules.schedule.num_train_timesteps
        or given.prediction_type != modules.schedule.prediction_type
        or not np.allclose(np.asarray(given.alphas_cumprod), np.asarray(modules.schedule.alphas_cumprod),
                           rtol=1e-6, atol=0)):
      raise ConfigError('scheduler_config describes another noise schedule than the model was trained with; '
                        "pass the model's own scheduler/scheduler_config.json.")
    self._programs: dict[_ProgramKey, Any] = {}
    self._tune_and_sample_programs: dict[tuple[Any, _ProgramKey], Any] = {}
    self._device_params: tuple[Any, tuple, dict] | None = None  # (host params, which names, device copy)

  def prompt_warnings(self, prompts: Sequence[str], concepts: Sequence[Concept | None],
                      negative_prompts: Sequence[str] = ()) -> list[str]:
    """One line per prompt that will not render as meant (what `generate` warns about)."""
    tokenizer, placeholder = self.modules.tokenizer, self.modules.config.placeholder
    lines = []
    for i, prompt in enumerate(negative_prompts):
      if tokenizer.is_truncated(prompt):
        lines.append(f'negative prompt {i} ({prompt[:40]!r}...) is longer than the text encoder\'s '
                     f'{tokenizer.model_max_length} tokens; the end is cut off.')
    for i, (prompt, concept) in enumerate(zip(prompts, concepts)):
      if tokenizer.is_truncated(prompt):
        lines.append(f'prompt {i} ({prompt[:40]!r}...) is longer than the text encoder\'s '
                     f'{tokenizer.model_max_length} tokens; the end is cut off.')
      ids = tokenizer([prompt])[0]
      has_placeholder = bool(np.any(ids == self.modules.placeholder_id))
      if concept is not None and not has_placeholder:
        lines.append(f'prompt {i} ({prompt[:40]!r}) has no placeholder {placeholder!r} (or it was cut off): '
                     'the concept\'s embedding is unused, only its weight offsets apply.')
      if concept is None and has_placeholder:
        lines.append(f'prompt {i} ({prompt[:40]!r}) uses the placeholder {placeholder!r} but no concept '
                     f'was given: it renders as the coarse word {self.modules.config.coarse_word!r}.')
    return lines

  def _program(self, key: _ProgramKey):
    program = self._programs.get(key)
    if program is None:
      timesteps = samplers_lib.make_timesteps(self.modules.schedule, key.num_steps, key.sampler)
      program = jax.jit(_sampling_program(self.modules, key, timesteps))
      self._programs[key] = program
    return program

  def _on_device(self, params: dict, names: Sequence[str] | None = None) -> dict:
    """Those params as device arrays (default: Stable Diffusion's, both text encoders for SDXL); host (numpy)
    params are copied once, not per call."""
    if names is None:
      names = ('unet', 'vae') + tuple(prompts_lib.text_params_of(params))
    needed = {name: params[name] for name in names}
    if all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(needed)):
      return needed
    names = tuple(names)
    if self._device_params is None or self._device_params[0] is not params or self._device_params[1] != names:
      # Keyed by identity and holding a reference: params trees are not mutated in place in JAX code.
      self._device_params = (params, names, jax.device_put(needed))
    return self._device_params[2]

  def personalize_and_generate(self, model: model_lib.E4TModel, image: Any, prompts: str | Sequence[str],
                               negative_prompts: str | Sequence[str] | None = None, *,
                               tuning: Any = None, num_tuning_steps: int = 5, tuning_prompt: str | None = None,
                               encoder: str = 'averaged', rng: jax.Array | None = None, num_steps: int = 25,
                               guidance_scale: float = 7.5, sampler: str | samplers_lib.SamplerConfig = 'dpmpp_2m',
                               seed: int | Sequence[int] = 0, eta: float = 0.0, height: int | None = None,
                               width: int | None = None, mask: Any = None, **size_conditioning) -> np.ndarray:
    """See `personalize_and_generate` (module level)."""
    from e4t_jax import personalize as personalize_lib  # pylint: disable=g-import-not-at-top
    if model.modules is not self.modules:
      raise ValueError('this Generator was built for another model; use personalize_and_generate().')
    m = self.modules
    if encoder not in ENCODER_MODES:
      raise InputError(f'encoder {encoder!r} is not one of {ENCODER_MODES}.')
    if isinstance(num_tuning_steps, bool) or not isinstance(num_tuning_steps, int) or num_tuning_steps < 0:
      raise InputError(f'num_tuning_steps must be an integer >= 0, got {num_tuning_steps!r}.')
    tuning = dataclasses.replace(tuning or personalize_lib.TuningConfig(), num_steps=num_tuning_steps,
                                 keep_encoder=encoder == 'per_step')
    settings = self.sampling_settings(prompts, negative_prompts, num_steps=num_steps,
                                      guidance_scale=guidance_scale, sampler=sampler, seed=seed, eta=eta,
                                      height=height, width=width, **size_conditioning)
    masked = personalize_lib.uses_loss_mask(m, tuning)
    if mask is not None and not masked:
      raise InputError('a mask was given but the tuning has no loss mask; pass tuning=TuningConfig(loss_mask=True).')
    pixels = personalize_lib.prepare_image(image, m.image_size)
    loss_mask = personalize_lib.prepare_mask(mask, m.image_size, image) if masked else None
    tune_ids = personalize_lib.tuning_ids(m, tuning, tuning_prompt)
    # Every prompt has the concept (any non-None entry says so).
    for line in self.prompt_warnings(settings['prompts'], [True] * len(settings['prompts']),
                                     settings['negative_prompts']):
      warnings.warn(line, GenerationWarning, stacklevel=3)
    mode = 'additive' if tuning.mode == 'paper' else m.config.offsets.mode
    key = dataclasses.replace(settings['key'], offsets_mode=mode, per_step=encoder == 'per_step')
    program_key = (personalize_lib.compile_key(tuning), key)  # the learning rates are arguments
    program = self._tune_and_sample_programs.get(program_key)
    if program is None:
      program = jax.jit(_tune_and_sample_program(m, program_key[0], key, samplers_lib.make_timesteps(
          m.schedule, key.num_steps, key.sampler)))
      self._tune_and_sample_programs[program_key] = program
    count = len(settings['prompts'])
    images, healthy = program(
        self._on_device(model.params, tuple(model.params)), pixels, jax.random.key(0) if rng is None else rng,
        np.int32(num_tuning_steps), tune_ids, m.tokenize(settings['prompts'])[None],
        m.tokenize(settings['negative_prompts'])[None], np.asarray(settings['seeds'], np.uint32).reshape(1, count),
        np.asarray(guidance_scale, np.float32), np.asarray(eta, np.float32), loss_mask, time_ids=settings['time_ids'],
        rates=personalize_lib.tuning_rates(tuning))
    if not bool(healthy):
      raise DivergenceError('tuning produced a non-finite loss (NaN/inf); lower the learning rate or check the model '
                       'weights.')
    return np.asarray(images)[0]

  def sampling_settings(self, prompts, negative_prompts, *, num_steps: int, guidance_scale: float, sampler,
                        seed, eta: float, height: int | None, width: int | None,
                        **size_conditioning) -> dict[str, Any]:
    """Checks the per-call sampling arguments (before any work): prompts, negative prompts, seeds, size,
    sampler, steps, guidance, eta, SDXL's size conditioning (`SIZE_CONDITIONING`). Returns them as lists,
    the `_ProgramKey` (for no concept) and 'time_ids' (SDXL: float32 [6]; else None)."""
    m = self.modules
    prompts = _as_list(prompts, 'prompts')
    if not prompts:
      raise InputError('no prompts given; pass at least one prompt.')
    count = len(prompts)
    if negative_prompts is None:
      negative_prompts = [''] * count
    negative_prompts = _as_list(negative_prompts, 'negative prompts')
    if len(negative_prompts) == 1 and count > 1:
      negative_prompts = negative_prompts * count
    if len(negative_prompts) != count:
      raise InputError(f'{len(negative_prompts)} negative prompts for {count} prompts; pass one or one per prompt.')
    seeds = image_seeds(seed, count)
    factor = m.vae.config.downsample_factor
    height = m.image_size if height is None else int(height)
    width = m.image_size if width is None else int(width)
    if height <= 0 or width <= 0 or height % factor or width % factor:
      raise InputError(f'height and width must be positive multiples of {factor} (the VAE\'s downsampling), '
                       f'got {height}x{width}.')
    if isinstance(sampler, samplers_lib.SamplerConfig):
      sampler_config = sampler
    else:
      sampler_config = samplers_lib.SamplerConfig.from_scheduler_config(sampler, self.scheduler_config)
    if not 1 <= num_steps <= m.schedule.num_train_timesteps:
      raise InputError(f'num_steps must be in [1, {m.schedule.num_train_timesteps}], got {num_steps}.')
    if eta and sampler_config.name != 'ddim':
      raise InputError(f'eta={eta} applies to the DDIM sampler only; use sampler="ddim" or eta=0.')
    if not np.isfinite(guidance_scale):
      raise InputError(f'guidance_scale must be a finite number, got {guidance_scale}.')
    key = _ProgramKey(latent_height=height // factor, latent_width=width // factor, num_steps=int(num_steps),
                      sampler=sampler_config, stochastic=bool(eta), offsets_mode=m.config.offsets.mode)
    return {'prompts': prompts, 'negative_prompts': negative_prompts, 'seeds': seeds, 'key': key,
            'time_ids': _time_ids(m, height, width, size_conditioning)}

  def generate(self, model: model_lib.E4TModel, concept: Concept | Sequence[Concept | None] | None,
               prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
               num_steps: int = 25, guidance_scale: float = 7.5,
               sampler: str | samplers_lib.SamplerConfig = 'dpmpp_2m', seed: int | Sequence[int] = 0,
               eta: float = 0.0, height: int | None = None, width: int | None = None,
               encoder: str = 'averaged', **size_conditioning) -> np.ndarray:
    """See `generate` (module level)."""
    if model.modules is not self.modules:
      raise ValueError('this Generator was built for another model; use generate() or a new Generator.')
    m = self.modules
    settings = self.sampling_settings(prompts, negative_prompts, num_steps=num_steps,
                                      guidance_scale=guidance_scale, sampler=sampler, seed=seed, eta=eta,
                                      height=height, width=width, **size_conditioning)
    prompts, negative_prompts, seeds = settings['prompts'], settings['negative_prompts'], settings['seeds']
    count = len(prompts)
    if concept is None or isinstance(concept, Concept):
      concepts = [concept] * count
    else:
      concepts = list(concept)
      if len(concepts) != count:
        raise InputError(f'{len(concepts)} concepts for {count} prompts; pass one concept or one per prompt.')
      for c in concepts:
        if c is not None and not isinstance(c, Concept):
          raise InputError(f'a concept must be a Concept (see Concept.load), got {type(c).__name__}.')
    if encoder not in ENCODER_MODES:
      raise InputError(f'encoder {encoder!r} is not one of {ENCODER_MODES}.')
    per_step = encoder == 'per_step'
    if per_step and (concepts[0] is None or any(c is not concepts[0] for c in concepts)
                     or concepts[0].tuned_encoder is None):
      raise InputError("encoder='per_step' reads one concept's tuned encoder at every denoising step: pass one "
                       'concept from a personalize_fn compiled with TuningConfig(keep_encoder=True) (a saved '
                       "concept keeps only the averaged w*), or use e4t_jax.personalize_and_generate.")

    # Concepts: checked, then grouped (first-appearance order) and stacked.
    present = [c for c in concepts if c is not None]
    checked: set[int] = set()
    for i, c in enumerate(concepts):
      if c is not None and id(c) not in checked:
        c.check_compatible(model, source=f'concept of prompt {i}')  # names the concept's file when it has one
        checked.add(id(c))
    modes = {_concept_mode(c, m.config.offsets.mode) for c in present}
    if len(modes) > 1:
      raise InputError(f'the concepts mix weight-offset modes {sorted(modes)}; generate them in separate calls.')
    mode = modes.pop() if modes else m.config.offsets.mode
    structures = {tuple(sorted((p, np.shape(v['down']), np.shape(v['up'])) for p, v in c.weight_offsets.items()))
                  for c in present}
    if len(structures) > 1:
      raise InputError('the concepts have different weight offsets (targets or rank); generate them in '
                       'separate calls.')

    for line in self.prompt_warnings(prompts, concepts, negative_prompts):
      warnings.warn(line, GenerationWarning, stacklevel=3)

    groups: dict[int, list[int]] = collections.OrderedDict()
    for i, c in enumerate(concepts):
      groups.setdefault(id(c), []).append(i)
    group_concepts = [concepts[members[0]] for members in groups.values()]
    group_size = max(len(members) for members in groups.values())
    # Each group padded to B slots by repeating its first prompt (those images are dropped).
    slots = [members + [members[0]] * (group_size - len(members)) for members in groups.values()]  # [C][B]

    prompt_ids = m.tokenize(prompts)
    negative_ids = m.tokenize(negative_prompts)
    slot_index = np.asarray(slots, np.int64)  # [C, B]
    coarse = np.asarray(prompts_lib.coarse_embedding(m, model.params), np.float32)
    embeddings = np.stack([coarse if c is None else np.asarray(c.embedding, np.float32) for c in group_concepts])
    # Groups without a concept get zero offsets shaped like the concepts' (or the model's own), so that
    # plain and personalized prompts share one program: W + 0 and W ⊙ (1 + 0) are both W.
    template = next((c.weight_offsets for c in present), model.params.get('weight_offsets', {}))
    offsets = {}
    for path, pair in template.items():
      offsets[path] = {}
      for name in ('down', 'up'):
        offsets[path][name] = np.stack([np.zeros(np.shape(pair[name]), np.float32) if c is None
                                        else np.asarray(c.weight_offsets[path][name], np.float32)
                                        for c in group_concepts])

    key = dataclasses.replace(settings['key'], offsets_mode=mode, per_step=per_step)
    program = self._program(key)
    params = self._on_device(model.params)
    images = program(params['unet'], params['vae'], prompts_lib.text_params_of(params), embeddings,
                     offsets, prompt_ids[slot_index], negative_ids[slot_index],
                     np.asarray(seeds, np.uint32)[slot_index], np.asarray(guidance_scale, np.float32),
                     np.asarray(eta, np.float32), concepts[0].tuned_encoder if per_step else None,
                     time_ids=settings['time_ids'])
    images = np.asarray(images)  # [C, B, H, W, 3]
    out = np.empty((count,) + images.shape[2:], np.uint8)
    for group, members in enumerate(groups.values()):
      out[members] = images[group, :len(members)]
    return out


_GENERATORS: collections.OrderedDict = collections.OrderedDict()


def get_generator(modules: model_lib.E4TModules, scheduler_config: Mapping[str, Any] | None = None) -> Generator:
  """The cached `Generator` of `modules` (and scheduler config); built on first use."""
  config_key = json.dumps(scheduler_config, sort_keys=True, default=str) if scheduler_config is not None else None
  cache_key = (id(modules), config_key)
  entry = _GENERATORS.get(cache_key)
  # The entry keeps `modules` alive, so its id cannot be reused by another object while cached.
  if entry is not None and entry.modules is modules:
    _GENERATORS.move_to_end(cache_key)
    return entry
  generator = Generator(modules, scheduler_config)
  _GENERATORS[cache_key] = generator
  while len(_GENERATORS) > _MAX_CACHED_GENERATORS:
    _GENERATORS.popitem(last=False)
  return generator


def generate(model: model_lib.E4TModel, concept: Concept | Sequence[Concept | None] | None,
             prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *,
             num_steps: int = 25, guidance_scale: float = 7.5,
             sampler: str | samplers_lib.SamplerConfig = 'dpmpp_2m', seed: int | Sequence[int] = 0,
             eta: float = 0.0, height: int | None = None, width: int | None = None,
             scheduler_config: Mapping[str, Any] | None = None, encoder: str = 'averaged',
             original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] | None = None,
             target_size: tuple[int, int] | None = None) -> np.ndarray:
  """Generates one image per prompt.

  Args:
    model: the E4T model (its Stable Diffusion part does the drawing).
    concept: None (the plain model), a `Concept` for every prompt, or a list with one `Concept` (or
      None) per prompt; each prompt's placeholder gets its concept's w* and its U-Net its offsets.
    prompts: the prompts; write the concept as the model's placeholder (e.g. 'a photo of *').
    negative_prompts: the unconditional half of classifier-free guidance: one for all, or one per
      prompt; default '' (as diffusers).
    num_steps: sampler steps.
    guidance_scale: classifier-free guidance weight (an array argument: changing it never recompiles).
    sampler: 'dpmpp_2m' or 'ddim' (configured by `scheduler_config`), or a `SamplerConfig`.
    seed: image i starts from noise seeded `seed + i`; or a list with one seed per prompt.
    eta: DDIM's noise weight (0 = deterministic).
    height, width: output size in pixels (multiples of the VAE's factor); default the model's.
    scheduler_config: the diffusers scheduler_config.json dict of the base model; default Stable
      Diffusion 1.x's (`E4TModules` does not keep it).
    encoder: 'averaged' (default): the concept's stored w*, one vector for every step; 'per_step' (the
      paper's): the tuned encoder re-reads the concept at every denoising step from the current noisy
      latents (one concept for all prompts, tuned with `TuningConfig(keep_encoder=True)`).
    original_size, crops_coords_top_left, target_size: SDXL's size conditioning, (height, width) /
      (top, left) pixels as diffusers' pipeline takes them; default (height, width), (0, 0), (height, width).
      An array argument: changing it never recompiles. SD 1.x/2.x models refuse them.
  Returns:
    uint8 [len(prompts), height, width, 3].
  Raises:
    InputError: unusable prompts, seeds, sizes or settings.
    CheckpointError: a concept made for another model.
    ConfigError: a scheduler_config whose noise schedule is not the model's.
  Warns:
    GenerationWarning: a prompt without the placeholder while a concept is given, the placeholder
      without a concept, or a prompt cut off at the text encoder's context (`Generator.prompt_warnings`
      returns the same lines without warning).
  """
  return get_generator(model.modules, scheduler_config).generate(
      model, concept, prompts, negative_prompts, num_steps=num_steps, guidance_scale=guidance_scale,
      sampler=sampler, seed=seed, eta=eta, height=height, width=width, encoder=encoder,
      **_given(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size))


def personalize_and_generate(model: model_lib.E4TModel, image: Any, prompts: str | Sequence[str],
                             negative_prompts: str | Sequence[str] | None = None, *, tuning: Any = None,
                             num_tuning_steps: int = 5, tuning_prompt: str | None = None, encoder: str = 'averaged',
                             rng: jax.Array | None = None, num_steps: int = 25, guidance_scale: float = 7.5,
                             sampler: str | samplers_lib.SamplerConfig = 'dpmpp_2m', seed: int | Sequence[int] = 0,
                             eta: float = 0.0, height: int | None = None, width: int | None = None,
                             scheduler_config: Mapping[str, Any] | None = None, mask: Any = None,
                             original_size: tuple[int, int] | None = None,
                             crops_coords_top_left: tuple[int, int] | None = None,
                             target_size: tuple[int, int] | None = None) -> np.ndarray:
  """Personalizes the model to `image` and renders `prompts` with the concept, in ONE compiled program (the
  paper's "no model saved per concept"): nothing is written and nothing leaves the device in between.

  `tuning` (a `TuningConfig`: lite or paper mode), `num_tuning_steps`, `tuning_prompt` and `rng` are those of
  `make_personalize_fn` / `personalize_fn`; `encoder` and the sampling arguments those of `generate`. The
  image, the key, the step count, the prompts, seeds and guidance are array arguments: a new image or prompt
  of the same shapes never compiles again. `mask` (with `TuningConfig(loss_mask=True)`): where the subject
  is, as `personalize_fn` takes it. `original_size`, `crops_coords_top_left`, `target_size`: SDXL's size
  conditioning, as for `generate`. Returns uint8 [len(prompts), height, width, 3].
  """
  return get_generator(model.modules, scheduler_config).personalize_and_generate(
      model, image, prompts, negative_prompts, tuning=tuning, num_tuning_steps=num_tuning_steps,
      tuning_prompt=tuning_prompt, encoder=encoder, rng=rng, num_steps=num_steps, guidance_scale=guidance_scale,
      sampler=sampler, seed=seed, eta=eta, height=height, width=width, mask=mask,
      **_given(original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size))


SIZE_CONDITIONING = ('original_size', 'crops_coords_top_left', 'target_size')


def _given(**values) -> dict:
  return {k: v for k, v in values.items() if v is not None}


def _time_ids(modules: model_lib.E4TModules, height: int, width: int, given: Mapping[str, Any]) -> np.ndarray | None:
  """SDXL's six size/crop values for `sampling_settings` (float32 [6]), checked; None for SD 1.x/2.x."""
  unknown = sorted(set(given) - set(SIZE_CONDITIONING))
  if unknown:
    raise TypeError(f'unexpected keyword argument(s) {unknown}; the size conditioning is {SIZE_CONDITIONING}.')
  if modules.text_encoder_2 is None:
    if given:
      raise InputError(f'{sorted(given)}: SDXL\'s size conditioning; this model is Stable Diffusion 1.x/2.x, '
                       'whose U-Net takes none.')
    return None
  values = {'original_size': (height, width), 'crops_coords_top_left': (0, 0), 'target_size': (height, width),
            **given}
  for name in SIZE_CONDITIONING:
    pair = values[name]
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 1 << 16 for v in pair)
    if not ok:
      raise InputError(f'{name} must be two integers in [0, 65536] (pixels), got {pair!r}.')
  return unet_lib.sdxl_time_ids(*(tuple(int(v) for v in values[name]) for name in SIZE_CONDITIONING))[0]


# ----------------------------------------------------------------------------- files
_LABEL_PADDING = 2
_LABEL_LINES = 2


def _wrap_label(text: str, font, max_width: int, max_lines: int) -> list[str]:
  """Greedy character wrap to `max_width` pixels; the last line ends in '…' when text is left over."""
  lines, current = [], ''
  for char in text:
    if font.getlength(current + char) <= max_width:
      current += char
      continue
    lines.append(current)
    current = char.lstrip()
    if len(lines) == max_lines:
      last = lines[-1]
      while last and font.getlength(last + '…') > max_width:
        last = last[:-1]
      lines[-1] = last + '…'
      return lines
  if current:
    lines.append(current)
  return lines[:max_lines]


_MIN_GRID_TILE = 128


def make_grid(images: np.ndarray | Sequence[np.ndarray], labels: Sequence[str] | None = None,
              columns: int | None = None) -> np.ndarray:
  """Tiles images (uint8 [N, H, W, 3]) into rows of `columns` with a small text label under each.

  Args:
    images: N images of one size.
    labels: one caption per image (None: no label strip); drawn with PIL's default font, wrapped to
      the image width over at most two lines.
    columns: images per row; default about √N.
  Returns:
    uint8 [rows * (H' + label), columns * W', 3] on a white background, where H', W' are the image
    size enlarged by the smallest integer factor that makes tiles at least 128 px.
  """
  from PIL import Image, ImageDraw, ImageFont
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
    raise InputError(f'make_grid needs uint8 images [N, H, W, 3], got {images.dtype} {images.shape}.')
  count, height, width = images.shape[:3]
  if labels is not None and len(labels) != count:
    raise InputError(f'{len(labels)} labels for {count} images; pass one label per image.')
  # Tiny images (the demo model renders 32 px) are enlarged by an integer factor (nearest neighbour)
  # to at least _MIN_GRID_TILE px, so the grid is readable and the labels fit.
  scale = max(1, -(-_MIN_GRID_TILE // max(height, width)))
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = height * scale, width * scale
  columns = columns or int(np.ceil(np.sqrt(count)))
  columns = max(1, min(columns, count))
  rows = -(-count // columns)
  font = ImageFont.load_default()
  line_height = font.getbbox('Ag')[3] + 1
  label_height = 0 if labels is None else _LABEL_LINES * line_height + 2 * _LABEL_PADDING
  tile_height = height + label_height
  canvas = Image.new('RGB', (columns * width, rows * tile_height), 'white')
  draw = ImageDraw.Draw(canvas)
  for i, image in enumerate(images):
    x, y = (i % columns) * width, (i // columns) * tile_height
    canvas.paste(Image.fromarray(image), (x, y))
    if labels is not None:
      lines = _wrap_label(str(labels[i]).replace('\n', ' '), font, width - 2 * _LABEL_PADDING, _LABEL_LINES)
      for j, line in enumerate(lines):
        draw.text((x + _LABEL_PADDING, y + height + _LABEL_PADDING + j * line_height), line, fill='black', font=font)
  return np.asarray(canvas)


def _slug(text: str, max_length: int = 40) -> str:
  slug = re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')[:max_length].strip('-')
  return slug or 'image'


def _image_stem(index: int, prompt: str, seeds: Sequence[int] | None) -> str:
  return f'{index:03d}-' + (f'{int(seeds[index])}-' if seeds is not None else '') + _slug(prompt)


def output_paths(out_dir: str | os.PathLike, prompts: Sequence[str], seed: int | None = None) -> list[Path]:
  """Every file `save_images(images, out_dir, prompts, {'seed': seed})` writes (PNG + JSON per image, then the
  grid), so a caller can check them before any work."""
  prompts = _as_list(prompts, 'prompts')
  seeds = image_seeds(seed, len(prompts)) if seed is not None else None
  out_dir = Path(out_dir)
  stems = [_image_stem(i, prompt, seeds) for i, prompt in enumerate(prompts)]
  return [out_dir / f'{stem}{suffix}' for stem in stems for suffix in ('.png', '.json')] + [out_dir / 'grid.png']


def save_images(images: np.ndarray, out_dir: str | os.PathLike, prompts: Sequence[str],
                settings: Mapping[str, Any] | None = None, *, negative_prompts: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None, grid_columns: int | None = None) -> list[Path]:
  """Writes each image as a PNG (prompt, seed and settings in its text chunks) with a JSON sidecar,
  and a labeled grid, every file atomically (a reader never sees a partial file).

  Files: `NNN-<seed>-<prompt-slug>.png` + `.json` per image, and `grid.png`; files of the same name
  from an earlier run are replaced.

  Args:
    images: uint8 [N, H, W, 3] (what `generate` returns).
    out_dir: the folder (created).
    prompts: the N prompts.
    settings: JSON-able generation settings (steps, guidance, sampler, concept, seed, ...).
    negative_prompts: one per image, if any.
    seeds: each image's noise seed; default `image_seeds(settings['seed'], N)` when settings has an
      int 'seed' (generate's convention), else none recorded.
    grid_columns: images per grid row (default about √N).
  Returns:
    The image paths in prompt order, then the grid's path.
  """
  images = np.asarray(images)
  prompts = _as_list(prompts, 'prompts')
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise InputError(f'save_images needs uint8 images [N, H, W, 3], got {images.dtype} {images.shape}.')
  if len(prompts) != len(images):
    raise InputError(f'{len(prompts)} prompts for {len(images)} images; pass one prompt per image.')
  settings = dict(settings or {})
  if negative_prompts is not None:
    negative_prompts = _as_list(negative_prompts, 'negative prompts')
    if len(negative_prompts) != len(images):
      raise InputError(f'{len(negative_prompts)} negative prompts for {len(images)} images.')
  if seeds is None and isinstance(settings.get('seed'), (int, np.integer)):
    seeds = image_seeds(int(settings['seed']), len(images))
  try:
    settings_json = json.dumps(settings, sort_keys=True)
  except TypeError as e:
    raise InputError(f'settings must be JSON-serializable ({e}).') from e
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, (image, prompt) in enumerate(zip(images, prompts)):
    record = {'prompt': prompt, 'index': i}
    if negative_prompts is not None:
      record['negative_prompt'] = negative_prompts[i]
    if seeds is not None:
      record['seed'] = int(seeds[i])
    stem = _image_stem(i, prompt, seeds)
    text = {k: str(v) for k, v in record.items()}
    text.update(settings=settings_json, software='e4t-jax')
    path = out_dir / f'{stem}.png'
    atomic_write_bytes(path, [images_lib.encode_png(image, text)])
    sidecar = dict(record, settings=settings, file=path.name, height=int(image.shape[0]),
                   width=int(image.shape[1]))
    atomic_write_bytes(out_dir / f'{stem}.json', [json.dumps(sidecar, indent=2, sort_keys=True).encode()])
    paths.append(path)
  labels = [f'{p} (seed {seeds[i]})' if seeds is not None else p for i, p in enumerate(prompts)]
  grid_path = out_dir / 'grid.png'
  atomic_write_bytes(grid_path, [images_lib.encode_png(make_grid(images, labels, grid_columns),
                                            {'prompts': json.dumps(prompts), 'settings': settings_json,
                                             'software': 'e4t-jax'})])
  paths.append(grid_path)
  return paths
