"""Golden sharding test: every parameter of every model lands where its logical axes say.

All four networks (U-Net, VAE, CLIP text, CLIP vision with projection) are initialized with
`sharded_init` on a (data=2, fsdp=2, tensor=2) mesh of the 8 fake CPU devices (tests/conftest.py).
The expected placement of each parameter is derived here, independently of `parallel.mesh`, from
the logical axis names boxed in `abstract_params` and the rules table:

  * each dim takes the mesh axis of the first rule naming its logical axis;
  * a dim the mesh axis size does not divide is replicated instead (documented fallback);
  * every addressable shard is the global array cut evenly by those mesh axes.

A share-of-bytes check makes sure the rules do not silently collapse to replication, and jitted
forwards with sharded params (batch replicated, then split over data x fsdp) must equal unsharded ones.

Cost on a 2-core CPU: jitted sharded init of the tiny U-Net compiles for ~15 s, the VAE ~7 s, the CLIP
towers ~1-2 s each; each model is initialized once per module.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from e4t_jax.models import clip as clip_lib
from e4t_jax.models import unet as unet_lib
from e4t_jax.models import vae as vae_lib
from e4t_jax.parallel import mesh as mesh_lib
from e4t_jax.models.tokenizer import CLIPTokenizer

MESH_SHAPE = {'data': 2, 'fsdp': 2, 'tensor': 2}
BATCH = 4  # sharded over data x fsdp in the forward checks
MIN_SHARDED_BYTES_FRACTION = 0.9
FORWARD_TOLERANCE = 1e-5


class ModelCase(NamedTuple):
  module: nn.Module
  abstract: Callable[[], Any]  # () -> boxed abstract params
  init_args: tuple  # smallest inputs that create every parameter
  init_kwargs: dict = {}  # (SDXL's U-Net: its added conditioning)


def _cases() -> dict[str, ModelCase]:
  unet = unet_lib.UNet(unet_lib.UNetConfig.tiny())
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.tiny())
  text = clip_lib.CLIPTextTransformer(clip_lib.CLIPTextConfig.tiny())
  vision = clip_lib.CLIPVisionTransformer(clip_lib.CLIPVisionConfig.tiny(), with_projection=True)
  # SDXL's layout in miniature (attention-free first level, 1/2 transformer layers, text_time conditioning)
  # and its bigG-style second text encoder with the projection
  sdxl = unet_lib.UNet(unet_lib.UNetConfig(
      sample_size=16, block_out_channels=(32, 64), down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), layers_per_block=1, transformer_layers_per_block=(1, 2),
      norm_num_groups=8, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
      addition_embed_type='text_time', addition_time_embed_dim=8, projection_class_embeddings_input_dim=80))
  text_2 = clip_lib.CLIPTextTransformer(clip_lib.CLIPTextConfig.tiny(hidden_act='gelu'), with_projection=True)
  side = vae.config.downsample_factor
  vision_size = vision.config.image_size
  return {
      'unet': ModelCase(unet, lambda: unet_lib.abstract_params(unet), unet_lib.init_inputs(unet.config)),
      'vae': ModelCase(vae, lambda: vae_lib.abstract_params(vae), (jnp.zeros((1, side, side, 3)),)),
      'text_encoder': ModelCase(text, lambda: clip_lib.abstract_params(text), (jnp.zeros((1, 1), jnp.int32),)),
      'image_encoder': ModelCase(vision, lambda: clip_lib.abstract_params(vision),
                                 (jnp.zeros((1, vision_size, vision_size, 3)),)),
      'sdxl_unet': ModelCase(sdxl, lambda: unet_lib.abstract_params(sdxl), unet_lib.init_inputs(sdxl.config),
                             {'added_cond_kwargs': unet_lib.init_added_cond(sdxl.config)}),
      'text_encoder_2': ModelCase(text_2, lambda: clip_lib.abstract_params(text_2), (jnp.zeros((1, 1), jnp.int32),)),
  }


CASES = _cases()
MODEL_NAMES = tuple(CASES)


# ----------------------------------------------------------------------------- the independent oracle
def _mesh_axes(entry: Any) -> tuple[str, ...]:
  """A rule's right-hand side as a tuple of mesh axis names (None -> ())."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def expected_spec(names: tuple[str | None, ...], shape: tuple[int, ...], rules, mesh_shape: dict[str, int]) -> P:
  """The PartitionSpec a parameter with logical axes `names` and `shape` must have under `rules`."""
  table: dict[str, Any] = {}
  for logical, mesh_axes in rules:
    # The first rule for a name wins; with one rule per name (and no mesh axis used twice, asserted
    # below) this is what flax's logical_to_mesh does too.
    table.setdefault(logical, mesh_axes)
  spec, used = [], []
  for name, dim in zip(names, shape, strict=True):
    assert name is None or name in table, f'logical axis {name!r} has no rule in the rules table'
    axes = _mesh_axes(table.get(name))
    used += axes
    split = math.prod(mesh_shape[a] for a in axes)
    if not axes or dim % split:
      spec.append(None)  # replicated: no rule, or the documented not-divisible fallback
    else:
      spec.append(axes[0] if len(axes) == 1 else axes)
  assert len(used) == len(set(used)), f'logical axes {names} map two dims onto one mesh axis: {used}'
  return P(*spec)


def _split_of(spec: P, mesh_shape: dict[str, int]) -> tuple[int, ...]:
  return tuple(math.prod(mesh_shape[a] for a in _mesh_axes(entry)) for entry in spec)


def _as_dict(tree: Any) -> dict:
  return dict(tree.unfreeze() if hasattr(tree, 'unfreeze') else tree)


def _logical_axes(model: str) -> dict[tuple[str, ...], tuple[tuple[str | None, ...], tuple[int, ...]]]:
  """path -> (logical axis names, shape), read from the boxed metadata of `abstract_params`."""
  out = {}
  # flatten_dict stops at the boxes (nn.Partitioned is not a mapping).
  for path, leaf in traverse_util.flatten_dict(_as_dict(CASES[model].abstract())).items():
    assert isinstance(leaf, nn.Partitioned), f'{model}: {"/".join(path)} carries no logical axis names'
    out[path] = (tuple(leaf.names), tuple(leaf.value.shape))
  return out


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.make_mesh(MESH_SHAPE)


@pytest.fixture(scope='module')
def sharded_params(mesh):
  """Lazily, once per model: params from `sharded_init` with the default rules."""
  cache: dict[str, Any] = {}

  def get(model: str):
    if model not in cache:
      case = CASES[model]
      params, _ = mesh_lib.sharded_init(lambda k: case.module.init(k, *case.init_args, **case.init_kwargs)['params'],
                                        mesh, mesh_lib.DEFAULT_LOGICAL_AXIS_RULES, jax.random.key(0))
      cache[model] = jax.block_until_ready(params)
    return cache[model]

  return get


# ----------------------------------------------------------------------------- placement
@pytest.mark.parametrize('model', MODEL_NAMES)
def test_every_parameter_is_sharded_as_its_logical_axes_and_rules_say(model, mesh, sharded_params):
  params = traverse_util.flatten_dict(_as_dict(sharded_params(model)))
  logical = _logical_axes(model)
  assert params.keys() == logical.keys()
  for path, (names, shape) in logical.items():
    where = f'{model}: {"/".join(path)} {names} {shape}'
    param = params[path]
    assert param.shape == shape, where
    assert isinstance(param.sharding, NamedSharding), where
    assert param.sharding.mesh.shape == mesh.shape, where
    want = expected_spec(names, shape, mesh_lib.DEFAULT_LOGICAL_AXIS_RULES, MESH_SHAPE)
    assert param.sharding.spec == want, f'{where}: spec {param.sharding.spec}, expected {want}'


@pytest.mark.parametrize('model', MODEL_NAMES)
def test_every_shard_is_the_global_array_cut_evenly_by_its_mesh_axes(model, sharded_params):
  params = traverse_util.flatten_dict(_as_dict(sharded_params(model)))
  for path, param in params.items():
    where = f'{model}: {"/".join(path)}'
    split = _split_of(param.sharding.spec, MESH_SHAPE)
    want = tuple(dim // s for dim, s in zip(param.shape, split))
    host = np.asarray(param)
    shards = param.addressable_shards
    assert len(shards) == math.prod(MESH_SHAPE.values()), where
    for shard in shards:
      assert shard.data.shape == want, f'{where}: shard {shard.data.shape}, expected {want} (split {split})'
      np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index], err_msg=where)
    distinct = {tuple((s.start, s.stop) for s in shard.index) for shard in shards}
    assert len(distinct) == math.prod(split), f'{where}: {len(distinct)} distinct pieces for split {split}'


@pytest.mark.parametrize('model', MODEL_NAMES)
def test_most_parameter_bytes_are_sharded_so_the_rules_cannot_collapse_to_replication(model, sharded_params):
  params = jax.tree.leaves(sharded_params(model))
  total = sum(p.nbytes for p in params)
  sharded = sum(p.nbytes for p in params if any(entry is not None for entry in p.sharding.spec))
  fraction = sharded / total
  print(f'{model}: {fraction:.1%} of {total} parameter bytes have a sharded dim')
  assert fraction >= MIN_SHARDED_BYTES_FRACTION, f'{model}: only {fraction:.1%} of parameter bytes are sharded'


def test_a_dim_the_mesh_axis_does_not_divide_falls_back_to_replication(sharded_params):
  # The VAE's conv_in kernel is (3, 3, 3 RGB channels, 32): 'conv_in' -> fsdp cannot split 3 channels.
  kernel = sharded_params('vae')['encoder']['conv_in']['kernel']
  assert kernel.shape == (3, 3, 3, 32)
  assert kernel.sharding.spec == P(None, None, None, 'tensor')
  assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 16)


@pytest.mark.parametrize('model', MODEL_NAMES)
def test_replicated_rules_replicate_every_parameter(model, mesh):
  shardings = traverse_util.flatten_dict(
      _as_dict(mesh_lib.param_shardings(CASES[model].abstract(), mesh, mesh_lib.REPLICATED_RULES)))
  for path, (names, shape) in _logical_axes(model).items():
    sharding = shardings[path]
    assert expected_spec(names, shape, mesh_lib.REPLICATED_RULES, MESH_SHAPE) == P(*(None,) * len(shape))
    assert sharding.is_fully_replicated, f'{model}: {"/".join(path)} {sharding.spec}'


def test_sharded_init_with_replicated_rules_puts_a_full_copy_on_every_device(mesh):
  case = CASES['text_encoder']
  params, _ = mesh_lib.sharded_init(lambda k: case.module.init(k, *case.init_args)['params'], mesh,
                                    mesh_lib.REPLICATED_RULES, jax.random.key(0))
  for param in jax.tree.leaves(params):
    assert param.sharding.is_fully_replicated
    assert all(shard.data.shape == param.shape for shard in param.addressable_shards)


@pytest.mark.parametrize('model', ['text_encoder', 'image_encoder'])
def test_sharded_init_gives_the_same_values_as_an_unsharded_init(model, sharded_params):
  case = CASES[model]
  plain = jax.jit(lambda k: nn.meta.unbox(case.module.init(k, *case.init_args)['params']))(jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded_params(model), plain)


# ----------------------------------------------------------------------------- forwards
def _forward_inputs(model: str) -> tuple:
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  if model in ('unet', 'sdxl_unet'):
    config = CASES[model].module.config
    context = normal(BATCH, 7, config.cross_attention_dims()[0])
    if model == 'sdxl_unet':  # the whole SDXL conditioning as one pytree argument
      context = unet_lib.SDXLContext(states=context, text_embeds=normal(BATCH, config.text_embeds_dim),
                                     time_ids=unet_lib.sdxl_time_ids((1024, 768), (16, 0), batch=BATCH))
    return (normal(BATCH, 8, 8, config.in_channels), jnp.array([1, 250, 500, 999]), context)
  if model in ('text_encoder', 'text_encoder_2'):
    prompts = ['a photo of a cat', 'a painting of a dog on the beach', 'an astronaut', 'sks face, close up']
    return (jnp.asarray(CLIPTokenizer.default()(prompts, max_length=16)),)
  if model == 'image_encoder':
    size = CASES['image_encoder'].module.config.image_size
    return (normal(BATCH, size, size, 3),)
  raise ValueError(model)


def _output_leaves(model: str, out: Any) -> dict[str, jax.Array]:
  if model in ('unet', 'sdxl_unet'):
    return {'sample': out}
  fields = ('last_hidden_state', 'pooled_output') + {'image_encoder': ('image_embeds',),
                                                     'text_encoder_2': ('text_embeds',)}.get(model, ())
  return {name: getattr(out, name) for name in fields}


def _check_forward(model: str, mesh, params, batch_axes) -> None:
  module = CASES[model].module
  inputs = _forward_inputs(model)
  apply = lambda p, *xs: module.apply({'params': p}, *xs)
  # Unsharded: host params, one device.
  reference = _output_leaves(model, jax.jit(apply)(jax.device_get(params), *inputs))
  # Sharded: params where sharded_init put them; the batch replicated or split over `batch_axes`.
  placed = [jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(batch_axes, *(None,) * (a.ndim - 1)))), x)
            for x in inputs]
  with mesh_lib.activation_sharding(mesh):  # the models' activation constraints are live while tracing
    out = _output_leaves(model, jax.jit(apply)(params, *placed))
  for name, ref in reference.items():
    diff = float(jnp.max(jnp.abs(out[name] - ref)))
    print(f'{model}.{name} (batch over {batch_axes}): max |sharded - unsharded| = {diff:.2e}, '
          f'output scale {float(jnp.max(jnp.abs(ref))):.2f}')
    assert out[name].shape == ref.shape
    assert diff <= FORWARD_TOLERANCE, f'{model}.{name}: max |sharded - unsharded| = {diff}'


@pytest.mark.parametrize('model', ['unet', 'text_encoder', 'image_encoder', 'sdxl_unet', 'text_encoder_2'])
def test_forward_with_sharded_params_equals_the_unsharded_forward(model, mesh, sharded_params):
  _check_forward(model, mesh, sharded_params(model), batch_axes=None)


# XLA's SPMD partitioner (jax/jaxlib 0.10.2, GSPMD and Shardy alike) miscompiles `h + h @ w_out` when
# h is [batch over (data, fsdp), ..., tensor] and w_out is ('heads'|'mlp', 'embed') -> P('tensor', 'fsdp'):
# it collective-permutes the batch of h into (fsdp, data) order for the dot and never permutes the
# product back, so batch rows 1 and 2 (where the data and fsdp coordinates differ) receive each other's
# out-projection. It shows at width 64 (the tiny U-Net's second level), not at 32 (the tiny CLIP towers).
# `with_sharding_constraint(h @ w_out, P(('data', 'fsdp'), None, None))` on the out-projections avoids
# it: `layers.Dense(constrain_output=True)` does that under `mesh.activation_sharding`, which is how the
# batch-sharded U-Net test above passes. The minimal reproduction below stays a strict xfail: it starts
# passing (and so fails as XPASS) once XLA is fixed, telling us the workaround may go.
_PARTITIONER_BUG = pytest.mark.xfail(
    strict=True, reason='XLA SPMD partitioner mis-orders the batch of an fsdp/tensor-sharded '
    'out-projection (jaxlib 0.10.2); the models work around it with activation constraints')


@pytest.mark.parametrize('model', ['unet', 'text_encoder', 'image_encoder', 'sdxl_unet', 'text_encoder_2'])
def test_forward_with_sharded_params_and_batch_equals_the_unsharded_forward(model, mesh, sharded_params):
  _check_forward(model, mesh, sharded_params(model), batch_axes=('data', 'fsdp'))


@_PARTITIONER_BUG
def test_xla_partitions_a_residual_out_projection_with_a_data_and_fsdp_sharded_batch(mesh):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((BATCH, 16, 64)).astype(np.float32)
  w_in, w_out = (rng.standard_normal((64, 64)).astype(np.float32) / 8 for _ in range(2))
  block = jax.jit(lambda x, w_in, w_out: (lambda h: h + h @ w_out)(x @ w_in))
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  out = block(put(x, ('data', 'fsdp')), put(w_in, 'fsdp', 'tensor'), put(w_out, 'tensor', 'fsdp'))
  np.testing.assert_allclose(np.asarray(out), np.asarray(block(x, w_in, w_out)), atol=1e-5)
