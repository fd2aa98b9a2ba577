"""Low-rank weight offsets: identity at init, functional merge, cheap exact L2."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.errors import ConfigError


def _fake_unet_params(key):
  k = jax.random.split(key, 4)
  block = lambda kk: {'attn1': {n: {'kernel': jax.random.normal(kk, (8, 12))} for n in ('to_q', 'to_k', 'to_v')}
                      | {'to_out_0': {'kernel': jax.random.normal(kk, (12, 8)), 'bias': jnp.zeros(8)}},
                      'ff': {'net_2': {'kernel': jax.random.normal(kk, (16, 8))}}}
  return {'down_blocks_0': {'transformer_blocks_0': block(k[0])}, 'mid_block': {'transformer_blocks_0': block(k[1])},
          'conv_in': {'kernel': jax.random.normal(k[2], (3, 3, 4, 8))}}


def test_targets_are_qkv_only():
  params = _fake_unet_params(jax.random.key(0))
  paths = offsets_lib.target_paths(params, offsets_lib.OffsetsConfig())
  assert len(paths) == 6 and all(p.rsplit('/', 1)[1] in ('to_q', 'to_k', 'to_v') for p in paths)


@pytest.mark.parametrize('mode', offsets_lib.MODES)
def test_weight_offsets_start_as_identity(mode):
  params = _fake_unet_params(jax.random.key(0))
  config = offsets_lib.OffsetsConfig(rank=2, mode=mode)
  offsets = offsets_lib.init_offsets(jax.random.key(1), params, config)
  merged = offsets_lib.merge_offsets(params, offsets, mode)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(a, b)
  assert float(offsets_lib.offsets_l2(offsets)) == 0.0


def test_merge_changes_only_targets_and_is_functional():
  params = _fake_unet_params(jax.random.key(0))
  config = offsets_lib.OffsetsConfig(rank=2, targets=(r'attn1/to_k$',))
  offsets = offsets_lib.init_offsets(jax.random.key(1), params, config)
  offsets = jax.tree.map(lambda x: x + 0.5, offsets)
  before = jax.tree.map(np.array, params)
  merged = offsets_lib.merge_offsets(params, offsets)
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_m = dict(jax.tree_util.tree_flatten_with_path(merged)[0])
  for path, value in flat_b:
    changed = not np.array_equal(value, flat_m[path])
    assert changed == ('to_k' in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)):  # input untouched
    np.testing.assert_array_equal(a, b)


def test_multiplicative_mode_scales_weights():
  params = _fake_unet_params(jax.random.key(0))
  offsets = offsets_lib.init_offsets(jax.random.key(1), params, offsets_lib.OffsetsConfig(rank=3))
  offsets = jax.tree.map(lambda x: x + 0.1, offsets)
  merged = offsets_lib.merge_offsets(params, offsets, 'multiplicative')
  path = 'mid_block/transformer_blocks_0/attn1/to_v'
  w = params['mid_block']['transformer_blocks_0']['attn1']['to_v']['kernel']
  expected = w * (1 + offsets[path]['down'] @ offsets[path]['up'])
  np.testing.assert_allclose(merged['mid_block']['transformer_blocks_0']['attn1']['to_v']['kernel'], expected, rtol=1e-6)


def test_l2_equals_frobenius_norm_of_delta():
  params = _fake_unet_params(jax.random.key(0))
  offsets = offsets_lib.init_offsets(jax.random.key(1), params, offsets_lib.OffsetsConfig(rank=3))
  offsets = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), offsets)
  direct = sum(float(jnp.sum(offsets_lib.offset_matrix(p) ** 2)) for p in offsets.values())
  np.testing.assert_allclose(float(offsets_lib.offsets_l2(offsets)), direct, rtol=1e-5)


def test_bad_config_is_a_clear_error():
  with pytest.raises(ConfigError, match='mode'):
    offsets_lib.OffsetsConfig(mode='mystery')
  with pytest.raises(ConfigError, match='match no'):
    offsets_lib.target_paths(_fake_unet_params(jax.random.key(0)), offsets_lib.OffsetsConfig(targets=('nothing',)))


_MANY_SHAPES_FACTORIZED = textwrap.dedent("""
    import os, sys
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0], cpus[-1]})  # XLA:CPU sizes its intra-op pool by these: 2 threads
    import jax, jax.numpy as jnp, numpy as np
    from e4t_jax.e4t import offsets
    shapes = [(10, 864, 96), (10, 432, 48), (8, 96, 288), (6, 192, 96), (4, 1728, 96), (12, 64, 64)]
    rng = np.random.default_rng(0)
    deltas = {f'{i}/{j}': jnp.asarray(rng.standard_normal(s[1:]), jnp.float32)
              for i, s in enumerate(shapes) for j in range(s[0])}
    for method in offsets.FACTORIZATIONS:
      factorize = jax.jit(lambda d: offsets.low_rank_factors_many(d, 16, method))
      for _ in range(4):
        jax.block_until_ready(factorize(deltas))
    print('ok')
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs 2 CPUs for a 2-thread pool')
def test_factorizing_many_shapes_does_not_deadlock_a_two_thread_pool():
  # jaxlib's CPU SVD / eigh kernels block their pool thread while their batch runs on the same pool: two of
  # them at once on a 2-thread pool waited on each other forever (paper mode hung mid-evaluation; this script
  # hung at its first call). low_rank_factors_many orders them one after another.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run([sys.executable, '-c', _MANY_SHAPES_FACTORIZED], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]
