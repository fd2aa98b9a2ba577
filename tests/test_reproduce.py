"""`e4t eval`'s protocol: fixed, held-out, new contexts; method names parsed strictly; the report renders."""
import pytest

import e4t_jax
from e4t_jax.lab import evaluate
from e4t_jax.lab import reproduce
from e4t_jax.errors import InputError


def test_protocol_is_deterministic_held_out_and_uses_new_contexts():
  cases = reproduce.protocol(20, seed=3)
  assert cases == reproduce.protocol(20, seed=3)
  assert cases != reproduce.protocol(20, seed=4)
  assert len({c.identity for c in cases}) == 20
  for case in cases:
    assert case.identity.is_heldout
    assert len(case.contexts) == reproduce.PROMPTS_PER_IDENTITY
    backgrounds = [c.background for c in case.contexts]
    assert case.input_context.background not in backgrounds and len(set(backgrounds)) == len(backgrounds)


@pytest.mark.parametrize('text, expected', [('e4t:5', ('e4t', 5)), ('ti:500', ('textual_inversion', 500)),
                                            ('db:200', ('dreambooth', 200)), ('truth', ('truth', 0))])
def test_parse_method(text, expected):
  assert reproduce.parse_method(text) == expected


@pytest.mark.parametrize('text', ['e4t', 'lora:5', 'ti:five', ''])
def test_parse_method_rejects_bad_names(text):
  with pytest.raises(InputError, match='KIND:STEPS'):
    reproduce.parse_method(text)


def test_markdown_table_and_plot(tmp_path):
  summary = {'mean': 0.5, 'ci95': 0.1, 'n': 8}
  row = {'steps': 5, 'identity': summary, 'prompt_fidelity': summary, 'tune_seconds_per_concept': 0.6,
         'bytes_per_concept': 99072, 'chance': {'identity': 0.258, 'prompt_fidelity': 0.361}}
  table = reproduce.markdown_table({'e4t:5': row, 'no-offsets/e4t:5': dict(row, bytes_per_concept=256)})
  assert '| e4t | 5 | 0.500 ± 0.100 |' in table and '| no-offsets/e4t | 5 |' in table and '99,072' in table
  assert reproduce.attribute_table({'e4t:5': row}) == ''  # no per-attribute scores in this row
  attributes = {'head': 0.5, 'skin': 0.25}
  table = reproduce.attribute_table({'e4t:5': dict(row, identity_attributes=attributes)})
  assert '| method | tuning steps | head | skin |' in table and '| e4t | 5 | 0.50 | 0.25 |' in table
  assert '| *chance (uniform guess)* | | 0.25 | 0.12 |' in table
  reproduce.plot({'e4t:5': row}, tmp_path / 'scores.png')
  assert (tmp_path / 'scores.png').stat().st_size > 0


@pytest.mark.skipif(not (e4t_jax.DEMO_MODEL_DIR / 'e4t.json').is_file(), reason='the demo model is not installed')
def test_evaluate_method_scores_references_and_e4t_on_the_demo_model(tmp_path):
  model = e4t_jax.load_demo()
  readout = evaluate.ReadoutModel.load(e4t_jax.DEMO_MODEL_DIR / 'readout.safetensors')
  cases = reproduce.protocol(2, seed=0)
  results = {}
  # One compiled E4T tuner for both encoder readings (it keeps the tuned encoder, which averaged sampling ignores).
  tuner = reproduce._Tuner(model, 'e4t', 1, encoder='per_step')  # pylint: disable=protected-access
  for kind, steps in [('truth', 0), ('reconstructed', 0), ('described', 0), ('coarse', 0), ('e4t', 1)]:
    results[kind] = reproduce.evaluate_method(model, readout, kind, steps, cases, grid_path=tmp_path / f'{kind}.png',
                                              progress=False, tuner=tuner if kind == 'e4t' else None)
    assert results[kind]['images'] == 2 * reproduce.PROMPTS_PER_IDENTITY
    assert (tmp_path / f'{kind}.png').stat().st_size > 0
  per_step = reproduce.evaluate_method(model, readout, 'e4t', 1, cases, progress=False, encoder='per_step',
                                       tuner=tuner)
  assert per_step['encoder'] == 'per_step' and per_step['images'] == 2 * reproduce.PROMPTS_PER_IDENTITY
  assert results['truth']['identity']['mean'] >= 0.9  # the generator's own renders
  # The VAE round trip loses a little (the small features at 16 x 16 latents), never more than the U-Net does.
  assert 0.6 <= results['reconstructed']['identity']['mean'] <= results['truth']['identity']['mean']
  assert results['reconstructed']['identity']['mean'] > results['coarse']['identity']['mean'] + 0.3
  assert results['e4t']['bytes_per_concept'] > 0 and results['coarse']['bytes_per_concept'] == 0
  assert 0.0 <= results['described']['prompt_fidelity']['mean'] <= 1.0


@pytest.mark.skipif(not (e4t_jax.DEMO_MODEL_DIR / 'e4t.json').is_file(), reason='the demo model is not installed')
def test_eval_command_writes_results_and_prints_the_tables(tmp_path, capsys):
  import json
  from e4t_jax import cli
  out = tmp_path / 'results.json'
  assert cli.main(['eval', '--methods', 'truth', '--identities', '2', '--out', str(out), '--no-grids']) == 0
  printed = capsys.readouterr().out
  assert '| truth | 0 |' in printed and 'identity attributes found by the read-out' in printed
  results = json.loads(out.read_text())
  assert results['truth:0']['identities'] == 2 and results['truth:0']['identity']['mean'] >= 0.9
