"""File I/O every layer shares: atomic writes, safetensors with numpy, and format-tagged safetensors files.

Safetensors are read and written with numpy (+ ml_dtypes for bfloat16), lazily via memmap, and never
through pickle. A *tagged* file (a concept, the evaluation read-out) carries one JSON object in its
header under the key 'e4t', with a 'format' string that the reader checks before trusting anything.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from e4t_jax.errors import CheckpointError, ConversionError, E4TError, InputError

_ST_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit
_MAX_JSON_BYTES = 64 * 2**20  # a config/manifest/index is kilobytes
TAG_KEY = 'e4t'  # the header metadata key of a tagged file's JSON


# Temporary files in flight (a signal handler removes them before the process exits; see `remove_inflight`).
_INFLIGHT: set[str] = set()
_INFLIGHT_LOCK = threading.RLock()  # re-entrant: a signal handler may run inside a `with` of it
_UMASK = os.umask(0o22)  # read once at import (setting it is process-wide), then restored
os.umask(_UMASK)
_HOST = re.sub(r'[^A-Za-z0-9_-]', '_', socket.gethostname())[:40] or 'host'


def _temp_prefix(name: str) -> str:
  """`.NAME.e4t-HOST-PID.`: the owner of a temporary file is in its name, so a later run can tell a stale one
  (its process is gone) from one another live process is writing."""
  return f'.{name}.e4t-{_HOST}-{os.getpid()}.'


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. PermissionError: it exists, owned by someone else
    return True
  return True


def sweep_stale_temp_files(directory: str | os.PathLike, name: str = '*') -> list[Path]:
  """Removes the temporary files `atomic_write_bytes` left in `directory` (for target `name`, default any)
  when the process that wrote them is gone (killed by SIGKILL, a crash, a lost machine) on this host.

  Returns the removed paths. Files of live processes and of other hosts are left alone.
  """
  directory = Path(directory)
  removed = []
  if not directory.is_dir():
    return removed
  pattern = re.compile(r'\.(?P<name>.+)\.e4t-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp$')
  for path in directory.glob(f'.{name if name == "*" else glob.escape(name)}.e4t-*.tmp'):
    match = pattern.match(path.name)
    if not match or match['host'] != _HOST:
      continue
    pid = int(match['pid'])
    with _INFLIGHT_LOCK:  # a file of this process is stale unless a write of it is in flight
      stale = str(path) not in _INFLIGHT if pid == os.getpid() else not _process_alive(pid)
      if stale:
        try:
          path.unlink()
          removed.append(path)
        except OSError:
          pass
  return removed


def remove_inflight(closing: bool = False) -> None:
  """Deletes this process's temporary files (for a signal handler about to end the process). With
  `closing`, later `atomic_write_bytes` calls block instead of starting a file the exit would strand."""
  _INFLIGHT_LOCK.acquire()
  try:
    for tmp in list(_INFLIGHT):
      try:
        os.unlink(tmp)
      except OSError:
        pass
  finally:
    if not closing:  # closing: keep the lock held; the process ends holding it
      _INFLIGHT_LOCK.release()


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
  """Writes to a temporary file beside `path`, then renames: a reader never sees a partial file.

  The temporary file is removed on any exception, by the command line's signal handler (SIGINT/SIGTERM), and,
  after a SIGKILL, by the next write into the same folder (`sweep_stale_temp_files`).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  sweep_stale_temp_files(path.parent, path.name)
  with _INFLIGHT_LOCK:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix='.tmp')
    _INFLIGHT.add(tmp)
  try:
    with os.fdopen(fd, 'wb') as f:
      for chunk in chunks:
        f.write(chunk)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  finally:
    with _INFLIGHT_LOCK:
      _INFLIGHT.discard(tmp)


# ----------------------------------------------------------------------------- checking paths before work
def _nearest_existing(path: Path) -> Path:
  probe = path
  while not (probe.exists() or probe.is_symlink()) and probe != probe.parent:
    probe = probe.parent
  return probe


def check_output_dir(path: str | os.PathLike, *, flag: str = '--out',
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
  """Checks, without writing anything, that `path` is (or can be made) a writable directory that is not
  inside one of `inputs` (e.g. the model folder). Raises InputError naming `flag` and the fix.

  The check creates and removes one empty temporary directory in the nearest existing ancestor, the only
  test that tells a read-only or pseudo file system (/proc, /sys) from a writable one.
  """
  path = Path(path)
  absolute = path.absolute()
  existing = _nearest_existing(absolute)
  if existing.is_symlink() and not existing.exists():
    raise InputError(f'{flag} {path}: {existing} is a broken symbolic link; remove it or choose another {flag}.')
  if not existing.is_dir():
    where = 'is a file' if existing == absolute else f'is under {existing}, which is a file'
    raise InputError(f'{flag} {path}: {where}, not a directory; choose another {flag}.')
  try:
    os.rmdir(tempfile.mkdtemp(dir=existing, prefix='.e4t-write-check-'))
  except OSError as e:
    raise InputError(f'{flag} {path}: cannot write in {existing} ({e.strerror or e}); choose a writable '
                     f'directory for {flag}.') from None
  resolved = absolute.resolve()
  for item in inputs:
    item = Path(item).resolve()
    if item.is_dir() and (resolved == item or item in resolved.parents):
      raise InputError(f'{flag} {path}: is inside the input folder {item}; write outputs somewhere else.')
  return path


def check_output_files(paths: Iterable[str | os.PathLike], *, flag: str = '--out') -> None:
  """Raises InputError when a file about to be written is a directory or not a regular file."""
  for path in paths:
    path = Path(path)
    if path.is_dir():
      raise InputError(f'{flag}: {path} would be written, but it is a directory; move it away or choose another '
                       f'{flag}.')
    if path.exists() and not path.is_file():
      raise InputError(f'{flag}: {path} would be written, but it is not a regular file; choose another {flag}.')


# ----------------------------------------------------------------------------- safetensors
def _read_header(path: Path) -> tuple[dict, int, int]:
  """(header dict, header length, file size) of a .safetensors file, checked before anything is allocated."""
  try:
    size = path.stat().st_size
    with open(path, 'rb') as f:
      (header_len,) = struct.unpack('<Q', f.read(8))
      if header_len > min(size - 8, _MAX_HEADER_BYTES):  # a corrupt length must not allocate exabytes
        raise ValueError(f'header length {header_len} does not fit in the {size}-byte file')
      header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
      raise ValueError('the header is not a JSON object')
  except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ConversionError(f'{path}: not a readable safetensors file ({e}); re-export it.') from e
  return header, header_len, size


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays (memory-mapped, no copy until used)."""
  path = Path(path)
  header, header_len, size = _read_header(path)
  header.pop('__metadata__', None)
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + header_len) if size > 8 + header_len \
      else np.zeros((0,), np.uint8)
  out = {}
  for key, info in header.items():
    try:
      dtype = _ST_DTYPES.get(info['dtype'])
      start, end = (int(x) for x in info['data_offsets'])
      shape = tuple(int(x) for x in info['shape'])
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(f'{path}: tensor {key!r} has a malformed header entry ({e}); re-export it.') from e
    if dtype is None:
      raise ConversionError(f'{path}: tensor {key!r} has unsupported dtype {info["dtype"]}.')
    if end > data.size:
      raise ConversionError(f'{path}: tensor {key!r} runs past the end of the file (truncated?).')
    if any(d < 0 for d in shape) or not 0 <= start <= end or \
        end - start != math.prod(shape) * np.dtype(dtype).itemsize:  # Python ints: no int64 overflow
      raise ConversionError(f'{path}: tensor {key!r} spans bytes {start}..{end}, which do not hold shape {list(shape)} '
                            f'of {info["dtype"]}; the file is corrupt.')
    out[key] = data[start:end].view(dtype).reshape(shape)
  return out


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
  metadata = _read_header(Path(path))[0].get('__metadata__', {}) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise ConversionError(f'{path}: its __metadata__ is not an object of strings; the file is corrupt.')
  return metadata


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy/JAX arrays as a .safetensors file (atomically)."""
  header: dict[str, Any] = {}
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  arrays, offset = [], 0
  for key in sorted(tensors):
    arr = np.ascontiguousarray(np.asarray(tensors[key]))
    if arr.dtype not in _ST_NAMES:
      raise ConversionError(f'{path}: cannot store tensor {key!r} of dtype {arr.dtype}.')
    header[key] = {'dtype': _ST_NAMES[arr.dtype], 'shape': list(arr.shape),
                   'data_offsets': [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  header_bytes = json.dumps(header, separators=(',', ':')).encode()
  header_bytes += b' ' * (-len(header_bytes) % 8)  # 8-byte alignment of the data section
  atomic_write_bytes(path, [struct.pack('<Q', len(header_bytes)), header_bytes,
                            *(a.tobytes() for a in arrays)])


# ----------------------------------------------------------------------------- JSON
def read_json(path: str | os.PathLike, *, what: str, error: type[E4TError] = CheckpointError,
              required: Mapping[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
  """Reads a JSON object from `path`; any parse or schema failure is one `error` naming the file.

  `required` maps keys that must be present to the type(s) their values must have.
  """
  path = Path(path)
  try:
    size = path.stat().st_size
    if size > _MAX_JSON_BYTES:
      raise ValueError(f'{size} bytes, more than a {what} can be')
    value = json.loads(path.read_bytes().decode('utf-8'))
  except FileNotFoundError:
    raise error(f'{path}: missing; {what} needs it.') from None
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    detail = getattr(e, 'strerror', None) or str(e).splitlines()[0]
    raise error(f'{path}: not a readable JSON file ({detail[:200]}); restore it (it belongs to {what}).'
                ) from None
  if not isinstance(value, dict):
    raise error(f'{path}: holds a JSON {type(value).__name__}, expected an object; restore it (it belongs to {what}).')
  for key, types in (required or {}).items():
    if key not in value:
      raise error(f'{path}: lacks {key!r}; restore it (it belongs to {what}).')
    if not isinstance(value[key], types) or isinstance(value[key], bool) and bool not in _as_tuple(types):
      raise error(f'{path}: {key!r} is {_describe(value[key])}, expected {_type_names(types)}.')
  return value


def _as_tuple(types) -> tuple:
  return types if isinstance(types, tuple) else (types,)


def _type_names(types) -> str:
  names = {dict: 'an object', list: 'a list', str: 'a string', int: 'an integer', float: 'a number', bool: 'a boolean'}
  return ' or '.join(names.get(t, t.__name__) for t in _as_tuple(types))


def _describe(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + '...'


# ----------------------------------------------------------------------------- format-tagged files
def write_tagged_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], file_format: str,
                             info: Mapping[str, Any]) -> Path:
  """Writes tensors + `info` (JSON-able) + the format tag as one safetensors file, atomically."""
  path = Path(path)
  write_safetensors(path, tensors, metadata={TAG_KEY: json.dumps(dict(info, format=file_format), sort_keys=True)})
  return path


def read_tagged_safetensors(path: str | os.PathLike, file_format: str, *, what: str,
                            missing_hint: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(tensors, info) of a file `write_tagged_safetensors` wrote with this `file_format`.

  Raises InputError for a missing file (with `missing_hint`: how to make one) and CheckpointError naming
  the file for anything unreadable, untagged or of another format, before the caller sees a tensor.
  """
  path = Path(path)
  if not path.is_file():
    raise InputError(f'{path}: no such {what} file ({missing_hint}).')
  try:
    metadata = safetensors_metadata(path)
    if TAG_KEY not in metadata:
      raise ValueError(f'its header has no {TAG_KEY!r} metadata')
    info = json.loads(metadata[TAG_KEY])
    if not isinstance(info, dict):
      raise ValueError(f'its {TAG_KEY!r} metadata is not a JSON object')
    tensors = read_safetensors(path)
  except (ConversionError, ValueError, TypeError) as e:
    detail = str(e).removeprefix(f'{path}: ').splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f'{path}: not an e4t {what} file or corrupt ({detail}).') from e
  if info.get('format') != file_format:
    raise CheckpointError(f'{path}: {what} format {info.get("format")!r}, this e4t-jax reads {file_format!r}.')
  info.pop('format')
  return tensors, info
