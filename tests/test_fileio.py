"""Format-tagged safetensors files (concepts, the read-out): round trip, and one clear error naming the file
for a missing, untagged, foreign-format or damaged file."""
import json

import numpy as np
import pytest

from e4t_jax.errors import CheckpointError, InputError
from e4t_jax.fileio import read_tagged_safetensors, write_safetensors, write_tagged_safetensors


def _read(path):
  return read_tagged_safetensors(path, 'test-format/1', what='test', missing_hint='make one first')


def test_tagged_file_round_trips_tensors_and_info(tmp_path):
  path = write_tagged_safetensors(tmp_path / 'a.safetensors', {'w': np.arange(6, dtype=np.float32).reshape(2, 3)},
                                  'test-format/1', {'widths': [1, 2], 'name': 'x'})
  tensors, info = _read(path)
  np.testing.assert_array_equal(tensors['w'], np.arange(6, dtype=np.float32).reshape(2, 3))
  assert info == {'widths': [1, 2], 'name': 'x'}  # the format tag is checked, not returned


def test_missing_file_is_an_input_error_with_the_hint(tmp_path):
  with pytest.raises(InputError, match=r'missing\.safetensors: no such test file \(make one first\)'):
    _read(tmp_path / 'missing.safetensors')


@pytest.mark.parametrize('metadata, message', [
    (None, "no 'e4t' metadata"),
    ({'format': 'test-format/1'}, "no 'e4t' metadata"),  # flat metadata is not a tag
    ({'e4t': '[1, 2]'}, 'not a JSON object'),
    ({'e4t': '{not json'}, 'not an e4t test file or corrupt'),
    ({'e4t': json.dumps({'format': 'other/1'})}, "test format 'other/1', this e4t-jax reads 'test-format/1'"),
])
def test_untagged_or_foreign_files_are_checkpoint_errors_naming_the_file(tmp_path, metadata, message):
  path = tmp_path / 'bad.safetensors'
  write_safetensors(path, {'w': np.zeros(3, np.float32)}, metadata=metadata)
  with pytest.raises(CheckpointError, match=message) as info:
    _read(path)
  assert str(info.value).startswith(str(path)) and '\n' not in str(info.value)


def test_truncated_file_is_a_checkpoint_error(tmp_path):
  path = write_tagged_safetensors(tmp_path / 'a.safetensors', {'w': np.zeros(64, np.float32)}, 'test-format/1', {})
  path.write_bytes(path.read_bytes()[:40])
  with pytest.raises(CheckpointError, match='a.safetensors: not an e4t test file or corrupt'):
    _read(path)
