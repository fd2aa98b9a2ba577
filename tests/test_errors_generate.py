"""`e4t generate` and `e4t convert concept-to-diffusers` with bad input and hostile concept files: exit code 2,
one line naming the file (the concept's own path, not "concept of prompt 0") and the fix, terminal-safe,
nothing written. The harness is tests/badinput.py."""
import numpy as np
import pytest

import badinput
from badinput import Case

G = ['generate']
NAN = np.float32('nan')


def nan_embedding(a):
  return a.concept_with('nan.e4t.safetensors', tensors={'embedding': np.full(_width(a), NAN, np.float32)})


def _width(a):
  from e4t_jax.fileio import read_safetensors
  return read_safetensors(a.concept('.w.e4t.safetensors'))['embedding'].shape


def inf_offset(a):
  key = a.concept_offset_key()
  from e4t_jax.fileio import read_safetensors
  shape = read_safetensors(a.concept('.s.e4t.safetensors'))[key].shape
  return a.concept_with('inf.e4t.safetensors', tensors={key: np.full(shape, np.inf, np.float32)})


# Hostile concept files: (id, maker, pattern); every one is run through generate and through the export.
CONCEPTS = [
    ('nan-embedding', nan_embedding, r'nan\.e4t\.safetensors: the embedding holds NaN or infinite values'),
    ('inf-offset', inf_offset, r'inf\.e4t\.safetensors: weight offset .*/up holds NaN or infinite'),
    ('metadata-a-list', lambda a: a.concept_with('list.e4t.safetensors', raw_metadata='[1, 2]'),
     r"list\.e4t\.safetensors: not an e4t concept file or corrupt \(its 'e4t' metadata is not a JSON object\)"),
    ('metadata-null', lambda a: a.concept_with('null.e4t.safetensors', raw_metadata='null'),
     r'null\.e4t\.safetensors: not an e4t concept file or corrupt'),
    ('metadata-not-json', lambda a: a.concept_with('bad.e4t.safetensors', raw_metadata='{"format": '),
     r'bad\.e4t\.safetensors: not an e4t concept file or corrupt'),
    ('metadata-value-a-list', lambda a: a.concept_with('v.e4t.safetensors', info={'steps': [5]}),
     r"v\.e4t\.safetensors: its metadata 'steps' is list, not a string"),
    ('lacks-embedding', lambda a: a.concept_with('noemb.e4t.safetensors', drop=('embedding',)),
     r"noemb\.e4t\.safetensors: it lacks the 'embedding' tensor"),
    ('offset-lacks-up', lambda a: a.concept_with('noup.e4t.safetensors', drop=(a.concept_offset_key(),)),
     r'noup\.e4t\.safetensors: weight offset .* lacks its up factor'),
    ('unexpected-tensor', lambda a: a.concept_with('extra.e4t.safetensors', tensors={'evil': np.zeros(3, np.float32)}),
     r"extra\.e4t\.safetensors: it holds an unexpected tensor 'evil'"),
    ('steps-out-of-range', lambda a: a.concept_with('steps.e4t.safetensors', tensors={'steps': np.int32(99)}),
     r"steps\.e4t\.safetensors: its 'steps' tensor says 99 steps, but its loss trace holds 5"),
    ('header-length-100MB', lambda a: a.file('big.e4t.safetensors', (100 * 2**20).to_bytes(8, 'little') + b'{}'),
     r'big\.e4t\.safetensors: not an e4t concept file or corrupt \(not a readable safetensors file \(header length'),
    ('header-not-utf8', lambda a: a.file('utf.e4t.safetensors', (4).to_bytes(8, 'little') + b'\xff\xfe\xfd\xfc'),
     r'utf\.e4t\.safetensors: not an e4t concept file or corrupt'),
    ('truncated', lambda a: a.file('cut.e4t.safetensors', (open(a.concept(), 'rb').read())[:-100]),
     r'cut\.e4t\.safetensors: not an e4t concept file or corrupt .*runs past the end'),
    ('garbage', lambda a: a.file('junk.e4t.safetensors', b'\x00' * 3), r'junk\.e4t\.safetensors: not an e4t concept file'),
    ('missing', lambda a: a.path('nope.e4t.safetensors'), r'nope\.e4t\.safetensors: no such concept file'),
    ('another-model', lambda a: a.concept_with('other.e4t.safetensors', info={'base_fingerprint': 'ab' * 32}),
     r'other\.e4t\.safetensors: made for base model abababababab, but this model is'),
    ('ansi-escape-in-fingerprint', lambda a: a.concept_with('ansi.e4t.safetensors',
                                                             info={'base_fingerprint': '\x1b[2J\x1b[H' + 'c' * 60}),
     r'ansi\.e4t\.safetensors: made for base model \\x1b\[2J\\x1b\[H'),
    ('legacy-fingerprint-of-another-model', lambda a: a.concept_with(
        'legacy.e4t.safetensors', info={'base_fingerprint': 'cd' * 32, 'fingerprint_scheme': None}),
     r'legacy\.e4t\.safetensors: made for base model cdcdcdcdcdcd, not this one'),
]
# Which of them the loader itself refuses (before any model is loaded); the others need the model.
NEEDS_MODEL = {'another-model', 'ansi-escape-in-fingerprint', 'legacy-fingerprint-of-another-model'}


def _concept_cases(command, extra):
  cases = []
  for name, make, pattern in CONCEPTS:
    cases.append(Case(f'{command[-1]}-concept-{name}', lambda a, make=make: command + [make(a)] + extra(a),
                      pattern, stage='load' if name in NEEDS_MODEL else 'args'))
  return cases


CASES = _concept_cases(G, lambda a: ['a photo of *', '--out', 'out', '--steps', '2']) + _concept_cases(
    ['convert', 'concept-to-diffusers'], lambda a: ['--out', 'out']) + [
    # Output paths.
    Case('out-is-a-file', lambda a: G + ['none', 'a face', '--out', a.file('out')], r'--out .*out: is a file'),
    Case('out-under-a-file', lambda a: G + ['none', 'a face', '--out', a.file('f') + '/sub'], r'which is a file'),
    Case('out-in-proc', lambda a: G + ['none', 'a face', '--out', '/proc/e4t-test'], r'cannot write in /proc'),
    Case('image-path-is-a-directory', lambda a: G + ['none', 'a face', '--out', a.folder('out/grid.png') + '/..'],
         r'grid\.png would be written, but it is a directory'),
    Case('out-inside-the-model', lambda a: G + ['none', 'a face', '--model', a.model(), '--out', a.path('model/x')],
         r'is inside the input folder'),
    Case('export-out-is-a-file', lambda a: ['convert', 'concept-to-diffusers', a.concept(), '--out', a.file('o')],
         r'--out .*o: is a file'),
    Case('diffusers-to-e4t-out-is-a-file', lambda a: ['convert', 'diffusers-to-e4t', a.folder('sd'), '--image-encoder',
                                                      a.folder('ie'), '--out', a.file('o')], r'--out .*o: is a file'),
    Case('e4t-to-diffusers-out-is-a-file', lambda a: ['convert', 'e4t-to-diffusers', a.model(), '--out', a.file('o')],
         r'--out .*o: is a file'),
    # Numbers.
    Case('steps-zero', lambda a: G + ['none', 'a face', '--out', 'out', '--steps', '0'], r'--steps: 0 is outside'),
    Case('steps-unbounded', lambda a: G + ['none', 'a face', '--out', 'out', '--steps', '100000'], r'outside 1\.\.1000'),
    Case('guidance-nan', lambda a: G + ['none', 'a face', '--out', 'out', '--guidance-scale', 'nan'], r'not a finite'),
    Case('guidance-inf', lambda a: G + ['none', 'a face', '--out', 'out', '--guidance-scale', 'inf'], r'not a finite'),
    Case('guidance-negative', lambda a: G + ['none', 'a face', '--out', 'out', '--guidance-scale=-2'], r'must be >= 0'),
    Case('seed-beyond-64-bits', lambda a: G + ['none', 'a face', '--out', 'out', '--seed', str(2**64)], r'--seed: .* is outside'),
    Case('seed-plus-prompts-overflows', lambda a: G + ['none', 'a', 'b', '--out', 'out', '--seed', str(2**32 - 1)],
         r'\+ 2 prompts passes'),
    Case('tuning-steps-zero', lambda a: G + ['--image', a.image(), 'a photo of *', '--out', 'out', '--tuning-steps', '0'],
         r'--tuning-steps: 0 is outside'),
    Case('image-all-nan', lambda a: G + ['--image', a.float_tiff('n.tif', float('nan')), 'a photo of *', '--out', 'out'],
         r'n\.tif: .* NaN or infinite'),
    Case('no-prompts', lambda a: G + [a.concept(), '--out', 'out'], r'at least one prompt'),
]


@pytest.mark.parametrize('case', badinput.params(CASES))
def test_bad_input(case, tmp_path, concept_bytes, capsys, monkeypatch):
  badinput.run(case, tmp_path, concept_bytes, capsys, monkeypatch)


def test_the_valid_concept_renders_and_exports(tmp_path, concept_bytes, capsys, monkeypatch):
  """The rows above fail for the reason they name: the same concept file unbroken goes through."""
  from e4t_jax import cli
  concept = tmp_path / 'ok.e4t.safetensors'
  concept.write_bytes(concept_bytes)
  assert cli.main(['convert', 'concept-to-diffusers', str(concept), '--out', str(tmp_path / 'exported')]) == 0
  assert (tmp_path / 'exported' / 'learned_embeds.safetensors').is_file()


def test_a_legacy_concept_is_accepted_with_a_warning(tmp_path, concept_bytes, capsys):
  """A concept made before full fingerprints is accepted when what its fingerprint covered matches."""
  import e4t_jax
  from e4t_jax import cli
  from e4t_jax.e4t.concept import legacy_fingerprint
  a = badinput.Assets(tmp_path, concept_bytes)
  path = a.concept_with('legacy.e4t.safetensors', info={'base_fingerprint': legacy_fingerprint(e4t_jax.load_demo()),
                                                         'fingerprint_scheme': None})
  capsys.readouterr()
  assert cli.main(['convert', 'concept-to-diffusers', path, '--out', str(tmp_path / 'exported')]) == 0
  err = capsys.readouterr().err
  assert 'e4t: warning:' in err and 'made before e4t-jax fingerprinted every frozen weight' in err
