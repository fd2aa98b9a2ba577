"""The prompt path: token ids with a placeholder -> text-encoder states with w* swapped in.

The placeholder token's id lies past the text encoder's vocabulary (the tokenizer appends it), so it
never indexes the embedding table: its positions are looked up as the coarse word and then replaced,
functionally, by the predicted embedding w*. No table is resized or mutated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from e4t_jax.models.clip import CLIPTextTransformer


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
  if placeholder_id is None or placeholder_embedding is None:
    return text_encoder.apply({'params': text_params}, input_ids).last_hidden_state
  is_placeholder = input_ids == placeholder_id  # [batch, tokens]
  safe_ids = jnp.where(is_placeholder, substitute_id, input_ids)
  embeds = text_encoder.apply({'params': text_params}, safe_ids, method=text_encoder.embed_tokens)
  w_star = jnp.broadcast_to(jnp.asarray(placeholder_embedding, embeds.dtype).reshape(-1, 1, embeds.shape[-1]),
                            embeds.shape)
  embeds = jnp.where(is_placeholder[..., None], w_star, embeds)
  return text_encoder.apply({'params': text_params}, safe_ids, inputs_embeds=embeds).last_hidden_state


def token_embedding(text_params, token_id: int) -> jax.Array:
  """A row of the text encoder's token table: [width] (e.g. the coarse word's embedding)."""
  table = text_params['embeddings']['token_embedding']['embedding']
  return jnp.asarray(table[token_id], jnp.float32)
