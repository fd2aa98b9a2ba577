"""`e4t eval`: the paper's claims in miniature, measured on the synthetic face domain.

Protocol (fixed seeds, the same for every method):
  * N held-out identities (never seen in any training stage; `synthetic.heldout_identities`);
  * identity i is shown to the method as ONE image, drawn in an input context (a random background,
    no accessory, large), together with that image's caption ('a {} on a red background');
  * the method's concept renders 4 prompts with new contexts (other backgrounds, accessories, sizes),
    25 DPM-Solver++ steps, guidance 4, the same seeds for every method;
  * every rendered image is scored by `e4t_jax.evaluate`: identity (fraction of the identity's visible
    attributes the read-out finds) and prompt fidelity (background measured from pixels, accessory and
    size by the read-out).
Wall time per concept is the tuning time after compilation (compilation is reported apart); bytes
per concept are what a concept needs on disk beyond the shared model (`baselines.concept_bytes`).

Results go to a JSON file, one entry per method, written after each method (a rerun skips the
methods already there).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from e4t_jax.fileio import atomic_write_bytes, read_json
from e4t_jax.data import synthetic
from e4t_jax.errors import InputError
from e4t_jax.progress import progress_bar

METHOD_KINDS = ('e4t', 'e4t_paper', 'textual_inversion', 'dreambooth')  # e4t: lite tuning; e4t_paper: the paper's
# Reference rows that calibrate the scores: 'truth' scores the generator's own renders of the true
# identity in the prompted contexts (the ceiling the read-out allows), 'coarse' renders the prompts with
# the coarse word instead of a concept (the domain model alone: no personalization at all),
# 'described' renders them with the identity put into words instead ("a small round lilac face with green
# dot eyes, ... on a blue background"): what the base model draws when told who it is, the ceiling of a
# concept that lives in one word embedding; 'reconstructed' scores the model's VAE round trip (encode, posterior
# mean, decode) of the 'truth' renders: the ceiling of anything drawn through this latent space.
REFERENCE_KINDS = ('truth', 'reconstructed', 'described', 'coarse')
_ALIASES = {'ti': 'textual_inversion', 'db': 'dreambooth', 'paper': 'e4t_paper', 'e4t_lite': 'e4t'}
DEFAULT_METHODS = ('e4t:0', 'e4t:5', 'e4t:15', 'textual_inversion:5', 'textual_inversion:500', 'dreambooth:5',
                   'dreambooth:200')
PROMPTS_PER_IDENTITY = 4
SAMPLING_STEPS = 25
GUIDANCE_SCALE = 4.0
GENERATE_CHUNK = 40


@dataclasses.dataclass(frozen=True)
class Case:
  """One held-out identity: its input image's context and the contexts it is rendered in."""
  identity: synthetic.Identity
  input_context: synthetic.Context
  contexts: tuple[synthetic.Context, ...]


def protocol(num_identities: int, seed: int = 0) -> list[Case]:
  """The evaluation cases, identical for every method for the same (num_identities, seed)."""
  if isinstance(num_identities, bool) or not isinstance(num_identities, int) or num_identities < 1:
    raise InputError(f'the number of identities must be a positive integer, got {num_identities!r}.')
  cases = []
  backgrounds = len(synthetic.CONTEXT_ATTRIBUTES['background'])
  for i, identity in enumerate(synthetic.heldout_identities(num_identities, seed=seed)):
    rng = np.random.default_rng([seed, 0xE7A1, i])
    input_background = int(rng.integers(backgrounds))
    input_context = synthetic.Context(background=input_background, accessory=0, size=0)
    others = [b for b in range(backgrounds) if b != input_background]
    picked = rng.permutation(others)[:PROMPTS_PER_IDENTITY]
    contexts = tuple(synthetic.Context(background=int(b), accessory=int(rng.integers(4)), size=int(rng.integers(2)))
                     for b in picked)
    cases.append(Case(identity, input_context, contexts))
  return cases


def parse_method(text: str) -> tuple[str, int]:
  """'e4t:5' / 'ti:500' / 'dreambooth:200' -> (kind, steps)."""
  kind, _, steps = text.partition(':')
  kind = _ALIASES.get(kind.strip(), kind.strip())
  if kind in REFERENCE_KINDS and not steps.strip():
    return kind, 0
  if kind not in METHOD_KINDS or not steps.strip().isdigit():
    raise InputError(f'method {text!r} must look like KIND:STEPS with KIND one of {", ".join(METHOD_KINDS)} '
                     f'(or ti, db), e.g. e4t:5 or textual_inversion:500, or a reference: {", ".join(REFERENCE_KINDS)}.')
  return kind, int(steps)


class _Tuner:
  """Compile-once tuning for one method kind at a maximum step count: (image, prompt, key) -> (model, concept)."""

  def __init__(self, model, kind: str, max_steps: int, encoder: str = 'averaged', loss_mask: bool = False):
    from e4t_jax import personalize  # pylint: disable=g-import-not-at-top
    from e4t_jax.lab import baselines
    self.model, self.kind = model, kind
    start = time.perf_counter()
    if kind in REFERENCE_KINDS:
      self.fn = None
    elif kind in ('e4t', 'e4t_paper'):  # per_step generation needs the tuned encoder kept
      tuning = personalize.TuningConfig(mode='paper' if kind == 'e4t_paper' else 'lite',
                                        keep_encoder=encoder == 'per_step', loss_mask=loss_mask)
      self.fn = personalize.make_personalize_fn(model, num_steps=max_steps, tuning=tuning)
    elif kind == 'textual_inversion':
      self.fn = baselines.make_textual_inversion_fn(model, num_steps=max(max_steps, 1))
    else:
      self.fn = baselines.make_dreambooth_fn(model, num_steps=max(max_steps, 1))
    self.compile_seconds = time.perf_counter() - start

  def __call__(self, image: np.ndarray, prompt: str, key: jax.Array, steps: int, mask: np.ndarray | None = None):
    from e4t_jax.lab import baselines  # pylint: disable=g-import-not-at-top
    if self.kind in REFERENCE_KINDS:
      return self.model, None
    if self.kind == 'dreambooth':
      unet_params, concept = self.fn(self.model.params, image, key, num_steps=steps, prompt=prompt)
      jax.block_until_ready(concept.embedding)
      return baselines.model_with_unet(self.model, unet_params), concept
    extra = {} if mask is None or self.kind not in ('e4t', 'e4t_paper') else {'mask': mask}
    concept = self.fn(self.model.params, image, key, num_steps=steps, prompt=prompt, **extra)
    jax.block_until_ready(concept.embedding)
    return self.model, concept


def concept_float32_bytes(concept) -> int:
  """What a concept's w* and weight offsets take as float32 (the `bytes_per_concept` of a tuned concept)."""
  return 4 * sum(int(np.size(x)) for x in jax.tree.leaves((concept.embedding, concept.weight_offsets)))


@functools.partial(jax.jit, static_argnums=0)
def _vae_round_trip(vae, params, images):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from e4t_jax.models.vae import AutoencoderKL
  posterior = vae.apply({'params': params}, images.astype(jnp.float32) / 127.5 - 1.0, method=AutoencoderKL.encode)
  decoded = vae.apply({'params': params}, posterior.mean, method=AutoencoderKL.decode)
  return jnp.round(jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def vae_round_trip(model, images: np.ndarray) -> np.ndarray:
  """uint8 images [N, S, S, 3] through the model's VAE (encode, the posterior mean, decode) back to uint8
  (compiled once per VAE and batch shape)."""
  return np.asarray(_vae_round_trip(model.modules.vae, model.params['vae'], images))


def _reference_prompt(kind: str, model, identity: synthetic.Identity, context: synthetic.Context) -> str:
  """The prompt of a 'coarse' or 'described' reference image (no concept)."""
  coarse = model.config.coarse_word
  return context.caption(identity.words(coarse) if kind == 'described' else coarse)


def evaluate_method(model, readout, kind: str, steps: int, cases: Sequence[Case], *, seed: int = 0,
                    tuner: _Tuner | None = None, grid_path: str | os.PathLike | None = None,
                    progress: bool = True, encoder: str = 'averaged', loss_mask: bool = False) -> dict[str, Any]:
  """Tunes one concept per case with `kind` at `steps`, renders its prompts and scores them. `encoder`:
  how E4T concepts are read while sampling ('per_step': the tuned encoder at every step, one concept a call).
  `loss_mask`: E4T tuning weights its loss by the input's face mask (`synthetic.render(with_mask=True)`)."""
  per_step = encoder == 'per_step' and kind in ('e4t', 'e4t_paper')
  from e4t_jax.lab import baselines  # pylint: disable=g-import-not-at-top
  from e4t_jax.lab import evaluate
  from e4t_jax import generation as generate_lib
  tuner = tuner or _Tuner(model, kind, steps, encoder, loss_mask)
  placeholder = model.config.placeholder
  bar = progress_bar(len(cases), f'{kind}:{steps}', 'concept', enabled=progress)
  images, identities, contexts, tune_seconds = [], [], [], []
  stored_bytes = None  # e4t_paper: measured on its first concept (the SVD ranks set the size)
  pending: list[tuple[Any, Any, list[str]]] = []  # shared-model concepts rendered in batches

  def flush():
    if not pending:
      return
    prompts = [p for _, _, ps in pending for p in ps]
    concepts = [c for _, c, ps in pending for _ in ps]
    images.append(generate_lib.generate(pending[0][0], concepts, prompts, num_steps=SAMPLING_STEPS,
                                        guidance_scale=GUIDANCE_SCALE, seed=seed,
                                        encoder='per_step' if per_step else 'averaged'))
    pending.clear()

  for i, case in enumerate(cases):
    image, mask = synthetic.render(case.identity, case.input_context, with_mask=True)
    start = time.perf_counter()
    tuned_model, concept = tuner(image, case.input_context.template(), jax.random.key(seed * 100_003 + i), steps,
                                 mask if loss_mask else None)
    tune_seconds.append(time.perf_counter() - start)
    if kind == 'e4t_paper' and stored_bytes is None:
      stored_bytes = concept_float32_bytes(concept)
    prompts = [c.template().format(placeholder) for c in case.contexts]
    identities += [case.identity] * len(prompts)
    contexts += list(case.contexts)
    if kind in ('truth', 'reconstructed'):
      flush()
      renders = np.stack([synthetic.render(case.identity, c) for c in case.contexts])
      images.append(vae_round_trip(model, renders) if kind == 'reconstructed' else renders)
    elif kind in ('coarse', 'described'):
      pending.append((model, None, [_reference_prompt(kind, model, case.identity, c) for c in case.contexts]))
    elif tuned_model is model and not per_step:
      pending.append((model, concept, prompts))
      if sum(len(p) for _, _, p in pending) >= GENERATE_CHUNK:
        flush()
    else:  # its own U-Net, or its own encoder at every step: render alone
      flush()
      pending.append((tuned_model, concept, prompts))
      flush()
    bar.update(1)
  flush()
  bar.close()
  images = np.concatenate(images)
  result = evaluate.evaluate_images(readout, images, identities, contexts)
  result.update(method=kind, steps=steps, identities=len(cases), images=int(len(images)), encoder=encoder,
                loss_mask=bool(loss_mask and kind in ('e4t', 'e4t_paper')),
                tune_seconds_per_concept=float(np.median(tune_seconds)),
                compile_seconds=round(tuner.compile_seconds, 2),
                bytes_per_concept=0 if kind in REFERENCE_KINDS else
                stored_bytes if stored_bytes is not None else baselines.concept_bytes(kind, model))
  if grid_path is not None:
    shown = min(4, len(cases))
    tiles, labels = [], []
    for i in range(shown):
      tiles.append(synthetic.render(cases[i].identity, cases[i].input_context))
      labels.append('input')
      tiles += list(images[i * PROMPTS_PER_IDENTITY:(i + 1) * PROMPTS_PER_IDENTITY])
      labels += [_reference_prompt(kind, model, cases[i].identity, c) if kind in ('coarse', 'described') else
                 (f'{kind}: ' if kind in ('truth', 'reconstructed') else '') + c.caption(placeholder)
                 for c in cases[i].contexts]
    from e4t_jax.data.images import encode_png  # pylint: disable=g-import-not-at-top
    grid = generate_lib.make_grid(np.stack(tiles), labels, columns=1 + PROMPTS_PER_IDENTITY)
    atomic_write_bytes(grid_path, [encode_png(grid)])
  return result


def compression_study(model, readout, cases: Sequence[Case], *, steps: int = 15, ranks: Sequence[int] = (4, 16, 64),
                      seed: int = 0, progress: bool = True) -> dict[str, Any]:
  """What storing a paper-mode concept as truncated SVDs costs: each case is tuned once with factors of full
  rank (the exact delta, up to float rounding), then rendered with those and with their first r components
  for each rank r. Returns per rank: bytes per concept, the mean / max absolute pixel difference to the
  exact renders (uint8 levels) and the identity / prompt-fidelity scores, next to the exact ones."""
  import dataclasses as dc  # pylint: disable=g-import-not-at-top
  from e4t_jax import generation as generate_lib
  from e4t_jax import personalize
  from e4t_jax.e4t import offsets as offsets_lib
  from e4t_jax.lab import evaluate
  full_rank = 1 << 30  # capped at each kernel's own rank: the exact delta
  fn = personalize.make_personalize_fn(model, num_steps=steps,
                                       tuning=personalize.TuningConfig(mode='paper', delta_rank=full_rank))
  placeholder = model.config.placeholder
  renders: dict[str, list[np.ndarray]] = {'exact': [], **{str(r): [] for r in ranks}}
  sizes: dict[str, int] = {}
  identities, contexts = [], []
  bar = progress_bar(len(cases), 'compression', 'concept', enabled=progress)
  for i, case in enumerate(cases):
    concept = fn(model.params, synthetic.render(case.identity, case.input_context),
                 jax.random.key(seed * 100_003 + i), prompt=case.input_context.template())
    prompts = [c.template().format(placeholder) for c in case.contexts]
    identities += [case.identity] * len(prompts)
    contexts += list(case.contexts)
    for name in renders:
      variant = concept if name == 'exact' else dc.replace(
          concept, weight_offsets=offsets_lib.truncate_factors(concept.weight_offsets, int(name)))
      sizes[name] = concept_float32_bytes(variant)
      renders[name].append(generate_lib.generate(model, variant, prompts, num_steps=SAMPLING_STEPS,
                                                 guidance_scale=GUIDANCE_SCALE, seed=seed))
    bar.update(1)
  bar.close()
  exact = np.concatenate(renders['exact']).astype(np.int32)
  result = {'steps': steps, 'identities': len(cases), 'images': int(len(exact))}
  for name, images in renders.items():
    images = np.concatenate(images)
    scores = evaluate.evaluate_images(readout, images, identities, contexts)
    difference = np.abs(images.astype(np.int32) - exact)
    result[name] = {'bytes_per_concept': sizes[name], 'identity': scores['identity'],
                    'prompt_fidelity': scores['prompt_fidelity'],
                    'pixel_difference_mean': float(difference.mean()), 'pixel_difference_max': int(difference.max())}
  return result


def run(model_dir: str | os.PathLike | None, out: str | os.PathLike, methods: Sequence[str] = DEFAULT_METHODS, *,
        num_identities: int = 50, seed: int = 0, label: str = '', readout_path: str | os.PathLike | None = None,
        grids: bool = True, encoder: str = 'averaged', loss_mask: bool = False) -> dict[str, Any]:
  """Evaluates each method ('kind:steps') on `num_identities` cases; results accumulate in `out` (JSON).
  `encoder` = 'per_step' renders E4T concepts with the encoder read at every step, `loss_mask` tunes them
  with the face mask weighting the loss (name either with a label)."""
  import e4t_jax  # pylint: disable=g-import-not-at-top
  from e4t_jax.lab import evaluate  # pylint: disable=g-import-not-at-top
  parsed = [parse_method(m) for m in methods]
  model = e4t_jax.load_demo() if model_dir is None else e4t_jax.load(model_dir)
  model_folder = Path(e4t_jax.DEMO_MODEL_DIR if model_dir is None else model_dir)
  readout_path = Path(readout_path) if readout_path else model_folder / 'readout.safetensors'
  if not readout_path.is_file():
    readout_path = Path(e4t_jax.DEMO_MODEL_DIR) / 'readout.safetensors'
  readout = evaluate.ReadoutModel.load(readout_path)
  out = Path(out)
  results = read_json(out, what='an `e4t eval` results file', error=InputError) if out.is_file() else {}
  cases = protocol(num_identities, seed)
  tuners: dict[str, _Tuner] = {}
  for kind, steps in parsed:
    name = f'{label}{kind}:{steps}'
    if name in results and results[name].get('identities') == num_identities:
      print(f'[e4t eval] {name}: in {out} already, skipped', flush=True)
      continue
    # One executable per kind, compiled for the largest step count asked for; fewer steps run on it.
    max_steps = max(s for k, s in parsed if k == kind)
    if kind not in tuners:
      tuners[kind] = _Tuner(model, kind, max_steps, encoder, loss_mask)
    slug = ''.join(c if c.isalnum() or c in '_.' else '-' for c in name)
    grid = out.with_name(f'{out.stem}-{slug}.png') if grids else None
    result = evaluate_method(model, readout, kind, steps, cases, seed=seed, tuner=tuners[kind], grid_path=grid,
                             encoder=encoder, loss_mask=loss_mask)
    result['model'] = str(model_folder)
    results[name] = result
    atomic_write_bytes(out, [json.dumps(results, indent=2).encode()])
    print(f'[e4t eval] {name}: identity {result["identity"]["mean"]:.3f} ± {result["identity"]["ci95"]:.3f}, '
          f'prompt fidelity {result["prompt_fidelity"]["mean"]:.3f} ± {result["prompt_fidelity"]["ci95"]:.3f}, '
          f'{result["tune_seconds_per_concept"]:.2f} s/concept, {result["bytes_per_concept"]:,} B/concept', flush=True)
  return results


# ----------------------------------------------------------------------------- report
def markdown_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table (one row per method, in the order they were run)."""
  rows = ['| method | tuning steps | identity ↑ | prompt fidelity ↑ | s / concept | bytes / concept |',
          '| --- | ---: | ---: | ---: | ---: | ---: |']
  for name, r in results.items():
    rows.append(f'| {name.rsplit(":", 1)[0]} | {r["steps"]} | {r["identity"]["mean"]:.3f} ± {r["identity"]["ci95"]:.3f} '
                f'| {r["prompt_fidelity"]["mean"]:.3f} ± {r["prompt_fidelity"]["ci95"]:.3f} '
                f'| {r["tune_seconds_per_concept"]:.2f} | {r["bytes_per_concept"]:,} |')
  first = next(iter(results.values()), None)
  if first is not None:
    chance = first['chance']
    rows.append(f'| *chance (an unrelated identity / context)* | | {chance["identity"]:.3f} | '
                f'{chance["prompt_fidelity"]:.3f} | | |')
  return '\n'.join(rows)


def attribute_table(results: dict[str, Any]) -> str:
  """Which identity attributes each method transfers: read-out accuracy per attribute (Markdown)."""
  with_attributes = {n: r for n, r in results.items() if 'identity_attributes' in r}
  if not with_attributes:
    return ''
  names = list(next(iter(with_attributes.values()))['identity_attributes'])
  rows = ['| method | tuning steps | ' + ' | '.join(n.replace('_', ' ') for n in names) + ' |',
          '| --- | ---: |' + ' ---: |' * len(names)]
  for name, r in with_attributes.items():
    rows.append(f'| {name.rsplit(":", 1)[0]} | {r["steps"]} | ' +
                ' | '.join(f'{r["identity_attributes"][n]:.2f}' for n in names) + ' |')
  rows.append('| *chance (uniform guess)* | | ' + ' | '.join(f'{1 / len(synthetic.IDENTITY_ATTRIBUTES[n]):.2f}'
                                                           for n in names) + ' |')
  return '\n'.join(rows)


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
  """A bar chart (PNG, drawn with PIL): identity and prompt fidelity per method, with 95% intervals."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  from e4t_jax.data.images import encode_png  # pylint: disable=g-import-not-at-top
  names = list(results)
  row, label_w, bar_w, pad = 34, 250, 520, 12
  height = pad * 2 + 40 + row * len(names) + 30
  image = Image.new('RGB', (label_w + bar_w + 2 * pad + 60, height), 'white')
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  x0, y0 = pad + label_w, pad + 30
  draw.text((pad, pad), 'identity (blue) and prompt fidelity (orange), mean ± 95% CI', fill='black', font=font)
  for tick in range(0, 11, 2):
    x = x0 + bar_w * tick / 10
    draw.line([(x, y0 - 4), (x, y0 + row * len(names))], fill=(225, 225, 225))
    draw.text((x - 8, y0 + row * len(names) + 4), f'{tick / 10:.1f}', fill='black', font=font)
  chance = next(iter(results.values()))['chance']['identity'] if results else None
  for i, name in enumerate(names):
    r = results[name]
    y = y0 + i * row
    draw.text((pad, y + 10), f'{name}', fill='black', font=font)
    for j, (key, color) in enumerate((('identity', (60, 110, 200)), ('prompt_fidelity', (235, 140, 40)))):
      mean, ci = r[key]['mean'], r[key]['ci95']
      top = y + 4 + j * 13
      draw.rectangle([x0, top, x0 + bar_w * mean, top + 11], fill=color)
      if np.isfinite(ci):
        lo, hi = x0 + bar_w * max(mean - ci, 0), x0 + bar_w * min(mean + ci, 1)
        draw.line([(lo, top + 5), (hi, top + 5)], fill='black', width=1)
  if chance is not None:
    x = x0 + bar_w * chance
    draw.line([(x, y0 - 4), (x, y0 + row * len(names))], fill=(200, 0, 0), width=1)
    draw.text((x + 3, y0 - 16), 'identity chance', fill=(200, 0, 0), font=font)
  atomic_write_bytes(path, [encode_png(np.asarray(image))])
