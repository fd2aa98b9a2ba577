"""Per-test XLA compile profile of the suite, subprocesses included (measurement only, never in CI).

  mkdir -p /tmp/prof && E4T_COMPILEPROF=/tmp/prof PYTHONPATH=scripts/compile_profile make test
  .venv/bin/python scripts/compile_profile/analyze.py /tmp/prof

Every Python process started with this folder on PYTHONPATH (the xdist workers and every `e4t` subprocess
they start) appends one JSON line per jax.monitoring compile event to $E4T_COMPILEPROF/<pid>.jsonl, tagged
with the test that was running (PYTEST_CURRENT_TEST, inherited by subprocesses) and the jitted function's
name. Without E4T_COMPILEPROF it does nothing (and imports nothing); a Python without jax (the Makefile's
version check) is left alone. It shadows any system sitecustomize while on PYTHONPATH.
"""
import os


def _jax_monitoring():
  try:
    import jax.monitoring
  except ImportError:
    return None
  return jax.monitoring


_monitoring = _jax_monitoring() if os.environ.get('E4T_COMPILEPROF') else None
if _monitoring is not None:
  import json

  _EVENTS = ('/jax/core/compile/backend_compile_duration', '/jax/compilation_cache/compile_time_saved_sec',
             '/jax/core/compile/jaxpr_trace_duration', '/jax/core/compile/jaxpr_to_mlir_module_duration')
  _out = open(os.path.join(os.environ['E4T_COMPILEPROF'], f'{os.getpid()}.jsonl'), 'a', buffering=1)

  def _listen(event, duration, **kwargs):
    if event in _EVENTS:
      _out.write(json.dumps({'test': os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0],
                             'event': event.rsplit('/', 1)[-1], 'fun': kwargs.get('fun_name', ''),
                             'seconds': round(duration, 3)}) + '\n')

  _monitoring.register_event_duration_secs_listener(_listen)
