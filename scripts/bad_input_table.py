"""The before/after table of the bad-input cases (tests/test_errors_*.py), run through a checkout's `e4t`.

    python scripts/bad_input_table.py run CHECKOUT OUT.json [--legacy]   # one subprocess per row
    python scripts/bad_input_table.py table BEFORE.json AFTER.json        # markdown

`run` builds each row's input with this checkout's tests/badinput.py and runs `python -m e4t_jax.cli` of
CHECKOUT (PYTHONPATH) in a fresh folder, recording the exit code, the stderr lines, whether a traceback was
printed and whether any file changed. `--legacy` gives the rows a valid concept carrying the fingerprint
checkouts before issue 21 computed (so a row fails for its own reason, not for the fingerprint). Rows that
would make an old checkout write into the package are skipped. Reruns skip rows already in OUT.json.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / 'tests'), str(REPO)]
TABLES = ('personalize', 'generate', 'convert', 'pretrain')


def run(checkout: str, out_path: Path, legacy: bool) -> None:
  import importlib
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import badinput
  import e4t_jax
  from e4t_jax.e4t.concept import legacy_fingerprint
  tmp = Path(tempfile.mkdtemp())
  valid = badinput.valid_concept_bytes(tmp)
  if legacy:
    made = badinput.Assets(tmp, valid).concept_with('legacy.e4t.safetensors', info={
        'base_fingerprint': legacy_fingerprint(e4t_jax.load_demo()), 'fingerprint_scheme': None})
    valid = Path(made).read_bytes()
  results = json.loads(out_path.read_text()) if out_path.exists() else {}
  for table in TABLES:
    for case in importlib.import_module(f'test_errors_{table}').CASES:
      key = f'{table}/{case.id}'
      if key in results or (legacy and 'embedded-model' in case.id):
        continue
      folder = Path(tempfile.mkdtemp()) / 'case'
      folder.mkdir()
      os.chdir(folder)
      argv = case.argv(badinput.Assets(folder, valid))
      before, start = badinput.snapshot(folder), time.time()
      env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=checkout)
      try:
        done = subprocess.run([sys.executable, '-m', 'e4t_jax.cli', *argv], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=240)
        code, err = done.returncode, done.stderr
      except subprocess.TimeoutExpired as e:
        code, err = 'timeout', e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or '')
      lines = [line for line in err.splitlines() if line.strip() and not line.startswith('e4t: using')]
      results[key] = {'rc': code, 'lines': len(lines), 'traceback': 'Traceback' in err,
                      'last': (lines[-1] if lines else '')[:160], 'changed': badinput.snapshot(folder) != before,
                      'seconds': round(time.time() - start, 1)}
      print(key, results[key], flush=True)
      out_path.write_text(json.dumps(results, indent=1))


def _cell(row) -> str:
  if row is None:
    return 'not run (an old checkout would write into the package)'
  last = re.sub(r'/tmp/tmp[^/ ]+/case/', '', row['last']).replace('|', '\\|')
  if row['rc'] == 'timeout':
    return '**still running after 240 s** (killed)'
  if row['traceback']:
    text = f"**exit {row['rc']}, traceback** `{last[:70]}`"
  elif row['rc'] == 0:
    text = '**exit 0, accepted**'
  elif row['rc'] == 2 and row['lines'] == 1:
    text = f"exit 2: {last.removeprefix('e4t: error: ')[:90]}"
  else:
    text = f"exit {row['rc']} ({row['lines']} lines) `{last[:70]}`"
  if row['changed']:
    text += ' · **wrote files**'
  if row['seconds'] > 5:
    text += f" · after {row['seconds']:.0f} s"
  return text


def table(before_path: Path, after_path: Path) -> str:
  before, after = json.loads(before_path.read_text()), json.loads(after_path.read_text())
  good = lambda r: bool(r) and r['rc'] == 2 and r['lines'] == 1 and not r['traceback'] and not r['changed']
  lines = [f'{len(after)} cases; exit 2 + one line + nothing written: before {sum(good(before.get(k)) for k in after)}, '
           f'after {sum(good(after[k]) for k in after)}.', '', '| case | before | after |', '| --- | --- | --- |']
  lines += [f'| `{key}` | {_cell(before.get(key))} | {_cell(after[key])} |' for key in after]
  return '\n'.join(lines)


if __name__ == '__main__':
  if sys.argv[1] == 'run':
    run(sys.argv[2], Path(sys.argv[3]).absolute(), '--legacy' in sys.argv[4:])
  else:
    print(table(Path(sys.argv[2]), Path(sys.argv[3])))
