"""Random-access data sources for grain: `len(source)` records, `source[i]` -> one record dict.

Every record is {'image': uint8 [S, S, 3]} plus, when masks are configured, 'mask': float32 [S, S]
in [0, 1]. Sources are deterministic (record i is the same on every host and every epoch) and
picklable (grain worker processes receive a copy).

A long pretraining run must survive the odd bad file in a scraped dataset, so file-backed sources
never crash on one: files failing a cheap check at construction are left out, and a record that
still fails when read is replaced by the next readable record (deterministically) and counted.
`source.skipped` lists (path, reason); `source.report()` formats it for the log.

ArrayRecord shard format (written by `write_array_record_shards`, read by `ArrayRecordSource`):
each record is a msgpack map
  {'format': 'e4t-image/1', 'name': <image path relative to the image folder>,
   'image': <encoded image file bytes: PNG/JPEG/WebP/BMP>, 'mask': <encoded grayscale image bytes>}
where 'mask' is present only for datasets prepared with a mask folder. Shards are named
`images-00000-of-00004.array_record` (ArrayRecord group_size 1, for fast random access), next to a
`manifest.json` that lists them, their record counts and the files left out.
"""
from __future__ import annotations

import concurrent.futures
import glob
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

from e4t_jax.fileio import atomic_write_bytes, read_json
from e4t_jax.data import images
from e4t_jax.errors import InputError

log = logging.getLogger(__name__)

RECORD_FORMAT = 'e4t-image/1'
MANIFEST_NAME = 'manifest.json'
SHARD_PATTERN = 'images-*-of-*.array_record'
# Files validated/encoded concurrently: PIL releases the GIL while decoding, so threads scale.
_IO_THREADS = min(16, 2 * (os.cpu_count() or 1))
# Records encoded ahead of the shard writer.
_ENCODE_WINDOW = 256
# Skip reasons printed by `report()` before it summarises the rest.
_REPORT_LINES = 20

Record = dict[str, np.ndarray]


def _check_size(size: Any) -> int:
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise InputError(f'image size must be a positive integer (e.g. 512), got {size!r}.')
  return int(size)


# ----------------------------------------------------------------------------- robust base
class _SkippingSource:
  """Shared behaviour: replace a record that fails to read by the next readable one, and count it.

  Subclasses set `self._num_records` and implement `_read(index) -> Record` (raising `InputError`)
  and `_describe(index) -> str` (the file or record named in the report).
  """

  _num_records: int
  _construction_skips: list[tuple[str, str]]

  def _init_skipping(self, construction_skips: Iterable[tuple[str, str]] = ()) -> None:
    self._construction_skips = list(construction_skips)
    self._read_failures: dict[int, str] = {}  # index -> reason, filled while reading
    self._failure_lock = threading.Lock()  # grain reads with several threads

  def __len__(self) -> int:
    return self._num_records

  def __getitem__(self, index: int) -> Record:
    index = int(index)
    if not 0 <= index < self._num_records:
      raise IndexError(f'record {index} out of range for {self!r}')
    # Deterministic substitution: the next index that reads, wrapping around. It depends only on
    # which records are bad, so every host and every resumed run sees the same data.
    for offset in range(self._num_records):
      candidate = (index + offset) % self._num_records
      if candidate in self._read_failures:
        continue
      try:
        return self._read(candidate)
      except InputError as e:
        self._record_failure(candidate, str(e))
    raise InputError(f'{self!r}: no record could be read (first failure: {self.skipped[0][1]}).')

  def _record_failure(self, index: int, reason: str) -> None:
    with self._failure_lock:
      if index in self._read_failures:
        return
      self._read_failures[index] = reason
    log.warning('Skipping unreadable record %d (%s); using the next readable record instead.', index, reason)

  def _read(self, index: int) -> Record:
    raise NotImplementedError

  def _describe(self, index: int) -> str:
    return f'record {index}'

  @property
  def skipped(self) -> list[tuple[str, str]]:
    """(path or record, reason) for every file left out at construction or failing at read time.

    Read-time failures are counted in the process that read them: with grain `worker_count > 0`
    they appear in the workers' logs, not in this list of the main process.
    """
    with self._failure_lock:
      failures = sorted(self._read_failures.items())
    return self._construction_skips + [(self._describe(i), reason) for i, reason in failures]

  def report(self) -> str:
    """A human-readable summary: usable records, then one line per skipped file."""
    skipped = self.skipped
    lines = [f'{self!r}: {self._num_records - len(self._read_failures)} records usable, '
             f'{len(skipped)} skipped.']
    lines += [f'  skipped {where}: {reason}' for where, reason in skipped[:_REPORT_LINES]]
    if len(skipped) > _REPORT_LINES:
      lines.append(f'  ... and {len(skipped) - _REPORT_LINES} more.')
    return '\n'.join(lines)

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state['_failure_lock']  # locks do not pickle; grain workers get a fresh one
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._failure_lock = threading.Lock()


def _crop_record(image: np.ndarray, mask: np.ndarray | None, size: int, image_name: str,
                 mask_name: str | None) -> Record:
  """Center-crops an image and its optional uint8 mask identically into a record."""
  record = {'image': images.center_crop_resize(image, size)}
  if mask is not None:
    _check_mask_aspect(image, mask, image_name, mask_name)
    record['mask'] = images.center_crop_resize(mask, size).astype(np.float32) / 255.0
  return record


def _check_mask_aspect(image: np.ndarray, mask: np.ndarray, image_name: str, mask_name: str | None) -> None:
  """Masks may have another resolution, but the same aspect ratio, so the center crops agree."""
  (image_h, image_w), (mask_h, mask_w) = image.shape[:2], mask.shape[:2]
  if abs(image_h * mask_w - mask_h * image_w) > 0.01 * image_w * mask_w:
    raise InputError(f'{mask_name}: is {mask_w}x{mask_h} but its image {image_name} is {image_w}x{image_h}; '
                     'a mask must have its image\'s aspect ratio.')


# ----------------------------------------------------------------------------- image folders
def _match_masks(image_folder: Path, image_paths: Sequence[Path], mask_folder: Path) -> list[Path]:
  """The mask of each image: same relative path (any image extension, optional `_mask` suffix),
  else the unique mask file anywhere in `mask_folder` with that stem."""
  by_relative, by_stem = {}, {}
  for mask_path in images.list_images(mask_folder):
    relative = mask_path.relative_to(mask_folder).with_suffix('').as_posix()
    by_relative[relative] = mask_path
    by_stem.setdefault(mask_path.stem, []).append(mask_path)
  masks, missing = [], []
  for image_path in image_paths:
    relative = image_path.relative_to(image_folder).with_suffix('').as_posix()
    stem = image_path.stem
    match = by_relative.get(relative) or by_relative.get(relative + '_mask')
    if match is None:
      candidates = by_stem.get(stem, []) + by_stem.get(stem + '_mask', [])
      match = candidates[0] if len(candidates) == 1 else None
    if match is None:
      missing.append(relative)
    masks.append(match)
  if missing:
    raise InputError(f'{mask_folder}: no mask for {len(missing)} of {len(image_paths)} images (first: {missing[0]}); '
                     'name each mask like its image (same relative path, optional "_mask" suffix).')
  return masks


def _validate(path: Path, mask_path: Path | None, max_pixels: int) -> str | None:
  """None when the image (and mask) pass the cheap header check, else the reason."""
  try:
    images.verify_image_header(path, max_pixels=max_pixels)
    if mask_path is not None:
      images.verify_image_header(mask_path, max_pixels=max_pixels)
  except InputError as e:
    return str(e)
  return None


def scan_image_folder(folder: str | os.PathLike, mask_folder: str | os.PathLike | None = None, *,
                      max_pixels: int = images.DEFAULT_MAX_PIXELS
                      ) -> tuple[list[tuple[Path, Path | None]], list[tuple[str, str]]]:
  """Lists and cheaply validates a folder: ([(image, mask or None)], [(skipped path, reason)]).

  Raises `InputError` when the folder has no images, masks are missing, or nothing is readable.
  """
  folder = Path(folder)
  image_paths = images.list_images(folder)
  mask_paths: list[Path | None] = [None] * len(image_paths)
  if mask_folder is not None:
    mask_paths = list(_match_masks(folder, image_paths, Path(mask_folder)))
  with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
    reasons = list(pool.map(lambda pair: _validate(*pair, max_pixels), zip(image_paths, mask_paths)))
  entries, skipped = [], []
  for image_path, mask_path, reason in zip(image_paths, mask_paths, reasons):
    if reason is None:
      entries.append((image_path, mask_path))
    else:
      skipped.append((str(image_path), reason))
  if skipped:  # One summary line: a scraped dataset can hold thousands of bad files.
    log.warning('%s: leaving out %d of %d unreadable files (first: %s); see the source\'s report().',
                folder, len(skipped), len(image_paths), skipped[0][1])
  if not entries:
    raise InputError(f'{folder}: none of its {len(image_paths)} images is readable (first: {skipped[0][1]}).')
  return entries, skipped


class ImageFolderSource(_SkippingSource):
  """Images (and optional masks) in a folder tree, decoded on the fly. For small and medium sets.

  For large datasets on pods prefer `write_array_record_shards` + `ArrayRecordSource`: one large
  sequentially written file per shard reads much faster from network storage than many small ones.
  """

  def __init__(self, folder: str | os.PathLike, size: int, mask_folder: str | os.PathLike | None = None, *,
               max_pixels: int = images.DEFAULT_MAX_PIXELS):
    """
    Args:
      folder: searched recursively for .jpg/.jpeg/.png/.webp/.bmp files (sorted by relative path).
      size: side of the square records; images are center-cropped, then resized.
      mask_folder: optional folder with one grayscale mask per image (see `_match_masks`).
      max_pixels: decompression-bomb guard per file.
    """
    self.folder = Path(folder)
    self.mask_folder = None if mask_folder is None else Path(mask_folder)
    self.size = _check_size(size)
    self.max_pixels = max_pixels
    self._entries, construction_skips = scan_image_folder(self.folder, self.mask_folder, max_pixels=max_pixels)
    self._num_records = len(self._entries)
    self._init_skipping(construction_skips)

  @property
  def paths(self) -> list[Path]:
    return [image_path for image_path, _ in self._entries]

  def _read(self, index: int) -> Record:
    image_path, mask_path = self._entries[index]
    image = images.load_image(image_path, max_pixels=self.max_pixels)
    mask = None if mask_path is None else images.load_mask_array(mask_path, max_pixels=self.max_pixels)
    return _crop_record(image, mask, self.size, str(image_path), None if mask_path is None else str(mask_path))

  def _describe(self, index: int) -> str:
    return str(self._entries[index][0])

  def __repr__(self) -> str:
    # Grain stores repr(source) in iterator checkpoints and checks it on restore: keep it free of
    # object ids and absolute paths, so a resumed run may mount the data elsewhere.
    return (f'ImageFolderSource(folder={self.folder.name!r}, num_records={self._num_records}, size={self.size}, '
            f'masks={self.mask_folder is not None})')


# ----------------------------------------------------------------------------- ArrayRecord shards
def _pack_record(name: str, image_bytes: bytes, mask_bytes: bytes | None) -> bytes:
  record = {'format': RECORD_FORMAT, 'name': name, 'image': image_bytes}
  if mask_bytes is not None:
    record['mask'] = mask_bytes
  return msgpack.packb(record, use_bin_type=True)


def _unpack_record(data: bytes, where: str) -> dict[str, Any]:
  try:
    record = msgpack.unpackb(data, raw=False)
  except Exception as e:
    raise InputError(f'{where}: is not an e4t image record ({type(e).__name__}); '
                     're-create the shards with `e4t prepare`.') from None
  if not isinstance(record, dict) or record.get('format') != RECORD_FORMAT or 'image' not in record:
    found = record.get('format') if isinstance(record, dict) else type(record).__name__
    raise InputError(f'{where}: holds records of format {found!r}, expected {RECORD_FORMAT!r}; '
                     're-create the shards with `e4t prepare`.')
  return record


def _encode_entry(image_path: Path, mask_path: Path | None, relative_name: str, size: int | None,
                  max_pixels: int) -> bytes:
  """Fully decodes (so broken files are caught now, not during training) and packs one record."""
  image = images.load_image(image_path, max_pixels=max_pixels)
  mask = None if mask_path is None else images.load_mask_array(mask_path, max_pixels=max_pixels)
  if size is None:
    # Keep the original encoding: no generation loss, and usually smaller than a PNG re-encode.
    if mask is not None:
      _check_mask_aspect(image, mask, str(image_path), str(mask_path))
    return _pack_record(relative_name, image_path.read_bytes(),
                        None if mask_path is None else mask_path.read_bytes())
  record = _crop_record(image, mask, size, str(image_path), None if mask_path is None else str(mask_path))
  mask_bytes = None
  if mask is not None:
    mask_bytes = images.encode_png(np.rint(record['mask'] * 255.0).astype(np.uint8))
  return _pack_record(relative_name, images.encode_png(record['image']), mask_bytes)


def write_array_record_shards(image_folder: str | os.PathLike, out_dir: str | os.PathLike, num_shards: int,
                              size: int | None = None, mask_folder: str | os.PathLike | None = None, *,
                              max_pixels: int = images.DEFAULT_MAX_PIXELS) -> list[Path]:
  """Packs a folder of images (and masks) into ArrayRecord shards; returns the shard paths.

  Unreadable files are left out, logged and listed in `out_dir/manifest.json`. With `size`, records
  hold the center-cropped, resized image as PNG (smaller, faster to read); without, the original
  file bytes. Records keep the folder's sorted order, split into contiguous shards; `num_shards`
  is capped at the number of images. Each shard is written under a temporary name and renamed
  only once every shard is complete, then the manifest is replaced, then shards of an earlier run
  are removed: no reader ever sees a partially written file. (Do not read a directory while it is
  being re-prepared: between the renames it holds a mix of old and new shards.)
  """
  if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
    raise InputError(f'num_shards must be a positive integer, got {num_shards!r}.')
  if size is not None:
    size = _check_size(size)
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  image_folder, out_dir = Path(image_folder), Path(out_dir)
  entries, skipped = scan_image_folder(image_folder, mask_folder, max_pixels=max_pixels)
  num_shards = min(int(num_shards), len(entries))
  out_dir.mkdir(parents=True, exist_ok=True)
  shard_paths = [out_dir / f'images-{i:05d}-of-{num_shards:05d}.array_record' for i in range(num_shards)]
  token = f'{os.getpid()}-{uuid.uuid4().hex[:8]}'  # unique even for several hosts on one shared disk
  temporary_paths = [path.with_name(f'.{path.name}.tmp-{token}') for path in shard_paths]
  boundaries = np.linspace(0, len(entries), num_shards + 1).round().astype(int)

  def encode(entry: tuple[Path, Path | None]) -> tuple[str, bytes | str]:
    image_path, mask_path = entry
    relative_name = image_path.relative_to(image_folder).as_posix()
    try:
      return relative_name, _encode_entry(image_path, mask_path, relative_name, size, max_pixels)
    except InputError as e:
      return relative_name, str(e)

  shard_counts = []
  try:
    with concurrent.futures.ThreadPoolExecutor(_IO_THREADS) as pool:
      for shard_index, temporary_path in enumerate(temporary_paths):
        writer = array_record_module.ArrayRecordWriter(str(temporary_path), 'group_size:1')
        count = 0
        try:
          # pool.map keeps order, so the shards are deterministic whatever the thread timing; windows
          # bound the encoded records held in memory.
          shard_entries = entries[boundaries[shard_index]:boundaries[shard_index + 1]]
          windows = (shard_entries[i:i + _ENCODE_WINDOW] for i in range(0, len(shard_entries), _ENCODE_WINDOW))
          for relative_name, packed in (result for window in windows for result in pool.map(encode, window)):
            if isinstance(packed, str):
              log.warning('Skipping %s: %s', image_folder / relative_name, packed)
              skipped.append((str(image_folder / relative_name), packed))
            else:
              writer.write(packed)
              count += 1
        finally:
          writer.close()
        shard_counts.append(count)
    if sum(shard_counts) == 0:
      raise InputError(f'{image_folder}: none of its images could be decoded (first: {skipped[0][1]}).')
    for temporary_path, shard_path in zip(temporary_paths, shard_paths):
      os.replace(temporary_path, shard_path)
  finally:
    for temporary_path in temporary_paths:
      if temporary_path.exists():
        temporary_path.unlink()

  manifest = {
      'format': RECORD_FORMAT,
      'image_folder': str(image_folder),
      'mask_folder': None if mask_folder is None else str(mask_folder),
      'size': size,
      'num_records': sum(shard_counts),
      'shards': [{'name': p.name, 'num_records': c} for p, c in zip(shard_paths, shard_counts)],
      'skipped': [{'path': path, 'reason': reason} for path, reason in skipped],
  }
  atomic_write_bytes(out_dir / MANIFEST_NAME, [json.dumps(manifest, indent=2).encode()])
  current = {p.name for p in shard_paths}
  for stale in out_dir.glob(SHARD_PATTERN):
    if stale.name not in current:
      stale.unlink()
  return shard_paths


def resolve_shard_paths(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
  """A shard directory (its manifest, else every *.array_record), a glob, a file, or a list of these."""
  if isinstance(paths_or_glob, (str, os.PathLike)):
    spec = os.fspath(paths_or_glob)
    path = Path(spec)
    if path.is_dir():
      manifest = path / MANIFEST_NAME
      if manifest.is_file():
        shards = read_json(manifest, what='an `e4t prepare` shard folder', error=InputError,
                           required={'shards': list})['shards']
        if not all(isinstance(s, dict) and isinstance(s.get('name'), str) for s in shards):
          raise InputError(f'{manifest}: is not a shard manifest (a shard without a name); re-create the shards '
                           'with `e4t prepare`.')
        names = [shard['name'] for shard in shards]
        found = [path / name for name in names]
      else:
        found = sorted(path.glob('*.array_record'))
      if not found:
        raise InputError(f'{path}: contains no .array_record shards; create them with `e4t prepare`.')
    elif glob.has_magic(spec):
      found = sorted(Path(p) for p in glob.glob(spec))
      if not found:
        raise InputError(f'{spec}: matches no files; check the shard pattern.')
    else:
      found = [path]
  else:
    found = [p for item in paths_or_glob for p in resolve_shard_paths(item)]
    if not found:
      raise InputError('no ArrayRecord shard paths given; pass a shard directory, glob or list of files.')
  for path in found:
    if not path.is_file():
      raise InputError(f'{path}: no such shard file; check the path or re-run `e4t prepare`.')
  return found


class ArrayRecordSource(_SkippingSource):
  """Records of ArrayRecord shards written by `write_array_record_shards`."""

  def __init__(self, paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike], size: int, *,
               max_pixels: int = images.DEFAULT_MAX_PIXELS):
    """
    Args:
      paths_or_glob: a shard directory, a glob such as 'data/images-*.array_record', a shard file,
        or a list of these. Shards are read in the given (sorted) order.
      size: side of the square records (records stored at another size are re-cropped/resized).
      max_pixels: decompression-bomb guard per record.
    """
    from grain import sources as grain_sources  # pylint: disable=g-import-not-at-top

    self.paths = resolve_shard_paths(paths_or_glob)
    self.size = _check_size(size)
    self.max_pixels = max_pixels
    try:
      self._records = grain_sources.ArrayRecordDataSource([str(p) for p in self.paths])
      self._num_records = len(self._records)
      first = self._records[0] if self._num_records else None
    except Exception as e:
      raise InputError(f'{self.paths[0].parent}: cannot read ArrayRecord shards ({type(e).__name__}: {e}); '
                       're-create them with `e4t prepare`.') from None
    if first is None:
      raise InputError(f'{self.paths[0].parent}: the shards hold no records; re-create them with `e4t prepare`.')
    _unpack_record(first, f'{self.paths[0]}: record 0')  # wrong-format files fail now, not mid-run
    self._init_skipping()

  def _read(self, index: int) -> Record:
    where = self._describe(index)
    record = _unpack_record(self._records[index], where)
    name = f'{where} ({record.get("name", "?")})'
    image = images.decode_image_bytes(record['image'], name, max_pixels=self.max_pixels)
    mask = record.get('mask')
    if mask is not None:
      mask = images.decode_mask_bytes(mask, f'{name} mask', max_pixels=self.max_pixels)
    return _crop_record(image, mask, self.size, name, f'{name} mask')

  def _describe(self, index: int) -> str:
    return f'shard record {index}'

  def __repr__(self) -> str:
    return f'ArrayRecordSource(shards={len(self.paths)}, num_records={self._num_records}, size={self.size})'


# ----------------------------------------------------------------------------- TFDS
class TFDSSource(_SkippingSource):
  """A prepared TensorFlow Datasets dataset, read through `tfds.data_source` (no TensorFlow needed).

  The dataset must already be prepared in `data_dir` with `file_format='array_record'` (random
  access); nothing is downloaded. Decoding images uses PIL. Preparing a dataset whose builder
  encodes images from arrays needs TensorFlow once, on any machine; builders that yield encoded
  image bytes or file paths prepare without it.
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None, size: int, *,
               image_key: str = 'image', mask_key: str | None = None):
    """
    Args:
      name: TFDS name, e.g. 'celeb_a_hq/256' or 'my_faces:1.0.0'.
      split: e.g. 'train' or 'train[:90%]'.
      data_dir: where the dataset was prepared (None: TFDS's default, ~/tensorflow_datasets).
      size: side of the square records.
      image_key: feature holding the image.
      mask_key: optional feature holding a mask (uint8, 255 = subject).
    """
    self.name, self.split, self.size = name, split, _check_size(size)
    self.data_dir = None if data_dir is None else str(data_dir)
    self.image_key, self.mask_key = image_key, mask_key
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise InputError(f'TFDS dataset {name!r}: tensorflow-datasets is not installed ({e}); '
                       'pip install tensorflow-datasets.') from None
    try:
      self._records = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
      self._num_records = len(self._records)
    except Exception as e:  # DatasetNotFoundError, wrong file format, unknown split, ...
      message = ' '.join(str(e).split())[:400] or type(e).__name__  # TFDS explains over several lines
      raise InputError(f'TFDS dataset {name!r} split {split!r} in {self.data_dir or "~/tensorflow_datasets"}: '
                       f'cannot be opened ({message}); prepare it there with file_format="array_record".') from None
    self._init_skipping()

  def _read(self, index: int) -> Record:
    where = self._describe(index)
    try:
      example = self._records[index]
    except Exception as e:
      raise InputError(f'{where}: cannot be decoded ({type(e).__name__}: {e}).') from None
    if self.image_key not in example:
      raise InputError(f'{where}: has no feature {self.image_key!r} (features: {sorted(example)}); '
                       'set image_key.')
    image = images.to_rgb_uint8(example[self.image_key], where)
    mask = None
    if self.mask_key is not None:
      mask = images.to_rgb_uint8(example[self.mask_key], f'{where} mask')[..., 0]
    return _crop_record(image, mask, self.size, where, f'{where} mask')

  def _describe(self, index: int) -> str:
    return f'{self.name}[{self.split}] record {index}'

  def __repr__(self) -> str:
    return (f'TFDSSource(name={self.name!r}, split={self.split!r}, num_records={self._num_records}, '
            f'size={self.size}, image_key={self.image_key!r}, mask_key={self.mask_key!r})')


# ----------------------------------------------------------------------------- synthetic
class SyntheticSource:
  """Procedural placeholder data: coloured ellipses and rectangles on gradient backgrounds.

  Record i depends only on (seed, i), so tests and smoke runs need no files. With `with_mask`, the
  'mask' is the union of the shapes.
  """

  def __init__(self, num_records: int, size: int, seed: int = 0, *, with_mask: bool = False):
    if isinstance(num_records, bool) or not isinstance(num_records, (int, np.integer)) or num_records < 1:
      raise InputError(f'num_records must be a positive integer, got {num_records!r}.')
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise InputError(f'seed must be a non-negative integer, got {seed!r}.')
    self.num_records, self.size, self.seed = int(num_records), _check_size(size), int(seed)
    self.with_mask = with_mask

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> Record:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range for {self!r}')
    rng = np.random.default_rng([self.seed, index])
    y, x = np.mgrid[0:self.size, 0:self.size].astype(np.float32) / max(self.size - 1, 1)
    top, bottom = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    image = top + (bottom - top) * y[..., None]
    mask = np.zeros((self.size, self.size), bool)
    for _ in range(rng.integers(1, 4)):
      center_y, center_x = rng.uniform(0.2, 0.8, size=2)
      half_h, half_w = rng.uniform(0.08, 0.3, size=2)
      if rng.random() < 0.5:
        shape = ((y - center_y) / half_h) ** 2 + ((x - center_x) / half_w) ** 2 <= 1.0
      else:
        shape = (np.abs(y - center_y) <= half_h) & (np.abs(x - center_x) <= half_w)
      image[shape] = rng.uniform(0, 255, size=3)
      mask |= shape
    record = {'image': np.rint(image).astype(np.uint8)}
    if self.with_mask:
      record['mask'] = mask.astype(np.float32)
    return record

  def __repr__(self) -> str:
    return (f'SyntheticSource(num_records={self.num_records}, size={self.size}, seed={self.seed}, '
            f'with_mask={self.with_mask})')
