"""The personalization benchmark (`e4t_jax.bench`) on the tiny model.

One benchmark run serves the first two tests (two compiles of the tuning program, one in a second
process sharing the persistent cache, a few concepts, and, when torch is installed, the PyTorch
baseline; about 45 s on an idle 2-core CPU):
  - a smoke test: every documented JSON key, no compilation in the latency loop, positive latencies;
  - the baseline's parity: torch re-runs our first concept with the JAX program's own noise,
    timesteps and VAE draws, from the same weights, and its loss trace must match ours.
Left to the benchmark run itself (docs/performance.md), as each costs minutes of CPU: the batched
section (`batch` > 0 compiles the vmapped program twice, ~1 min) and the full-size abstract compile.
The abstract FLOP accounting is checked here on the tiny config, lowering only.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from e4t_jax.bench import personalize as bench

HAS_TORCH = all(importlib.util.find_spec(name) for name in ('torch', 'diffusers', 'transformers'))

TOP_KEYS = {'schema', 'mode', 'config', 'date', 'machine', 'settings', 'missing', 'compile', 'latency', 'batched',
            'memory', 'concept_file_bytes', 'loss_trace_first', 'baseline', 'fused'}
COMPILE_KEYS = {'cold_s', 'cold_trace_s', 'cold_lower_s', 'cold_backend_s', 'cold_cache_misses', 'warm_s',
                'warm_backend_s', 'warm_trace_s', 'warm_lower_s', 'warm_cache_hits', 'warm_cache_misses',
                'warm_process_s', 'warm_speedup', 'cache_bytes'}
LATENCY_KEYS = {'n', 'p50_s', 'p95_s', 'mean_s', 'min_s', 'max_s', 'concepts_per_s', 'compilations'}
MEMORY_KEYS = {'compiled', 'compiled_batched', 'peak_rss_bytes'}
BASELINE_KEYS = {'framework', 'mode', 'torch', 'diffusers', 'transformers', 'jax_device', 'convert_s', 'warmup',
                 'by_threads', 'torch_num_threads', 'torch_default_num_threads', 'n', 'p50_s', 'p95_s', 'mean_s',
                 'min_s', 'max_s', 'jax_over_torch_p50', 'jax_over_best_torch_p50', 'parity'}
NUM_CONCEPTS = 3
NUM_STEPS = 2


@pytest.fixture(scope='module')
def bench_run(tmp_path_factory):
  json_out = tmp_path_factory.mktemp('bench') / 'bench.json'
  # Small on purpose: 3 concepts, 2 steps, no batched section, one torch thread count, one warm-up run.
  result = bench.run_personalize_bench('tiny', num_steps=NUM_STEPS, num_concepts=NUM_CONCEPTS, batch=0,
                                       baseline='torch' if HAS_TORCH else None, json_out=json_out,
                                       torch_warmup=1, torch_threads=(1,), fused_repeats=1)
  return result, json_out


def test_smoke_has_every_key_and_never_compiles_in_the_loop(bench_run):
  result, json_out = bench_run
  assert json.loads(json_out.read_text()) == json.loads(json.dumps(result))  # the file is the result
  assert TOP_KEYS <= set(result)
  assert result['schema'] == bench.SCHEMA and result['mode'] == 'concrete'
  assert COMPILE_KEYS <= set(result['compile'])
  assert LATENCY_KEYS <= set(result['latency'])
  assert MEMORY_KEYS <= set(result['memory'])

  assert result['latency']['compilations'] == 0
  assert result['latency']['n'] == NUM_CONCEPTS
  fused = result['fused']  # one program against two, each warmed up: neither compiles while timed
  assert fused['compilations'] == 0 and fused['personalize_and_generate']['p50_s'] > 0
  assert fused['fused_over_separate_p50'] > 0 and result['settings']['mode'] == 'lite'
  assert 0 < result['latency']['min_s'] <= result['latency']['p50_s'] <= result['latency']['p95_s']
  assert result['compile']['cold_s'] > 0 and result['compile']['warm_s'] > 0
  assert result['compile']['hlo']['text_bytes'] > 1000 and result['compile']['hlo']['lines'] > 10
  assert result['compile']['warm_cache_hits'] >= 1  # the second process read the shared cache
  assert result['batched'] is None and any('batched' in item for item in result['missing'])
  assert result['memory']['compiled']['argument_size_in_bytes'] > 0
  assert result['memory']['peak_rss_bytes'] > 0
  assert result['concept_file_bytes'] > 0
  assert len(result['loss_trace_first']) == NUM_STEPS
  assert any('GPU/TPU' in item for item in result['missing'])  # accelerator figures are said to be missing
  assert 'compile' in bench.format_table(result)


def test_torch_baseline_runs_the_same_tuning(bench_run):
  pytest.importorskip('torch')
  pytest.importorskip('diffusers')
  pytest.importorskip('transformers')
  result, _ = bench_run
  baseline = result['baseline']
  assert BASELINE_KEYS <= set(baseline)
  assert baseline['n'] == NUM_CONCEPTS and baseline['p50_s'] > 0 and baseline['jax_over_torch_p50'] > 0
  parity = baseline['parity']
  assert len(parity['torch_loss_trace']) == len(parity['jax_loss_trace']) == NUM_STEPS
  # Same weights and random draws: the first step's loss agrees to float32 rounding.
  assert parity['first_step_rel_diff'] < 1e-3, parity
  # Later steps follow the same Adam trajectory (rounding differences only).
  assert parity['max_rel_diff'] < 1e-2, parity
  assert 'torch eager' in bench.format_table(result)


@pytest.fixture(scope='module')
def lite_analysis():
  """The lite program's lowered record on the tiny config (3 steps), shared by the two tests below."""
  records = []
  bench.abstract_analysis('tiny', 'float32', 3, compile_program=False, emit=records.append)
  (lowered,) = records
  return lowered


def test_abstract_flop_accounting_on_the_tiny_config(lite_analysis):
  lowered = lite_analysis
  step, program = lowered['lowered_step']['flops'], lowered['lowered_program']['flops']
  assert step > 0 and program > 0
  assert lowered['stablehlo']['text_bytes'] > 1000  # the program's size next to its cost
  # The scan body counts once in XLA's analysis; the estimate adds the other (num_steps - 1) steps.
  assert lowered['flops_total_estimate'] == pytest.approx(program + 2 * step)
  # The CLIP towers scan their layers, and XLA's analysis would count each tower's loop body once: the
  # program's FLOPs are counted on the unrolled twin.
  import jax
  import jax.numpy as jnp
  from e4t_jax import personalize as personalize_lib
  from e4t_jax import runtime
  from e4t_jax.e4t import model as model_lib
  model = bench.build_abstract_model('tiny')
  assert model.modules.text_encoder.scan_layers and model.modules.image_encoder.scan_layers
  tuning, size = personalize_lib.TuningConfig(num_steps=3), model.modules.image_size
  flops = lambda m: runtime.cost_stats(jax.jit(personalize_lib.tuning_program(m.modules, tuning)).lower(
      m.params, jax.ShapeDtypeStruct((size, size, 3), jnp.float32), jax.eval_shape(lambda: jax.random.key(0)),
      jax.ShapeDtypeStruct((), jnp.int32)))['flops']
  assert flops(model) < program == pytest.approx(flops(model_lib.unrolled_clip(model)), rel=1e-9)
  # ... and so are the per-network costs: the CLIP vision tower's forward counts every layer
  vision = model_lib.unrolled_clip(model).modules.image_encoder
  clip_flops = runtime.cost_stats(jax.jit(lambda p, x: vision.apply({'params': p}, x)).lower(
      model_lib.unrolled_clip(model).params['image_encoder'],
      jax.ShapeDtypeStruct((1, vision.config.image_size, vision.config.image_size, 3), jnp.float32)))['flops']
  assert lowered['lowered_components']['clip_vision']['flops'] >= clip_flops


def test_variants_parse_strictly_and_pair_for_the_scan_ratio():
  from e4t_jax.errors import ConfigError
  assert bench.parse_variant('bfloat16+remat+unrolled') == ('bfloat16', frozenset({'remat', 'unrolled'}))
  for bad in ('float16', 'float32+remat+remat', 'float32+scan', ''):
    with pytest.raises(ConfigError, match='variant'):
      bench.parse_variant(bad)
  entry = lambda lower_s, compile_s: {'lower_s': lower_s, 'stablehlo': {'text_bytes': 100},
                                      'compiled': {'compile_s': compile_s, 'hlo': {'text_bytes': 10}}}
  rows = bench._clip_scan_comparison({'float32': entry(2.0, 30.0), 'float32+unrolled': entry(3.0, 45.0),
                                      'bfloat16+remat+unrolled': entry(1.0, 1.0)})  # its pair is missing
  assert list(rows) == ['float32']
  assert rows['float32']['compile_s_ratio'] == pytest.approx(1.5) and rows['float32']['lower_s_ratio'] == 1.5


def test_rejects_unknown_configs_and_full_size_execution():
  from e4t_jax.errors import ConfigError
  with pytest.raises(ConfigError, match='unknown benchmark config'):
    bench.run_personalize_bench('sd99')
  with pytest.raises(ConfigError, match='abstract'):
    bench.run_personalize_bench('sd15')
  with pytest.raises(ConfigError, match='baseline'):
    bench.run_personalize_bench('tiny', baseline='tensorflow')
  with pytest.raises(ConfigError, match='micro_batch'):
    bench.run_personalize_bench('tiny', baseline='torch', mode='paper', micro_batch=1)
  with pytest.raises(ConfigError, match='tuning mode'):
    bench.run_personalize_bench('tiny', mode='full')


def test_abstract_analysis_of_paper_mode_lowers_the_whole_program(lite_analysis):
  records = []
  bench.abstract_analysis('tiny', 'float32', 2, compile_program=False, emit=records.append, mode='paper', views=4)
  (lowered,) = records
  # Four views and the U-Net's weight gradients: more work per program than lite mode's one draw (the
  # programs scan their steps, so the counted FLOPs are one step's whatever num_steps is).
  assert lowered['lowered_program']['flops'] > 2 * lite_analysis['lowered_program']['flops']
  # Per-step FLOPs from unrolled programs (either mode): paper mode's step does the 4 views' work and more.
  assert lowered['lowered_step']['flops'] > 4 * lite_analysis['lowered_step']['flops'] > 0
