"""`e4t bench demo-train`: the demo's CPU training step, its variants and its profile (smoke sizes)."""
import json

import pytest

from e4t_jax import cli
from e4t_jax.bench import demo_train as bench


def test_a_profiled_worker_times_and_profiles_the_smoke_step():
  """One real worker (the profile variant: its XLA flags need a process of their own)."""
  from e4t_jax.bench import harness
  records, info = harness.run_worker(bench.WORKER_MODULE, ['--worker', 'profile', '--seconds', '0.5', '--smoke'],
                                     timeout_s=600, env_overrides=bench.worker_env(bench.VARIANTS['profile']))
  assert records, info
  entry = records[-1]
  assert entry['compilations_while_timing'] == 0
  assert entry['step']['n'] >= 3 and entry['flops_per_step'] > 0 and entry['examples_per_s'] > 0
  assert entry['batch'] == 4 and entry['settings']['name'] == 'profile'
  profile = entry['profile']
  categories = profile['categories']
  for category in ('conv forward', 'conv input gradient', 'conv weight gradient', 'matmul', 'element-wise fusion'):
    assert categories[category]['s_per_step'] > 0, (category, categories)
  assert abs(sum(c['share'] for c in categories.values()) - 1) < 1e-6
  assert profile['top_thunks'] and profile['thunk_s_per_step'] > 0
  table = bench.format_table({'variants': {'profile': dict(entry, vs_baseline=None)}, 'errors': []})
  assert 'conv weight gradient' in table and 'profile' in table


def test_the_driver_runs_the_baseline_first_and_divides_by_it(tmp_path, monkeypatch):
  """The driver's ordering, ratios and JSON, with workers that report made-up timings (no compiles)."""
  from e4t_jax.bench import harness
  calls = []

  def fake_worker(module, args, *, timeout_s, env_overrides):
    name = args[args.index('--worker') + 1]
    calls.append((name, env_overrides['XLA_FLAGS']))
    if name == 'no-xnnpack':
      return [], {'error': 'worker exited 1'}
    rate = {'baseline': 10.0, 'xla-deferred': 15.0, 'wider': 5.0}[name]
    channels = [64, 128] if name == 'wider' else [48, 96]
    return [{'variant': name, 'examples_per_s': rate, 'gflops_per_s': 2 * rate, 'unet_channels': channels,
             'batch': 24, 'compile_s': 1.0, 'step': {'p50_s': 24 / rate}}], {'wall_s': 1.0, 'peak_rss_bytes': 1}

  monkeypatch.setattr(harness, 'run_worker', fake_worker)
  out = tmp_path / 'bench.json'
  result = bench.run_demo_train_bench(['xla-deferred', 'no-xnnpack', 'wider'], seconds=0.5, json_out=out)
  assert [name for name, _ in calls] == ['baseline', 'xla-deferred', 'no-xnnpack', 'wider']
  assert dict(calls)['no-xnnpack'].startswith(bench.VARIANTS['no-xnnpack'].xla_flags)
  assert json.loads(out.read_text())['schema'] == bench.SCHEMA
  variants = result['variants']
  assert list(variants) == ['baseline', 'xla-deferred', 'wider'] and result['errors'] == ['no-xnnpack: worker exited 1']
  assert variants['baseline']['vs_baseline'] == 1.0 and variants['xla-deferred']['vs_baseline'] == 1.5
  assert variants['wider']['vs_baseline'] is None  # another model: examples/s do not compare
  assert variants['wider']['gflops_vs_baseline'] == 0.5
  assert 'x1.50' in bench.format_table(result) and 'error: no-xnnpack' in bench.format_table(result)


def test_hlo_parsing_classifies_a_convolutions_forward_and_gradients():
  import jax
  import jax.numpy as jnp
  conv = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  loss = lambda w, x: jnp.sum(jnp.tanh(conv(w, x)) ** 2)
  w, x = jnp.ones((3, 3, 4, 6)), jnp.ones((2, 8, 8, 4))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).compile()
  instructions, computations = bench.parse_hlo(bench.hlo_text(compiled))
  entry = [n for c, names in computations.items() for n in names if c.startswith('main')]
  kinds = {bench.classify(n, instructions, computations, {tuple(sorted(w.shape))}) for n in entry}
  assert {'conv forward', 'conv input gradient', 'conv weight gradient'} <= kinds, kinds


def test_unknown_variants_are_one_line_errors_before_any_work(capsys):
  assert cli.main(['bench', 'demo-train', '--variants', 'baseline,turbo']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'turbo' in err and 'xla-deferred' in err
  with pytest.raises(Exception, match='unknown'):
    bench.parse_variants(' , ')
  assert set(cli._DEMO_TRAIN_VARIANTS) == set(bench.VARIANTS)  # the --help list is the module's
