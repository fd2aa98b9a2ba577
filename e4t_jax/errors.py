"""Typed errors raised at the boundary of e4t-jax (user input, files, configs).

Every error carries one line a person can act on: what was wrong, which file, and the fix.
The command line turns any `E4TError` into that line and exit code 2 (never a traceback).
"""


class E4TError(Exception):
  """Base class of every error e4t-jax raises for a user mistake or a bad file."""


class InputError(E4TError):
  """A user-supplied image, prompt or argument cannot be used."""


class ConversionError(E4TError):
  """A weights directory does not match the model it is loaded into (missing/extra/mis-shaped tensor)."""


class CheckpointError(E4TError):
  """A checkpoint or concept file is corrupt or belongs to another model."""


class ConfigError(E4TError):
  """A config value is invalid or inconsistent."""
