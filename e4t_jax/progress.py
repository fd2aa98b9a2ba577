"""One progress-bar factory for every long loop of the package (tqdm on stderr)."""
from __future__ import annotations

import sys
from typing import Any, Iterable


def progress_bar(total: int, desc: str, unit: str = 'step', *, iterable: Iterable[Any] | None = None,
                 initial: int = 0, enabled: bool = True, tty_only: bool = False):
  """A tqdm bar on stderr (iterate it when `iterable` is given, else call `.update(n)`; `.close()` at the end).

  enabled=False (or tty_only=True with stderr not a terminal) gives a disabled bar with the same methods,
  so callers never test for None.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  disable = not enabled or (tty_only and not sys.stderr.isatty())
  return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
              disable=disable)
