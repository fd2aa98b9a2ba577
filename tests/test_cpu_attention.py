"""`layers.deferred_softmax_attention`, what implementation='auto' runs on CPU for unmasked attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.models import layers


def _qkv(shape_q, shape_kv, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=shape_q) * 2.0, dtype)  # scaled: the softmax is far from uniform
  k, v = (jnp.asarray(rng.normal(size=shape_kv), dtype) for _ in range(2))
  return q, k, v


def _value_and_grads(implementation, q, k, v):
  loss = lambda q, k, v: jnp.sum(jnp.sin(layers.dot_product_attention(q, k, v, implementation=implementation)
                                         .astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize('q_len, kv_len, heads, head_dim', [(64, 64, 4, 12), (40, 7, 2, 8), (1, 33, 1, 16)])
def test_deferred_matches_the_reference_values_and_gradients(q_len, kv_len, heads, head_dim):
  q, k, v = _qkv((3, q_len, heads, head_dim), (3, kv_len, heads, head_dim))
  out = layers.dot_product_attention(q, k, v, implementation='xla_deferred')
  ref = layers.dot_product_attention(q, k, v, implementation='xla')
  assert out.shape == ref.shape and out.dtype == ref.dtype
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
  value, grads = _value_and_grads('xla_deferred', q, k, v)
  ref_value, ref_grads = _value_and_grads('xla', q, k, v)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


def test_deferred_in_bfloat16_is_as_close_to_float32_as_the_reference():
  q, k, v = _qkv((2, 64, 4, 16), (2, 64, 4, 16))
  exact = layers.dot_product_attention(q, k, v, implementation='xla')
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = layers.dot_product_attention(*half, implementation='xla_deferred')
  ref = layers.dot_product_attention(*half, implementation='xla')
  assert out.dtype == jnp.bfloat16
  error = float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact)))
  ref_error = float(jnp.max(jnp.abs(ref.astype(jnp.float32) - exact)))
  assert error <= 2 * ref_error + 1e-3, (error, ref_error)


def test_deferred_refuses_masks_and_causal_attention():
  q, k, v = _qkv((1, 8, 1, 4), (1, 8, 1, 4))
  with pytest.raises(ValueError, match='xla_deferred'):
    layers.dot_product_attention(q, k, v, causal=True, implementation='xla_deferred')
  with pytest.raises(ValueError, match='xla_deferred'):
    layers.dot_product_attention(q, k, v, key_mask=jnp.ones((1, 8), bool), implementation='xla_deferred')


def _jaxpr(fn, *args) -> str:
  return str(jax.make_jaxpr(fn)(*args))


def test_auto_on_cpu_takes_deferred_for_unmasked_attention_and_the_pin_restores_the_reference():
  q, k, v = _qkv((1, 16, 2, 4), (1, 16, 2, 4))
  auto = lambda q, k, v: layers.dot_product_attention(q, k, v)
  deferred = _jaxpr(lambda *a: layers.dot_product_attention(*a, implementation='xla_deferred'), q, k, v)
  reference = _jaxpr(lambda *a: layers.dot_product_attention(*a, implementation='xla'), q, k, v)
  assert deferred != reference
  assert _jaxpr(auto, q, k, v) == deferred
  with layers.auto_cpu_attention('xla'):
    assert _jaxpr(auto, q, k, v) == reference
    # jit traces again under the pin (the choice is part of JAX's trace context), not reusing the cache
    jitted = jax.jit(auto)
    pinned = jitted.lower(q, k, v).as_text()
  assert jitted.lower(q, k, v).as_text() != pinned
  # masked or causal attention keeps the reference under 'auto'
  causal = lambda *a: layers.dot_product_attention(*a, causal=True)
  assert _jaxpr(causal, q, k, v) == _jaxpr(lambda *a: layers.dot_product_attention(*a, causal=True,
                                                                                  implementation='xla'), q, k, v)
