"""Ahead-of-time compiles for a Cloud TPU topology from this CPU machine (`e4t bench tpu`, issue 18).

Needs libtpu, which the default .venv leaves out: `make test-tpu` runs this file with it; `make test` skips it
with that reason."""
import functools

import pytest

from e4t_jax.bench import tpu

pytestmark = pytest.mark.skipif(not tpu.libtpu_available(),
                                reason='libtpu is not installed (it lives in .venv-tpu: run `make test-tpu`)')


@functools.lru_cache(maxsize=None)
def _lite_report(attention='auto'):
  """The tiny lite personalization compiled for v5e (one compile per attention implementation)."""
  return tpu.compile_report('tiny', 'personalize', 'v5e:2x2', attention=attention)


@pytest.mark.parametrize('program, mesh', [('personalize', None), ('pretrain', {'data': 2, 'fsdp': 2, 'tensor': 1})])
def test_tiny_programs_compile_for_v5e_2x2_and_report_memory(program, mesh):
  report = _lite_report() if program == 'personalize' else tpu.compile_report('tiny', program, 'v5e:2x2', mesh)
  assert report['device_kind'] == 'TPU v5 lite' and report['hbm_bytes'] == 16 * 2**30
  memory = report['memory_per_chip']
  assert memory['argument_size_in_bytes'] > 0 and report['peak_bytes_per_chip'] >= memory['argument_size_in_bytes']
  assert report['fits'] is True and report['compile_s'] > 0
  # the tiny U-Net's 16 x 16 self-attention (256 tokens) and the VAE's take the Pallas flash kernel (in a
  # shard_map per chip for the sharded pretraining step)
  assert report['attention'] == 'auto' and report['pallas_kernels'] > 0
  if program == 'pretrain':  # fsdp-sharded weights are gathered, gradients reduced across the 4 chips
    assert report['chips'] == 4 and report['collectives']['all-gather'] > 0
    assert report['collectives']['all-reduce'] + report['collectives']['reduce-scatter'] > 0
  else:
    assert report['chips'] == 1 and sum(report['collectives'].values()) == 0


def test_reference_attention_has_no_kernel_and_more_temp_memory():
  auto, xla = _lite_report(), _lite_report('xla')
  assert xla['attention'] == 'xla' and xla['pallas_kernels'] == 0
  assert auto['memory_per_chip']['temp_size_in_bytes'] < xla['memory_per_chip']['temp_size_in_bytes']


def test_the_pretraining_step_compiles_for_two_slices():
  """Multi-slice: two v5e:2x2 slices, the data axis over the data-center network (one row per slice)."""
  from e4t_jax.errors import ConfigError
  report = tpu.compile_report('tiny', 'pretrain', 'v5e:2x2', slices=2)
  assert report['slices'] == 2 and report['chips'] == 8 and report['fits'] is True
  assert report['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1} and report['global_batch'] == 16
  assert report['collectives']['all-reduce'] + report['collectives']['reduce-scatter'] > 0
  with pytest.raises(ConfigError, match='multiple of 2'):
    tpu.compile_report('tiny', 'pretrain', 'v5e:2x2', {'data': 1, 'fsdp': 8, 'tensor': 1}, slices=2)


def test_an_unknown_topology_is_one_clear_error():
  from e4t_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="--topology 'v9z:1x1'"):
    tpu.topology_devices('v9z:1x1')


def test_paper_mode_with_micro_batches_and_a_chosen_pretraining_batch():
  from e4t_jax import personalize as personalize_lib
  from e4t_jax.errors import ConfigError
  tuning = personalize_lib.TuningConfig(num_steps=2, mode='paper', batch_size=4, micro_batch=2)
  paper = tpu.compile_report('tiny', 'personalize', 'v5e:2x2', tuning=tuning, remat='nothing_saveable')
  assert paper['tuning'] == {'mode': 'paper', 'num_steps': 2, 'batch_size': 4, 'micro_batch': 2,
                             'factorization': 'randomized'}  # 'auto' on a TPU: no SVD op to expand
  assert paper['remat'] == 'nothing_saveable' and paper['fits'] is True
  pretrain = tpu.compile_report('tiny', 'pretrain', 'v5e:2x2', {'data': 2, 'fsdp': 2, 'tensor': 1}, batch=8)
  assert pretrain['global_batch'] == 8 and pretrain['fits'] is True
  with pytest.raises(ConfigError, match='multiple of data x fsdp = 4'):
    tpu.compile_report('tiny', 'pretrain', 'v5e:2x2', {'data': 2, 'fsdp': 2, 'tensor': 1}, batch=6)
