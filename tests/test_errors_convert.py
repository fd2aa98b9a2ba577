"""`e4t convert check` / `diffusers-to-e4t` / `e4t-to-diffusers` on malformed diffusers folders: one line naming
the file and what is wrong, exit 2, nothing written. (Concept exports are in test_errors_generate.py.)"""
import json

import pytest

import badinput
from badinput import Case, with_tensor_shape

C = ['convert', 'check']


def base(a, replace):
  """The embedded model's diffusers folder with some files replaced."""
  return a.model(replace={f'base/{k}': v for k, v in replace.items()}) + '/base'


def edit_json(**changes):
  return lambda data: json.dumps({**json.loads(data), **changes}).encode()


CASES = [
    Case('scheduler-steps-a-string', lambda a: C + [base(a, {'scheduler/scheduler_config.json': edit_json(num_train_timesteps='many')})],
         r'scheduler_config\.json: num_train_timesteps is "many"'),
    Case('scheduler-steps-huge', lambda a: C + [base(a, {'scheduler/scheduler_config.json': edit_json(num_train_timesteps=10**12)})],
         r'num_train_timesteps is 1000000000000, expected an integer in 1\.\.100000'),
    Case('scheduler-beta-a-string', lambda a: C + [base(a, {'scheduler/scheduler_config.json': edit_json(beta_start='x')})],
         r'scheduler_config\.json: invalid scheduler config'),
    Case('scheduler-binary', lambda a: C + [base(a, {'scheduler/scheduler_config.json': b'\x00\xff'})],
         r'scheduler_config\.json: not a readable JSON file'),
    Case('scheduler-a-list', lambda a: C + [base(a, {'scheduler/scheduler_config.json': b'[]'})],
         r'scheduler_config\.json: holds a JSON list'),
    Case('unet-config-a-list', lambda a: C + [base(a, {'unet/config.json': b'[1]'})], r'unet/config\.json: holds a JSON list'),
    Case('unet-config-binary', lambda a: C + [base(a, {'unet/config.json': b'\x89PNG\r\n'})], r'unet/config\.json: not a readable JSON'),
    Case('unet-channels-a-string', lambda a: C + [base(a, {'unet/config.json': edit_json(block_out_channels='many')})],
         r'unet/config\.json: '),
    Case('vae-config-wrong-type', lambda a: C + [base(a, {'vae/config.json': edit_json(latent_channels='four')})],
         r'vae/config\.json: '),
    Case('text-config-wrong-type', lambda a: C + [base(a, {'text_encoder/config.json': edit_json(hidden_size=[1])})],
         r'text_encoder/config\.json: '),
    Case('unet-header-shape-2^62', lambda a: C + [base(a, {'unet/diffusion_pytorch_model.safetensors': with_tensor_shape([2**62, 4])})],
         r'diffusion_pytorch_model\.safetensors: tensor .* do not hold shape'),
    Case('unet-weights-truncated', lambda a: C + [base(a, {'unet/diffusion_pytorch_model.safetensors': lambda d: d[:len(d) // 2]})],
         r'diffusion_pytorch_model\.safetensors: tensor .* runs past the end'),
    Case('e4t-to-diffusers-manifest-a-list', lambda a: ['convert', 'e4t-to-diffusers', a.model(replace={'e4t.json': b'[]'}),
                                                        '--out', 'out'], r'e4t\.json: holds a JSON list'),
    Case('diffusers-to-e4t-missing-folder', lambda a: ['convert', 'diffusers-to-e4t', a.path('nope'), '--image-encoder',
                                                       a.path('nope2'), '--out', 'out'], r'nope'),
]


@pytest.mark.parametrize('case', badinput.params(CASES))
def test_bad_input(case, tmp_path, concept_bytes, capsys, monkeypatch):
  badinput.run(case, tmp_path, concept_bytes, capsys, monkeypatch)
