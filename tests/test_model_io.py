"""E4T model folders: save -> load is exact; wrong or broken folders are clear errors."""
import json

import jax
import numpy as np
import pytest

from e4t_jax.e4t import io as io_lib
from e4t_jax.errors import CheckpointError


def test_save_then_load_is_bit_exact(tiny_e4t, tmp_path):
  io_lib.save_model(tiny_e4t, tmp_path / 'model')
  loaded = io_lib.load_model(tmp_path / 'model')
  assert loaded.config == tiny_e4t.config
  assert loaded.modules.placeholder_id == tiny_e4t.modules.placeholder_id
  flat_a = dict(jax.tree_util.tree_flatten_with_path(tiny_e4t.params)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(loaded.params)[0])
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


def test_not_a_model_folder_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match='not an e4t model folder'):
    io_lib.load_model(tmp_path)


def test_foreign_format_is_refused(tiny_e4t, tmp_path):
  io_lib.save_model(tiny_e4t, tmp_path / 'model')
  manifest = tmp_path / 'model' / 'e4t.json'
  manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), format='something-else/9')))
  with pytest.raises(CheckpointError, match='something-else'):
    io_lib.load_model(tmp_path / 'model')


def test_corrupt_safetensors_headers_are_clear_errors_without_huge_allocations(tmp_path):
  import struct
  from e4t_jax.fileio import read_safetensors, safetensors_metadata, write_safetensors
  from e4t_jax.errors import ConversionError
  good = tmp_path / 'good.safetensors'
  write_safetensors(good, {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, {'k': 'v'})
  np.testing.assert_array_equal(read_safetensors(good)['w'], np.arange(6).reshape(2, 3))
  assert safetensors_metadata(good) == {'k': 'v'}
  raw = good.read_bytes()
  (header_len,) = struct.unpack('<Q', raw[:8])
  header = json.loads(raw[8:8 + header_len])

  def variant(name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path

  def with_header(h):
    text = json.dumps(h).encode()
    return struct.pack('<Q', len(text)) + text + raw[8 + header_len:]

  cases = {
      'huge_length': (struct.pack('<Q', 2**62) + raw[8:], 'does not fit'),
      'not_json': (struct.pack('<Q', 4) + b'{{{{' + raw[12:], 'not a readable'),
      'a_list': (with_header([1, 2]), 'not a JSON object'),
      'wrong_span': (with_header(dict(header, w=dict(header['w'], data_offsets=[0, 20]))), 'do not hold shape'),
      'no_offsets': (with_header(dict(header, w={'dtype': 'F32', 'shape': [2, 3]})), 'malformed'),
  }
  for name, (data, message) in cases.items():
    with pytest.raises(ConversionError, match=message):
      read_safetensors(variant(f'{name}.safetensors', data))
