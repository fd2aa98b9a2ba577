"""One named device mesh (`data`, `fsdp`, `tensor`) and logical-axis sharding of parameter trees.

Sharding is configuration, not code: modules annotate parameters with logical axis names
(`models/layers.py`), the config holds `logical_axis_rules` mapping those names to mesh axes, and the
helpers here turn an abstract params tree (from `jax.eval_shape(model.init, ...)`) into
`NamedSharding`s for `jax.jit(..., out_shardings=...)` — so a sharded init never materializes a full
copy on one device.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e4t_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis name -> mesh axis (or None: replicated). Weights are fsdp-sharded on their input side
# and tensor-sharded on their output side; activations' batch goes over data x fsdp.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('conv_in', 'fsdp'),
    ('conv_out', 'tensor'),
    ('conv_height', None),
    ('conv_width', None),
    ('vocab', 'tensor'),
    ('position', None),
    ('norm', None),
    ('layers', None),  # the stacking axis of scanned CLIP layers (models.clip): every device holds all layers
)

# Rules that keep every parameter replicated (pure data parallelism, e.g. for frozen weights).
REPLICATED_RULES: tuple[tuple[str, Any], ...] = tuple((name, None) for name, _ in DEFAULT_LOGICAL_AXIS_RULES)


def make_mesh(shape: dict[str, int] | Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh.

  Args:
    shape: sizes per axis, as a dict or a 3-sequence; one size may be -1 ("the rest of the devices").
      None puts every device on `data`.
    devices: defaults to all devices (every process's, for multi-host). Devices of several TPU slices
      (`slice_index`) make a hybrid mesh: `data` over the slices' data-center network, the rest inside each.
  """
  devices = list(devices if devices is not None else jax.devices())
  if shape is None:
    sizes = [len(devices), 1, 1]
  elif isinstance(shape, dict):
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
      raise ConfigError(f'mesh shape has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}.')
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
    if len(sizes) != len(MESH_AXES):
      raise ConfigError(f'mesh shape {tuple(sizes)} must have {len(MESH_AXES)} entries {MESH_AXES}.')
  if sizes.count(-1) > 1:
    raise ConfigError(f'mesh shape {tuple(sizes)}: at most one axis may be -1.')
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    sizes[sizes.index(-1)] = len(devices) // max(known, 1)
  if math.prod(sizes) != len(devices):
    raise ConfigError(f'mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                      f'but {len(devices)} are available.')
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:  # multi-slice: `data` spans the slices (DCN), every other axis stays inside one (ICI)
    if sizes[0] % slices:
      raise ConfigError(f'mesh shape {dict(zip(MESH_AXES, sizes))} on {slices} TPU slices: the data axis spans '
                        f'the slices, so it must be a multiple of {slices} (e.g. --mesh.data {slices}).')
    ici = [sizes[0] // slices] + sizes[1:]
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, [slices, 1, 1], devices), MESH_AXES)
  try:
    device_grid = mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # non-TPU topologies or fake CPU devices: plain reshape is fine
    device_grid = np.asarray(devices).reshape(sizes)
  return Mesh(device_grid, MESH_AXES)


def _mesh_axis_size(mesh: Mesh, axis: Any) -> int:
  if axis is None:
    return 1
  if isinstance(axis, (tuple, list)):
    return math.prod(mesh.shape[a] for a in axis)
  return mesh.shape[axis]


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dims they do not divide (e.g. 4 latent channels over 8 devices): replicate."""
  fitted = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    fitted.append(axis if axis is not None and dim % _mesh_axis_size(mesh, axis) == 0 else None)
  return PartitionSpec(*fitted)


def logical_partition_specs(abstract_params: Any, rules: Sequence[tuple[str, Any]]) -> Any:
  """Boxed (nn.Partitioned) params tree -> tree of mesh PartitionSpecs, by the rules."""
  logical = nn.get_partition_spec(abstract_params)
  return nn.logical_to_mesh(logical, rules)


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """NamedSharding for every leaf of a boxed abstract params tree (unboxed structure)."""
  specs = logical_partition_specs(abstract_params, rules)
  shapes = nn.meta.unbox(abstract_params)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, fit_spec_to_shape(spec, leaf.shape, mesh)),
      specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharded_init(init_fn, mesh: Mesh, rules: Sequence[tuple[str, Any]], *args) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` (returning a boxed params tree) directly into its shardings.

  Returns (unboxed params placed on the mesh, their shardings). The abstract evaluation gives shapes
  and logical axes; the jitted init then writes each shard where it lives.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)
  params = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES):
  """Makes the models' activation constraints (`nn.with_logical_constraint`) live while tracing.

  Trace (call) jitted model code inside this context when its inputs are sharded over the mesh.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
