"""`e4t bench demo-train`: the demo's CPU training step, its variants and its profile (smoke sizes)."""
import json

import pytest

from e4t_jax import cli
from e4t_jax.bench import demo_train as bench


def test_smoke_profiles_the_step_and_compares_a_variant_with_the_baseline(tmp_path):
  out = tmp_path / 'bench.json'
  result = bench.run_demo_train_bench(['profile'], seconds=0.5, smoke=True, json_out=out)
  assert not result['errors'], result['errors']
  assert json.loads(out.read_text())['schema'] == bench.SCHEMA
  assert list(result['variants']) == ['baseline', 'profile']  # the baseline first, always
  for name, entry in result['variants'].items():
    assert entry['compilations_while_timing'] == 0, name
    assert entry['step']['n'] >= 3 and entry['flops_per_step'] > 0 and entry['examples_per_s'] > 0
    assert entry['batch'] == 4 and entry['settings']['name'] == name
  assert result['variants']['baseline']['vs_baseline'] == 1.0
  # the profiled program is the baseline's: the same FLOPs; the ratio is a measured number, not 1
  assert result['variants']['profile']['flops_per_step'] == result['variants']['baseline']['flops_per_step']
  assert result['variants']['profile']['vs_baseline'] > 0
  profile = result['variants']['profile']['profile']
  categories = profile['categories']
  for category in ('conv forward', 'conv input gradient', 'conv weight gradient', 'matmul', 'element-wise fusion'):
    assert categories[category]['s_per_step'] > 0, (category, categories)
  assert abs(sum(c['share'] for c in categories.values()) - 1) < 1e-6
  assert profile['top_thunks'] and profile['thunk_s_per_step'] > 0
  table = bench.format_table(result)
  assert 'conv weight gradient' in table and 'profile' in table


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
