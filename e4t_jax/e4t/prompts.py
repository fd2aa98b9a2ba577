"""The prompt path: token ids with a placeholder -> text-encoder states with w* swapped in.

The placeholder token's id lies past the text encoder's vocabulary (the tokenizer appends it), so it
never indexes the embedding table: its positions are looked up as the coarse word and then replaced,
functionally, by the predicted embedding w*. No table is resized or mutated.

SDXL (`modules.text_encoder_2` set): the placeholder lives in both vocabularies, and w* is one vector
[width_1 + width_2] whose two parts are swapped into the two encoders (`text_condition`); the
coarse word's embedding is the two table rows side by side (`coarse_embedding`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from e4t_jax.models import unet as unet_lib
from e4t_jax.models.clip import CLIPTextOutput, CLIPTextTransformer


def encode_prompt(text_encoder: CLIPTextTransformer, text_params, input_ids: jax.Array, *,
                  placeholder_id: int | None = None, placeholder_embedding: jax.Array | None = None,
                  substitute_id: int = 0) -> jax.Array:
  """Text-encoder states for Stable Diffusion's cross-attention.

  Args:
    text_encoder, text_params: the frozen CLIP text transformer.
    input_ids: [batch, tokens] int32, possibly containing `placeholder_id`.
    placeholder_id: the placeholder token's id (or None: plain prompts).
    placeholder_embedding: [batch, width] (or [width]) w* for the placeholder positions.
    substitute_id: an in-vocabulary id used for the table lookup at placeholder positions (its
      embedding is overwritten; only the end-of-text search must never see the placeholder's id).
  Returns:
    [batch, tokens, width] last hidden state (after the final layer norm), float32.
  """
  return _encode(text_encoder, text_params, input_ids, placeholder_id, placeholder_embedding,
                 substitute_id).last_hidden_state


def _encode(text_encoder: CLIPTextTransformer, text_params, input_ids: jax.Array, placeholder_id: int | None,
            placeholder_embedding: jax.Array | None, substitute_id: int) -> CLIPTextOutput:
  """The text encoder's whole output, w* swapped in at the placeholder positions (see `encode_prompt`)."""
  if placeholder_id is None or placeholder_embedding is None:
    return text_encoder.apply({'params': text_params}, input_ids)
  is_placeholder = input_ids == placeholder_id  # [batch, tokens]
  safe_ids = jnp.where(is_placeholder, substitute_id, input_ids)
  embeds = text_encoder.apply({'params': text_params}, safe_ids, method=text_encoder.embed_tokens)
  w_star = jnp.broadcast_to(jnp.asarray(placeholder_embedding, embeds.dtype).reshape(-1, 1, embeds.shape[-1]),
                            embeds.shape)
  embeds = jnp.where(is_placeholder[..., None], w_star, embeds)
  return text_encoder.apply({'params': text_params}, safe_ids, inputs_embeds=embeds)


def encode_prompt_xl(text_encoders: tuple[CLIPTextTransformer, CLIPTextTransformer], text_params: tuple,
                     input_ids: tuple[jax.Array, jax.Array], *, placeholder_id: int | None = None,
                     placeholder_embeddings: tuple[jax.Array, jax.Array] | None = None, substitute_id: int = 0,
                     clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
  """SDXL's text conditioning, as diffusers' `StableDiffusionXLPipeline.encode_prompt`.

  Args:
    text_encoders, text_params: (CLIP ViT-L, OpenCLIP bigG with its projection) and their params.
    input_ids: each tokenizer's [batch, tokens] ids of the same prompt (the second pads with '!').
    placeholder_id, placeholder_embeddings: the placeholder's id (the same in both vocabularies) and
      one w* per encoder ([batch, width_i] or [width_i]: 768 and 1280 wide for SDXL base).
    substitute_id: as for `encode_prompt`.
    clip_skip: diffusers' option: None reads the penultimate layer, k the layer k below it.
  Returns:
    (prompt_embeds [batch, tokens, width_1 + width_2]: the encoders' hidden states side by side,
     pooled [batch, projection_dim]: the second encoder's projected end-of-text state, for the U-Net's
     `added_cond_kwargs['text_embeds']`).
  """
  if not text_encoders[1].with_projection:
    raise ValueError('encode_prompt_xl: the second text encoder must have its text_projection '
                     '(load it with with_projection=True).')
  layer = -2 - (clip_skip or 0)
  embeddings = placeholder_embeddings or (None, None)
  outputs = [_encode(encoder, params, ids, placeholder_id, w_star, substitute_id)
             for encoder, params, ids, w_star in zip(text_encoders, text_params, input_ids, embeddings)]
  states = jnp.concatenate([out.hidden_states[layer] for out in outputs], axis=-1)
  return states, outputs[1].text_embeds


def token_embedding(text_params, token_id: int) -> jax.Array:
  """A row of the text encoder's token table: [width] (e.g. the coarse word's embedding)."""
  table = text_params['embeddings']['token_embedding']['embedding']
  return jnp.asarray(table[token_id], jnp.float32)


# ----------------------------------------------------------------------------- E4T modules, SD 1.x/2.x or XL
def embedding_widths(modules) -> tuple[int, ...]:
  """The token-embedding width of each text encoder (one entry, or two for SDXL)."""
  encoders = (modules.text_encoder,) + ((modules.text_encoder_2,) if modules.text_encoder_2 is not None else ())
  return tuple(encoder.config.hidden_size for encoder in encoders)


def coarse_embedding(modules, params) -> jax.Array:
  """w_coarse [sum of embedding_widths]: the coarse word's row of each text encoder's token table."""
  rows = [token_embedding(params['text_encoder'], modules.coarse_token_id)]
  if modules.text_encoder_2 is not None:
    rows.append(token_embedding(params['text_encoder_2'], modules.coarse_token_id))
  return jnp.concatenate(rows, axis=-1)


def second_tokenizer_ids(modules, input_ids: jax.Array) -> jax.Array:
  """SDXL's second tokenizer's ids of the same prompts: the first's, padded with its own pad id after the
  end-of-text token. (Exact for prompts without the second tokenizer's pad token '!', which diffusers'
  folder tokenizes as padding; E4T's prompts keep the first tokenizer's reading of it.)"""
  eos = modules.tokenizer.eos_id
  seen_eos = jnp.cumsum(input_ids == eos, axis=-1) - (input_ids == eos)  # >0 strictly after the first eos
  return jnp.where(seen_eos > 0, modules.pad_id_2, input_ids).astype(input_ids.dtype)


TEXT_PARAMS = ('text_encoder', 'text_encoder_2')


def text_params_of(params) -> dict:
  """The text encoders' part of a params tree (what `text_condition` reads)."""
  return {name: params[name] for name in TEXT_PARAMS if name in params}


def text_condition(modules, params, input_ids: jax.Array, w_star: jax.Array | None = None,
                   image_size: tuple[int, int] | None = None, time_ids: jax.Array | None = None):
  """The U-Net's text conditioning of `input_ids` [batch, tokens] with w* ([batch, sum widths] or None)
  at the placeholder: the last hidden state (SD 1.x/2.x), or an `SDXLContext` (SDXL: size/crop ids
  `time_ids` [6], default those of images of `image_size` (height, width), the model's own by default,
  uncropped)."""
  if modules.text_encoder_2 is None:
    return encode_prompt(modules.text_encoder, params['text_encoder'], input_ids, placeholder_id=modules.placeholder_id,
                         placeholder_embedding=w_star, substitute_id=modules.coarse_token_id)
  widths = embedding_widths(modules)
  split = None if w_star is None else (w_star[..., :widths[0]], w_star[..., widths[0]:])
  states, pooled = encode_prompt_xl(
      (modules.text_encoder, modules.text_encoder_2), (params['text_encoder'], params['text_encoder_2']),
      (input_ids, second_tokenizer_ids(modules, input_ids)), placeholder_id=modules.placeholder_id,
      placeholder_embeddings=split, substitute_id=modules.coarse_token_id)
  batch = input_ids.shape[0]
  if time_ids is None:
    time_ids = unet_lib.sdxl_time_ids(tuple(image_size or (modules.image_size, modules.image_size)), batch=batch)
  else:
    time_ids = jnp.broadcast_to(jnp.asarray(time_ids, jnp.float32), (batch, unet_lib.SDXL_TIME_IDS))
  return unet_lib.SDXLContext(states=states, text_embeds=pooled, time_ids=time_ids)


def zero_empty_negatives(modules, context, negative_ids: jax.Array):
  """SDXL's unconditional context as diffusers' default (`force_zeros_for_empty_prompt`): zero text states
  and pooled embedding for rows whose negative prompt is empty ([bos, eos, ...]); SD 1.x/2.x: unchanged."""
  if modules.text_encoder_2 is None:
    return context
  empty = negative_ids[:, 1] == modules.tokenizer.eos_id  # [batch]
  zero = lambda x: jnp.where(empty.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros_like(x), x)
  return context.replace(states=zero(context.states), text_embeds=zero(context.text_embeds))
