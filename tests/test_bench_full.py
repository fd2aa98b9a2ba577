"""`e4t bench full` (the accelerator benchmark) on the tiny config, and the attention dispatch."""
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.bench import full as bench_full
from e4t_jax.errors import ConfigError
from e4t_jax.models import layers


def test_auto_attention_off_a_gpu_is_an_xla_attention_never_a_fused_kernel():
  q, k, v = (jax.random.normal(key, (2, 64, 4, 8)) for key in jax.random.split(jax.random.key(0), 3))
  # on CPU 'auto' is the deferred-softmax XLA attention (tests/test_cpu_attention.py), or the reference when pinned
  deferred = layers.dot_product_attention(q, k, v, implementation='xla_deferred')
  reference = layers.dot_product_attention(q, k, v, implementation='xla')
  for implementation in (None, 'auto'):
    np.testing.assert_array_equal(layers.dot_product_attention(q, k, v, implementation=implementation), deferred)
    with layers.auto_cpu_attention('xla'):
      np.testing.assert_array_equal(layers.dot_product_attention(q, k, v, implementation=implementation), reference)
  with pytest.raises(ValueError, match='not one of'):
    layers.dot_product_attention(q, k, v, implementation='flash')


def test_fused_attention_is_chosen_only_where_cudnn_takes_it(monkeypatch):
  shaped = lambda tokens, head_dim, dtype=jnp.bfloat16: jax.ShapeDtypeStruct((2, tokens, 8, head_dim), dtype)
  assert not layers.fused_attention_applies(shaped(4096, 40), shaped(4096, 40))  # this CPU
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert layers.fused_attention_applies(shaped(4096, 40), shaped(4096, 40))      # U-Net self-attention
  assert layers.fused_attention_applies(shaped(1024, 80), shaped(1024, 80))
  assert not layers.fused_attention_applies(shaped(4096, 40), shaped(77, 40))    # cross-attention: 77 tokens
  assert not layers.fused_attention_applies(shaped(257, 80), shaped(257, 80))    # CLIP ViT patches + class
  assert not layers.fused_attention_applies(shaped(256, 160), shaped(256, 160))  # head_dim over 128
  assert not layers.fused_attention_applies(shaped(4096, 40, jnp.float32), shaped(4096, 40, jnp.float32))


def test_jobs_have_stable_names_and_round_trip(monkeypatch):
  job = bench_full.Job('pretrain', batch=8, remat='nothing_saveable')
  assert job.name == 'pretrain/bfloat16/remat=nothing_saveable/b8'
  assert bench_full.Job.from_arg(job.to_arg()) == job
  names = [j.name for jobs in bench_full.default_jobs().values() for j in jobs]
  assert len(names) == len(set(names)) and 'personalize/bfloat16' in names and 'unet_step/bfloat16/b8' in names
  assert [j.name for j in bench_full.default_jobs(minimal=True)['personalize']] == [
      'personalize/bfloat16', 'personalize/bfloat16/paper/15steps/micro1']
  assert bench_full.PAPER_JOB.tuning.mode == 'paper' and bench_full.PAPER_JOB.tuning.num_steps == 15
  assert [j.name for j in bench_full.default_jobs(minimal=True)['train']][-1] == 'pretrain/bfloat16/b16'
  # a job's XLA flags reach its worker processes, after the flags this process already has
  flagged = bench_full.NO_AUTOTUNE_JOB
  assert flagged.name == 'personalize/bfloat16/xla=gpu_autotune_level=0'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  assert flagged.env() == {'XLA_FLAGS': '--xla_force_host_platform_device_count=2 --xla_gpu_autotune_level=0'}
  assert bench_full.worker_env([flagged]) == flagged.env() and bench_full.worker_env([job]) == {}
  with pytest.raises(ConfigError, match='different XLA flags'):
    bench_full.worker_env([job, flagged])
  with pytest.raises(ConfigError):
    bench_full.Job('inference')


def test_a_paper_mode_job_lowers_the_paper_program():
  from e4t_jax import runtime
  cost = {}
  for job in (bench_full.Job('personalize', steps=1), bench_full.Job('personalize', mode='paper', steps=1)):
    lowered, _ = bench_full.lower_job(bench_full.job_modules('tiny', job), job)
    cost[job.mode] = runtime.cost_stats(lowered)['flops']
  assert cost['paper'] > 4 * cost['lite']  # 16 views through the U-Net with its weight gradients, not 1


def test_random_like_fills_by_kind_and_shares_buffers_of_one_shape():
  sds = jax.ShapeDtypeStruct
  tree = {'a': {'kernel': sds((4, 3), jnp.float32), 'bias': sds((3,), jnp.float32), 'scale': sds((3,), jnp.float32)},
          'b': {'kernel': sds((4, 3), jnp.float32), 'embedding': sds((5, 2), jnp.bfloat16)}, 'empty': {}}
  made = bench_full.random_like(tree)
  np.testing.assert_array_equal(made['a']['scale'], np.ones(3))
  np.testing.assert_array_equal(made['a']['bias'], np.zeros(3))
  assert made['b']['embedding'].dtype == jnp.bfloat16 and made['empty'] == {}
  assert 0 < float(jnp.std(made['a']['kernel'])) < 0.1
  assert made['a']['kernel'] is made['b']['kernel']  # one buffer per (shape, dtype, kind)
  from e4t_jax.models.unet import SDXLContext  # a non-dict pytree inside (the SDXL U-Net step's inputs)
  context = bench_full.random_like({'context': SDXLContext(sds((2, 7, 8), jnp.float32), sds((2, 4), jnp.float32),
                                                           sds((2, 6), jnp.float32))})['context']
  assert isinstance(context, SDXLContext) and context.states.shape == (2, 7, 8) and context.time_ids.shape == (2, 6)


def test_unet_step_job_executes_and_counts_model_flops_from_the_lowering():
  job = bench_full.Job('unet_step', batch=1)
  record = bench_full.execute_job('tiny', job, {}, time.time() + 600, num_concepts=1, train_steps=2)
  assert record['stage'] == 'executed' and record['step']['n'] == 2
  assert np.isfinite(record['final_loss'])
  # the lowered program counts the convolutions and matmuls (a GPU's compiled cost analysis does not)
  assert record['model_flops'] > 0 and record['memory_analysis']['temp_size_in_bytes'] > 0
  flagged = dataclasses.replace(job, xla_flags='--xla_gpu_autotune_level=0')
  result = {'execute': {job.name: record}, 'compile': {job.name: {'compile_s': 1.0}, flagged.name: {'compile_s': 0.25}},
            'peak_tflops': 100.0,
            'config': 'tiny', 'machine': {'jax_devices': ['cpu:cpu']},
            'torch': {'batch': 1, 'step': {'p50_s': 2 * record['step']['p50_s']}}}
  result['summary'] = summary = bench_full.summarize(result)
  entry = summary[job.name]
  assert entry['tflops_per_s'] == pytest.approx(record['model_flops'] / record['step']['p50_s'] / 1e12)
  assert entry['mfu'] == pytest.approx(entry['tflops_per_s'] / 100.0)
  assert summary['jax_over_torch_unet_step'] == pytest.approx(0.5)
  assert summary['torch_unet_step']['tflops_per_s'] == pytest.approx(entry['tflops_per_s'] / 2)
  assert summary['xla_flags'][flagged.name]['compile_s_ratio'] == pytest.approx(0.25)
  assert 'p50_s_ratio' not in summary['xla_flags'][flagged.name]  # not executed
  table = bench_full.format_table(result)
  assert 'unet_step/bfloat16' in table and 'compile x0.25' in table
