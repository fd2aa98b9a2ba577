"""Regularized low-rank weight offsets on the U-Net's attention projections (E4T, Sec. 3.2).

The offsets are a separate params subtree, keyed by the target kernel's path in the U-Net params
(e.g. 'down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k'), each a low-rank pair
  down: [in, rank]   up: [rank, out]     ΔW = down @ up
merged functionally into a copy of the frozen tree, never mutating it:
  additive        W' = W + ΔW                (default; exportable as a LoRA)
  multiplicative  W' = W ⊙ (1 + ΔW)          (the reference implementation's form)
`up` starts at zero, so a fresh set of offsets leaves the pretrained U-Net exactly as it was.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e4t_jax.errors import ConfigError

# Q, K and V projections of every self- (attn1) and cross-attention (attn2) layer of the U-Net.
DEFAULT_TARGETS = (r'attn[12]/to_[qkv]$',)
MODES = ('additive', 'multiplicative')


@dataclasses.dataclass(frozen=True)
class OffsetsConfig:
  rank: int = 4
  mode: str = 'additive'
  # Regexes matched (re.search) against the kernel's module path, e.g. 'mid_block/.../attn2/to_q'.
  # Empty: no weight offsets at all (the "no offsets" ablation; only the embedding is personalized).
  targets: Sequence[str] = DEFAULT_TARGETS
  # Standard deviation of the `down` factor's initialization (scaled by 1/sqrt(in) below).
  init_scale: float = 1.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f'weight offsets mode {self.mode!r} is not one of {MODES}.')
    if self.rank < 1:
      raise ConfigError(f'weight offsets rank must be >= 1, got {self.rank}.')


def target_paths(unet_params: Mapping[str, Any], config: OffsetsConfig) -> list[str]:
  """Module paths ('a/b/to_q') of the 2-D kernels the offsets apply to, in a stable order."""
  patterns = [re.compile(p) for p in config.targets]
  paths = []
  for path, leaf in traverse_util.flatten_dict(dict(unet_params)).items():
    module_path = '/'.join(path[:-1])
    if path[-1] == 'kernel' and len(leaf.shape) == 2 and any(p.search(module_path) for p in patterns):
      paths.append(module_path)
  if not paths and config.targets:
    raise ConfigError(f'weight offsets targets {list(config.targets)} match no 2-D kernel of the U-Net.')
  return sorted(paths)


def init_offsets(key: jax.Array, unet_params: Mapping[str, Any], config: OffsetsConfig) -> dict[str, dict[str, jax.Array]]:
  """Zero-effect offsets: `down` random (so gradients reach `up`), `up` zero."""
  flat = traverse_util.flatten_dict(dict(unet_params))
  offsets = {}
  paths = target_paths(unet_params, config)
  for path, k in zip(paths, jax.random.split(key, max(len(paths), 1))):
    fan_in, fan_out = flat[tuple(path.split('/')) + ('kernel',)].shape
    offsets[path] = {
        'down': config.init_scale * jax.random.normal(k, (fan_in, config.rank), jnp.float32) / jnp.sqrt(fan_in),
        'up': jnp.zeros((config.rank, fan_out), jnp.float32),
    }
  return offsets


def offset_matrix(pair: Mapping[str, jax.Array]) -> jax.Array:
  return pair['down'] @ pair['up']  # [in, out]


def fits_kernel(pair: Mapping[str, Any], kernel_shape: Sequence[int]) -> bool:
  """Whether a (down [in, r], up [r, out]) pair is a delta of this kernel: a Dense [in, out] or a conv
  [kh, kw, in, out] kernel read as [kh * kw * in, out]."""
  down, up = np.shape(pair['down']), np.shape(pair['up'])
  return (len(down) == 2 and len(up) == 2 and down[1] == up[0] and len(kernel_shape) >= 2
          and down[0] == int(np.prod(kernel_shape[:-1])) and up[1] == kernel_shape[-1])


def merge_offsets(unet_params: Mapping[str, Any], offsets: Mapping[str, Mapping[str, jax.Array]],
                  mode: str = 'additive') -> dict:
  """A new U-Net params tree with the offsets folded into their target kernels (Dense or conv)."""
  if mode not in MODES:
    raise ConfigError(f'weight offsets mode {mode!r} is not one of {MODES}.')
  flat = traverse_util.flatten_dict(dict(unet_params))
  for path, pair in offsets.items():
    key = tuple(path.split('/')) + ('kernel',)
    if key not in flat:
      raise ConfigError(f'weight offset for {path!r} has no matching U-Net kernel (offsets from another model?).')
    kernel = flat[key]
    delta = offset_matrix(pair).reshape(kernel.shape).astype(kernel.dtype)
    flat[key] = kernel + delta if mode == 'additive' else kernel * (1 + delta)
  return traverse_util.unflatten_dict(flat)


FACTORIZATIONS = ('svd', 'randomized')
# Randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4): the range of A from A @ Omega with
# `RANDOMIZED_OVERSAMPLE` extra columns, refined by `RANDOMIZED_POWER_ITERATIONS` rounds of subspace iteration.
RANDOMIZED_OVERSAMPLE = 16
RANDOMIZED_POWER_ITERATIONS = 2


def low_rank_factors(delta: jax.Array, rank: int, method: str = 'svd') -> dict[str, jax.Array]:
  """The best rank-`rank` additive pair of a kernel delta (truncated SVD, Eckart-Young), split evenly:
  down = U_r sqrt(S_r) [in, r], up = sqrt(S_r) V_r^T [r, out]; a conv delta is read as [kh * kw * in, out].
  The rank is capped at the matrix's own, where the pair is exact up to float rounding. `method`: see
  `low_rank_factors_many`."""
  return low_rank_factors_many({'': delta}, rank, method)['']


def low_rank_factors_many(deltas: Mapping[str, jax.Array], rank: int,
                          method: str = 'svd') -> dict[str, dict[str, jax.Array]]:
  """`low_rank_factors` of every delta, batched per distinct matrix shape (SD 1.5's 282 tuned kernels are 36
  shapes). The pairs are SVD-ordered (`truncate_factors` cuts them further) by either method:

    'svd'         the exact truncated SVD (one batched SVD op per shape; a LAPACK / cuSOLVER call on CPU and
                  GPU). On TPU each SVD op expands at compile time into a QDWH + spectral divide-and-conquer
                  program whose compile grows with the matrix: one 4 x 1280 x 1280 SVD took over 10 minutes
                  of TPU compile on a 2-core host, which put SD 1.5's paper program out of reach.
    'randomized'  a randomized range finder with subspace iteration, then the exact SVD of the small
                  projected matrix, from matmuls and eighs of (rank + oversample)-sized Gram matrices only
                  (`randomized_factors`): seconds of TPU compile per shape; its residual ||A - down @ up||_F
                  measured within 0.6% of the optimum (Eckart-Young) at rank 16 on flat, power-law,
                  exponential and low-rank-plus-noise spectra, and exact when the matrix's rank is at most
                  rank + oversample.
  """
  if method not in FACTORIZATIONS:
    raise ConfigError(f'factorization {method!r} is not one of {FACTORIZATIONS}.')
  groups: dict[tuple[int, int], list[str]] = {}
  for path, delta in deltas.items():
    groups.setdefault((math.prod(delta.shape[:-1]), delta.shape[-1]), []).append(path)
  factors, previous = {}, None
  for shape, paths in groups.items():
    matrices = jnp.stack([deltas[p].reshape(shape).astype(jnp.float32) for p in paths])
    if previous is not None:
      # One factorization at a time: jaxlib's CPU LAPACK kernels (SVD, eigh) split their batch over XLA:CPU's
      # intra-op thread pool and block the calling pool thread until it is done, so two of them that XLA runs
      # concurrently can take every thread of a small pool and wait on each other forever (jaxlib 0.10.2, a
      # 2-thread pool: paper mode hung mid-evaluation; tests/test_offsets.py). XLA:CPU orders its ops by the
      # buffers they read (an optimization_barrier orders nothing there), so each shape's matrices read one
      # element of the previous shape's result (times zero, which XLA keeps for floats: 0 * inf is NaN).
      matrices = matrices + 0.0 * previous.reshape(-1)[0]
    r = min(rank, *shape)
    if method == 'randomized':
      down, up = randomized_factors(matrices, r)
    else:
      u, s, vt = jnp.linalg.svd(matrices, full_matrices=False)
      root = jnp.sqrt(s[:, :r])
      down, up = u[:, :, :r] * root[:, None, :], root[:, :, None] * vt[:, :r]
    previous = up
    factors.update({p: {'down': down[i], 'up': up[i]} for i, p in enumerate(paths)})
  return {p: factors[p] for p in deltas}  # in the given order


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32 on every backend (TPU's default f32 matmul is one bfloat16 pass).
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _orthonormal_columns(y: jax.Array) -> jax.Array:
  """An orthonormal basis of the columns of y [..., m, k] (k small) from the eigh of its k x k Gram matrix,
  done twice for orthogonality in float32 (as CholeskyQR2); directions below the Gram's float32 resolution
  (eigenvalue < 16 eps x the largest) come out as zero columns, so Q Q^T is still a projector. (A cut scaled by
  m, as rank-revealing tests use, dropped real directions of steep spectra: 3.3x the optimal residual on 1/i^2.)"""
  for _ in range(2):
    lam, v = jnp.linalg.eigh(_matmul(jnp.swapaxes(y, -1, -2), y))
    kept = lam > 16 * jnp.finfo(y.dtype).eps * lam[..., -1:]
    y = _matmul(y, v) * jnp.where(kept, jax.lax.rsqrt(jnp.where(kept, lam, 1.0)), 0.0)[..., None, :]
  return y


def randomized_factors(matrices: jax.Array, rank: int, oversample: int = RANDOMIZED_OVERSAMPLE,
                       power_iterations: int = RANDOMIZED_POWER_ITERATIONS,
                       seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """(down [b, m, r], up [b, r, n]) of matrices [b, m, n] (float32), SVD-ordered and split evenly like the
  exact truncated SVD's, by a randomized range finder: Q spans A @ Omega (Omega a fixed Gaussian
  [n, rank + oversample]), refined by `power_iterations` rounds Q <- orth(A orth(A^T Q)); then the exact SVD of
  B = Q^T A from the eigh of B B^T. Deterministic (a fixed `seed`)."""
  _, m, n = matrices.shape
  k = min(rank + oversample, m, n)
  omega = jax.random.normal(jax.random.key(seed), (n, k), matrices.dtype)
  transposed = jnp.swapaxes(matrices, -1, -2)
  q = _orthonormal_columns(_matmul(matrices, omega))
  for _ in range(power_iterations):
    q = _orthonormal_columns(_matmul(matrices, _orthonormal_columns(_matmul(transposed, q))))
  projected = _matmul(jnp.swapaxes(q, -1, -2), matrices)                              # B [b, k, n]
  lam, w = jnp.linalg.eigh(_matmul(projected, jnp.swapaxes(projected, -1, -2)))      # ascending
  lam, w = lam[..., ::-1][..., :rank], w[..., ::-1][..., :rank]
  root = jnp.sqrt(jnp.sqrt(jnp.maximum(lam, 0.0)))                                   # sqrt(S_r)
  down = _matmul(q, w) * root[..., None, :]                                          # U_r sqrt(S_r)
  rows = _matmul(jnp.swapaxes(w, -1, -2), projected)                                 # S_r V_r^T
  up = rows * jnp.where(root > 0, 1.0 / jnp.where(root > 0, root, 1.0), 0.0)[..., :, None]
  return down, up


def truncate_factors(offsets: Mapping[str, Mapping[str, Any]], rank: int) -> dict[str, dict[str, Any]]:
  """SVD-ordered pairs (`low_rank_factors`) cut to their first `rank` components: the rank-`rank`
  truncated SVD of each delta, without another decomposition."""
  return {path: {'down': pair['down'][:, :rank], 'up': pair['up'][:rank]} for path, pair in offsets.items()}


def offsets_l2(offsets: Mapping[str, Mapping[str, jax.Array]]) -> jax.Array:
  """Σ ‖ΔW‖²_F over all offsets, without forming ΔW: ‖DU‖² = tr((DᵀD)(UUᵀ)), rank x rank products."""
  total = jnp.zeros((), jnp.float32)
  for pair in offsets.values():
    total += jnp.sum((pair['down'].T @ pair['down']) * (pair['up'] @ pair['up'].T))
  return total


OFFSETS_PREFIX = 'weight_offsets/'


def flatten_offsets(offsets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """{kernel_path: {'down', 'up'}} -> {'weight_offsets/<kernel_path>/<down|up>': array} (file keys)."""
  return {f'{OFFSETS_PREFIX}{path}/{name}': value for path, pair in offsets.items() for name, value in pair.items()}


def unflatten_offsets(flat: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """Inverse of `flatten_offsets`; keys without the offsets prefix are ignored."""
  offsets: dict[str, dict[str, np.ndarray]] = {}
  for key, value in flat.items():
    if key.startswith(OFFSETS_PREFIX):
      path, name = key[len(OFFSETS_PREFIX):].rsplit('/', 1)
      offsets.setdefault(path, {})[name] = np.array(value)
  return offsets
