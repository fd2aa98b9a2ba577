"""The `e4t` command line: end to end on the embedded model, and one clear line + exit 2 for bad input."""
import json

import numpy as np
import pytest
from PIL import Image

from e4t_jax import cli


def _write_image(path, size=(40, 56)):
  Image.fromarray(np.random.default_rng(0).integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
  return path


@pytest.mark.parametrize('make_input, message', [
    (lambda d: d / 'missing.png', 'no such file'),
    (lambda d: (d / 'text.png').write_text('not an image') and d / 'text.png', 'not an image'),
    (lambda d: (d / 'empty.jpg').write_bytes(b'') or d / 'empty.jpg', 'empty'),
])
def test_bad_image_is_one_line_and_exit_code_2(tmp_path, capsys, make_input, message):
  code = cli.main(['personalize', str(make_input(tmp_path)), '--out', str(tmp_path / 'out')])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith('e4t: error:') and message in err[0], err
  assert not (tmp_path / 'out').exists()  # nothing written on failure


def test_missing_concept_file_is_exit_code_2(tmp_path, capsys):
  code = cli.main(['generate', str(tmp_path / 'nope.e4t.safetensors'), 'a photo of *', '--out', str(tmp_path)])
  assert code == 2 and 'no such concept file' in capsys.readouterr().err


def test_personalize_then_generate_writes_the_expected_files(tmp_path, capsys):
  image = _write_image(tmp_path / 'me.png')
  assert cli.main(['personalize', str(image), '--out', str(tmp_path / 'concepts'), '--steps', '2']) == 0
  concept = tmp_path / 'concepts' / 'me.e4t.safetensors'
  assert concept.is_file()
  out = tmp_path / 'renders'
  assert cli.main(['generate', str(concept), 'a photo of *', 'a drawing of a face', '--out', str(out),
                   '--steps', '2', '--seed', '3']) == 0
  err = capsys.readouterr().err
  assert "has no placeholder '*'" in err  # the second prompt warns
  pngs = sorted(p.name for p in out.glob('*.png'))
  assert 'grid.png' in pngs and len(pngs) == 3
  sidecars = sorted(out.glob('*.json'))
  assert json.loads(sidecars[0].read_text())['prompt'] == 'a photo of *'
  assert Image.open(out / pngs[0]).text['prompt'] == 'a photo of *'


def test_convert_e4t_to_diffusers_and_back(tiny_e4t, tmp_path):
  from e4t_jax.e4t import io
  io.save_model(tiny_e4t, tmp_path / 'model')
  assert cli.main(['convert', 'e4t-to-diffusers', str(tmp_path / 'model'), '--out', str(tmp_path / 'sd')]) == 0
  assert (tmp_path / 'sd' / 'unet' / 'diffusion_pytorch_model.safetensors').is_file()
  assert cli.main(['convert', 'diffusers-to-e4t', str(tmp_path / 'sd'), '--image-encoder',
                   str(tmp_path / 'sd' / 'image_encoder'), '--out', str(tmp_path / 'again')]) == 0
  again = io.load_model(tmp_path / 'again')
  np.testing.assert_array_equal(np.asarray(again.params['unet']['conv_in']['kernel']),
                                np.asarray(tiny_e4t.params['unet']['conv_in']['kernel']))
  assert cli.main(['convert', 'check', str(tmp_path / 'sd')]) == 0


def test_generate_from_an_image_personalizes_and_renders_in_one_run(tmp_path, capsys):
  image = _write_image(tmp_path / 'me.png')
  out = tmp_path / 'renders'
  assert cli.main(['generate', '--image', str(image), 'a photo of *', 'a * at night', '--out', str(out),
                   '--steps', '2', '--tuning-steps', '1', '--encoder', 'per_step']) == 0
  assert len(list(out.glob('*.png'))) == 3 and not list(tmp_path.glob('*.e4t.safetensors'))  # nothing stored
  sidecar = json.loads(sorted(out.glob('*.json'))[0].read_text())['settings']
  assert sidecar['image'] == str(image) and sidecar['encoder'] == 'per_step'
  code = cli.main(['generate', str(tmp_path / 'c.e4t.safetensors'), 'a photo of *', '--encoder', 'per_step',
                   '--out', str(out)])
  assert code == 2 and 'per_step' in capsys.readouterr().err


def test_a_second_process_loads_its_compiles_from_the_default_cache(tmp_path):
  import os
  import subprocess
  import sys
  image, cache = _write_image(tmp_path / 'me.png'), tmp_path / 'cache'
  env = dict(os.environ, E4T_CACHE_DIR=str(cache))
  run = lambda out: subprocess.run([sys.executable, '-m', 'e4t_jax.cli', 'personalize', str(image), '--out',
                                    str(tmp_path / out), '--steps', '1'], env=env, capture_output=True, text=True,
                                   timeout=600)
  first = run('a')
  assert first.returncode == 0, first.stderr
  entries = sorted(p.name for p in cache.rglob('*') if p.is_file())
  assert entries, 'the first run left nothing in the cache'
  second = run('b')
  assert second.returncode == 0, second.stderr
  assert sorted(p.name for p in cache.rglob('*') if p.is_file() and 'atime' not in p.name) == \
      [e for e in entries if 'atime' not in e]  # every compile of the second process was a cache hit
  env['E4T_CACHE_DIR'] = str(image)  # a file, not a folder: one line, exit 2, before any work
  bad = subprocess.run([sys.executable, '-m', 'e4t_jax.cli', 'personalize', str(image), '--out', str(tmp_path / 'c')],
                       env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and 'E4T_CACHE_DIR' in bad.stderr, bad.stderr
