"""The Pallas TPU flash-attention kernel behind `layers.dot_product_attention` on TPU (issue 18, item 3).

At 512 px the U-Net's first self-attention has 4,096 tokens: XLA's reference attention materializes a
[batch, heads, 4096, 4096] score matrix (and keeps its softmax for the backward pass), the flash kernel tiles
it through VMEM and keeps only per-row statistics. `dot_product_attention(implementation='auto')` takes it on
TPU where the shapes allow (`applies`): both sequence lengths multiples of 128 (the kernel's lane tiling), no key
mask. That is the U-Net's self-attention at every level of at least 16 x 16 latent pixels and the VAE's
mid-block attention; cross-attention to 77 text tokens, CLIP's 257 patches and 77 tokens stay on XLA (their score
matrices are small). A head_dim above 128 is zero-padded to a multiple of 128 (the kernel's rule; SD 1.5's
1280-wide level has head_dim 160): zero query/key columns leave the scores unchanged, zero value columns are
sliced off.

Under a mesh (`parallel.mesh.activation_sharding`, i.e. `jax.set_mesh` + flax's logical-axis rules) the kernel
runs per shard in a `shard_map`: batch over the rules' 'batch' axes and heads over 'heads' where they divide;
a Pallas custom call is opaque to XLA's SPMD partitioner, which would otherwise gather every operand.

`target_platform('tpu')` traces for a TPU from any host, as `e4t bench tpu` does for an AOT compile from this
CPU machine; with `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` the kernel also runs on CPU, which
is how its parity (values and gradients) is tested.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # optional_enum_state: no public equivalent

LANES = 128  # the kernel's tile unit along the sequence and (above 128) the head dimensions

# A JAX config state (not a plain context variable) so that it is part of JAX's trace context: a function
# traced once for the CPU is traced again, not reused from the cache, inside `target_platform('tpu')`.
# Also settable for a whole process: E4T_ATTENTION_PLATFORM=tpu.
_PLATFORM = jax_config.optional_enum_state(
    name='e4t_attention_platform', enum_values=('cpu', 'gpu', 'tpu'), default=None,
    help='the platform e4t-jax traces attention for (default: the default backend)',
    include_in_trace_context=True)


def target_platform(platform: str | None):
  """Context manager: trace attention for `platform` ('tpu', 'gpu', 'cpu'; None: the default backend)
  instead of the default backend, e.g. for an AOT compile for a TPU topology from a CPU host."""
  return _PLATFORM(platform)


def platform() -> str:
  """The platform attention is traced for: `target_platform`'s, else `jax.default_backend()`."""
  return _PLATFORM.value or jax.default_backend()


def shape_issue(query: jax.Array, key: jax.Array) -> str | None:
  """Why the kernel does not take these [batch, len, heads, head_dim] operands, or None when it does."""
  if query.shape[1] % LANES or key.shape[1] % LANES:
    return (f'sequence lengths {query.shape[1]} (queries) and {key.shape[1]} (keys) must be multiples of '
            f'{LANES}')
  if query.dtype != key.dtype:
    return f'query and key dtypes differ ({query.dtype}, {key.dtype})'
  return None


def applies(query: jax.Array, key: jax.Array, key_mask: jax.Array | None) -> bool:
  """Whether `implementation='auto'` takes the kernel: tracing for a TPU, no key mask, shapes allowed."""
  return platform() == 'tpu' and key_mask is None and shape_issue(query, key) is None


def _tile(length: int) -> int:
  return next(t for t in (512, 256, LANES) if length % t == 0)


def _kernel(query: jax.Array, key: jax.Array, value: jax.Array, causal: bool, scale: float) -> jax.Array:
  """The kernel on [batch, heads, len, head_dim] operands (one shard's)."""
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
  bq, bk = _tile(query.shape[2]), _tile(key.shape[2])
  blocks = pallas_flash.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
      block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  return pallas_flash.flash_attention(query, key, value, causal=causal, sm_scale=scale, block_sizes=blocks)


def _mesh_specs(batch: int, heads: int):
  """(mesh, PartitionSpec of [batch, heads, len, head_dim]) for the active mesh, or (None, None) when there
  is none (or it has one device)."""
  from jax.sharding import PartitionSpec
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None, None
  batch_axes, head_axes = nn.logical_to_mesh_axes(('batch', 'heads'))

  def fit(axes, size):  # the rule's mesh axes, where their product divides the dimension (else replicated)
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in mesh.shape)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None

  return mesh, PartitionSpec(fit(batch_axes, batch), fit(head_axes, heads), None, None)


def flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool = False) -> jax.Array:
  """Softmax(q k^T / sqrt(head_dim)) v by the Pallas TPU kernel. query: [batch, q_len, heads, head_dim];
  key/value: [batch, kv_len, heads, head_dim]. Returns [batch, q_len, heads, head_dim] in query's dtype."""
  issue = shape_issue(query, key)
  if issue:
    raise ValueError(f"attention implementation 'pallas_tpu' does not take these operands: {issue}.")
  head_dim = query.shape[-1]
  scale = 1.0 / math.sqrt(head_dim)
  padded = head_dim if head_dim <= LANES else -(-head_dim // LANES) * LANES
  to_kernel = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, padded - head_dim),)).transpose(0, 2, 1, 3)
  q, k, v = (to_kernel(x) for x in (query, key, value))
  run = lambda q, k, v: _kernel(q, k, v, causal, scale)
  mesh, spec = _mesh_specs(q.shape[0], q.shape[1])
  if mesh is not None:
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  out = run(q, k, v)
  return out.transpose(0, 2, 1, 3)[..., :head_dim].astype(query.dtype)
