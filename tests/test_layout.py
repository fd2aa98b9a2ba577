"""The package's layout is part of its contract: the public API is what the README says whatever has been
imported, and imports only run downward through the layers (library < lab and benchmarks < command line).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import e4t_jax

PACKAGE_DIR = Path(e4t_jax.__file__).parent

# Lowest first. A module may import its own layer and those below, never one above.
LAYERS = (
    ('e4t_jax.errors', 'e4t_jax.limits', 'e4t_jax.fileio', 'e4t_jax.progress', 'e4t_jax.runtime',
     'e4t_jax.interrupts'),
    ('e4t_jax.models', 'e4t_jax.parallel', 'e4t_jax.data', 'e4t_jax.diffusion'),
    ('e4t_jax.convert',),
    ('e4t_jax.e4t',),
    ('e4t_jax.train', 'e4t_jax.configs'),
    ('e4t_jax.personalize', 'e4t_jax.generation'),
    ('e4t_jax.lab', 'e4t_jax.bench'),
    ('e4t_jax.cli', 'e4t_jax'),
)

DOCUMENTED_FUNCTIONS = ('generate', 'personalize_many', 'make_personalize_fn', 'load', 'load_demo')
DOCUMENTED_CLASSES = ('Concept',)


def _layer(module: str) -> int:
  """The layer of a module: that of the longest prefix LAYERS names."""
  best, best_length = None, -1
  for index, names in enumerate(LAYERS):
    for name in names:
      if (module == name or module.startswith(name + '.')) and len(name) > best_length:
        best, best_length = index, len(name)
  assert best is not None, f'{module} is in no layer of tests/test_layout.py: place it'
  return best


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE_DIR.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imported_modules(path: Path) -> set[str]:
  """Every e4t_jax module a file imports, at the top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('e4t_jax'):
      for alias in node.names:  # `from e4t_jax.x import y`: y may be a submodule
        candidate = f'{node.module}.{alias.name}'
        is_module = (PACKAGE_DIR.parent / (candidate.replace('.', '/') + '.py')).is_file() or \
            (PACKAGE_DIR.parent / candidate.replace('.', '/')).is_dir()
        found.add(candidate if is_module else node.module)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name.startswith('e4t_jax'))
  return found


def upward_imports() -> list[str]:
  problems = []
  for path in sorted(PACKAGE_DIR.rglob('*.py')):
    module = _module_name(path)
    for imported in sorted(_imported_modules(path)):
      if imported != 'e4t_jax' and _layer(imported) > _layer(module):
        problems.append(f'{module} (layer {_layer(module)}) imports {imported} (layer {_layer(imported)})')
  return problems


def test_imports_only_run_down_the_layers():
  assert upward_imports() == []


def test_no_module_shares_a_name_with_a_public_export():
  public = set(e4t_jax._LAZY) | {'load', 'load_demo'}  # pylint: disable=protected-access
  clashes = [name for name in public
             if name != 'convert' and ((PACKAGE_DIR / f'{name}.py').exists() or (PACKAGE_DIR / name).is_dir())]
  assert clashes == []


def test_documented_api_survives_importing_every_submodule():
  # A fresh interpreter: imports every submodule first (as the CLI and the demo do), then looks.
  script = f'''
import importlib, json, pkgutil
import e4t_jax
for info in pkgutil.walk_packages(e4t_jax.__path__, 'e4t_jax.'):
  importlib.import_module(info.name)
print(json.dumps({{name: [callable(getattr(e4t_jax, name)), isinstance(getattr(e4t_jax, name), type),
                         type(getattr(e4t_jax, name)).__name__]
                  for name in {list(DOCUMENTED_FUNCTIONS + DOCUMENTED_CLASSES)!r}}}))
'''
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  kinds = json.loads(result.stdout.strip().splitlines()[-1])
  for name in DOCUMENTED_FUNCTIONS:
    assert kinds[name][:2] == [True, False] and kinds[name][2] == 'function', (name, kinds[name])
  for name in DOCUMENTED_CLASSES:
    assert kinds[name][1], (name, kinds[name])
  assert e4t_jax.Concept.__module__ == 'e4t_jax.e4t.concept'
