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


def printable(text: object) -> str:
  """`text` safe for a terminal: control characters (ANSI escapes, carriage returns, bells, C1 codes) and
  other unprintable characters are shown as Python escapes, so a file's contents cannot drive the terminal."""
  text = str(text)
  if text.isprintable():
    return text
  return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class E4TWarning(UserWarning):
  """Base class of the warnings e4t-jax gives about input that works but may not do what was meant; the
  command line prints each as one `e4t: warning:` line."""


class DivergenceError(InputError):
  """Tuning produced a non-finite loss (usually too high a learning rate); nothing was returned or saved."""
