"""Input layer: every kind of bad user image, the sources, shards, and the resumable sharded loader."""
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from e4t_jax import data
from e4t_jax.data import sources
from e4t_jax.errors import CheckpointError, ConfigError, InputError


# ----------------------------------------------------------------------------- helpers
def _rgb(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path, array_or_image, fmt=None, **kwargs):
  image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format=fmt, **kwargs)
  return path


def _write(path, content):
  path.write_bytes(content)
  return path


def _truncated_jpeg(path):
  buffer = io.BytesIO()
  Image.fromarray(_rgb(64, 64)).save(buffer, format='JPEG')
  path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
  return path


# ----------------------------------------------------------------------------- load_image: bad input
@pytest.mark.parametrize('make, message', [
    (lambda p: p / 'missing.png', 'no such file'),
    (lambda p: p, 'is a directory'),
    (lambda p: _write(p / 'empty.jpg', b''), 'is empty'),
    (lambda p: _write(p / 'text.png', b'hello, not a png'), 'not an image'),
    (lambda p: _truncated_jpeg(p / 'cut.jpg'), 'truncated or corrupt'),
    (lambda p: _save(p / 'one.png', _rgb(1, 1)), 'at least 8 px'),
])
def test_load_image_rejects_bad_files_with_one_line(tmp_path, make, message):
  path = make(tmp_path)
  with pytest.raises(InputError, match=message) as info:
    data.load_image(path)
  assert '\n' not in str(info.value) and str(path) in str(info.value)


def test_truncated_png_is_detected(tmp_path):
  full = _save(tmp_path / 'full.png', _rgb(64, 64))
  cut = tmp_path / 'cut.png'
  cut.write_bytes(full.read_bytes()[:-200])
  with pytest.raises(InputError, match='truncated or corrupt'):
    data.load_image(cut)


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
  path = _save(tmp_path / 'big.png', _rgb(64, 64))
  with pytest.raises(InputError, match='max_pixels=1000'):
    data.load_image(path, max_pixels=1000)
  assert data.load_image(path, max_pixels=64 * 64).shape == (64, 64, 3)


def test_pils_own_bomb_error_is_reported(tmp_path, monkeypatch):
  path = _save(tmp_path / 'big.png', _rgb(64, 64))
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # PIL raises above twice its limit, at open
  with pytest.raises(InputError, match='too large to decode safely'):
    data.load_image(path)


# ----------------------------------------------------------------------------- load_image: modes
def test_rgb_jpeg_and_png_round_trip(tmp_path):
  pixels = _rgb(16, 24)
  loaded = data.load_image(_save(tmp_path / 'a.PNG', pixels))
  assert loaded.dtype == np.uint8 and np.array_equal(loaded, pixels)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
  path = _save(tmp_path / 'cmyk.jpg', Image.new('CMYK', (32, 32), (0, 255, 255, 0)), quality=95)
  assert Image.open(path).mode == 'CMYK'
  loaded = data.load_image(path)
  assert loaded.shape == (32, 32, 3)
  np.testing.assert_allclose(loaded[16, 16], [255, 0, 0], atol=6)  # no cyan/magenta = red


def test_16bit_png_is_scaled_not_clipped(tmp_path):
  levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
  path = _save(tmp_path / 'deep.png', Image.fromarray(levels * 257))  # 16-bit: 65535 is white
  assert Image.open(path).mode == 'I;16'
  loaded = data.load_image(path)
  assert np.array_equal(loaded[..., 0], levels.astype(np.uint8))
  assert np.array_equal(loaded[..., 0], loaded[..., 2])


def test_int32_and_float_grayscale_tiffs(tmp_path):
  levels = np.arange(256, dtype=np.int32).reshape(16, 16)
  int_path = _save(tmp_path / 'int.tif', Image.fromarray(levels * 257))
  assert Image.open(int_path).mode == 'I'
  assert np.array_equal(data.load_image(int_path)[..., 1], levels.astype(np.uint8))
  float_path = _save(tmp_path / 'float.tif', Image.fromarray((levels / 255.0).astype(np.float32)))
  assert Image.open(float_path).mode == 'F'
  assert np.abs(data.load_image(float_path)[..., 1].astype(int) - levels).max() <= 1


def test_grayscale_and_gray_alpha(tmp_path):
  gray = np.full((10, 10), 100, np.uint8)
  assert np.all(data.load_image(_save(tmp_path / 'l.png', gray)) == 100)
  gray_alpha = np.stack([gray, np.zeros_like(gray)], axis=-1)  # fully transparent
  assert np.all(data.load_image(_save(tmp_path / 'la.png', Image.fromarray(gray_alpha, 'LA'))) == 255)


def test_rgba_composites_over_white(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[:4, :, 3] = 255  # top: opaque red; bottom: transparent
  loaded = data.load_image(_save(tmp_path / 'rgba.png', rgba))
  assert np.all(loaded[:4] == [255, 0, 0]) and np.all(loaded[4:] == 255)
  half = rgba.copy()
  half[..., 3] = 128
  np.testing.assert_allclose(data.load_image(_save(tmp_path / 'half.webp', half, lossless=True))[0, 0],
                             [255, 127, 127], atol=2)


def test_palette_png_with_transparency(tmp_path):
  palette = Image.new('P', (8, 8), 0)
  palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
  palette.paste(1, (0, 0, 8, 4))  # top: index 1 (green); bottom: index 0, transparent
  path = _save(tmp_path / 'p.png', palette, transparency=0)
  assert Image.open(path).mode == 'P'
  loaded = data.load_image(path)
  assert np.all(loaded[:4] == [0, 255, 0]) and np.all(loaded[4:] == 255)
  opaque = _save(tmp_path / 'p_opaque.bmp', palette)
  assert np.all(data.load_image(opaque)[4:] == [0, 0, 255])


def test_exif_orientation_is_applied(tmp_path):
  pixels = np.zeros((10, 20, 3), np.uint8)  # stored 20 wide, 10 high: left red, right blue
  pixels[:, :10] = [255, 0, 0]
  pixels[:, 10:] = [0, 0, 255]
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  path = _save(tmp_path / 'phone.jpg', pixels, exif=exif.tobytes(), quality=95)
  loaded = data.load_image(path)
  assert loaded.shape == (20, 10, 3)  # displayed upright: 10 wide, 20 high
  assert loaded[2, 5, 0] > 200 and loaded[2, 5, 2] < 50  # the left (red) half is now on top
  assert loaded[17, 5, 2] > 200 and loaded[17, 5, 0] < 50


def test_animated_gif_gives_first_frame(tmp_path):
  frames = [Image.new('RGB', (16, 16), color) for color in [(255, 0, 0), (0, 0, 255)]]
  path = tmp_path / 'anim.gif'
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
  assert Image.open(path).n_frames == 2
  assert np.all(data.load_image(path) == [255, 0, 0])


# ----------------------------------------------------------------------------- geometry, masks, folders
def test_center_crop_resize_keeps_the_middle():
  wide = np.zeros((40, 120, 3), np.uint8)
  wide[:, 40:80] = 200  # only the middle third survives the square crop
  out = data.center_crop_resize(wide, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and np.all(out == 200)
  big = np.full((1000, 800, 3), 77, np.uint8)
  assert np.all(data.center_crop_resize(big, 8) == 77)  # large downscale via reduce(): no ringing
  assert data.center_crop_resize(big[..., 0], 8).shape == (8, 8)  # masks [H, W]
  with pytest.raises(InputError, match='positive integer'):
    data.center_crop_resize(big, 0)


def test_load_mask(tmp_path):
  mask = np.zeros((20, 40), np.uint8)
  mask[:, 10:30] = 255
  loaded = data.load_mask(_save(tmp_path / 'm.png', mask), 10)
  assert loaded.shape == (10, 10) and loaded.dtype == np.float32
  assert 0.0 <= loaded.min() and loaded.max() <= 1.0 and np.all(loaded == 1.0)
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[:8] = 255  # white opaque top, transparent bottom -> background
  loaded = data.load_mask(_save(tmp_path / 'm_rgba.png', rgba), 16)
  assert np.all(loaded[:8] == 1.0) and np.all(loaded[8:] == 0.0)


def test_list_images(tmp_path):
  for name in ['b.JPG', 'a.png', 'sub/c.jpeg', 'sub/deeper/d.WebP', 'e.bmp', 'notes.txt', '.hidden.png',
               '._a.png', '.git/x.png']:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b'x')
  found = [p.relative_to(tmp_path).as_posix() for p in data.list_images(tmp_path)]
  assert found == ['a.png', 'b.JPG', 'e.bmp', 'sub/c.jpeg', 'sub/deeper/d.WebP']
  assert [p.name for p in data.list_images(tmp_path, recursive=False)] == ['a.png', 'b.JPG', 'e.bmp']
  with pytest.raises(InputError, match='no such folder'):
    data.list_images(tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(InputError, match='contains no images'):
    data.list_images(tmp_path / 'empty')


# ----------------------------------------------------------------------------- sources
@pytest.fixture
def image_folder(tmp_path):
  """6 good images (one in a subfolder, one non-square), plus files that must be skipped."""
  folder = tmp_path / 'images'
  for i in range(5):
    _save(folder / f'img{i}.png', _rgb(24, 24, seed=i))
  _save(folder / 'sub' / 'wide.jpg', _rgb(24, 48, seed=9), quality=95)
  (folder / 'broken.png').write_text('not an image')  # skipped at construction
  (folder / 'empty.jpg').write_bytes(b'')  # skipped at construction
  _save(folder / 'tiny.png', _rgb(1, 1))  # skipped at construction
  _truncated_jpeg(folder / 'img2_cut.jpg')  # passes the header check, fails at read time
  return folder


def test_image_folder_source_skips_and_reports(image_folder):
  source = data.ImageFolderSource(image_folder, size=16)
  names = [p.relative_to(image_folder).as_posix() for p in source.paths]
  assert names == ['img0.png', 'img1.png', 'img2.png', 'img2_cut.jpg', 'img3.png', 'img4.png', 'sub/wide.jpg']
  assert sorted(p.split('/')[-1] for p, _ in source.skipped) == ['broken.png', 'empty.jpg', 'tiny.png']
  record = source[0]
  assert record['image'].shape == (16, 16, 3) and record['image'].dtype == np.uint8 and 'mask' not in record
  # The truncated file is replaced by the next readable record, deterministically, and counted.
  assert np.array_equal(source[3]['image'], source[4]['image'])
  assert np.array_equal(source[3]['image'], source[3]['image'])
  assert any(p.endswith('img2_cut.jpg') and 'truncated' in reason for p, reason in source.skipped)
  report = source.report()
  assert '6 records usable, 4 skipped' in report and 'broken.png' in report
  assert pickle.loads(pickle.dumps(source))[1]['image'].shape == (16, 16, 3)  # grain workers


def test_image_folder_source_masks(tmp_path):
  folder, masks = tmp_path / 'images', tmp_path / 'masks'
  _save(folder / 'a.jpg', _rgb(20, 40), quality=95)
  _save(folder / 'sub' / 'b.png', _rgb(16, 16))
  mask_a = np.zeros((10, 20), np.uint8)  # half resolution, same aspect: allowed
  mask_a[:, 5:15] = 255
  _save(masks / 'a_mask.png', mask_a)
  _save(masks / 'sub' / 'b.png', np.full((16, 16), 255, np.uint8))
  source = data.ImageFolderSource(folder, size=8, mask_folder=masks)
  assert source[0]['mask'].shape == (8, 8) and np.all(source[0]['mask'] == 1.0)
  assert source[1]['mask'].dtype == np.float32
  (masks / 'sub' / 'b.png').unlink()
  with pytest.raises(InputError, match='no mask for 1 of 2 images'):
    data.ImageFolderSource(folder, size=8, mask_folder=masks)


def test_folder_with_only_bad_images(tmp_path):
  (tmp_path / 'x.png').write_text('nope')
  with pytest.raises(InputError, match='none of its 1 images is readable'):
    data.ImageFolderSource(tmp_path, size=8)


@pytest.mark.parametrize('size', [16, None])
def test_array_record_shards_round_trip(image_folder, tmp_path, size):
  out_dir = tmp_path / 'shards'
  shards = data.write_array_record_shards(image_folder, out_dir, num_shards=3, size=size)
  assert [p.name for p in shards] == [f'images-0000{i}-of-00003.array_record' for i in range(3)]
  manifest = json.loads((out_dir / sources.MANIFEST_NAME).read_text())
  assert manifest['num_records'] == 6 and len(manifest['skipped']) == 4  # the truncated JPEG too
  assert not list(out_dir.glob('.*'))  # no temporary files left behind
  folder_source = data.ImageFolderSource(image_folder, size=16)
  expected = [folder_source[i]['image'] for i in [0, 1, 2, 4, 5, 6]]  # index 3: the truncated file
  for spec in [out_dir, str(out_dir / 'images-*.array_record'), shards]:
    source = data.ArrayRecordSource(spec, size=16)
    assert len(source) == 6
    for i, want in enumerate(expected):
      assert np.array_equal(source[i]['image'], want)
  # Re-preparing with fewer shards replaces the old ones.
  assert len(data.write_array_record_shards(image_folder, out_dir, num_shards=1, size=size)) == 1
  assert len(list(out_dir.glob('*.array_record'))) == 1
  assert len(data.ArrayRecordSource(out_dir, size=16)) == 6


def test_array_record_shards_with_masks(tmp_path):
  folder, masks = tmp_path / 'images', tmp_path / 'masks'
  for i in range(4):
    _save(folder / f'{i}.png', _rgb(12, 12, seed=i))
    _save(masks / f'{i}.png', np.full((12, 12), 60 * i, np.uint8))
  shards = data.write_array_record_shards(folder, tmp_path / 'shards', num_shards=8, size=8, mask_folder=masks)
  assert len(shards) == 4  # capped at the number of images
  source = data.ArrayRecordSource(tmp_path / 'shards', size=8)
  for i in range(4):
    np.testing.assert_allclose(source[i]['mask'], 60 * i / 255.0, atol=1e-6)


def test_array_record_source_rejects_other_files(tmp_path):
  with pytest.raises(InputError, match='matches no files'):
    data.ArrayRecordSource(str(tmp_path / '*.array_record'), size=8)
  bogus = tmp_path / 'bogus.array_record'
  bogus.write_bytes(b'definitely not an array record file' * 10)
  with pytest.raises(InputError, match='cannot read ArrayRecord shards'):
    data.ArrayRecordSource(bogus, size=8)
  from array_record.python import array_record_module
  foreign = tmp_path / 'foreign.array_record'
  writer = array_record_module.ArrayRecordWriter(str(foreign), 'group_size:1')
  writer.write(b'\x93\x01\x02\x03')  # valid msgpack, not our record
  writer.close()
  with pytest.raises(InputError, match='expected .e4t-image/1'):
    data.ArrayRecordSource(foreign, size=8)


def test_tfds_source_without_tensorflow(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  # Unregistered: TFDSSource must find the prepared files by name alone, as for a dataset prepared elsewhere.
  class E4tTinyTestFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'image': tfds.features.Image(shape=(None, None, 3))}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):  # encoded bytes: preparing needs no TensorFlow
        buffer = io.BytesIO()
        Image.fromarray(_rgb(12, 20, seed=i)).save(buffer, format='PNG')
        yield i, {'image': buffer.getvalue()}

  E4tTinyTestFaces(data_dir=tmp_path, file_format='array_record').download_and_prepare()
  source = data.TFDSSource('e4t_tiny_test_faces', 'train', tmp_path, size=8)
  assert len(source) == 3
  got = sorted(source[i]['image'].tobytes() for i in range(3))
  want = sorted(data.center_crop_resize(_rgb(12, 20, seed=i), 8).tobytes() for i in range(3))
  assert got == want
  with pytest.raises(InputError, match="TFDS dataset 'no_such_dataset_xyz'"):
    data.TFDSSource('no_such_dataset_xyz', 'train', tmp_path, size=8)


def test_synthetic_source_is_deterministic():
  source = data.SyntheticSource(5, 16, seed=3, with_mask=True)
  record = source[2]
  assert record['image'].shape == (16, 16, 3) and record['image'].dtype == np.uint8
  assert record['mask'].shape == (16, 16) and record['mask'].dtype == np.float32
  assert np.array_equal(record['image'], data.SyntheticSource(5, 16, seed=3)[2]['image'])
  assert not np.array_equal(record['image'], data.SyntheticSource(5, 16, seed=4)[2]['image'])
  assert not np.array_equal(record['image'], source[1]['image'])


# ----------------------------------------------------------------------------- loader
class _IndexSource:
  """Record i is an image filled with the value i, so batches reveal which records they hold."""

  def __init__(self, num_records, size=4):
    self.num_records, self.size = num_records, size

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    return {'image': np.full((self.size, self.size, 3), index, np.uint8)}

  def __repr__(self):
    return f'_IndexSource({self.num_records})'


def _indices(batch):
  return np.rint((batch['images'][:, 0, 0, 0] + 1.0) * 127.5).astype(int).tolist()


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_processes_get_disjoint_shards_covering_the_data():
  per_process = []
  for process_index in range(2):
    loader = data.make_loader(_IndexSource(24), global_batch_size=4, seed=0, num_epochs=1,
                              process_index=process_index, process_count=2)
    batches = list(loader)
    assert len(batches) == 6 and all(b['images'].shape == (2, 4, 4, 3) for b in batches)
    per_process.append([i for b in batches for i in _indices(b)])
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(per_process[0] + per_process[1]) == list(range(24))
  assert per_process[0] != sorted(per_process[0])  # shuffled


def test_loader_output_and_determinism():
  source = data.SyntheticSource(12, 8, seed=0, with_mask=True)

  def first_batches(seed):
    loader = data.make_loader(source, global_batch_size=4, seed=seed, process_index=0, process_count=1,
                              random_flip=True)
    return _take(iter(loader), 5)  # crosses an epoch boundary

  run_a, run_b, other = first_batches(7), first_batches(7), first_batches(8)
  batch = run_a[0]
  assert batch['images'].dtype == np.float32 and batch['images'].shape == (4, 8, 8, 3)
  assert -1.0 <= batch['images'].min() and batch['images'].max() <= 1.0
  assert batch['mask'].shape == (4, 8, 8)
  for a, b in zip(run_a, run_b):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not all(np.array_equal(a['images'], b['images']) for a, b in zip(run_a, other))


def test_random_flip_is_applied_to_image_and_mask():
  source = data.SyntheticSource(16, 8, seed=1, with_mask=True)
  plain = next(iter(data.make_loader(source, global_batch_size=16, seed=0, shuffle=False,
                                     process_index=0, process_count=1)))
  flipped = next(iter(data.make_loader(source, global_batch_size=16, seed=0, shuffle=False,
                                       process_index=0, process_count=1, random_flip=True)))
  mirrored = [np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
              for f, p in zip(flipped['images'], plain['images'])]
  assert 0 < sum(mirrored) < 16
  for i, was_mirrored in enumerate(mirrored):
    want = plain['mask'][i][:, ::-1] if was_mirrored else plain['mask'][i]
    assert np.array_equal(flipped['mask'][i], want)


def test_resume_is_bit_exact():
  source = data.SyntheticSource(10, 8, seed=0, with_mask=True)

  def new_iterator():
    return iter(data.make_loader(source, global_batch_size=4, seed=11, process_index=1, process_count=2,
                                 random_flip=True))

  iterator = new_iterator()
  _take(iterator, 3)
  state = data.iterator_state_to_bytes(iterator)
  json.loads(state)  # plain JSON bytes: storable anywhere
  expected = _take(iterator, 4)
  resumed = new_iterator()
  data.iterator_state_from_bytes(resumed, state)
  for want, got in zip(expected, _take(resumed, 4)):
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_resume_refuses_another_loader():
  source = data.SyntheticSource(10, 8, seed=0)
  iterator = iter(data.make_loader(source, global_batch_size=2, seed=1, process_index=0, process_count=1))
  next(iterator)
  state = data.iterator_state_to_bytes(iterator)
  other = iter(data.make_loader(source, global_batch_size=2, seed=2, process_index=0, process_count=1))
  with pytest.raises(CheckpointError, match='does not match this loader'):
    data.iterator_state_from_bytes(other, state)
  with pytest.raises(CheckpointError, match='not valid JSON'):
    data.iterator_state_from_bytes(other, b'\x00garbage')


def test_loader_argument_errors():
  source = data.SyntheticSource(4, 8)
  with pytest.raises(ConfigError, match='not divisible by the 2 JAX processes'):
    data.make_loader(source, global_batch_size=3, seed=0, process_index=0, process_count=2)
  with pytest.raises(ConfigError, match='pass both'):
    data.make_loader(source, global_batch_size=2, seed=0, process_index=0)
  with pytest.raises(ConfigError, match='seed'):
    data.make_loader(source, global_batch_size=2, seed=-1, process_index=0, process_count=1)
  with pytest.raises(InputError, match='never fill a batch'):
    data.make_loader(source, global_batch_size=8, seed=0, num_epochs=1, process_index=0, process_count=1)
  loader = data.make_loader(source, global_batch_size=2, seed=0)  # JAX's process index/count
  assert next(iter(loader))['images'].shape == (2, 8, 8, 3)
