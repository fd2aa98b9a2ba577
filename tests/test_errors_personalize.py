"""`e4t personalize` with bad input: exit code 2, one line naming the file or argument, nothing written,
and the expensive work (model load, compile, tuning) never started when the problem is visible before it.
The harness is tests/badinput.py."""
import json

import pytest

import badinput
from badinput import Case, with_tensor_shape

P = ['personalize']


def ok(a):
  return a.image()


CASES = [
    # Output paths: checked before anything loads.
    Case('out-is-a-file', lambda a: P + [ok(a), '--out', a.file('out')], r'--out .*out: is a file'),
    Case('out-under-a-file', lambda a: P + [ok(a), '--out', a.file('out') + '/sub'], r'is under .*out, which is a file'),
    Case('out-in-proc', lambda a: P + [ok(a), '--out', '/proc/e4t-test'], r'--out /proc/e4t-test: cannot write'),
    Case('out-in-sys', lambda a: P + [ok(a), '--out', '/sys/e4t-test'], r'--out /sys/e4t-test: cannot write'),
    Case('target-is-a-directory', lambda a: P + [ok(a), '--out', a.folder('out/ok.e4t.safetensors') + '/..'],
         r'ok\.e4t\.safetensors would be written, but it is a directory'),
    Case('cache-dir-is-a-file', lambda a: P + [ok(a), '--out', 'out', '--cache-dir', a.file('cache')],
         r'--cache-dir .*cache: is a file'),
    Case('out-inside-the-model', lambda a: P + [ok(a), '--model', a.model(), '--out', a.path('model/base/out')],
         r'is inside the input folder .*model'),
    Case('out-inside-the-embedded-model', lambda a: P + [ok(a), '--out', str(badinput.e4t_jax.DEMO_MODEL_DIR / 'x')],
         r'is inside the input folder .*demo_model'),
    # Numbers.
    Case('lr-nan', lambda a: P + [ok(a), '--out', 'out', '--learning-rate', 'nan'], r'--learning-rate: .nan. is not a finite'),
    Case('lr-inf', lambda a: P + [ok(a), '--out', 'out', '--learning-rate', 'inf'], r'not a finite number'),
    Case('lr-negative', lambda a: P + [ok(a), '--out', 'out', '--learning-rate=-1e-4'], r'must be > 0'),
    Case('lr-zero', lambda a: P + [ok(a), '--out', 'out', '--learning-rate', '0'], r'must be > 0'),
    Case('steps-zero', lambda a: P + [ok(a), '--out', 'out', '--steps', '0'], r'--steps: 0 is outside 1\.\.1000'),
    Case('steps-negative', lambda a: P + [ok(a), '--out', 'out', '--steps', '-3'], r'outside 1\.\.1000'),
    Case('steps-unbounded', lambda a: P + [ok(a), '--out', 'out', '--steps', '100000'], r'outside 1\.\.1000'),
    Case('steps-not-a-number', lambda a: P + [ok(a), '--out', 'out', '--steps', 'five'], r'not an integer'),
    Case('views-zero', lambda a: P + [ok(a), '--out', 'out', '--views', '0'], r'--views: 0 is outside'),
    Case('seed-beyond-64-bits', lambda a: P + [ok(a), '--out', 'out', '--seed', str(2**70)], r'--seed: .* is outside 0\.\.'),
    Case('seed-negative', lambda a: P + [ok(a), '--out', 'out', '--seed', '-1'], r'--seed: -1 is outside'),
    Case('seed-plus-images-overflows', lambda a: P + [ok(a), a.image('b.png'), '--out', 'out', '--seed', str(2**32 - 1)],
         r'--seed 4294967295 \+ 2 images passes'),
    # Images.
    Case('image-all-nan', lambda a: P + [a.float_tiff('nan.tif', float('nan')), '--out', 'out'], r'nan\.tif: 4096 of its 4096 float pixel values are NaN'),
    Case('image-all-inf', lambda a: P + [a.float_tiff('inf.tif', float('inf')), '--out', 'out'], r'inf\.tif: .* NaN or infinite'),
    Case('image-missing', lambda a: P + [a.path('nope.png'), '--out', 'out'], r'nope\.png: no such file'),
    Case('image-is-text', lambda a: P + [a.file('text.png', 'hello'), '--out', 'out'], r'text\.png: is not an image'),
    Case('image-is-a-directory', lambda a: P + [a.folder('photos'), '--out', 'out'], r'photos: is a directory'),
    Case('two-images-share-a-stem', lambda a: P + [ok(a), a.image('ok.jpg'), '--out', 'out'],
         r'ok\.png and .*ok\.jpg share the file name stem'),
    # Prompts (checked against the tokenizer once the model is loaded, before compiling).
    Case('prompt-two-placeholders', lambda a: P + [ok(a), '--out', 'out', '--prompt', 'a photo of {} and {}'],
         r'must contain "\{\}" once', stage='load'),
    Case('prompt-placeholder-twice-written-out', lambda a: P + [ok(a), '--out', 'out', '--prompt', 'a photo of * and {}'],
         r'has 2 placeholders', stage='load'),
    Case('prompt-without-placeholder', lambda a: P + [ok(a), '--out', 'out', '--prompt', 'a photo of a face'],
         r'has no placeholder', stage='load'),
    Case('prompt-cut-at-context-length', lambda a: P + [ok(a), '--out', 'out', '--prompt', 'a photo of {} ' + 'very ' * 500],
         r'longer than the text encoder.s \d+ tokens', stage='load'),
    # Model folders.
    Case('model-missing', lambda a: P + [ok(a), '--out', 'out', '--model', a.path('nope')], r'nope: not an e4t model folder', stage='load'),
    Case('model-is-a-file', lambda a: P + [ok(a), '--out', 'out', '--model', a.file('m')], r'm: not an e4t model folder', stage='load'),
    Case('manifest-binary', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={'e4t.json': b'\xff\xfe\x00\x01'})],
         r'e4t\.json: not a readable JSON file', stage='load'),
    Case('manifest-a-list', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={'e4t.json': b'[1, 2]'})],
         r'e4t\.json: holds a JSON list', stage='load'),
    Case('manifest-lacks-config', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={'e4t.json': b'{"format": "e4t-model/1"}'})],
         r"e4t\.json: lacks 'config'", stage='load'),
    Case('manifest-config-wrong-type', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={
        'e4t.json': lambda data: json.dumps({**json.loads(data), 'config': {**json.loads(data)['config'], 'embedding_scale': 'big'}}).encode()})],
         r'e4t\.json: config: embedding_scale is "big", expected float', stage='load'),
    Case('scheduler-steps-not-a-number', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={
        'base/scheduler/scheduler_config.json': lambda data: json.dumps({**json.loads(data), 'num_train_timesteps': 'many'}).encode()})],
         r'scheduler_config\.json: num_train_timesteps is "many"', stage='load'),
    Case('unet-config-wrong-type', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={
        'base/unet/config.json': lambda data: json.dumps({**json.loads(data), 'block_out_channels': 'many'}).encode()})],
         r'unet/config\.json: ', stage='load'),
    Case('unet-header-shape-2^62', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={
        'base/unet/diffusion_pytorch_model.safetensors': with_tensor_shape([2**62, 4])})],
         r'diffusion_pytorch_model\.safetensors: tensor .* do not hold shape \[4611686018427387904, 4\]', stage='load'),
    Case('unet-header-negative-shape', lambda a: P + [ok(a), '--out', 'out', '--model', a.model(replace={
        'base/unet/diffusion_pytorch_model.safetensors': with_tensor_shape([-4, 2])})],
         r'diffusion_pytorch_model\.safetensors: tensor .* do not hold shape', stage='load'),
    # Tuning that diverges: the concept is checked before it is saved.
    # Two steps, as test_cli's and test_demo_model's tuning: the learning rate is an argument, so the session's
    # compilation cache can serve all three with one compile.
    Case('tuning-diverges', lambda a: P + [ok(a), '--out', 'out', '--learning-rate', '1e30', '--steps', '2'],
         r'ok\.png: tuning diverged .*nothing was saved .*lower --learning-rate', stage='work'),
]


@pytest.mark.parametrize('case', badinput.params(CASES))
def test_bad_input(case, tmp_path, concept_bytes, capsys, monkeypatch):
  badinput.run(case, tmp_path, concept_bytes, capsys, monkeypatch)
