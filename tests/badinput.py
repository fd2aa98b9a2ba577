"""The harness of the bad-input tables (tests/test_errors_*.py): one row per hostile input, each run through
`cli.main` in a fresh folder and held to the same rules:

- the exit code (2 unless the row says otherwise);
- exactly one `e4t: error:` line on stderr that matches the row's pattern, no traceback, nothing a terminal
  would interpret (every character printable);
- nothing written, nothing existing changed (the folder's tree and every file's bytes are compared);
- no expensive work started before the error: a row of stage 'args' may not even load the model, one of
  stage 'load' may load it but not compile or tune, one of stage 'work' may do anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

import e4t_jax
from e4t_jax import cli

STAGES = ('args', 'load', 'work')
INFO_LINES = ('e4t: using the embedded demo model',)


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  argv: Callable[['Assets'], list[str]]   # builds the command line (and any hostile file) in assets.dir
  message: str                            # regex the one error line must match
  stage: str = 'args'                     # the furthest the command may get (see module docstring)
  code: int = 2

  def __post_init__(self):
    assert self.stage in STAGES, self.stage


def params(cases: list[Case]):
  import pytest
  return [pytest.param(case, id=case.id) for case in cases]


# ----------------------------------------------------------------------------- the assets a row can use
class Assets:
  """Files a row builds its input from, inside the row's own folder `dir`."""

  def __init__(self, directory: Path, concept_bytes: bytes):
    self.dir = directory
    self._concept_bytes = concept_bytes

  def path(self, name: str) -> str:
    return str(self.dir / name)

  def image(self, name: str = 'ok.png', size: int = 64) -> str:
    path = self.dir / name
    if not path.exists():
      Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)

  def float_tiff(self, name: str, value: float) -> str:
    path = self.dir / name
    Image.fromarray(np.full((64, 64), value, np.float32), mode='F').save(path)
    return str(path)

  def file(self, name: str, data: bytes | str = b'x') -> str:
    path = self.dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)

  def folder(self, name: str) -> str:
    (self.dir / name).mkdir(parents=True, exist_ok=True)
    return str(self.dir / name)

  # Concepts: a valid one for the embedded model, and ways to break it.
  def concept(self, name: str = 'ok.e4t.safetensors') -> str:
    return self.file(name, self._concept_bytes)

  def concept_with(self, name: str, *, tensors=None, drop=(), info=None, raw_metadata=None) -> str:
    """The valid concept with tensors replaced/added/dropped, metadata keys changed (None: removed), or the
    whole 'e4t' metadata string replaced."""
    from e4t_jax.e4t.concept import CONCEPT_FORMAT
    from e4t_jax.fileio import TAG_KEY, read_safetensors, safetensors_metadata, write_safetensors
    source = self.dir / '.valid.e4t.safetensors'
    source.write_bytes(self._concept_bytes)
    values = {k: np.array(v) for k, v in read_safetensors(source).items() if k not in drop}
    values.update(tensors or {})
    metadata = json.loads(safetensors_metadata(source)[TAG_KEY])
    metadata.update(info or {})
    metadata = {k: v for k, v in metadata.items() if v is not None}  # None: drop the key
    metadata['format'] = CONCEPT_FORMAT
    source.unlink()
    path = self.dir / name
    write_safetensors(path, values, metadata={TAG_KEY: raw_metadata if raw_metadata is not None
                                              else json.dumps(metadata)})
    return str(path)

  def concept_offset_key(self) -> str:
    from e4t_jax.fileio import read_safetensors
    source = self.dir / '.valid.e4t.safetensors'
    source.write_bytes(self._concept_bytes)
    key = next(k for k in read_safetensors(source) if k.endswith('/up'))
    source.unlink()
    return key

  # Model folders: the embedded model, linked file by file, with some files replaced.
  def model(self, name: str = 'model', replace: dict[str, bytes | Callable[[bytes], bytes]] | None = None) -> str:
    root = self.dir / name
    replace = dict(replace or {})
    for source in sorted(e4t_jax.DEMO_MODEL_DIR.rglob('*')):
      if source.is_dir():
        continue
      relative = str(source.relative_to(e4t_jax.DEMO_MODEL_DIR))
      target = root / relative
      target.parent.mkdir(parents=True, exist_ok=True)
      if relative in replace:
        change = replace.pop(relative)
        target.write_bytes(change(source.read_bytes()) if callable(change) else change)
      else:
        os.symlink(source, target)
    assert not replace, f'no such model file {sorted(replace)}'
    return str(root)


def with_tensor_shape(shape: list[int]) -> Callable[[bytes], bytes]:
  """A safetensors file whose first tensor's header declares `shape` (the data stays as it was)."""
  def change(data: bytes) -> bytes:
    (length,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + length])
    first = sorted(k for k in header if k != '__metadata__')[0]
    header[first]['shape'] = shape
    encoded = json.dumps(header).encode()
    encoded += b' ' * (-len(encoded) % 8)
    return struct.pack('<Q', len(encoded)) + encoded + data[8 + length:]
  return change


def valid_concept_bytes(tmp_dir: Path) -> bytes:
  """A concept file for the embedded model, made without tuning (zero offset, w* = the coarse word)."""
  from e4t_jax import personalize
  from e4t_jax.e4t.concept import Concept, model_fingerprint
  model = e4t_jax.load_demo()
  m = model.modules
  embedding = np.asarray(model.params['text_encoder']['embeddings']['token_embedding']['embedding'][
      m.coarse_token_id], np.float32)
  offsets = {path: {k: np.zeros_like(np.asarray(v)) for k, v in pair.items()}
             for path, pair in model.params['weight_offsets'].items()}
  metadata = personalize.concept_metadata(model, personalize.TuningConfig(), model_fingerprint(model))
  concept = Concept(embedding=embedding, weight_offsets=offsets, loss_trace=np.zeros(5, np.float32),
                    steps=np.int32(5), metadata=metadata + (('steps', '5'),))
  path = concept.save(tmp_dir / 'valid.e4t.safetensors')
  return path.read_bytes()


# ----------------------------------------------------------------------------- running a row
def snapshot(directory: Path) -> dict[str, str]:
  """Every entry under `directory` (hidden ones too) -> what it is: a link's target, a file's hash."""
  entries = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = Path(root) / name
      key = str(path.relative_to(directory))
      if path.is_symlink():
        entries[key] = 'link:' + os.readlink(path)
      elif path.is_dir():
        entries[key] = 'dir'
      else:
        entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
  return entries


class _Forbidden(BaseException):
  """Raised by a guard: the command went further than its row allows (not an Exception, so nothing
  inside the command can swallow it)."""


def _guard(monkeypatch, stage: str) -> None:
  from e4t_jax import generation, personalize
  from e4t_jax.e4t import export

  def forbid(what):
    def fail(*args, **kwargs):
      raise _Forbidden(f'{what} started before the error')
    return fail

  if stage == 'args':
    monkeypatch.setattr(cli, '_load_model', forbid('loading the model'))
  if stage in ('args', 'load'):
    monkeypatch.setattr(personalize, 'make_personalize_fn', forbid('compiling the tuning program'))
    monkeypatch.setattr(generation, 'generate', forbid('generation'))
    monkeypatch.setattr(generation, 'personalize_and_generate', forbid('personalize-and-generate'))
    monkeypatch.setattr(export, 'export_concept_to_diffusers', forbid('the export'))


def run(case: Case, root: Path, concept_bytes: bytes, capsys, monkeypatch) -> str:
  """Runs one row; returns its error line."""
  directory = root / 'case'
  directory.mkdir()
  monkeypatch.chdir(directory)
  assets = Assets(directory, concept_bytes)
  argv = case.argv(assets)
  before = snapshot(directory)
  _guard(monkeypatch, case.stage)
  capsys.readouterr()
  try:
    code = cli.main(argv)
  except SystemExit as e:  # argparse
    code = e.code
  captured = capsys.readouterr()
  lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith(INFO_LINES)]
  assert code == case.code, f'exit code {code}, expected {case.code}; stderr:\n{captured.err}'
  assert len(lines) == 1 and lines[0].startswith('e4t: error: '), f'not one error line:\n{captured.err}'
  assert 'Traceback' not in captured.err + captured.out
  assert lines[0].isprintable(), f'unescaped control characters: {lines[0]!r}'
  assert re.search(case.message, lines[0]), f'{lines[0]!r} does not match {case.message!r}'
  assert snapshot(directory) == before, 'the command wrote or changed files'
  shutil.rmtree(directory)
  return lines[0]
