"""The `e4t` command line: a thin shell over library functions.

Every user mistake surfaces as an `E4TError` and becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e4t_jax import __version__
from e4t_jax.errors import E4TError

EXAMPLES = """examples:
  e4t demo                               # the foundation demo on the embedded tiny model
  e4t demo --out outputs/demo
  e4t convert check sd15/                # load a local diffusers Stable Diffusion folder strictly
"""


def _cmd_demo(args: argparse.Namespace) -> int:
  from e4t_jax import demo
  demo.run(Path(args.out), seed=args.seed)
  return 0


def _cmd_convert_check(args: argparse.Namespace) -> int:
  from e4t_jax.convert import pipeline
  sd = pipeline.load_stable_diffusion(args.model_dir)
  for name, count in pipeline.parameter_counts(sd).items():
    print(f'{name:>14}: {count / 1e6:9.2f} M parameters')
  print(f'{args.model_dir}: all tensors present, none unexpected, all shapes match.')
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='e4t', description='E4T: encoder-based domain tuning for fast text-to-image personalization (JAX).',
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--version', action='version', version=f'e4t-jax {__version__}')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  demo = sub.add_parser('demo', help='run the end-to-end demo on the embedded tiny model')
  demo.add_argument('--out', default='outputs/demo', help='output directory (default: outputs/demo)')
  demo.add_argument('--seed', type=int, default=0)
  demo.set_defaults(func=_cmd_demo)

  convert = sub.add_parser('convert', help='convert / check model weights')
  convert_sub = convert.add_subparsers(dest='convert_command', required=True, metavar='WHAT')
  check = convert_sub.add_parser('check', help='strictly load a local diffusers Stable Diffusion folder')
  check.add_argument('model_dir', help='folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/')
  check.set_defaults(func=_cmd_convert_check)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except E4TError as e:
    print(f'e4t: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('e4t: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
