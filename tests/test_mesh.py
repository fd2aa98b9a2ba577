"""The (data, fsdp, tensor) mesh and logical-axis sharding helpers."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from e4t_jax.errors import ConfigError
from e4t_jax.models.layers import Attention
from e4t_jax.parallel import mesh as mesh_lib


def test_mesh_shape_from_dict_and_rest_axis():
  mesh = mesh_lib.make_mesh({'data': -1, 'tensor': 2})
  assert dict(mesh.shape) == {'data': len(jax.devices()) // 2, 'fsdp': 1, 'tensor': 2}


def test_mesh_rejects_wrong_device_count():
  with pytest.raises(ConfigError, match='needs 16 devices'):
    mesh_lib.make_mesh({'data': 4, 'fsdp': 4})


def test_spec_falls_back_to_replication_when_dim_not_divisible():
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert mesh_lib.fit_spec_to_shape(P('fsdp', 'tensor'), (3, 8), mesh) == P(None, 'tensor')


def test_sharded_init_places_shards_without_full_copies():
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  module = Attention(heads=2, head_dim=8)
  x = jnp.zeros((2, 4, 16))
  params, _ = mesh_lib.sharded_init(lambda k: module.init(k, x)['params'], mesh,
                                    mesh_lib.DEFAULT_LOGICAL_AXIS_RULES, jax.random.key(0))
  q = params['to_q']['kernel']
  assert q.sharding.spec == P('fsdp', 'tensor')
  assert q.addressable_shards[0].data.shape == (8, 8)
  out = module.apply({'params': params}, x)
  assert out.shape == (2, 4, 16)
