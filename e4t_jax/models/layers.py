"""Building blocks shared by every network: annotated Dense/Conv/Norm layers and the one attention.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the mapping from
logical names to mesh axes lives in the config (`parallel.mesh.DEFAULT_LOGICAL_AXIS_RULES`), never here.

Logical axis vocabulary:
  embed       model width on the input side of a projection
  mlp         hidden width of a feed-forward layer, or the output side of a projection head
  heads       flattened heads * head_dim of a Q/K/V projection
  conv_in / conv_out / conv_height / conv_width   the four axes of a conv kernel (HWIO)
  norm        scale/bias of a normalization layer
  vocab       rows of a token-embedding table
  position    rows of a position-embedding table

Parameter names mirror the PyTorch reference (diffusers / transformers) with `.N` list indices
written `_N` (e.g. `to_out_0`), so one generic converter (`convert.common`) maps every model.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src import config as jax_config  # optional_enum_state: no public equivalent

from e4t_jax.models import tpu_attention

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.lecun_normal()


class Dense(nn.Dense):
  """nn.Dense that can pin its output's sharding to "batch only".

  Output projections back to the residual width ('embed') constrain their result to be sharded over
  the batch and replicated otherwise. Besides being the layout the residual stream wants, this avoids
  an XLA SPMD partitioner bug (jaxlib 0.10.2) that swaps batch rows of `h + h @ w_out` when the batch
  is split over (data, fsdp) and w_out over (tensor, fsdp) (tests/test_sharding.py reproduces it).
  The constraint is a no-op unless a mesh and logical-axis rules are active
  (`parallel.mesh.activation_sharding`).
  """
  constrain_output: bool = False

  def __call__(self, inputs: jax.Array) -> jax.Array:
    out = super().__call__(inputs)
    if self.constrain_output:
      out = nn.with_logical_constraint(out, ('batch',) + (None,) * (out.ndim - 1))
    return out


def dense(features: int, axes: Axes, *, name: str, use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init=default_kernel_init) -> nn.Dense:
  """A Dense layer whose kernel is annotated `axes` = (in_axis, out_axis) and bias `(out_axis,)`."""
  return Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      constrain_output=axes[-1] == 'embed',
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def conv(features: int, kernel_size: int, *, name: str, stride: int = 1, padding: int | str | None = None,
         use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """An NHWC conv (HWIO kernel) with symmetric `kernel_size // 2` padding unless given."""
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
      use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(
          default_kernel_init, ('conv_height', 'conv_width', 'conv_in', 'conv_out')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('conv_out',)))


def group_norm(num_groups: int, *, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm as in PyTorch (statistics in float32, matching `torch.nn.GroupNorm`)."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)))


def layer_norm(*, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)))


def embed(num_embeddings: int, features: int, axes: Axes, *, name: str, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Embed:
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                          causal: bool = False, key_mask: jax.Array | None = None,
                          upcast: bool = False, implementation: str | None = None) -> jax.Array:
  """Scaled dot-product attention, the single implementation used by the U-Net, VAE and CLIP.

  Args:
    query: [batch, q_len, heads, head_dim]; key/value: [batch, kv_len, heads, head_dim].
    causal: mask future positions (CLIP text).
    key_mask: optional [batch, kv_len] bool, True where a key may be attended to.
    upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`, SD 2.1).
    implementation: 'auto' or None (a fused flash attention where one applies: on a GPU cuDNN's, for
      bfloat16/float16 inputs, head_dim a multiple of 8 up to 128, no key mask; on a TPU the Pallas kernel
      (`tpu_attention`), for sequence lengths that are multiples of 128, no key mask; XLA's reference
      attention elsewhere; on CPU, unmasked non-causal attention is `deferred_softmax_attention`, see
      `auto_cpu_attention`), 'xla' (always the reference), 'xla_deferred' (`deferred_softmax_attention`;
      no mask, not causal), 'cudnn' or 'pallas_tpu' (always that kernel; fails where unsupported). The
      platform is `tpu_attention.target_platform`'s, else the default backend's.
  Returns:
    [batch, q_len, heads, head_dim] in the query's dtype.
  """
  out_dtype = query.dtype
  if upcast:
    query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
  mask = None
  if key_mask is not None:
    mask = key_mask[:, None, None, :].astype(bool)  # [batch, 1, 1, kv_len]
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}.')
  if implementation == 'pallas_tpu' and key_mask is not None:
    raise ValueError("attention implementation 'pallas_tpu' takes no key mask.")
  if implementation == 'pallas_tpu' or (implementation in (None, 'auto')
                                        and tpu_attention.applies(query, key, key_mask)):
    return tpu_attention.flash_attention(query, key, value, causal=causal).astype(out_dtype)
  if implementation in (None, 'auto'):
    implementation = 'xla'
    if mask is None and not causal and tpu_attention.platform() == 'cpu':
      implementation = _AUTO_CPU.value or 'xla_deferred'
    elif mask is None and fused_attention_applies(query, key):
      try:  # cuDNN checks its version and the shapes while tracing: fall back where it declines
        out = jax.nn.dot_product_attention(query, key, value, is_causal=causal, implementation='cudnn')
        return out.astype(out_dtype)
      except (ValueError, NotImplementedError, RuntimeError):
        pass
  if implementation == 'xla_deferred':
    if mask is not None or causal:
      raise ValueError("attention implementation 'xla_deferred' takes no key mask and is not causal.")
    return deferred_softmax_attention(query, key, value).astype(out_dtype)
  out = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=causal,
                                     implementation=implementation)
  return out.astype(out_dtype)


ATTENTION_IMPLEMENTATIONS = (None, 'auto', 'xla', 'xla_deferred', 'cudnn', 'pallas_tpu')

# What 'auto' runs on CPU for unmasked, non-causal attention; part of JAX's trace context, so that a function
# traced under one choice is traced again under the other (see `auto_cpu_attention`).
_AUTO_CPU = jax_config.optional_enum_state(
    name='e4t_auto_cpu_attention', enum_values=('xla', 'xla_deferred'), default=None,
    help="what implementation='auto' runs on CPU for unmasked attention (default: xla_deferred)",
    include_in_trace_context=True)


def auto_cpu_attention(implementation: str | None):
  """Context manager: what `implementation='auto'` (or None) runs on CPU for unmasked, non-causal attention:
  'xla_deferred' (the default: `deferred_softmax_attention`, 1.5x faster in the demo's training step) or
  'xla' (jax.nn's reference, what `e4t demo-train` trained the shipped model with; None: the default)."""
  return _AUTO_CPU(implementation)


def deferred_softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """Unmasked attention in XLA ops, arranged for XLA:CPU ('xla_deferred'): heads moved ahead of the tokens
  before the two batched matmuls (no transposes of the [batch, heads, q, kv] scores), and the softmax's
  division deferred past the value matmul (it divides q x head_dim outputs, not q x kv probabilities).
  The same function as the reference to float rounding; `e4t bench demo-train` measures the difference
  in the demo's training step. Shapes as `dot_product_attention`."""
  scale = query.shape[-1] ** -0.5
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))  # [batch, heads, tokens, head_dim]
  scores = jnp.einsum('bnth,bnsh->bnts', q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
  out = jnp.einsum('bnts,bnsh->bnth', weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / weights.sum(axis=-1, keepdims=True)
  return out.transpose(0, 2, 1, 3)


def fused_attention_applies(query: jax.Array, key: jax.Array) -> bool:
  """Whether `jax.nn.dot_product_attention(implementation='cudnn')` takes these operands: the platform
  traced for is a GPU (`tpu_attention.platform`), the dtype is bfloat16/float16, head_dim is a multiple of
  8 up to 128 and both sequence lengths are multiples of 64 (the flash-attention kernel's limits, its
  backward's included): the U-Net's self-attention. Elsewhere (CPU, TPU, float32, cross-attention to 77
  text tokens, CLIP's 257 patches, the VAE's 512-wide head) the reference XLA attention runs."""
  head_dim = query.shape[-1]
  return (tpu_attention.platform() == 'gpu' and query.dtype in (jnp.bfloat16, jnp.float16)
          and key.dtype == query.dtype and head_dim % 8 == 0 and head_dim <= 128
          # its backward pass takes sequence lengths in multiples of 64 only (not the 77 text tokens)
          and query.shape[1] % 64 == 0 and key.shape[1] % 64 == 0)


class Attention(nn.Module):
  """Multi-head attention with named Q/K/V/out projections.

  `projection_names` picks the reference's parameter names: diffusers ('to_q', 'to_k', 'to_v',
  'to_out_0') or CLIP ('q_proj', 'k_proj', 'v_proj', 'out_proj'). The E4T weight offsets target the
  Q/K/V kernels by these names (they are merged into the params tree, not into this module).
  """
  heads: int
  head_dim: int
  out_features: int | None = None
  qkv_bias: bool = False
  out_bias: bool = True
  upcast: bool = False
  projection_names: Sequence[str] = ('to_q', 'to_k', 'to_v', 'to_out_0')
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, context: jax.Array | None = None, *, causal: bool = False,
               key_mask: jax.Array | None = None) -> jax.Array:
    # hidden: [batch, tokens, width]; context: [batch, context_tokens, context_width] (cross-attention)
    q_name, k_name, v_name, out_name = self.projection_names
    context = hidden if context is None else context
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, ('embed', 'heads'), name=q_name, use_bias=self.qkv_bias, **kw)(hidden)
    k = dense(inner, ('embed', 'heads'), name=k_name, use_bias=self.qkv_bias, **kw)(context)
    v = dense(inner, ('embed', 'heads'), name=v_name, use_bias=self.qkv_bias, **kw)(context)
    split = lambda x: x.reshape(x.shape[:-1] + (self.heads, self.head_dim))
    out = dot_product_attention(split(q), split(k), split(v), causal=causal, key_mask=key_mask,
                                upcast=self.upcast, implementation=self.implementation)
    out = out.reshape(out.shape[:-2] + (inner,))
    out_features = self.out_features or hidden.shape[-1]
    return dense(out_features, ('heads', 'embed'), name=out_name, use_bias=self.out_bias, **kw)(out)


# ----------------------------------------------------------------------------- abstract shapes, memoized
# Tracing a model's init for its parameter shapes costs seconds (a U-Net: ~1 s on CPU, even tiny), and a
# start-up asks for the same shapes several times (random init, shardings, the trainable split, the
# encoder's example inputs). Shapes depend on the module's fields and the inputs' shapes only.
_SHAPES: collections.OrderedDict = collections.OrderedDict()
_SHAPES_SIZE = 256


def memoized_shapes(cache_key: Any, compute: Callable[[], Any]) -> Any:
  """`compute()` (a tree of `jax.ShapeDtypeStruct`s) once per hashable `cache_key`; each call gets its own
  copy of the tree's containers. An unhashable key (a module holding an array) just computes."""
  try:
    key = (cache_key, jax.config.jax_enable_x64)
    hash(key)
  except TypeError:
    return compute()
  if key in _SHAPES:
    _SHAPES.move_to_end(key)
  else:
    _SHAPES[key] = compute()
    while len(_SHAPES) > _SHAPES_SIZE:
      _SHAPES.popitem(last=False)
  return jax.tree.map(lambda leaf: leaf, _SHAPES[key])


def shape_key(tree: Any) -> Any:
  """A hashable stand-in for `tree` by its structure and its arrays' shapes and dtypes (other leaves as they are)."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, 'shape') and hasattr(x, 'dtype') else x
                        for x in leaves)


def abstract_init(module: nn.Module, *inputs: Any, **kwargs: Any) -> Any:
  """`jax.eval_shape(module.init, key, *inputs, **kwargs)`: the variables as ShapeDtypeStructs (boxed with
  their logical axes), traced once per module and input shapes (`memoized_shapes`). `inputs` may be
  arrays or ShapeDtypeStructs; `kwargs` are passed as they are (concrete)."""
  return memoized_shapes(('init', module, shape_key((inputs, kwargs))),
                         lambda: jax.eval_shape(lambda *x: module.init(jax.random.key(0), *x, **kwargs), *inputs))


def host_init(abstract_params: Any, seed: int = 0) -> Any:
  """Random params drawn on the host with numpy, by leaf name, from an abstract (eval_shape) tree.

  A jitted `model.init` compiles one RNG program per parameter (~15 s for even a tiny U-Net on CPU);
  this takes milliseconds and follows the same initializers: `kernel` LeCun-normal (fan-in = all but
  the last axis), `bias` zeros, `scale` ones, `embedding` and any other leaf N(0, 0.02²).
  Returns an unboxed tree of float32 numpy arrays.
  """
  import numpy as np
  from flax import traverse_util
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params))
  out = {}
  for path, leaf in sorted(flat.items()):
    shape, name = tuple(leaf.shape), path[-1]
    if name == 'bias':
      value = np.zeros(shape, np.float32)
    elif name == 'scale':
      value = np.ones(shape, np.float32)
    elif name == 'kernel':
      fan_in = int(np.prod(shape[:-1])) or 1
      value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in, dtype=np.float32)
    else:
      value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    out[path] = value
  return traverse_util.unflatten_dict(out)
