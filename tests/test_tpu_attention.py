"""The Pallas TPU flash attention (`models.tpu_attention`), run on CPU in Pallas' TPU interpret mode: values and
gradients against XLA's reference attention, the 'auto' rule's choice, sharded under a mesh, and the tiny U-Net
with the kernel in its self-attention."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from e4t_jax.models import layers, tpu_attention
from e4t_jax.models.unet import UNet, UNetConfig


def _qkv(batch, q_len, kv_len, heads, head_dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  shapes = ((batch, q_len, heads, head_dim), (batch, kv_len, heads, head_dim), (batch, kv_len, heads, head_dim))
  return tuple(jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes))


def _value_and_grads(implementation, q, k, v, causal=False):
  # a loss that weighs every output element differently, so every gradient entry is checked
  weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
  loss = lambda q, k, v: jnp.sum(weights * layers.dot_product_attention(
      q, k, v, causal=causal, implementation=implementation).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize('q_len, kv_len, head_dim, causal', [
    (256, 256, 40, False),   # SD 1.5's first level: head_dim 40, below a lane
    (128, 384, 160, False),  # head_dim 160 (SD 1.5's 1280-wide level) is padded to 256; kv longer than q
    (256, 256, 64, True),    # causal
])
def test_kernel_matches_xla_attention_values_and_gradients(q_len, kv_len, head_dim, causal):
  q, k, v = _qkv(2, q_len, kv_len, 2, head_dim)
  with pltpu.force_tpu_interpret_mode():
    loss, grads = _value_and_grads('pallas_tpu', q, k, v, causal)
  ref_loss, ref_grads = _value_and_grads('xla', q, k, v, causal)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, atol=2e-5 * scale)


def test_bfloat16_kernel_close_to_xla():
  q, k, v = _qkv(1, 256, 256, 2, 64, jnp.bfloat16)
  with pltpu.force_tpu_interpret_mode():
    out = jax.jit(lambda *a: layers.dot_product_attention(*a, implementation='pallas_tpu'))(q, k, v)
  ref = layers.dot_product_attention(q, k, v, implementation='xla')
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=3e-2)


def _uses_kernel(fn, *args) -> bool:
  return 'pallas_call' in str(jax.make_jaxpr(fn)(*args))


def test_auto_takes_the_kernel_on_tpu_where_shapes_allow():
  attend = lambda q, k, v: layers.dot_product_attention(q, k, v)
  self_attn = _qkv(1, 256, 256, 2, 40)
  cross_attn = _qkv(1, 256, 77, 2, 40)  # 77 text tokens: not a multiple of 128
  assert not _uses_kernel(attend, *self_attn)  # CPU: the reference
  with tpu_attention.target_platform('tpu'):
    assert tpu_attention.platform() == 'tpu'
    assert _uses_kernel(attend, *self_attn)
    assert not _uses_kernel(attend, *cross_attn)
    masked = lambda q, k, v: layers.dot_product_attention(q, k, v, key_mask=jnp.ones(k.shape[:2], bool))
    assert not _uses_kernel(masked, *self_attn)
    assert not _uses_kernel(lambda q, k, v: layers.dot_product_attention(q, k, v, implementation='xla'),
                            *self_attn)
  assert tpu_attention.platform() == jax.default_backend()
  with pytest.raises(ValueError, match='multiples of 128'):
    layers.dot_product_attention(*cross_attn, implementation='pallas_tpu')
  with pytest.raises(ValueError, match='no key mask'):
    layers.dot_product_attention(*self_attn, key_mask=jnp.ones((1, 256), bool), implementation='pallas_tpu')


def test_sharded_under_a_mesh_runs_per_shard_and_matches():
  from e4t_jax.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  q, k, v = _qkv(4, 128, 128, 2, 32)
  with mesh_lib.activation_sharding(mesh), pltpu.force_tpu_interpret_mode():
    fn = jax.jit(lambda *a: layers.dot_product_attention(*a, implementation='pallas_tpu'))
    text = str(jax.make_jaxpr(fn)(q, k, v))
    out = fn(q, k, v)
  # batch 4 over data x fsdp (4 shards), the 2 heads over tensor: each shard's kernel sees one of each
  assert 'shard_map' in text and 'f32[1,1,128,32] = pallas_call' in re.sub(r'\s+', ' ', text)
  np.testing.assert_allclose(out, layers.dot_product_attention(q, k, v, implementation='xla'), atol=2e-5)


def test_tiny_unet_with_the_kernel_matches_values_and_parameter_gradients():
  """The tiny U-Net's 16 x 16 self-attention (256 tokens) takes the kernel when traced for a TPU; its
  cross-attention stays on XLA. Output and every parameter gradient match the CPU (XLA) program."""
  config = UNetConfig.tiny()
  unet = UNet(config)
  sample = jax.random.normal(jax.random.key(1), (1, config.sample_size, config.sample_size, 4))
  context = jax.random.normal(jax.random.key(2), (1, 8, config.cross_attention_dim))
  params = layers.host_init(jax.eval_shape(unet.init, jax.random.key(0), sample, jnp.array([10]), context))

  def loss(params):
    out = unet.apply(params, sample, jnp.array([500]), context)
    return jnp.mean(out * jnp.sin(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape))

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params)
  with tpu_attention.target_platform('tpu'), pltpu.force_tpu_interpret_mode():
    assert _uses_kernel(loss, params)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  flat_got, flat_want = jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)
  largest = max(float(jnp.max(jnp.abs(g))) for g in flat_want)
  for got, want in zip(flat_got, flat_want):
    np.testing.assert_allclose(got, want, atol=1e-4 * largest)
