"""`e4t pretrain` with bad input: exit 2, one line, nothing written (the harness is tests/badinput.py). Killing it
with SIGKILL is tested in tests/test_train.py (`test_sigkill_at_three_points_resumes_bit_equal`)."""
import pytest

import badinput
from badinput import Case

T = ['pretrain', '--config', 'tiny']

CASES = [
    Case('workdir-is-a-file', lambda a: T + ['--workdir', a.file('w')], r'--workdir .*w: is a file'),
    Case('workdir-under-a-file', lambda a: T + ['--workdir', a.file('w') + '/run'], r'which is a file'),
    Case('workdir-in-proc', lambda a: T + ['--workdir', '/proc/e4t-run'], r'--workdir /proc/e4t-run: cannot write'),
    Case('lr-nan', lambda a: T + ['--workdir', 'run', '--config.optimizer.learning_rate=nan'], r'expected a finite number'),
    Case('lr-inf', lambda a: T + ['--workdir', 'run', '--config.optimizer.learning_rate=inf'], r'expected a finite number'),
    Case('steps-zero', lambda a: T + ['--workdir', a.folder('run'), '--config.train.num_steps=0'], r'train\.num_steps must be >= 1'),
    Case('steps-not-a-number', lambda a: T + ['--workdir', 'run', '--config.train.num_steps=many'], r'expected an integer'),
    Case('unknown-key', lambda a: T + ['--workdir', 'run', '--config.train.nope=1'], r'unknown config key'),
    Case('config-missing', lambda a: ['pretrain', '--config', a.path('nope.py'), '--workdir', 'run'], r'not found'),
    Case('config-not-python', lambda a: ['pretrain', '--config', a.file('bad.py', 'def get_config(:'), '--workdir', 'run'],
         r'bad\.py: cannot be imported'),
]


@pytest.mark.parametrize('case', badinput.params(CASES))
def test_bad_input(case, tmp_path, concept_bytes, capsys, monkeypatch):
  badinput.run(case, tmp_path, concept_bytes, capsys, monkeypatch)
