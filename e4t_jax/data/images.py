"""Robust loading of user images and masks: one bad file becomes one clear `InputError` line.

Everything a camera, a phone or a web scrape produces is normalised to uint8 RGB [H, W, 3]:
grayscale and 16-bit images are scaled to 8 bits, transparency is composited over white, CMYK and
palette images are converted, EXIF orientation is applied and animations give their first frame.
Truncated files are detected (the pixels are decoded, not only the header), tiny images and
decompression bombs are rejected before any pixel is decoded.

Non-square images are center-cropped to a square by `center_crop_resize`: E4T trains and
personalizes on square crops, so keep the subject near the middle of the picture.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageOps

from e4t_jax.errors import InputError

# File name endings `list_images` collects (compared case-insensitively).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
# Smaller images carry no usable detail, and are almost always a thumbnail or a tracking pixel.
MIN_SIDE = 8
# Same default as PIL's own decompression-bomb threshold (~89.5 MP): a 50 MP camera photo passes.
DEFAULT_MAX_PIXELS = 89_478_485
# Fill colour for transparent pixels: the subject on a clean, neutral background.
_TRANSPARENT_FILL = (255, 255, 255)


# ----------------------------------------------------------------------------- decoding
def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Reads one image file as uint8 RGB [H, W, 3], or raises `InputError` naming the file and the fix.

  Args:
    path: any image file PIL reads (JPEG, PNG, WebP, BMP, GIF, TIFF, ...).
    max_pixels: images with more pixels (width * height) are rejected before decoding.
  """
  path = Path(path)
  return _decode(_read_file_bytes(path), str(path), max_pixels=max_pixels, as_mask=False)


def decode_image_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Like `load_image` for encoded bytes (e.g. a dataset record); `name` is used in errors."""
  return _decode(data, name, max_pixels=max_pixels, as_mask=False)


def load_mask_array(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Reads a mask file as uint8 [H, W] (255 = subject), at its own resolution, uncropped.

  Colour masks are reduced to their luminance; transparent pixels count as background (0).
  """
  path = Path(path)
  return _decode(_read_file_bytes(path), str(path), max_pixels=max_pixels, as_mask=True)


def decode_mask_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Like `load_mask_array` for encoded bytes."""
  return _decode(data, name, max_pixels=max_pixels, as_mask=True)


def load_mask(path: str | os.PathLike, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Reads a mask as float32 [size, size] in [0, 1], center-cropped like its image.

  The crop matches the image's when the mask has the image's aspect ratio (any resolution).
  """
  mask = center_crop_resize(load_mask_array(path, max_pixels=max_pixels), size)
  return mask.astype(np.float32) / 255.0


def _read_file_bytes(path: Path) -> bytes:
  if path.is_dir():
    raise InputError(f'{path}: is a directory, not an image; pass an image file inside it.')
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise InputError(f'{path}: no such file; check the path.') from None
  except PermissionError:
    raise InputError(f'{path}: permission denied; make the file readable.') from None
  except OSError as e:
    raise InputError(f'{path}: cannot be read ({e.strerror or e}).') from None
  if not data:
    raise InputError(f'{path}: is empty (0 bytes); re-copy or re-export the image.')
  return data


def _decode(data: bytes, name: str, *, max_pixels: int, as_mask: bool) -> np.ndarray:
  """Decodes encoded bytes into uint8 RGB [H, W, 3] (or [H, W] for a mask)."""
  if not data:
    raise InputError(f'{name}: is empty (0 bytes); re-copy or re-export the image.')
  try:
    image = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError:
    raise InputError(f'{name}: is not an image PIL can read; pass a JPEG, PNG, WebP or BMP file.') from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise InputError(f'{name}: is too large to decode safely ({e}); downscale it first.') from None
  except Exception as e:  # Corrupt headers raise anything from SyntaxError to struct.error.
    raise InputError(f'{name}: is corrupt ({type(e).__name__}: {e}); re-copy or re-export the image.') from None
  with image:
    _check_dimensions(image, name, max_pixels=max_pixels)
    try:
      image.seek(0)  # Animated GIF/WebP/PNG: the first frame.
      image.load()  # Decodes every pixel: this is where truncated files fail.
    except Exception as e:
      raise InputError(f'{name}: is truncated or corrupt ({type(e).__name__}: {e}); '
                       're-copy or re-export the image.') from None
    image = _apply_exif_orientation(image)
    _check_dimensions(image, name, max_pixels=max_pixels)
    if image.mode == 'F':  # 32-bit float TIFF: NaN/inf would silently turn into black
      _check_finite(np.asarray(image), name)
    try:
      return _to_mask_uint8(image) if as_mask else _to_rgb_uint8(image)
    except Exception as e:
      raise InputError(f'{name}: has an unsupported pixel format {image.mode!r} ({e}); '
                       'convert it to an 8-bit RGB PNG or JPEG.') from None


def _check_dimensions(image: Image.Image, name: str, *, max_pixels: int) -> None:
  width, height = image.size
  if width * height > max_pixels:
    raise InputError(f'{name}: has {width}x{height} = {width * height} pixels, more than max_pixels={max_pixels} '
                     '(decompression-bomb guard); downscale the image or raise max_pixels.')
  if min(width, height) < MIN_SIDE:
    raise InputError(f'{name}: is only {width}x{height} pixels; images must be at least {MIN_SIDE} px on each '
                     'side (use the full-resolution original, not a thumbnail).')


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
  try:
    return ImageOps.exif_transpose(image)
  except Exception:  # A corrupt EXIF block should not cost the picture: keep it as stored.
    return image


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 RGB [H, W, 3]; transparency is composited over white."""
  mode = image.mode
  if mode == 'RGB':
    return np.asarray(image, dtype=np.uint8).copy()
  if mode.startswith('I') or mode == 'F':
    gray = _high_depth_gray_to_uint8(image)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == 'P' and 'transparency' not in image.info:
    return np.asarray(image.convert('RGB'), dtype=np.uint8).copy()
  if mode in ('RGBA', 'LA', 'PA', 'P', 'RGBa', 'La') or 'transparency' in image.info:
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (*_TRANSPARENT_FILL, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert('RGB'), dtype=np.uint8).copy()
  # L, 1, CMYK, YCbCr, LAB, HSV: PIL's conversions are exact enough for training pixels.
  return np.asarray(image.convert('RGB'), dtype=np.uint8).copy()


def _to_mask_uint8(image: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W]; transparent pixels are background (composited over black)."""
  if image.mode.startswith('I') or image.mode == 'F':
    return _high_depth_gray_to_uint8(image)
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in image.info:
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (0, 0, 0, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert('L'), dtype=np.uint8).copy()
  return np.asarray(image.convert('L'), dtype=np.uint8).copy()


def _high_depth_gray_to_uint8(image: Image.Image) -> np.ndarray:
  """Mode I;16* / I / F -> uint8 [H, W].

  Integer modes are 16-bit data (that is what 16-bit PNG, PGM and TIFF decode to) and are scaled by
  255 / 65535, so white stays white; float images are taken as [0, 1] when they fit, else [0, 255].
  """
  values = np.asarray(image)
  if image.mode == 'F':
    values = values.astype(np.float64)
    values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
  else:
    values = values.astype(np.float64) / 257.0  # 65535 / 257 == 255 exactly.
  return np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)


def _check_finite(values: np.ndarray, name: str) -> None:
  bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
  if bad:
    raise InputError(f'{name}: {bad} of its {np.size(values)} float pixel values are NaN or infinite; '
                     'fix or re-export the image.')


def to_rgb_uint8(array: np.ndarray, name: str = 'image') -> np.ndarray:
  """An already-decoded array ([H, W], [H, W, 1|3|4]; uint8, uint16 or float) -> uint8 RGB [H, W, 3].

  For dataset records (e.g. TFDS) that arrive as arrays rather than files.
  """
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise InputError(f'{name}: has shape {array.shape}; expected [H, W] or [H, W, 1|3|4] pixels.')
  if array.dtype == np.uint16:
    array = np.rint(array.astype(np.float64) / 257.0).astype(np.uint8)
  elif np.issubdtype(array.dtype, np.floating):
    _check_finite(array, name)
    scale = 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else 1.0
    array = np.clip(np.rint(np.nan_to_num(array.astype(np.float64) * scale)), 0, 255).astype(np.uint8)
  elif array.dtype != np.uint8:
    raise InputError(f'{name}: has dtype {array.dtype}; expected uint8, uint16 or float pixels.')
  if array.shape[-1] == 1:
    return np.repeat(array, 3, axis=-1)
  if array.shape[-1] == 4:
    alpha = array[..., 3:].astype(np.float32) / 255.0
    fill = np.asarray(_TRANSPARENT_FILL, np.float32)
    return np.rint(array[..., :3] * alpha + fill * (1.0 - alpha)).astype(np.uint8)
  return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------- geometry
def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Center-crops to a square, then resizes to [size, size] with Lanczos.

  Non-square images lose their borders on the long side. Large downscales first shrink by an
  integer factor with PIL's box `reduce` (via `reducing_gap`), which is both faster and free of
  aliasing. Accepts uint8 [H, W, 3] images and uint8 [H, W] masks; returns the same layout.
  """
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise InputError(f'image size must be a positive integer, got {size!r}.')
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise InputError(f'center_crop_resize expects uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}.')
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = image[top:top + side, left:left + side]
  if side == size:
    return np.ascontiguousarray(square)
  resized = Image.fromarray(np.ascontiguousarray(square)).resize(
      (int(size), int(size)), Image.Resampling.LANCZOS, reducing_gap=3.0)
  return np.asarray(resized, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------- folders
def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
  """All image files under `folder` (.jpg .jpeg .png .webp .bmp, any case), sorted by relative path.

  Hidden files and folders (names starting with '.', e.g. macOS `._photo.jpg` resource forks) are
  skipped; symlinked folders are not followed (no cycles). The order is deterministic across
  machines, so index i means the same file on every host.
  """
  folder = Path(folder)
  if not folder.exists():
    raise InputError(f'{folder}: no such folder; check the path.')
  if not folder.is_dir():
    raise InputError(f'{folder}: is a file, not a folder of images; pass the folder that contains it.')
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.')) if recursive else []
    for file_name in files:
      if not file_name.startswith('.') and file_name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(Path(root) / file_name)
  if not found:
    raise InputError(f'{folder}: contains no images ({", ".join(IMAGE_EXTENSIONS)}); '
                     'check the folder or convert the files.')
  return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def verify_image_header(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
  """Cheap validation without decoding pixels: header, dimensions and PIL's `verify()`.

  Catches empty, non-image, tiny, oversized and (for PNG) truncated files. A truncated JPEG still
  passes; readers must handle a failing `load_image` as well.
  """
  path = Path(path)
  try:
    if path.stat().st_size == 0:
      raise InputError(f'{path}: is empty (0 bytes); re-copy or re-export the image.')
    with Image.open(path) as image:
      _check_dimensions(image, str(path), max_pixels=max_pixels)
      image.verify()
  except InputError:
    raise
  except FileNotFoundError:
    raise InputError(f'{path}: no such file; check the path.') from None
  except Image.UnidentifiedImageError:
    raise InputError(f'{path}: is not an image PIL can read; pass a JPEG, PNG, WebP or BMP file.') from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise InputError(f'{path}: is too large to decode safely ({e}); downscale it first.') from None
  except Exception as e:
    raise InputError(f'{path}: is corrupt ({type(e).__name__}: {e}); re-copy or re-export the image.') from None


def encode_png(array: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
  """uint8 [H, W] or [H, W, 3] -> PNG bytes (lossless); `text` goes into iTXt chunks (UTF-8, so any
  prompt survives), e.g. the generation settings of a render."""
  from PIL.PngImagePlugin import PngInfo  # pylint: disable=g-import-not-at-top
  info = PngInfo()
  for key, value in (text or {}).items():
    info.add_itxt(key, value)
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buffer, format='PNG', pnginfo=info)
  return buffer.getvalue()

