"""Rematerialization per U-Net block changes memory, never results."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.models import layers
from e4t_jax.models import unet as unet_lib


@pytest.fixture(scope='module')
def setup():
  config = unet_lib.UNetConfig.tiny()
  params = jax.device_put(layers.host_init(unet_lib.abstract_params(unet_lib.UNet(config)), seed=0))
  key = jax.random.key(0)
  sample = jax.random.normal(key, (2, 16, 16, 4))
  context = jax.random.normal(jax.random.fold_in(key, 1), (2, 7, config.cross_attention_dim))
  return config, params, sample, context


def _loss_and_grads(module, params, sample, context):
  loss = lambda p: jnp.mean(module.apply({'params': p}, sample, jnp.array([10, 900]), context) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope='module')
def reference(setup):
  """Loss and gradients without remat (compiled once for every policy's comparison)."""
  config, params, sample, context = setup
  return _loss_and_grads(unet_lib.UNet(config), params, sample, context)


@pytest.mark.parametrize('policy', ['nothing_saveable', 'dots_saveable'])
def test_remat_gives_the_same_loss_and_gradients(setup, reference, policy):
  config, params, sample, context = setup
  loss, grads = reference
  remat_loss, remat_grads = _loss_and_grads(unet_lib.UNet(config, remat_policy=policy), params, sample, context)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_remat_keeps_parameter_paths(setup):
  config, params, _, _ = setup
  remat_params = unet_lib.abstract_params(unet_lib.UNet(config, remat_policy='nothing_saveable'))
  assert jax.tree.structure(jax.tree.map(lambda x: 0, params)) == \
      jax.tree.structure(jax.tree.map(lambda x: 0, layers.host_init(remat_params)))


def test_unknown_remat_policy_is_rejected(setup):
  config, params, sample, context = setup
  with pytest.raises(ValueError, match='remat_policy'):
    unet_lib.UNet(config, remat_policy='sometimes').apply({'params': params}, sample, 0, context)
