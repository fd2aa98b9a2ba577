"""e4t-jax: encoder-based domain tuning (E4T, Gal et al. 2023) for fast personalization, in JAX.

    import e4t_jax
    model = e4t_jax.load_demo()                      # or e4t_jax.load('my-domain-model/')
    personalize_fn = e4t_jax.make_personalize_fn(model, num_steps=5)   # compiled once
    concept = personalize_fn(model.params, image)    # HxWx3 uint8, or float in [0, 1]
    concept.save('me.e4t.safetensors')
    images = e4t_jax.generate(model, concept, ['a painting of * in the style of Monet'], seed=0)
"""
from __future__ import annotations

import importlib
from pathlib import Path

__version__ = '0.1.0'

from e4t_jax.errors import CheckpointError, ConfigError, ConversionError, E4TError, InputError  # noqa: F401

DEMO_MODEL_DIR = Path(__file__).parent / 'assets' / 'demo_model'

# Public name -> (module, attribute); imported on first use so `import e4t_jax` stays cheap. No
# submodule may share a public name: importing it would replace the attribute with the module.
_LAZY = {
    'make_personalize_fn': ('e4t_jax.personalize', 'make_personalize_fn'),
    'personalize_many': ('e4t_jax.personalize', 'personalize_many'),
    'Concept': ('e4t_jax.e4t.concept', 'Concept'),
    'TuningConfig': ('e4t_jax.personalize', 'TuningConfig'),
    'generate': ('e4t_jax.generation', 'generate'),
    'personalize_and_generate': ('e4t_jax.generation', 'personalize_and_generate'),
    'save_model': ('e4t_jax.e4t.io', 'save_model'),
    'E4TConfig': ('e4t_jax.e4t.model', 'E4TConfig'),
    'E4TModel': ('e4t_jax.e4t.model', 'E4TModel'),
    'convert': ('e4t_jax.convert', None),
}


def load(path):
  """An E4T domain model folder (see `e4t_jax.e4t.io`) -> E4TModel."""
  from e4t_jax.e4t import io
  return io.load_model(path)


def load_demo():
  """The small embedded model that ships in the package (`e4t_jax/assets/demo_model/`, `e4t demo-train`)."""
  return load(DEMO_MODEL_DIR)


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module_name, attribute = _LAZY[name]
  module = importlib.import_module(module_name)
  return module if attribute is None else getattr(module, attribute)
