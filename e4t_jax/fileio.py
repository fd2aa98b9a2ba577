"""File I/O every layer shares: atomic writes, safetensors with numpy, and format-tagged safetensors files.

Safetensors are read and written with numpy (+ ml_dtypes for bfloat16), lazily via memmap, and never
through pickle. A *tagged* file (a concept, the evaluation read-out) carries one JSON object in its
header under the key 'e4t', with a 'format' string that the reader checks before trusting anything.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from e4t_jax.errors import CheckpointError, ConversionError, InputError

_ST_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit
TAG_KEY = 'e4t'  # the header metadata key of a tagged file's JSON


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
  """Writes to a temporary file beside `path`, then renames: a reader never sees a partial file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      for chunk in chunks:
        f.write(chunk)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


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
    if not 0 <= start <= end or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
      raise ConversionError(f'{path}: tensor {key!r} spans bytes {start}..{end}, which do not hold shape {list(shape)} '
                            f'of {info["dtype"]}; the file is corrupt.')
    out[key] = data[start:end].view(dtype).reshape(shape)
  return out


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
  return _read_header(Path(path))[0].get('__metadata__', {}) or {}


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
