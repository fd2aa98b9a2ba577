"""Test session set-up: CPU only, with 8 fake devices so sharding is tested without accelerators."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent XLA compilation cache for the whole test session, shared by the xdist workers and every
# `e4t` subprocess (many tests compile the same tiny programs; a hit loads the executable instead). It lives
# in a temp folder the controller makes and removes; never ~/.cache. E4T_TEST_XLA_CACHE=off: no cache.
if os.environ.get('E4T_TEST_XLA_CACHE', '').lower() == 'off':
  os.environ['E4T_CACHE_DIR'] = 'off'
elif 'E4T_TEST_SESSION_CACHE' not in os.environ:  # the controller (or a plain pytest): make the folder
  import tempfile
  os.environ['E4T_TEST_SESSION_CACHE'] = tempfile.mkdtemp(prefix='e4t-test-xla-')
  os.environ['E4T_TEST_SESSION_CACHE_OWNER'] = str(os.getpid())
  os.environ['E4T_CACHE_DIR'] = os.environ['E4T_TEST_SESSION_CACHE']
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()

import pytest  # noqa: E402


def pytest_configure(config):
  if os.environ.get('E4T_CACHE_DIR', 'off') != 'off':
    from e4t_jax import runtime
    runtime.enable_compilation_cache(os.environ['E4T_CACHE_DIR'])


def pytest_unconfigure(config):
  if os.environ.get('E4T_TEST_SESSION_CACHE_OWNER') == str(os.getpid()):
    import shutil
    shutil.rmtree(os.environ['E4T_TEST_SESSION_CACHE'], ignore_errors=True)


def _random_image(seed: int, size: int = 40):
  """A random uint8 RGB image, size x (size + seed): every seed a different image and aspect ratio."""
  import numpy as np
  return np.random.default_rng(seed).integers(0, 256, (size, size + seed, 3), dtype=np.uint8)


@pytest.fixture(scope='session')
def random_image():
  """`random_image(seed, size=40)`: a random uint8 RGB image of size x (size + seed)."""
  return _random_image


@pytest.fixture(scope='session')
def tiny_e4t():
  """One tiny random E4T model shared by every test module (init is the slow part)."""
  import jax
  from e4t_jax.e4t import model as model_lib
  from e4t_jax.e4t.encoder import EncoderConfig
  from e4t_jax.e4t.offsets import OffsetsConfig
  config = model_lib.E4TConfig(coarse_word='face', encoder=EncoderConfig(hidden_dim=32, clip_layers=(-1, -2)),
                               offsets=OffsetsConfig(rank=2))
  return model_lib.init_tiny(jax.random.key(0), config)


class CompileCounter:
  """Counts XLA backend compilations inside `with counter:` blocks (one jax.monitoring listener)."""
  _instance = None

  def __init__(self):
    import jax
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listener)

  @classmethod
  def shared(cls) -> 'CompileCounter':
    if cls._instance is None:
      cls._instance = cls()
    return cls._instance

  def _listener(self, event, duration, **kwargs):
    if self.active and event == '/jax/core/compile/backend_compile_duration':
      self.count += 1

  def __enter__(self):
    self.count, self.active = 0, True
    return self

  def __exit__(self, *exc):
    self.active = False


@pytest.fixture
def compile_counter():
  return CompileCounter.shared()


@pytest.fixture(scope='session')
def concept_bytes(tmp_path_factory):
  """The bytes of a valid concept file for the embedded demo model (made without tuning)."""
  import badinput
  return badinput.valid_concept_bytes(tmp_path_factory.mktemp('concept'))
