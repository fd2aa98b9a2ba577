"""e4t-jax runs without torch, transformers or diffusers installed.

A fresh interpreter blocks the three (`sys.modules[name] = None`, so any `import torch` raises) before
anything else is imported, records every attempt to import them, imports every module of the
package (what pkgutil walks, plus any .py file it would miss), then initializes a tiny pipeline,
saves it, loads it back and runs the text encoder, the U-Net and the VAE decoder. Cost: one jitted
init of the tiny models (~20 s on a 2-core CPU).
"""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import e4t_jax

BLOCKED = ('torch', 'transformers', 'diffusers')
PACKAGE_DIR = Path(e4t_jax.__file__).parent
TIMEOUT_S = 300

_SCRIPT = r'''
import builtins
import json
import sys

BLOCKED = ('torch', 'transformers', 'diffusers')
for name in BLOCKED:
  sys.modules[name] = None  # `import torch` now raises ModuleNotFoundError

attempts = []  # (blocked module, module that tried to import it)
_import = builtins.__import__


def _recording_import(name, globals=None, locals=None, fromlist=(), level=0):
  if level == 0 and name.partition('.')[0] in BLOCKED:
    attempts.append((name, (globals or {}).get('__name__', '?')))
  return _import(name, globals, locals, fromlist, level)


builtins.__import__ = _recording_import

import importlib
import pkgutil
import traceback

import e4t_jax

result = {'modules': [], 'import_errors': {}}


def _record_error(name):
  result['import_errors'][name] = traceback.format_exc(limit=-3)


names = [info.name for info in pkgutil.walk_packages(e4t_jax.__path__, 'e4t_jax.', onerror=_record_error)]
# Also modules in folders without __init__.py, which pkgutil does not list (namespace packages).
names += sorted(set(json.loads(sys.argv[2])) - set(names) - {'e4t_jax'})
for name in names:
  result['modules'].append(name)
  try:
    importlib.import_module(name)
  except Exception:
    _record_error(name)

import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax.convert import init_stable_diffusion, load_stable_diffusion, save_stable_diffusion
from e4t_jax.models.clip import CLIPTextConfig
from e4t_jax.models.unet import UNetConfig
from e4t_jax.models.vae import VAEConfig, decode_latents

sd = init_stable_diffusion(jax.random.key(0), UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny())
root = save_stable_diffusion(sys.argv[1], sd)
sd = load_stable_diffusion(root)
ids = jnp.asarray(sd.tokenizer(['a photo of a cat']))
context = sd.text_encoder.apply({'params': sd.params['text_encoder']}, ids).last_hidden_state
size = sd.unet.config.sample_size
latents = jnp.asarray(np.random.default_rng(0).standard_normal((1, size, size, sd.unet.config.in_channels)),
                      jnp.float32)
noise = jax.jit(lambda p, x, c: sd.unet.apply({'params': p}, x, jnp.array([500]), c))(
    sd.params['unet'], latents, context)
images = jax.jit(lambda p, z: decode_latents(sd.vae, p, z))(sd.params['vae'], latents)
result['shapes'] = {'context': list(context.shape), 'noise': list(noise.shape), 'images': list(images.shape)}
result['finite'] = bool(all(np.isfinite(np.asarray(x)).all() for x in (context, noise, images)))
result['attempts'] = attempts
result['loaded'] = sorted(name for name, module in sys.modules.items()
                          if name.partition('.')[0] in BLOCKED and module is not None)
print('RESULT ' + json.dumps(result))
'''


def _module_names_from_files() -> set[str]:
  """Every module a .py file under e4t_jax/ defines, by path (what an install must ship)."""
  names = set()
  for path in PACKAGE_DIR.rglob('*.py'):
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix('').parts
    names.add('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  return names


def test_every_python_file_belongs_to_a_regular_package():
  # A folder of .py files without __init__.py is skipped by pkgutil and by setup.py's find_packages,
  # so it would be neither checked here nor installed.
  found = {'e4t_jax'} | {info.name for info in pkgutil.walk_packages(e4t_jax.__path__, 'e4t_jax.')}
  missing = _module_names_from_files() - found
  assert not missing, f'modules in folders without __init__.py: {sorted(missing)}'


def test_package_imports_and_pipeline_runs_with_torch_transformers_and_diffusers_blocked(tmp_path):
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), env.get('PYTHONPATH')]))
  env['JAX_PLATFORMS'] = 'cpu'
  files = sorted(_module_names_from_files())
  proc = subprocess.run([sys.executable, '-c', _SCRIPT, str(tmp_path / 'tiny-sd'), json.dumps(files)], env=env,
                        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, f'subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}'
  lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
  assert lines, proc.stdout[-4000:]
  result = json.loads(lines[-1][len('RESULT '):])

  assert not result['import_errors'], 'modules that failed to import without torch:\n' + '\n'.join(
      f'{name}:\n{error}' for name, error in result['import_errors'].items())
  assert set(result['modules']) | {'e4t_jax'} >= set(files)
  ours = [(name, importer) for name, importer in result['attempts'] if importer.startswith('e4t_jax')]
  assert not ours, f'e4t_jax modules tried to import {BLOCKED}: {ours}'
  assert result['loaded'] == [], f'blocked packages got imported anyway: {result["loaded"]}'
  print(f'{len(result["modules"])} modules imported; attempts by third-party code: {result["attempts"]}')

  assert result['shapes'] == {'context': [1, 77, 32], 'noise': [1, 16, 16, 4], 'images': [1, 32, 32, 3]}
  assert result['finite']
