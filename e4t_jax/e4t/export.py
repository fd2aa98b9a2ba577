"""A concept -> files diffusers loads into a `StableDiffusionPipeline` of the same base model.

    export_concept_to_diffusers(concept, model, 'my-concept/')
    # my-concept/learned_embeds.safetensors          w* as a textual-inversion embedding
    # my-concept/pytorch_lora_weights.safetensors    the weight offsets as a LoRA on the U-Net
    # my-concept/README.txt                          how to load both

Textual inversion: diffusers' own format, one tensor {token: [1, width]} (`load_textual_inversion`
takes a single-key file as token -> embedding). The token must not be in the CLIP vocabulary
(diffusers refuses it), so the default placeholder '*' (vocab id 9) is exported as '<e4t-concept>';
prompts in diffusers then read 'a photo of <e4t-concept>'. SDXL: the file holds w*'s two parts as
{'clip_l': [1, 768], 'clip_g': [1, 1280]} (the layout SDXL textual-inversion files use), loaded with
`load_textual_inversion` once per text encoder (the README says how).

LoRA: the PEFT key layout `load_lora_weights` reads,
    unet.<module>.lora_A.weight  [r, in]      unet.<module>.lora_B.weight  [out, r]
with <module> the diffusers name of the projection (e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q).
Our kernels act as x @ W with W [in, out] and ΔW = down @ up; torch's Linear weight is Wᵀ [out, in], so
ΔWᵀ = upᵀ @ downᵀ = lora_B @ lora_A with lora_A = downᵀ and lora_B = upᵀ. No alphas are written:
diffusers then takes alpha = rank, a scale of 1, so W' = W + lora_B @ lora_A exactly as our additive
merge. Multiplicative offsets (W ⊙ (1 + ΔW)) are not a low-rank update and cannot be exported.
Loading the LoRA needs diffusers' PEFT backend (`pip install peft`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from flax import traverse_util

from e4t_jax.convert.common import torch_key
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t import prompts as prompts_lib
from e4t_jax.e4t.concept import Concept
from e4t_jax.errors import CheckpointError, InputError
from e4t_jax.fileio import atomic_write_bytes, write_safetensors

EMBEDDING_FILE = 'learned_embeds.safetensors'
LORA_FILE = 'pytorch_lora_weights.safetensors'
XL_KEYS = ('clip_l', 'clip_g')  # SDXL embedding file: the text_encoder and text_encoder_2 parts of w*
README_FILE = 'README.txt'
# The token used in diffusers when the model's placeholder is a CLIP vocabulary string (such as '*').
DEFAULT_EXPORT_TOKEN = '<e4t-concept>'
UNET_PREFIX = 'unet.'


@dataclasses.dataclass(frozen=True)
class DiffusersExport:
  """What `export_concept_to_diffusers` wrote, and the token to write in diffusers prompts."""
  embedding: Path
  lora: Path | None      # None when the concept has no weight offsets
  readme: Path
  token: str


def export_token(modules: model_lib.E4TModules, token: str | None = None) -> str:
  """The token the exported embedding is loaded under: `token`, else the model's placeholder when
  diffusers accepts it, else `DEFAULT_EXPORT_TOKEN`."""
  if token is None:
    placeholder = modules.config.placeholder
    return DEFAULT_EXPORT_TOKEN if modules.tokenizer.in_vocabulary(placeholder) else placeholder
  if not token or any(char.isspace() for char in token):
    raise InputError(f'export token {token!r} must be one word without whitespace, e.g. {DEFAULT_EXPORT_TOKEN!r}.')
  if modules.tokenizer.in_vocabulary(token) or token in modules.tokenizer.special_tokens.values():
    raise InputError(f'export token {token!r} is already in the CLIP vocabulary, which diffusers refuses; '
                     f'use a new string such as {DEFAULT_EXPORT_TOKEN!r}.')
  return token


def lora_module_name(kernel_path: str) -> str:
  """Our offset key 'down_blocks_0/attentions_0/.../attn1/to_q' -> diffusers' module name
  'down_blocks.0.attentions.0.....attn1.to_q'."""
  return torch_key(tuple(kernel_path.split('/')) + ('kernel',))[:-len('.weight')]


def lora_state_dict(concept: Concept, unet_params) -> dict[str, np.ndarray]:
  """The concept's offsets as PEFT LoRA tensors (float32, torch layout), checked against the U-Net."""
  flat = traverse_util.flatten_dict(dict(unet_params))
  tensors = {}
  for path, pair in sorted(concept.weight_offsets.items()):
    down = np.asarray(pair['down'], np.float32)  # [in, r] ([kh * kw * in, r] for a conv kernel)
    up = np.asarray(pair['up'], np.float32)      # [r, out]
    kernel = flat.get(tuple(path.split('/')) + ('kernel',))
    if kernel is None or not offsets_lib.fits_kernel(pair, kernel.shape):
      raise CheckpointError(f'weight offset {path!r} (down {down.shape}, up {up.shape}) does not fit this '
                            'model\'s U-Net; the concept was made for another model.')
    module = UNET_PREFIX + lora_module_name(path)
    if len(kernel.shape) == 4:  # PEFT's conv LoRA: A is a kh x kw conv to r channels, B a 1x1 conv (OIHW)
      kh, kw, fan_in, _ = kernel.shape
      lora_a = down.reshape(kh, kw, fan_in, -1).transpose(3, 2, 0, 1)  # [r, in, kh, kw]
      lora_b = up.T[:, :, None, None]                                    # [out, r, 1, 1]
    else:
      lora_a, lora_b = down.T, up.T                                      # [r, in], [out, r]
    tensors[f'{module}.lora_A.weight'] = np.ascontiguousarray(lora_a)
    tensors[f'{module}.lora_B.weight'] = np.ascontiguousarray(lora_b)
  return tensors


def _readme(token: str, out_dir: Path, has_lora: bool, info: dict[str, str], xl: bool = False) -> str:
  pipeline = 'StableDiffusionXLPipeline' if xl else 'StableDiffusionPipeline'
  lines = [
      'An E4T concept exported for diffusers (made with e4t-jax).',
      '',
      f'Load it into a {pipeline} of the SAME base model it was personalized with'
      + (f' (e4t base fingerprint {info["base_fingerprint"][:12]}):' if 'base_fingerprint' in info else ':'),
      '',
      f'from diffusers import {pipeline}',
      f'pipe = {pipeline}.from_pretrained("path/to/base-model")',
  ]
  if xl:  # one vector per text encoder, the SDXL textual-inversion layout
    lines += [
        'from safetensors.torch import load_file',
        f'state = load_file("{out_dir}/{EMBEDDING_FILE}")',
        f'pipe.load_textual_inversion(state["{XL_KEYS[0]}"], token="{token}", text_encoder=pipe.text_encoder, '
        'tokenizer=pipe.tokenizer)',
        f'pipe.load_textual_inversion(state["{XL_KEYS[1]}"], token="{token}", text_encoder=pipe.text_encoder_2, '
        'tokenizer=pipe.tokenizer_2)',
    ]
  else:
    lines.append(f'pipe.load_textual_inversion("{out_dir}/{EMBEDDING_FILE}", token="{token}")')
  if has_lora:
    lines.append(f'pipe.load_lora_weights("{out_dir}", weight_name="{LORA_FILE}")  # needs `pip install peft`')
  lines += [
      f'image = pipe("a photo of {token}").images[0]',
      '',
      f'Write the concept as {token} in prompts (e4t-jax\'s placeholder was '
      f'{info.get("placeholder", "?")!r}).',
  ]
  if has_lora:
    lines.append('The LoRA has alpha = rank (scale 1): W\' = W + lora_B @ lora_A reproduces the tuned U-Net.')
  return '\n'.join(lines) + '\n'


def export_concept_to_diffusers(concept: Concept, model: model_lib.E4TModel, out_dir: str | os.PathLike, *,
                                token: str | None = None) -> DiffusersExport:
  """Writes the concept as a textual-inversion embedding + a U-Net LoRA for diffusers, and a README.

  Args:
    concept: the personalized concept (additive weight offsets).
    model: the E4T model it was made with (the offsets are checked against its U-Net).
    out_dir: the folder (created); existing files of the same names are replaced atomically.
    token: the token to load the embedding under in diffusers; default the model's placeholder, or
      '<e4t-concept>' when that is a CLIP vocabulary string such as '*'.
  Returns:
    The written paths and the token.
  Raises:
    InputError: multiplicative offsets (not expressible as a LoRA) or an unusable token.
    CheckpointError: the concept does not fit the model.
  """
  modules = model.modules
  info = concept.info
  mode = info.get('offsets_mode', modules.config.offsets.mode)
  if mode != 'additive' and concept.weight_offsets:
    raise InputError(f'this concept has {mode} weight offsets (W * (1 + dW)), which a LoRA (W + B @ A) cannot '
                     'represent; personalize with offsets mode "additive" to export it to diffusers.')
  concept.check_compatible(model)  # finite, this model's fingerprint, shapes that fit
  embedding = np.asarray(concept.embedding, np.float32)
  widths = prompts_lib.embedding_widths(modules)
  if len(widths) == 2:  # SDXL: w*'s two parts, as diffusers' SDXL textual-inversion files hold them
    tensors = {XL_KEYS[0]: embedding[None, :widths[0]], XL_KEYS[1]: embedding[None, widths[0]:]}
  token = export_token(modules, token)
  out_dir = Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise InputError(f'{out_dir} exists and is not a directory; choose another output folder.')
  out_dir.mkdir(parents=True, exist_ok=True)

  metadata = {'format': 'pt', 'e4t': json.dumps(dict(info, token=token), sort_keys=True)}
  embedding_path = out_dir / EMBEDDING_FILE
  if len(widths) == 1:
    tensors = {token: embedding[None]}  # [1, width]
  write_safetensors(embedding_path, tensors, metadata=metadata)
  lora_path = None
  if concept.weight_offsets:
    lora_path = out_dir / LORA_FILE
    lora = lora_state_dict(concept, model.params['unet'])
    if not all(np.isfinite(np.asarray(v, np.float32)).all() for v in lora.values()):
      raise CheckpointError(f'{concept.source or "concept"}: its LoRA factors overflow to NaN/inf; nothing '
                            'more was written.')
    write_safetensors(lora_path, lora, metadata=metadata)
  readme_path = out_dir / README_FILE
  atomic_write_bytes(readme_path, [_readme(token, out_dir, lora_path is not None, info, xl=len(widths) == 2).encode()])
  return DiffusersExport(embedding=embedding_path, lora=lora_path, readme=readme_path, token=token)
