"""Summarizes the compile profile written by scripts/compile_profile/sitecustomize.py (see there)."""
import collections
import glob
import json
import os
import sys


def main(folder: str) -> None:
  rows = [json.loads(line) for path in glob.glob(os.path.join(folder, '*.jsonl')) for line in open(path)
          if line.strip()]
  of = lambda event: [r for r in rows if r['event'] == event]
  compiles, saved = of('backend_compile_duration'), of('compile_time_saved_sec')
  total = lambda rs: sum(r['seconds'] for r in rs)
  print(f'XLA backend compiles: {total(compiles):.0f} s in {len(compiles)} compiles; persistent-cache hits: '
        f'{len(saved)} (saved {total(saved):.0f} s); tracing {total(of("jaxpr_trace_duration")):.0f} s; '
        f'lowering {total(of("jaxpr_to_mlir_module_duration")):.0f} s')
  by_file = collections.Counter()
  for r in compiles:
    by_file[r['test'].split('::')[0]] += r['seconds']
  print('\ncompile seconds by test file:')
  for name, seconds in by_file.most_common(25):
    print(f'  {seconds:7.1f}  {name}')
  by_fun = collections.defaultdict(list)
  for r in compiles:
    if r['seconds'] > 2:
      by_fun[r['fun']].append(r)
  print('\ncompiles over 2 s by jitted function (count per test file):')
  for fun, rs in sorted(by_fun.items(), key=lambda kv: -total(kv[1]))[:30]:
    files = collections.Counter(r['test'].split('::')[0].replace('tests/', '') for r in rs)
    print(f'  {total(rs):7.1f} s  n={len(rs):3d}  {fun[:40]:40s} {dict(files.most_common())}')


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else '/tmp/prof')
