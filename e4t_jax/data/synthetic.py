"""A procedural domain for the embedded demo model: stylized cartoon faces, 64x64 RGB.

Every image is drawn from two sets of discrete attributes:
  * identity (stays with a concept): head shape, skin colour, eye style, eye colour, ears, hair style,
    hair colour, mouth, cheek marking -- 4*8*3*6*3*3*6*3*4 = 186,624 combinations;
  * context (what prompts control): background colour, accessory, size.
Record captions name the context and never the identity ("a small face on a blue background wearing a
hat"); `Identity.words` puts an identity into words for the base model's training captions only. The
coarse word is "face". Identities are split for good: a fixed 1/8 of the combination space (by a
hash of the attributes) is held out, so held-out identities used for personalization and evaluation
never appear in training.

Rendering is numpy only and deterministic: `render(identity, context, jitter)` draws at 4x resolution
and box-filters down (anti-aliased edges). A record of `SyntheticFaces(split, seed)` depends only on
(split, seed, index).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from e4t_jax.errors import InputError

IMAGE_SIZE = 64
COARSE_WORD = 'face'
_SUPERSAMPLE = 4
_HELDOUT_BUCKETS = 8  # identity is held out iff hash % 8 == 0

# ----------------------------------------------------------------------------- attribute vocabularies
SKIN_COLORS = {  # name -> RGB
    'peach': (250, 205, 170), 'tan': (215, 160, 110), 'brown': (150, 95, 60), 'ebony': (85, 55, 40),
    'mint': (170, 230, 180), 'sky': (165, 205, 245), 'lilac': (210, 180, 240), 'gray': (175, 175, 175)}
EYE_COLORS = {'black': (20, 20, 20), 'blue': (40, 90, 230), 'green': (30, 160, 60), 'brown': (120, 70, 20),
              'red': (210, 30, 40), 'gold': (230, 180, 20)}
HAIR_COLORS = {'black': (25, 25, 30), 'blond': (245, 215, 90), 'red': (200, 60, 30), 'white': (245, 245, 245),
               'blue': (40, 80, 200), 'pink': (245, 120, 190)}
BACKGROUNDS = {'red': (220, 50, 50), 'green': (60, 170, 70), 'blue': (50, 90, 210), 'yellow': (240, 220, 60),
               'purple': (140, 60, 180), 'black': (20, 20, 25)}

IDENTITY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    'head': ('round', 'wide', 'tall', 'square'),
    'skin': tuple(SKIN_COLORS),
    'eyes': ('dots', 'ovals', 'slits'),
    'eye_color': tuple(EYE_COLORS),
    'ears': ('none', 'round', 'pointy'),
    'hair': ('bald', 'bangs', 'spikes'),
    'hair_color': tuple(HAIR_COLORS),
    'mouth': ('smile', 'flat', 'open'),
    'marking': ('none', 'blush', 'nose', 'freckles'),
}
CONTEXT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    'background': tuple(BACKGROUNDS),
    'accessory': ('none', 'hat', 'glasses', 'bowtie'),
    'size': ('large', 'small'),
}
_ACCESSORY_PHRASES = {'none': '', 'hat': ' wearing a hat', 'glasses': ' with glasses', 'bowtie': ' with a bow tie'}
_EYE_WORDS = {'dots': 'dot', 'ovals': 'oval', 'slits': 'slit'}
# Eye and hair colours are said with words that no background uses: a caption then names each
# background colour once, and a small text encoder need not work out which noun a colour binds to
# (a first demo model trained with 'red eyes ... on a red background' lost most of its background control).
_EYE_COLOR_WORDS = {'black': 'onyx', 'blue': 'sapphire', 'green': 'emerald', 'brown': 'amber', 'red': 'ruby',
                    'gold': 'gold'}
_HAIR_COLOR_WORDS = {'black': 'jet', 'blond': 'blond', 'red': 'ginger', 'white': 'white', 'blue': 'navy',
                     'pink': 'pink'}
_MOUTH_WORDS = {'smile': 'a smile', 'flat': 'a flat mouth', 'open': 'an open mouth'}
_MARKING_WORDS = {'blush': 'blush', 'nose': 'a nose', 'freckles': 'freckles'}


def _check_values(cls_name: str, names: dict[str, tuple[str, ...]], values: dict[str, int]) -> None:
  for name, choices in names.items():
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < len(choices):
      raise InputError(f'{cls_name}.{name}={value!r} must be an integer in [0, {len(choices)}).')


@dataclasses.dataclass(frozen=True)
class Identity:
  """Who is drawn: one index per `IDENTITY_ATTRIBUTES` entry."""
  head: int
  skin: int
  eyes: int
  eye_color: int
  ears: int
  hair: int
  hair_color: int
  mouth: int
  marking: int

  def __post_init__(self):
    _check_values('Identity', IDENTITY_ATTRIBUTES, dataclasses.asdict(self))

  def to_array(self) -> np.ndarray:
    return np.asarray([getattr(self, n) for n in IDENTITY_ATTRIBUTES], np.int32)

  @classmethod
  def from_array(cls, values: Any) -> 'Identity':
    return cls(*(int(v) for v in np.asarray(values).reshape(-1)))

  @property
  def is_heldout(self) -> bool:
    digest = hashlib.sha256(self.to_array().tobytes()).digest()
    return digest[0] % _HELDOUT_BUCKETS == 0

  def describe(self) -> str:
    """Human-readable attributes (for grids and reports)."""
    return ', '.join(f'{n}={IDENTITY_ATTRIBUTES[n][getattr(self, n)]}' for n in IDENTITY_ATTRIBUTES)

  def words(self, subject: str = COARSE_WORD) -> str:
    """The identity in words around the subject word, for the base model's captions:
    'round lilac face with emerald dot eyes, pointy ears, ginger spikes, a smile and freckles'.

    The base text-to-image model is trained on such captions (like Stable Diffusion, whose captions
    describe looks); prompts for personalization and evaluation never contain them.
    """
    name = lambda attribute: IDENTITY_ATTRIBUTES[attribute][getattr(self, attribute)]
    parts = [f'{_EYE_COLOR_WORDS[name("eye_color")]} {_EYE_WORDS[name("eyes")]} eyes']
    if name('ears') != 'none':
      parts.append(f'{name("ears")} ears')
    parts.append('no hair' if name('hair') == 'bald' else f'{_HAIR_COLOR_WORDS[name("hair_color")]} {name("hair")}')
    parts.append(_MOUTH_WORDS[name('mouth')])
    if name('marking') != 'none':
      parts.append(_MARKING_WORDS[name('marking')])
    return f'{name("head")} {name("skin")} {subject} with {", ".join(parts[:-1])} and {parts[-1]}'


@dataclasses.dataclass(frozen=True)
class Context:
  """Where and how it is drawn: one index per `CONTEXT_ATTRIBUTES` entry."""
  background: int = 0
  accessory: int = 0
  size: int = 0

  def __post_init__(self):
    _check_values('Context', CONTEXT_ATTRIBUTES, dataclasses.asdict(self))

  def to_array(self) -> np.ndarray:
    return np.asarray([getattr(self, n) for n in CONTEXT_ATTRIBUTES], np.int32)

  @classmethod
  def from_array(cls, values: Any) -> 'Context':
    return cls(*(int(v) for v in np.asarray(values).reshape(-1)))

  @classmethod
  def from_names(cls, background: str = 'red', accessory: str = 'none', size: str = 'large') -> 'Context':
    try:
      return cls(CONTEXT_ATTRIBUTES['background'].index(background),
                 CONTEXT_ATTRIBUTES['accessory'].index(accessory), CONTEXT_ATTRIBUTES['size'].index(size))
    except ValueError:
      raise InputError(f'unknown context ({background!r}, {accessory!r}, {size!r}); choices: '
                       f'{CONTEXT_ATTRIBUTES}.') from None

  def template(self) -> str:
    """The caption with '{}' where the subject word goes: 'a small {} on a blue background wearing a hat'."""
    size = 'small ' if CONTEXT_ATTRIBUTES['size'][self.size] == 'small' else ''
    background = CONTEXT_ATTRIBUTES['background'][self.background]
    accessory = _ACCESSORY_PHRASES[CONTEXT_ATTRIBUTES['accessory'][self.accessory]]
    return f'a {size}{{}} on a {background} background{accessory}'

  def caption(self, subject: str = COARSE_WORD) -> str:
    return self.template().format(subject)


def sample_identity(rng: np.random.Generator, split: str = 'train') -> Identity:
  """A random identity from the 'train' or 'heldout' part of the combination space."""
  if split not in ('train', 'heldout'):
    raise InputError(f"split must be 'train' or 'heldout', got {split!r}.")
  while True:
    identity = Identity(*(int(rng.integers(len(c))) for c in IDENTITY_ATTRIBUTES.values()))
    if identity.is_heldout == (split == 'heldout'):
      return identity


def sample_context(rng: np.random.Generator) -> Context:
  return Context(*(int(rng.integers(len(c))) for c in CONTEXT_ATTRIBUTES.values()))


def heldout_identities(count: int, seed: int = 0) -> list[Identity]:
  """`count` distinct held-out identities, the same for the same (count, seed)."""
  rng = np.random.default_rng([seed, 0x5EED])
  found: dict[Identity, None] = {}
  while len(found) < count:
    found.setdefault(sample_identity(rng, 'heldout'))
  return list(found)


# ----------------------------------------------------------------------------- rendering
class _Canvas:
  """An RGB float canvas at `size * _SUPERSAMPLE` with shape-mask painting in unit coordinates."""

  def __init__(self, size: int, color):
    self.size = size
    side = size * _SUPERSAMPLE
    self.pixels = np.empty((side, side, 3), np.float32)
    self.pixels[:] = np.asarray(color, np.float32)
    self.subject = np.zeros((side, side), bool)  # where the painted pixels show the face (the loss mask)
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    self.y, self.x = coords[:, None], coords[None, :]

  def paint(self, mask: np.ndarray, color, subject: bool = True) -> None:
    """Paints `color` where `mask`; `subject`: those pixels now show the face (False: the context)."""
    mask = np.broadcast_to(mask, self.pixels.shape[:2])
    self.pixels[mask] = np.asarray(color, np.float32)
    self.subject[mask] = subject

  def ellipse(self, cy, cx, ry, rx) -> np.ndarray:
    return ((self.y - cy) / ry) ** 2 + ((self.x - cx) / rx) ** 2 <= 1.0

  def rect(self, y0, x0, y1, x1) -> np.ndarray:
    return (self.y >= y0) & (self.y <= y1) & (self.x >= x0) & (self.x <= x1)

  def superellipse(self, cy, cx, ry, rx, power=4.0) -> np.ndarray:
    return np.abs((self.y - cy) / ry) ** power + np.abs((self.x - cx) / rx) ** power <= 1.0

  def triangle(self, apex, left, right) -> np.ndarray:
    """Points (y, x) inside the triangle (sign test of the three edges)."""
    def side(a, b):
      return (b[1] - a[1]) * (self.y - a[0]) - (b[0] - a[0]) * (self.x - a[1])
    s1, s2, s3 = side(apex, left), side(left, right), side(right, apex)
    return ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))

  def result(self) -> np.ndarray:
    side = self.size
    blocks = self.pixels.reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(blocks), 0, 255).astype(np.uint8)

  def subject_mask(self) -> np.ndarray:
    """float32 [size, size] in [0, 1]: the fraction of each pixel that shows the face."""
    side = self.size
    return self.subject.reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def render(identity: Identity, context: Context = Context(), *, size: int = IMAGE_SIZE,
           jitter: tuple[float, float] = (0.0, 0.0), with_mask: bool = False):
  """Draws one face: uint8 [size, size, 3]; with `with_mask`, (image, mask) where the mask is float32
  [size, size] in [0, 1], the fraction of each pixel showing the face (head, ears, hair and features;
  not the background, and not the accessory where it covers the face).

  jitter: (dy, dx) shift of the face centre in units of the image side (records use up to +-0.04).
  """
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
    raise InputError(f'size must be an integer >= 16, got {size!r}.')
  names = {n: IDENTITY_ATTRIBUTES[n][getattr(identity, n)] for n in IDENTITY_ATTRIBUTES}
  ctx = {n: CONTEXT_ATTRIBUTES[n][getattr(context, n)] for n in CONTEXT_ATTRIBUTES}
  canvas = _Canvas(size, BACKGROUNDS[ctx['background']])
  scale = 1.0 if ctx['size'] == 'large' else 0.68
  cy, cx = 0.54 + jitter[0], 0.5 + jitter[1]
  ry, rx = {'round': (0.30, 0.30), 'wide': (0.26, 0.34), 'tall': (0.34, 0.25), 'square': (0.29, 0.29)}[names['head']]
  ry, rx = ry * scale, rx * scale
  skin, hair_rgb = SKIN_COLORS[names['skin']], HAIR_COLORS[names['hair_color']]
  darker_skin = tuple(0.75 * c for c in skin)

  # Ears behind the head.
  if names['ears'] == 'round':
    for sign in (-1, 1):
      canvas.paint(canvas.ellipse(cy - 0.2 * ry, cx + sign * rx * 1.0, 0.3 * ry, 0.3 * rx), darker_skin)
  elif names['ears'] == 'pointy':
    for sign in (-1, 1):
      apex = (cy - ry * 1.35, cx + sign * rx * 0.85)
      canvas.paint(canvas.triangle(apex, (cy - ry * 0.5, cx + sign * rx * 0.2), (cy - ry * 0.2, cx + sign * rx * 1.0)),
                   darker_skin)
  # Head.
  head = (canvas.superellipse(cy, cx, ry, rx, 5.0) if names['head'] == 'square' else canvas.ellipse(cy, cx, ry, rx))
  canvas.paint(head, skin)
  # Hair on top of the head.
  if names['hair'] == 'bangs':
    canvas.paint(head & (canvas.y <= cy - 0.35 * ry), hair_rgb)
  elif names['hair'] == 'spikes':
    for k in range(5):
      px = cx + (k - 2) * 0.42 * rx
      canvas.paint(canvas.triangle((cy - ry * 1.3, px), (cy - ry * 0.6, px - 0.3 * rx), (cy - ry * 0.6, px + 0.3 * rx)),
                   hair_rgb)
    canvas.paint(head & (canvas.y <= cy - 0.55 * ry), hair_rgb)
  # Eyes.
  eye_rgb = EYE_COLORS[names['eye_color']]
  ey = cy - 0.1 * ry
  for sign in (-1, 1):
    ex = cx + sign * 0.42 * rx
    if names['eyes'] == 'dots':
      canvas.paint(canvas.ellipse(ey, ex, 0.13 * ry, 0.13 * rx), eye_rgb)
    elif names['eyes'] == 'ovals':
      canvas.paint(canvas.ellipse(ey, ex, 0.2 * ry, 0.15 * rx), (250, 250, 250))
      canvas.paint(canvas.ellipse(ey + 0.03 * ry, ex, 0.12 * ry, 0.1 * rx), eye_rgb)
    else:  # slits
      canvas.paint(canvas.ellipse(ey, ex, 0.06 * ry, 0.2 * rx), eye_rgb)
  # Cheek marking.
  if names['marking'] == 'blush':
    for sign in (-1, 1):
      canvas.paint(canvas.ellipse(cy + 0.25 * ry, cx + sign * 0.6 * rx, 0.1 * ry, 0.15 * rx), (240, 110, 130))
  elif names['marking'] == 'nose':
    canvas.paint(canvas.ellipse(cy + 0.15 * ry, cx, 0.1 * ry, 0.1 * rx), (200, 40, 60))
  elif names['marking'] == 'freckles':
    for dy, dx in ((0.2, -0.6), (0.3, -0.45), (0.2, -0.3), (0.2, 0.3), (0.3, 0.45), (0.2, 0.6)):
      canvas.paint(canvas.ellipse(cy + dy * ry, cx + dx * rx, 0.05 * ry, 0.05 * rx), (110, 60, 30))
  # Mouth.
  mouth_y = cy + 0.45 * ry
  if names['mouth'] == 'smile':
    ring = canvas.ellipse(mouth_y - 0.1 * ry, cx, 0.22 * ry, 0.4 * rx) & ~canvas.ellipse(
        mouth_y - 0.16 * ry, cx, 0.2 * ry, 0.36 * rx)
    canvas.paint(ring & (canvas.y >= mouth_y - 0.02 * ry), (60, 20, 20))
  elif names['mouth'] == 'flat':
    canvas.paint(canvas.rect(mouth_y - 0.03 * ry, cx - 0.3 * rx, mouth_y + 0.03 * ry, cx + 0.3 * rx), (60, 20, 20))
  else:  # open
    canvas.paint(canvas.ellipse(mouth_y, cx, 0.12 * ry, 0.16 * rx), (60, 20, 20))
  # Accessory (context): painted over the face, it is not part of the face's mask.
  wear = lambda region, color: canvas.paint(region, color, subject=False)
  if ctx['accessory'] == 'hat':
    brim_y = cy - 0.8 * ry
    wear(canvas.rect(brim_y - 0.05 * ry, cx - 1.05 * rx, brim_y + 0.06 * ry, cx + 1.05 * rx), (40, 40, 40))
    wear(canvas.rect(brim_y - 0.75 * ry, cx - 0.6 * rx, brim_y, cx + 0.6 * rx), (40, 40, 40))
    wear(canvas.rect(brim_y - 0.2 * ry, cx - 0.6 * rx, brim_y - 0.08 * ry, cx + 0.6 * rx), (230, 30, 30))
  elif ctx['accessory'] == 'glasses':
    for sign in (-1, 1):
      ex = cx + sign * 0.42 * rx
      lens = canvas.ellipse(ey, ex, 0.25 * ry, 0.27 * rx) & ~canvas.ellipse(ey, ex, 0.17 * ry, 0.19 * rx)
      wear(lens, (15, 15, 15))
    wear(canvas.rect(ey - 0.03 * ry, cx - 0.18 * rx, ey + 0.03 * ry, cx + 0.18 * rx), (15, 15, 15))
  elif ctx['accessory'] == 'bowtie':
    by = cy + ry * 1.02
    for sign in (-1, 1):
      wear(canvas.triangle((by, cx), (by - 0.2 * ry, cx + sign * 0.45 * rx), (by + 0.2 * ry, cx + sign * 0.45 * rx)),
           (245, 245, 245))
    wear(canvas.ellipse(by, cx, 0.07 * ry, 0.07 * rx), (150, 150, 150))
  if with_mask:
    return canvas.result(), canvas.subject_mask()
  return canvas.result()


# ----------------------------------------------------------------------------- data source
class SyntheticFaces:
  """Random-access records of the synthetic face domain, for the grain loader.

  Record i (depends only on (split, seed, i)):
    'image':    uint8 [size, size, 3]
    'caption':  bytes scalar, the context caption with '{}' for the subject word
    'identity': int32 [9], 'context': int32 [3] (the generator's parameters, for read-out training)
    'mask':     float32 [size, size] in [0, 1], where the face is (`render`'s mask), with `with_mask`
  """

  def __init__(self, num_records: int, size: int = IMAGE_SIZE, seed: int = 0, *, split: str = 'train',
               with_mask: bool = False):
    if isinstance(num_records, bool) or not isinstance(num_records, (int, np.integer)) or num_records < 1:
      raise InputError(f'num_records must be a positive integer, got {num_records!r}.')
    if split not in ('train', 'heldout'):
      raise InputError(f"split must be 'train' or 'heldout', got {split!r}.")
    self.num_records, self.size, self.seed, self.split = int(num_records), int(size), int(seed), split
    self.with_mask = bool(with_mask)

  def __len__(self) -> int:
    return self.num_records

  def sample(self, index: int) -> tuple[Identity, Context, tuple[float, float]]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'record {index} out of range for {self!r}')
    rng = np.random.default_rng([self.seed, 1 if self.split == 'heldout' else 0, index])
    identity = sample_identity(rng, self.split)
    context = sample_context(rng)
    jitter = tuple(float(v) for v in rng.uniform(-0.04, 0.04, size=2))
    return identity, context, jitter

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    identity, context, jitter = self.sample(index)
    drawn = render(identity, context, size=self.size, jitter=jitter, with_mask=self.with_mask)
    image, mask = drawn if self.with_mask else (drawn, None)
    record = {'image': image, 'caption': np.asarray(context.template().encode()),
              'identity': identity.to_array(), 'context': context.to_array()}
    if mask is not None:
      record['mask'] = mask
    return record

  def render_all(self, progress: str | None = None, workers: int = 0) -> dict[str, np.ndarray]:
    """Every record as arrays: 'images' uint8 [n, size, size, 3], 'identity' int32 [n, 9],
    'context' int32 [n, 3] (and 'masks' float32 [n, size, size] with `with_mask`).

    progress: a bar label on stderr (None: silent).
    workers: render in this many processes (0 or 1: in this one). A record depends on its index only,
      so the arrays are the same for every worker count. The workers are spawned (the parent may hold
      JAX's threads, which a forked child must not inherit): a script that asks for workers runs its
      code under `if __name__ == '__main__':`, as Python's multiprocessing requires.
    """
    from e4t_jax.progress import progress_bar  # pylint: disable=g-import-not-at-top
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
      raise InputError(f'workers must be a non-negative integer, got {workers!r}.')
    n = self.num_records
    arrays = self._empty(n)
    with progress_bar(n, progress or '', 'img', enabled=progress is not None) as bar:
      if workers > 1 and n > 1:
        import concurrent.futures  # pylint: disable=g-import-not-at-top
        import multiprocessing  # pylint: disable=g-import-not-at-top
        chunk = max(1, min(1024, -(-n // (4 * workers))))
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
          for start, part in zip(range(0, n, chunk),
                                 pool.map(self._render_range, [(a, min(a + chunk, n)) for a in range(0, n, chunk)])):
            for name, values in part.items():
              arrays[name][start:start + len(values)] = values
            bar.update(len(part['images']))
      else:
        for i in range(n):
          self._fill(arrays, i, self[i])
          bar.update(1)
    return arrays

  def _fill(self, arrays: dict[str, np.ndarray], i: int, record: dict[str, np.ndarray]) -> None:
    arrays['images'][i], arrays['identity'][i], arrays['context'][i] = (
        record['image'], record['identity'], record['context'])
    if self.with_mask:
      arrays['masks'][i] = record['mask']

  def _empty(self, n: int) -> dict[str, np.ndarray]:
    arrays = {'images': np.empty((n, self.size, self.size, 3), np.uint8),
              'identity': np.empty((n, len(IDENTITY_ATTRIBUTES)), np.int32),
              'context': np.empty((n, len(CONTEXT_ATTRIBUTES)), np.int32)}
    if self.with_mask:
      arrays['masks'] = np.empty((n, self.size, self.size), np.float32)
    return arrays

  def _render_range(self, bounds: tuple[int, int]) -> dict[str, np.ndarray]:
    start, stop = bounds
    arrays = self._empty(stop - start)
    for i in range(start, stop):
      self._fill(arrays, i - start, self[i])
    return arrays

  def __repr__(self) -> str:
    return (f'SyntheticFaces(num_records={self.num_records}, size={self.size}, seed={self.seed}, split={self.split!r}'
            f'{", with_mask=True" if self.with_mask else ""})')
